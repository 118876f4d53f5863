//! Unique usernames against a server: sign-ups, renames that free the old name, clear
//! refusals, and many users racing for one name through the binary and the library, with
//! exactly one winner each time.

#[path = "../../../crates/client/tests/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use skald_client::Client;
use support::serve;
use unique_usernames::{UsernameError, holder, register, rename};

const BIN: &str = env!("CARGO_BIN_EXE_unique-usernames");

async fn run(url: &str, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.args(["--server", url]).args(args);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usernames_stay_unique() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = serve(dir.path(), listener).await;
    let client = Client::connect(&url).await.unwrap();

    // Through the binary, as the README shows it.
    let out = run(&url, &["register", "u1", "ada"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("user u1 is ada"));
    let out = run(&url, &["register", "u2", "ada"]).await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("the username \"ada\" is taken by user u1"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&url, &["register", "u2", "Ada Lovelace"]).await;
    assert!(
        text(&out.stderr).contains("a username is 3 to 32 characters"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&url, &["register", "u 2", "ada2"]).await;
    assert!(
        text(&out.stderr).contains("\"u 2\" is not one"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&url, &["whois", "ada"]).await;
    assert_eq!(text(&out.stdout).trim(), "ada is user u1");

    // A rename frees the old name and takes the new one, in one event.
    let out = run(&url, &["rename", "u1", "countess"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(holder(&client, "ada").await.unwrap(), None);
    assert_eq!(
        holder(&client, "countess").await.unwrap().as_deref(),
        Some("u1")
    );
    register(&client, "u2", "ada").await.unwrap();
    assert!(matches!(
        rename(&client, "u2", "countess").await,
        Err(UsernameError::Taken { by, .. }) if by == "u1"
    ));
    assert!(matches!(
        rename(&client, "u9", "nobody").await,
        Err(UsernameError::UnknownUser(_))
    ));
    assert!(matches!(
        register(&client, "u1", "another").await,
        Err(UsernameError::UserExists(_))
    ));

    // Races: eight users for one name, eight times over, through the library; then eight
    // processes for one name.
    for round in 0..8 {
        let name = format!("prize{round}");
        let racers = (0..8).map(|i| {
            let client = client.clone();
            let name = name.clone();
            tokio::spawn(async move { register(&client, &format!("r{round}-{i}"), &name).await })
        });
        let mut won = 0;
        for racer in racers {
            match racer.await.unwrap() {
                Ok(_) => won += 1,
                Err(UsernameError::Taken { .. }) => {}
                Err(e) => panic!("unexpected: {e}"),
            }
        }
        assert_eq!(won, 1, "round {round}");
    }
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let url = url.clone();
            tokio::spawn(
                async move { run(&url, &["register", &format!("p{i}"), "grand-prize"]).await },
            )
        })
        .collect();
    let mut won = 0;
    for racer in racers {
        if racer.await.unwrap().status.success() {
            won += 1;
        }
    }
    assert_eq!(won, 1);

    server.stop().await;
}
