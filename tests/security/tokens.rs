//! JWTs: a valid token and every way a token can be wrong, with keys from an issuer's
//! discovery document and JWKS served by the test (rotated mid-test).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{Api, assert_refused, serve_with_config};

struct SigningKey {
    pkcs8: Vec<u8>,
    jwk: Value,
}

fn key(kid: &str) -> SigningKey {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let point = pair.public_key().as_ref();
    SigningKey {
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk: json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }),
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(key: &SigningKey, kid: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&key.pkcs8)).unwrap()
}

/// An issuer on loopback: the discovery document and the JWKS, counting JWKS fetches.
async fn issuer(jwks: Arc<Mutex<Value>>, fetches: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let discovery = json!({"issuer": base, "jwks_uri": format!("{base}/jwks")}).to_string();
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let jwks = Arc::clone(&jwks);
            let fetches = Arc::clone(&fetches);
            let discovery = discovery.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let body = if request.starts_with("GET /jwks") {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    jwks.lock().unwrap().to_string()
                } else {
                    discovery
                };
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    base
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_and_every_wrong_one_says_why() {
    let a = key("a");
    let b = key("b");
    let jwks = Arc::new(Mutex::new(json!({"keys": [a.jwk]})));
    let fetches = Arc::new(AtomicUsize::new(0));
    let iss = issuer(Arc::clone(&jwks), Arc::clone(&fetches)).await;
    let dir = tempfile::tempdir().unwrap();
    let jwt = format!(
        "[auth.jwt]\nissuer = \"{iss}\"\naudience = \"skald\"\nalgorithms = [\"ES256\"]\nroles_claim = \"realm_access.roles\"\nleeway_s = 5\n"
    );
    // The test issuer speaks plain HTTP: refused unless the config names it as insecure.
    let config = dir.path().join("plain.toml");
    std::fs::write(&config, &jwt).unwrap();
    let data = dir.path().join("plain-data");
    let (ok, _, err) = crate::support::skald(&[
        "serve",
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("over plain HTTP"), "{err}");
    let server = serve_with_config(
        dir.path(),
        &format!("{jwt}insecure_http_issuer = \"{iss}\"\n"),
    );
    let api = Api::new(&server.url);
    let good = || {
        json!({"iss": iss, "aud": "skald", "sub": "alice", "exp": now() + 300, "nbf": now() - 10,
               "realm_access": {"roles": ["admin"]}})
    };
    let info = |token: String| {
        let api = api.clone();
        async move {
            api.call(Method::GET, "/v1/admin/keys", Some(&token), "")
                .await
        }
    };

    assert_eq!(info(sign(&a, "a", &good())).await.status, StatusCode::OK);
    let mut no_roles = good();
    no_roles["realm_access"] = json!({"roles": []});
    assert_eq!(
        info(sign(&a, "a", &no_roles)).await.status,
        StatusCode::FORBIDDEN
    );

    let mut expired = good();
    expired["exp"] = json!(now() - 60);
    assert_refused(&info(sign(&a, "a", &expired)).await, "expired");
    let mut early = good();
    early["nbf"] = json!(now() + 300);
    assert_refused(&info(sign(&a, "a", &early)).await, "not-yet-valid");
    let mut audience = good();
    audience["aud"] = json!("someone-else");
    assert_refused(&info(sign(&a, "a", &audience)).await, "audience");
    let mut issuer_claim = good();
    issuer_claim["iss"] = json!("https://evil.example");
    assert_refused(&info(sign(&a, "a", &issuer_claim)).await, "issuer");
    let mut no_exp = good();
    no_exp.as_object_mut().unwrap().remove("exp");
    assert_refused(&info(sign(&a, "a", &no_exp)).await, "claims");
    // Signed by another key that claims to be `a`.
    assert_refused(&info(sign(&b, "a", &good())).await, "signature");
    // `alg: none`, and HMAC with the public key as a secret: never accepted.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"a","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(good().to_string())
    );
    let refused = info(none).await;
    assert_refused(&refused, "algorithm");
    assert!(
        refused.json()["detail"]
            .as_str()
            .unwrap()
            .contains("\"none\"")
    );
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("a".into());
    let hmac = jsonwebtoken::encode(&hs, &good(), &EncodingKey::from_secret(b"public")).unwrap();
    assert_refused(&info(hmac).await, "algorithm");
    assert_refused(&info("not-a-jwt".to_owned()).await, "malformed");

    // The issuer rotates to a new key: the first token with its kid fetches the JWKS again.
    let before = fetches.load(Ordering::SeqCst);
    jwks.lock().unwrap()["keys"]
        .as_array_mut()
        .unwrap()
        .push(b.jwk.clone());
    assert_eq!(info(sign(&b, "b", &good())).await.status, StatusCode::OK);
    assert_eq!(fetches.load(Ordering::SeqCst), before + 1);
    // Made-up kids do not hammer the issuer: at most one refresh per 30 s.
    for i in 0..5 {
        assert_refused(
            &info(sign(&b, &format!("zz{i}"), &good())).await,
            "unknown-key",
        );
    }
    assert_eq!(fetches.load(Ordering::SeqCst), before + 1);
    // A stream lasts as long as its token: one that expires (with the 5 s of leeway) in
    // 2 s ends at its first delivery after that, saying why.
    let mut short = good();
    short["exp"] = json!(now() - 3);
    let short = sign(&a, "a", &short);
    let streaming = {
        let api = api.clone();
        tokio::spawn(async move {
            api.stream_until(
                "/v1/subscribe/all?from=now",
                Some(&short),
                "event: error",
                Duration::from_secs(20),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let appended = api
        .call(
            Method::POST,
            "/v1/streams/late-1",
            Some(&sign(&a, "a", &good())),
            r#"{"events":[{"type":"Late","data":{}}]}"#,
        )
        .await;
    assert_eq!(appended.status, StatusCode::CREATED);
    let (status, text) = streaming.await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(
        text.contains("event: error") && text.contains("expired"),
        "{text}"
    );
    assert!(!text.contains("\"Late\""), "delivered after expiry: {text}");

    // The logs say why tokens failed, and never hold a token.
    let token = sign(&a, "a", &good());
    let signature = token.rsplit('.').next().unwrap().to_owned();
    assert_eq!(info(token).await.status, StatusCode::OK);
    let (status, stderr) = server.terminate();
    assert!(status.success());
    assert!(stderr.contains("the token has expired"), "{stderr}");
    assert!(!stderr.contains(&signature));
}

/// What held in the review of issue 25, kept holding: an HMAC (`oct`) key in the JWKS, a
/// token without `kid`, and a `jku` header pointing at the attacker's keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hmac_keys_missing_kids_and_jku_headers_get_nowhere() {
    let a = key("a");
    let evil = key("a");
    let secret = b"a shared secret of thirty-two by";
    let jwks = Arc::new(Mutex::new(json!({"keys": [
        a.jwk,
        {"kty": "oct", "kid": "h", "alg": "HS256", "k": URL_SAFE_NO_PAD.encode(secret)}
    ]})));
    let iss = issuer(jwks, Arc::new(AtomicUsize::new(0))).await;
    // The attacker's own JWKS, which must never be fetched.
    let evil_fetches = Arc::new(AtomicUsize::new(0));
    let evil_iss = issuer(
        Arc::new(Mutex::new(json!({"keys": [evil.jwk]}))),
        Arc::clone(&evil_fetches),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[auth.jwt]\nissuer = \"{iss}\"\naudience = \"skald\"\nalgorithms = [\"ES256\"]\ninsecure_http_issuer = \"{iss}\"\n"
        ),
    );
    let api = Api::new(&server.url);
    let claims = json!({"iss": iss, "aud": "skald", "sub": "mallory", "exp": now() + 300,
                        "roles": ["admin"]});
    let info = |token: String| {
        let api = api.clone();
        async move {
            api.call(Method::GET, "/v1/admin/keys", Some(&token), "")
                .await
        }
    };
    assert_eq!(info(sign(&a, "a", &claims)).await.status, StatusCode::OK);
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("h".into());
    let hmac = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(secret)).unwrap();
    assert_refused(&info(hmac).await, "algorithm");
    let mut no_kid = Header::new(Algorithm::ES256);
    no_kid.kid = None;
    let token =
        jsonwebtoken::encode(&no_kid, &claims, &EncodingKey::from_ec_der(&evil.pkcs8)).unwrap();
    assert_eq!(info(token).await.status, StatusCode::UNAUTHORIZED);
    let mut jku = Header::new(Algorithm::ES256);
    jku.kid = Some("a".into());
    jku.jku = Some(format!("{evil_iss}/jwks"));
    let token =
        jsonwebtoken::encode(&jku, &claims, &EncodingKey::from_ec_der(&evil.pkcs8)).unwrap();
    assert_refused(&info(token).await, "signature");
    assert_eq!(
        evil_fetches.load(Ordering::SeqCst),
        0,
        "the jku was fetched"
    );
}

/// Replaces a file by a rename, as deployment tools do (never half-written).
fn replace(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwks_file_is_read_again_and_keys_are_taken_one_by_one() {
    let (r1, r2, r3) = (key("r1"), key("r2"), key("r3"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    // Beside r1: a key for encryption, keys this server cannot use (ES512, secp256k1,
    // X25519): skipped one by one, they do not keep the server from starting.
    let mut enc = r2.jwk.clone();
    enc["use"] = json!("enc");
    let unusable = [
        json!({"kty": "EC", "crv": "P-521", "kid": "e512", "alg": "ES512",
               "x": "AekpBQ8ST8a8VcfVOTNl353vSrDCLL", "y": "ADSmRA43Z1DSNx_RvcLI87cdL07l6j"}),
        json!({"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": "AA", "y": "AA"}),
        json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": "AA"}),
    ];
    let mut keys = vec![r1.jwk.clone(), enc];
    keys.extend(unusable);
    replace(&file, &json!({ "keys": keys }).to_string());
    let iss = "https://issuer.example";
    let server = serve_with_config(
        dir.path(),
        &format!(
            "[auth.jwt]\nissuer = \"{iss}\"\naudience = \"skald\"\nalgorithms = [\"ES256\"]\njwks_file = \"{}\"\n",
            file.display()
        ),
    );
    let api = Api::new(&server.url);
    let claims =
        json!({"iss": iss, "aud": "skald", "sub": "ops", "exp": now() + 600, "roles": ["admin"]});
    let call = |token: String| {
        let api = api.clone();
        async move {
            api.call(Method::GET, "/v1/admin/keys", Some(&token), "")
                .await
        }
    };
    assert_eq!(call(sign(&r1, "r1", &claims)).await.status, StatusCode::OK);
    // A key marked for encryption verifies no signature.
    assert_refused(&call(sign(&r2, "r2", &claims)).await, "unknown-key");
    // A header that names critical extensions this server does not know is refused.
    // jsonwebtoken's Header has no `crit`, so this token is put together and signed here.
    let header = json!({"alg": "ES256", "typ": "JWT", "kid": "r1", "crit": ["exp-ext"]});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &r1.pkcs8, &rng).unwrap();
    let signature = pair.sign(&rng, input.as_bytes()).unwrap();
    let crit = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref()));
    assert_refused(&call(crit).await, "unsupported");

    // A stream opened with a token r1 signed.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let sse = hyper::Request::get(format!(
        "{}/v1/subscribe/categories/order?from=now",
        server.url
    ))
    .header(
        "authorization",
        format!("Bearer {}", sign(&r1, "r1", &claims)),
    )
    .body(http_body_util::Full::default())
    .unwrap();
    let sse = client.request(sse).await.unwrap();
    assert_eq!(sse.status(), StatusCode::OK);
    let mut sse_body = sse.into_body();
    let mut sse_text = String::new();
    assert!(sse_until(&mut sse_body, &mut sse_text, "retry:").await);

    // r1 leaked: the file is rewritten without it and with r3. The watcher sees the change
    // on its own, without a signal and without a restart.
    replace(&file, &json!({"keys": [r3.jwk]}).to_string());
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while call(sign(&r3, "r3", &claims)).await.status != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "the rewritten JWKS file was not read within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_refused(&call(sign(&r1, "r1", &claims)).await, "unknown-key");
    // The stream opened with r1's token ends at its next delivery, without delivering it.
    let appended = api
        .call(
            Method::POST,
            "/v1/streams/order-1",
            Some(&sign(&r3, "r3", &claims)),
            &json!({"events": [{"type": "Happened", "data": {"marker": "after-removal"}}]})
                .to_string(),
        )
        .await;
    assert_eq!(appended.status, StatusCode::CREATED, "{:?}", appended.body);
    let ended = sse_until(&mut sse_body, &mut sse_text, "event: error").await;
    assert!(ended, "the SSE stream ended without a reason: {sse_text}");
    assert!(sse_text.contains("no longer in the JWKS"), "{sse_text}");
    assert!(!sse_text.contains("after-removal"), "{sse_text}");

    // A broken file keeps the keys in use; SIGHUP reads a good one at once.
    replace(&file, "{\"keys\": [");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(call(sign(&r3, "r3", &claims)).await.status, StatusCode::OK);
    replace(&file, &json!({"keys": [r1.jwk]}).to_string());
    // SAFETY: a signal to the child this test started, by its id.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGHUP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while call(sign(&r1, "r1", &claims)).await.status != StatusCode::OK {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGHUP did not reload the JWKS file"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_refused(&call(sign(&r3, "r3", &claims)).await, "unknown-key");
    let (status, stderr) = server.terminate();
    assert!(status.success());
    assert!(stderr.contains("a JWKS key is skipped"), "{stderr}");
    assert!(stderr.contains("JWKS reload failed"), "{stderr}");
}

/// Reads an SSE body until `needle` shows up; false when the body ends first.
async fn sse_until(body: &mut hyper::body::Incoming, text: &mut String, needle: &str) -> bool {
    use http_body_util::BodyExt;
    loop {
        if text.contains(needle) {
            return true;
        }
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the SSE stream moves within 10 s");
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    text.push_str(&String::from_utf8_lossy(&data));
                }
            }
            _ => return false,
        }
    }
}
