//! Real-time delivery, independent of any transport: catch-up-then-live subscriptions over
//! any [`EventStore`]. The design is in `docs/subscriptions.md`.
//!
//! [`Hub::start`] spawns the tailer, which reads each new event from the store once into a
//! bounded in-memory tail; every [`Subscription`] reads history from the store and then takes
//! live events from that tail. Writers never wait for subscribers: a subscriber that falls
//! behind the tail reads from the store until it catches up.

pub mod groups;
mod live;
mod source;
mod subscription;

use std::sync::Arc;

use skald_core::{EventStore, ReadSource, Result};
use tokio::sync::watch;

pub use groups::Groups;
pub use live::TailLimits;
pub use source::{AllSpec, SourceSpec, filter_of};
pub use subscription::{CATCH_UP_PAGE, Delivery, LIVE_BATCH, Start, Subscription, matches_source};

use crate::live::LiveTail;

/// How the hub is built. Every field has a default.
#[derive(Clone, Copy, Debug, Default)]
pub struct HubOptions {
    /// The bound on the shared live tail.
    pub tail: TailLimits,
}

/// The cheap cloneable handle to the hub of one store.
pub struct Hub<S> {
    store: Arc<S>,
    tail: Arc<LiveTail>,
    stop: Arc<watch::Sender<bool>>,
    /// A scoped hub's end by the clock ([`Hub::scoped_until`]): it counts as stopping from
    /// then on, without anyone calling [`Hub::shutdown`].
    deadline: Arc<watch::Sender<Option<std::time::Instant>>>,
    tailer: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl<S> Clone for Hub<S> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            tail: Arc::clone(&self.tail),
            stop: Arc::clone(&self.stop),
            deadline: Arc::clone(&self.deadline),
            tailer: Arc::clone(&self.tailer),
        }
    }
}

impl<S: EventStore> Hub<S> {
    /// Starts the tailer on the current tokio runtime (it panics outside one).
    pub fn start(store: Arc<S>, options: HubOptions) -> Self {
        // The tailer moves the tail to the store's head before it waits for anything.
        let tail = Arc::new(LiveTail::new(0, options.tail));
        let stop = Arc::new(watch::Sender::new(false));
        let tailer = tokio::spawn(live::run_tailer(
            Arc::clone(&store),
            Arc::clone(&tail),
            stop.subscribe(),
        ));
        Self {
            store,
            tail,
            stop,
            deadline: Arc::new(watch::Sender::new(None)),
            tailer: Arc::new(std::sync::Mutex::new(Some(tailer))),
        }
    }

    /// The store this hub delivers from.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// Opens a catch-up-then-live subscription.
    pub async fn subscribe(&self, source: ReadSource, start: Start) -> Result<Subscription<S>> {
        Subscription::start(
            Arc::clone(&self.store),
            Arc::clone(&self.tail),
            source,
            start,
        )
        .await
    }

    /// Subscriptions open now.
    pub fn subscribers(&self) -> usize {
        self.tail.subscribers()
    }

    /// A handle on the same store and live tail with a stop of its own: its
    /// [`Hub::shutdown`] stops only what was started through it (the groups and sagas of one
    /// term of ownership, on a node of a shared store), while a shutdown of this hub stops it
    /// too. Its shutdown never stops the tailer.
    pub fn scoped(&self) -> Self {
        self.scope(None)
    }

    /// [`Hub::scoped`], which also stops by itself at `until` (moved on with
    /// [`Hub::extend`]): the term of a lease, whose holder must stop acting when its lease
    /// runs out even if nothing else runs in time to tell it.
    pub fn scoped_until(&self, until: std::time::Instant) -> Self {
        self.scope(Some(until))
    }

    /// Moves a scoped hub's end to `until`, unless it has passed: an end that passed is
    /// final, since what the hub started has stopped at it.
    pub fn extend(&self, until: std::time::Instant) {
        self.deadline.send_if_modified(|deadline| match deadline {
            Some(end) if std::time::Instant::now() >= *end => false,
            _ => {
                *deadline = Some(until);
                true
            }
        });
    }

    /// Whether a scoped hub's end by the clock has passed: what it started must write
    /// nothing more.
    pub fn expired(&self) -> bool {
        self.deadline
            .borrow()
            .is_some_and(|until| std::time::Instant::now() >= until)
    }

    fn scope(&self, until: Option<std::time::Instant>) -> Self {
        let stop = Arc::new(watch::Sender::new(self.is_stopping()));
        let mut parent = self.stop.subscribe();
        let mut own = stop.subscribe();
        let child = Arc::clone(&stop);
        // Ends with the scope's shutdown, or the parent's, whichever comes first.
        tokio::spawn(async move {
            tokio::select! {
                _ = parent.wait_for(|stopping| *stopping) => {
                    child.send_replace(true);
                }
                _ = own.wait_for(|stopping| *stopping) => {}
            }
        });
        Self {
            store: Arc::clone(&self.store),
            tail: Arc::clone(&self.tail),
            stop,
            deadline: Arc::new(watch::Sender::new(until)),
            tailer: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Stops the tailer and tells every transport (through [`Hub::stopping`]) to end its
    /// subscriptions.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Resolves once the tailer has stopped after [`Hub::shutdown`], so that it holds the
    /// store no more.
    pub async fn stopped(&self) {
        let tailer = self.tailer.lock().expect("not poisoned").take();
        if let Some(tailer) = tailer {
            let _ = tailer.await;
        }
    }

    /// Whether [`Hub::shutdown`] has been called, or a scoped hub's end has passed.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow() || self.expired()
    }

    /// Resolves once [`Hub::shutdown`] has been called, or a scoped hub's end has passed.
    pub async fn stopping(&self) {
        let mut stop = self.stop.subscribe();
        let mut deadline = self.deadline.subscribe();
        loop {
            let until = *deadline.borrow_and_update();
            if *stop.borrow_and_update() || until.is_some_and(|u| std::time::Instant::now() >= u) {
                return;
            }
            let at = async {
                match until {
                    Some(u) => tokio::time::sleep_until(u.into()).await,
                    None => std::future::pending().await,
                }
            };
            // Both senders live as long as this hub, so neither `changed` fails while it waits.
            tokio::select! {
                _ = stop.changed() => {}
                _ = deadline.changed() => {}
                () = at => {}
            }
        }
    }
}
