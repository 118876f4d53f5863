//! `skald bench`: a load generator against a running server or an embedded store. Measures
//! throughput and latency; performance is checked here, never by timing assertions in tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde::Serialize;
use skald_core::{
    AppendRequest, Direction, Durability, Error, EventData, EventId, EventStore, EventType,
    ExpectedRevision, MAX_READ_PAGE, ProposedEvent, ReadRequest, ReadSource, Revision, StreamName,
};
use skald_storage::{Options, Store};

use crate::client::{Connection, HttpClient, describe_problem};
use skald_proto::v1 as pb;
use skald_proto::v1::streams_client::StreamsClient;
use tonic::transport::Channel;

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Concurrent appends.
    Append,
    /// A catch-up read of the global log.
    Read,
    /// Appends with concurrent catch-up readers.
    Mixed,
    /// fdatasync latency of the data directory's disk, for comparison with append latency.
    Fsync,
    /// Append-to-delivery latency with many SSE and WebSocket subscribers, memory per idle
    /// subscriber, and a catch-up read over WebSocket (server only).
    Subscribe,
    /// A 3-step saga against a local HTTP target service: completed sagas per second and
    /// trigger-to-final latency, for the success path and the compensation path (embedded).
    Saga,
}

/// How the bench talks to a server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// The HTTP API over HTTP/1.1 keep-alive, one connection per writer.
    Http,
    /// The gRPC API over HTTP/2, the writers' calls shared over `--connections` connections.
    Grpc,
}

/// How streams are chosen for each append.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    Uniform,
    Zipf,
}

