//! The read side: a few reader threads, each with its own read-only connection, serving one
//! queue of reads; and the queries they run.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};

use bytes::Bytes;
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use sluice_protocol::{RawEvent, RunRecord, SessionRecord, Timestamp};
use sluice_store::{Error, InboxEntry, Result, RunFilter, RunPage};
use tokio::sync::oneshot;

use crate::batches;
use crate::schema::open_reader;
use crate::writer::{from_sql_int, to_sql_int};

/// A read waiting for a connection.
type Job = Box<dyn FnOnce(&Connection) + Send>;

/// Read-only connections, each owned by a thread of its own that takes reads from one queue.
/// WAL lets them read while the writer commits; each read sees the last commit made before it
/// started.
///
/// Dedicated threads instead of a semaphore and the runtime's blocking pool: there, a finished
/// read handed its connection to the next one through the async scheduler (the waiting task
/// had to be polled before it could start its read), and on a loaded server that hop took
/// milliseconds, so four connections served a few hundred reads a second while a thousand
/// streams starting at once queued for seconds. Here a thread goes from one read to the next
/// directly; only the reply crosses to the runtime.
#[derive(Debug)]
pub(crate) struct ReadPool {
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

fn db(what: &'static str) -> impl FnOnce(rusqlite::Error) -> Error {
    move |e| Error::backend(what, e)
}

fn pool_gone() -> Error {
    Error::Backend {
        message: "the SQLite reader threads have stopped".into(),
        source: None,
    }
}

impl ReadPool {
    /// Opens `size` (at least one) connections to the database at `path`, each on a reader
    /// thread.
    pub(crate) fn open(path: PathBuf, size: usize) -> Result<Self> {
        let size = size.max(1);
        let conns = (0..size)
            .map(|_| open_reader(&path))
            .collect::<Result<Vec<_>>>()?;
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(size);
        for (i, conn) in conns.into_iter().enumerate() {
            let rx = Arc::clone(&rx);
            let thread = std::thread::Builder::new()
                .name(format!("sluice-sqlite-r{i}"))
                .spawn(move || serve(&conn, &rx))
                .map_err(|e| Error::backend("starting an SQLite reader thread", e))?;
            threads.push(thread);
        }
        Ok(Self {
            jobs: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
        })
    }

    /// Runs `f` on the next free connection and waits for its outcome.
    pub(crate) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (reply, outcome) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            // The caller may have gone away meanwhile: then nobody wants the outcome.
            let _ = reply.send(f(conn));
        });
        let sent = match &*self.jobs.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(jobs) => jobs.send(job).is_ok(),
            None => false,
        };
        if !sent {
            return Err(pool_gone());
        }
        // A read that panicked drops its reply unsent.
        outcome.await.unwrap_or_else(|_| {
            Err(Error::Backend {
                message: "an SQLite read failed unexpectedly".into(),
                source: None,
            })
        })
    }
}

impl Drop for ReadPool {
    /// Closes the queue, lets the threads finish what is queued, and waits for them (their
    /// connections close with them).
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        for thread in self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            if thread.join().is_err() {
                tracing::warn!("an SQLite reader thread panicked");
            }
        }
    }
}

/// A reader thread: runs queued reads on `conn` until the queue closes. A read that panics is
/// contained (its caller gets an error) and the thread goes on.
fn serve(conn: &Connection, jobs: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let job = match jobs.lock().unwrap_or_else(|p| p.into_inner()).recv() {
            Ok(job) => job,
            Err(mpsc::RecvError) => return,
        };
        let run = std::panic::AssertUnwindSafe(|| job(conn));
        if std::panic::catch_unwind(run).is_err() {
            tracing::error!("an SQLite read panicked");
        }
    }
}

