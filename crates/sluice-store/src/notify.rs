use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::watch;

/// In-process broadcast of each run's last committed seq, so followers wake without polling.
///
/// A backend calls [`publish`](Notifier::publish) after every commit and implements
/// [`Store::wait_for`](crate::Store::wait_for) as [`subscribe`](Notifier::subscribe), then a check
/// of its committed state, then [`Subscription::wait`]. An entry lives exactly as long as someone
/// is subscribed to it, so publishing to runs nobody follows costs one map lookup.
#[derive(Debug, Default)]
pub struct Notifier {
    runs: Mutex<HashMap<String, watch::Sender<u64>>>,
}

/// A live subscription to one run's committed seq; unsubscribes on drop.
#[derive(Debug)]
pub struct Subscription<'a> {
    notifier: &'a Notifier,
    run_id: String,
    rx: Option<watch::Receiver<u64>>,
}

impl Notifier {
    /// A notifier with no subscriptions.
    pub fn new() -> Self {
        Self::default()
    }

    /// Announces that `run_id`'s log is committed up to `seq`.
    pub fn publish(&self, run_id: &str, seq: u64) {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = runs.get(run_id) {
            tx.send_if_modified(|cur| {
                let newer = seq > *cur;
                if newer {
                    *cur = seq;
                }
                newer
            });
        }
    }

    /// Subscribes to `run_id`'s committed seq. Check committed state after subscribing.
    pub fn subscribe(&self, run_id: &str) -> Subscription<'_> {
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        let rx = match runs.get(run_id) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(0);
                runs.insert(run_id.to_owned(), tx);
                rx
            }
        };
        Subscription {
            notifier: self,
            run_id: run_id.to_owned(),
            rx: Some(rx),
        }
    }

    /// How many runs have at least one subscriber.
    pub fn watched_runs(&self) -> usize {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).len()
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
        drop(self.rx.take());
        let mut runs = self.notifier.runs.lock().unwrap_or_else(|p| p.into_inner());
        if runs
            .get(&self.run_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            runs.remove(&self.run_id);
        }
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
}
