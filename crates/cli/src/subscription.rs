//! `skald subscription create | list | info | replay-parked | delete`: persistent subscription
//! groups on a running server, through `/v1/groups`.

use anyhow::{Context, bail};
use bytes::Bytes;
use hyper::Method;
use serde_json::{Value, json};

use crate::client::{HttpClient, encode, expect_success};

#[derive(clap::Subcommand)]
pub enum SubscriptionCommand {
    /// Create a group: a source, a start, and settings.
    Create(Box<CreateArgs>),
    /// List the groups with their consumers, lag and parked messages.
    List {
        /// Print the server's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one group: its definition and its state, as JSON.
    Info {
        /// The group.
        name: String,
    },
    /// Deliver a group's parked messages again.
    ReplayParked {
        /// The group.
        name: String,
    },
    /// Delete a group; its consumers are disconnected.
    Delete {
        /// The group.
        name: String,
    },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The group's name (A-Z, a-z, 0-9, '_', '.', '-').
    pub name: String,
    /// Read one stream.
    #[arg(long)]
    pub stream: Option<String>,
    /// Read a category.
    #[arg(long)]
    pub category: Option<String>,
    /// Read the global log, only events of this type (repeat for several).
    #[arg(long = "type")]
    pub types: Vec<String>,
    /// Read the global log, only events with this tag (repeat; all must match).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Where to start: start, now, a position, or revision:N for a stream [default: start]
    #[arg(long)]
    pub from: Option<String>,
    /// round-robin, or pinned (each stream to one consumer, in order).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Redeliver a message not acknowledged within this many milliseconds.
    #[arg(long)]
    pub message_timeout_ms: Option<u64>,
    /// Park a message after this many deliveries.
    #[arg(long)]
    pub max_deliveries: Option<u32>,
    /// The wait before the first redelivery, doubled per delivery.
    #[arg(long)]
    pub retry_delay_ms: Option<u64>,
    /// The longest wait before a redelivery.
    #[arg(long)]
    pub max_retry_delay_ms: Option<u64>,
    /// About the most messages held between the checkpoint and the reader.
    #[arg(long)]
    pub buffer_size: Option<usize>,
    /// About the most bytes of events held between the checkpoint and the reader (also the
    /// most one batch holds).
    #[arg(long)]
    pub buffer_bytes: Option<usize>,
    /// How often a moved checkpoint is written.
    #[arg(long)]
    pub checkpoint_after_ms: Option<u64>,
}

pub async fn run(client: &HttpClient, command: SubscriptionCommand) -> anyhow::Result<()> {
    match command {
        SubscriptionCommand::Create(args) => create(client, *args).await,
        SubscriptionCommand::List { json } => list(client, json).await,
        SubscriptionCommand::Info { name } => {
            let info = call(client, Method::GET, &group_path(&name, ""), None).await?;
            println!("{}", serde_json::to_string_pretty(&info)?);
            Ok(())
        }
        SubscriptionCommand::ReplayParked { name } => {
            let answer = call(
                client,
                Method::POST,
                &group_path(&name, "/replay-parked"),
                None,
            )
            .await?;
            println!(
                "replaying {} parked messages of {name}",
                answer["replaying"].as_u64().unwrap_or(0)
            );
            Ok(())
        }
        SubscriptionCommand::Delete { name } => {
            call(client, Method::DELETE, &group_path(&name, ""), None).await?;
            println!("deleted {name}");
            Ok(())
        }
    }
}

fn group_path(name: &str, rest: &str) -> String {
    format!("/v1/groups/{}{rest}", encode(name))
}

/// Sends a JSON request and returns the JSON answer; a problem becomes the error.
pub(crate) async fn call(
    client: &HttpClient,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (headers, body): (&[(&str, &str)], Bytes) = match body {
        Some(body) => (
            &[("content-type", "application/json")],
            Bytes::from(body.to_string()),
        ),
        None => (&[], Bytes::new()),
    };
    let (status, response) = client.call(method, path, headers, body).await?;
    expect_success(status, &response)?;
    if response.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&response).context("the server's answer is not JSON")
}

