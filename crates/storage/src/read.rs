//! Reads: by stream, category, query and over the global log, through a [`View`]. The same
//! functions serve the writer's DCB condition check and readers.

use skald_core::{Direction, Error, Query, QueryItem, RecordedEvent};

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
    while position < view.end && kept < limit {
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
            if out.len() >= limit {
                break;
            }
            let (_, addr) = entry?;
            let event = decode_at(reader, addr)?;
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
        for (_, addr) in addresses.into_iter().take(limit) {
            out.push(decode_at(reader, addr)?);
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
    let mut out = Vec::new();
    for item in &query.items {
        let mut found = Vec::new();
        scan_item(view, reader, item, from, limit, &mut found)?;
        out.append(&mut found);
    }
    out.sort_unstable_by_key(|e| e.position);
    out.dedup_by_key(|e| e.position);
    out.truncate(limit);
    Ok(out)
}

/// The position of the first event matching `query` from `from`: the DCB condition check.
pub fn first_match(
    view: &View,
    reader: &mut RecordReader,
    query: &Query,
    from: u64,
) -> Result<Option<u64>, Error> {
    let found = scan_query(view, reader, query, from, 1)?;
    Ok(found.first().map(|e| e.position.0))
}

/// The events of a category from position `from`.
pub fn scan_category(
    view: &View,
    reader: &mut RecordReader,
    category: &str,
    from: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::new();
    for entry in view.postings(Kind::Category, category, from)?.take(limit) {
        let (_, addr) = entry?;
        out.push(decode_at(reader, addr)?);
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
    decode_stream(reader, &entries, view.end)
}

/// The events at a stream's index entries `(revision, address)`, leaving out any at or past
/// `end`: the redb snapshot may hold an event flushed a moment after the head was read.
pub fn decode_stream(
    reader: &mut RecordReader,
    entries: &[(u64, Address)],
    end: u64,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::with_capacity(entries.len());
    for &(_, addr) in entries {
        let event = decode_at(reader, addr)?;
        if event.position.0 < end {
            out.push(event);
        }
    }
    Ok(out)
}
