use crate::FastMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How many independently locked parts the notifier's map is split into.
const SHARDS: usize = 16;

/// The shard of a run among `shards`: FNV-1a (64 bits) of its id, the same in every process
/// and every build, so a backend may also name files by it.
pub fn run_shard(run_id: &str, shards: usize) -> usize {
    let h = run_id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    usize::try_from(h % shards.max(1) as u64).unwrap_or(0)
}

/// How long a shard keeps entries nobody is subscribed to before it removes them.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One shard: each run's sender, and when the shard last removed the unused ones.
#[derive(Debug)]
struct Senders {
    runs: FastMap<String, Arc<watch::Sender<u64>>>,
    swept: Instant,
}

impl Default for Senders {
    fn default() -> Self {
        Self {
            runs: FastMap::default(),
            swept: Instant::now(),
        }
    }
}

impl Senders {
    /// Removes the entries nobody is subscribed to, at most once per [`SWEEP_EVERY`].
    fn sweep(&mut self) {
        if self.swept.elapsed() >= SWEEP_EVERY {
            self.runs.retain(|_, tx| tx.receiver_count() > 0);
            self.swept = Instant::now();
        }
    }
}

/// In-process broadcast of each run's last committed seq, so followers wake without polling.
///
/// A backend calls [`publish`](Notifier::publish) after every commit and implements
/// [`Store::wait_for`](crate::Store::wait_for) as [`subscribe`](Notifier::subscribe), then a check
/// of its committed state, then [`Subscription::wait`]. An entry lives while someone is
/// subscribed to it, and after that until a publish or a new subscription in its part of the
/// map sweeps the unused entries (at most once a second): a follower subscribes anew for every
/// wait, and keeping the entry saves building a channel each time. Publishing to runs nobody
/// follows costs one map lookup.
///
/// The map is split into 16 parts by run id, each under its own lock, and a publish
/// wakes the followers after it has let go of the lock: the thread that commits (one SQLite
/// writer for every run) and the thousands of followers subscribing and unsubscribing on the
/// runtime's threads do not queue behind each other.
#[derive(Debug)]
pub struct Notifier {
    shards: Vec<Mutex<Senders>>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

/// A live subscription to one run's committed seq; unsubscribes on drop.
#[derive(Debug)]
pub struct Subscription<'a> {
    /// Borrowed from the notifier, as the run's entry lives in it.
    notifier: std::marker::PhantomData<&'a Notifier>,
    rx: Option<watch::Receiver<u64>>,
}

impl Notifier {
    /// A notifier with no subscriptions.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, run_id: &str) -> MutexGuard<'_, Senders> {
        self.shards[run_shard(run_id, self.shards.len())]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Announces that `run_id`'s log is committed up to `seq`.
    pub fn publish(&self, run_id: &str, seq: u64) {
        // Woken outside the lock. A subscription that ends and a new one that starts meanwhile
        // get a new sender, which this publish misses; the new subscriber checks the committed
        // state after subscribing, and `seq` is committed already.
        let tx = {
            let mut shard = self.shard(run_id);
            shard.sweep();
            shard.runs.get(run_id).cloned()
        };
        let Some(tx) = tx else {
            return;
        };
        tx.send_if_modified(|cur| {
            let newer = seq > *cur;
            if newer {
                *cur = seq;
            }
            newer
        });
    }

    /// Subscribes to `run_id`'s committed seq. Check committed state after subscribing.
    pub fn subscribe(&self, run_id: &str) -> Subscription<'_> {
        let mut shard = self.shard(run_id);
        let rx = match shard.runs.get(run_id) {
            Some(tx) => tx.subscribe(),
            None => {
                shard.sweep();
                let (tx, rx) = watch::channel(0);
                shard.runs.insert(run_id.to_owned(), Arc::new(tx));
                rx
            }
        };
        drop(shard);
        Subscription {
            notifier: std::marker::PhantomData,
            rx: Some(rx),
        }
    }

    /// How many runs have at least one subscriber.
    pub fn watched_runs(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let shard = s.lock().unwrap_or_else(|p| p.into_inner());
                shard
                    .runs
                    .values()
                    .filter(|tx| tx.receiver_count() > 0)
                    .count()
            })
            .sum()
    }

    /// Makes every shard due for a sweep, as if a second had passed.
    #[cfg(test)]
    fn age(&self) {
        for s in &self.shards {
            let mut shard = s.lock().unwrap_or_else(|p| p.into_inner());
            shard.swept = Instant::now()
                .checked_sub(SWEEP_EVERY)
                .unwrap_or(shard.swept);
        }
    }

    /// How many entries the map holds, subscribed to or not.
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).runs.len())
            .sum()
    }
}

