//! `unique-usernames`: sign users up and rename them, with every username held by one user.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use skald_client::Client;

#[derive(Parser)]
#[command(about = "Unique usernames on Skald with a DCB decision instead of an aggregate")]
struct Cli {
    /// The Skald server.
    #[arg(long, env = "SKALD_SERVER", default_value = "http://127.0.0.1:7340")]
    server: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Registers user USER under USERNAME.
    Register { user: String, username: String },
    /// Gives user USER the name USERNAME, freeing the old one.
    Rename { user: String, username: String },
    /// Prints who holds USERNAME.
    Whois { username: String },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::connect(&cli.server)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach Skald at {}: {e}", cli.server))?;
    match cli.command {
        Command::Register { user, username } => {
            let appended = unique_usernames::register(&client, &user, &username).await?;
            println!(
                "user {user} is {username} (position {})",
                appended.last_position.0
            );
        }
        Command::Rename { user, username } => {
            let appended = unique_usernames::rename(&client, &user, &username).await?;
            println!(
                "user {user} is now {username} (position {})",
                appended.last_position.0
            );
        }
        Command::Whois { username } => match unique_usernames::holder(&client, &username).await? {
            Some(user) => println!("{username} is user {user}"),
            None => println!("{username} is free"),
        },
    }
    Ok(())
}