/// Every knob of a benchmark run.
#[derive(Clone, Debug, clap::Args)]
pub struct BenchArgs {
    /// The workload.
    #[arg(value_enum)]
    pub workload: Workload,
    /// Run against a running server at this URL.
    #[arg(long, env = "SKALD_SERVER", conflicts_with = "embedded")]
    pub server: Option<String>,
    /// An API key or JWT for a server with authentication on.
    #[arg(long, env = "SKALD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The server's API to load: HTTP or gRPC (append, read and mixed workloads).
    #[arg(long, value_enum, default_value = "http")]
    pub protocol: Protocol,
    /// HTTP/2 connections the gRPC writers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Run against an embedded store in this process instead of a server.
    #[arg(long)]
    pub embedded: bool,
    /// Data directory of the embedded store (default: a temporary directory, removed after).
    #[arg(long)]
    pub data_dir: Option<std::path::PathBuf>,
    /// Durability of the embedded store.
    #[arg(long, value_enum, default_value = "fsync")]
    pub durability: DurabilityArg,
    /// Concurrent writers.
    #[arg(long, default_value_t = 64)]
    pub writers: usize,
    /// Events in each append.
    #[arg(long, default_value_t = 1)]
    pub events_per_append: usize,
    /// Bytes of data in each event.
    #[arg(long, default_value_t = 256)]
    pub event_size: usize,
    /// Number of streams appended to.
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// How each append picks its stream.
    #[arg(long, value_enum, default_value = "uniform")]
    pub distribution: Distribution,
    /// The Zipf exponent, for `--distribution zipf`.
    #[arg(long, default_value_t = 1.0)]
    pub zipf_exponent: f64,
    /// Share of appends (0 to 1) sent with a wrong expected revision; they count as conflicts.
    #[arg(long, default_value_t = 0.0)]
    pub wrong_expected_share: f64,
    /// How long the append and mixed workloads run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Events the read workload reads (written first when the store holds fewer).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Concurrent catch-up readers in the mixed workload.
    #[arg(long, default_value_t = 2)]
    pub readers: usize,
    /// Server-Sent Events subscribers (subscribe workload).
    #[arg(long, default_value_t = 1000)]
    pub sse: usize,
    /// WebSocket subscribers (subscribe workload).
    #[arg(long, default_value_t = 1000)]
    pub ws: usize,
    /// Events appended per second, one per append (subscribe workload).
    #[arg(long, default_value_t = 5000)]
    pub rate: u64,
    /// Streams the subscribers are spread over, each subscriber following one (subscribe
    /// workload); every event reaches (sse + ws) / subscribe-streams subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribe_streams: usize,
    /// Append to this server instead of --server, which the subscribers follow (subscribe
    /// workload): the latency from an append on one node to its delivery on another.
    #[arg(long)]
    pub append_server: Option<String>,
    /// Sagas started per path (saga workload).
    #[arg(long, default_value_t = 10_000)]
    pub sagas: usize,
    /// Triggers appended per second (saga workload); 0 appends as fast as the writers can,
    /// which measures throughput with the latency of a saturated engine.
    #[arg(long, default_value_t = 0)]
    pub saga_rate: u64,
    /// The server's process id, to report its memory per idle subscriber (subscribe workload).
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print the result as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `--durability` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DurabilityArg {
    Fsync,
    None,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Self {
        match d {
            DurabilityArg::Fsync => Durability::Fsync,
            DurabilityArg::None => Durability::None,
        }
    }
}

/// The system under test.
pub(crate) enum Target {
    Http(Box<HttpClient>, String),
    Grpc(Grpc),
    // The directory is held, not read: it is removed when the run ends and it drops.
    Embedded(Store, #[allow(dead_code)] Option<tempfile::TempDir>),
}

/// What one append came back with.
enum Outcome {
    Ok,
    Conflict,
}

/// Latency figures in microseconds.
#[derive(Serialize)]
pub struct Latency {
    p50_us: u64,
    p95_us: u64,
    p99_us: u64,
    p999_us: u64,
    max_us: u64,
    mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        Self {
            p50_us: h.value_at_quantile(0.50),
            p95_us: h.value_at_quantile(0.95),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }
}

#[derive(Serialize)]
struct AppendReport {
    appends: u64,
    events: u64,
    conflicts: u64,
    errors: u64,
    seconds: f64,
    events_per_sec: f64,
    appends_per_sec: f64,
    data_mb_per_sec: f64,
    latency: Latency,
}

#[derive(Serialize)]
struct ReadReport {
    events: u64,
    seconds: f64,
    events_per_sec: f64,
}

/// gRPC clients, one per connection, and the credentials to send.
#[derive(Clone)]
pub(crate) struct Grpc {
    url: String,
    clients: Vec<StreamsClient<Channel>>,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
}

impl Grpc {
    async fn connect(url: &str, connections: usize, token: Option<&str>) -> anyhow::Result<Self> {
        let mut clients = Vec::new();
        for _ in 0..connections.max(1) {
            let channel = Channel::from_shared(url.to_owned())
                .with_context(|| format!("{url} is not a server URL"))?
                .connect()
                .await
                .with_context(|| format!("connecting to {url} over HTTP/2"))?;
            clients.push(StreamsClient::new(channel).max_decoding_message_size(64 << 20));
        }
        let authorization = token
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .context("the token is not valid in a header")?;
        Ok(Self {
            url: url.to_owned(),
            clients,
            authorization,
        })
    }

    fn client(&self, writer: usize) -> StreamsClient<Channel> {
        self.clients[writer % self.clients.len()].clone()
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
    }

