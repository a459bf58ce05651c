//! Idempotent run creation: `(key owner, workflow, Idempotency-Key)` → the run created first.
//!
//! A key is *claimed* before the run is started, with the run's id assigned up front, so
//! concurrent requests with the same key wait for the first one and answer the same run
//! instead of each starting one. A claim whose start fails before the run exists (or whose
//! request goes away before then) is released: the key is free again and a waiting duplicate
//! takes it over. Once the run exists the claim is committed at once, so nothing that follows
//! (the session update, the client leaving) can free a key that a run's record holds.
//!
//! The map is bounded: entries expire [`TTL`] after the key was first used, and beyond
//! [`CAPACITY`] keys the oldest is forgotten. Both happen from the front of an
//! insertion-ordered queue, so each claim does amortised O(1) work (no scan of the map).
//!
//! Keys survive a restart through the store: each keyed run's record holds its key and the
//! fingerprint of its request ([`sluice_protocol::IdempotencyKey`]), and
//! [`Idempotency::restore`] rebuilds the map at start-up from the runs created within the TTL.
//! The store lists runs newest first (their ids are time-ordered), so the scan stops at the
//! first run older than the TTL, or once it has [`CAPACITY`] keys, and it never reads more than
//! [`RESTORE_SCAN_LIMIT`] records: the store cannot list keyed runs only, so a day of many
//! unkeyed runs costs a read of each, up to that bound.

use std::collections::hash_map::Entry as MapEntry;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use sluice_protocol::{RunRecord, Timestamp};
use sluice_store::{RunFilter, Store};
use tokio::sync::watch;

use crate::error::{ApiError, ApiResult};

/// How long a key is remembered after its first use.
pub(crate) const TTL: Duration = Duration::from_secs(24 * 3600);

/// How many keys are remembered at most; beyond, the oldest is forgotten.
pub(crate) const CAPACITY: usize = 100_000;

/// The most run records [`Idempotency::restore`] reads.
pub(crate) const RESTORE_SCAN_LIMIT: usize = 10 * CAPACITY;

/// Runs per page of the restore's listing (the store's largest page).
const RESTORE_PAGE: usize = 1000;

/// (owner, workflow, `Idempotency-Key` header).
pub(crate) type Key = (Option<String>, String, String);

/// What [`Idempotency::restore`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Restored {
    /// Keys remembered again.
    pub keys: usize,
    /// Run records read.
    pub scanned: usize,
    /// Whether the scan stopped at [`RESTORE_SCAN_LIMIT`] before reaching the TTL or the
    /// capacity (keys of older runs within the TTL are then forgotten).
    pub truncated: bool,
}

/// The remembered keys.
pub(crate) struct Idempotency {
    inner: Mutex<Inner>,
    ttl: Duration,
    capacity: usize,
}

#[derive(Default)]
struct Inner {
    map: HashMap<Key, Entry>,
    /// Keys in the order they were first used, with the generation of their entry (a key
    /// released and claimed again has a newer entry: the stale queue item must not remove it).
    order: VecDeque<(Key, u64, Instant)>,
    next_generation: u64,
}

struct Entry {
    run_id: String,
    fingerprint: u64,
    generation: u64,
    /// `true` once the run exists.
    created: watch::Receiver<bool>,
}

/// What [`Idempotency::claim`] found.
pub(crate) enum Claim<'a> {
    /// The key is new: start the run with this reservation's id, then commit it.
    New(Reservation<'a>),
    /// The key was used before with the same body: answer this run.
    Existing(String),
}

/// A claimed key. [`commit`](Reservation::commit) once the run exists; dropping it uncommitted
/// releases the key.
pub(crate) struct Reservation<'a> {
    owner: &'a Idempotency,
    key: Key,
    generation: u64,
    run_id: String,
    created: Option<watch::Sender<bool>>,
}

enum Step<'a> {
    Done(Claim<'a>),
    Wait(watch::Receiver<bool>),
}

