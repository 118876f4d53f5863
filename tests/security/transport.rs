//! TLS and mTLS: no client certificate is refused, the certificate names the principal, and
//! replaced certificate files are used by new handshakes while old connections keep working.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::StatusCode;
use hyper::client::conn::http1::SendRequest;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::common::serve_with_config;
use crate::support::skald;

fn dev_certs(dir: &Path) {
    let (ok, _, err) = skald(&["certs", "dev", "--out", dir.to_str().unwrap()]);
    assert!(ok, "{err}");
}

/// Copies a certificate set into `live`, each file replaced by a rename (never half-written).
fn install(from: &Path, live: &Path) {
    std::fs::create_dir_all(live).unwrap();
    for name in ["ca.pem", "server.pem", "server-key.pem"] {
        let tmp = live.join(format!(".{name}.tmp"));
        std::fs::copy(from.join(name), &tmp).unwrap();
        std::fs::rename(&tmp, live.join(name)).unwrap();
    }
}

struct Tls {
    sender: SendRequest<Empty<Bytes>>,
    server_certificate: Vec<u8>,
}

/// Connects over TLS trusting `certs/ca.pem`, presenting `certs/client.pem` when `client`.
async fn connect(addr: &str, certs: &Path, client: bool) -> Result<Tls, String> {
    within("connecting", connect_unbounded(addr, certs, client)).await
}

/// `future`'s result, or a panic naming `what` after 30 s: a peer that stops answering fails
/// the test at the step, instead of hanging the suite (two runs hung in this file, with no
/// connection open; this names where).
async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(std::time::Duration::from_secs(30), future).await {
        Ok(done) => done,
        Err(_) => panic!("{what}: nothing within 30 s"),
    }
}

