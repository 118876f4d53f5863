//! Helpers: a server with a config file, requests with a bearer token, SSE reads.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{HeaderMap, Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::support::Server;

/// Starts `skald serve` with `config` written to a file in `dir`.
pub fn serve_with_config(dir: &Path, config: &str) -> Server {
    let file = dir.join("skald.toml");
    std::fs::write(&file, config).unwrap();
    Server::start(&dir.join("data"), &["--config", file.to_str().unwrap()])
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

#[derive(Clone)]
pub struct Api {
    client: Client<HttpConnector, Full<Bytes>>,
    pub base: String,
}

impl Api {
    pub fn new(base: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: base.to_owned(),
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut r = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    }

    /// A whole request and answer.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> Answer {
        let response = tokio::time::timeout(
            Duration::from_secs(30),
            self.client.request(self.request(method, path, token, body)),
        )
        .await
        .expect("answered within 30 s")
        .expect("the request is sent");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    /// The status of a streaming answer (SSE), and what it sends within `wait`.
    pub async fn stream(
        &self,
        path: &str,
        token: Option<&str>,
        wait: Duration,
    ) -> (StatusCode, String) {
        let response = self
            .client
            .request(self.request(Method::GET, path, token, ""))
            .await
            .unwrap();
        let status = response.status();
        let mut body = response.into_body();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
            if text.contains("caught-up") {
                break;
            }
        }
        (status, text)
    }

    /// The status of a streaming answer (SSE), and what it sends until `needle` shows up, it
    /// ends, or `wait` passes.
    pub async fn stream_until(
        &self,
        path: &str,
        token: Option<&str>,
        needle: &str,
        wait: Duration,
    ) -> (StatusCode, String) {
        let response = self
            .client
            .request(self.request(Method::GET, path, token, ""))
            .await
            .unwrap();
        let status = response.status();
        let mut body = response.into_body();
        let mut text = String::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(deadline, body.frame()).await {
            if let Ok(data) = frame.into_data() {
                text.push_str(&String::from_utf8_lossy(&data));
            }
            if text.contains(needle) {
                break;
            }
        }
        (status, text)
    }

    /// Creates an API key with `roles` as `admin` and returns the token.
    pub async fn key(&self, admin: &str, name: &str, roles: &[&str]) -> String {
        let a = self
            .call(
                Method::POST,
                "/v1/admin/keys",
                Some(admin),
                &serde_json::json!({"name": name, "roles": roles}).to_string(),
            )
            .await;
        assert_eq!(a.status, StatusCode::CREATED, "{:?}", a.body);
        a.json()["key"].as_str().unwrap().to_owned()
    }

    pub async fn append(&self, token: Option<&str>, stream: &str) -> Answer {
        self.call(
            Method::POST,
            &format!("/v1/streams/{stream}"),
            token,
            r#"{"events":[{"type":"Happened","data":{"n":1}}]}"#,
        )
        .await
    }
}

/// Asserts a 401 whose problem names `reason`.
pub fn assert_refused(a: &Answer, reason: &str) {
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{:?}", a.body);
    let p = a.json();
    assert_eq!(p["type"], "urn:skald:problem:unauthenticated");
    assert_eq!(p["reason"], reason, "{p}");
    assert!(a.headers.contains_key("www-authenticate"));
}
