//! Reads: by stream, category, query and over the global log. The same functions serve the
//! writer's DCB condition check (over its write transaction) and readers (over a snapshot).

use redb::ReadableTable;
use skald_core::{Error, Query, QueryItem, RecordedEvent};

use crate::codec;
use crate::index;
use crate::redb_error;
use crate::segments::{Address, RecordReader};

/// A `(name, position) -> address` index table.
pub trait PositionIndex: ReadableTable<(&'static str, u64), u64> {}
impl<T: ReadableTable<(&'static str, u64), u64>> PositionIndex for T {}

/// The tables a query scan uses, from a read or a write transaction.
pub struct Indexes<'a, T, Y, S> {
    pub tags: &'a T,
    pub types: &'a Y,
    pub sparse: &'a S,
}

/// Decodes the record at `addr`, turning a malformed body into a corruption error.
pub fn decode_at(reader: &mut RecordReader, addr: Address) -> Result<RecordedEvent, Error> {
    let body = reader.body_at(addr)?;
    codec::decode_body(body)
        .map(|d| d.event)
        .map_err(|reason| Error::Corruption {
            file: format!("segment {}", addr.ordinal()),
            offset: addr.offset(),
            reason,
        })
}

/// Addresses from a `(name, position)` index for `name`, positions in `from..end`, in order.
fn index_range<'a>(
    table: &'a impl PositionIndex,
    name: &'a str,
    from: u64,
    end: u64,
) -> Result<impl Iterator<Item = Result<(u64, Address), Error>> + 'a, Error> {
    let range = table.range((name, from)..(name, end)).map_err(redb_error)?;
    Ok(range.map(|entry| {
        let (k, v) = entry.map_err(redb_error)?;
        Ok((k.value().1, Address(v.value())))
    }))
}

/// Scans the global log for positions `from..end`, keeping the events `keep` accepts, until
/// `limit` are kept.
pub fn scan_global(
    sparse: &impl ReadableTable<u64, u64>,
    reader: &mut RecordReader,
    from: u64,
    end: u64,
    limit: usize,
    mut keep: impl FnMut(&RecordedEvent) -> bool,
    out: &mut Vec<RecordedEvent>,
) -> Result<(), Error> {
    if from >= end || limit == 0 {
        return Ok(());
    }
    let Some((mut position, mut addr)) = index::scan_start(sparse, from).map_err(redb_error)?
    else {
        return Err(Error::Corruption {
            file: "index".to_owned(),
            offset: 0,
            reason: format!("no sparse index entry at or before position {from}"),
        });
    };
    let mut kept = 0;
    while position < end && kept < limit {
        let body = reader.body_at(addr)?;
        let body_len = body.len();
        let found = codec::body_position(body);
        if found != position {
            return Err(Error::Corruption {
                file: format!("segment {}", addr.ordinal()),
                offset: addr.offset(),
                reason: format!("record has position {found}, expected {position}"),
            });
        }
        if position >= from {
            let event = decode_at(reader, addr)?;
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

/// The first `limit` events matching one query item in `from..end`, in position order.
fn scan_item<T: PositionIndex, Y: PositionIndex, S: ReadableTable<u64, u64>>(
    ix: &Indexes<'_, T, Y, S>,
    reader: &mut RecordReader,
    item: &QueryItem,
    (from, end): (u64, u64),
    limit: usize,
    out: &mut Vec<RecordedEvent>,
) -> Result<(), Error> {
    let (tags, types, sparse) = (ix.tags, ix.types, ix.sparse);
    if let Some(tag) = item.tags.first() {
        // The tag index narrows the candidates; the record decides the rest of the item.
        for entry in index_range(tags, tag.as_str(), from, end)? {
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
            for entry in index_range(types, event_type.as_str(), from, end)?.take(limit) {
                addresses.push(entry?);
            }
        }
        addresses.sort_unstable();
        addresses.dedup();
        for (_, addr) in addresses.into_iter().take(limit) {
            out.push(decode_at(reader, addr)?);
        }
    } else {
        scan_global(sparse, reader, from, end, limit, |_| true, out)?;
    }
    Ok(())
}

/// The first `limit` events matching `query` in `from..end`, in position order.
pub fn scan_query<T: PositionIndex, Y: PositionIndex, S: ReadableTable<u64, u64>>(
    ix: &Indexes<'_, T, Y, S>,
    reader: &mut RecordReader,
    query: &Query,
    (from, end): (u64, u64),
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::new();
    for item in &query.items {
        let mut found = Vec::new();
        scan_item(ix, reader, item, (from, end), limit, &mut found)?;
        out.append(&mut found);
    }
    out.sort_unstable_by_key(|e| e.position);
    out.dedup_by_key(|e| e.position);
    out.truncate(limit);
    Ok(out)
}

/// The position of the first event matching `query` in `from..end`: the DCB condition check.
pub fn first_match<T: PositionIndex, Y: PositionIndex, S: ReadableTable<u64, u64>>(
    ix: &Indexes<'_, T, Y, S>,
    reader: &mut RecordReader,
    query: &Query,
    from: u64,
    end: u64,
) -> Result<Option<u64>, Error> {
    let found = scan_query(ix, reader, query, (from, end), 1)?;
    Ok(found.first().map(|e| e.position.0))
}

/// Scans a `(name, position)` index (categories) for `name` in `from..end`.
pub fn scan_index(
    table: &impl PositionIndex,
    reader: &mut RecordReader,
    name: &str,
    from: u64,
    end: u64,
    limit: usize,
) -> Result<Vec<RecordedEvent>, Error> {
    let mut out = Vec::new();
    for entry in index_range(table, name, from, end)?.take(limit) {
        let (_, addr) = entry?;
        out.push(decode_at(reader, addr)?);
    }
    Ok(out)
}
