//! TLS material from PEM files: the server's configuration (with optional mTLS), reloaded when
//! the files change or on SIGHUP, and client configurations for the CLI and the JWKS fetch.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
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
    /// PEM certificate revocation lists of the client CAs (needs `client_ca_file`): a client
    /// certificate they list is refused, and so is one whose issuer has no list here.
    pub crl_file: Option<PathBuf>,
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

/// The subject of the first certificate in the PEM file at `path` (`what` names it in errors).
pub fn certificate_subject(path: &Path, what: &str) -> Result<crate::x509::Subject, String> {
    let certs = read_certs(path, what)?;
    crate::x509::subject(&certs[0]).ok_or_else(|| {
        format!(
            "{what} {} has no subject this reader can read",
            path.display()
        )
    })
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| {
        format!(
            "key file {} holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {e}",
            path.display()
        )
    })
}

fn read_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, String> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read crl_file {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("crl_file {} is not valid PEM: {e}", path.display()))?;
    if crls.is_empty() {
        return Err(format!(
            "crl_file {} holds no X509 CRL block",
            path.display()
        ));
    }
    Ok(crls)
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

/// Why a server certificate cannot be served now: expired or not valid yet (`None` when it is
/// valid, or its dates cannot be read, which rustls will then refuse on its own).
fn out_of_date(leaf: &CertificateDer<'_>, path: &Path, now: i64) -> Option<String> {
    let (not_before, not_after) = crate::x509::validity(leaf)?;
    if now > not_after {
        Some(format!(
            "certificate file {} expired at {} (now {})",
            path.display(),
            crate::x509::format_time(not_after),
            crate::x509::format_time(now)
        ))
    } else if now < not_before {
        Some(format!(
            "certificate file {} is not valid before {} (now {})",
            path.display(),
            crate::x509::format_time(not_before),
            crate::x509::format_time(now)
        ))
    } else {
        None
    }
}

use crate::now_s;

/// A private key file others may read or change: worth a warning, not a refusal (container
/// platforms often mount secrets 0644).
fn key_file_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} has mode {mode:o}: users other than its owner may read it; chmod 600 it",
            path.display()
        )
    })
}

/// A server certificate chain and its key.
pub struct Served {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

/// What a load found besides the configuration.
pub struct Loaded {
    pub config: ServerConfig,
    /// The client certificate verifier inside `config`, with mTLS: open connections are
    /// checked again with it after a reload.
    pub verifier: Option<Arc<dyn ClientCertVerifier>>,
    /// The certificate chain and key served.
    pub served: Served,
    /// The served certificate's notBefore (seconds since the epoch), when it can be read.
    pub not_before: Option<i64>,
    /// The served certificate's notAfter (seconds since the epoch), when it can be read.
    pub not_after: Option<i64>,
    /// Why the served certificate is not valid now, if it is not.
    pub out_of_date: Option<String>,
}

impl TlsConfig {
    /// Reads the files and builds a server configuration; errors name the file.
    pub fn load(&self) -> Result<ServerConfig, String> {
        self.load_checked().map(|loaded| loaded.config)
    }

    /// Like `load`, and says whether the certificate is valid now.
    pub fn load_checked(&self) -> Result<Loaded, String> {
        self.load_serving(None)
    }

