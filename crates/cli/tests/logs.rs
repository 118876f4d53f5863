//! The server's logs as an operator's log pipeline sees them: JSON lines on a pipe, each
//! request's lines carrying its request id, and a clear error for a bad log setting.

mod support;

use std::io::{Read, Write};
use std::process::Command;

use serde_json::Value;
use support::{SKALD, Server};

fn get(url: &str, path: &str, request_id: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nX-Request-Id: {request_id}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn logs_on_a_pipe_are_json_lines_that_carry_the_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_env(dir.path(), &[], &[("SKALD_LOG", "debug")]);
    let response = get(&server.url, "/v1/info", "trace-me-42");
    assert!(response.contains("x-request-id: trace-me-42"), "{response}");
    let missing = get(&server.url, "/v1/streams/nothing-here", "trace-me-43");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let (status, stderr) = server.terminate();
    assert!(status.success(), "{stderr}");

    let lines: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(
        lines
            .iter()
            .all(|l| l["timestamp"].is_string() && l["level"].is_string())
    );
    for (id, status) in [("trace-me-42", 200), ("trace-me-43", 404)] {
        let line = lines
            .iter()
            .find(|l| l["fields"]["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for request {id}: {stderr}"));
        assert_eq!(line["fields"]["status"], status, "{line}");
        assert!(line["fields"]["route"].is_string(), "{line}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "stopped cleanly"),
        "{stderr}"
    );
}

#[test]
fn a_bad_log_setting_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (key, value, needle) in [
        ("SKALD_LOG", "loud", "is not a log filter"),
        ("SKALD_LOG_FORMAT", "xml", "use json or text"),
    ] {
        let out = Command::new(SKALD)
            .env(key, value)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value} was accepted");
        assert!(stderr.contains(needle), "{key}={value}: {stderr}");
    }
}
