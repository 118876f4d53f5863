//! The schema is created at start, once even when nodes start together, and a node refuses a
//! schema newer than it knows; the connection settings never show the password. Against a
//! real PostgreSQL 15.

mod support;

use skald_core::Error;
use skald_postgres::{PgUrl, SCHEMA_VERSION, connect, migrate, tokio_postgres};
use support::Cluster;

async fn client(cluster: &Cluster, database: &str) -> tokio_postgres::Client {
    connect(&PgUrl::parse(&cluster.url(database)).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schema_is_created_once_and_a_newer_one_is_refused() {
    let cluster = Cluster::start();
    let admin = client(&cluster, "postgres").await;
    admin.batch_execute("CREATE DATABASE fresh").await.unwrap();

    // Four nodes start at once on an empty database: one creates the schema, the others
    // wait for it and find it done.
    let mut starts = Vec::new();
    for _ in 0..4 {
        let url = cluster.url("fresh");
        starts.push(tokio::spawn(async move {
            let mut c = connect(&PgUrl::parse(&url).unwrap()).await.unwrap();
            migrate(&mut c).await
        }));
    }
    let mut found = Vec::new();
    for start in starts {
        found.push(start.await.unwrap().expect("every node starts"));
    }
    found.sort();
    assert_eq!(found, [0, SCHEMA_VERSION, SCHEMA_VERSION, SCHEMA_VERSION]);
    let mut node = client(&cluster, "fresh").await;
    let next: i64 = node
        .query_one("SELECT next_position FROM skald.head WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(next, 0);
    assert_eq!(migrate(&mut node).await.unwrap(), SCHEMA_VERSION);

    // A schema written by a newer Skald: refused, naming both versions, and left as it is.
    node.batch_execute("UPDATE skald.meta SET value = '99' WHERE key = 'schema_version'")
        .await
        .unwrap();
    match migrate(&mut node).await {
        Err(Error::InvalidConfig(reason)) => {
            assert!(reason.contains("version 99"), "{reason}");
            assert!(
                reason.contains(&format!("up to version {SCHEMA_VERSION}")),
                "{reason}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let version: String = node
        .query_one(
            "SELECT value FROM skald.meta WHERE key = 'schema_version'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, "99");

    // A store written by the first version (leases without an address) is brought to the
    // current one, and the lease it held is kept.
    node.batch_execute(
        "UPDATE skald.meta SET value = '1' WHERE key = 'schema_version';
         ALTER TABLE skald.leases DROP COLUMN address;
         INSERT INTO skald.leases VALUES ('coordinator', 'node-a', 7, now() + interval '1 hour');",
    )
    .await
    .unwrap();
    assert_eq!(migrate(&mut node).await.unwrap(), 1);
    let row = node
        .query_one(
            "SELECT owner, fence, address FROM skald.leases WHERE name = 'coordinator'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "node-a");
    assert_eq!(row.get::<_, i64>(1), 7);
    assert_eq!(row.get::<_, String>(2), "");
    drop(admin);
}

#[tokio::test]
async fn the_password_is_never_shown() {
    let url = PgUrl::parse("postgres://ada:s3cret-pw@db.example:5433/skald").unwrap();
    assert_eq!(url.to_string(), "postgres://ada@db.example:5433/skald");
    assert!(!format!("{url:?}").contains("s3cret-pw"));
    // Nothing listens on port 9 of this machine.
    let unreachable = PgUrl::parse("postgres://ada:s3cret-pw@127.0.0.1:9/skald").unwrap();
    match connect(&unreachable).await {
        Err(Error::Unavailable(reason)) => {
            assert!(!reason.contains("s3cret-pw"), "{reason}");
            assert!(
                reason.contains("postgres://ada@127.0.0.1:9/skald"),
                "{reason}"
            );
        }
        other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
    }
    for bad in [
        "postgres://ada:s3cret-pw@db.example:notaport/skald",
        "nonsense=1",
    ] {
        match PgUrl::parse(bad) {
            Err(Error::InvalidConfig(reason)) => assert!(!reason.contains("s3cret-pw"), "{reason}"),
            other => panic!("{bad}: expected InvalidConfig, got {other:?}"),
        }
    }
}