impl Subscription<'_> {
    /// Waits until a published seq exceeds `after`.
    pub async fn wait(mut self, after: u64) {
        if let Some(rx) = self.rx.as_mut() {
            // The sender stays in the map while this receiver exists, so the wait ends only by a
            // publish past `after`.
            let _ = rx.wait_for(|&seq| seq > after).await;
        }
    }
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        // The entry stays for the follower's next wait; a later publish or new subscription
        // in its shard sweeps it away once unused.
        drop(self.rx.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_on_publish_and_cleans_up() {
        let n = Notifier::new();
        let sub = n.subscribe("r");
        assert_eq!(n.watched_runs(), 1);
        let waiter = sub.wait(3);
        tokio::pin!(waiter);
        n.publish("r", 2);
        assert!(futures_util::poll!(waiter.as_mut()).is_pending());
        n.publish("r", 4);
        waiter.await;
        assert_eq!(n.watched_runs(), 0);
        n.publish("r", 9); // nobody listens: no entry is created
        assert_eq!(n.watched_runs(), 0);
    }

    #[tokio::test]
    async fn unused_entries_stay_for_the_next_wait_then_are_swept() {
        let n = Notifier::new();
        for seq in 1..=3 {
            let sub = n.subscribe("r");
            n.publish("r", seq);
            sub.wait(seq - 1).await;
        }
        // Every wait reused the one entry; nobody is subscribed now.
        assert_eq!((n.entries(), n.watched_runs()), (1, 0));
        let kept = n.subscribe("r");
        n.age();
        n.publish("r", 4); // sweeps: the entry has a subscriber, so it stays
        assert_eq!(n.entries(), 1);
        drop(kept);
        n.age();
        n.publish("r", 5);
        assert_eq!(n.entries(), 0);
        // A subscription after the sweep still sees what is published next.
        let sub = n.subscribe("r");
        n.publish("r", 6);
        sub.wait(5).await;
    }

    #[tokio::test]
    async fn runs_in_different_shards_are_woken_apart() {
        let n = Notifier::new();
        let ids: Vec<String> = (0..64).map(|i| format!("run_{i}")).collect();
        let shards: std::collections::HashSet<usize> =
            ids.iter().map(|id| run_shard(id, SHARDS)).collect();
        assert!(shards.len() > 1, "64 ids all fell in one shard");
        let subs: Vec<_> = ids.iter().map(|id| n.subscribe(id)).collect();
        assert_eq!(n.watched_runs(), 64);
        let mut waiters: Vec<_> = subs.into_iter().map(|s| Box::pin(s.wait(0))).collect();
        for (i, id) in ids.iter().enumerate() {
            if i % 2 == 0 {
                n.publish(id, 1);
            }
        }
        for (i, w) in waiters.iter_mut().enumerate() {
            let ready = futures_util::poll!(w.as_mut()).is_ready();
            assert_eq!(ready, i % 2 == 0, "run_{i}");
        }
        drop(waiters);
        assert_eq!(n.watched_runs(), 0);
    }

    #[test]
    fn run_shard_is_fnv1a_and_stable() {
        // FNV-1a 64 of "" is the offset basis; of "a", the published test vector.
        assert_eq!(
            run_shard("", usize::MAX),
            0xcbf2_9ce4_8422_2325_u64 as usize % usize::MAX
        );
        assert_eq!(
            run_shard("a", 1 << 32),
            0xaf63_dc4c_8601_ec8c_u64 as usize % (1 << 32)
        );
        assert_eq!(run_shard("anything", 0), 0);
    }
}
