//! The Rust client of Skald, over the gRPC API (`docs/grpc.md`, `docs/client.md`).
//!
//! [`Client`] is a remote [`EventStore`]: code written against the trait (an aggregate
//! repository, a test suite) runs the same against the embedded store and against a server.
//! Beyond the trait it streams whole reads and catch-up-then-live subscriptions as
//! [`futures_util::Stream`]s, resuming them after a dropped connection.
//!
//! Calls are retried with exponential back-off when the server could not be reached (for
//! about 9 s by default, which covers a restart), and only when repeating them is safe: reads,
//! heads, info, and appends, which are idempotent because every [`ProposedEvent`] carries its
//! id (a retry of an append that was stored comes back with `replayed` set). Any other error
//! is returned at once, as the embedded store would return it ([`skald_core::Error`]).
//! Subscriptions resubscribe after the last event they delivered, without end by default
//! ([`ClientOptions::resubscribe`]), and at once when the server ended them for reading too
//! slowly.

pub mod aggregate;
mod convert;
mod decision;
pub mod event;
mod follow;
mod groups;
pub mod lease;
pub mod process;
pub mod projection;
mod sagas;

use std::future::Future;
use std::time::Duration;

use futures_util::Stream;
use skald_core::{
    AppendRequest, AppendResult, Direction, Durability, Error, EventStore, Limits, MAX_READ_PAGE,
    Position, ReadPage, ReadRequest, ReadSource, RecordedEvent, Result, Revision, StoreInfo,
    StreamHead, StreamName,
};
use skald_proto::v1 as pb;
use skald_proto::v1::streams_client::StreamsClient;
use skald_proto::v1::subscriptions_client::SubscriptionsClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub use groups::{AckOutcome, Consumer, GroupMessage};
pub use skald_core;
/// The generated gRPC messages: group settings and state, saga definitions and instances.
pub use skald_proto::v1 as proto;

/// Messages this client accepts; the server sends events in messages of about 64 KiB, so this
/// only matters for single events near the event-size limit.
const MAX_MESSAGE: usize = 64 << 20;

/// When and how often something that could not reach the server is tried again.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Tries in all, the first included; 1 turns retries off, `u32::MAX` means without end.
    pub attempts: u32,
    /// The wait before the second try; doubled for each further one.
    pub first_delay: Duration,
    /// The longest wait between tries.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 10 tries, 50 ms apart at first and at most 2 s: about 9 s in all, long enough for a
    /// server to restart.
    fn default() -> Self {
        Self {
            attempts: 10,
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    /// Tries without end, 50 ms apart at first and at most 5 s: what subscriptions and the
    /// runners of projections and process managers do by default.
    pub fn forever() -> Self {
        Self {
            attempts: u32::MAX,
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
        }
    }

    /// The wait after try number `attempt` failed.
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.first_delay.saturating_mul(factor).min(self.max_delay)
    }

    /// After try number `attempt` failed with `error`: waits and counts the next try when
    /// another is worth it (the server was not reached, tries are left), or hands the error
    /// back.
    pub(crate) async fn again(&self, attempt: &mut u32, error: Error) -> Result<()> {
        if !matches!(error, Error::Unavailable(_)) {
            return Err(error);
        }
        match self.next_wait(attempt) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(error),
        }
    }

    /// After try number `attempt` failed: the wait before the next one, counting it, or `None`
    /// when the tries are spent.
    pub(crate) fn next_wait(&self, attempt: &mut u32) -> Option<Duration> {
        if *attempt >= self.attempts.max(1) {
            return None;
        }
        let wait = self.delay(*attempt);
        *attempt = attempt.saturating_add(1);
        Some(wait)
    }
}

/// How to reach a server. Every field has a default: plain HTTP/2, no credentials.
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    /// An API key or a JWT, sent as `authorization: Bearer ...`.
    pub token: Option<String>,
    /// The CA that signed the server's certificate (PEM), for `https://` URLs; without it the
    /// system's roots are not consulted, so give it for a private CA.
    pub ca_certificate_pem: Option<Vec<u8>>,
    /// A client certificate and its key (PEM), for servers that require mTLS.
    pub client_identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the server's certificate against, when it is not the URL's host.
    pub tls_domain: Option<String>,
    /// Retries of calls that could not reach the server.
    pub retry: RetryPolicy,
    /// How a subscription that lost the server tries to subscribe again; without end when
    /// not given ([`RetryPolicy::forever`]).
    pub resubscribe: Option<RetryPolicy>,
    /// How long connecting may take; 10 s when not given.
    pub connect_timeout: Option<Duration>,
    /// How long one try of a call that answers once (an append, a head, a group or saga
    /// call) may take before it fails as unreachable (and is retried, when that is safe); no
    /// limit when not given. Reads and subscriptions, which stream, are not cut short.
    pub timeout: Option<Duration>,
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// The first event there is.
    Beginning,
    /// The next event appended after subscribing.
    Now,
    /// The first matching event at or after this global position.
    Position(u64),
    /// A stream subscription's event at this revision and what follows.
    Revision(u64),
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The next matching event.
    Event(RecordedEvent),
    /// Every matching event before `position` has been delivered; what follows is live.
    CaughtUp {
        /// The subscription's cursor.
        position: u64,
    },
}

