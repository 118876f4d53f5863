//! One owner of the consumer groups and sagas among the nodes of a PostgreSQL store
//! (docs/postgres.md, "Owners across nodes"): each node tries to take or renew the lease
//! `coordinator` every third of its term. The holder runs the groups and sagas on a hub scoped
//! to its lease (`Hub::scoped_until`), which stops them by itself when the lease runs out by
//! this node's clock, even if this task is late to notice; the others forward their requests
//! to the holder's address.

use std::sync::Arc;
use std::time::{Duration, Instant};

use skald_core::{Clock, EventStore, Result};
use skald_postgres::{Held, Lease, PgUrl};
use skald_saga::{Authority, SagaOptions};
use skald_server::{Coordination, Groups, Hub, Role, Sagas};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// The lease every node of a store competes for.
pub const LEASE: &str = "coordinator";

/// What a node needs to take part.
pub struct Setup {
    pub url: PgUrl,
    /// This node's id in the lease table (new at each start).
    pub node: String,
    /// Where the others reach this node.
    pub address: String,
    pub ttl: Duration,
    pub sagas: SagaOptions,
    pub clock: Arc<dyn Clock>,
    pub authority: Arc<dyn Authority>,
    /// How long a stop waits for saga steps in flight.
    pub grace: Duration,
}

/// The running coordinator of a node.
pub struct Coordinator {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Coordinator {
    /// Starts taking part for `coordination`'s node, on `hub`.
    pub fn start<S: EventStore>(
        hub: Hub<S>,
        coordination: Arc<Coordination<S>>,
        setup: Setup,
    ) -> Self {
        let (stop, stopping) = watch::channel(false);
        let task = tokio::spawn(run(hub, coordination, setup, stopping));
        Self { stop, task }
    }

    /// Starts stopping ([`Coordinator::stop`] waits for it): at the shutdown signal, so that
    /// another node takes the groups and sagas over while this one drains its connections.
    pub fn signal(&self) {
        self.stop.send_replace(true);
    }

