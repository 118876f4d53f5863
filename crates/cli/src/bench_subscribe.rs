//! `skald bench subscribe`: append-to-delivery latency with many SSE and WebSocket
//! subscribers while events are appended at a fixed rate, the server's memory per idle
//! subscriber, and the delivery rate of one catch-up subscriber over WebSocket.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Method;
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::bench::{BenchArgs, Latency, print_latency};
use crate::client::{Connection, HttpClient, describe_problem};
use crate::tail::SseParser;

#[derive(Serialize)]
struct SubscribeReport {
    target: String,
    sse_subscribers: usize,
    ws_subscribers: usize,
    streams: usize,
    rate_target: u64,
    appended: u64,
    append_errors: u64,
    seconds: f64,
    deliveries_expected: u64,
    deliveries: u64,
    latency: Latency,
    #[serde(skip_serializing_if = "Option::is_none")]
    rss_per_idle_subscriber_bytes: Option<u64>,
    catch_up_events: u64,
    catch_up_seconds: f64,
    catch_up_events_per_sec: f64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading the memory of process {pid}"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("VmRSS not found")?;
    Ok(kb * 1024)
}

/// Reads the `"t":MICROS` the appender put in an event's data, without parsing the event.
fn sent_at(record: &str) -> Option<u64> {
    let at = record.find("\"t\":")? + 4;
    let digits: &str = &record[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// What every subscriber shares: whether the measurement runs, and the histogram.
struct Sink {
    measuring: AtomicBool,
    deliveries: AtomicU64,
    caught_up: AtomicU64,
    histogram: Mutex<Histogram<u64>>,
}

impl Sink {
    /// Records one delivery straight into the shared histogram: an O(1) record under a
    /// lock. (Merging a per-subscriber histogram after every read walked all of its buckets
    /// and took over half of the load generator's CPU.)
    fn record(&self, record: &str) {
        if let Some(t) = sent_at(record)
            && self.measuring.load(Ordering::Relaxed)
        {
            let latency = now_us().saturating_sub(t).max(1);
            let _ = self
                .histogram
                .lock()
                .expect("histogram lock")
                .record(latency);
            self.deliveries.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn run_sse_subscriber(base: String, stream: String, sink: Arc<Sink>) -> anyhow::Result<()> {
    let uri: hyper::Uri = base.parse()?;
    let tcp = tokio::net::TcpStream::connect((
        uri.host().unwrap_or("127.0.0.1"),
        uri.port_u16().unwrap_or(80),
    ))
    .await?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let request = hyper::Request::get(format!("/v1/subscribe/streams/{stream}?from=now"))
        .header("host", "localhost")
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("SSE subscribe answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut parser = SseParser::default();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        parser.push(&data);
        while let Some(frame) = parser.next_frame() {
            match (frame.event.as_deref(), frame.data) {
                (None, Some(data)) => sink.record(&data),
                (Some("caught-up"), _) => {
                    sink.caught_up.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
    }
    Ok(())
}

async fn run_ws_subscriber(base: String, stream: String, sink: Arc<Sink>) -> anyhow::Result<()> {
    let url = format!("ws://{}/v1/ws", base.trim_start_matches("http://"));
    let config = WebSocketConfig::default().read_buffer_size(16 * 1024);
    let (mut ws, _) = tokio::time::timeout(
        crate::client::DEFAULT_TIMEOUT,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), true),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the WebSocket at {url} did not open within 30 s"))??;
    let subscribe =
        json!({"type": "subscribe", "id": "s", "source": {"stream": stream}, "from": "now"});
    ws.send(Message::Text(subscribe.to_string().into())).await?;
    while let Some(message) = ws.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        if text.starts_with("{\"type\":\"events\"") {
            // Each record carries its own "t"; split the batch on records cheaply.
            for record in text.split("{\"specversion\"").skip(1) {
                sink.record(record);
            }
        } else if text.contains("\"caught-up\"") {
            sink.caught_up.fetch_add(1, Ordering::Relaxed);
        } else if text.contains("\"error\"") {
            bail!("subscription failed: {text}");
        }
    }
    Ok(())
}

/// Appends `rate` events per second, one per append, spread over `streams` streams, each
/// carrying its send time.
async fn run_appender(
    base: String,
    rate: u64,
    streams: usize,
    stop: Arc<AtomicBool>,
    appended: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    // Each connection sends its next append once the last is acknowledged (an fsync away),
    // so the rate needs enough of them: one per 100 events/s.
    let connections = rate.div_ceil(100).clamp(1, 256);
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (base, stop, appended, errors) = (
            base.clone(),
            Arc::clone(&stop),
            Arc::clone(&appended),
            Arc::clone(&errors),
        );
        tasks.push(tokio::spawn(async move {
            let mut conn = Connection::open(&base).await?;
            let interval = Duration::from_secs_f64(connections as f64 / rate as f64);
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut n = c as usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let stream = format!("bench-sub-{}", n % streams);
                n += connections as usize;
                let body = format!(
                    "{{\"events\":[{{\"type\":\"Tick\",\"data\":{{\"t\":{}}}}}]}}",
                    now_us()
                );
                let (status, _) = conn
                    .call(
                        Method::POST,
                        &format!("/v1/streams/{stream}"),
                        &[("content-type", "application/json")],
                        Bytes::from(body),
                    )
                    .await?;
                if status.is_success() {
                    appended.fetch_add(1, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// Makes sure the store holds at least `events` events (appending 1,000 per request), then
/// reads them all with one WebSocket subscription from the start.
async fn catch_up(base: &str, events: u64) -> anyhow::Result<(u64, f64)> {
    let info = HttpClient::new(base)?.info().await?;
    let mut have = info["headPosition"].as_u64().map_or(0, |p| p + 1);
    if have < events {
        eprintln!(
            "skald bench: appending {} events for the catch-up read",
            events - have
        );
        let batch: Vec<_> = (0..1000)
            .map(|_| json!({"type": "Filler", "data": {"pad": "x".repeat(200)}}))
            .collect();
        let body = Bytes::from(json!({ "events": batch }).to_string());
        let mut conn = Connection::open(base).await?;
        while have < events {
            let (status, answer) = conn
                .call(
                    Method::POST,
                    "/v1/streams/bench-filler",
                    &[("content-type", "application/json")],
                    body.clone(),
                )
                .await?;
            if !status.is_success() {
                bail!("{}", describe_problem(status, &answer));
            }
            have += 1000;
        }
    }
    let url = format!("ws://{}/v1/ws", base.trim_start_matches("http://"));
    let (mut ws, _) = tokio::time::timeout(
        crate::client::DEFAULT_TIMEOUT,
        tokio_tungstenite::connect_async(url.as_str()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the WebSocket at {url} did not open within 30 s"))??;
    let started = Instant::now();
    ws.send(Message::Text(
        json!({"type": "subscribe", "id": "c", "source": {"all": {}}})
            .to_string()
            .into(),
    ))
    .await?;
    let mut received = 0u64;
    while received < events {
        let Some(message) = ws.next().await else {
            bail!("the socket closed during the catch-up read")
        };
        let Message::Text(text) = message? else {
            continue;
        };
        // Parsed as a client would, to count honestly.
        let value: serde_json::Value = serde_json::from_str(&text)?;
        if let Some(batch) = value["events"].as_array() {
            received += batch.len() as u64;
        }
    }
    Ok((received, started.elapsed().as_secs_f64()))
}

pub async fn run(args: &BenchArgs) -> anyhow::Result<()> {
    let Some(base) = args.server.clone() else {
        bail!("bench subscribe needs --server URL (start one with `skald serve`)");
    };
    let base = base.trim_end_matches('/').to_owned();
    let streams = args.subscribe_streams.max(1);
    let sink = Arc::new(Sink {
        measuring: AtomicBool::new(false),
        deliveries: AtomicU64::new(0),
        caught_up: AtomicU64::new(0),
        histogram: Mutex::new(histogram()),
    });
    let rss_before = args.server_pid.map(rss_bytes).transpose()?;
    let total = args.sse + args.ws;
    eprintln!(
        "skald bench: connecting {} SSE and {} WebSocket subscribers",
        args.sse, args.ws
    );
    let mut subscribers = Vec::new();
    for i in 0..total {
        let stream = format!("bench-sub-{}", i % streams);
        let (base, sink) = (base.clone(), Arc::clone(&sink));
        subscribers.push(if i < args.sse {
            tokio::spawn(run_sse_subscriber(base, stream, sink))
        } else {
            tokio::spawn(run_ws_subscriber(base, stream, sink))
        });
        if i % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.caught_up.load(Ordering::Relaxed) < total as u64 {
        if let Some(failed) = subscribers.iter().position(|t| t.is_finished()) {
            let task = subscribers.swap_remove(failed);
            task.await??;
            bail!("a subscriber ended before the run");
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {total} subscribers were live after 60 s",
                sink.caught_up.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the server settle before reading its memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_per_idle = match (args.server_pid, rss_before) {
        (Some(pid), Some(before)) => {
            Some(rss_bytes(pid)?.saturating_sub(before) / total.max(1) as u64)
        }
        _ => None,
    };

    eprintln!(
        "skald bench: appending {} events/s for {} s",
        args.rate, args.duration
    );
    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    sink.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let append_to = args
        .append_server
        .as_deref()
        .map_or_else(|| base.clone(), |url| url.trim_end_matches('/').to_owned());
    let appender = tokio::spawn(run_appender(
        append_to,
        args.rate,
        streams,
        Arc::clone(&stop),
        Arc::clone(&appended),
        Arc::clone(&errors),
    ));
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    stop.store(true, Ordering::Relaxed);
    appender.await??;
    let seconds = started.elapsed().as_secs_f64();
    // Deliveries of the last appends are still on their way.
    let appended = appended.load(Ordering::Relaxed);
    let per_stream = total as u64 / streams as u64;
    let extra = (total % streams) as u64;
    let expected = appended * per_stream + appended * extra / streams as u64;
    let settle = Instant::now() + Duration::from_secs(5);
    while sink.deliveries.load(Ordering::Relaxed) < expected && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sink.measuring.store(false, Ordering::Relaxed);
    let latency = Latency::of(&sink.histogram.lock().expect("histogram lock"));
    let deliveries = sink.deliveries.load(Ordering::Relaxed);
    for task in &subscribers {
        task.abort();
    }

    eprintln!(
        "skald bench: catch-up read of {} events over WebSocket",
        args.events
    );
    let (catch_up_events, catch_up_seconds) = catch_up(&base, args.events).await?;

    let report = SubscribeReport {
        target: base,
        sse_subscribers: args.sse,
        ws_subscribers: args.ws,
        streams,
        rate_target: args.rate,
        appended,
        append_errors: errors.load(Ordering::Relaxed),
        seconds,
        deliveries_expected: expected,
        deliveries,
        latency,
        rss_per_idle_subscriber_bytes: rss_per_idle,
        catch_up_events,
        catch_up_seconds,
        catch_up_events_per_sec: catch_up_events as f64 / catch_up_seconds,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let r = &report;
    println!("{:<12} subscribe against {}", "workload", r.target);
    println!(
        "{:<12} {} SSE + {} WebSocket subscribers over {} streams ({} per stream), {} events/s appended",
        "setup", r.sse_subscribers, r.ws_subscribers, r.streams, per_stream, r.rate_target
    );
    println!(
        "{:<12} {:.1} s: {} events appended ({:.0}/s, {} errors), {} of {} deliveries",
        "ran",
        r.seconds,
        r.appended,
        r.appended as f64 / r.seconds,
        r.append_errors,
        r.deliveries,
        r.deliveries_expected
    );
    print_latency("delivery", &r.latency);
    if let Some(bytes) = r.rss_per_idle_subscriber_bytes {
        println!(
            "{:<12} {:.1} KiB of server memory per idle subscriber",
            "memory",
            bytes as f64 / 1024.0
        );
    }
    println!(
        "{:<12} {} events in {:.2} s over one WebSocket: {:.0} events/s",
        "catch-up", r.catch_up_events, r.catch_up_seconds, r.catch_up_events_per_sec
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sent_at_finds_the_appenders_timestamp() {
        assert_eq!(sent_at(r#"{"data":{"t":1234},"x":1}"#), Some(1234));
        assert_eq!(sent_at(r#"{"data":{}}"#), None);
    }
}
