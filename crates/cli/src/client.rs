//! A small HTTP/1.1 client for the CLI commands and the HTTP benchmark, with keep-alive
//! connection pooling.

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How long a request may take to connect, finish its TLS handshake and get its response
/// headers (and, for a whole answer, its body), unless `--timeout` says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one Skald server.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    /// `Bearer <token>`, sent with every request.
    authorization: Option<hyper::header::HeaderValue>,
    timeout: Duration,
}

/// Credentials and TLS trust for a client.
#[derive(Default)]
pub struct ClientSettings {
    /// An API key or a JWT.
    pub token: Option<String>,
    /// PEM roots for https://, instead of the system's.
    pub ca_cert: Option<std::path::PathBuf>,
    /// Client certificate and key files, for mTLS.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// See `DEFAULT_TIMEOUT` (the default when `None`).
    pub timeout: Option<Duration>,
}

impl HttpClient {
    /// A client for the server at `base`, such as `http://127.0.0.1:7340`.
    pub fn new(base: &str) -> anyhow::Result<Self> {
        Self::with_settings(base, ClientSettings::default())
    }

    /// A client with credentials and TLS settings.
    pub fn with_settings(base: &str, settings: ClientSettings) -> anyhow::Result<Self> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            bail!("server URL {base:?} must start with http:// or https://");
        }
        base.parse::<hyper::Uri>()
            .with_context(|| format!("server URL {base:?} is not a valid URL"))?;
        let timeout = settings.timeout.unwrap_or(DEFAULT_TIMEOUT);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        connector.enforce_http(false);
        let identity = settings
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        let tls = skald_security::tls::client_config(settings.ca_cert.as_deref(), identity)
            .map_err(|e| anyhow::anyhow!(e))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        let authorization = match settings.token {
            Some(token) => Some(
                hyper::header::HeaderValue::from_str(&format!("Bearer {token}"))
                    .context("the token holds characters a header cannot carry")?,
            ),
            None => None,
        };
        Ok(Self {
            client,
            base,
            authorization,
            timeout,
        })
    }

    /// Sends a request and returns the status and the response body as a stream.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Incoming)> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        if let Some(authorization) = &self.authorization {
            request = request.header(hyper::header::AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(Full::new(body))
            .context("building the request")?;
        // A peer that accepts the connection and never answers (a wrong port, a stuck proxy)
        // would otherwise hold the command forever.
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| self.no_answer("no answer"))?
            .with_context(|| format!("cannot reach the Skald server at {}", self.base))?;
        Ok((response.status(), response.into_body()))
    }

    /// Collects a whole body (an error's problem document, say) within the time-out.
    pub async fn collect(&self, body: Incoming) -> anyhow::Result<Bytes> {
        Ok(tokio::time::timeout(self.timeout, body.collect())
            .await
            .map_err(|_| self.no_answer("no whole answer"))?
            .context("reading the response")?
            .to_bytes())
    }

    /// The next frame of a body that must keep coming (a read that ends, unlike a follow):
    /// an error when nothing arrives within the time-out.
    pub async fn next_frame(
        &self,
        body: &mut Incoming,
    ) -> anyhow::Result<Option<hyper::body::Frame<Bytes>>> {
        match tokio::time::timeout(self.timeout, body.frame()).await {
            Ok(Some(frame)) => Ok(Some(frame.context("reading the response")?)),
            Ok(None) => Ok(None),
            Err(_) => Err(anyhow!(
                "the Skald server at {} stopped sending for {} s in the middle of its answer; \
                 give --timeout SECONDS to wait longer",
                self.base,
                self.timeout.as_secs_f64()
            )),
        }
    }

    fn no_answer(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "{what} from {} within {} s (connection, TLS handshake and response); check that \
             the URL names a Skald server, or give --timeout SECONDS to wait longer",
            self.base,
            self.timeout.as_secs_f64()
        )
    }

    /// `GET`s a read endpoint as NDJSON; the body streams one record per line.
    pub async fn get_ndjson(&self, path: &str) -> anyhow::Result<(StatusCode, Incoming)> {
        self.send(
            Method::GET,
            path,
            &[("accept", "application/x-ndjson")],
            Bytes::new(),
        )
        .await
    }

    /// Sends a request and collects the whole response body.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let (status, body) = self.send(method, path, headers, body).await?;
        let bytes = tokio::time::timeout_at(deadline, body.collect())
            .await
            .map_err(|_| self.no_answer("no whole answer"))?
            .context("reading the response")?
            .to_bytes();
        Ok((status, bytes))
    }
}

impl HttpClient {
    /// `GET /v1/info`: the server's version, head position, durability and size.
    pub async fn info(&self) -> anyhow::Result<serde_json::Value> {
        let (status, body) = self
            .call(Method::GET, "/v1/info", &[], Bytes::new())
            .await?;
        expect_success(status, &body)?;
        serde_json::from_slice(&body).context("the server's answer is not JSON")
    }
}

/// Turns a problem+json body into one readable line.
pub fn describe_problem(status: StatusCode, body: &[u8]) -> String {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(p) if p["detail"].is_string() => format!(
            "{} {}: {}",
            status.as_u16(),
            p["title"].as_str().unwrap_or(""),
            p["detail"].as_str().unwrap_or("")
        ),
        _ => format!("{} {}", status, String::from_utf8_lossy(body)),
    }
}

/// Fails with the server's problem description unless the status is a success.
pub fn expect_success(status: StatusCode, body: &[u8]) -> anyhow::Result<()> {
    if status.is_success() {
        Ok(())
    } else {
        bail!("{}", describe_problem(status, body))
    }
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One dedicated HTTP/1.1 keep-alive connection, without a pool: what each benchmark writer
/// uses, so the load generator spends as little CPU as it can on the machine it shares.
pub struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    base: String,
}

impl Connection {
    /// Connects to the server at `base` (`http://host:port`).
    pub async fn open(base: &str) -> anyhow::Result<Self> {
        let uri: hyper::Uri = base
            .parse()
            .with_context(|| format!("server URL {base:?} is not valid"))?;
        let host = uri.host().context("the server URL has no host")?;
        let port = uri.port_u16().unwrap_or(80);
        let stream = tokio::time::timeout(
            DEFAULT_TIMEOUT,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| {
            anyhow!(
                "cannot connect to the Skald server at {base} within {} s",
                DEFAULT_TIMEOUT.as_secs()
            )
        })?
        .with_context(|| format!("cannot reach the Skald server at {base}"))?;
        stream.set_nodelay(true)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Self {
            sender,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    /// Sends a request and collects the response.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", &self.base[7..]);
        for (k, v) in headers {
            request = request.header(*k, *v);
        }
        let request = request
            .body(Full::new(body))
            .context("building the request")?;
        let exchange = async {
            self.sender.ready().await.context("the connection closed")?;
            let response = self
                .sender
                .send_request(request)
                .await
                .context("the request failed")?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .context("reading the response")?
                .to_bytes();
            Ok((status, bytes))
        };
        tokio::time::timeout(DEFAULT_TIMEOUT, exchange)
            .await
            .map_err(|_| {
                anyhow!(
                    "no answer from the Skald server at {} within {} s",
                    self.base,
                    DEFAULT_TIMEOUT.as_secs()
                )
            })?
    }
}
