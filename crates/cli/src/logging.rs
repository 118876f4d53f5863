//! The server's logs: `tracing` events as JSON lines when stderr is not a terminal (or
//! `SKALD_LOG_FORMAT=json`), readable text on a terminal (or `SKALD_LOG_FORMAT=text`), at the
//! levels `SKALD_LOG` (or `RUST_LOG`) asks for: `info` by default, or directives such as
//! `warn,skald_server=debug`.

use std::io::IsTerminal;

use anyhow::{Context, bail};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub fn init() -> anyhow::Result<()> {
    let (variable, directives) = match (std::env::var("SKALD_LOG"), std::env::var("RUST_LOG")) {
        (Ok(v), _) => ("SKALD_LOG", v),
        (Err(_), Ok(v)) => ("RUST_LOG", v),
        _ => ("SKALD_LOG", "info".to_owned()),
    };
    let not_a_filter = || {
        format!(
            "{variable}={directives:?} is not a log filter; give a level (off, error, warn, \
             info, debug, trace) or directives such as warn,skald_server=debug"
        )
    };
    // `Targets` takes a bare word as a target to trace, so a misspelt level would switch
    // logging off for everything else; each directive's level is checked here first.
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for directive in directives.split(',').filter(|d| !d.trim().is_empty()) {
        let level = directive
            .rsplit_once('=')
            .map_or(directive, |(_, level)| level);
        if !LEVELS.contains(&level.trim().to_ascii_lowercase().as_str()) {
            bail!("{}", not_a_filter());
        }
    }
    let filter: Targets = directives.parse().with_context(not_a_filter)?;
    let json = match std::env::var("SKALD_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        Ok(other) => bail!("SKALD_LOG_FORMAT={other:?}: use json or text"),
        Err(_) => !std::io::stderr().is_terminal(),
    };
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init()
    }
    .context("the logger was already set")
}
