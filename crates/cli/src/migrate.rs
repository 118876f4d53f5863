//! `skald migrate --store postgres://… --from-data-dir DIR`: copies an embedded store into
//! PostgreSQL with every position, revision, id, time, tag and metadata as they were
//! (docs/postgres.md, "Moving an embedded store in"). Resumable: what PostgreSQL already holds
//! must be a prefix of the embedded store, checked event by event, and the copy goes on after
//! it. Verified at the end by counts and a checksum of both stores read back.

use std::path::PathBuf;

use anyhow::{Context, bail};
use skald_core::{
    Direction, EventStore, MAX_READ_PAGE, ReadRequest, ReadSource, RecordedEvent, read_to_end,
};
use skald_postgres::{Importer, PgOptions, PgStore, PgUrl};

#[derive(clap::Args)]
pub struct MigrateArgs {
    /// The PostgreSQL store to copy into: postgres://user@host:port/database.
    #[arg(long, env = "SKALD_STORE")]
    pub store: String,
    /// The data directory of the embedded store to copy (stop its server first).
    #[arg(long)]
    pub from_data_dir: PathBuf,
    /// Events per transaction.
    #[arg(long, default_value_t = 2000)]
    pub page: usize,
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    if !(args.store.starts_with("postgres://") || args.store.starts_with("postgresql://")) {
        bail!("--store must be a postgres:// URL, such as postgres://skald@db.internal/skald");
    }
    if args.page == 0 || args.page > MAX_READ_PAGE {
        bail!("--page must be between 1 and {MAX_READ_PAGE}");
    }
    if !args.from_data_dir.is_dir() {
        bail!(
            "{} is not a directory: give the embedded store's data directory",
            args.from_data_dir.display()
        );
    }
    let url = PgUrl::parse(&args.store).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (source, _) = skald_storage::Store::open(skald_storage::Options {
        data_dir: args.from_data_dir.clone(),
        ..skald_storage::Options::default()
    })
    .with_context(|| {
        format!(
            "cannot open the embedded store in {} (is a server still running on it?)",
            args.from_data_dir.display()
        )
    })?;
    // The schema first, then the mark that keeps nodes from starting on a partial copy.
    let mut client = skald_postgres::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    skald_postgres::migrate(&mut client)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    drop(client);
    let importer = Importer::connect(&url)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    importer
        .begin(&args.from_data_dir.display().to_string())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut options = PgOptions::new(url.clone());
    options.importing = true;
    let target = PgStore::open(options)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = copy(&source, &target, importer, &url, args.page).await;
    source.shutdown().await;
    target.shutdown().await;
    if result.is_err() {
        eprintln!(
            "the copy is not finished; nodes refuse to start on it until `skald migrate` is run \
             again and finishes"
        );
    }
    result
}

async fn copy(
    source: &skald_storage::Store,
    target: &PgStore,
    mut importer: Importer,
    url: &PgUrl,
    page: usize,
) -> anyhow::Result<()> {
    let end = source.next_position().await?;
    let there = target.next_position().await?;
    if there > end {
        bail!(
            "the store in PostgreSQL at {url} holds {there} events, more than the {end} of the \
             embedded store: it is not an earlier copy of this one"
        );
    }
    // What is there must be this store's beginning, event for event.
    let mut from = 0;
    while from < there {
        let ours = read_page(source, from, page.min((there - from) as usize)).await?;
        if ours.is_empty() {
            bail!("the embedded store ended at position {from}, before its head {end}");
        }
        let theirs = read_page(target, from, ours.len()).await?;
        if let Some((a, b)) = ours.iter().zip(&theirs).find(|(a, b)| a != b) {
            bail!(
                "the store in PostgreSQL at {url} differs from the embedded one at position {}: \
                 event {} of stream {} there, event {} of stream {} here; it is not an earlier \
                 copy of this store (or a node wrote to an unfinished copy), so nothing was \
                 copied",
                a.position,
                b.id,
                b.stream,
                a.id,
                a.stream
            );
        }
        if theirs.len() != ours.len() {
            bail!("the store in PostgreSQL at {url} ended while being checked");
        }
        from += ours.len() as u64;
    }
    if there > 0 {
        println!("{there} events were already copied and are the same; going on from there");
    }
    let mut copied = 0;
    while from < end {
        let events = read_page(source, from, page).await?;
        if events.is_empty() {
            bail!("the embedded store ended at position {from}, before its head {end}");
        }
        importer
            .write(&events)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        from += events.len() as u64;
        copied += events.len() as u64;
        if copied % 100_000 < events.len() as u64 {
            println!("copied {from} of {end} events");
        }
    }
    println!("copied {copied} events; verifying both stores");
    let (ours, ours_count) = checksum(source).await?;
    let (theirs, theirs_count) = checksum(target).await?;
    if ours_count != theirs_count || ours != theirs {
        bail!(
            "verification failed: the embedded store has {ours_count} events (checksum \
             {ours:016x}), PostgreSQL {theirs_count} (checksum {theirs:016x})"
        );
    }
    importer
        .finish()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    println!(
        "verified: {ours_count} events in both, checksum {ours:016x}, and the stream, tag and \
         head rows they imply; serve it with skald serve --store {url}"
    );
    Ok(())
}

async fn read_page<S: EventStore>(
    store: &S,
    from: u64,
    limit: usize,
) -> anyhow::Result<Vec<RecordedEvent>> {
    Ok(store
        .read(ReadRequest {
            source: ReadSource::All(None),
            from: Some(from),
            direction: Direction::Forward,
            limit,
        })
        .await?
        .events)
}

/// FNV-1a (64 bits) over every event's position, id, stream, revision, type, content type,
/// data, metadata, tags, source and time, in log order, and the number of events.
async fn checksum<S: EventStore>(store: &S) -> anyhow::Result<(u64, u64)> {
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    let mut count = 0;
    read_to_end(store, ReadSource::All(None), |e| {
        count += 1;
        hash.u64(e.position.0);
        hash.bytes(e.id.0.as_bytes());
        hash.text(e.stream.as_str());
        hash.u64(e.revision.0);
        hash.text(e.event_type.as_str());
        hash.text(e.data.content_type());
        hash.bytes(e.data.bytes());
        hash.text(e.metadata.as_str());
        hash.u64(e.tags.len() as u64);
        for tag in &e.tags {
            hash.text(tag.as_str());
        }
        match &e.source {
            Some(source) => {
                hash.u64(1);
                hash.text(source);
            }
            None => hash.u64(0),
        }
        hash.u64(e.recorded_at.0 as u64);
    })
    .await?;
    Ok((hash.0, count))
}

struct Fnv(u64);

impl Fnv {
    fn bytes(&mut self, bytes: &[u8]) {
        self.u64(bytes.len() as u64);
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn text(&mut self, text: &str) {
        self.bytes(text.as_bytes());
    }

    fn u64(&mut self, value: u64) {
        for b in value.to_le_bytes() {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}
