//! `skald`: the event store server, its command-line client and its benchmark.

mod admin;
mod bench;
mod bench_saga;
mod bench_subscribe;
mod client;
mod commands;
mod config;
mod coordinator;
mod logging;
mod migrate;
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
        /// Listen beyond loopback even with authentication off (a trusted network only).
        #[arg(long, env = "SKALD_INSECURE")]
        insecure: bool,
        /// Keep the events in PostgreSQL: postgres://user@host:port/database (docs/postgres.md).
        /// Any number of nodes may serve one database.
        #[arg(long, env = "SKALD_STORE")]
        store: Option<String>,
        /// With a PostgreSQL store: the URL other nodes reach this one at, such as
        /// http://10.0.0.5:7340 (the config's [cluster] advertise).
        #[arg(long, env = "SKALD_ADVERTISE")]
        advertise: Option<String>,
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
    /// Manage API keys: create (the key is shown once), list, revoke.
    Keys {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: admin::KeysCommand,
    },
    /// Show or replace the access rules.
    Rules {
        #[command(flatten)]
        server: ServerArg,
        #[command(subcommand)]
        command: admin::RulesCommand,
    },
    /// Certificates: `skald certs dev` writes a development CA and certificates.
    Certs {
        #[command(subcommand)]
        command: admin::CertsCommand,
    },
    /// Show the server's version, head position, durability and size.
    Info {
        #[command(flatten)]
        server: ServerArg,
    },
    /// Measure throughput and latency against a server or an embedded store.
    Bench(bench::BenchArgs),
    /// Copy an embedded store into PostgreSQL, positions and all; resumable, and verified.
    Migrate(migrate::MigrateArgs),
}

#[derive(clap::Args)]
struct ServerArg {
    /// The server's URL (http:// or https://).
    #[arg(
        long = "server",
        global = true,
        env = "SKALD_SERVER",
        default_value = "http://127.0.0.1:7340"
    )]
    url: String,
    /// An API key or a JWT, sent as `Authorization: Bearer`. Prefer the variable, which
    /// stays out of the shell history and the process list.
    #[arg(long, global = true, env = "SKALD_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the API key or JWT (such as the initial-admin-key file).
    #[arg(long, global = true, env = "SKALD_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// PEM CA certificates to trust for https:// instead of the system's.
    #[arg(long, global = true, env = "SKALD_CA_CERT")]
    ca_cert: Option<PathBuf>,
    /// A client certificate (PEM) for mTLS, with --client-key.
    #[arg(long, global = true, env = "SKALD_CLIENT_CERT")]
    client_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, global = true, env = "SKALD_CLIENT_KEY")]
    client_key: Option<PathBuf>,
    /// Seconds a request may take to connect, shake hands and be answered (a follow that is
    /// already streaming may stay idle for longer).
    #[arg(long, global = true, env = "SKALD_TIMEOUT", default_value_t = 30.0, value_parser = parse_timeout)]
    timeout: f64,
}

fn parse_timeout(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(s) if s > 0.0 && s <= 86_400.0 => Ok(s),
        _ => Err(format!(
            "{text:?} is not a number of seconds between 0 and 86400"
        )),
    }
}

impl ServerArg {
    fn client(&self) -> anyhow::Result<client::HttpClient> {
        let token = match (&self.token, &self.token_file) {
            (Some(_), Some(_)) => anyhow::bail!("give --token or --token-file, not both"),
            (Some(t), None) => Some(t.trim().to_owned()),
            (None, Some(file)) => Some(
                std::fs::read_to_string(file)
                    .map_err(|e| anyhow::anyhow!("cannot read token file {}: {e}", file.display()))?
                    .trim()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            _ => anyhow::bail!("--client-cert and --client-key go together"),
        };
        client::HttpClient::with_settings(
            &self.url,
            client::ClientSettings {
                token,
                ca_cert: self.ca_cert.clone(),
                identity,
                timeout: Some(std::time::Duration::from_secs_f64(self.timeout)),
            },
        )
    }
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
            insecure,
            store,
            advertise,
        } => {
            let mut file = match &config {
                Some(path) => config::FileConfig::load(path)?,
                None => config::FileConfig::default(),
            };
            if advertise.is_some() {
                file.cluster.advertise = advertise;
            }
            let merged = config::merge(
                file,
                data_dir,
                listen,
                durability.map(Durability::from),
                insecure,
                store,
            )?;
            logging::init()?;
            serve::run(merged).await
        }
        Command::Append { server, args } => commands::append(&server.client()?, args).await,
        Command::Read { server, args } => commands::read(&server.client()?, args).await,
        Command::Tail { server, args } => tail::run(&server.client()?, args).await,
        Command::Subscription { server, command } => {
            subscription::run(&server.client()?, command).await
        }
        Command::Saga { server, command } => saga::run(&server.client()?, command).await,
        Command::Info { server } => commands::info(&server.client()?).await,
        Command::Keys { server, command } => admin::keys(&server.client()?, command).await,
        Command::Rules { server, command } => admin::rules(&server.client()?, command).await,
        Command::Certs { command } => admin::certs(command),
        Command::Bench(args) => bench::run(args).await,
        Command::Migrate(args) => migrate::run(args).await,
    }
}
