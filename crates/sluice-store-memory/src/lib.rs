//! An in-memory implementation of [`sluice_store::Store`].
//!
//! Everything lives in one map behind a short-held mutex; followers are woken through a
//! [`Notifier`]. Nothing survives the process: use it for tests, benchmarks and servers whose runs
//! need not outlive them. It passes the same conformance suite as the durable backends.
//!
//! ```
//! use std::sync::Arc;
//! let store: Arc<dyn sluice_store::Store> = Arc::new(sluice_store_memory::MemoryStore::new());
//! # drop(store);
//! ```

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::Value;
use sluice_protocol::{RawEvent, RunRecord, SessionRecord, Timestamp};
use sluice_store::{Error, InboxEntry, Notifier, Result, RunFilter, RunPage, Store};

#[derive(Debug)]
struct RunEntry {
    record: RunRecord,
    log: Vec<RawEvent>,
    closed: bool,
    checkpoint: Option<Bytes>,
    inbox: Vec<InboxEntry>,
    inbox_next: u64,
}

#[derive(Debug, Default)]
struct Inner {
    runs: BTreeMap<String, RunEntry>,
    sessions: BTreeMap<String, SessionRecord>,
}

/// The in-memory store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    notifier: Notifier,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks that `events` may be appended to `entry`'s log: open, contiguous from its end, and a
/// terminal event only in last place.
fn check_batch(run_id: &str, entry: &RunEntry, events: &[RawEvent]) -> Result<()> {
    if entry.closed {
        return Err(Error::LogClosed {
            run_id: run_id.to_owned(),
        });
    }
    let first = entry.log.len() as u64 + 1;
    for (expected, e) in (first..).zip(events) {
        if e.seq() != expected {
            return Err(Error::SeqConflict {
                run_id: run_id.to_owned(),
                expected,
                got: e.seq(),
            });
        }
    }
    if let Some((_, before_last)) = events.split_last()
        && before_last.iter().any(RawEvent::is_terminal)
    {
        return Err(Error::LogClosed {
            run_id: run_id.to_owned(),
        });
    }
    Ok(())
}

