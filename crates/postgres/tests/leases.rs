//! Leases in `skald.leases`: one owner at a time, a fence raised at each change of owner, and
//! a holder that stops acting (by its own clock) before the database lets another take the
//! lease. Against a real PostgreSQL 15.

mod support;

use std::time::{Duration, Instant};

use skald_core::Error;
use skald_postgres::{Lease, PgOptions, PgStore, PgUrl};
use support::Cluster;

async fn database(cluster: &Cluster, name: &str) -> PgUrl {
    let url = cluster.database(name).await;
    // The schema.
    PgStore::open(PgOptions::new(url.clone()))
        .await
        .unwrap()
        .shutdown()
        .await;
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_at_a_time_and_the_fence_rises_with_each_new_owner() {
    let cluster = Cluster::start();
    let url = database(&cluster, "owners").await;
    let ttl = Duration::from_secs(30);
    let a = Lease::connect(&url, "group:orders", "node-a", ttl)
        .await
        .unwrap()
        .advertise("http://10.0.0.1:7340");
    let b = Lease::connect(&url, "group:orders", "node-b", ttl)
        .await
        .unwrap()
        .advertise("http://10.0.0.2:7340");
    assert_eq!(b.holder().await.unwrap(), None, "nobody holds a new lease");
    let held = a.acquire().await.unwrap().expect("a free lease is taken");
    assert_eq!(held.fence, 1);
    let holder = b.holder().await.unwrap().expect("held");
    assert_eq!(
        (holder.owner.as_str(), holder.address.as_str(), holder.fence),
        ("node-a", "http://10.0.0.1:7340", 1),
        "other nodes learn who holds the lease and where to reach it"
    );
    assert!(held.valid());
    assert_eq!(
        b.acquire().await.unwrap(),
        None,
        "a held lease is not taken"
    );
    let renewed = a.acquire().await.unwrap().expect("the holder renews");
    assert_eq!(renewed.fence, 1, "a renewal keeps the fence");
    assert!(renewed.valid_until > held.valid_until);
    // Another lease is another name.
    let other = Lease::connect(&url, "sagas", "node-b", ttl).await.unwrap();
    assert_eq!(other.acquire().await.unwrap().unwrap().fence, 1);
    // Released, it is taken at once, with a higher fence; the old holder cannot renew.
    a.release(&renewed).await.unwrap();
    let taken = b
        .acquire()
        .await
        .unwrap()
        .expect("a released lease is taken");
    assert_eq!(taken.fence, 2);
    assert_eq!(
        a.holder().await.unwrap().map(|h| h.address),
        Some("http://10.0.0.2:7340".to_owned())
    );
    assert_eq!(a.acquire().await.unwrap(), None);
    // A release with a stale fence does nothing.
    a.release(&renewed).await.unwrap();
    assert_eq!(a.acquire().await.unwrap(), None);
    assert!(matches!(
        Lease::connect(&url, "x", "node-a", Duration::from_millis(10)).await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_that_stops_renewing_stops_acting_before_another_can_take_over() {
    // As a holder cut off from the database, or killed: it renews no more.
    let cluster = Cluster::start();
    let url = database(&cluster, "expiry").await;
    let ttl = Duration::from_millis(600);
    let a = Lease::connect(&url, "sagas", "node-a", ttl).await.unwrap();
    let b = Lease::connect(&url, "sagas", "node-b", ttl).await.unwrap();
    let sent = Instant::now();
    let held = a.acquire().await.unwrap().unwrap();
    let taken = loop {
        if let Some(taken) = b.acquire().await.unwrap() {
            break (Instant::now(), taken);
        }
        assert!(sent.elapsed() < Duration::from_secs(10), "never taken over");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (at, taken) = taken;
    assert!(
        held.valid_until < at,
        "the old holder could still act when the new one took over"
    );
    assert!(
        at.duration_since(sent) >= ttl - Duration::from_millis(50),
        "taken over after {:?}, before the lease of {ttl:?} expired",
        at.duration_since(sent)
    );
    assert_eq!(taken.fence, held.fence + 1);
    assert!(!held.valid());
    assert_eq!(
        a.acquire().await.unwrap(),
        None,
        "the old holder comes back second"
    );
}
