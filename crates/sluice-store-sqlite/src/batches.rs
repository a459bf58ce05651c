//! How a run's log is stored in the database: table `batches`, one row per run of consecutive
//! events (up to about [`ROW_BYTES`] of envelopes, at least one event), keyed by
//! `(run_id, last)`.
//!
//! A row per event cost SQLite a B-tree insert, a key comparison and a share of page splits for
//! every event, and repeated the run id in each; a stream of 200,000 small events spent more
//! than half the server's CPU there. A row per batch costs that once per batch: the envelopes
//! go in as one blob, compressed with LZ4 (envelopes repeat their keys and run id: a ticker's
//! log takes a ninth of its size), which also cuts what the WAL and its checkpoints copy. Reads
//! decode the rows they touch and skip what lies before their cursor.
//!
//! The events of a row, in seq order, are laid out as: for each, the type's length and the
//! envelope's length (each a little-endian `u32`), the type, the envelope. `data` is that
//! layout behind one byte saying how it is kept: [`PLAIN`] (as it is) or [`LZ4`] (its length
//! as a little-endian `u32`, then the layout as one LZ4 block), whichever is smaller. `first`
//! and `last` are the seqs of the row's first and last event; `closes` is 1 when the last is
//! the run's terminal event.

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use sluice_protocol::RawEvent;
use sluice_store::FastMap;

use crate::writer::{from_sql_int, to_sql_int};

/// A row closes once it holds about this many bytes of envelopes: large enough that SQLite's
/// per-row work is noise, small enough that a read from a cursor in its middle decodes little.
pub(crate) const ROW_BYTES: usize = 64 * 1024;

/// Splits `events` into the rows they are stored as.
pub(crate) fn rows(events: &[RawEvent]) -> impl Iterator<Item = &[RawEvent]> {
    let mut rest = events;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut n = 0;
        for e in rest {
            if n > 0 && bytes + e.json().len() > ROW_BYTES {
                break;
            }
            bytes += e.json().len();
            n += 1;
        }
        let (row, tail) = rest.split_at(n);
        rest = tail;
        Some(row)
    })
}

/// `data` kept as the layout itself.
pub(crate) const PLAIN: u8 = 0;
/// `data` kept as the layout's length and the layout in one LZ4 block.
pub(crate) const LZ4: u8 = 1;

/// LZ4 cannot expand data more than about 255 times: a damaged length beyond that is refused
/// before anything is allocated for it.
const LZ4_MAX_RATIO: usize = 255;

/// The `data` of a row holding `events`.
pub(crate) fn encode(events: &[RawEvent]) -> Vec<u8> {
    // The layout behind its kind byte: kept as it is unless LZ4 makes it smaller.
    let mut plain = vec![PLAIN];
    layout_into(events, &mut plain);
    let raw = &plain[1..];
    let mut packed = vec![0; 5 + lz4_flex::block::get_maximum_output_size(raw.len())];
    match lz4_flex::block::compress_into(raw, &mut packed[5..]) {
        Ok(n) if n + 4 < raw.len() => {
            packed[0] = LZ4;
            packed[1..5].copy_from_slice(&len32(raw.len()).to_le_bytes());
            packed.truncate(5 + n);
            packed
        }
        _ => plain,
    }
}

/// Appends the layout of `events` to `out`.
fn layout_into(events: &[RawEvent], out: &mut Vec<u8>) {
    // Type names are short: a close guess of the size, without reading them twice.
    out.reserve(events.iter().map(|e| 24 + e.json().len()).sum());
    for e in events {
        let event_type = e.event_type();
        out.extend_from_slice(&len32(event_type.len()).to_le_bytes());
        out.extend_from_slice(&len32(e.json().len()).to_le_bytes());
        out.extend_from_slice(event_type.as_bytes());
        out.extend_from_slice(e.json());
    }
}

/// The little-endian `u32` at `at`, if `data` holds one there.
fn u32_at(data: &[u8], at: usize) -> Option<usize> {
    let end = at.checked_add(4)?;
    let bytes = <[u8; 4]>::try_from(data.get(at..end)?).ok()?;
    usize::try_from(u32::from_le_bytes(bytes)).ok()
}

