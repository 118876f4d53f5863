//! Helpers for tests that run the real `skald` binary: start it on a free port, talk HTTP to
//! it, and stop it by its process id.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub const SKALD: &str = env!("CARGO_BIN_EXE_skald");

/// Runs `skald` with `args`; returns whether it succeeded, its stdout and its stderr.
pub fn skald(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(SKALD).args(args).output().expect("skald runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config file beside `data_dir` that lets saga steps reach targets on loopback (the egress
/// policy refuses them by default); pass it with `--config`.
pub fn loopback_targets_config(data_dir: &Path) -> String {
    let path = data_dir.with_extension("toml");
    std::fs::write(&path, "[sagas.egress]\nallow = [\"127.0.0.1\"]\n").expect("config written");
    path.to_string_lossy().into_owned()
}

/// A running server; killed with SIGKILL when dropped if still running.
pub struct Server {
    pub child: Child,
    pub url: String,
    pub stderr: std::thread::JoinHandle<String>,
}

impl Server {
    /// Starts `skald serve` on the data directory, on a free loopback port, and waits (with a
    /// deadline) until it prints the address it listens on.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// [`Server::start`] with environment variables set for the server.
    pub fn start_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let mut child = Command::new(SKALD)
            .envs(env.iter().copied())
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("skald starts");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                s.push_str(&line);
                s.push('\n');
            }
            s
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("skald prints its address within 30 s");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .to_owned();
        Server { child, url, stderr }
    }

    /// SIGKILL, as a crash.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM; waits for the exit status (with a deadline) and returns it with stderr.
    pub fn terminate(mut self) -> (std::process::ExitStatus, String) {
        // SAFETY: sending a signal to our own child by its id.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                return (status, stderr.join().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "skald did not stop within 30 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A small HTTP client.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Http {
    pub fn new(base: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            base: base.to_owned(),
        }
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        accept: &str,
        body: String,
    ) -> Result<(StatusCode, Bytes), String> {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .header("accept", accept)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(30), self.client.request(request))
            .await
            .map_err(|_| "timeout".to_owned())?
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }

    /// Every record of the global log.
    pub async fn read_all(&self) -> Vec<serde_json::Value> {
        let (status, body) = self
            .call(
                Method::GET,
                "/v1/all",
                "application/x-ndjson",
                String::new(),
            )
            .await
            .unwrap();
        assert_eq!(status, StatusCode::OK);
        body.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
}

/// Waits until exactly one of the nodes of a shared store says it runs the consumer groups
/// and sagas and every other one names its address as their owner's (`GET /v1/info`);
/// returns its index.
pub async fn owner_among(urls: &[String], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let mut owners = Vec::new();
        let mut named = Vec::new();
        let mut addresses = Vec::new();
        for (i, url) in urls.iter().enumerate() {
            let info = match Http::new(url)
                .call(Method::GET, "/v1/info", "application/json", String::new())
                .await
            {
                Ok((StatusCode::OK, body)) => {
                    serde_json::from_slice::<serde_json::Value>(&body).expect("/v1/info is JSON")
                }
                _ => serde_json::Value::Null,
            };
            let node = &info["node"];
            if node["groupsAndSagas"] == "owner" {
                owners.push(i);
            }
            addresses.push(node["address"].as_str().map(str::to_owned));
            named.push(node["owner"].as_str().map(str::to_owned));
        }
        if let [owner] = owners[..]
            && addresses[owner].is_some()
            && named.iter().all(|n| *n == addresses[owner])
        {
            return owner;
        }
        assert!(
            Instant::now() < deadline,
            "no single owner among {urls:?} within {within:?}: owners {owners:?}, named {named:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A config file beside `data_dir` for a node of a shared store: saga steps may reach
/// loopback, and the lease on the groups and sagas lasts `lease_ms`.
pub fn cluster_config(data_dir: &Path, lease_ms: u64) -> String {
    let path = data_dir.with_extension("toml");
    std::fs::write(
        &path,
        format!("[sagas.egress]\nallow = [\"127.0.0.1\"]\n\n[cluster]\nlease_ms = {lease_ms}\n"),
    )
    .expect("config written");
    path.to_string_lossy().into_owned()
}

/// `count` nodes of the shared store at `store`, each with a data directory under `dir` and a
/// lease of `lease_ms`; the servers (as options, for tests that kill one) and their URLs.
pub fn start_nodes(
    dir: &Path,
    count: usize,
    store: &str,
    lease_ms: u64,
) -> (Vec<Option<Server>>, Vec<String>) {
    let nodes: Vec<Option<Server>> = (0..count)
        .map(|i| {
            let data = dir.join(format!("node-{i}"));
            let config = cluster_config(&data, lease_ms);
            Some(Server::start(
                &data,
                &["--store", store, "--config", &config],
            ))
        })
        .collect();
    let urls = nodes
        .iter()
        .map(|n| n.as_ref().expect("started").url.clone())
        .collect();
    (nodes, urls)
}
