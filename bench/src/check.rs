//! Per-run delivery checks: every `seq` once, in order, no gap, one terminal event, last.

/// How a run ended, from its terminal event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// `chain-completed`.
    Completed,
    /// `chain-error`.
    Error,
    /// `chain-cancelled`.
    Cancelled,
}

impl Terminal {
    /// The terminal kind of an event type, if it is one.
    pub fn of(kind: &[u8]) -> Option<Self> {
        match kind {
            b"chain-completed" => Some(Self::Completed),
            b"chain-error" => Some(Self::Error),
            b"chain-cancelled" => Some(Self::Cancelled),
            _ => None,
        }
    }
}

/// What one reader saw of one run, over any number of connections.
#[derive(Debug, Clone, Default)]
pub struct SeqCheck {
    /// The cursor the reader started after.
    from: u64,
    seen: Vec<u64>,
    /// Highest `seq` seen.
    pub max: u64,
    /// Distinct events.
    pub events: u64,
    /// Events whose `seq` had been seen before.
    pub dup: u64,
    /// Events that came after a higher `seq`.
    pub ooo: u64,
    /// Events whose SSE `id:` differs from the envelope's `seq`.
    pub id_mismatch: u64,
    /// Events whose data was not an envelope the bench could read.
    pub malformed: u64,
    /// Distinct `tick` events.
    pub ticks: u64,
    /// Ticks whose `i` was not the one after the previous tick's.
    pub tick_order: u64,
    next_tick: u64,
    /// The terminal event and its `seq`.
    pub terminal: Option<(u64, Terminal)>,
    /// Events after the terminal one.
    pub after_terminal: u64,
    /// How many ticks the run writes, when the reader knows (a run cut short is not clean).
    expected_ticks: Option<u64>,
}

impl SeqCheck {
    /// A check for a reader starting after `from` (0: from the start).
    pub fn new(from: u64) -> Self {
        Self {
            from,
            max: from,
            ..Self::default()
        }
    }

    /// The run writes `n` ticks: a reader that saw another number did not see it complete.
    pub fn expect_ticks(&mut self, n: u64) {
        self.expected_ticks = Some(n);
    }

    /// Ticks expected but not received (0 when the reader does not know how many to expect).
    pub fn missing_ticks(&self) -> u64 {
        self.expected_ticks.map_or(0, |n| n.abs_diff(self.ticks))
    }

    /// Records one event.
    pub fn observe(&mut self, seq: u64, id: Option<u64>, kind: &[u8], tick_i: Option<u64>) {
        if id.is_some_and(|id| id != seq) {
            self.id_mismatch += 1;
        }
        if seq <= self.from || self.is_seen(seq) {
            self.dup += 1;
            return;
        }
        self.mark(seq);
        self.events += 1;
        if seq < self.max {
            self.ooo += 1;
        }
        self.max = self.max.max(seq);
        if self.terminal.is_some() {
            self.after_terminal += 1;
        }
        if let Some(t) = Terminal::of(kind) {
            self.terminal = Some((seq, t));
        }
        if kind == b"tick" {
            self.ticks += 1;
            if tick_i != Some(self.next_tick) {
                self.tick_order += 1;
            }
            self.next_tick = tick_i.map_or(self.next_tick + 1, |i| i + 1);
        }
    }

    /// `seq`s between the cursor and the terminal event (or the highest seen) never delivered.
    pub fn lost(&self) -> u64 {
        let upto = self.terminal.map_or(self.max, |(s, _)| s.max(self.max));
        (upto - self.from).saturating_sub(self.events)
    }

    /// Whether the run was seen complete: `chain-completed`, nothing lost, duplicated or
    /// reordered, and nothing after the terminal event.
    pub fn clean(&self) -> bool {
        matches!(self.terminal, Some((_, Terminal::Completed)))
            && self.lost() == 0
            && self.dup == 0
            && self.ooo == 0
            && self.id_mismatch == 0
            && self.malformed == 0
            && self.tick_order == 0
            && self.after_terminal == 0
            && self.missing_ticks() == 0
    }

    fn is_seen(&self, seq: u64) -> bool {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        self.seen.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    fn mark(&mut self, seq: u64) {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if w >= self.seen.len() {
            self.seen.resize(w + 1, 0);
        }
        self.seen[w] |= 1 << b;
    }
}

/// Delivery counts summed over many readers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    /// Readers.
    pub readers: u64,
    /// Readers that saw a clean, completed run.
    pub clean: u64,
    /// Distinct events.
    pub events: u64,
    /// Distinct ticks.
    pub ticks: u64,
    /// Lost events.
    pub lost: u64,
    /// Duplicated events.
    pub dup: u64,
    /// Out-of-order events.
    pub ooo: u64,
    /// Other anomalies: id/seq mismatches, unreadable envelopes, tick order, events after the
    /// terminal one, ticks more or fewer than the run writes.
    pub other: u64,
}

impl Totals {
    /// Adds one reader's check.
    pub fn add(&mut self, c: &SeqCheck) {
        self.readers += 1;
        self.clean += u64::from(c.clean());
        self.events += c.events;
        self.ticks += c.ticks;
        self.lost += c.lost();
        self.dup += c.dup;
        self.ooo += c.ooo;
        self.other +=
            c.id_mismatch + c.malformed + c.tick_order + c.after_terminal + c.missing_ticks();
    }

    /// `lost/dup/ooo`.
    pub fn ldo(&self) -> String {
        format!("{}/{}/{}", self.lost, self.dup, self.ooo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_dups_and_reorders() {
        let mut c = SeqCheck::new(0);
        for (seq, kind, i) in [
            (1, "chain-started", None),
            (2, "tick", Some(0)),
            (4, "tick", Some(2)),
            (3, "tick", Some(1)),
            (3, "tick", Some(1)),
            (6, "chain-completed", None),
        ] {
            c.observe(seq, Some(seq), kind.as_bytes(), i);
        }
        assert_eq!((c.lost(), c.dup, c.ooo), (1, 1, 1));
        assert_eq!(c.ticks, 3);
        assert!(!c.clean());

        // A well-formed stream that writes fewer ticks than the run has is not clean.
        let mut short = SeqCheck::new(0);
        short.expect_ticks(3);
        for (seq, kind, i) in [(1, "tick", Some(0)), (2, "chain-completed", None)] {
            short.observe(seq, Some(seq), kind.as_bytes(), i);
        }
        assert_eq!(short.missing_ticks(), 2);
        assert!(!short.clean());

        let mut ok = SeqCheck::new(500);
        ok.observe(501, Some(501), b"tick", Some(0));
        ok.observe(502, Some(502), b"chain-completed", None);
        assert!(ok.clean());
        assert_eq!(ok.lost(), 0);
    }
}