async fn connect_unbounded(addr: &str, certs: &Path, client: bool) -> Result<Tls, String> {
    let identity = client.then(|| (certs.join("client.pem"), certs.join("client-key.pem")));
    let config = skald_security::tls::client_config(
        Some(&certs.join("ca.pem")),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_certificate = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(Tls {
        sender,
        server_certificate,
    })
}

async fn get(tls: &mut Tls, path: &str) -> Result<(StatusCode, String), String> {
    within(&format!("GET {path}"), get_unbounded(tls, path)).await
}

async fn get_unbounded(tls: &mut Tls, path: &str) -> Result<(StatusCode, String), String> {
    tls.sender.ready().await.map_err(|e| e.to_string())?;
    let request = hyper::Request::get(path)
        .header("host", "localhost")
        .body(Empty::new())
        .unwrap();
    let response = tls
        .sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

fn pem_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_with_certificate_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second, live) = (
        dir.path().join("one"),
        dir.path().join("two"),
        dir.path().join("live"),
    );
    dev_certs(&first);
    dev_certs(&second);
    install(&first, &live);
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\n[auth]\nmtls = true\n",
            live.display()
        ),
    );
    assert!(server.url.starts_with("https://"), "{}", server.url);
    let addr = server.url.trim_start_matches("https://").to_owned();

    // Without a client certificate: no request gets through.
    let refused = match connect(&addr, &first, false).await {
        Err(_) => true,
        Ok(mut tls) => get(&mut tls, "/v1/info").await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // With one: the certificate's CN and O are the principal and its roles (O=admin).
    let mut old = connect(&addr, &first, true).await.unwrap();
    assert_eq!(old.server_certificate, pem_der(&first.join("server.pem")));
    let (status, body) = get(&mut old, "/v1/admin/keys").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, body) = get(&mut old, "/health/live").await.unwrap();
    assert!(body.contains("live"));

    // The CLI speaks TLS with the same files.
    let url = server.url.clone();
    let cli = |certs: &Path| {
        let args = [
            "info",
            "--server",
            &url,
            "--ca-cert",
            certs.join("ca.pem").to_str().unwrap(),
            "--client-cert",
            certs.join("client.pem").to_str().unwrap(),
            "--client-key",
            certs.join("client-key.pem").to_str().unwrap(),
        ]
        .map(str::to_owned);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        skald(&args)
    };
    let (ok, out, err) = cli(&first);
    assert!(ok && out.contains("headPosition"), "{out}{err}");

    // Rotate: replace the files, then SIGHUP. New handshakes see the new certificate.
    install(&second, &live);
    // SAFETY: a signal to the child this test started, by its id.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut fresh = loop {
        if let Ok(tls) = connect(&addr, &second, true).await {
            break tls;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was not used within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        fresh.server_certificate,
        pem_der(&second.join("server.pem"))
    );
    assert_eq!(get(&mut fresh, "/v1/info").await.unwrap().0, StatusCode::OK);
    // The connection opened before the rotation presented a certificate of the replaced CA:
    // it is closed (a connection whose certificate stays trusted is kept: see
    // `revoked_or_distrusted_client_certificates_are_refused_and_their_connections_closed`).
    closed_within(
        &mut old,
        "a certificate of the replaced CA",
        Duration::from_secs(10),
    )
    .await;
    // And clients of the old CA are now refused.
    let old_ca = match connect(&addr, &first, true).await {
        Err(_) => true,
        Ok(mut tls) => get(&mut tls, "/v1/info").await.is_err(),
    };
    assert!(old_ca, "a certificate of the replaced CA still got in");
    let (ok, _, err) = cli(&second);
    assert!(ok, "{err}");
    let (_, metrics) = get(&mut fresh, "/metrics").await.unwrap();
    assert!(
        metrics.contains("skald_tls_reloads_total{outcome=\"success\"}"),
        "{metrics}"
    );

    // A broken replacement is refused and the server keeps its certificate.
    std::fs::write(live.join("server.pem"), "not a certificate").unwrap();
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut still = connect(&addr, &second, true).await.unwrap();
    assert_eq!(
        still.server_certificate,
        pem_der(&second.join("server.pem"))
    );
    assert_eq!(get(&mut still, "/v1/info").await.unwrap().0, StatusCode::OK);

    // Good files again, without a signal: the watcher sees the change on its own.
    install(&first, &live);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut back = loop {
        if let Ok(tls) = connect(&addr, &first, true).await {
            break tls;
        }
        assert!(
            Instant::now() < deadline,
            "a changed certificate file was not picked up within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(back.server_certificate, pem_der(&first.join("server.pem")));
    assert_eq!(get(&mut back, "/v1/info").await.unwrap().0, StatusCode::OK);
    let (status, stderr) = server.terminate();
    assert!(status.success());
    assert!(stderr.contains("TLS reload failed"), "{stderr}");
}

/// A CA of the test's own, which issues certificates with chosen dates.
struct Pki {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    ca_pem: String,
    /// The serial number the last certificate issued got.
    serial: std::sync::atomic::AtomicU64,
}

impl Pki {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.distinguished_name
            .push(rcgen::DnType::CommonName, "test CA");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_pem = ca.self_signed(&key).unwrap().pem();
        Self {
            issuer: rcgen::Issuer::new(ca, key),
            ca_pem,
            serial: std::sync::atomic::AtomicU64::new(1000),
        }
    }

    /// (certificate PEM, key PEM), valid from `from` to `until` seconds from now.
    fn issue(&self, cn: &str, server: bool, from: i64, until: i64) -> (String, String) {
        let mut name = rcgen::DistinguishedName::new();
        name.push(rcgen::DnType::CommonName, cn);
        if !server {
            name.push(rcgen::DnType::OrganizationName, "admin");
        }
        self.issue_to(name, server, from, until)
    }

    /// Like `issue`, with the whole subject given.
    fn issue_to(
        &self,
        subject: rcgen::DistinguishedName,
        server: bool,
        from: i64,
        until: i64,
    ) -> (String, String) {
        let names = if server {
            vec!["localhost".to_owned()]
        } else {
            Vec::new()
        };
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        params.distinguished_name = subject;
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        params.serial_number = Some(serial.into());
        if !server {
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        }
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now + time::Duration::seconds(from);
        params.not_after = now + time::Duration::seconds(until);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

impl Pki {
    /// The serial number of the last certificate issued.
    fn last_serial(&self) -> u64 {
        self.serial.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// A PEM CRL of this CA that revokes `serials`.
    fn crl(&self, serials: &[u64]) -> String {
        let now = time::OffsetDateTime::now_utc();
        rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(7),
            crl_number: now.unix_timestamp_nanos().to_be_bytes()[8..]
                .to_vec()
                .into(),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|&serial| rcgen::RevokedCertParams {
                    serial_number: serial.into(),
                    revocation_time: now - time::Duration::seconds(30),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// Opens a keep-alive HTTP/1.1 connection over TLS with `config`.
async fn open_with(config: &Arc<rustls::ClientConfig>, addr: &str) -> Result<Tls, String> {
    within(
        "opening a TLS connection",
        open_with_unbounded(config, addr),
    )
    .await
}

async fn open_with_unbounded(
    config: &Arc<rustls::ClientConfig>,
    addr: &str,
) -> Result<Tls, String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_certificate = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Ok(Tls {
        sender,
        server_certificate,
    })
}

fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) {
    for (file, text) in [
        (format!("{name}.pem"), cert),
        (format!("{name}-key.pem"), key),
    ] {
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(file)).unwrap();
    }
}

/// Connects with a client configuration kept across connections (so that rustls offers to
/// resume the session of the previous one) and GETs `path`.
async fn get_with(
    config: &Arc<rustls::ClientConfig>,
    addr: &str,
    path: &str,
) -> Result<(StatusCode, String, Option<rustls::HandshakeKind>), String> {
    within(
        &format!("GET {path} on a new connection"),
        get_with_unbounded(config, addr, path),
    )
    .await
}

async fn get_with_unbounded(
    config: &Arc<rustls::ClientConfig>,
    addr: &str,
    path: &str,
) -> Result<(StatusCode, String, Option<rustls::HandshakeKind>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let kind = stream.get_ref().1.handshake_kind();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let mut tls = Tls {
        sender,
        server_certificate: Vec::new(),
    };
    let (status, body) = get(&mut tls, path).await?;
    Ok((status, body, kind))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_certificates_neither_resume_nor_rotate_in_and_refusals_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let pki = Pki::new();
    std::fs::write(live.join("ca.pem"), &pki.ca_pem).unwrap();
    let served = pki.issue("localhost", true, -60, 86_400 * 30);
    write_pair(&live, "server", &served);
    write_pair(&live, "admin", &pki.issue("ops", false, -60, 86_400));
    write_pair(&live, "brief", &pki.issue("brief", false, -60, 4));
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\n[auth]\nmtls = true\n",
            live.display()
        ),
    );
    let addr = server.url.trim_start_matches("https://").to_owned();
    let client = |name: &str| {
        Arc::new(
            skald_security::tls::client_config(
                Some(&live.join("ca.pem")),
                Some((
                    &live.join(format!("{name}.pem")),
                    &live.join(format!("{name}-key.pem")),
                )),
            )
            .unwrap(),
        )
    };
    let (admin, brief) = (client("admin"), client("brief"));

    // While the brief certificate is valid it gets in, each time with a full handshake.
    for _ in 0..2 {
        let (status, body, kind) = get_with(&brief, &addr, "/v1/admin/keys").await.unwrap();
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(
            kind,
            Some(rustls::HandshakeKind::Full),
            "a TLS session was resumed"
        );
    }
    // Once it has expired, the session it could resume does not let it in either.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let after = get_with(&brief, &addr, "/v1/admin/keys").await;
    assert!(
        after.is_err(),
        "an expired client certificate was served: {after:?}"
    );

    // The refusal is counted by reason and audited.
    let (status, metrics, _) = get_with(&admin, &addr, "/metrics").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let expired = metrics
        .lines()
        .find(|l| l.starts_with("skald_tls_handshake_failures_total{reason=\"expired\"}"))
        .unwrap_or_else(|| panic!("no expired handshakes counted:\n{metrics}"));
    assert!(!expired.ends_with(" 0"), "{expired}");
    let not_after = CertificateDer::from_pem_slice(served.0.as_bytes()).unwrap();
    let not_after = skald_security::x509::validity(&not_after).unwrap().1;
    assert!(
        metrics.contains(&format!(
            "skald_tls_certificate_expiry_timestamp_seconds {not_after}"
        )),
        "{metrics}"
    );
    let (_, audit, _) = get_with(&admin, &addr, "/v1/streams/$audit?limit=1000")
        .await
        .unwrap();
    assert!(
        audit.contains("\"method\":\"certificate\"") && audit.contains("\"reason\":\"expired\""),
        "{audit}"
    );

    // An expired server certificate is not rotated in: clients would all refuse it.
    write_pair(&live, "server", &pki.issue("localhost", true, -86_400, -60));
    // SAFETY: a signal to the child this test started, by its id.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (status, _, _) = get_with(&admin, &addr, "/v1/info").await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the expired server certificate went in"
    );

    // A replacement of the same size whose modification time was set back is still seen.
    let current = std::fs::read(live.join("server.pem")).unwrap();
    let mtime = std::fs::metadata(live.join("server.pem"))
        .unwrap()
        .modified()
        .unwrap();
    let replacement = loop {
        let pair = pki.issue("localhost", true, -60, 86_400 * 7);
        if pair.0.len() == current.len() {
            break pair;
        }
    };
    write_pair(&live, "server", &replacement);
    for file in ["server.pem", "server-key.pem"] {
        std::fs::File::options()
            .write(true)
            .open(live.join(file))
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }
    let want = CertificateDer::from_pem_slice(replacement.0.as_bytes())
        .unwrap()
        .to_vec();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&admin))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        if stream.get_ref().1.peer_certificates().unwrap()[0].as_ref() == want.as_slice() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a same-size replacement with the old mtime was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, stderr) = server.terminate();
    assert!(status.success());
    assert!(stderr.contains("expired at"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_names_exactly_one_principal_within_the_name_rules() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let pki = Pki::new();
    std::fs::write(live.join("ca.pem"), &pki.ca_pem).unwrap();
    write_pair(&live, "server", &pki.issue("localhost", true, -60, 86_400));
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\n[auth]\nmtls = true\n",
            live.display()
        ),
    );
    let addr = server.url.trim_start_matches("https://").to_owned();
    let client = |file: &str| {
        Arc::new(
            skald_security::tls::client_config(
                Some(&live.join("ca.pem")),
                Some((
                    &live.join(format!("{file}.pem")),
                    &live.join(format!("{file}-key.pem")),
                )),
            )
            .unwrap(),
        )
    };
    // The CN's OID written as a custom attribute type: rcgen keeps one value per type.
    let second_cn = || rcgen::DnType::CustomDnType(vec![2, 5, 4, 3]);
    let subject = |entries: Vec<(rcgen::DnType, rcgen::DnValue)>| {
        let mut name = rcgen::DistinguishedName::new();
        for (kind, value) in entries {
            name.push(kind, value);
        }
        name.push(rcgen::DnType::OrganizationName, "admin");
        name
    };
    let utf8 = |s: &str| rcgen::DnValue::Utf8String(s.to_owned());
    let cases = [
        (
            "two CNs",
            subject(vec![
                (rcgen::DnType::CommonName, utf8("alice")),
                (second_cn(), utf8("root")),
            ]),
            "2 common names",
        ),
        (
            "a BMPString CN before a readable one",
            subject(vec![
                (
                    rcgen::DnType::CommonName,
                    rcgen::DnValue::BmpString("mallory".try_into().unwrap()),
                ),
                (second_cn(), utf8("admin-user")),
            ]),
            "BMPString",
        ),
        (
            "a newline",
            subject(vec![(rcgen::DnType::CommonName, utf8("ops\nadmin"))]),
            r"'\\n'",
        ),
        (
            "a NUL",
            subject(vec![(rcgen::DnType::CommonName, utf8("ops\0"))]),
            r"'\\0'",
        ),
        (
            "a Hangul filler",
            subject(vec![(rcgen::DnType::CommonName, utf8("ops\u{3164}"))]),
            "U+3164",
        ),
        (
            "a right-to-left override",
            subject(vec![(rcgen::DnType::CommonName, utf8("ops\u{202E}nimda"))]),
            r"'\\u{202e}'",
        ),
        (
            "markup",
            subject(vec![(rcgen::DnType::CommonName, utf8("<img src=x>"))]),
            "'<'",
        ),
        (
            "5,000 characters",
            subject(vec![(rcgen::DnType::CommonName, utf8(&"a".repeat(5000)))]),
            "128 bytes",
        ),
        ("no CN", subject(vec![]), "no common name"),
    ];
    for (what, name, says) in cases {
        let file = what.replace([' ', ','], "-");
        write_pair(&live, &file, &pki.issue_to(name, false, -60, 86_400));
        let (status, body, _) = get_with(&client(&file), &addr, "/v1/admin/keys")
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert!(body.contains(says), "{what}: {body}");
    }

    // One readable CN within the rules names the principal; an O that is no role name adds
    // no role and does not refuse the certificate.
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, "orders-service");
    name.push(rcgen::DnType::OrganizationName, "admin");
    name.push(
        rcgen::DnType::CustomDnType(vec![2, 5, 4, 10]),
        "Example Corp",
    );
    write_pair(&live, "good", &pki.issue_to(name, false, -60, 86_400));
    let (status, body, _) = get_with(&client("good"), &addr, "/v1/admin/keys")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(server);
}

