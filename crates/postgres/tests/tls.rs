//! TLS to PostgreSQL: with `sslmode=verify-full` and the CA in `sslrootcert`, a node connects
//! over TLS (the server refuses TCP without it, and reports the session encrypted) and works
//! as a store; a CA that did not sign the server's certificate, or a host name the
//! certificate does not name, is refused with a reason; `verify-ca` and unknown modes are
//! refused before connecting.

mod support;

use skald_core::*;
use skald_postgres::{PgOptions, PgStore, PgUrl, connect};
use support::Cluster;

/// A CA, and a certificate for `localhost` it signed: (CA PEM, certificate PEM, key PEM).
fn pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "skald test CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca_pem, server.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_connects_over_tls_and_a_wrong_ca_or_host_is_refused() {
    let (ca, cert, key) = pki();
    let (cluster, port) = Cluster::start_with_tls(&cert, &key);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).unwrap();
    let (other_ca, _, _) = pki();
    let other_ca_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca_file, &other_ca).unwrap();
    cluster.database("tls").await;

    let url = |host: &str, ca: &std::path::Path| {
        format!(
            "postgres://postgres:s3cret@{host}:{port}/tls?sslmode=verify-full&sslrootcert={}",
            ca.display()
        )
    };
    let good = PgUrl::parse(&url("localhost", &ca_file)).unwrap();
    assert!(good.uses_tls());
    assert_eq!(
        good.to_string(),
        format!("postgres://postgres@localhost:{port}/tls?sslmode=verify-full")
    );
    let store = PgStore::open(PgOptions::new(good.clone())).await.unwrap();
    let result = store
        .append(AppendRequest {
            stream: StreamName::new("order-1").unwrap(),
            expected: ExpectedRevision::NoStream,
            condition: None,
            events: vec![ProposedEvent::new(
                EventType::new("Placed").unwrap(),
                EventData::json("{}").unwrap(),
            )],
        })
        .await
        .unwrap();
    assert_eq!(result.first_position, Position(0));
    let client = connect(&good).await.unwrap();
    let encrypted: bool = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(encrypted, "the session is not encrypted");
    store.shutdown().await;

    // Without TLS the server refuses TCP: the test's pg_hba.conf does check.
    let plain = PgUrl::parse(&format!("postgres://postgres@localhost:{port}/tls")).unwrap();
    assert!(!plain.uses_tls());
    assert!(matches!(connect(&plain).await, Err(Error::Unavailable(_))));

    // A CA that did not sign the certificate; a name the certificate does not hold.
    for (bad, why) in [
        (url("localhost", &other_ca_file), "another CA"),
        (
            url("127.0.0.1", &ca_file),
            "a host name not in the certificate",
        ),
    ] {
        let bad = PgUrl::parse(&bad).unwrap();
        match connect(&bad).await {
            Err(Error::Unavailable(reason)) => {
                assert!(
                    reason.to_lowercase().contains("certificate"),
                    "{why}: {reason}"
                );
                assert!(!reason.contains("s3cret"), "{reason}");
            }
            other => panic!("{why}: expected a refusal, got {:?}", other.map(|_| ())),
        }
    }

    // Refused before connecting: a mode Skald does not offer, a CA file that is not one.
    for (bad, expected) in [
        (
            format!("postgres://postgres@localhost:{port}/tls?sslmode=verify-ca"),
            "verify-ca",
        ),
        (
            format!("postgres://postgres@localhost:{port}/tls?sslmode=sometimes"),
            "sslmode=sometimes",
        ),
        (
            format!(
                "postgres://postgres@localhost:{port}/tls?sslmode=verify-full&sslrootcert={}",
                dir.path().join("missing.pem").display()
            ),
            "missing.pem",
        ),
    ] {
        match PgUrl::parse(&bad) {
            Err(Error::InvalidConfig(reason)) => assert!(reason.contains(expected), "{reason}"),
            other => panic!("{bad}: expected InvalidConfig, got {other:?}"),
        }
    }
}
