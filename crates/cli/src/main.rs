//! `skald`: the event store server, its command-line client and its benchmark.

mod bench;
mod bench_saga;
mod bench_subscribe;
mod client;
mod commands;
mod config;
mod logging;
mod saga;
mod serve;
mod subscription;
mod tail;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Reads decode several strings per event, freed on other threads than the ones that
/// allocated them; glibc's allocator spent over 40% of a catch-up read there (measured with
/// perf), mimalloc a fraction of that.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use skald_core::Durability;

#[derive(Parser)]
#[command(name = "skald", version = skald_server::VERSION, about = "Skald: event store, real-time hub and saga engine in one binary")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server on the embedded store.
    Serve {
        /// Where the data lives [default: ./skald-data]
        #[arg(long, env = "SKALD_DATA_DIR")]
        data_dir: Option<PathBuf>,
        /// Address to listen on [default: 127.0.0.1:7340]
        #[arg(long, env = "SKALD_LISTEN")]
        listen: Option<String>,
        /// fsync (the default) or none (tests and benchmarks only: a crash loses acknowledged appends)
        #[arg(long, env = "SKALD_DURABILITY", value_enum)]
        durability: Option<bench::DurabilityArg>,
        /// A TOML file with any of the settings; flags and SKALD_* variables override it.
        #[arg(long, env = "SKALD_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Append one event (or a whole append body) to a stream on a running server.
    Append {
        #[command(flatten)]
        server: ServerArg,
        #[command(flatten)]
        args: commands::AppendArgs,
    },
    /// Read events as JSON lines: a stream, a category, or the global log.
    Read {
        #[command(flatten)]
        server: ServerArg,
        #[command(flatten)]
        args: commands::ReadArgs,
    },
    /// Follow events live: the global log, a stream or a category, filtered by type and tag.
    Tail {
        #[command(flatten)]
        server: ServerArg,
        #[command(flatten)]
        args: tail::TailArgs,
    },
    /// Manage persistent subscriptions (consumer groups): create, list, info, replay-parked,
    /// delete.
    Subscription {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: subscription::SubscriptionCommand,
    },
    /// Manage sagas: register, list, show definitions; list instances, show their history,
    /// retry stuck ones, cancel running ones.
    Saga {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: saga::SagaCommand,
    },
    /// Show the server's version, head position, durability and size.
    Info {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Measure throughput and latency against a server or an embedded store.
    Bench(bench::BenchArgs),
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's URL.
    #[arg(
        long = "server",
        global = true,
        env = "SKALD_SERVER",
        default_value = "http://127.0.0.1:7340"
    )]
    url: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("skald: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skald: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            data_dir,
            listen,
            durability,
            config,
        } => {
            let file = match &config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            let merged = config::merge(file, data_dir, listen, durability.map(Durability::from))?;
            logging::init()?;
            serve::run(merged).await
        }
        Command::Append { server, args } => {
            commands::append(&client::HttpClient::new(&server.url)?, args).await
        }
        Command::Read { server, args } => {
            commands::read(&client::HttpClient::new(&server.url)?, args).await
        }
        Command::Tail { server, args } => {
            tail::run(&client::HttpClient::new(&server.url)?, args).await
        }
        Command::Subscription { server, command } => {
            subscription::run(&client::HttpClient::new(&server.url)?, command).await
        }
        Command::Saga { server, command } => {
            saga::run(&client::HttpClient::new(&server.url)?, command).await
        }
        Command::Info { server } => commands::info(&client::HttpClient::new(&server.url)?).await,
        Command::Bench(args) => bench::run(args).await,
    }
}