fn len32(n: usize) -> u32 {
    // An envelope is bounded far below 4 GiB by the server's event size limit.
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The events of a row whose first event is `first`; `Err` if `data` is not what [`encode`]
/// writes.
pub(crate) fn decode(first: u64, data: &Bytes) -> Result<Vec<RawEvent>, String> {
    match data.first() {
        Some(&PLAIN) => decode_layout(first, &data.slice(1..)),
        Some(&LZ4) => {
            let len = u32_at(data, 1).ok_or("a truncated compressed row")?;
            let packed = &data[5..];
            if len > packed.len().saturating_mul(LZ4_MAX_RATIO) + 16 {
                return Err(format!(
                    "a compressed row of {} bytes claims {len}",
                    packed.len()
                ));
            }
            let mut raw = vec![0; len];
            let n = lz4_flex::block::decompress_into(packed, &mut raw)
                .map_err(|e| format!("a compressed row that does not decompress: {e}"))?;
            if n != len {
                return Err(format!("a compressed row of {n} bytes, not {len}"));
            }
            decode_layout(first, &Bytes::from(raw))
        }
        Some(other) => Err(format!("a row kept in an unknown way ({other})")),
        None => Err("an empty row".into()),
    }
}

/// The events of the row `first..=last`, checked to be exactly those, the last terminal iff
/// `closes`.
pub(crate) fn decode_row(
    first: u64,
    last: u64,
    closes: bool,
    data: &Bytes,
) -> Result<Vec<RawEvent>, String> {
    let events = decode(first, data)?;
    let expected = last.checked_sub(first).map(|n| n + 1);
    if expected != Some(events.len() as u64) {
        return Err(format!(
            "the row {first}..={last} holds {} events",
            events.len()
        ));
    }
    if events.last().is_some_and(|e| e.is_terminal() != closes) {
        return Err(format!(
            "the row {first}..={last} says closes = {closes}, its last event says otherwise"
        ));
    }
    Ok(events)
}

fn decode_layout(first: u64, data: &Bytes) -> Result<Vec<RawEvent>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut seq = first;
    while at < data.len() {
        let truncated = || format!("a truncated row header at byte {at}");
        let type_len = u32_at(data, at).ok_or_else(truncated)?;
        let json_len = u32_at(data, at + 4).ok_or_else(truncated)?;
        let type_at = at + 8;
        let overrun = || format!("an event overruns its row at byte {at}");
        let json_at = type_at.checked_add(type_len).ok_or_else(overrun)?;
        let end = json_at.checked_add(json_len).ok_or_else(overrun)?;
        if end > data.len() {
            return Err(overrun());
        }
        let event_type = std::str::from_utf8(&data[type_at..json_at])
            .map_err(|_| format!("an event type that is not UTF-8 at byte {at}"))?;
        out.push(RawEvent::from_parts(
            seq,
            event_type,
            data.slice(json_at..end),
        ));
        seq += 1;
        at = end;
    }
    Ok(out)
}

/// Inserts `events` (consecutive, of one run) as rows.
pub(crate) fn insert(conn: &Connection, run_id: &str, events: &[RawEvent]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        // OR FAIL: the events are checked before, so a failure is an I/O-level one that fails
        // the whole group; SQLite then needs no statement journal to undo a statement halfway.
        "INSERT OR FAIL INTO batches (run_id, last, first, closes, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for row in rows(events) {
        let (Some(first), Some(last)) = (row.first(), row.last()) else {
            continue;
        };
        stmt.execute(params![
            run_id,
            to_sql_int(last.seq()),
            to_sql_int(first.seq()),
            i64::from(last.is_terminal()),
            encode(row),
        ])?;
    }
    Ok(())
}

/// Whether the run's stored log holds `seq`.
pub(crate) fn holds(conn: &Connection, run_id: &str, seq: u64) -> rusqlite::Result<bool> {
    let first: Option<i64> = conn
        .prepare_cached(
            "SELECT first FROM batches WHERE run_id = ?1 AND last >= ?2 ORDER BY last LIMIT 1",
        )?
        .query_row(params![run_id, to_sql_int(seq)], |r| r.get(0))
        .optional()?;
    Ok(first.is_some_and(|f| from_sql_int(f) <= seq))
}

/// The seq of the run's last stored event and whether it is terminal (`None`: nothing stored).
pub(crate) fn last(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<(u64, bool)>> {
    conn.prepare_cached(
        "SELECT last, closes FROM batches WHERE run_id = ?1 ORDER BY last DESC LIMIT 1",
    )?
    .query_row([run_id], |r| {
        Ok((from_sql_int(r.get(0)?), r.get::<_, i64>(1)? != 0))
    })
    .optional()
}

/// Gathers events that may or may not be stored yet (the journal's, replayed at open) into
/// rows of consecutive events per run, leaving out those the log holds already.
pub(crate) struct Replay<'c> {
    conn: &'c Connection,
    /// Per run, the consecutive events waiting to be inserted.
    open: FastMap<String, Vec<RawEvent>>,
    /// Events inserted.
    pub(crate) inserted: usize,
}