/// A connection to a Skald server. Cheap to clone: clones share the HTTP/2 connection.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    authorization: Option<MetadataValue<Ascii>>,
    retry: RetryPolicy,
    resubscribe: RetryPolicy,
    timeout: Option<Duration>,
    limits: Limits,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("authenticated", &self.authorization.is_some())
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to `url` (`http://host:port`, or `https://` with TLS) with default options.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, ClientOptions::default()).await
    }

    /// Connects to `url` with `options`. A URL or TLS setting that cannot be used is an
    /// [`Error::InvalidConfig`]; a server that cannot be reached is [`Error::Unavailable`].
    pub async fn connect_with(url: &str, options: ClientOptions) -> Result<Self> {
        let invalid = Error::InvalidConfig;
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(invalid(format!(
                "{url:?} is not a server URL: it must start with http:// or https://"
            )));
        }
        if url.starts_with("http://")
            && (options.ca_certificate_pem.is_some() || options.client_identity_pem.is_some())
        {
            return Err(invalid(format!(
                "{url} is plain HTTP, but TLS certificates were given: use https://"
            )));
        }
        let mut endpoint = Channel::from_shared(url.to_owned())
            .map_err(|e| invalid(format!("{url:?} is not a server URL: {e}")))?
            .connect_timeout(options.connect_timeout.unwrap_or(Duration::from_secs(10)))
            .tcp_nodelay(true);
        if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            if let Some(ca) = &options.ca_certificate_pem {
                tls = tls.ca_certificate(Certificate::from_pem(ca));
            }
            if let Some((cert, key)) = &options.client_identity_pem {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &options.tls_domain {
                tls = tls.domain_name(domain.clone());
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| invalid(format!("the TLS settings for {url} are not usable: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("could not connect to {url}: {e}")))?;
        let authorization = options
            .token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    Error::InvalidConfig(
                        "the token has characters a header cannot carry".to_owned(),
                    )
                })
            })
            .transpose()?;
        Ok(Self {
            channel,
            authorization,
            retry: options.retry,
            resubscribe: options.resubscribe.unwrap_or_else(RetryPolicy::forever),
            timeout: options.timeout,
            limits: Limits::default(),
        })
    }

    /// A request for a call that answers once: with the deadline of [`ClientOptions::timeout`].
    pub(crate) fn unary<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = self.request(message);
        if let Some(timeout) = self.timeout {
            request.set_timeout(timeout);
        }
        request
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

    fn streams(&self) -> StreamsClient<Channel> {
        StreamsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    fn subscriptions(&self) -> SubscriptionsClient<Channel> {
        SubscriptionsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Runs `call` until it succeeds, fails with an error that is not about reaching the
    /// server, or has been tried as often as the retry policy says.
    async fn retried<T, F, Fut>(&self, mut call: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = std::result::Result<T, tonic::Status>>,
    {
        let mut attempt = 1;
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(status) => {
                    self.retry
                        .again(&mut attempt, convert::error(status))
                        .await?;
                }
            }
        }
    }

    /// Every event of a read, as a stream that reads page by page (memory stays bounded) and
    /// picks up where it was after a dropped connection. `request.limit` 0 means no limit. A
    /// stream with no events yields [`Error::StreamNotFound`], as the server answers (the
    /// [`EventStore::read`] of this client gives an empty page, as every store does).
    pub fn read_events(
        &self,
        request: ReadRequest,
    ) -> impl Stream<Item = Result<RecordedEvent>> + Send + 'static {
        let client = self.clone();
        let is_stream = matches!(request.source, ReadSource::Stream(_));
        let state = ReadState {
            client,
            request,
            pages: None,
            buffered: std::collections::VecDeque::new(),
            sent: 0,
            attempt: 1,
            done: false,
        };
        futures_util::stream::unfold(state, move |mut s| async move {
            loop {
                if let Some(event) = s.buffered.pop_front() {
                    return Some((Ok(event), s));
                }
                if s.done || (s.request.limit > 0 && s.sent >= s.request.limit) {
                    return None;
                }
                let next = match &mut s.pages {
                    None => {
                        let limit = if s.request.limit == 0 {
                            0
                        } else {
                            (s.request.limit - s.sent) as u64
                        };
                        let message = pb::ReadRequest {
                            source: Some(convert::source(&s.request.source)),
                            from: s.request.from,
                            direction: convert::direction(s.request.direction),
                            limit,
                        };
                        let request = s.client.request(message);
                        match s.client.streams().read(request).await {
                            Ok(response) => {
                                s.pages = Some(response.into_inner());
                                continue;
                            }
                            Err(status) => Err(status),
                        }
                    }
                    Some(pages) => pages.message().await,
                };
                match next {
                    Ok(Some(page)) => {
                        s.attempt = 1;
                        for event in page.events {
                            match convert::recorded(event) {
                                Ok(event) => {
                                    // Where to pick up again, should the connection drop.
                                    s.request.from = Some(match (is_stream, s.request.direction) {
                                        (true, Direction::Forward) => event.revision.0 + 1,
                                        (true, Direction::Backward) => {
                                            match event.revision.0.checked_sub(1) {
                                                Some(r) => r,
                                                None => {
                                                    s.done = true;
                                                    0
                                                }
                                            }
                                        }
                                        (false, _) => event.position.0 + 1,
                                    });
                                    s.sent += 1;
                                    s.buffered.push_back(event);
                                }
                                Err(e) => {
                                    s.done = true;
                                    return Some((Err(e), s));
                                }
                            }
                        }
                    }
                    Ok(None) => s.done = true,
                    Err(status) => {
                        s.pages = None;
                        let error = convert::error(status);
                        if let Err(error) = s.client.retry.again(&mut s.attempt, error).await {
                            s.done = true;
                            return Some((Err(error), s));
                        }
                    }
                }
            }
        })
    }

    /// A catch-up-then-live subscription: history from `start`, a
    /// [`Delivery::CaughtUp`], then each matching event as it is appended. After a dropped
    /// connection it resubscribes after the last event it delivered, so nothing is missed or
    /// delivered twice: at once when the server ended it for reading too slowly, and with the
    /// [`ClientOptions::resubscribe`] policy (without end by default) when the server could
    /// not be reached. It ends with an error when that policy gives up, or when the server
    /// refuses it. [`Start::Now`] is the position the server reports when the subscription
    /// is first opened, so a drop before [`Delivery::CaughtUp`] does not skip what was
    /// appended in between.
    pub fn subscribe(
        &self,
        source: ReadSource,
        start: Start,
    ) -> impl Stream<Item = Result<Delivery>> + Send + 'static {
        let state = SubscribeState {
            client: self.clone(),
            source,
            start,
            messages: None,
            buffered: std::collections::VecDeque::new(),
            attempt: 1,
            done: false,
        };
        futures_util::stream::unfold(state, |mut s| async move {
            loop {
                if let Some(delivery) = s.buffered.pop_front() {
                    return Some((Ok(delivery), s));
                }
                if s.done {
                    return None;
                }
                let next = match &mut s.messages {
                    None => {
                        use pb::subscribe_request::Start as P;
                        if s.start == Start::Now {
                            match s.client.next_position().await {
                                Ok(next) => s.start = Start::Position(next),
                                Err(error) => {
                                    match s.client.resubscribe.again(&mut s.attempt, error).await {
                                        Ok(()) => continue,
                                        Err(error) => {
                                            s.done = true;
                                            return Some((Err(error), s));
                                        }
                                    }
                                }
                            }
                        }
                        let start = match s.start {
                            Start::Beginning => P::At(pb::StartAt::Beginning as i32),
                            Start::Now => P::At(pb::StartAt::Now as i32),
                            Start::Position(p) => P::Position(p),
                            Start::Revision(r) => P::Revision(r),
                        };
                        let message = pb::SubscribeRequest {
                            source: Some(convert::source(&s.source)),
                            start: Some(start),
                        };
                        let request = s.client.request(message);
                        match s.client.subscriptions().subscribe(request).await {
                            Ok(response) => {
                                s.messages = Some(response.into_inner());
                                continue;
                            }
                            Err(status) => Err(status),
                        }
                    }
                    Some(messages) => messages.message().await,
                };
                match next {
                    Ok(Some(message)) => {
                        s.attempt = 1;
                        match message.kind {
                            Some(pb::subscribe_response::Kind::Events(batch)) => {
                                for event in batch.events {
                                    match convert::recorded(event) {
                                        Ok(event) => {
                                            s.start = Start::Position(event.position.0 + 1);
                                            s.buffered.push_back(Delivery::Event(event));
                                        }
                                        Err(e) => {
                                            s.done = true;
                                            return Some((Err(e), s));
                                        }
                                    }
                                }
                            }
                            Some(pb::subscribe_response::Kind::CaughtUp(c)) => {
                                if matches!(s.start, Start::Beginning) {
                                    s.start = Start::Position(c.position);
                                }
                                s.buffered.push_back(Delivery::CaughtUp {
                                    position: c.position,
                                });
                            }
                            None => {}
                        }
                    }
                    Ok(None) => {
                        s.done = true;
                        return Some((
                            Err(Error::Unavailable(
                                "the server ended the subscription".to_owned(),
                            )),
                            s,
                        ));
                    }
                    Err(status) if convert::is_stall(&status) => {
                        // It read too slowly: subscribe again after what it has, at once.
                        s.messages = None;
                    }
                    Err(status) => {
                        s.messages = None;
                        let error = convert::error(status);
                        if let Err(error) = s.client.resubscribe.again(&mut s.attempt, error).await
                        {
                            s.done = true;
                            return Some((Err(error), s));
                        }
                    }
                }
            }
        })
    }
}

