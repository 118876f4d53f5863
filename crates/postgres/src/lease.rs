//! Leases in `skald.leases` (docs/postgres.md, "Owners across nodes"): one owner at a time for
//! something all nodes could run, such as a consumer group or the saga runners. Expiry is
//! decided by the database's clock, so node clocks need not agree; the holder stops acting by
//! its own monotonic clock before the database would let anyone else take the lease, even when
//! it is cut off from the database; and each change of owner raises a fence number the new
//! owner can write with.

use std::time::{Duration, Instant};

use skald_core::Error;
use tokio_postgres::Client;

use crate::{PgUrl, connect, describe};

/// A lease named `name`, taken as `owner`, for `ttl` at a time.
pub struct Lease {
    client: Client,
    url: PgUrl,
    name: String,
    owner: String,
    address: String,
    ttl: Duration,
}

/// Who holds a lease now, by the database's clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// The holder's id.
    pub owner: String,
    /// Where it said it can be reached (empty when it said nothing).
    pub address: String,
    /// The fence of its term.
    pub fence: i64,
}

/// A lease held: its fence, and the instant (by this process's monotonic clock) until which
/// the holder may act. That instant is `ttl − ttl/4` after the request that took or renewed
/// it was sent, so it passes before the database's expiry, which counts from when the
/// database ran the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Raised by one at each change of owner.
    pub fence: i64,
    /// Act only before this.
    pub valid_until: Instant,
}

impl Held {
    /// Whether the holder may still act.
    pub fn valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

impl Lease {
    /// A lease `name` for `owner` (a node's id) on the store at `url`, held `ttl` at a time.
    /// The schema must exist (open a `PgStore` first).
    pub async fn connect(
        url: &PgUrl,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Self, Error> {
        if ttl < Duration::from_millis(100) {
            return Err(Error::InvalidConfig(format!(
                "a lease of {} ms is too short to renew: give at least 100 ms",
                ttl.as_millis()
            )));
        }
        Ok(Self {
            client: connect(url).await?,
            url: url.clone(),
            name: name.to_owned(),
            owner: owner.to_owned(),
            address: String::new(),
            ttl,
        })
    }

    /// Records `address` with the lease whenever this owner takes or renews it, for
    /// [`Lease::holder`] to tell other nodes where the holder can be reached.
    pub fn advertise(mut self, address: &str) -> Self {
        self.address = address.to_owned();
        self
    }

    /// The holder now, if the lease is held and not expired by the database's clock.
    pub async fn holder(&self) -> Result<Option<Holder>, Error> {
        let row = self
            .client
            .query_opt(
                "SELECT owner, address, fence FROM skald.leases \
                 WHERE name = $1 AND expires_at >= clock_timestamp()",
                &[&self.name],
            )
            .await
            .map_err(|e| self.failed("reading the holder of the lease", e))?;
        Ok(row.map(|row| Holder {
            owner: row.get(0),
            address: row.get(1),
            fence: row.get(2),
        }))
    }

    /// Takes the lease if it is free, expired or already this owner's, or renews it; `None`
    /// when another owner holds it. A renewal keeps the fence; a take raises it.
    pub async fn acquire(&self) -> Result<Option<Held>, Error> {
        let sent = Instant::now();
        let ms = self.ttl.as_millis() as f64;
        let row = self
            .client
            .query_opt(
                "INSERT INTO skald.leases AS l (name, owner, fence, expires_at, address) \
                 VALUES ($1, $2, 1, clock_timestamp() + $3 * interval '1 millisecond', $4) \
                 ON CONFLICT (name) DO UPDATE \
                 SET owner = excluded.owner, address = excluded.address, \
                     fence = l.fence + (l.owner <> excluded.owner OR l.expires_at < clock_timestamp())::int, \
                     expires_at = excluded.expires_at \
                 WHERE l.owner = excluded.owner AND l.expires_at >= clock_timestamp() \
                    OR l.expires_at < clock_timestamp() \
                 RETURNING fence",
                &[&self.name, &self.owner, &ms, &self.address],
            )
            .await
            .map_err(|e| self.failed("taking the lease", e))?;
        Ok(row.map(|row| Held {
            fence: row.get(0),
            valid_until: sent + self.ttl - self.ttl / 4,
        }))
    }

    /// Gives the lease up at once, if `held` is still this owner's, so another may take it
    /// without waiting for it to expire.
    pub async fn release(&self, held: &Held) -> Result<(), Error> {
        self.client
            .execute(
                "UPDATE skald.leases SET expires_at = '-infinity' \
                 WHERE name = $1 AND owner = $2 AND fence = $3",
                &[&self.name, &self.owner, &held.fence],
            )
            .await
            .map_err(|e| self.failed("releasing the lease", e))?;
        Ok(())
    }

    fn failed(&self, what: &str, e: tokio_postgres::Error) -> Error {
        Error::Unavailable(format!(
            "PostgreSQL at {}, {what} {:?}: {}",
            self.url,
            self.name,
            describe(&e)
        ))
    }
}