impl Idempotency {
    /// Keys kept `ttl` after their first use, at most `capacity` of them.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            inner: Mutex::default(),
            ttl,
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` for a request whose body has `fingerprint`, waiting while another request
    /// holding the same key is still starting its run.
    ///
    /// # Errors
    /// [`ApiError::IdempotencyKeyReused`] when the key was used with a different body.
    pub(crate) async fn claim(&self, key: Key, fingerprint: u64) -> ApiResult<Claim<'_>> {
        loop {
            match self.try_claim(&key, fingerprint, Instant::now())? {
                Step::Done(claim) => return Ok(claim),
                // Whether the first request created its run or gave up (its sender dropped),
                // look again: the key then names a run, or is free.
                Step::Wait(mut created) => {
                    let _ = created.wait_for(|c| *c).await;
                }
            }
        }
    }

    fn try_claim(&self, key: &Key, fingerprint: u64, now: Instant) -> ApiResult<Step<'_>> {
        let mut inner = self.lock();
        inner.expire(now, self.ttl);
        if let Some(e) = inner.map.get(key) {
            if e.fingerprint != fingerprint {
                return Err(ApiError::IdempotencyKeyReused);
            }
            if *e.created.borrow() {
                return Ok(Step::Done(Claim::Existing(e.run_id.clone())));
            }
            return Ok(Step::Wait(e.created.clone()));
        }
        while inner.order.len() >= self.capacity {
            inner.pop_front();
        }
        let generation = inner.next_generation;
        inner.next_generation += 1;
        let run_id = sluice_engine::new_run_id();
        let (tx, rx) = watch::channel(false);
        inner.map.insert(
            key.clone(),
            Entry {
                run_id: run_id.clone(),
                fingerprint,
                generation,
                created: rx,
            },
        );
        inner.order.push_back((key.clone(), generation, now));
        Ok(Step::Done(Claim::New(Reservation {
            owner: self,
            key: key.clone(),
            generation,
            run_id,
            created: Some(tx),
        })))
    }

    /// Forgets `key` if it names `run_id` (a run that no longer exists: the retention sweeper
    /// removed it), so that the key can start a new run.
    pub(crate) fn forget(&self, key: &Key, run_id: &str) {
        let mut inner = self.lock();
        if let Some(generation) = inner
            .map
            .get(key)
            .filter(|e| e.run_id == run_id)
            .map(|e| e.generation)
        {
            inner.remove(key, generation);
        }
    }

    /// Remembers again the keys recorded in the runs of `store` created less than the TTL ago:
    /// the newest first, at most the capacity, reading at most `scan_limit` records. Keys
    /// already in the map (a newer use) are left as they are. Call before serving.
    ///
    /// # Errors
    /// A store error; the keys restored before it are kept.
    pub(crate) async fn restore(
        &self,
        store: &dyn Store,
        scan_limit: usize,
    ) -> sluice_store::Result<Restored> {
        let mut out = Restored::default();
        let now = (Timestamp::now(), Instant::now());
        let mut cursor = None;
        loop {
            let filter = RunFilter {
                limit: RESTORE_PAGE.min(scan_limit.saturating_sub(out.scanned).max(1)),
                cursor: cursor.take(),
                ..RunFilter::default()
            };
            let page = store.list_runs(&filter).await?;
            out.scanned += page.runs.len();
            if !self.remember_page(page.runs, now, &mut out) {
                return Ok(out);
            }
            match page.next_cursor {
                Some(c) if out.scanned < scan_limit => cursor = Some(c),
                Some(_) => {
                    out.truncated = true;
                    return Ok(out);
                }
                None => return Ok(out),
            }
        }
    }

    /// Remembers the keys of one page of runs (newest first) as of `now`; whether the next
    /// page may hold more (false once a run is older than the TTL or the map is full).
    fn remember_page(
        &self,
        runs: Vec<RunRecord>,
        (now_ts, now): (Timestamp, Instant),
        out: &mut Restored,
    ) -> bool {
        let ttl_us = i64::try_from(self.ttl.as_micros()).unwrap_or(i64::MAX);
        let mut inner = self.lock();
        for rec in runs {
            let age_us = now_ts
                .as_micros()
                .saturating_sub(rec.created_at.as_micros());
            if age_us >= ttl_us || inner.map.len() >= self.capacity {
                // Newest first: every run after this one is older still.
                return false;
            }
            // When the key was first used, on this process's clock (a clock that cannot reach
            // back that far makes it now: the key is then kept a little longer).
            let age = Duration::from_micros(u64::try_from(age_us).unwrap_or(0));
            if inner.remember(rec, now.checked_sub(age).unwrap_or(now)) {
                out.keys += 1;
            }
        }
        true
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().map.len()
    }
}

impl Inner {
    /// Remembers the key recorded in `rec` (a run created at `first_used`, older than every
    /// entry already in the map) unless the map has the key already; whether it did.
    fn remember(&mut self, rec: RunRecord, first_used: Instant) -> bool {
        let Some(recorded) = rec.idempotency else {
            return false;
        };
        let key = (rec.owner, rec.workflow, recorded.key);
        if self.map.contains_key(&key) {
            return false;
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        // The run exists: the entry is committed from the start.
        let (_, created) = watch::channel(true);
        self.map.insert(
            key.clone(),
            Entry {
                run_id: rec.id,
                fingerprint: recorded.fingerprint,
                generation,
                created,
            },
        );
        // The oldest so far: at the front, where expiry and eviction take from.
        self.order.push_front((key, generation, first_used));
        true
    }

    /// Drops entries first used `ttl` ago or longer (they are at the front).
    fn expire(&mut self, now: Instant, ttl: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(_, _, at)| now.saturating_duration_since(*at) >= ttl)
        {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some((key, generation, _)) = self.order.pop_front() {
            self.remove(&key, generation);
        }
    }

    fn remove(&mut self, key: &Key, generation: u64) {
        if let MapEntry::Occupied(e) = self.map.entry(key.clone())
            && e.get().generation == generation
        {
            e.remove();
        }
    }
}

impl Reservation<'_> {
    /// The id to start the run with.
    pub(crate) fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The run exists: the key now answers it.
    pub(crate) fn commit(mut self) {
        if let Some(tx) = self.created.take() {
            tx.send_replace(true);
        }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.created.is_some() {
            // Not committed: free the key (waiters see the sender go and look again).
            self.owner.lock().remove(&self.key, self.generation);
        }
    }
}

/// A fingerprint of a request body that does not depend on the order of object keys.
pub(crate) fn fingerprint(body: &Value) -> u64 {
    let mut out = Vec::with_capacity(256);
    canonical(body, &mut out);
    crate::hash::stable_hash(&out)
}

fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                canonical(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(v, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn key(k: &str) -> Key {
        (None, "wf".into(), k.into())
    }

    fn new_claim<'a>(c: &'a Idempotency, k: &str, fp: u64, now: Instant) -> Reservation<'a> {
        match c.try_claim(&key(k), fp, now) {
            Ok(Step::Done(Claim::New(r))) => r,
            _ => panic!("expected a new claim for {k}"),
        }
    }

    #[test]
    fn same_body_answers_the_first_run_other_body_is_refused() {
        let c = Idempotency::new(TTL, 10);
        let now = Instant::now();
        let r = new_claim(&c, "a", 1, now);
        let id = r.run_id().to_owned();
        assert!(matches!(c.try_claim(&key("a"), 1, now), Ok(Step::Wait(_))));
        r.commit();
        match c.try_claim(&key("a"), 1, now) {
            Ok(Step::Done(Claim::Existing(got))) => assert_eq!(got, id),
            _ => panic!("expected the first run"),
        }
        assert!(matches!(
            c.try_claim(&key("a"), 2, now),
            Err(ApiError::IdempotencyKeyReused)
        ));
    }

    #[test]
    fn a_released_claim_frees_the_key() {
        let c = Idempotency::new(TTL, 10);
        let now = Instant::now();
        drop(new_claim(&c, "a", 1, now));
        assert_eq!(c.len(), 0);
        // Free again, even for another body; the stale queue item does not remove the new one.
        let r = new_claim(&c, "a", 2, now);
        r.commit();
        for i in 0..9 {
            new_claim(&c, &format!("k{i}"), 0, now).commit();
        }
        assert!(matches!(
            c.try_claim(&key("a"), 2, now),
            Ok(Step::Done(Claim::Existing(_)))
        ));
    }

    #[test]
    fn keys_expire_after_the_ttl_and_the_oldest_go_beyond_capacity() {
        let ttl = Duration::from_secs(100);
        let c = Idempotency::new(ttl, 3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        new_claim(&c, "a", 1, at(0)).commit();
        new_claim(&c, "b", 1, at(10)).commit();
        new_claim(&c, "c", 1, at(20)).commit();
        // Capacity: "d" pushes out "a", the oldest.
        new_claim(&c, "d", 1, at(30)).commit();
        assert_eq!(c.len(), 3);
        assert!(matches!(
            c.try_claim(&key("b"), 1, at(30)),
            Ok(Step::Done(Claim::Existing(_)))
        ));
        // TTL: at 115 s, "b" (first used at 10 s) has expired, "c" (20 s) has not. A key that
        // is gone is new again, even with another body.
        new_claim(&c, "b", 99, at(115)).commit();
        assert!(matches!(
            c.try_claim(&key("c"), 1, at(115)),
            Ok(Step::Done(Claim::Existing(_)))
        ));
        assert!(matches!(
            c.try_claim(&key("c"), 99, at(115)),
            Err(ApiError::IdempotencyKeyReused)
        ));
        new_claim(&c, "a", 99, at(116)).commit();
        assert_eq!(c.len(), 3);
    }

    #[tokio::test]
    async fn a_waiting_duplicate_takes_over_a_released_claim() {
        let c = Idempotency::new(TTL, 10);
        let first = match c.claim(key("a"), 1).await.unwrap() {
            Claim::New(r) => r,
            Claim::Existing(_) => panic!("new key"),
        };
        let first_id = first.run_id().to_owned();
        let (second, ()) = tokio::join!(c.claim(key("a"), 1), async move {
            tokio::task::yield_now().await;
            drop(first);
        });
        match second.unwrap() {
            Claim::New(r) => assert_ne!(r.run_id(), first_id),
            Claim::Existing(_) => panic!("the first start failed: the duplicate starts its own"),
        }
    }

    /// A store with `runs` (id, age, workflow, owner, key, fingerprint), created in this order:
    /// give older runs smaller ids, as time-ordered ids are.
    async fn store_with(
        runs: impl IntoIterator<Item = (String, Duration, Option<(&'static str, u64)>)>,
    ) -> sluice_store_memory::MemoryStore {
        let store = sluice_store_memory::MemoryStore::new();
        let now = Timestamp::now().as_micros();
        for (id, age, key) in runs {
            let mut rec = RunRecord::new(id, "wf", Value::Null);
            rec.created_at = Timestamp::from_micros(now - age.as_micros() as i64);
            rec.idempotency = key.map(|(k, fingerprint)| sluice_protocol::IdempotencyKey {
                key: k.into(),
                fingerprint,
            });
            store.create_run(&rec).await.unwrap();
        }
        store
    }

    fn existing(c: &Idempotency, k: &str, fp: u64, at: Instant) -> String {
        match c.try_claim(&key(k), fp, at) {
            Ok(Step::Done(Claim::Existing(id))) => id,
            _ => panic!("expected {k} to answer its run"),
        }
    }

    #[tokio::test]
    async fn restore_remembers_the_keys_of_recent_runs_and_stops_at_the_ttl() {
        let hour = Duration::from_secs(3600);
        let mut runs = Vec::new();
        // 1,500 runs older than the TTL (keyed: they must not come back), then 10 keyed runs of
        // the last hour, then 1,000 recent runs without a key.
        for i in 0..1500 {
            runs.push((format!("run_{i:06}"), 25 * hour, Some(("old", 1))));
        }
        const KEYS: [&str; 10] = ["k0", "k1", "k2", "k3", "k4", "k5", "k6", "k7", "k8", "k9"];
        for (i, k) in KEYS.iter().enumerate() {
            runs.push((format!("run_{:06}", 1500 + i), hour, Some((*k, i as u64))));
        }
        for i in 0..1000 {
            runs.push((format!("run_{:06}", 1510 + i), Duration::ZERO, None));
        }
        let store = store_with(runs).await;
        let c = Idempotency::new(TTL, CAPACITY);
        let r = c.restore(&store, RESTORE_SCAN_LIMIT).await.unwrap();
        assert_eq!(r.keys, 10);
        assert!(!r.truncated);
        // Two pages of 1,000: the second reached the first run older than the TTL.
        assert_eq!(r.scanned, 2000);
        let now = Instant::now();
        for (i, k) in KEYS.iter().enumerate() {
            assert_eq!(
                existing(&c, k, i as u64, now),
                format!("run_{:06}", 1500 + i)
            );
        }
        assert!(matches!(
            c.try_claim(&key("k3"), 99, now),
            Err(ApiError::IdempotencyKeyReused)
        ));
        assert!(matches!(
            c.try_claim(&key("old"), 1, now),
            Ok(Step::Done(Claim::New(_)))
        ));
        // Owner and workflow are part of the key.
        assert!(matches!(
            c.try_claim(&(Some("someone".into()), "wf".into(), "k1".into()), 1, now),
            Ok(Step::Done(Claim::New(_)))
        ));
        assert!(matches!(
            c.try_claim(&(None, "other".into(), "k1".into()), 1, now),
            Ok(Step::Done(Claim::New(_)))
        ));
    }

    #[tokio::test]
    async fn restore_keeps_the_newest_keys_and_their_first_use() {
        let secs = Duration::from_secs;
        // "dup" was used twice (its first entry expired or was forgotten in between): the
        // newer run is the one it answers.
        let store = store_with([
            ("run_0".to_owned(), secs(99), Some(("z", 1))),
            ("run_1".to_owned(), secs(95), Some(("a", 1))),
            ("run_2".to_owned(), secs(90), Some(("dup", 1))),
            ("run_3".to_owned(), secs(80), Some(("b", 1))),
            ("run_4".to_owned(), secs(70), Some(("dup", 2))),
            ("run_5".to_owned(), secs(60), Some(("c", 1))),
        ])
        .await;
        let c = Idempotency::new(secs(100), 4);
        let r = c.restore(&store, RESTORE_SCAN_LIMIT).await.unwrap();
        assert_eq!(r.keys, 4, "the capacity");
        let now = Instant::now();
        assert_eq!(existing(&c, "c", 1, now), "run_5");
        assert_eq!(existing(&c, "dup", 2, now), "run_4");
        assert!(matches!(
            c.try_claim(&key("dup"), 1, now),
            Err(ApiError::IdempotencyKeyReused)
        ));
        assert_eq!(existing(&c, "b", 1, now), "run_3");
        assert_eq!(existing(&c, "a", 1, now), "run_1");
        // Each entry expires the TTL after its run was created, not after the restore.
        let later = now + secs(25);
        assert!(matches!(
            c.try_claim(&key("b"), 7, later),
            Ok(Step::Done(Claim::New(_)))
        ));
        assert_eq!(existing(&c, "c", 1, later), "run_5");
        // "z" (the oldest) did not fit.
        assert!(matches!(
            c.try_claim(&key("z"), 9, now),
            Ok(Step::Done(Claim::New(_)))
        ));
    }

    #[tokio::test]
    async fn restore_reads_at_most_its_scan_limit() {
        let store = store_with(
            (0..1500).map(|i| (format!("run_{i:06}"), Duration::ZERO, None::<(&str, u64)>)),
        )
        .await;
        let c = Idempotency::new(TTL, CAPACITY);
        let r = c.restore(&store, 1200).await.unwrap();
        assert_eq!(r.keys, 0);
        assert_eq!(r.scanned, 1200);
        assert!(r.truncated);
    }

    #[test]
    fn fingerprints_ignore_key_order_only() {
        let a = serde_json::json!({"input": {"n": 1, "m": [1, {"x": 2, "y": 3}]}});
        let b = serde_json::json!({"input": {"m": [1, {"y": 3, "x": 2}], "n": 1}});
        let c = serde_json::json!({"input": {"n": 2, "m": [1, {"x": 2, "y": 3}]}});
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a), fingerprint(&c));
        assert_ne!(
            fingerprint(&serde_json::json!({"input": "1"})),
            fingerprint(&serde_json::json!({"input": 1}))
        );
    }
}