    async fn info(&self) -> anyhow::Result<pb::InfoResponse> {
        let request = self.request(pb::InfoRequest {});
        Ok(self.client(0).info(request).await?.into_inner())
    }
}

#[derive(Serialize)]
struct Report {
    workload: Workload,
    target: String,
    protocol: Protocol,
    durability: String,
    writers: usize,
    events_per_append: usize,
    event_size: usize,
    streams: usize,
    distribution: Distribution,
    #[serde(skip_serializing_if = "Option::is_none")]
    append: Option<AppendReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    read: Option<ReadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fsync: Option<Latency>,
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.workload == Workload::Subscribe {
        if args.embedded || args.rate == 0 {
            bail!("bench subscribe runs against a server (--server URL) with --rate of at least 1");
        }
        return crate::bench_subscribe::run(&args).await;
    }
    check_args(&args)?;
    if args.workload == Workload::Saga {
        return crate::bench_saga::run(&args).await;
    }
    if args.workload == Workload::Fsync {
        let dir = args.data_dir.clone().unwrap_or_else(|| ".".into());
        return report(
            &args,
            dir.display().to_string(),
            String::new(),
            None,
            None,
            Some(measure_fsync(&args)?),
        );
    }
    let target = open_target(&args).await?;
    let (name, durability) = describe_target(&target).await?;
    let (append, read) = match args.workload {
        Workload::Append => (Some(run_appends(&args, &target, None).await?), None),
        Workload::Read => {
            populate(&args, &target).await?;
            (None, Some(run_read(&target, args.events).await?))
        }
        Workload::Mixed => {
            let read_events = Arc::new(AtomicU64::new(0));
            let append = run_appends(&args, &target, Some(Arc::clone(&read_events))).await?;
            let events = read_events.load(Ordering::Relaxed);
            let read = ReadReport {
                events,
                seconds: append.seconds,
                events_per_sec: events as f64 / append.seconds,
            };
            (Some(append), Some(read))
        }
        Workload::Fsync | Workload::Subscribe | Workload::Saga => unreachable!("handled above"),
    };
    if let Target::Embedded(store, _) = &target {
        store.shutdown().await;
    }
    report(&args, name, durability, append, read, None)
}

fn check_args(args: &BenchArgs) -> anyhow::Result<()> {
    if args.server.is_none() && !args.embedded && args.workload != Workload::Fsync {
        bail!(
            "give --server URL to load a running server, or --embedded to bench the engine in-process"
        );
    }
    if args.writers == 0 || args.events_per_append == 0 || args.streams == 0 {
        bail!("--writers, --events-per-append and --streams must be at least 1");
    }
    if !(0.0..=1.0).contains(&args.wrong_expected_share) {
        bail!("--wrong-expected-share must be between 0 and 1");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be a positive number of seconds");
    }
    if args.zipf_exponent <= 0.0 {
        bail!("--zipf-exponent must be positive");
    }
    Ok(())
}

pub(crate) async fn open_target(args: &BenchArgs) -> anyhow::Result<Target> {
    if let Some(url) = &args.server
        && args.protocol == Protocol::Grpc
    {
        if url.starts_with("https://") {
            bail!("the gRPC bench speaks plain HTTP/2 only; bench a server without TLS");
        }
        return Ok(Target::Grpc(
            Grpc::connect(url, args.connections, args.token.as_deref()).await?,
        ));
    }
    if let Some(url) = &args.server {
        let settings = crate::client::ClientSettings {
            token: args.token.clone(),
            ..Default::default()
        };
        return Ok(Target::Http(
            Box::new(HttpClient::with_settings(url, settings)?),
            url.clone(),
        ));
    }
    let (dir, temp) = match &args.data_dir {
        Some(d) => (d.clone(), None),
        None => {
            let t = tempfile::Builder::new()
                .prefix("skald-bench-")
                .tempdir_in(".")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let options = Options {
        data_dir: dir.clone(),
        durability: args.durability.into(),
        ..Options::default()
    };
    let (store, _) = Store::open(options).with_context(|| format!("opening {}", dir.display()))?;
    Ok(Target::Embedded(store, temp))
}

async fn describe_target(target: &Target) -> anyhow::Result<(String, String)> {
    match target {
        Target::Http(client, url) => {
            let info = client.info().await?;
            Ok((
                url.clone(),
                info["durability"].as_str().unwrap_or("?").to_owned(),
            ))
        }
        Target::Grpc(grpc) => Ok((grpc.url.clone(), grpc.info().await?.durability)),
        Target::Embedded(store, _) => {
            let info = store.info().await?;
            Ok(("embedded".to_owned(), info.durability.to_string()))
        }
    }
}

/// The data of every benchmark event: a JSON object padded to `size` bytes.
fn payload(size: usize) -> String {
    let pad = size.saturating_sub(10).max(1);
    format!("{{\"pad\":\"{}\"}}", "x".repeat(pad))
}

/// Pre-built requests, so the client spends its time sending, not serializing.
struct Requests {
    http_ok: Bytes,
    http_wrong: Bytes,
    grpc_event: pb::ProposedEvent,
    event: ProposedEvent,
    events_per_append: usize,
    /// `Bearer <token>` for a server with authentication on.
    authorization: Option<String>,
}

impl Requests {
    fn new(events_per_append: usize, event_size: usize) -> anyhow::Result<Self> {
        let data = payload(event_size);
        let events =
            vec![format!("{{\"type\":\"BenchEvent\",\"data\":{data}}}"); events_per_append]
                .join(",");
        Ok(Self {
            http_ok: Bytes::from(format!("{{\"events\":[{events}]}}")),
            // No stream of a benchmark ever reaches this revision, so the append conflicts.
            grpc_event: pb::ProposedEvent {
                r#type: "BenchEvent".to_owned(),
                data: data.clone().into_bytes(),
                ..pb::ProposedEvent::default()
            },
            http_wrong: Bytes::from(format!(
                "{{\"expectedRevision\":{},\"events\":[{events}]}}",
                u64::MAX / 2
            )),
            event: ProposedEvent::new(EventType::new("BenchEvent")?, EventData::json(data)?),
            authorization: None,
            events_per_append,
        })
    }

    async fn append(
        &self,
        target: &Target,
        connection: &mut Option<Connection>,
        writer: usize,
        stream: &str,
        wrong: bool,
    ) -> anyhow::Result<Outcome> {
        match target {
            Target::Grpc(grpc) => {
                let events = (0..self.events_per_append)
                    .map(|_| pb::ProposedEvent {
                        id: EventId::generate().0.to_string(),
                        ..self.grpc_event.clone()
                    })
                    .collect();
                let expected_revision = wrong.then_some(
                    pb::append_request::ExpectedRevision::ExpectedExact(u64::MAX / 2),
                );
                let request = grpc.request(pb::AppendRequest {
                    stream: stream.to_owned(),
                    expected_revision,
                    condition: None,
                    events,
                });
                match grpc.client(writer).append(request).await {
                    Ok(_) => Ok(Outcome::Ok),
                    Err(status) if status.code() == tonic::Code::Aborted => Ok(Outcome::Conflict),
                    Err(status) => bail!("{}: {}", status.code(), status.message()),
                }
            }
            Target::Http(_, url) => {
                let body = if wrong {
                    &self.http_wrong
                } else {
                    &self.http_ok
                };
                let path = format!("/v1/streams/{stream}");
                let auth = self.authorization.as_deref().unwrap_or("");
                let all = [
                    ("content-type", "application/json"),
                    ("authorization", auth),
                ];
                let headers = if auth.is_empty() { &all[..1] } else { &all[..] };
                let connection = match connection {
                    Some(c) => c,
                    None => connection.insert(Connection::open(url).await?),
                };
                let (status, body) = connection
                    .call(Method::POST, &path, headers, body.clone())
                    .await?;
                match status {
                    StatusCode::CREATED | StatusCode::OK => Ok(Outcome::Ok),
                    StatusCode::CONFLICT => Ok(Outcome::Conflict),
                    _ => bail!("{}", describe_problem(status, &body)),
                }
            }
            Target::Embedded(store, _) => {
                let events = (0..self.events_per_append)
                    .map(|_| ProposedEvent {
                        id: EventId::generate(),
                        ..self.event.clone()
                    })
                    .collect();
                let expected = if wrong {
                    ExpectedRevision::Exact(Revision(u64::MAX / 2))
                } else {
                    ExpectedRevision::Any
                };
                let request = AppendRequest {
                    stream: StreamName::new(stream)?,
                    expected,
                    condition: None,
                    events,
                };
                match store.append(request).await {
                    Ok(_) => Ok(Outcome::Ok),
                    Err(Error::WrongExpectedRevision { .. }) => Ok(Outcome::Conflict),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }
}

/// Picks streams uniformly or by a Zipf law over their index.
struct StreamPicker {
    cdf: Option<Vec<f64>>,
    streams: usize,
}

impl StreamPicker {
    fn new(args: &BenchArgs) -> Self {
        let cdf = (args.distribution == Distribution::Zipf).then(|| {
            let mut acc = 0.0;
            let mut cdf: Vec<f64> = (1..=args.streams)
                .map(|k| {
                    acc += 1.0 / (k as f64).powf(args.zipf_exponent);
                    acc
                })
                .collect();
            cdf.iter_mut().for_each(|c| *c /= acc);
            cdf
        });
        Self {
            cdf,
            streams: args.streams,
        }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> usize {
        match &self.cdf {
            None => rng.usize(..self.streams),
            Some(cdf) => {
                let u = rng.f64();
                cdf.partition_point(|c| *c < u).min(self.streams - 1)
            }
        }
    }
}

struct Progress {
    bar: indicatif::ProgressBar,
}

impl Progress {
    fn new(len: u64, unit: &'static str) -> Self {
        let bar = indicatif::ProgressBar::new(len);
        bar.set_style(
            indicatif::ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:40}}] {{msg}} {unit}"
            ))
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Self { bar }
    }
}

async fn run_appends(
    args: &BenchArgs,
    target: &Target,
    read_counter: Option<Arc<AtomicU64>>,
) -> anyhow::Result<AppendReport> {
    let mut requests = Requests::new(args.events_per_append, args.event_size)?;
    requests.authorization = args.token.as_ref().map(|t| format!("Bearer {t}"));
    let requests = Arc::new(requests);
    let picker = Arc::new(StreamPicker::new(args));
    let stop = Arc::new(AtomicBool::new(false));
    let done_events = Arc::new(AtomicU64::new(0));
    let duration = Duration::from_secs_f64(args.duration);
    let target = Arc::new(match target {
        Target::Http(c, u) => Target::Http(c.clone(), u.clone()),
        Target::Grpc(g) => Target::Grpc(g.clone()),
        Target::Embedded(s, _) => Target::Embedded(s.clone(), None),
    });
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.writers {
        let (requests, picker, stop, done_events, target) = (
            Arc::clone(&requests),
            Arc::clone(&picker),
            Arc::clone(&stop),
            Arc::clone(&done_events),
            Arc::clone(&target),
        );
        let share = args.wrong_expected_share;
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w as u64 + 1);
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            let (mut appends, mut conflicts, mut errors, mut first_error) =
                (0u64, 0u64, 0u64, None);
            // Each writer has its own connection; after an error it reconnects.
            let mut connection = None;
            while !stop.load(Ordering::Relaxed) {
                let stream = format!("bench-{}", picker.pick(&mut rng));
                let wrong = share > 0.0 && rng.f64() < share;
                let t = Instant::now();
                let outcome = requests
                    .append(&target, &mut connection, w, &stream, wrong)
                    .await;
                if outcome.is_err() {
                    connection = None;
                }
                histogram.saturating_record(t.elapsed().as_micros().max(1) as u64);
                match outcome {
                    Ok(Outcome::Ok) => {
                        appends += 1;
                        done_events.fetch_add(requests.events_per_append as u64, Ordering::Relaxed);
                    }
                    Ok(Outcome::Conflict) => conflicts += 1,
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e.to_string());
                    }
                }
            }
            (histogram, appends, conflicts, errors, first_error)
        }));
    }
    let mut readers = Vec::new();
    if let Some(counter) = &read_counter {
        for _ in 0..args.readers {
            let (target, stop, counter) =
                (Arc::clone(&target), Arc::clone(&stop), Arc::clone(counter));
            readers.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    catch_up(&target, u64::MAX, Some(&counter), &stop).await?;
                }
                anyhow::Ok(())
            }));
        }
    }
    let progress = Progress::new(duration.as_millis() as u64, "events/s");
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let secs = start.elapsed().as_secs_f64();
        progress
            .bar
            .set_position(start.elapsed().as_millis() as u64);
        progress.bar.set_message(format!(
            "{:.0}",
            done_events.load(Ordering::Relaxed) as f64 / secs
        ));
    }
    stop.store(true, Ordering::Relaxed);
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let (mut appends, mut conflicts, mut errors, mut first_error) = (0, 0, 0, None);
    for task in tasks {
        let (h, a, c, e, f) = task.await?;
        histogram.add(&h).expect("same bounds");
        appends += a;
        conflicts += c;
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    for r in readers {
        r.await??;
    }
    progress.bar.finish_and_clear();
    if let Some(e) = first_error {
        eprintln!("skald bench: {errors} appends failed; the first error: {e}");
    }
    let events = appends * args.events_per_append as u64;
    Ok(AppendReport {
        appends,
        events,
        conflicts,
        errors,
        seconds,
        events_per_sec: events as f64 / seconds,
        appends_per_sec: appends as f64 / seconds,
        data_mb_per_sec: (events * args.event_size as u64) as f64 / seconds / 1e6,
        latency: Latency::of(&histogram),
    })
}