    /// Like `load_checked`, serving `served` (a chain and its key) instead of what the
    /// certificate and key files hold when given: the client side is read from its files.
    fn load_serving(&self, served: Option<&Served>) -> Result<Loaded, String> {
        let (chain, key) = match served {
            Some(served) => (served.chain.clone(), served.key.clone_key()),
            None => (
                read_certs(&self.cert_file, "certificate file")?,
                read_key(&self.key_file)?,
            ),
        };
        let validity = crate::x509::validity(&chain[0]);
        let not_after = validity.map(|(_, after)| after);
        let not_before = validity.map(|(before, _)| before);
        let out_of_date = out_of_date(&chain[0], &self.cert_file, now_s());
        let served = Served {
            chain: chain.clone(),
            key: key.clone_key(),
        };
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let (builder, verifier) = match &self.client_ca_file {
            Some(ca) => {
                let mut verifier = WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(ca, "client CA file")?),
                    provider(),
                );
                if let Some(crl) = &self.crl_file {
                    // The client's own certificate is looked up in its issuer's list; an
                    // issuer without a list here makes its certificates' status unknown,
                    // which is refused too.
                    verifier = verifier
                        .with_crls(read_crls(crl)?)
                        .only_check_end_entity_revocation();
                }
                let verifier = verifier.build().map_err(|e| {
                    format!(
                        "client CA file {}{}: {e}",
                        ca.display(),
                        self.crl_file
                            .as_ref()
                            .map(|c| format!(" with crl_file {}", c.display()))
                            .unwrap_or_default()
                    )
                })?;
                (
                    builder.with_client_cert_verifier(Arc::clone(&verifier)),
                    Some(verifier),
                )
            }
            None if self.crl_file.is_some() => {
                return Err(
                    "[tls] crl_file needs client_ca_file: revocation lists are for \
                            client certificates"
                        .to_owned(),
                );
            }
            None => (builder.with_no_client_auth(), None),
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
        if self.client_ca_file.is_some() {
            // A resumed session skips the client certificate's verification: a certificate
            // that expired, or whose CA was replaced, would go on working through it. With
            // mTLS every connection verifies the certificate again (no cache, no tickets).
            config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
            config.send_tls13_tickets = 0;
        }
        Ok(Loaded {
            config,
            verifier,
            served,
            not_before,
            not_after,
            out_of_date,
        })
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files.extend(self.crl_file.as_deref());
        files
    }

    /// What tells a change of the files: the inode, size, times and a hash of the contents,
    /// so that a replacement of the same size with the old modification time is seen too.
    fn fingerprint(&self) -> Vec<Option<FileStamp>> {
        self.files().iter().map(|f| FileStamp::of(f)).collect()
    }
}

/// One file's identity and contents, as far as a change of it matters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    inode: (u64, u64),
    len: u64,
    modified: Option<SystemTime>,
    changed: (i64, i64),
    digest: Vec<u8>,
}

impl FileStamp {
    /// `None` when the file cannot be read.
    pub fn of(path: &Path) -> Option<Self> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).ok()?;
        let bytes = std::fs::read(path).ok()?;
        Some(Self {
            inode: (meta.dev(), meta.ino()),
            len: meta.len(),
            modified: meta.modified().ok(),
            changed: (meta.ctime(), meta.ctime_nsec()),
            digest: ring::digest::digest(&ring::digest::SHA256, &bytes)
                .as_ref()
                .to_vec(),
        })
    }
}

/// The server configuration in force, swapped when the files change. A handshake takes the
/// current one; connections already open keep what they agreed on.
pub struct TlsSource {
    config: TlsConfig,
    current: RwLock<Arc<ServerConfig>>,
    /// The client certificate verifier of `current`, with mTLS.
    verifier: RwLock<Option<Arc<dyn ClientCertVerifier>>>,
    /// Counts successful reloads: open connections check their certificate again on each.
    generation: tokio::sync::watch::Sender<u64>,
    seen: RwLock<Vec<Option<FileStamp>>>,
    /// The served certificate's notAfter (seconds since the epoch), 0 when unknown.
    not_after: AtomicI64,
    /// What is served now: a reload that finds an out-of-date certificate keeps it, and
    /// still applies a new client CA or revocation list.
    served: Mutex<Served>,
    /// When a refused certificate that is not valid yet becomes valid (0: none): the files
    /// are read again then, though they have not changed.
    retry_at: AtomicI64,
    pub reloaded: Counter,
    pub reload_failures: Counter,
    /// Handshakes refused, by reason.
    refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Told of each handshake refused for a certificate reason (the audit, within its budget).
    on_refused: OnceLock<RefusalSink>,
}

/// Receives (reason, detail, peer address) of a handshake refused for its certificate.
pub type RefusalSink = Box<dyn Fn(&'static str, String, IpAddr) + Send + Sync>;

/// The reason a handshake was refused, for the count and the audit, and whether it was about
/// the client's certificate (rather than a protocol the client offered).
pub fn handshake_reason(error: &std::io::Error) -> (&'static str, bool) {
    match error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        Some(error) => error_reason(error),
        None if error.kind() == std::io::ErrorKind::TimedOut => ("timeout", false),
        None => ("io", false),
    }
}

