//! Reads: by stream, category, query and over the global log, through a [`View`]. The same
//! functions serve the writer's DCB condition check and readers.

use skald_core::{
    Direction, Error, MAX_READ_PAGE_BYTES, Query, QueryItem, RecordedEvent, merge_query_items,
    page_bytes,
};

use crate::codec;
use crate::segments::{Address, RecordReader};
use crate::view::{Kind, View};

/// Decodes the record at `addr`, turning a malformed body into a corruption error.
pub fn decode_at(reader: &mut RecordReader, addr: Address) -> Result<RecordedEvent, Error> {
    let version = reader.version(addr.ordinal());
    let body = reader.body_at(addr)?;
    codec::decode_body(body, version)
        .map(|d| d.event)
        .map_err(|reason| Error::Corruption {
            file: format!("segment {}", addr.ordinal()),
            offset: addr.offset(),
            reason,
        })
}

/// The answer when a record is not what the index said it is: the index is damaged. Reads
/// refuse rather than serve another event (docs/storage.md, "Index damage").
pub fn index_disagrees(addr: Address, what: String) -> Error {
    Error::Corruption {
        file: crate::index::INDEX_FILE.to_owned(),
        offset: 0,
        reason: format!(
            "the index points at segment {} offset {} for {what}; the index is damaged and the \
             next start rebuilds it from the segments",
            addr.ordinal(),
            addr.offset()
        ),
    }
}

/// Decodes the record at an address the index gave for `key`. A record that cannot be read
/// there (cut short, a batch end, a checksum that fails) is index damage too: the rebuild that
/// follows reads every segment, and reports damage in them as what it is.
pub fn decode_index_target(
    reader: &mut RecordReader,
    addr: Address,
    key: &str,
) -> Result<RecordedEvent, Error> {
    decode_at(reader, addr).map_err(|e| match e {
        Error::Corruption { reason, .. } => index_disagrees(
            addr,
            format!("{key}, where no event can be read ({reason})"),
        ),
        other => other,
    })
}

/// Whether `e` says the index is damaged.
pub fn is_index_damage(e: &Error) -> bool {
    matches!(e, Error::Corruption { file, .. } if file.ends_with(crate::index::INDEX_FILE))
}

/// Decodes the record the index places at `position`, checking it is that position and that
/// `belongs` accepts it (the index key it was found under).
fn decode_indexed(
    reader: &mut RecordReader,
    (position, addr): (u64, Address),
    key: &str,
    belongs: impl FnOnce(&RecordedEvent) -> bool,
) -> Result<RecordedEvent, Error> {
    let event = decode_index_target(reader, addr, key)?;
    if event.position.0 != position || !belongs(&event) {
        return Err(index_disagrees(
            addr,
            format!(
                "{key} at position {position}, but the record there is position {} of stream {} \
                 (type {})",
                event.position, event.stream, event.event_type
            ),
        ));
    }
    Ok(event)
}

/// Scans the global log for positions `from..view.end`, keeping the events `keep` accepts,
/// until `limit` are kept.
pub fn scan_global(
    view: &View,
    reader: &mut RecordReader,
    from: u64,
    limit: usize,
    mut keep: impl FnMut(&RecordedEvent) -> bool,
    out: &mut Vec<RecordedEvent>,
) -> Result<(), Error> {
    if from >= view.end || limit == 0 {
        return Ok(());
    }
    let Some((mut position, mut addr)) = view.scan_start(from)? else {
        return Err(Error::Corruption {
            file: "index".to_owned(),
            offset: 0,
            reason: format!("no sparse index entry at or before position {from}"),
        });
    };
    let mut kept = 0;
    let mut bytes = 0;
    while position < view.end && kept < limit && bytes < MAX_READ_PAGE_BYTES {
        let version = reader.version(addr.ordinal());
        let body = reader.body_at(addr)?;
        let body_len = body.len();
        let Some(found) = codec::body_position(body) else {
            // A batch end: it holds no event.
            addr = reader.next_address(addr, body_len);
            continue;
        };
        if found != position {
            return Err(Error::Corruption {
                file: format!("segment {}", addr.ordinal()),
                offset: addr.offset(),
                reason: format!("record has position {found}, expected {position}"),
            });
        }
        if position >= from {
            let event = codec::decode_body(body, version)
                .map(|d| d.event)
                .map_err(|reason| Error::Corruption {
                    file: format!("segment {}", addr.ordinal()),
                    offset: addr.offset(),
                    reason,
                })?;
            if keep(&event) {
                bytes += event.size();
                out.push(event);
                kept += 1;
            }
        }
        addr = reader.next_address(addr, body_len);
        position += 1;
    }
    Ok(())
}