pub(crate) fn get_run(conn: &Connection, id: &str) -> Result<Option<RunRecord>> {
    let json: Option<String> = conn
        .prepare_cached("SELECT record FROM runs WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id], |row| row.get(0)).optional())
        .map_err(db("reading a run"))?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

/// The page size a filter asks for: 0 means 50, at most 1,000.
fn page_size(limit: usize) -> usize {
    match limit {
        0 => 50,
        n => n.min(1000),
    }
}

pub(crate) fn list_runs(conn: &Connection, filter: &RunFilter) -> Result<RunPage> {
    let limit = page_size(filter.limit);
    let mut sql = String::from("SELECT record FROM runs WHERE 1 = 1");
    let mut args: Vec<SqlValue> = Vec::new();
    let mut arg = |sql: &mut String, clause: &str, value: SqlValue| {
        args.push(value);
        sql.push_str(&clause.replace('?', &format!("?{}", args.len())));
    };
    if let Some(cursor) = &filter.cursor {
        arg(&mut sql, " AND id < ?", SqlValue::Text(cursor.clone()));
    }
    if let Some(workflow) = &filter.workflow {
        arg(
            &mut sql,
            " AND workflow = ?",
            SqlValue::Text(workflow.clone()),
        );
    }
    if !filter.statuses.is_empty() {
        let mut statuses: Vec<&str> = filter.statuses.iter().map(|s| s.as_str()).collect();
        statuses.sort_unstable();
        statuses.dedup();
        sql.push_str(" AND status IN (");
        for (i, status) in statuses.into_iter().enumerate() {
            arg(
                &mut sql,
                if i == 0 { "?" } else { ", ?" },
                SqlValue::Text(status.to_owned()),
            );
        }
        sql.push(')');
    }
    if let Some(session) = &filter.session_id {
        arg(
            &mut sql,
            " AND session_id = ?",
            SqlValue::Text(session.clone()),
        );
    }
    if let Some(owner) = &filter.owner {
        arg(&mut sql, " AND owner = ?", SqlValue::Text(owner.clone()));
    }
    if let Some(before) = filter.finished_before {
        arg(
            &mut sql,
            " AND finished_at < ?",
            SqlValue::Integer(before.as_micros()),
        );
    }
    arg(
        &mut sql,
        " ORDER BY id DESC LIMIT ?",
        SqlValue::Integer(i64::try_from(limit + 1).unwrap_or(i64::MAX)),
    );

    let mut stmt = conn.prepare_cached(&sql).map_err(db("listing runs"))?;
    let rows = stmt
        .query_map(params_from_iter(args.iter()), |row| row.get::<_, String>(0))
        .map_err(db("listing runs"))?;
    let mut runs = Vec::with_capacity(limit.min(64));
    let (mut bytes, mut more) = (0, false);
    for json in rows {
        let json = json.map_err(db("listing runs"))?;
        if runs.len() == limit || bytes >= sluice_store::PAGE_BYTES {
            more = true;
            break;
        }
        bytes += json.len();
        runs.push(serde_json::from_str::<RunRecord>(&json)?);
    }
    let next_cursor = if more {
        runs.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(RunPage { runs, next_cursor })
}

pub(crate) fn read_events(
    conn: &Connection,
    run_id: &str,
    after: u64,
    limit: usize,
) -> Result<Vec<RawEvent>> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut stmt = conn
        .prepare_cached(
            "SELECT first, last, closes, data FROM batches WHERE run_id = ?1 AND last > ?2
             ORDER BY last",
        )
        .map_err(db("reading events"))?;
    let mut rows = stmt
        .query(params![run_id, to_sql_int(after)])
        .map_err(db("reading events"))?;
    let mut out = Vec::with_capacity(limit.min(1024));
    let mut expected = after + 1;
    while out.len() < limit {
        let Some(row) = rows.next().map_err(db("reading events"))? else {
            break;
        };
        let first = from_sql_int(row.get(0).map_err(db("reading events"))?);
        if first > expected {
            // A closed log's terminal event can be here before the journaled events that come
            // before it (they are in the cache's tail until they are moved): the read stops at
            // the gap, and the reader's next read goes on from the cache.
            break;
        }
        let last = from_sql_int(row.get(1).map_err(db("reading events"))?);
        let closes = row.get::<_, i64>(2).map_err(db("reading events"))? != 0;
        let data = Bytes::from(row.get::<_, Vec<u8>>(3).map_err(db("reading events"))?);
        let events =
            batches::decode_row(first, last, closes, &data).map_err(|e| Error::Backend {
                message: format!("run {run_id}: a damaged row of its log: {e}"),
                source: None,
            })?;
        for e in events {
            if e.seq() == expected && out.len() < limit {
                out.push(e);
                expected += 1;
            }
        }
    }
    Ok(out)
}

pub(crate) fn last_seq(conn: &Connection, run_id: &str) -> Result<u64> {
    let last = batches::last(conn, run_id).map_err(db("reading a log's last seq"))?;
    Ok(last.map_or(0, |(seq, _)| seq))
}

pub(crate) fn get_checkpoint(conn: &Connection, run_id: &str) -> Result<Option<Bytes>> {
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM checkpoints WHERE run_id = ?1")
        .and_then(|mut stmt| stmt.query_row([run_id], |row| row.get(0)).optional())
        .map_err(db("reading a checkpoint"))?;
    Ok(data.map(Bytes::from))
}

pub(crate) fn inbox_read(conn: &Connection, run_id: &str) -> Result<Vec<InboxEntry>> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT id, type, data, received_at FROM inbox WHERE run_id = ?1 ORDER BY id",
        )
        .map_err(db("reading the inbox"))?;
    let rows = stmt
        .query_map([run_id], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
                row.get::<_, i64>(3)?,
            ))
        })
        .map_err(db("reading the inbox"))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, event_type, data, received_at) = row.map_err(db("reading the inbox"))?;
        out.push(InboxEntry {
            id: from_sql_int(id),
            event_type,
            data: serde_json::from_str(&data)?,
            received_at: Timestamp::from_micros(received_at),
        });
    }
    Ok(out)
}

