//! A small HTTP(S) GET for the issuer's discovery document and JWKS.

use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Largest document fetched.
const MAX_BYTES: usize = 1024 * 1024;
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct Fetcher {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<bytes::Bytes>>,
    /// Plain `http://` URLs are fetched too (a development issuer named in the config).
    allow_http: bool,
}

impl Fetcher {
    /// Trusts the PEM roots in `ca_file`, or the system's; fetches only `https://` URLs unless
    /// `allow_http`.
    pub fn new(ca_file: Option<&Path>, allow_http: bool) -> Result<Self, String> {
        let config = crate::tls::client_config(ca_file, None)?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            allow_http,
        })
    }

    pub async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url} is not a URL: {e}"))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") if self.allow_http => {}
            _ => {
                return Err(format!(
                    "{url} is not an https:// URL; the issuer's documents are fetched over \
                     TLS only (insecure_http_issuer allows http:// for a development issuer)"
                ));
            }
        }
        let request = hyper::Request::get(uri)
            .header("accept", "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| format!("{url} did not answer within {TIMEOUT:?}"))?
            .map_err(|e| format!("cannot fetch {url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url} answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("cannot read {url}: {e}"))?;
        Ok(body.to_bytes().to_vec())
    }
}
