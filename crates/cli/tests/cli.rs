//! The `skald` binary as a user runs it: serve, append, read, info, graceful shutdown, and
//! clear errors for bad settings.

mod support;

use std::process::Command;

use support::{SKALD, Server, skald};

#[test]
fn append_read_and_info_against_a_running_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let s = format!("--server={}", server.url);

    let (ok, out, err) = skald(&[
        "append",
        &s,
        "order-7",
        "--type",
        "Placed",
        "--data",
        r#"{"total":3}"#,
        "--tag",
        "customer:9",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains(r#""firstPosition":0"#), "{out}");
    let (ok, _, err) = skald(&[
        "append",
        &s,
        "order-7",
        "--type",
        "Paid",
        "--expected-revision",
        "5",
    ]);
    assert!(!ok);
    assert!(err.contains("expected 5, actual 0"), "{err}");

    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        body.path(),
        r#"{"expectedRevision":0,"events":[{"type":"Paid"},{"type":"Shipped"}]}"#,
    )
    .unwrap();
    let (ok, _, err) = skald(&[
        "append",
        &s,
        "order-7",
        "--body",
        body.path().to_str().unwrap(),
    ]);
    assert!(ok, "{err}");

    let (ok, out, _) = skald(&["read", &s, "order-7"]);
    assert!(ok);
    let types: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["type"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(types, ["Placed", "Paid", "Shipped"]);
    let (_, out, _) = skald(&["read", &s, "order-7", "--backward", "--limit", "1"]);
    assert!(out.contains("Shipped") && out.lines().count() == 1, "{out}");
    let (_, out, _) = skald(&["read", &s, "--tags", "customer:9"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    let (_, out, _) = skald(&["read", &s, "--category", "order", "--from", "1"]);
    assert_eq!(out.lines().count(), 2, "{out}");
    let (ok, _, err) = skald(&["read", &s, "nothing-here"]);
    assert!(!ok && err.contains("404"), "{err}");

    let (ok, out, _) = skald(&["info", &s]);
    assert!(ok);
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["headPosition"], 2);
    assert_eq!(info["durability"], "fsync");
}

#[test]
fn sigterm_finishes_cleanly_and_the_data_is_there_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let s = format!("--server={}", server.url);
    for i in 0..10 {
        let (ok, _, err) = skald(&["append", &s, "s-1", "--type", "T", "--data", &i.to_string()]);
        assert!(ok, "{err}");
    }
    let (status, stderr) = server.terminate();
    assert!(status.success(), "exit status {status:?}: {stderr}");
    assert!(stderr.contains("stopped cleanly"), "{stderr}");

    let server = Server::start(dir.path(), &[]);
    let (_, out, _) = skald(&["read", &format!("--server={}", server.url), "s-1"]);
    assert_eq!(out.lines().count(), 10);
}

#[test]
fn durability_none_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--durability", "none"]);
    let (_, stderr) = server.terminate();
    assert!(
        stderr.contains("--durability none: appends are acknowledged before"),
        "{stderr}"
    );
    assert!(stderr.contains("WARN"), "{stderr}");
}

#[test]
fn bad_settings_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("skald.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_event_byts = 5\n",
    )
    .unwrap();
    let (ok, _, err) = skald(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("skald.toml") && err.contains("max_event_byts"),
        "{err}"
    );

    let (ok, _, err) = skald(&[
        "serve",
        "--listen",
        "nowhere",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("IP:PORT"), "{err}");

    let (ok, _, err) = skald(&["serve", "--config", "/does/not/exist.toml"]);
    assert!(!ok && err.contains("cannot read config file"), "{err}");

    let (ok, _, err) = skald(&["info", "--server", "http://127.0.0.1:1"]);
    assert!(!ok && err.contains("cannot reach"), "{err}");

    // A second server on the same data directory is refused, naming the directory.
    let _first = Server::start(dir.path(), &[]);
    let (ok, _, err) = skald(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("in use by another Skald process"),
        "{err}"
    );
}

#[test]
fn settings_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(SKALD)
        .arg("serve")
        .env("SKALD_DATA_DIR", dir.path())
        .env("SKALD_LISTEN", "127.0.0.1:0")
        .env("SKALD_DURABILITY", "none")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(line.contains(dir.path().to_str().unwrap()), "{line}");
    assert!(line.contains("durability: none"), "{line}");
}

#[test]
fn bench_runs_embedded_and_reports_json() {
    let (ok, out, err) = skald(&[
        "bench",
        "append",
        "--embedded",
        "--durability",
        "none",
        "--writers",
        "4",
        "--streams",
        "10",
        "--duration",
        "0.5",
        "--wrong-expected-share",
        "0.2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(r["append"]["events"].as_u64().unwrap() > 0, "{r}");
    assert!(r["append"]["conflicts"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["append"]["errors"], 0);
    assert!(r["append"]["latency"]["p99_us"].as_u64().unwrap() > 0);

    let (ok, out, err) = skald(&[
        "bench",
        "read",
        "--embedded",
        "--durability",
        "none",
        "--events",
        "5000",
        "--json",
    ]);
    assert!(ok, "{err}");
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["read"]["events"], 5000);
}

#[test]
fn tail_follows_history_then_live_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let s = format!("--server={}", server.url);
    for (stream, ty) in [
        ("order-1", "Placed"),
        ("user-1", "Paid"),
        ("order-1", "Paid"),
    ] {
        let (ok, _, err) = skald(&["append", &s, stream, "--type", ty, "--tag", "region:eu"]);
        assert!(ok, "{err}");
    }
    // History has one order Paid event; the second arrives live or as history, depending on
    // when the tail connects (the server tests pin down the switch itself).
    let tail = Command::new(SKALD)
        .args([
            "tail",
            &s,
            "--category",
            "order",
            "--type",
            "Paid",
            "--from",
            "start",
            "--json",
            "--limit",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (ok, _, err) = skald(&["append", &s, "user-2", "--type", "Paid"]);
    assert!(ok, "{err}");
    let (ok, _, err) = skald(&["append", &s, "order-2", "--type", "Paid"]);
    assert!(ok, "{err}");
    let out = tail.wait_with_output().unwrap();
    assert!(out.status.success());
    let positions: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["position"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(positions, [2, 4]);

    // Compact lines, without colour when not on a terminal.
    let (ok, out, err) = skald(&[
        "tail", &s, "--stream", "order-1", "--from", "start", "--limit", "1",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("#0 order-1@0 Placed [region:eu] "),
        "{out:?}"
    );
    assert!(!out.contains('\x1b'), "{out:?}");

    let (ok, _, err) = skald(&["tail", &s, "--from", "yesterday"]);
    assert!(!ok);
    assert!(err.contains("not a start"), "{err}");
}
