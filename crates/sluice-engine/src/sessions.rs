//! One lock per session: changes to a session are serialised per session — the server's (start
//! a run in it, delete it: the "one active run per session" check and the start are atomic) and
//! the engine's own (a run writing the session's state) — while different sessions never wait
//! for each other. Whoever writes a session record holds its lock from the read to the write,
//! so no write undoes another.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

/// The session locks in use. An entry lives only while someone holds or waits for its lock.
#[derive(Debug, Default)]
pub(crate) struct SessionLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds one session's lock; dropping it releases the lock (and the entry when unused).
pub struct SessionGuard<'a> {
    locks: &'a SessionLocks,
    id: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl SessionLocks {
    /// Waits for the lock of session `id`. The map's own (std) mutex is held only to find or
    /// insert the entry, never across the wait.
    pub(crate) async fn lock(&self, id: &str) -> SessionGuard<'_> {
        let mutex = self
            .map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_default()
            .clone();
        // The guard is created before the wait, so a cancelled wait also cleans up.
        let mut out = SessionGuard {
            locks: self,
            id: id.to_owned(),
            guard: None,
        };
        out.guard = Some(mutex.lock_owned().await);
        out
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map holds it now: nobody holds or waits for this lock (waiters clone the
        // entry under the map's mutex, which we hold).
        if map.get(&self.id).is_some_and(|m| Arc::strong_count(m) == 1) {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn one_session_waits_others_do_not_and_entries_go_away() {
        let locks = SessionLocks::default();
        let a = locks.lock("a").await;
        // Another session is not blocked by "a".
        let b = tokio::time::timeout(Duration::from_secs(5), locks.lock("b")).await;
        assert!(b.is_ok());
        drop(b);
        // The same session is.
        let again = tokio::time::timeout(Duration::from_millis(50), locks.lock("a")).await;
        assert!(again.is_err());
        assert_eq!(
            locks.len(),
            1,
            "the timed-out waiter left nothing behind but a's entry"
        );
        drop(a);
        assert_eq!(locks.len(), 0);
        let a = locks.lock("a").await;
        drop(a);
        assert_eq!(locks.len(), 0);
    }
}