/// `handshake_reason` for a rustls error.
fn error_reason(error: &rustls::Error) -> (&'static str, bool) {
    use rustls::{CertificateError, Error};
    match error {
        Error::NoCertificatesPresented => ("no-certificate", true),
        Error::InvalidCertificate(e) => (
            match e {
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => "expired",
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    "not-yet-valid"
                }
                CertificateError::UnknownIssuer => "unknown-issuer",
                CertificateError::BadSignature => "bad-signature",
                CertificateError::Revoked => "revoked",
                CertificateError::UnknownRevocationStatus => "unknown-revocation-status",
                CertificateError::InvalidPurpose
                | CertificateError::InvalidPurposeContext { .. } => "wrong-purpose",
                CertificateError::BadEncoding => "bad-encoding",
                _ => "invalid-certificate",
            },
            true,
        ),
        Error::PeerIncompatible(_) => ("incompatible", false),
        Error::PeerMisbehaved(_) => ("misbehaved", false),
        Error::InvalidMessage(_) | Error::InappropriateMessage { .. } => ("malformed", false),
        Error::AlertReceived(_) => ("alert", false),
        _ => ("other", false),
    }
}

impl TlsSource {
    /// Loads the files now; a bad file is an error at start. A certificate that is expired
    /// or not valid yet is served with a warning (refusing to start helps no one then); the
    /// same file is refused by a reload, which keeps the certificate in use.
    pub fn new(config: TlsConfig) -> Result<Arc<Self>, String> {
        let seen = config.fingerprint();
        let loaded = config.load_checked()?;
        if let Some(why) = &loaded.out_of_date {
            tracing::warn!("{why}: clients will refuse it; replace it (a reload picks it up)");
        }
        if let Some(why) = key_file_warning(&config.key_file) {
            tracing::warn!("{why}");
        }
        Ok(Arc::new(Self {
            config,
            current: RwLock::new(Arc::new(loaded.config)),
            verifier: RwLock::new(loaded.verifier),
            generation: tokio::sync::watch::channel(0).0,
            seen: RwLock::new(seen),
            not_after: AtomicI64::new(loaded.not_after.unwrap_or(0)),
            served: Mutex::new(loaded.served),
            retry_at: AtomicI64::new(0),
            reloaded: Counter::new(),
            reload_failures: Counter::new(),
            refused: Mutex::new(BTreeMap::new()),
            on_refused: OnceLock::new(),
        }))
    }

    /// The served certificate's notAfter, seconds since the epoch.
    pub fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    /// Sets who hears of handshakes refused for a certificate reason (once).
    pub fn on_refused(&self, sink: RefusalSink) {
        let _ = self.on_refused.set(sink);
    }

    /// Counts a failed handshake and, when the client's certificate was the reason, tells
    /// the sink. Other failures (scanners, old protocols) are counted and logged at debug.
    pub fn handshake_failed(&self, peer: IpAddr, error: &std::io::Error) {
        let (reason, certificate) = handshake_reason(error);
        *self
            .refused
            .lock()
            .expect("tls lock")
            .entry(reason)
            .or_default() += 1;
        tracing::debug!(peer = %peer, error = %error, reason, "TLS handshake failed");
        if certificate && let Some(sink) = self.on_refused.get() {
            sink(reason, error.to_string(), peer);
        }
    }

    /// Tells of each successful reload (a new value), after which a connection's client
    /// certificate is checked again.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// Checks a client certificate chain (leaf first) against the CA, the revocation lists
    /// and the clock of now, as a new handshake would: `Err((reason, detail))` when a
    /// connection that presented it may no longer be used.
    pub fn verify_client(
        &self,
        chain: &[CertificateDer<'static>],
    ) -> Result<(), (&'static str, String)> {
        let Some(verifier) = self.verifier.read().expect("tls lock").clone() else {
            return Ok(());
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err(("no-certificate", "no client certificate".to_owned()));
        };
        verifier
            .verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| (error_reason(&e).0, e.to_string()))
    }

    /// Counts (and tells the sink of) an open connection closed because its client
    /// certificate is no longer accepted.
    pub fn connection_distrusted(&self, peer: IpAddr, reason: &'static str, detail: String) {
        *self
            .refused
            .lock()
            .expect("tls lock")
            .entry(reason)
            .or_default() += 1;
        tracing::info!(peer = %peer, reason, "TLS connection closed: {detail}");
        if let Some(sink) = self.on_refused.get() {
            sink(
                reason,
                format!(
                    "open connection closed, its client certificate is no longer accepted: {detail}"
                ),
                peer,
            );
        }
    }