/// Reads the global log from the start, up to `max` events; returns how many were read.
async fn catch_up(
    target: &Target,
    max: u64,
    counter: Option<&AtomicU64>,
    stop: &AtomicBool,
) -> anyhow::Result<u64> {
    let mut read = 0u64;
    match target {
        Target::Embedded(store, _) => {
            let mut from = 0;
            while read < max && !stop.load(Ordering::Relaxed) {
                let limit = (max - read).min(MAX_READ_PAGE as u64) as usize;
                let page = store
                    .read(ReadRequest {
                        source: ReadSource::All(None),
                        from: Some(from),
                        direction: Direction::Forward,
                        limit,
                    })
                    .await?;
                let n = page.events.len() as u64;
                read += n;
                if let Some(c) = counter {
                    c.fetch_add(n, Ordering::Relaxed);
                }
                match page.next {
                    Some(next) => from = next,
                    None => break,
                }
            }
        }
        Target::Grpc(grpc) => {
            let request = grpc.request(pb::ReadRequest {
                source: Some(pb::Source {
                    kind: Some(pb::source::Kind::All(pb::AllFilter::default())),
                }),
                from: Some(0),
                direction: pb::Direction::Forward as i32,
                limit: if max == u64::MAX { 0 } else { max },
            });
            let mut pages = grpc.client(0).read(request).await?.into_inner();
            while let Some(page) = pages.message().await? {
                let n = page.events.len() as u64;
                read += n;
                if let Some(c) = counter {
                    c.fetch_add(n, Ordering::Relaxed);
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
        Target::Http(client, _) => {
            let uri = if max == u64::MAX {
                "/v1/all".to_owned()
            } else {
                format!("/v1/all?limit={max}")
            };
            let (status, mut body) = client.get_ndjson(&uri).await?;
            if !status.is_success() {
                bail!("catch-up read failed with {status}");
            }
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    let n = data.iter().filter(|b| **b == b'\n').count() as u64;
                    read += n;
                    if let Some(c) = counter {
                        c.fetch_add(n, Ordering::Relaxed);
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    Ok(read)
}

/// Makes sure the store holds at least `--events` events, appending 1,000 at a time.
async fn populate(args: &BenchArgs, target: &Target) -> anyhow::Result<()> {
    let head = match target {
        Target::Embedded(store, _) => store.head(),
        Target::Grpc(grpc) => grpc.info().await?.head_position.map_or(0, |p| p + 1),
        Target::Http(client, _) => {
            let (_, body) = client
                .call(Method::GET, "/v1/info", &[], Bytes::new())
                .await?;
            let info: serde_json::Value = serde_json::from_slice(&body)?;
            info["headPosition"].as_u64().map_or(0, |p| p + 1)
        }
    };
    if head >= args.events {
        return Ok(());
    }
    let missing = args.events - head;
    eprintln!("skald bench: writing {missing} events first");
    let batch = 1000usize;
    let requests = Arc::new(Requests::new(batch, args.event_size)?);
    let appends = missing.div_ceil(batch as u64);
    let next = Arc::new(AtomicU64::new(0));
    let target = Arc::new(match target {
        Target::Http(c, u) => Target::Http(c.clone(), u.clone()),
        Target::Grpc(g) => Target::Grpc(g.clone()),
        Target::Embedded(s, _) => Target::Embedded(s.clone(), None),
    });
    let progress = Progress::new(appends, "appends of 1000 events");
    let mut tasks = Vec::new();
    for task in 0..8 {
        let (requests, next, target, bar) = (
            Arc::clone(&requests),
            Arc::clone(&next),
            Arc::clone(&target),
            progress.bar.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut connection = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= appends {
                    return anyhow::Ok(());
                }
                requests
                    .append(
                        &target,
                        &mut connection,
                        task,
                        &format!("fill-{}", i % 1000),
                        false,
                    )
                    .await?;
                bar.inc(1);
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    progress.bar.finish_and_clear();
    Ok(())
}

async fn run_read(target: &Target, events: u64) -> anyhow::Result<ReadReport> {
    let start = Instant::now();
    let read = catch_up(target, events, None, &AtomicBool::new(false)).await?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(ReadReport {
        events: read,
        seconds,
        events_per_sec: read as f64 / seconds,
    })
}

/// Times 4 KiB writes each followed by fdatasync in the data directory, for 3 seconds.
fn measure_fsync(args: &BenchArgs) -> anyhow::Result<Latency> {
    use std::os::unix::fs::FileExt;
    let dir = args.data_dir.clone().unwrap_or_else(|| ".".into());
    let file = tempfile::tempfile_in(&dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let block = vec![7u8; 4096];
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    let start = Instant::now();
    let mut offset = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        file.write_all_at(&block, offset)?;
        file.sync_data()?;
        histogram.saturating_record(t.elapsed().as_micros().max(1) as u64);
        offset += 4096;
    }
    Ok(Latency::of(&histogram))
}

fn report(
    args: &BenchArgs,
    target: String,
    durability: String,
    append: Option<AppendReport>,
    read: Option<ReadReport>,
    fsync: Option<Latency>,
) -> anyhow::Result<()> {
    let report = Report {
        workload: args.workload,
        target,
        protocol: args.protocol,
        durability,
        writers: args.writers,
        events_per_append: args.events_per_append,
        event_size: args.event_size,
        streams: args.streams,
        distribution: args.distribution,
        append,
        read,
        fsync,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

pub fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

pub fn print_latency(label: &str, l: &Latency) {
    println!(
        "{label:<12} p50 {}  p95 {}  p99 {}  p99.9 {}  max {}",
        ms(l.p50_us),
        ms(l.p95_us),
        ms(l.p99_us),
        ms(l.p999_us),
        ms(l.max_us)
    );
}

fn print_table(r: &Report) {
    if let Some(f) = &r.fsync {
        println!(
            "{:<12} 4 KiB write + fdatasync, repeated for 3 s, in {}",
            "workload", r.target
        );
        print_latency("fdatasync", f);
        return;
    }
    let over = match (r.target.as_str(), r.protocol) {
        ("embedded", _) => "",
        (_, Protocol::Http) => " over HTTP/1.1",
        (_, Protocol::Grpc) => " over gRPC",
    };
    println!(
        "{:<12} {:?} against {}{over} (durability {})",
        "workload", r.workload, r.target, r.durability
    );
    if let Some(a) = &r.append {
        println!(
            "{:<12} {} writers, {} event(s) of {} B per append, {} streams ({:?})",
            "setup", r.writers, r.events_per_append, r.event_size, r.streams, r.distribution
        );
        println!(
            "{:<12} {:.1} s: {} appends, {} events, {} conflicts, {} errors",
            "ran", a.seconds, a.appends, a.events, a.conflicts, a.errors
        );
        println!(
            "{:<12} {:.0} events/s, {:.0} appends/s, {:.1} MB/s of data",
            "throughput", a.events_per_sec, a.appends_per_sec, a.data_mb_per_sec
        );
        print_latency("latency", &a.latency);
    }
    if let Some(rd) = &r.read {
        println!(
            "{:<12} {} events in {:.2} s: {:.0} events/s",
            "read", rd.events, rd.seconds, rd.events_per_sec
        );
    }
    if let Some(f) = &r.fsync {
        print_latency("fdatasync", f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_prefers_low_streams_and_stays_in_range() {
        let args = BenchArgs {
            workload: Workload::Append,
            server: None,
            token: None,
            embedded: true,
            protocol: Protocol::Http,
            connections: 4,
            data_dir: None,
            durability: DurabilityArg::None,
            writers: 1,
            events_per_append: 1,
            event_size: 10,
            streams: 100,
            distribution: Distribution::Zipf,
            zipf_exponent: 1.0,
            wrong_expected_share: 0.0,
            duration: 1.0,
            events: 1,
            readers: 0,
            sse: 0,
            ws: 0,
            rate: 1,
            subscribe_streams: 1,
            append_server: None,
            sagas: 1,
            saga_rate: 0,
            server_pid: None,
            json: false,
        };
        let picker = StreamPicker::new(&args);
        let mut rng = fastrand::Rng::with_seed(1);
        let mut counts = [0u32; 100];
        for _ in 0..100_000 {
            counts[picker.pick(&mut rng)] += 1;
        }
        // Zipf with s = 1 over 100 items: the first takes about 19%, the last about 0.2%.
        assert!(counts[0] > 15_000 && counts[0] < 23_000, "{}", counts[0]);
        assert!(counts[0] > counts[9] * 5);
        assert!(counts[99] > 0);
    }

    #[test]
    fn payload_is_json_of_the_requested_size() {
        let p = payload(256);
        assert_eq!(p.len(), 256);
        serde_json::from_str::<serde_json::Value>(&p).unwrap();
    }
}