/// The first `limit` events matching one query item from `from`, in position order.
fn scan_item(
    view: &View,
    reader: &mut RecordReader,
    item: &QueryItem,
    from: u64,
    limit: usize,
    out: &mut Vec<RecordedEvent>,
) -> Result<(), Error> {
    if let Some(tag) = item.tags.first() {
        // The tag index narrows the candidates; the record decides the rest of the item.
        for entry in view.postings(Kind::Tag, tag.as_str(), from)? {
            if out.len() >= limit || page_bytes(out) >= MAX_READ_PAGE_BYTES {
                break;
            }
            let key = format!("tag {tag}");
            let event = decode_indexed(reader, entry?, &key, |e| e.tags.contains(tag))?;
            if item.matches(&event.event_type, &event.tags) {
                out.push(event);
            }
        }
    } else if !item.types.is_empty() {
        let mut addresses = Vec::new();
        for event_type in &item.types {
            for entry in view
                .postings(Kind::Type, event_type.as_str(), from)?
                .take(limit)
            {
                addresses.push(entry?);
            }
        }
        addresses.sort_unstable();
        addresses.dedup();
        let mut bytes = 0;
        for entry in addresses.into_iter().take(limit) {
            let event = decode_indexed(reader, entry, "one of the query's types", |e| {
                item.types.contains(&e.event_type)
            })?;
            bytes += event.size();
            out.push(event);
            if bytes >= MAX_READ_PAGE_BYTES {
                break;
            }
        }
    } else {
        scan_global(view, reader, from, limit, |_| true, out)?;
    }
    Ok(())
}

/// The first `limit` events matching `query` from position `from`, in position order.
pub fn scan_query(
    view: &View,
    reader: &mut RecordReader,
    query: &Query,
    from: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut items = Vec::with_capacity(query.items.len());
    for item in &query.items {
        let mut found = Vec::new();
        scan_item(view, reader, item, from, limit, &mut found)?;
        items.push(found);
    }
    Ok(merge_query_items(items, limit))
}

/// The position of the first event of a user stream matching `query` from `from`: the DCB
/// condition check. Events of system streams (`$...`: keys, rules, audit, saga histories) never
/// decide a condition, so that one cannot learn of them that way. The inner `Err` refuses the
/// condition (it finds too many system events); the outer one is a failure to read.
pub fn first_match(
    view: &View,
    reader: &mut RecordReader,
    query: &Query,
    from: u64,
) -> Result<Result<Option<u64>, Error>, Error> {
    let mut from = from;
    let mut skipped = 0;
    loop {
        let found = scan_query(view, reader, query, from, 64)?;
        if let Some(event) = found.iter().find(|e| !e.stream.is_system()) {
            return Ok(Ok(Some(event.position.0)));
        }
        skipped += found.len();
        // The writer waits while a condition is checked: one that only finds system events
        // is refused before it can hold every append for long.
        if skipped > MAX_SYSTEM_EVENTS_SKIPPED {
            return Ok(Err(Error::invalid(format!(
                "the condition matches more than {MAX_SYSTEM_EVENTS_SKIPPED} events of system \
                 streams (which never decide a condition) before any other; narrow it with \
                 tags, other types or `after`"
            ))));
        }
        match found.last() {
            Some(last) => from = last.position.0 + 1,
            None => return Ok(Ok(None)),
        }
    }
}

/// Most events of system streams a condition check passes over.
const MAX_SYSTEM_EVENTS_SKIPPED: usize = 4096;

/// The events of a category from position `from`.
pub fn scan_category(
    view: &View,
    reader: &mut RecordReader,
    category: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::new();
    let key = format!("category {category}");
    let mut bytes = 0;
    for entry in view.postings(Kind::Category, category, from)?.take(limit) {
        let event = decode_indexed(reader, entry?, &key, |e| {
            e.stream.category().as_str() == category
        })?;
        bytes += event.size();
        out.push(event);
        if bytes >= MAX_READ_PAGE_BYTES {
            break;
        }
    }
    Ok(out)
}

/// Up to `limit` events of a stream from revision `from`, in the given direction.
pub fn scan_stream(
    view: &View,
    reader: &mut RecordReader,
    stream: &str,
    from: Option<u64>,
    direction: Direction,
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let entries = view.stream_events(stream, from, direction, limit)?;
    decode_stream(reader, stream, &entries, view.end)
}

/// The events at a stream's index entries `(revision, address)`, leaving out any at or past
/// `end`: the redb snapshot may hold an event flushed a moment after the head was read.
pub fn decode_stream(
    reader: &mut RecordReader,
    stream: &str,
    entries: &[(u64, Address)],
    end: u64,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::with_capacity(entries.len());
    let mut bytes = 0;
    for &(revision, addr) in entries {
        if bytes >= MAX_READ_PAGE_BYTES {
            break;
        }
        let key = format!("revision {revision} of stream {stream}");
        let event = decode_index_target(reader, addr, &key)?;
        if event.stream.as_str() != stream || event.revision.0 != revision {
            return Err(index_disagrees(
                addr,
                format!(
                    "revision {revision} of stream {stream}, but the record there is revision {} \
                     of stream {}",
                    event.revision, event.stream
                ),
            ));
        }
        if event.position.0 < end {
            bytes += event.size();
            out.push(event);
        }
    }
    Ok(out)
}