    /// Handshakes refused so far, by reason.
    pub fn refused_handshakes(&self) -> Vec<(&'static str, u64)> {
        self.refused
            .lock()
            .expect("tls lock")
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect()
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
            // Unchanged, unless a refused certificate has become valid since.
            let retry_at = self.retry_at.load(Ordering::Relaxed);
            if retry_at == 0 || now_s() < retry_at {
                return;
            }
        }
        self.retry_at.store(0, Ordering::Relaxed);
        // Whatever happens, the same files are not read again every tick: only when they
        // change, on SIGHUP, or when a certificate not valid yet becomes valid.
        *self.seen.write().expect("tls lock") = now;
        let loaded = match self.config.load_checked() {
            Ok(loaded) => loaded,
            Err(e) => {
                // The certificate or key files may be the broken ones (a certificate written
                // before its key): a new client CA or revocation list still applies.
                self.reload_failures.inc();
                self.keep_serving(&e);
                return;
            }
        };
        let Some(why) = loaded.out_of_date else {
            self.apply(loaded);
            self.reloaded.inc();
            tracing::info!("TLS certificate and key reloaded");
            if let Some(why) = key_file_warning(&self.config.key_file) {
                tracing::warn!("{why}");
            }
            return;
        };
        // Rotating in a certificate clients will refuse would take every one of them down:
        // the served one stays. A new client CA or revocation list still applies, with it.
        self.reload_failures.inc();
        if let Some(before) = loaded.not_before.filter(|&before| before > now_s()) {
            self.retry_at.store(before, Ordering::Relaxed);
        }
        self.keep_serving(&why);
    }

    /// After a reload refused for the certificate or key files (`why`): applies the client
    /// CA and revocation lists with the certificate served now, when they load.
    fn keep_serving(&self, why: &str) {
        let kept = {
            let served = self.served.lock().expect("tls lock");
            self.config.load_serving(Some(&served))
        };
        match kept {
            Ok(kept) if self.config.client_ca_file.is_some() => {
                self.apply(kept);
                tracing::error!(
                    error = %why,
                    "TLS reload failed; the previous certificate stays in use (the client CA \
                     and revocation list files were applied)"
                );
            }
            Ok(_) => tracing::error!(
                error = %why,
                "TLS reload failed; the previous certificate stays in use"
            ),
            Err(e) => tracing::error!(
                error = %format!("{why}; {e}"),
                "TLS reload failed; the previous certificate stays in use"
            ),
        }
    }

    /// Puts loaded material in force, and tells open connections to check their client
    /// certificate against it.
    fn apply(&self, loaded: Loaded) {
        *self.current.write().expect("tls lock") = Arc::new(loaded.config);
        *self.verifier.write().expect("tls lock") = loaded.verifier;
        self.not_after
            .store(loaded.not_after.unwrap_or(0), Ordering::Relaxed);
        *self.served.lock().expect("tls lock") = loaded.served;
        self.generation.send_modify(|g| *g += 1);
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
                // Reading and hashing the files is blocking work.
                let source = Arc::clone(&source);
                let _ = tokio::task::spawn_blocking(move || source.reload(forced)).await;
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

/// Writes a development CA, a server certificate for localhost, a client certificate
/// (`CN=dev-client, O=admin`) and a node certificate for nodes that forward to one another
/// (`CN=skald-node`, no roles) into `dir`. Returns the files written.
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
    let node_key = KeyPair::generate().map_err(err)?;
    let mut node = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    node.distinguished_name
        .push(DnType::CommonName, "skald-node");
    let node_cert = node.signed_by(&node_key, &issuer).map_err(err)?;
    let files = [
        ("ca.pem", ca_cert.pem()),
        ("server.pem", server_cert.pem()),
        ("server-key.pem", server_key.serialize_pem()),
        ("client.pem", client_cert.pem()),
        ("client-key.pem", client_key.serialize_pem()),
        ("node.pem", node_cert.pem()),
        ("node-key.pem", node_key.serialize_pem()),
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