/// A peer that accepts connections and never answers (a wrong port, a stuck proxy) does not
/// hold the CLI forever, over http:// or https://.
#[test]
fn the_cli_gives_up_on_a_peer_that_never_answers() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    // Accept and keep every connection open, reading nothing and writing nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming() {
            match stream {
                Ok(stream) => held.push(stream),
                Err(_) => break,
            }
        }
    });
    for scheme in ["http", "https"] {
        let started = Instant::now();
        let url = format!("{scheme}://{addr}");
        let (ok, _, stderr) = skald(&["info", "--server", &url, "--timeout", "1.5"]);
        assert!(!ok, "{scheme}: {stderr}");
        assert!(
            stderr.contains(&format!("no answer from {url} within 1.5 s"))
                && stderr.contains("--timeout"),
            "{scheme}: {stderr}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{scheme}: the CLI waited {:?}",
            started.elapsed()
        );
    }
    // A server that sends its headers and then stalls, in an error's body or in a read.
    let stalling = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = stalling.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut held = Vec::new();
        for stream in stalling.incoming() {
            let Ok(mut stream) = stream else { break };
            let mut head = [0u8; 4096];
            let n = stream.read(&mut head).unwrap_or(0);
            let answer: &[u8] = if head[..n].starts_with(b"GET /v1/info") {
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/problem+json\r\ncontent-length: 100\r\n\r\n{\"detail\":"
            } else {
                b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ntransfer-encoding: chunked\r\n\r\n"
            };
            let _ = stream.write_all(answer);
            held.push(stream);
        }
    });
    let url = format!("http://{addr}");
    let (ok, _, stderr) = skald(&["info", "--server", &url, "--timeout", "1"]);
    assert!(!ok && stderr.contains("no whole answer"), "{stderr}");
    let (ok, _, stderr) = skald(&["read", "order-1", "--server", &url, "--timeout", "1"]);
    assert!(
        !ok && stderr.contains("stopped sending for 1 s"),
        "{stderr}"
    );

    let (ok, _, stderr) = skald(&["info", "--server", "http://127.0.0.1:1", "--timeout", "0"]);
    assert!(!ok);
    assert!(stderr.contains("not a number of seconds"), "{stderr}");
}