pub(crate) fn get_session(conn: &Connection, id: &str) -> Result<Option<SessionRecord>> {
    let json: Option<String> = conn
        .prepare_cached("SELECT record FROM sessions WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row([id], |row| row.get(0)).optional())
        .map_err(db("reading a session"))?;
    Ok(json.map(|j| serde_json::from_str(&j)).transpose()?)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn pool(size: usize) -> (tempfile::TempDir, Arc<ReadPool>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.db");
        drop(crate::schema::open_writer(&path, crate::Synchronous::Normal).unwrap());
        let pool = Arc::new(ReadPool::open(path, size).unwrap());
        (dir, pool)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_reads_share_the_threads_and_a_panicking_read_fails_alone() {
        let (_dir, pool) = pool(2);
        let failed = pool
            .run(|_conn| -> Result<()> { panic!("a bug in a query") })
            .await;
        assert!(failed.is_err());
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..200_i64 {
            let pool = Arc::clone(&pool);
            reads.spawn(async move {
                pool.run(move |conn| {
                    conn.query_row("SELECT ?1 + 1", [i], |r| r.get::<_, i64>(0))
                        .map_err(db("a test query"))
                })
                .await
                .map(|v| (i, v))
            });
        }
        let mut seen = 0;
        while let Some(done) = reads.join_next().await {
            let (i, v) = done.unwrap().unwrap();
            assert_eq!(v, i + 1);
            seen += 1;
        }
        assert_eq!(seen, 200);
        // Both threads are still there: a read queued first that waits for one queued after it
        // finishes (on one thread it would time out and fail).
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let waits = pool.run(move |_| {
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
            Ok(())
        });
        let signals = pool.run(move |_| {
            tx.send(()).unwrap();
            Ok(())
        });
        let (a, b) = tokio::join!(waits, signals);
        a.unwrap();
        b.unwrap();
    }
}