    /// Stops the groups and sagas this node runs (they write their last checkpoints) and
    /// gives the lease up, so that another node takes over at once.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

type Started<S> = Result<(Groups<S>, Sagas<S>)>;

/// One term of ownership: the scoped hub, the lease as last renewed, and the groups and sagas
/// once they have started (they load their state while the lease goes on being renewed).
struct Term<S> {
    hub: Hub<S>,
    held: Held,
    starting: Option<JoinHandle<Started<S>>>,
    running: Option<(Groups<S>, Sagas<S>)>,
}

/// The lease loop's state.
struct Node<S> {
    hub: Hub<S>,
    coordination: Arc<Coordination<S>>,
    setup: Setup,
    lease: Option<Lease>,
    term: Option<Term<S>>,
    /// The stop of the last term, which the next one waits for: two terms of one node never
    /// run at once.
    last_stop: Option<JoinHandle<()>>,
    /// The last lease this node held, to give up at the end.
    last_held: Option<Held>,
    /// After a term that could not start: the lease is given up and not taken again before
    /// this, so that a healthy node may take it.
    resting_until: Option<Instant>,
    warned: bool,
}

async fn run<S: EventStore>(
    hub: Hub<S>,
    coordination: Arc<Coordination<S>>,
    setup: Setup,
    mut stopping: watch::Receiver<bool>,
) {
    let mut node = Node {
        hub,
        coordination,
        setup,
        lease: None,
        term: None,
        last_stop: None,
        last_held: None,
        resting_until: None,
        warned: false,
    };
    let round = node.setup.ttl / 3;
    loop {
        if *stopping.borrow() {
            break;
        }
        let next_round = Instant::now() + round;
        node.round().await;
        node.watch().await;
        let valid_until = node.term.as_ref().map(|t| t.held.valid_until);
        let wake = valid_until.map_or(next_round, |v| v.min(next_round));
        let starting = node.term.as_mut().and_then(|t| t.starting.as_mut());
        tokio::select! {
            changed = stopping.changed() => {
                // The coordinator was dropped without `stop`: stop as if asked.
                if changed.is_err() {
                    break;
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
            started = async { starting.expect("checked").await }, if starting.is_some() => {
                node.started(started).await;
            }
        }
    }
    node.finish().await;
}

impl<S: EventStore> Node<S> {
    /// One round: (re)connect, then take or renew the lease; every database call races the
    /// term's end.
    async fn round(&mut self) {
        let call = self.setup.ttl / 4;
        let deadline = self.term.as_ref().map(|t| t.held.valid_until);
        if self.lease.is_none() {
            let connect = Lease::connect(&self.setup.url, LEASE, &self.setup.node, self.setup.ttl);
            tokio::select! {
                connected = tokio::time::timeout(call, connect) => match connected {
                    Ok(Ok(l)) => self.lease = Some(l.advertise(&self.setup.address)),
                    Ok(Err(e)) => self.warn(&e.to_string()),
                    Err(_) => self.warn("connecting for the lease timed out"),
                },
                () = sleep_until(deadline) => return,
            }
        }
        if self.resting_until.is_some_and(|t| Instant::now() < t) {
            self.follow_holder().await;
            return;
        }
        let Some(lease) = &self.lease else {
            return;
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(call, lease.acquire()) => outcome,
            () = sleep_until(deadline) => return,
        };
        match outcome {
            Ok(Ok(Some(held))) => {
                self.warned = false;
                self.last_held = Some(held);
                match &mut self.term {
                    // A renewal that comes back after the term's end does not bring it back:
                    // its groups and sagas stopped at that instant; a new term starts.
                    Some(t) if t.held.fence == held.fence && t.held.valid() => {
                        t.held = held;
                        t.hub.extend(held.valid_until);
                    }
                    _ => {
                        self.end(false).await;
                        self.begin(held);
                    }
                }
            }
            Ok(Ok(None)) => {
                self.warned = false;
                self.end(false).await;
                self.follow_holder().await;
            }
            Ok(Err(e)) => {
                self.warn(&e.to_string());
                self.lease = None;
            }
            Err(_) => {
                self.warn("renewing the lease timed out");
                self.lease = None;
            }
        }
    }

    /// Ends the term whose lease is no longer valid by this node's clock (its hub has
    /// already stopped by itself at that instant).
    async fn watch(&mut self) {
        if let Some(t) = &self.term
            && !t.held.valid()
        {
            tracing::warn!(
                "the lease on consumer groups and sagas was not renewed in time: this node has \
                 stopped running them, before another node can take them over"
            );
            self.end(false).await;
        }
        if self.term.is_none() && matches!(self.coordination.role(), Role::Owner { .. }) {
            self.coordination.follow(None);
        }
    }

    async fn follow_holder(&mut self) {
        let Some(lease) = &self.lease else {
            self.coordination.follow(None);
            return;
        };
        let owner = match tokio::time::timeout(self.setup.ttl / 4, lease.holder()).await {
            Ok(Ok(Some(h))) if h.owner != self.setup.node && !h.address.is_empty() => {
                Some(h.address)
            }
            _ => None,
        };
        self.coordination.follow(owner);
    }

    fn warn(&mut self, what: &str) {
        if !self.warned {
            tracing::warn!(
                "cannot take part in running consumer groups and sagas now ({what}); retrying"
            );
            self.warned = true;
        }
    }

    /// Starts a term: the groups and sagas load on a hub scoped to the lease, in a task of
    /// their own, after the last term of this node has stopped; requests reach them once
    /// they have started ([`Node::started`]).
    fn begin(&mut self, held: Held) {
        let scoped = self.hub.scoped_until(held.valid_until);
        let hub = scoped.clone();
        let last_stop = self.last_stop.take();
        let sagas = self.setup.sagas.clone();
        let clock = Arc::clone(&self.setup.clock);
        let authority = Arc::clone(&self.setup.authority);
        let starting = tokio::spawn(async move {
            if let Some(last) = last_stop {
                let _ = last.await;
            }
            let groups = Groups::start(hub.clone()).await?;
            match Sagas::start_with(hub.clone(), sagas, clock, authority).await {
                Ok(sagas) => Ok((groups, sagas)),
                Err(e) => {
                    hub.shutdown();
                    groups.stopped().await;
                    Err(e)
                }
            }
        });
        self.term = Some(Term {
            hub: scoped,
            held,
            starting: Some(starting),
            running: None,
        });
    }

    /// The groups and sagas of the term have started, or could not.
    async fn started(&mut self, started: std::result::Result<Started<S>, tokio::task::JoinError>) {
        let Some(term) = &mut self.term else {
            return;
        };
        term.starting = None;
        match started {
            Ok(Ok((groups, sagas))) if term.held.valid() => {
                self.coordination.own(groups.clone(), sagas.clone());
                term.running = Some((groups, sagas));
                tracing::info!(
                    fence = term.held.fence,
                    "this node now runs the consumer groups and sagas"
                );
            }
            Ok(Ok((groups, sagas))) => {
                term.running = Some((groups, sagas));
                self.end(false).await;
            }
            Ok(Err(e)) => {
                tracing::warn!(
                    "holding the lease, but the consumer groups and sagas cannot start: {e}; \
                     giving the lease up for a while so that another node may run them"
                );
                self.end(false).await;
                self.release().await;
                self.resting_until = Some(Instant::now() + self.setup.ttl * 2);
            }
            Err(e) => {
                tracing::error!("starting the consumer groups and sagas panicked: {e}");
                self.end(false).await;
                self.release().await;
                self.resting_until = Some(Instant::now() + self.setup.ttl * 2);
            }
        }
    }

    /// Ends the term, if any: requests stop reaching its groups and sagas at once, then they
    /// stop (group consumers are ended; saga runners stop at their next step boundary).
    /// `wait`: wait for them (a graceful stop); otherwise the next term waits for them.
    async fn end(&mut self, wait: bool) {
        let Some(term) = self.term.take() else {
            return;
        };
        if term.running.is_some() {
            self.coordination.follow(None);
            tracing::info!("this node no longer runs the consumer groups and sagas");
        }
        term.hub.shutdown();
        let grace = self.setup.grace;
        let starting = term.starting;
        let running = term.running;
        let stopped = async move {
            if let Some(starting) = starting
                && let Ok(Ok((groups, sagas))) = starting.await
            {
                groups.stopped().await;
                sagas.stopped(grace).await;
            }
            if let Some((groups, sagas)) = running {
                groups.stopped().await;
                sagas.stopped(grace).await;
            }
        };
        if wait {
            stopped.await;
        } else {
            self.last_stop = Some(tokio::spawn(stopped));
        }
    }

    async fn release(&mut self) {
        if let (Some(lease), Some(held)) = (&self.lease, self.last_held.take()) {
            let _ = tokio::time::timeout(self.setup.ttl / 4, lease.release(&held)).await;
        }
    }

    /// A graceful stop: the term ends and writes its last checkpoints, then the lease is
    /// given up for another node to take at once.
    async fn finish(&mut self) {
        self.end(true).await;
        if let Some(last) = self.last_stop.take() {
            let _ = last.await;
        }
        self.release().await;
        self.coordination.follow(None);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