/// The `from` of a definition: `start`, `now`, a position, or `revision:N`.
fn from_value(from: &str) -> anyhow::Result<Value> {
    if let Ok(position) = from.parse::<u64>() {
        return Ok(json!(position));
    }
    if let Some(revision) = from.strip_prefix("revision:") {
        let revision: u64 = revision
            .parse()
            .with_context(|| format!("--from {from}: the revision is not a whole number"))?;
        return Ok(json!({ "revision": revision }));
    }
    match from {
        "start" | "now" => Ok(json!(from)),
        _ => bail!("--from {from:?}: use start, now, a position, or revision:N"),
    }
}

async fn create(client: &HttpClient, args: CreateArgs) -> anyhow::Result<()> {
    let filtered = !args.types.is_empty() || !args.tags.is_empty();
    let source = match (&args.stream, &args.category, filtered) {
        (Some(stream), None, false) => json!({ "stream": stream }),
        (None, Some(category), false) => json!({ "category": category }),
        (None, None, _) => json!({ "all": { "types": args.types, "tags": args.tags } }),
        _ => bail!("give one source: --stream, --category, or --type/--tag for the global log"),
    };
    let mut body = json!({ "name": args.name, "source": source });
    if let Some(from) = &args.from {
        body["from"] = from_value(from)?;
    }
    let settings = [
        ("strategy", args.strategy.map(Value::from)),
        ("messageTimeoutMs", args.message_timeout_ms.map(Value::from)),
        ("maxDeliveries", args.max_deliveries.map(Value::from)),
        ("retryDelayMs", args.retry_delay_ms.map(Value::from)),
        ("maxRetryDelayMs", args.max_retry_delay_ms.map(Value::from)),
        ("bufferSize", args.buffer_size.map(Value::from)),
        ("bufferBytes", args.buffer_bytes.map(Value::from)),
        (
            "checkpointAfterMs",
            args.checkpoint_after_ms.map(Value::from),
        ),
    ];
    for (key, value) in settings {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    let created = call(client, Method::POST, "/v1/groups", Some(body)).await?;
    println!("{}", serde_json::to_string_pretty(&created)?);
    Ok(())
}

fn describe_source(source: &Value) -> String {
    if let Some(stream) = source["stream"].as_str() {
        return format!("stream {stream}");
    }
    if let Some(category) = source["category"].as_str() {
        return format!("category {category}");
    }
    if source.get("query").is_some() {
        return "query".to_owned();
    }
    let all = &source["all"];
    let mut filters = Vec::new();
    for key in ["types", "tags"] {
        if let Some(values) = all[key].as_array().filter(|v| !v.is_empty()) {
            let names: Vec<&str> = values.iter().filter_map(Value::as_str).collect();
            filters.push(format!("{key}={}", names.join(",")));
        }
    }
    if filters.is_empty() {
        "all".to_owned()
    } else {
        format!("all {}", filters.join(" "))
    }
}

async fn list(client: &HttpClient, as_json: bool) -> anyhow::Result<()> {
    let answer = call(client, Method::GET, "/v1/groups", None).await?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let groups = answer["groups"].as_array().cloned().unwrap_or_default();
    if groups.is_empty() {
        println!("no groups; create one with `skald subscription create`");
        return Ok(());
    }
    println!(
        "{:<24} {:<28} {:>9} {:>9} {:>10} {:>8}",
        "NAME", "SOURCE", "CONSUMERS", "IN-FLIGHT", "LAG", "PARKED"
    );
    for g in groups {
        let stats = &g["stats"];
        println!(
            "{:<24} {:<28} {:>9} {:>9} {:>10} {:>8}",
            g["name"].as_str().unwrap_or(""),
            describe_source(&g["source"]),
            stats["consumers"].as_array().map_or(0, Vec::len),
            stats["inFlight"],
            stats["lag"],
            stats["parked"],
        );
    }
    Ok(())
}
