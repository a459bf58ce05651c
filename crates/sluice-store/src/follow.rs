use std::sync::Arc;

use futures_util::Stream;
use futures_util::stream::{self, StreamExt};
use sluice_protocol::RawEvent;

use crate::{Error, Result, Store};

/// How many events one read of the log fetches at most.
const READ_BATCH: usize = 1024;

/// About how many bytes of events one read fetches: a follower reads as many events as fit,
/// judging by the size of those it read last, so a run of large events (a tool's output, a
/// document) is read a few at a time, not a thousand (one slow reader would otherwise hold a
/// thousand of them in memory, and every reader of the run the same).
const READ_BYTES: usize = 1 << 20;

/// The first read of a follower, before it knows the run's event sizes.
const FIRST_READ: usize = 4;

/// A run's events with `seq > after`, in order: the stored history first, then live events as
/// they are committed, with no gap and no duplicate at the switch. Ends after the terminal event.
///
/// The reader pulls from the durable log at its own pace: a slow reader never slows the writer,
/// and nothing buffers beyond one read batch.
///
/// # Errors
/// The stream yields [`Error::NotFound`] once if the run does not exist or is deleted while it
/// is followed (stores wake followers when they delete a run), and any store error; it ends
/// after yielding an error.
pub fn follow(
    store: Arc<dyn Store>,
    run_id: String,
    after: u64,
) -> impl Stream<Item = Result<RawEvent>> + Send + 'static {
    follow_batches(store, run_id, after).flat_map(|batch| {
        let items: Vec<Result<RawEvent>> = match batch {
            Ok(events) => events.into_iter().map(Ok).collect(),
            Err(e) => vec![Err(e)],
        };
        stream::iter(items)
    })
}

/// The error of a follower at a gap in its run's stored log: the log `how`, yet holds no
/// event after the cursor.
fn gap(st: &FollowState, how: &str) -> Error {
    Error::Backend {
        message: format!(
            "the log of run {:?} {how} but has no event {}",
            st.run_id,
            st.cursor + 1
        ),
        source: None,
    }
}

struct FollowState {
    store: Arc<dyn Store>,
    run_id: String,
    cursor: u64,
    done: bool,
    /// The last read came back short: it reached the log's end, so the next step is a wait
    /// (which returns at once when more was committed since), not a read that would find
    /// nothing. A live follower thus reads once per wake-up, not twice.
    at_end: bool,
    /// How many events the next read asks for (see [`READ_BYTES`]).
    limit: usize,
}

/// Like [`follow`], in the batches the log is read in (never empty; at most 1,024 events, and
/// about 1 MiB: fewer events when they are large); encoders write a whole batch at once.
pub fn follow_batches(
    store: Arc<dyn Store>,
    run_id: String,
    after: u64,
) -> impl Stream<Item = Result<Vec<RawEvent>>> + Send + 'static {
    let state = FollowState {
        store,
        run_id,
        cursor: after,
        done: false,
        at_end: false,
        limit: FIRST_READ,
    };
    stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if st.at_end {
            st.at_end = false;
            if let Err(e) = st.store.wait_for(&st.run_id, st.cursor).await {
                st.done = true;
                return Some((Err(e), st));
            }
        }
        // A finished run whose log ends past the cursor and yet has nothing after it, read
        // twice (the record may be read a moment after the read that missed its last events):
        // a gap in the stored log, which no wait would fill.
        let mut missing = false;
        // Waits that returned (the log has an event past the cursor) and were followed by a
        // read that found nothing: twice is a gap in a live run's log, where each wait would
        // return at once and the follower would spin.
        let mut empty_wakes = 0u32;
        loop {
            match st.store.read(&st.run_id, st.cursor, st.limit).await {
                Ok(mut batch) if !batch.is_empty() => {
                    // A run with events exists; a terminal event among them ends the stream
                    // (the batch is checked and cut in place: no second vector per read).
                    st.at_end = batch.len() < st.limit;
                    let bytes: usize = batch.iter().map(|e| e.json().len()).sum();
                    let each = (bytes / batch.len()).max(1);
                    st.limit = (READ_BYTES / each).clamp(1, READ_BATCH);
                    let mut keep = batch.len();
                    for (i, ev) in batch.iter().enumerate() {
                        if ev.seq() != st.cursor + 1 {
                            st.done = true;
                            let err = Error::SeqConflict {
                                run_id: st.run_id.clone(),
                                expected: st.cursor + 1,
                                got: ev.seq(),
                            };
                            return Some((Err(err), st));
                        }
                        st.cursor = ev.seq();
                        if ev.is_terminal() {
                            st.done = true;
                            keep = i + 1;
                            break;
                        }
                    }
                    batch.truncate(keep);
                    return Some((Ok(batch), st));
                }
                Ok(_) => {
                    // Nothing to read: ask the record whether the run exists and has ended,
                    // before any wait. A live follower gets here only after a wake-up that
                    // brought nothing (once a read comes back short it waits first), and one
                    // that starts behind only once it has read the log: on a busy server that
                    // saves a thousand starting streams a database read each. One that was
                    // reading when the run was deleted (by retention, say) gets here too, and
                    // must not wait at a log end that no longer exists.
                    match st.store.get_run(&st.run_id).await {
                        Ok(Some(rec)) if rec.status.is_terminal() && st.cursor >= rec.last_seq => {
                            return None;
                        }
                        Ok(Some(rec)) if rec.status.is_terminal() => {
                            if missing {
                                st.done = true;
                                let err = gap(&st, &format!("ends at {}", rec.last_seq));
                                return Some((Err(err), st));
                            }
                            missing = true;
                            continue;
                        }
                        Ok(Some(_)) if empty_wakes >= 2 => {
                            st.done = true;
                            let err = gap(&st, &format!("has events past {}", st.cursor));
                            return Some((Err(err), st));
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => {
                            // Deleted (by retention, say) while it was being read.
                            st.done = true;
                            return Some((Err(Error::run_not_found(&st.run_id)), st));
                        }
                        Err(e) => {
                            st.done = true;
                            return Some((Err(e), st));
                        }
                    }
                    if let Err(e) = st.store.wait_for(&st.run_id, st.cursor).await {
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    empty_wakes += 1;
                }
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
        }
    })
}
