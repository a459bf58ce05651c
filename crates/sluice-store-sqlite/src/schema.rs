//! The database schema, its migrations, and how connections are opened.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags};
use sluice_protocol::RawEvent;
use sluice_store::{Error, Result};

use crate::writer::from_sql_int;
use crate::{Synchronous, batches};

/// The migrations, in order: migration `i` takes the database from `PRAGMA user_version = i` to
/// `i + 1`. Append new ones; never edit a released one.
const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    "
    CREATE TABLE runs (
        id          TEXT PRIMARY KEY NOT NULL,
        workflow    TEXT NOT NULL,
        status      TEXT NOT NULL,
        session_id  TEXT,
        owner       TEXT,
        finished_at INTEGER,            -- microseconds since the Unix epoch
        inbox_next  INTEGER NOT NULL DEFAULT 1,
        record      TEXT NOT NULL       -- the RunRecord as JSON
    );
    CREATE INDEX runs_workflow ON runs (workflow, id);
    CREATE INDEX runs_status ON runs (status, id);
    CREATE INDEX runs_session ON runs (session_id, id) WHERE session_id IS NOT NULL;
    CREATE INDEX runs_owner ON runs (owner, id) WHERE owner IS NOT NULL;
    CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;

    CREATE TABLE events (
        run_id TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        type   TEXT NOT NULL,
        json   BLOB NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;

    CREATE TABLE checkpoints (
        run_id TEXT PRIMARY KEY NOT NULL,
        data   BLOB NOT NULL
    );

    CREATE TABLE inbox (
        run_id      TEXT NOT NULL,
        id          INTEGER NOT NULL,
        type        TEXT NOT NULL,
        data        TEXT NOT NULL,      -- JSON
        received_at INTEGER NOT NULL,   -- microseconds since the Unix epoch
        PRIMARY KEY (run_id, id)
    ) WITHOUT ROWID;

    CREATE TABLE sessions (
        id     TEXT PRIMARY KEY NOT NULL,
        record TEXT NOT NULL            -- the SessionRecord as JSON
    );
    ",
    // 2: the journal of small appends, rows in append order. No longer written (the journal is
    // in segment files now, see `journal_file.rs`); what an older build left is moved at open.
    "
    CREATE TABLE journal (
        pos    INTEGER PRIMARY KEY,
        run_id TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        type   TEXT NOT NULL,
        json   BLOB NOT NULL
    );
    ",
    // 3: the log in rows of consecutive events (`batches.rs`). `migrate` then moves what
    // `events` holds into it and drops `events`.
    "
    CREATE TABLE batches (
        run_id TEXT NOT NULL,
        last   INTEGER NOT NULL,
        first  INTEGER NOT NULL,
        closes INTEGER NOT NULL,
        data   BLOB NOT NULL,
        PRIMARY KEY (run_id, last)
    );
    ",
];

/// The migration after whose SQL `events` (a row per event) is rewritten as `batches`.
const BATCHES: u32 = 3;

/// The schema version this build writes (`PRAGMA user_version` after migrating).
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

/// How long a connection retries when the database is locked (another process, a checkpoint).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The WAL size (in pages) past which SQLite makes the writer checkpoint after each commit: a
/// safety net for when the checkpoint thread falls behind. Normally the WAL is reset long before
/// (see `checkpoint.rs`).
const WRITER_AUTOCHECKPOINT_PAGES: u32 = 65_536;

/// Statements each connection keeps prepared.
const STATEMENT_CACHE: usize = 64;

