//! `skald append`, `skald read` and `skald info`: thin clients of a running server.

use std::io::Write;

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::Method;
use serde_json::{Value, json};

use crate::client::{HttpClient, encode, expect_success};

/// What `skald append` sends.
#[derive(clap::Args)]
pub struct AppendArgs {
    /// The stream to append to.
    pub stream: String,
    /// The event type (one event; use --body for several).
    #[arg(long = "type")]
    pub event_type: Option<String>,
    /// The event data, as JSON.
    #[arg(long)]
    pub data: Option<String>,
    /// A tag; repeat for several.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// The metadata, as a JSON object.
    #[arg(long)]
    pub metadata: Option<String>,
    /// The event id (a UUID; generated when left out).
    #[arg(long)]
    pub id: Option<String>,
    /// any, noStream, streamExists or a revision number.
    #[arg(long)]
    pub expected_revision: Option<String>,
    /// A file holding a whole append body (`-` for stdin), as in POST /v1/streams/{stream}.
    #[arg(long = "body")]
    pub body_file: Option<String>,
}

fn parse_json_arg(name: &str, text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).with_context(|| format!("--{name} is not valid JSON: {text:?}"))
}

pub async fn append(client: &HttpClient, args: AppendArgs) -> anyhow::Result<()> {
    let body = match (&args.body_file, &args.event_type) {
        (Some(path), None) => {
            let text = if path == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading the body from stdin")?
            } else {
                std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?
            };
            parse_json_arg("body", &text)?
        }
        (None, Some(event_type)) => {
            let mut event = json!({"type": event_type, "tags": args.tags});
            if let Some(data) = &args.data {
                event["data"] = parse_json_arg("data", data)?;
            }
            if let Some(metadata) = &args.metadata {
                event["metadata"] = parse_json_arg("metadata", metadata)?;
            }
            if let Some(id) = &args.id {
                event["id"] = json!(id);
            }
            let mut body = json!({"events": [event]});
            if let Some(expected) = &args.expected_revision {
                body["expectedRevision"] = match expected.parse::<u64>() {
                    Ok(n) => json!(n),
                    Err(_) => json!(expected),
                };
            }
            body
        }
        (Some(_), Some(_)) => {
            bail!("give either --type (one event) or --body (a whole append body), not both")
        }
        (None, None) => {
            bail!("give --type TYPE for one event, or --body FILE for a whole append body")
        }
    };
    let (status, response) = client
        .call(
            Method::POST,
            &format!("/v1/streams/{}", encode(&args.stream)),
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        )
        .await?;
    expect_success(status, &response)?;
    println!("{}", String::from_utf8_lossy(&response));
    Ok(())
}

/// What `skald read` reads.
#[derive(clap::Args)]
pub struct ReadArgs {
    /// The stream to read; leave out to read the global log.
    pub stream: Option<String>,
    /// Read a category instead.
    #[arg(long)]
    pub category: Option<String>,
    /// First revision (stream) or position (otherwise).
    #[arg(long)]
    pub from: Option<u64>,
    /// Most events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Newest first (streams only).
    #[arg(long)]
    pub backward: bool,
    /// Only these event types (comma-separated; global log only).
    #[arg(long)]
    pub types: Option<String>,
    /// Only events with all these tags (comma-separated; global log only).
    #[arg(long)]
    pub tags: Option<String>,
}

pub async fn read(client: &HttpClient, args: ReadArgs) -> anyhow::Result<()> {
    let mut params = Vec::new();
    let path = match (&args.stream, &args.category) {
        (Some(_), Some(_)) => bail!("give a stream or --category, not both"),
        (Some(stream), None) => {
            if args.backward {
                params.push("direction=backward".to_owned());
            }
            format!("/v1/streams/{}", encode(stream))
        }
        (None, Some(category)) => format!("/v1/categories/{}", encode(category)),
        (None, None) => {
            if let Some(t) = &args.types {
                params.push(format!("types={}", encode(t).replace("%2C", ",")));
            }
            if let Some(t) = &args.tags {
                params.push(format!("tags={}", encode(t).replace("%2C", ",")));
            }
            "/v1/all".to_owned()
        }
    };
    if args.backward && args.stream.is_none() {
        bail!("--backward works only for a stream");
    }
    if (args.types.is_some() || args.tags.is_some())
        && (args.stream.is_some() || args.category.is_some())
    {
        bail!("--types and --tags filter the global log; leave out the stream and --category");
    }
    if let Some(from) = args.from {
        params.push(format!("from={from}"));
    }
    if let Some(limit) = args.limit {
        params.push(format!("limit={limit}"));
    }
    let uri = if params.is_empty() {
        path
    } else {
        format!("{path}?{}", params.join("&"))
    };
    let (status, mut body) = client.get_ndjson(&uri).await?;
    if !status.is_success() {
        let bytes = client.collect(body).await?;
        return expect_success(status, &bytes);
    }
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    while let Some(frame) = client.next_frame(&mut body).await? {
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if let Err(e) = out.write_all(&data) {
            // A closed pipe (`skald read | head`) is a normal way to stop reading.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
    }
    out.flush()?;
    Ok(())
}

pub async fn info(client: &HttpClient) -> anyhow::Result<()> {
    let value = client.info().await?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}
