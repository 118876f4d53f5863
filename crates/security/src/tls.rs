//! TLS material from PEM files: the server's configuration (with optional mTLS), reloaded when
//! the files change or on SIGHUP, and client configurations for the CLI and the JWKS fetch.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use serde::Deserialize;
use skald_core::metrics::Counter;

/// How often the files are checked for a change.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// `[tls]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// With it, clients must present a certificate signed by this CA (mTLS).
    pub client_ca_file: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {} is not valid PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {} holds no CERTIFICATE block",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "key file {} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            path.display()
        )
    })
}

fn roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path, what)? {
        roots
            .add(cert)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

impl TlsConfig {
    /// Reads the files and builds a server configuration; errors name the file.
    pub fn load(&self) -> Result<ServerConfig, String> {
        let chain = read_certs(&self.cert_file, "certificate file")?;
        let key = read_key(&self.key_file)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = match &self.client_ca_file {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, "client CA file")?),
                    provider(),
                )
                .build()
                .map_err(|e| format!("client CA file {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_single_cert(chain, key).map_err(|e| {
            format!(
                "certificate {} and key {} do not fit together: {e}",
                self.cert_file.display(),
                self.key_file.display()
            )
        })?;
        // HTTP/2 carries the gRPC API (and any HTTP client that offers it); HTTP/1.1 the rest.
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files
    }

    fn fingerprint(&self) -> Vec<Option<(u64, SystemTime)>> {
        self.files()
            .iter()
            .map(|f| {
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?)))
            })
            .collect()
    }
}

/// The server configuration in force, swapped when the files change. A handshake takes the
/// current one; connections already open keep what they agreed on.
pub struct TlsSource {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    seen: RwLock<Vec<Option<(u64, SystemTime)>>>,
    pub reloaded: Counter,
    pub reload_failures: Counter,
}

impl TlsSource {
    /// Loads the files now; a bad file is an error at start.
    pub fn new(config: TlsConfig) -> Result<Arc<Self>, String> {
        let seen = config.fingerprint();
        let current = config.load()?;
        Ok(Arc::new(Self {
            config,
            current: RwLock::new(Arc::new(current)),
            seen: RwLock::new(seen),
            reloaded: Counter::new(),
            reload_failures: Counter::new(),
        }))
    }

    pub fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().expect("tls lock"))
    }

    pub fn requires_client_certificate(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    /// Loads the files again if they changed (or always, when `force`). A failure keeps the
    /// old material and is logged.
    pub fn reload(&self, force: bool) {
        let now = self.config.fingerprint();
        if !force && *self.seen.read().expect("tls lock") == now {
            return;
        }
        match self.config.load() {
            Ok(config) => {
                *self.current.write().expect("tls lock") = Arc::new(config);
                *self.seen.write().expect("tls lock") = now;
                self.reloaded.inc();
                tracing::info!("TLS certificate and key reloaded");
            }
            Err(e) => {
                // Do not retry the same broken files every tick; wait for the next change.
                *self.seen.write().expect("tls lock") = now;
                self.reload_failures.inc();
                tracing::error!(error = %e, "TLS reload failed; the previous certificate stays in use");
            }
        }
    }

    /// Watches the files (and SIGHUP) until the process ends.
    pub fn watch(self: &Arc<Self>) {
        let source = Arc::clone(self);
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let mut hup = signal(SignalKind::hangup()).ok();
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            loop {
                let forced = tokio::select! {
                    _ = tick.tick() => false,
                    Some(()) = async { match &mut hup { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                };
                source.reload(forced);
            }
        });
    }
}

/// A client configuration trusting the PEM roots in `ca_file` (or the system's), presenting
/// `identity` (certificate file, key file) when given.
pub fn client_config(
    ca_file: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<ClientConfig, String> {
    let roots = match ca_file {
        Some(ca) => roots(ca, "CA file")?,
        None => {
            let mut roots = RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    // No ALPN here: hyper-rustls sets it for the connections it makes.
    match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert, "client certificate")?, read_key(key)?)
            .map_err(|e| format!("client certificate {}: {e}", cert.display())),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Writes a development CA, a server certificate for localhost and a client certificate
/// (`CN=dev-client, O=admin`) into `dir`. Returns the files written.
pub fn write_dev_certificates(dir: &Path) -> Result<Vec<PathBuf>, String> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let err = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.distinguished_name
        .push(DnType::CommonName, "Skald development CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let server_key = KeyPair::generate().map_err(err)?;
    let mut server = CertificateParams::new(vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ])
    .map_err(err)?;
    server
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    let server_cert = server.signed_by(&server_key, &issuer).map_err(err)?;
    let client_key = KeyPair::generate().map_err(err)?;
    let mut client = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    client
        .distinguished_name
        .push(DnType::CommonName, "dev-client");
    client
        .distinguished_name
        .push(DnType::OrganizationName, "admin");
    let client_cert = client.signed_by(&client_key, &issuer).map_err(err)?;
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client_cert.pem()),
        ("client-key.pem", client_key.serialize_pem()),
    ];
    let mut written = Vec::new();
    for (name, pem) in files {
        let path = dir.join(name);
        write_private(&path, pem.as_bytes(), name.ends_with("key.pem"))?;
        written.push(path);
    }
    Ok(written)
}

/// Writes a file, readable only by its owner when `secret`.
pub fn write_private(path: &Path, bytes: &[u8], secret: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}
