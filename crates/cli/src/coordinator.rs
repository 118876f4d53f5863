//! One owner of the consumer groups and sagas among the nodes of a PostgreSQL store
//! (docs/postgres.md, "Owners across nodes"): each node tries to take or renew the lease
//! `coordinator` every third of its term. The holder runs the groups and sagas on a scoped
//! hub of its own for as long as its lease is valid by its own clock, and stops them the
//! moment it is not (a renewal that failed or came too late); the others forward their
//! requests to the holder's address.

use std::sync::Arc;
use std::time::{Duration, Instant};

use skald_core::{Clock, EventStore};
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

    /// Stops the groups and sagas this node runs (they write their last checkpoints) and
    /// gives the lease up, so that another node takes over at once.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.task.await;
    }
}

/// One term of ownership.
struct Term<S> {
    hub: Hub<S>,
    groups: Groups<S>,
    sagas: Sagas<S>,
    held: Held,
}

async fn run<S: EventStore>(
    hub: Hub<S>,
    coordination: Arc<Coordination<S>>,
    setup: Setup,
    mut stopping: watch::Receiver<bool>,
) {
    let round = setup.ttl / 3;
    // No call to the database may outlast the margin the holder keeps before its lease ends.
    let call = setup.ttl / 4;
    let mut lease: Option<Lease> = None;
    let mut term: Option<Term<S>> = None;
    let mut warned = false;
    loop {
        if *stopping.borrow() {
            break;
        }
        let next_round = Instant::now() + round;
        if lease.is_none() {
            match tokio::time::timeout(
                call,
                Lease::connect(&setup.url, LEASE, &setup.node, setup.ttl),
            )
            .await
            {
                Ok(Ok(l)) => lease = Some(l.advertise(&setup.address)),
                Ok(Err(e)) => warn_once(&mut warned, &format!("{e}")),
                Err(_) => warn_once(&mut warned, "connecting for the lease timed out"),
            }
        }
        if let Some(l) = &lease {
            // The watchdog: a term ends when its lease is no longer valid by this node's
            // clock, even while the renewal is still waiting for an answer.
            let valid_until = term.as_ref().map(|t| t.held.valid_until);
            let outcome = tokio::select! {
                outcome = tokio::time::timeout(call, l.acquire()) => Some(outcome),
                () = sleep_until(valid_until) => None,
            };
            match outcome {
                Some(Ok(Ok(Some(held)))) => {
                    warned = false;
                    match &mut term {
                        Some(t) if t.held.fence == held.fence => t.held = held,
                        _ => {
                            if let Some(old) = term.take() {
                                end(&coordination, old, setup.grace, false).await;
                            }
                            term = begin(&hub, &coordination, &setup, held).await;
                        }
                    }
                }
                Some(Ok(Ok(None))) => {
                    warned = false;
                    if let Some(old) = term.take() {
                        end(&coordination, old, setup.grace, false).await;
                    }
                    let owner = match tokio::time::timeout(call, l.holder()).await {
                        Ok(Ok(Some(h))) if h.owner != setup.node && !h.address.is_empty() => {
                            Some(h.address)
                        }
                        _ => None,
                    };
                    coordination.follow(owner);
                }
                Some(Ok(Err(e))) => {
                    warn_once(&mut warned, &format!("{e}"));
                    lease = None;
                }
                Some(Err(_)) => {
                    warn_once(&mut warned, "renewing the lease timed out");
                    lease = None;
                }
                None => {}
            }
        }
        if let Some(t) = &term
            && !t.held.valid()
        {
            tracing::warn!(
                "the lease on consumer groups and sagas was not renewed in time: this node stops \
                 running them before another node can take them over"
            );
            if let Some(old) = term.take() {
                end(&coordination, old, setup.grace, false).await;
            }
        }
        if term.is_none() && matches!(coordination.role(), Role::Owner { .. }) {
            coordination.follow(None);
        }
        let valid_until = term.as_ref().map(|t| t.held.valid_until);
        let wake = valid_until.map_or(next_round, |v| v.min(next_round));
        tokio::select! {
            _ = stopping.changed() => {}
            () = tokio::time::sleep_until(wake.into()) => {}
        }
    }
    if let Some(old) = term.take() {
        let held = old.held;
        end(&coordination, old, setup.grace, true).await;
        if let Some(l) = &lease {
            let _ = tokio::time::timeout(call, l.release(&held)).await;
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn warn_once(warned: &mut bool, what: &str) {
    if !*warned {
        tracing::warn!(
            "cannot take part in running consumer groups and sagas now ({what}); retrying"
        );
        *warned = true;
    }
}

/// Starts the groups and sagas of a term on a scoped hub; `None` (and follower) when they
/// cannot start, or when starting took so long that the lease passed.
async fn begin<S: EventStore>(
    hub: &Hub<S>,
    coordination: &Coordination<S>,
    setup: &Setup,
    held: Held,
) -> Option<Term<S>> {
    let scoped = hub.scoped();
    let groups = match Groups::start(scoped.clone()).await {
        Ok(groups) => groups,
        Err(e) => {
            tracing::warn!("holding the lease, but the consumer groups cannot start: {e}");
            scoped.shutdown();
            return None;
        }
    };
    let sagas = match Sagas::start_with(
        scoped.clone(),
        setup.sagas.clone(),
        Arc::clone(&setup.clock),
        Arc::clone(&setup.authority),
    )
    .await
    {
        Ok(sagas) => sagas,
        Err(e) => {
            tracing::warn!("holding the lease, but the saga engine cannot start: {e}");
            scoped.shutdown();
            groups.stopped().await;
            return None;
        }
    };
    let term = Term {
        hub: scoped,
        groups,
        sagas,
        held,
    };
    if !held.valid() {
        end(coordination, term, setup.grace, false).await;
        return None;
    }
    coordination.own(term.groups.clone(), term.sagas.clone());
    tracing::info!(
        fence = held.fence,
        "this node now runs the consumer groups and sagas"
    );
    Some(term)
}

/// Ends a term: requests stop reaching its groups and sagas at once, then they stop (group
/// consumers are ended; saga runners stop at their next step boundary). `wait`: wait for
/// them to finish (a graceful stop); otherwise they finish in the background, and whatever
/// they still write after another node took over fails on its expected revision.
async fn end<S: EventStore>(
    coordination: &Coordination<S>,
    term: Term<S>,
    grace: Duration,
    wait: bool,
) {
    coordination.follow(None);
    term.hub.shutdown();
    let stopped = async move {
        term.groups.stopped().await;
        term.sagas.stopped(grace).await;
    };
    if wait {
        stopped.await;
    } else {
        tokio::spawn(stopped);
    }
    tracing::info!("this node no longer runs the consumer groups and sagas");
}