/// Opens the read-write connection, sets it up for the single writer, and migrates the schema.
pub(crate) fn open_writer(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::backend(format!("opening {}", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::backend("setting the busy timeout", e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(|e| Error::backend("switching to WAL", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Backend {
            message: format!("{} cannot use WAL (journal_mode is {mode})", path.display()),
            source: None,
        });
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {};
         PRAGMA cache_size = -16384;
         PRAGMA temp_store = MEMORY;
         PRAGMA wal_autocheckpoint = {};
         PRAGMA journal_size_limit = 268435456;",
        synchronous.pragma(),
        WRITER_AUTOCHECKPOINT_PAGES
    ))
    .map_err(|e| Error::backend("configuring the writer connection", e))?;
    migrate(&conn)?;
    replay_journal(&conn)?;
    crate::journal_file::replay(&conn, &crate::journal_file::dir_of(path))?;
    Ok(conn)
}

/// Moves whatever the `journal` table holds into the log (rows of runs that still exist and
/// are not there yet) and empties it. (Stores before the journal moved to segment files kept
/// it there; the writer no longer writes it.)
fn replay_journal(conn: &Connection) -> Result<()> {
    let what = "replaying the journal";
    let tx = conn
        .unchecked_transaction()
        .map_err(|e| Error::backend(what, e))?;
    let moved = (|| -> rusqlite::Result<usize> {
        let mut replay = batches::Replay::new(&tx);
        let mut stmt = tx.prepare(
            "SELECT run_id, seq, type, json FROM journal
             WHERE run_id IN (SELECT id FROM runs)
             ORDER BY run_id, seq",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let id = row.get_ref(0)?.as_str()?;
            let seq = from_sql_int(row.get(1)?);
            let event_type = row.get_ref(2)?.as_str()?;
            let json: Vec<u8> = row.get(3)?;
            replay.add(id, RawEvent::from_parts(seq, event_type, Bytes::from(json)))?;
        }
        replay.finish()
    })()
    .map_err(|e| Error::backend(what, e))?;
    tx.execute("DELETE FROM journal", [])
        .map_err(|e| Error::backend(what, e))?;
    tx.commit().map_err(|e| Error::backend(what, e))?;
    if moved > 0 {
        tracing::info!(events = moved, "moved journaled events into the log");
    }
    Ok(())
}

/// Opens one read-only connection (after the writer created and migrated the database).
pub(crate) fn open_reader(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::backend(format!("opening {} for reading", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::backend("setting the busy timeout", e))?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.execute_batch(
        "PRAGMA cache_size = -4096; PRAGMA temp_store = MEMORY; PRAGMA query_only = ON;",
    )
    .map_err(|e| Error::backend("configuring a reader connection", e))?;
    Ok(conn)
}

/// Opens the checkpoint thread's connection: read-write (a checkpoint writes the database file)
/// with the writer's `synchronous`, which decides whether the checkpoint fsyncs.
pub(crate) fn open_checkpointer(path: &Path, synchronous: Synchronous) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX
        | OpenFlags::SQLITE_OPEN_URI;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| Error::backend(format!("opening {} to checkpoint", path.display()), e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| Error::backend("setting the busy timeout", e))?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA wal_autocheckpoint = 0;",
        synchronous.pragma()
    ))
    .map_err(|e| Error::backend("configuring the checkpoint connection", e))?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`], one transaction per migration.
fn migrate(conn: &Connection) -> Result<()> {
    let current: u32 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|e| Error::backend("reading the schema version", e))?;
    if current > SCHEMA_VERSION {
        return Err(Error::Backend {
            message: format!(
                "the database has schema version {current}, newer than this build's {SCHEMA_VERSION}"
            ),
            source: None,
        });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(current as usize) {
        let what = || format!("migrating the schema to version {version}");
        let tx = conn
            .unchecked_transaction()
            .map_err(|e| Error::backend(what(), e))?;
        tx.execute_batch(sql)
            .map_err(|e| Error::backend(what(), e))?;
        if version == BATCHES {
            events_to_batches(&tx).map_err(|e| Error::backend(what(), e))?;
        }
        tx.pragma_update(None, "user_version", version)
            .map_err(|e| Error::backend(what(), e))?;
        tx.commit().map_err(|e| Error::backend(what(), e))?;
    }
    Ok(())
}

/// Rewrites the rows of `events` (one per event) as rows of `batches`, and drops `events`.
fn events_to_batches(conn: &Connection) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare("SELECT run_id, seq, type, json FROM events ORDER BY run_id, seq")?;
    let mut rows = stmt.query([])?;
    let mut run = String::new();
    let mut pending: Vec<RawEvent> = Vec::new();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let id = row.get_ref(0)?.as_str()?;
        let seq = from_sql_int(row.get(1)?);
        let event_type = row.get_ref(2)?.as_str()?;
        let json: Vec<u8> = row.get(3)?;
        let follows = id == run && pending.last().is_some_and(|l| l.seq() + 1 == seq);
        if !follows || bytes + json.len() > batches::ROW_BYTES {
            batches::insert(conn, &run, &pending)?;
            pending.clear();
            bytes = 0;
            id.clone_into(&mut run);
        }
        bytes += json.len();
        pending.push(RawEvent::from_parts(seq, event_type, Bytes::from(json)));
    }
    batches::insert(conn, &run, &pending)?;
    drop(rows);
    drop(stmt);
    conn.execute_batch("DROP TABLE events")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer_schemas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = open_writer(&path, Synchronous::Normal).unwrap();
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        drop(conn);
        // Reopening does not re-run migration 1 (it would fail on the existing tables).
        let conn = open_writer(&path, Synchronous::Normal).unwrap();
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            open_writer(&path, Synchronous::Normal),
            Err(Error::Backend { .. })
        ));
    }

    /// A database of schema version 2 (a row per event in `events`, and rows left in the old
    /// `journal` table) opens with its logs whole: rewritten as rows of `batches`, `events`
    /// dropped, the journal's rows that were not in `events` yet added once.
    #[test]
    fn a_version_2_log_is_rewritten_in_rows_of_batches() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.execute_batch(MIGRATIONS[1]).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        for id in ["run_a", "run_b"] {
            conn.execute(
                "INSERT INTO runs (id, workflow, status, record) VALUES (?1, 'wf', 'running', '{}')",
                [id],
            )
            .unwrap();
        }
        let big = "x".repeat(300);
        // run_a: 1..=500 (more than one row's worth), run_b: 1..=3; the journal holds run_b's
        // 3 (already in `events`) and 4, and an event of a run that no longer exists.
        for seq in 1..=500 {
            conn.execute(
                "INSERT INTO events VALUES ('run_a', ?1, 'tick', ?2)",
                rusqlite::params![
                    seq,
                    format!("{{\"seq\":{seq},\"t\":\"{big}\"}}").into_bytes()
                ],
            )
            .unwrap();
        }
        for seq in 1..=3 {
            conn.execute(
                "INSERT INTO events VALUES ('run_b', ?1, 'tick', x'7b7d')",
                [seq],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO journal (run_id, seq, type, json) VALUES
                ('run_b', 3, 'tick', x'7b7d'), ('run_b', 4, 'chain-completed', x'7b7d'),
                ('run_gone', 1, 'tick', x'7b7d');",
        )
        .unwrap();
        drop(conn);

        let conn = open_writer(&path, Synchronous::Normal).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'events'"),
            0,
            "events is dropped"
        );
        let a = crate::reader::read_events(&conn, "run_a", 0, 1000).unwrap();
        assert_eq!(a.len(), 500);
        for (i, e) in a.iter().enumerate() {
            assert_eq!(e.seq(), i as u64 + 1);
            assert_eq!(e.event_type(), "tick");
            assert!(
                e.json()
                    .starts_with(format!("{{\"seq\":{}", i + 1).as_bytes())
            );
        }
        let rows = count("SELECT count(*) FROM batches WHERE run_id = 'run_a'");
        // ~160 KB of envelopes: three rows of at most 64 KiB, none a leftover of one event.
        assert_eq!(rows, 3, "{rows} rows for 500 events of ~320 bytes");
        // From a cursor in the middle of a row.
        let mid = crate::reader::read_events(&conn, "run_a", 333, 5).unwrap();
        assert_eq!(
            mid.iter().map(RawEvent::seq).collect::<Vec<_>>(),
            [334, 335, 336, 337, 338]
        );
        let b = crate::reader::read_events(&conn, "run_b", 0, 10).unwrap();
        assert_eq!(
            b.iter().map(RawEvent::seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(
            crate::batches::last(&conn, "run_b").unwrap(),
            Some((4, true)),
            "the run's log is closed by its terminal event"
        );
        assert!(
            crate::reader::read_events(&conn, "run_gone", 0, 10)
                .unwrap()
                .is_empty()
        );
        assert_eq!(count("SELECT count(*) FROM journal"), 0);
    }
}