impl<'c> Replay<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Self {
            conn,
            open: FastMap::default(),
            inserted: 0,
        }
    }

    /// Adds one event of `run_id`; it is inserted unless the log holds it already, or it was
    /// added before (a record found twice).
    pub(crate) fn add(&mut self, run_id: &str, event: RawEvent) -> rusqlite::Result<()> {
        let gathered = self
            .open
            .get(run_id)
            .and_then(|events| Some((events.first()?.seq(), events.last()?.seq())));
        if gathered.is_some_and(|(first, last)| (first..=last).contains(&event.seq()))
            || holds(self.conn, run_id, event.seq())?
        {
            return Ok(());
        }
        if let Some(events) = self.open.get_mut(run_id) {
            if events.last().is_some_and(|l| l.seq() + 1 == event.seq()) {
                events.push(event);
                return Ok(());
            }
            let events = std::mem::replace(events, vec![event]);
            return self.flush(run_id, &events);
        }
        self.open.insert(run_id.to_owned(), vec![event]);
        Ok(())
    }

    fn flush(&mut self, run_id: &str, events: &[RawEvent]) -> rusqlite::Result<()> {
        insert(self.conn, run_id, events)?;
        self.inserted += events.len();
        Ok(())
    }

    /// Inserts what is still gathered; returns how many events were inserted in all.
    pub(crate) fn finish(mut self) -> rusqlite::Result<usize> {
        for (id, events) in std::mem::take(&mut self.open) {
            self.flush(&id, &events)?;
        }
        Ok(self.inserted)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sluice_protocol::{Timestamp, kind};

    use super::*;

    fn ev(seq: u64, event_type: &str, len: usize) -> RawEvent {
        RawEvent::encode(
            seq,
            "run_a",
            event_type,
            Timestamp::now(),
            None,
            &format!("{{\"x\":\"{}\"}}", "a".repeat(len)),
        )
    }

    #[test]
    fn rows_round_trip_and_stay_near_their_size() {
        let events: Vec<RawEvent> = (1..=2_000).map(|s| ev(s, "tick", 100)).collect();
        let split: Vec<&[RawEvent]> = rows(&events).collect();
        assert!(split.len() > 1);
        let mut seq = 1;
        for row in &split {
            let bytes: usize = row.iter().map(|e| e.json().len()).sum();
            assert!(bytes <= ROW_BYTES, "{bytes}");
            let back = decode(seq, &Bytes::from(encode(row))).unwrap();
            let mut raw = Vec::new();
            layout_into(row, &mut raw);
            assert_eq!(decode_layout(seq, &Bytes::from(raw)).unwrap(), back);
            assert_eq!(back, row.to_vec());
            seq += row.len() as u64;
        }
        assert_eq!(seq, 2_001);
        // An event larger than a row is a row of its own.
        let big = [
            ev(1, "tick", 10),
            ev(2, "big", ROW_BYTES * 2),
            ev(3, "tick", 10),
        ];
        let sizes: Vec<usize> = rows(&big).map(<[RawEvent]>::len).collect();
        assert_eq!(sizes, [1, 1, 1]);
        assert!(rows(&[]).next().is_none());
    }

    #[test]
    fn a_damaged_row_is_an_error_not_a_panic() {
        let one = [RawEvent::from_parts(
            1,
            kind::CHAIN_STARTED,
            Bytes::from_static(b"{}"),
        )];
        let many: Vec<RawEvent> = (1..=50).map(|s| ev(s, "tick", 40)).collect();
        let plain = Bytes::from(encode(&one));
        let packed = Bytes::from(encode(&many));
        assert_eq!(
            (plain[0], packed[0]),
            (PLAIN, LZ4),
            "what LZ4 cannot shrink stays plain"
        );
        assert_eq!(decode(1, &plain).unwrap(), one);
        let mut raw = Vec::new();
        layout_into(&many, &mut raw);
        assert!(packed.len() * 4 < raw.len(), "{} bytes", packed.len());
        assert_eq!(decode(1, &packed).unwrap(), many);
        for (data, n) in [(&plain, 1), (&packed, many.len())] {
            for cut in 0..data.len() {
                // Either fewer events (cut at an event's end) or an error; never a panic.
                if let Ok(events) = decode(1, &data.slice(..cut)) {
                    assert!(events.len() < n);
                }
            }
            for at in 0..data.len() {
                let mut bad = data.to_vec();
                bad[at] ^= 0x5a;
                // Whatever a flipped byte does, decoding returns.
                let _ = decode(1, &Bytes::from(bad));
            }
        }
        let mut bad = plain.to_vec();
        bad[9] = 0xff; // inside the type
        assert!(decode(1, &Bytes::from(bad)).is_err());
        // A compressed row claiming a huge length is refused before anything is allocated.
        let mut huge = packed.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode(1, &Bytes::from(huge))
                .unwrap_err()
                .contains("claims")
        );
        assert!(decode(1, &Bytes::from_static(&[7, 0])).is_err());
    }

    #[test]
    fn a_replay_adds_only_what_the_log_lacks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::schema::open_writer(&dir.path().join("s.db"), crate::Synchronous::Normal)
            .unwrap();
        let all: Vec<RawEvent> = (1..=8).map(|s| ev(s, "tick", 3)).collect();
        // Stored: 1–3, and 7 alone (as a terminal event inserted before its pending events).
        insert(&conn, "run_a", &all[..3]).unwrap();
        insert(&conn, "run_a", &all[6..7]).unwrap();
        let mut replay = Replay::new(&conn);
        for e in &all[..7] {
            replay.add("run_a", e.clone()).unwrap();
            // A record found twice (gathered, not inserted yet) is added once.
            replay.add("run_a", e.clone()).unwrap();
        }
        // A second run, interleaved, and one event of run_a past a gap.
        replay.add("run_b", ev(1, "tick", 3)).unwrap();
        replay.add("run_a", all[7].clone()).unwrap();
        assert_eq!(replay.finish().unwrap(), 3 + 1 + 1);
        let seqs = |run: &str| -> Vec<(i64, i64)> {
            conn.prepare("SELECT first, last FROM batches WHERE run_id = ?1 ORDER BY last")
                .unwrap()
                .query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        };
        assert_eq!(seqs("run_a"), [(1, 3), (4, 6), (7, 7), (8, 8)]);
        assert_eq!(seqs("run_b"), [(1, 1)]);
        let back = crate::reader::read_events(&conn, "run_a", 0, 100).unwrap();
        assert_eq!(back, all);
        assert!(holds(&conn, "run_a", 5).unwrap());
        assert!(!holds(&conn, "run_a", 9).unwrap());
        assert_eq!(last(&conn, "run_a").unwrap(), Some((8, false)));
        assert_eq!(last(&conn, "run_c").unwrap(), None);
    }

    /// A row that decodes but does not hold what its key says (cut at an event's end, its
    /// range or its terminal flag wrong) is an error for a read, not a short answer or a gap.
    #[test]
    fn a_row_that_does_not_match_its_key_fails_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::schema::open_writer(&dir.path().join("s.db"), crate::Synchronous::Normal)
            .unwrap();
        let mut all: Vec<RawEvent> = (1..=9).map(|s| ev(s, "tick", 3)).collect();
        all.push(ev(10, kind::CHAIN_COMPLETED, 3));
        insert(&conn, "run_a", &all).unwrap();
        let row = Bytes::from(encode(&all));
        assert_eq!(decode_row(1, 10, true, &row).unwrap(), all);
        assert!(
            decode_row(1, 11, true, &row)
                .unwrap_err()
                .contains("holds 10 events")
        );
        assert!(decode_row(2, 10, true, &row).is_err());
        assert!(
            decode_row(1, 10, false, &row)
                .unwrap_err()
                .contains("closes")
        );
        let read = |conn: &Connection| crate::reader::read_events(conn, "run_a", 0, 100);
        assert_eq!(read(&conn).unwrap(), all);
        for damage in [
            "UPDATE batches SET last = 11",
            "UPDATE batches SET closes = 0",
            "UPDATE batches SET data = x''",
        ] {
            conn.execute_batch(&format!("SAVEPOINT d; {damage};"))
                .unwrap();
            let e = read(&conn).unwrap_err().to_string();
            assert!(e.contains("damaged row"), "{damage}: {e}");
            conn.execute_batch("ROLLBACK TO d; RELEASE d;").unwrap();
        }
        // Cut at an event's end: the row decodes to fewer events than it claims.
        let mut plain = vec![PLAIN];
        layout_into(&all[..5], &mut plain);
        conn.execute("UPDATE batches SET data = ?1", [plain])
            .unwrap();
        assert!(
            read(&conn)
                .unwrap_err()
                .to_string()
                .contains("holds 5 events")
        );
    }
}
