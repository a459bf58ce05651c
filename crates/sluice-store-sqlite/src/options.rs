use std::time::Duration;

/// How the SQLite store trades commit latency for durability and throughput.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// The longest the writer keeps collecting commands into one group commit while more keep
    /// arriving, measured from the first command of the group. The writer never waits on an empty
    /// queue: a lone append is committed at once. Default: 2 ms.
    pub commit_window: Duration,
    /// How many events one transaction holds at most (an append larger than this is committed
    /// alone; every other command counts as one). Default: 8,192.
    pub max_batch: usize,
    /// SQLite's `synchronous` setting for the WAL; see [`Synchronous`] for what each level
    /// survives. Default: [`Synchronous::Normal`].
    pub synchronous: Synchronous,
    /// How many read-only connections serve reads concurrently, each on a reader thread of
    /// its own (at least one is opened). Default: 4.
    pub read_connections: usize,
    /// Whether a small append is journaled by the caller's task itself (one short lock and
    /// one `write`, no thread hop) instead of by the writer thread, which journals whole groups
    /// with one `write`. Ignored with [`Synchronous::Full`] (the writer then syncs once for
    /// many). On, appends wait less while the process has CPU to spare; off, a machine with
    /// more work than cores keeps the writer's batching, which degrades better. Default: off.
    pub inline_appends: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            commit_window: Duration::from_millis(2),
            max_batch: 8192,
            synchronous: Synchronous::Normal,
            read_connections: 4,
            inline_appends: false,
        }
    }
}

/// SQLite's `PRAGMA synchronous` in WAL mode: when the write-ahead log is flushed to the disk.
///
/// Every level survives a crash or `kill -9` of the process with every acknowledged commit: a
/// commit is in the WAL file (in the OS page cache at least) before the store replies. They differ
/// on an OS crash or power loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Synchronous {
    /// No fsync at all. An OS crash or power loss may lose recent commits and may corrupt the
    /// database file. For scratch data only.
    Off,
    /// The WAL is synced at checkpoints, not at each commit. An OS crash or power loss may roll
    /// back the most recent acknowledged commits (whole transactions, newest first), but the
    /// database stays consistent: every run's log is still a contiguous prefix.
    #[default]
    Normal,
    /// The WAL is synced at every commit: acknowledged commits survive power loss too, at the cost
    /// of one fsync per group commit.
    Full,
}

impl Synchronous {
    /// The pragma value.
    pub(crate) fn pragma(self) -> &'static str {
        match self {
            Self::Off => "OFF",
            Self::Normal => "NORMAL",
            Self::Full => "FULL",
        }
    }
}
