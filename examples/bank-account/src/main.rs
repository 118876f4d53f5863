//! `bank-account`: open accounts, move money, project balances into SQLite and query them.

use std::path::PathBuf;
use std::process::ExitCode;

use bank_account::{Account, AccountCommand, Balances};
use clap::{Parser, Subcommand};
use skald_client::Client;
use skald_client::aggregate::{CommandError, CommandKey, Repository};
use skald_client::projection::Projector;

#[derive(Parser)]
#[command(about = "A bank account on Skald: commands, a SQLite projection, a balance query")]
struct Cli {
    /// The Skald server.
    #[arg(long, env = "SKALD_SERVER", default_value = "http://127.0.0.1:7340")]
    server: String,
    /// The SQLite file of the balances read model.
    #[arg(long, default_value = "balances.sqlite")]
    db: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Opens account ID for OWNER.
    Open { id: String, owner: String },
    /// Puts AMOUNT into account ID.
    Deposit {
        id: String,
        amount: u64,
        /// The movement's own reference (a payment id): run again with the same key after a
        /// lost answer and it is applied once. Without one, every run is a new deposit.
        #[arg(long)]
        key: Option<String>,
    },
    /// Takes AMOUNT out of account ID, if the balance covers it.
    Withdraw {
        id: String,
        amount: u64,
        /// As for `deposit`: the same key is applied once.
        #[arg(long)]
        key: Option<String>,
    },
    /// Applies account events to the read model: what is stored, then live until Ctrl-C.
    Project {
        /// Stop once caught up instead of following live events.
        #[arg(long)]
        once: bool,
        /// Events per SQLite transaction.
        #[arg(long, default_value_t = 256)]
        batch: usize,
    },
    /// Empties the read model and projects every account event again.
    Rebuild,
    /// Prints account ID's balance as the read model has it.
    Balance { id: String },
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
    let command = match cli.command {
        Command::Open { id, owner } => (id, AccountCommand::Open { owner }, None),
        Command::Deposit { id, amount, key } => (id, AccountCommand::Deposit { amount }, key),
        Command::Withdraw { id, amount, key } => (id, AccountCommand::Withdraw { amount }, key),
        Command::Balance { id } => {
            let balances = Balances::open(&cli.db)?;
            match balances.balance(&id)? {
                Some(b) => println!(
                    "account {id} ({}): balance {}, {} movements",
                    b.owner, b.balance, b.movements
                ),
                None => anyhow::bail!(
                    "account {id} is not in the read model {}: open it, or run `project`",
                    cli.db.display()
                ),
            }
            return Ok(());
        }
        Command::Project { once, batch } => {
            let client = connect(&cli.server).await?;
            let mut projector = Projector::new(client, Balances::open(&cli.db)?).batch(batch);
            let checkpoint = if once {
                projector.catch_up().await?
            } else {
                eprintln!("projecting into {}; Ctrl-C stops", cli.db.display());
                projector
                    .run(async {
                        let _ = tokio::signal::ctrl_c().await;
                    })
                    .await?
            };
            print_checkpoint(checkpoint);
            return Ok(());
        }
        Command::Rebuild => {
            let client = connect(&cli.server).await?;
            let mut projector = Projector::new(client, Balances::open(&cli.db)?);
            print_checkpoint(projector.rebuild().await?);
            return Ok(());
        }
    };
    let (id, command, key) = command;
    let client = connect(&cli.server).await?;
    // A deposit decided on a stale balance is still right; a withdrawal is decided again on
    // the newer balance. Opening twice is refused either way.
    let repository = Repository::<_, Account>::new(&client).retry_on_conflict(3);
    let executed = match &key {
        // Scoped to the account, so that one reference may be used on two accounts.
        Some(key) => {
            let key = CommandKey::new(format!("bank/{id}/{key}"));
            repository.execute_keyed(&id, &command, &key).await
        }
        None => repository.execute(&id, &command).await,
    };
    match executed {
        Ok(Some(appended)) if appended.replayed => {
            println!("account {id}: already applied under this key");
            Ok(())
        }
        Ok(Some(appended)) => {
            println!(
                "account {id}: stored at revision {}",
                appended.last_revision.0
            );
            Ok(())
        }
        Ok(None) if key.is_some() => {
            println!("account {id}: already applied under this key");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(CommandError::Rejected(reason)) => anyhow::bail!("account {id}: {reason}"),
        Err(e) => Err(e.into()),
    }
}

async fn connect(server: &str) -> anyhow::Result<Client> {
    Client::connect(server)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach Skald at {server}: {e}"))
}

fn print_checkpoint(checkpoint: Option<skald_client::skald_core::Position>) {
    match checkpoint {
        Some(p) => println!("projected up to position {}", p.0),
        None => println!("no account events yet"),
    }
}
