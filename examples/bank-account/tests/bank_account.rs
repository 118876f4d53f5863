//! The example as a user runs it, against a server: commands through the binary, the
//! projection killed with SIGKILL mid-way three times and resumed from its SQLite checkpoint
//! without applying an event twice, the balance query, a rebuild, two projectors racing on one
//! read model, and live projection stopped with Ctrl-C.

#[path = "../../../crates/client/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bank_account::{AccountEvent, Balance, Balances};
use skald_client::Client;
use skald_client::aggregate::propose;
use skald_core::{AppendRequest, EventStore, ExpectedRevision, StreamName};
use support::serve;

const BIN: &str = env!("CARGO_BIN_EXE_bank-account");

fn bank(url: &str, db: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.args(["--server", url, "--db"]).arg(db).args(args);
    command
}

/// Runs the binary to its end, off the runtime's threads.
async fn run(url: &str, db: &Path, args: &[&str]) -> Output {
    let mut command = bank(url, db, args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The read model's checkpoint, read beside the running projection (SQLite in WAL mode).
fn checkpoint(db: &Path) -> u64 {
    if !db.exists() {
        return 0;
    }
    Balances::open(db)
        .unwrap()
        .position()
        .unwrap()
        .map_or(0, |p| p.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_projection_kills_and_queries() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(&dir.path().join("skald"), listener).await;
    let db = dir.path().join("balances.sqlite");

    // Commands through the binary: accepted, and turned down with the reason.
    for args in [["open", "1", "ada"], ["deposit", "1", "50"]] {
        let out = run(&url, &db, &args).await;
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    }
    let out = run(&url, &db, &["withdraw", "1", "80"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the balance is 50, less than the 80 asked for"),
        "{}",
        text(&out.stderr)
    );
    // A keyed deposit run twice (its answer lost, say) is applied once; the same key with
    // another amount is refused.
    for _ in 0..2 {
        let out = run(&url, &db, &["deposit", "1", "10", "--key", "pay-17"]).await;
        assert!(out.status.success(), "{}", text(&out.stderr));
    }
    let out = run(&url, &db, &["deposit", "1", "11", "--key", "pay-17"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("was used before"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&url, &db, &["withdraw", "1", "10", "--key", "refund-17"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&url, &db, &["open", "1", "bob"]).await;
    assert!(text(&out.stderr).contains("open already"));
    let out = run(&url, &db, &["balance", "1"]).await;
    assert!(text(&out.stderr).contains("run `project`"));
    let out = run("http://127.0.0.1:9", &db, &["deposit", "1", "5"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("127.0.0.1:9"),
        "{}",
        text(&out.stderr)
    );

    // Many more movements, written straight to the store.
    let client = Client::connect(&url).await.unwrap();
    let mut expected = vec![(50u64, 3u64); 1];
    for account in 2..=10u64 {
        let mut events = vec![
            propose(&AccountEvent::Opened {
                owner: format!("owner {account}"),
            })
            .unwrap(),
        ];
        let mut balance = 0;
        for i in 0..300u64 {
            let amount = account * 10 + i % 7;
            balance += amount;
            events.push(propose(&AccountEvent::Deposited { amount }).unwrap());
            if i % 3 == 2 {
                balance -= account;
                events.push(propose(&AccountEvent::Withdrawn { amount: account }).unwrap());
            }
        }
        expected.push((balance, events.len() as u64 - 1));
        client
            .append(AppendRequest {
                stream: StreamName::new(format!("account-{account}")).unwrap(),
                expected: ExpectedRevision::NoStream,
                condition: None,
                events,
            })
            .await
            .unwrap();
    }
    let last = client.next_position().await.unwrap() - 1;

    // The projection, killed with SIGKILL at a quarter, a half and three quarters.
    for quarter in 1..=3 {
        let mut projector = bank(&url, &db, &["project", "--batch", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let target = last * quarter / 4;
        let deadline = Instant::now() + Duration::from_secs(60);
        while checkpoint(&db) < target {
            assert!(Instant::now() < deadline, "the projection stalled");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        projector.kill().unwrap();
        projector.wait().unwrap();
        let at = checkpoint(&db);
        assert!(at < last, "killed after it was done, at {at} of {last}");
    }
    let out = run(&url, &db, &["project", "--once"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("projected up to position {last}")
    );

    // Every movement counted once.
    let check = |db: &Path| {
        let balances = Balances::open(db).unwrap();
        for (i, (balance, movements)) in expected.iter().enumerate() {
            let id = (i + 1).to_string();
            let got = balances
                .balance(&id)
                .unwrap()
                .expect("the account is there");
            assert_eq!(
                (got.balance, got.movements),
                (*balance, *movements),
                "account {id}"
            );
        }
    };
    check(&db);
    let out = run(&url, &db, &["balance", "1"]).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "account 1 (ada): balance 50, 3 movements"
    );

    // A rebuild comes to the same.
    let out = run(&url, &db, &["rebuild"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    check(&db);

    // Two projectors on one new read model at once (two replicas): the checkpoint's
    // compare-and-set lets each batch commit once; a process that finds it moved stops with
    // the reason, and one more run finishes what is left. Nothing is counted twice.
    let shared = dir.path().join("shared.sqlite");
    let (a, b) = tokio::join!(
        run(&url, &shared, &["project", "--once", "--batch", "3"]),
        run(&url, &shared, &["project", "--once", "--batch", "3"]),
    );
    for out in [&a, &b] {
        assert!(
            out.status.success() || text(&out.stderr).contains("another projector"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = run(&url, &shared, &["project", "--once"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    check(&shared);

    // Live: a deposit shows up in the read model while `project` follows; Ctrl-C stops it
    // between transactions.
    let projector = bank(&url, &db, &["project"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = run(&url, &db, &["deposit", "1", "7"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let balance = Balances::open(&db).unwrap().balance("1").unwrap();
        if balance
            == Some(Balance {
                owner: "ada".into(),
                balance: 57,
                movements: 4,
            })
        {
            break;
        }
        assert!(Instant::now() < deadline, "the live deposit never arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // SAFETY: signals the child this test started, by its id.
    assert_eq!(
        unsafe { libc::kill(projector.id() as libc::pid_t, libc::SIGINT) },
        0
    );
    let out = tokio::task::spawn_blocking(move || projector.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("projected up to position {}", last + 1)
    );

    server.stop().await;
}