struct ReadState {
    client: Client,
    request: ReadRequest,
    pages: Option<tonic::Streaming<pb::ReadResponse>>,
    buffered: std::collections::VecDeque<RecordedEvent>,
    sent: usize,
    attempt: u32,
    done: bool,
}

struct SubscribeState {
    client: Client,
    source: ReadSource,
    start: Start,
    messages: Option<tonic::Streaming<pb::SubscribeResponse>>,
    buffered: std::collections::VecDeque<Delivery>,
    attempt: u32,
    done: bool,
}

impl EventStore for Client {
    async fn append(&self, request: AppendRequest) -> Result<AppendResult> {
        let message = convert::append_request(&request);
        let response = self
            .retried(|| {
                let mut streams = self.streams();
                let request = self.unary(message.clone());
                async move { streams.append(request).await }
            })
            .await?;
        Ok(convert::append_result(response.into_inner()))
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadPage> {
        use futures_util::StreamExt;
        let limit = request.limit.clamp(1, MAX_READ_PAGE);
        // One event more than asked for says whether there is more, and where it starts.
        let read: Result<Vec<RecordedEvent>> = self
            .read_events(ReadRequest {
                limit: limit + 1,
                ..request.clone()
            })
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect();
        let mut events = match read {
            Ok(events) => events,
            // The server answers NOT_FOUND for a stream with no events; every store's read
            // gives an empty page.
            Err(Error::StreamNotFound(_)) if matches!(request.source, ReadSource::Stream(_)) => {
                Vec::new()
            }
            Err(e) => return Err(e),
        };
        let next = if events.len() > limit {
            let extra = events.pop().expect("more than limit");
            Some(match request.source {
                ReadSource::Stream(_) => extra.revision.0,
                _ => extra.position.0,
            })
        } else {
            None
        };
        Ok(ReadPage { events, next })
    }

    async fn stream_head(&self, stream: &StreamName) -> Result<Option<StreamHead>> {
        let message = pb::HeadRequest {
            stream: stream.as_str().to_owned(),
        };
        match self
            .retried(|| {
                let mut streams = self.streams();
                let request = self.unary(message.clone());
                async move { streams.head(request).await }
            })
            .await
        {
            Ok(head) => {
                let head = head.into_inner();
                Ok(Some(StreamHead {
                    revision: Revision(head.revision),
                    position: Position(head.position),
                }))
            }
            Err(Error::StreamNotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn info(&self) -> Result<StoreInfo> {
        let info = self
            .retried(|| {
                let mut streams = self.streams();
                let request = self.unary(pb::InfoRequest {});
                async move { streams.info(request).await }
            })
            .await?
            .into_inner();
        Ok(StoreInfo {
            head_position: info.head_position.map(Position),
            durability: if info.durability == "none" {
                Durability::None
            } else {
                Durability::Fsync
            },
            storage_bytes: info.storage_bytes,
        })
    }

    async fn next_position(&self) -> Result<u64> {
        Ok(EventStore::info(self)
            .await?
            .head_position
            .map_or(0, |p| p.0 + 1))
    }

    async fn wait_for_append(&self, known: u64) -> Result<u64> {
        use futures_util::StreamExt;
        let next = self.next_position().await?;
        if next > known {
            return Ok(next);
        }
        let events = self.subscribe(ReadSource::All(None), Start::Position(known));
        futures_util::pin_mut!(events);
        while let Some(delivery) = events.next().await {
            if let Delivery::Event(event) = delivery? {
                return Ok(event.position.0 + 1);
            }
        }
        Err(Error::Unavailable(
            "the subscription ended before an append".to_owned(),
        ))
    }

    /// The default limits: the server enforces its own, and refuses what is over them.
    fn limits(&self) -> &Limits {
        &self.limits
    }
}