fn matches(filter: &RunFilter, r: &RunRecord) -> bool {
    filter.workflow.as_ref().is_none_or(|w| &r.workflow == w)
        && (filter.statuses.is_empty() || filter.statuses.contains(&r.status))
        && filter
            .session_id
            .as_ref()
            .is_none_or(|s| r.session_id.as_ref() == Some(s))
        && filter
            .owner
            .as_ref()
            .is_none_or(|o| r.owner.as_ref() == Some(o))
        && filter
            .finished_before
            .is_none_or(|t| r.finished_at.is_some_and(|f| f < t))
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_run(&self, record: &RunRecord) -> Result<()> {
        let mut inner = self.lock();
        if inner.runs.contains_key(&record.id) {
            return Err(Error::AlreadyExists {
                what: "run",
                id: record.id.clone(),
            });
        }
        let entry = RunEntry {
            record: record.clone(),
            log: Vec::new(),
            closed: false,
            checkpoint: None,
            inbox: Vec::new(),
            inbox_next: 1,
        };
        inner.runs.insert(record.id.clone(), entry);
        Ok(())
    }

    async fn get_run(&self, id: &str) -> Result<Option<RunRecord>> {
        Ok(self.lock().runs.get(id).map(|e| e.record.clone()))
    }

    async fn put_run(&self, record: &RunRecord) -> Result<()> {
        let mut inner = self.lock();
        let entry = inner
            .runs
            .get_mut(&record.id)
            .ok_or_else(|| Error::run_not_found(&record.id))?;
        entry.record = record.clone();
        Ok(())
    }

    async fn list_runs(&self, filter: &RunFilter) -> Result<RunPage> {
        let limit = match filter.limit {
            0 => 50,
            n => n.min(1000),
        };
        let inner = self.lock();
        let iter = inner.runs.iter().rev().filter(|(id, _)| {
            filter
                .cursor
                .as_ref()
                .is_none_or(|c| id.as_str() < c.as_str())
        });
        let (mut runs, mut bytes, mut more) = (Vec::new(), 0, false);
        for (_, e) in iter.filter(|(_, e)| matches(filter, &e.record)) {
            if runs.len() == limit || bytes >= sluice_store::PAGE_BYTES {
                more = true;
                break;
            }
            // As the SQLite store counts: the record's JSON.
            bytes += serde_json::to_vec(&e.record).map_or(0, |v| v.len());
            runs.push(e.record.clone());
        }
        let next_cursor = if more {
            runs.last().map(|r: &RunRecord| r.id.clone())
        } else {
            None
        };
        Ok(RunPage { runs, next_cursor })
    }

    async fn delete_run(&self, id: &str) -> Result<()> {
        self.lock().runs.remove(id);
        // Followers of the run wake up, find it gone and end.
        self.notifier.publish(id, u64::MAX);
        Ok(())
    }

    async fn append(&self, run_id: &str, events: &[RawEvent]) -> Result<()> {
        let last = {
            let mut inner = self.lock();
            let entry = inner
                .runs
                .get_mut(run_id)
                .ok_or_else(|| Error::run_not_found(run_id))?;
            check_batch(run_id, entry, events)?;
            if events.is_empty() {
                return Ok(());
            }
            entry.log.extend_from_slice(events);
            entry.closed = events.last().is_some_and(RawEvent::is_terminal);
            entry.log.len() as u64
        };
        self.notifier.publish(run_id, last);
        Ok(())
    }

    async fn finish(&self, record: &RunRecord, terminal: &RawEvent) -> Result<()> {
        let last = {
            let mut inner = self.lock();
            let entry = inner
                .runs
                .get_mut(&record.id)
                .ok_or_else(|| Error::run_not_found(&record.id))?;
            check_batch(&record.id, entry, std::slice::from_ref(terminal))?;
            if !terminal.is_terminal() {
                return Err(Error::Backend {
                    message: format!(
                        "finish of run {:?} needs a terminal event, got {:?}",
                        record.id,
                        terminal.event_type()
                    ),
                    source: None,
                });
            }
            if terminal.seq() != record.last_seq {
                return Err(Error::SeqConflict {
                    run_id: record.id.clone(),
                    expected: record.last_seq,
                    got: terminal.seq(),
                });
            }
            entry.record = record.clone();
            entry.log.push(terminal.clone());
            entry.closed = true;
            entry.log.len() as u64
        };
        self.notifier.publish(&record.id, last);
        Ok(())
    }

    async fn read(&self, run_id: &str, after: u64, limit: usize) -> Result<Vec<RawEvent>> {
        let inner = self.lock();
        let Some(entry) = inner.runs.get(run_id) else {
            return Ok(Vec::new());
        };
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(entry.log.len());
        let end = start.saturating_add(limit).min(entry.log.len());
        Ok(entry.log[start..end].to_vec())
    }

    async fn last_seq(&self, run_id: &str) -> Result<u64> {
        Ok(self
            .lock()
            .runs
            .get(run_id)
            .map_or(0, |e| e.log.len() as u64))
    }

    async fn wait_for(&self, run_id: &str, after: u64) -> Result<()> {
        let sub = self.notifier.subscribe(run_id);
        if self.last_seq(run_id).await? > after {
            return Ok(());
        }
        sub.wait(after).await;
        Ok(())
    }

    async fn put_checkpoint(&self, run_id: &str, checkpoint: Bytes) -> Result<()> {
        let mut inner = self.lock();
        let entry = inner
            .runs
            .get_mut(run_id)
            .ok_or_else(|| Error::run_not_found(run_id))?;
        entry.checkpoint = Some(checkpoint);
        Ok(())
    }

    async fn get_checkpoint(&self, run_id: &str) -> Result<Option<Bytes>> {
        Ok(self
            .lock()
            .runs
            .get(run_id)
            .and_then(|e| e.checkpoint.clone()))
    }

    async fn inbox_push(&self, run_id: &str, event_type: &str, data: &Value) -> Result<u64> {
        let mut inner = self.lock();
        let entry = inner
            .runs
            .get_mut(run_id)
            .ok_or_else(|| Error::run_not_found(run_id))?;
        let id = entry.inbox_next;
        entry.inbox_next += 1;
        entry.inbox.push(InboxEntry {
            id,
            event_type: event_type.to_owned(),
            data: data.clone(),
            received_at: Timestamp::now(),
        });
        Ok(id)
    }

    async fn inbox_read(&self, run_id: &str) -> Result<Vec<InboxEntry>> {
        Ok(self
            .lock()
            .runs
            .get(run_id)
            .map(|e| e.inbox.clone())
            .unwrap_or_default())
    }

    async fn inbox_ack(&self, run_id: &str, up_to: u64) -> Result<()> {
        if let Some(entry) = self.lock().runs.get_mut(run_id) {
            entry.inbox.retain(|e| e.id > up_to);
        }
        Ok(())
    }

    async fn create_session(&self, session: &SessionRecord) -> Result<()> {
        let mut inner = self.lock();
        if inner.sessions.contains_key(&session.id) {
            return Err(Error::AlreadyExists {
                what: "session",
                id: session.id.clone(),
            });
        }
        inner.sessions.insert(session.id.clone(), session.clone());
        Ok(())
    }

    async fn get_session(&self, id: &str) -> Result<Option<SessionRecord>> {
        Ok(self.lock().sessions.get(id).cloned())
    }

    async fn put_session(&self, session: &SessionRecord) -> Result<()> {
        let mut inner = self.lock();
        let slot = inner
            .sessions
            .get_mut(&session.id)
            .ok_or_else(|| Error::session_not_found(&session.id))?;
        *slot = session.clone();
        Ok(())
    }

    async fn delete_session(&self, id: &str) -> Result<bool> {
        Ok(self.lock().sessions.remove(id).is_some())
    }
}
