//! The tailer: follows the head row so that a node sees appends made on any node, and tells
//! readiness whether the database can be reached and takes writes.

use std::sync::Arc;
use std::time::Duration;

use skald_core::Error;

use crate::conn::{CHANNEL, db_error, within};
use crate::shared::{SIZE_EVERY, SIZE_QUERY, Shared};

/// Follows the head row: at every notification, every poll interval, and at once after a
/// reconnection, since notifications sent while it was away are lost.
pub(crate) async fn run_tailer(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut reached = false;
        let Err(e) = tail(&shared, &mut reached).await;
        shared.failed(&e);
        if reached {
            // It had reached the database: start the back-off afresh.
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

async fn tail(shared: &Shared, reached: &mut bool) -> Result<std::convert::Infallible, Error> {
    let options = &shared.options;
    let (client, mut woken) = within(
        options.timeout,
        "connecting the tailer",
        crate::connect_listening(&options.url),
    )
    .await?;
    async {
        within(options.timeout, "listening", async {
            client
                .batch_execute(&format!(
                    "SET application_name = 'skald tailer'; LISTEN {CHANNEL}"
                ))
                .await
                .map_err(db_error)
        })
        .await?;
        let statement = within(options.timeout, "preparing the tailer", async {
            client
                .prepare("SELECT next_position, pg_is_in_recovery() FROM skald.head WHERE id = 1")
                .await
                .map_err(db_error)
        })
        .await?;
        let mut measured: Option<std::time::Instant> = None;
        loop {
            if measured.is_none_or(|at| at.elapsed() >= SIZE_EVERY) {
                let bytes: i64 = within(options.timeout, "measuring the store", async {
                    client
                        .query_one(SIZE_QUERY, &[])
                        .await
                        .map_err(db_error)
                        .map(|row| row.get(0))
                })
                .await?;
                shared
                    .metrics
                    .storage_bytes
                    .store(bytes.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
                measured = Some(std::time::Instant::now());
            }
            let (next, standby): (i64, bool) = within(options.timeout, "reading the head", async {
                client
                    .query_one(&statement, &[])
                    .await
                    .map_err(db_error)
                    .map(|row| (row.get(0), row.get(1)))
            })
            .await?;
            *reached = true;
            let next = next.max(0) as u64;
            let seen = *shared.head.borrow();
            if next < seen {
                // Events this node saw committed are gone: a failover to a standby that had
                // not received them (asynchronous replication). Positions after `next` will be
                // taken again by other events; say so loudly and stay not ready.
                let alarm = format!(
                    "the log ends at position {next}, but this node saw it reach {seen}: a \
                     failover lost committed events (use synchronous replication); restart the \
                     node after checking the store"
                );
                *shared.alarm.lock().expect("alarm lock") = Some(alarm);
            }
            if standby {
                shared.failed(&Error::Unavailable(
                    "it is a standby in recovery, which cannot take appends: point the node at \
                     the primary (target_session_attrs=read-write with every host in the URL)"
                        .to_owned(),
                ));
            } else {
                shared.recovered();
            }
            shared.advance(next);
            tokio::select! {
                _ = woken.recv() => {
                    // Many notifications may be waiting: one read covers them all.
                    while woken.try_recv().is_ok() {}
                }
                _ = tokio::time::sleep(options.poll) => {}
            }
            if client.is_closed() {
                return Err(Error::Unavailable(
                    "the tailer's connection to PostgreSQL closed".to_owned(),
                ));
            }
        }
    }
    .await
}