/// Waits until a GET on an open connection fails (the server closed it), or panics.
async fn closed_within(tls: &mut Tls, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if get(tls, "/v1/info").await.is_err() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the connection stayed open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_or_distrusted_client_certificates_are_refused_and_their_connections_closed() {
    // A revocation list needs the client CA it belongs to.
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let config = skald_security::tls::TlsConfig {
        cert_file: live.join("server.pem"),
        key_file: live.join("server-key.pem"),
        client_ca_file: None,
        crl_file: Some(live.join("crl.pem")),
    };
    let pki = Pki::new();
    write_pair(&live, "server", &pki.issue("localhost", true, -60, 86_400));
    let refused = config.load().err().unwrap();
    assert!(
        refused.contains("crl_file needs client_ca_file"),
        "{refused}"
    );

    std::fs::write(live.join("ca.pem"), &pki.ca_pem).unwrap();
    write_pair(&live, "alice", &pki.issue("alice", false, -60, 86_400));
    let alice_serial = pki.last_serial();
    write_pair(&live, "bob", &pki.issue("bob", false, -60, 86_400));
    let bob_serial = pki.last_serial();
    write_pair(&live, "dave", &pki.issue("dave", false, -60, 86_400));
    write_pair(&live, "erin", &pki.issue("erin", false, -60, 86_400));
    let erin_serial = pki.last_serial();
    std::fs::write(live.join("crl.pem"), pki.crl(&[])).unwrap();
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\ncrl_file = \"{0}/crl.pem\"\n[auth]\nmtls = true\n",
            live.display()
        ),
    );
    let addr = server.url.trim_start_matches("https://").to_owned();
    let client = |name: &str| {
        Arc::new(
            skald_security::tls::client_config(
                Some(&live.join("ca.pem")),
                Some((
                    &live.join(format!("{name}.pem")),
                    &live.join(format!("{name}-key.pem")),
                )),
            )
            .unwrap(),
        )
    };
    let (alice, bob, dave) = (client("alice"), client("bob"), client("dave"));
    let mut erin_open = open_with(&client("erin"), &addr).await.unwrap();
    let mut alice_open = open_with(&alice, &addr).await.unwrap();
    let mut bob_open = open_with(&bob, &addr).await.unwrap();
    // Alice also holds a WebSocket: after the upgrade hyper no longer owns that connection.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::clone(&alice))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let (mut alice_ws, _) = tokio_tungstenite::client_async("wss://localhost/v1/ws", tls)
        .await
        .unwrap();
    let ws_alive = async |ws: &mut tokio_tungstenite::WebSocketStream<_>| -> bool {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        if ws
            .send(Message::Ping(b"alive?".to_vec().into()))
            .await
            .is_err()
        {
            return false;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => return true,
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => return false,
                Ok(Some(Ok(_))) => {}
                Err(_) => panic!("the WebSocket neither answered nor closed within 10 s"),
            }
        }
    };
    assert!(ws_alive(&mut alice_ws).await);
    assert_eq!(
        get(&mut alice_open, "/v1/info").await.unwrap().0,
        StatusCode::OK
    );
    assert_eq!(
        get(&mut bob_open, "/v1/info").await.unwrap().0,
        StatusCode::OK
    );

    // Alice's key leaked: her certificate is revoked. New handshakes refuse it, and the
    // connection she already holds is closed; Bob's is not.
    let tmp = live.join(".crl.tmp");
    std::fs::write(&tmp, pki.crl(&[alice_serial])).unwrap();
    std::fs::rename(&tmp, live.join("crl.pem")).unwrap();
    closed_within(
        &mut alice_open,
        "a revoked certificate",
        Duration::from_secs(10),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ws_alive(&mut alice_ws).await {
        assert!(
            Instant::now() < deadline,
            "a WebSocket of a revoked certificate stayed open"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = open_with(&alice, &addr).await;
    let again = match again {
        Err(e) => e,
        // TLS 1.3: the client learns of the refusal at its first read.
        Ok(mut tls) => get(&mut tls, "/v1/info").await.err().unwrap(),
    };
    assert!(!again.is_empty());
    assert_eq!(
        get(&mut bob_open, "/v1/info").await.unwrap().0,
        StatusCode::OK
    );
    let (_, metrics) = get(&mut bob_open, "/metrics").await.unwrap();
    let revoked = metrics
        .lines()
        .find(|l| l.starts_with("skald_tls_handshake_failures_total{reason=\"revoked\"}"))
        .unwrap_or_else(|| panic!("no revocation counted:\n{metrics}"));
    assert!(
        revoked.ends_with(" 3"),
        "two open connections and one handshake: {revoked}"
    );
    let (_, audit) = get(&mut bob_open, "/v1/streams/$audit?limit=1000")
        .await
        .unwrap();
    assert!(
        audit.contains("no longer accepted") && audit.contains("\"reason\":\"revoked\""),
        "{audit}"
    );

    // A renewed server certificate that is already expired arrives with a new list that
    // revokes Bob: the certificate is refused, the list still applies.
    let served = pem_der(&live.join("server.pem"));
    write_pair(&live, "server", &pki.issue("localhost", true, -86_400, -60));
    std::fs::write(live.join(".crl.tmp"), pki.crl(&[alice_serial, bob_serial])).unwrap();
    std::fs::rename(live.join(".crl.tmp"), live.join("crl.pem")).unwrap();
    closed_within(
        &mut bob_open,
        "a certificate revoked beside an expired server certificate",
        Duration::from_secs(10),
    )
    .await;
    // A new certificate written without its key (the key comes next) arrives with a list
    // that revokes Erin: the pair is refused, the list still applies.
    let (renewed, _) = pki.issue("localhost", true, -60, 86_400);
    std::fs::write(live.join(".server.tmp"), renewed).unwrap();
    std::fs::rename(live.join(".server.tmp"), live.join("server.pem")).unwrap();
    let revoked = pki.crl(&[alice_serial, bob_serial, erin_serial]);
    std::fs::write(live.join(".crl.tmp"), revoked).unwrap();
    std::fs::rename(live.join(".crl.tmp"), live.join("crl.pem")).unwrap();
    closed_within(
        &mut erin_open,
        "a certificate revoked beside a certificate without its key",
        Duration::from_secs(10),
    )
    .await;
    let mut dave_open = open_with(&dave, &addr).await.unwrap();
    assert_eq!(
        dave_open.server_certificate, served,
        "the expired certificate, or the one without its key, went in"
    );
    assert_eq!(
        get(&mut dave_open, "/v1/info").await.unwrap().0,
        StatusCode::OK
    );

    // The client CA is replaced: connections made with certificates of the old one close.
    let other = Pki::new();
    write_pair(&live, "carol", &other.issue("carol", false, -60, 86_400));
    std::fs::write(live.join(".crl.tmp"), other.crl(&[])).unwrap();
    std::fs::write(live.join(".ca.tmp"), &other.ca_pem).unwrap();
    std::fs::rename(live.join(".crl.tmp"), live.join("crl.pem")).unwrap();
    std::fs::rename(live.join(".ca.tmp"), live.join("ca.pem")).unwrap();
    // SAFETY: a signal to the child this test started, by its id.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    closed_within(
        &mut dave_open,
        "a certificate of a CA no longer trusted",
        Duration::from_secs(10),
    )
    .await;
    // The server certificate is still signed by the first CA, which the client trusts.
    std::fs::write(
        live.join("ca.pem"),
        format!("{}{}", pki.ca_pem, other.ca_pem),
    )
    .unwrap();
    let carol = Arc::new(
        skald_security::tls::client_config(
            Some(&live.join("ca.pem")),
            Some((&live.join("carol.pem"), &live.join("carol-key.pem"))),
        )
        .unwrap(),
    );
    let mut carol_open = open_with(&carol, &addr).await.unwrap();
    let (status, body) = get(&mut carol_open, "/v1/admin/keys").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    drop(server);
}

/// What held in the issue 28 review, kept holding: TLS 1.0 and 1.1 refused; only ECDHE with
/// AES-GCM or ChaCha20; ALPN h2 and http/1.1; HSTS; client certificates of another CA, with
/// a fake intermediate, signed by a leaf, or for servers only, refused; the CLI's TLS errors
/// clear, with no fallback to plain HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_protocols_weak_ciphers_and_wrong_certificates_stay_refused() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::create_dir_all(&live).unwrap();
    let pki = Pki::new();
    std::fs::write(live.join("ca.pem"), &pki.ca_pem).unwrap();
    write_pair(&live, "server", &pki.issue("localhost", true, -60, 86_400));
    write_pair(&live, "admin", &pki.issue("ops", false, -60, 86_400));
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/server-key.pem\"\nclient_ca_file = \"{0}/ca.pem\"\n[auth]\nmtls = true\n",
            live.display()
        ),
    );
    let addr = server.url.trim_start_matches("https://").to_owned();
    let path = |name: &str| live.join(name).to_str().unwrap().to_owned();

    // openssl s_client as the client that offers what rustls clients cannot.
    let s_client = |extra: &[&str]| {
        let mut args = vec![
            "s_client".to_owned(),
            "-connect".to_owned(),
            addr.clone(),
            "-servername".to_owned(),
            "localhost".to_owned(),
            "-CAfile".to_owned(),
            path("ca.pem"),
            "-cert".to_owned(),
            path("admin.pem"),
            "-key".to_owned(),
            path("admin-key.pem"),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let out = std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    for version in ["-tls1", "-tls1_1"] {
        // Security level 0 so that openssl offers the old version at all: the refusal seen
        // is the server's alert (40, handshake failure, is what rustls sends).
        let out = s_client(&[version, "-cipher", "DEFAULT@SECLEVEL=0"]);
        assert!(
            out.contains("SSL alert number 40") && out.contains("Cipher is (NONE)"),
            "{version}: {out}"
        );
    }
    for weak in [
        "AES128-SHA:AES256-SHA256",
        "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES256-SHA",
        "DHE-RSA-AES128-GCM-SHA256",
    ] {
        let out = s_client(&["-tls1_2", "-cipher", weak]);
        assert!(
            out.contains("SSL alert number 40") && out.contains("Cipher is (NONE)"),
            "{weak}: {out}"
        );
    }
    let out = s_client(&["-tls1_2", "-alpn", "h2,http/1.1"]);
    let ecdhe = ["ECDHE-ECDSA-AES", "ECDHE-ECDSA-CHACHA20"];
    assert!(
        ecdhe
            .iter()
            .any(|c| out.contains(&format!("Cipher is {c}"))),
        "{out}"
    );
    assert!(out.contains("ALPN protocol: h2"), "{out}");
    let out = s_client(&["-tls1_3", "-alpn", "http/1.1"]);
    assert!(out.contains("ALPN protocol: http/1.1"), "{out}");

    // HSTS on every answer over TLS.
    let admin = Arc::new(
        skald_security::tls::client_config(
            Some(&live.join("ca.pem")),
            Some((&live.join("admin.pem"), &live.join("admin-key.pem"))),
        )
        .unwrap(),
    );
    let mut tls = open_with(&admin, &addr).await.unwrap();
    let response = within("GET /v1/info for HSTS", async {
        tls.sender.ready().await.unwrap();
        tls.sender
            .send_request(
                hyper::Request::get("/v1/info")
                    .header("host", "localhost")
                    .body(Empty::new())
                    .unwrap(),
            )
            .await
            .unwrap()
    })
    .await;
    let hsts = response.headers()["strict-transport-security"]
        .to_str()
        .unwrap();
    assert!(hsts.starts_with("max-age="), "{hsts}");

    // Client certificates that must not get in.
    let other = Pki::new();
    write_pair(&live, "stranger", &other.issue("ops", false, -60, 86_400));
    // An intermediate of the same name as the real CA, signed by nobody it trusts.
    let fake = Pki::new();
    let (leaf, key) = fake.issue("ops", false, -60, 86_400);
    write_pair(&live, "faked", &(format!("{leaf}{}", fake.ca_pem), key));
    // A leaf the CA issued, used as a CA for another.
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, "leaf-as-ca");
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let mut leaf_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.distinguished_name = name;
    leaf_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf_cert = leaf_params.signed_by(&leaf_key, &pki.issuer).unwrap();
    let under_leaf = rcgen::Issuer::new(leaf_params, leaf_key);
    let mut child = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    child
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ops");
    child
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "admin");
    child.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let child_key = rcgen::KeyPair::generate().unwrap();
    let child_cert = child.signed_by(&child_key, &under_leaf).unwrap();
    write_pair(
        &live,
        "under-leaf",
        &(
            format!("{}{}", child_cert.pem(), leaf_cert.pem()),
            child_key.serialize_pem(),
        ),
    );
    // A certificate for servers only.
    let mut server_only = rcgen::CertificateParams::new(vec!["ops".to_owned()]).unwrap();
    server_only
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ops");
    server_only
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "admin");
    server_only.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let server_only_key = rcgen::KeyPair::generate().unwrap();
    let server_only = server_only
        .signed_by(&server_only_key, &pki.issuer)
        .unwrap();
    write_pair(
        &live,
        "server-only",
        &(server_only.pem(), server_only_key.serialize_pem()),
    );
    for name in ["stranger", "faked", "under-leaf", "server-only"] {
        let config = Arc::new(
            skald_security::tls::client_config(
                Some(&live.join("ca.pem")),
                Some((
                    &live.join(format!("{name}.pem")),
                    &live.join(format!("{name}-key.pem")),
                )),
            )
            .unwrap(),
        );
        let got = get_with(&config, &addr, "/v1/admin/keys").await;
        assert!(got.is_err(), "{name} got in: {got:?}");
    }
    let (_, metrics) = get(&mut tls, "/metrics").await.unwrap();
    // Every CA of these tests is named "test CA": the strangers fail on the signature.
    for reason in ["bad-signature", "wrong-purpose", "invalid-certificate"] {
        assert!(
            metrics.contains(&format!(
                "skald_tls_handshake_failures_total{{reason=\"{reason}\"}}"
            )),
            "{reason}: {metrics}"
        );
    }

    // The CLI: a server its CA file does not vouch for is an error that says so, and an
    // http:// URL to the TLS port does not get an answer either.
    std::fs::write(live.join("other-ca.pem"), &other.ca_pem).unwrap();
    let (ok, _, stderr) = skald(&[
        "info",
        "--server",
        &server.url,
        "--ca-cert",
        &path("other-ca.pem"),
        "--client-cert",
        &path("admin.pem"),
        "--client-key",
        &path("admin-key.pem"),
        "--timeout",
        "5",
    ]);
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    let plain = server.url.replace("https://", "http://");
    let (ok, _, stderr) = skald(&["info", "--server", &plain, "--timeout", "5"]);
    assert!(!ok, "{stderr}");
    drop(server);
}
