//! `skald tail`: follow a subscription live in the terminal, over Server-Sent Events.

use std::io::{IsTerminal, Write};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;

use crate::client::{HttpClient, describe_problem, encode};

#[derive(clap::Args)]
pub struct TailArgs {
    /// Follow one stream.
    #[arg(long, conflicts_with = "category")]
    stream: Option<String>,
    /// Follow one category (the stream-name prefix before the first '-').
    #[arg(long)]
    category: Option<String>,
    /// Only events of this type (repeat for several).
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events carrying this tag (repeat: an event must carry all of them).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Where to start: now, start, a position, or revision:N for a stream.
    #[arg(long, default_value = "now")]
    from: String,
    /// Print each event as one line of JSON (a CloudEvent) instead of a compact line.
    #[arg(long)]
    json: bool,
    /// Stop after this many events.
    #[arg(long)]
    limit: Option<u64>,
    /// Also show Skald's own system streams (names starting with '$': group definitions,
    /// checkpoints, parked messages), which the global log carries.
    #[arg(long)]
    system: bool,
}

/// Parses Server-Sent Events from a byte stream, frame by frame.
#[derive(Default)]
pub struct SseParser {
    buffer: Vec<u8>,
}

/// One SSE frame (the fields Skald sends).
#[derive(Debug, Default)]
pub struct SseFrame {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: Option<String>,
}

impl SseParser {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived. Comments (heartbeats) and `retry` lines give
    /// frames with no data.
    pub fn next_frame(&mut self) -> Option<SseFrame> {
        let end = self.buffer.windows(2).position(|w| w == b"\n\n")?;
        let block: Vec<u8> = self.buffer.drain(..end + 2).collect();
        let mut frame = SseFrame::default();
        for line in String::from_utf8_lossy(&block).lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                frame.id = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("event: ") {
                frame.event = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("data: ") {
                frame.data = Some(v.to_owned());
            }
        }
        Some(frame)
    }
}

/// The SSE path for these arguments, and whether types and tags must be filtered here (the
/// stream and category endpoints take no filters).
fn path_of(args: &TailArgs) -> (String, bool) {
    let from = format!("from={}", encode(&args.from));
    if let Some(stream) = &args.stream {
        return (
            format!("/v1/subscribe/streams/{}?{from}", encode(stream)),
            true,
        );
    }
    if let Some(category) = &args.category {
        return (
            format!("/v1/subscribe/categories/{}?{from}", encode(category)),
            true,
        );
    }
    let mut path = format!("/v1/subscribe/all?{from}");
    if !args.types.is_empty() {
        path.push_str(&format!("&types={}", encode(&args.types.join(","))));
    }
    if !args.tags.is_empty() {
        path.push_str(&format!("&tags={}", encode(&args.tags.join(","))));
    }
    (path, false)
}

fn selected(args: &TailArgs, event: &Value) -> bool {
    let type_ok = args.types.is_empty() || args.types.iter().any(|t| event["type"] == *t);
    let tags = event["tags"].as_array();
    let tags_ok = args
        .tags
        .iter()
        .all(|t| tags.is_some_and(|have| have.iter().any(|h| h == t)));
    type_ok && tags_ok
}

struct Style {
    color: bool,
}

impl Style {
    fn paint(&self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }
}

/// One compact line: position, stream@revision, type, tags, and the start of the data.
fn compact(event: &Value, style: &Style) -> String {
    let mut data = match (&event["data"], &event["data_base64"]) {
        (Value::Null, Value::String(b)) => format!("<{} base64 chars>", b.len()),
        (data, _) => data.to_string(),
    };
    if data.len() > 120 {
        let mut cut = 117;
        while !data.is_char_boundary(cut) {
            cut -= 1;
        }
        data.truncate(cut);
        data.push_str("...");
    }
    let tags: Vec<&str> = event["tags"]
        .as_array()
        .map(|t| t.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let tags = if tags.is_empty() {
        String::new()
    } else {
        format!(" {}", style.paint("35", &format!("[{}]", tags.join(" "))))
    };
    format!(
        "{} {}{} {}{} {}",
        style.paint("2", &format!("#{}", event["position"])),
        style.paint("36", event["stream"].as_str().unwrap_or("?")),
        style.paint("2", &format!("@{}", event["revision"])),
        style.paint("1;33", event["type"].as_str().unwrap_or("?")),
        tags,
        data
    )
}

pub async fn run(client: &HttpClient, args: TailArgs) -> anyhow::Result<()> {
    let (path, filter_here) = path_of(&args);
    let (status, mut body) = client
        .send(
            Method::GET,
            &path,
            &[("accept", "text/event-stream")],
            Bytes::new(),
        )
        .await?;
    if !status.is_success() {
        let bytes = client.collect(body).await?;
        bail!("{}", describe_problem(status, &bytes));
    }
    let stdout = std::io::stdout();
    let style = Style {
        color: !args.json && stdout.is_terminal() && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut parser = SseParser::default();
    let mut printed = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("the server closed the subscription")?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        parser.push(&data);
        let mut out = stdout.lock();
        while let Some(frame) = parser.next_frame() {
            let Some(data) = frame.data else { continue };
            match frame.event.as_deref() {
                None => {
                    let event: Value = serde_json::from_str(&data).with_context(|| {
                        format!("the server sent an event that is not JSON: {data}")
                    })?;
                    if filter_here && !selected(&args, &event) {
                        continue;
                    }
                    let system = event["stream"].as_str().is_some_and(|s| s.starts_with('$'));
                    if system && !args.system {
                        continue;
                    }
                    if args.json {
                        writeln!(out, "{data}")?;
                    } else {
                        writeln!(out, "{}", compact(&event, &style))?;
                    }
                    printed += 1;
                    if args.limit.is_some_and(|limit| printed >= limit) {
                        return Ok(());
                    }
                }
                Some("caught-up") if !args.json => {
                    let line = style.paint("2", "-- live --");
                    writeln!(out, "{line}")?;
                }
                Some("error") => bail!("the subscription failed: {data}"),
                Some(_) => {}
            }
        }
        out.flush()?;
    }
    bail!("the server ended the subscription (is it shutting down?)")
}
