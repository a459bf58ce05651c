/// What a storage backend reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such run or session.
    #[error("{what} {id:?} not found")]
    NotFound {
        /// `run` or `session`.
        what: &'static str,
        /// The id asked for.
        id: String,
    },
    /// A record with this id exists already.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// `run` or `session`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// An append did not continue the log contiguously (another writer, or a bug).
    #[error("run {run_id:?}: append expected seq {expected}, got {got}")]
    SeqConflict {
        /// The run.
        run_id: String,
        /// The seq the log expects next.
        expected: u64,
        /// The seq offered.
        got: u64,
    },
    /// The run's log already ends with a terminal event.
    #[error("run {run_id:?}: the log is closed by its terminal event")]
    LogClosed {
        /// The run.
        run_id: String,
    },
    /// A stored value could not be encoded or decoded.
    #[error("stored data could not be encoded or decoded")]
    Codec(#[from] serde_json::Error),
    /// The backend itself failed (I/O, database, network).
    #[error("storage backend failed: {message}")]
    Backend {
        /// What was being done.
        message: String,
        /// The underlying failure.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl Error {
    /// A backend failure with its source.
    pub fn backend(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A run that does not exist.
    pub fn run_not_found(id: &str) -> Self {
        Self::NotFound {
            what: "run",
            id: id.to_owned(),
        }
    }

    /// A session that does not exist.
    pub fn session_not_found(id: &str) -> Self {
        Self::NotFound {
            what: "session",
            id: id.to_owned(),
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
