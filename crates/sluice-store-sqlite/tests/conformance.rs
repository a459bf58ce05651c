//! The shared store conformance suite, on the SQLite backend (a fresh database file per case),
//! with small appends journaled by the writer thread (the default) and by the caller's task.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use sluice_store_sqlite::{SqliteOptions, SqliteStore};

/// A store on a new database in its own temporary directory.
fn fresh(inline_appends: bool) -> Arc<SqliteStore> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    // Keep the directory for the whole test: the store's files live in it.
    std::mem::forget(dir);
    let options = SqliteOptions {
        inline_appends,
        ..SqliteOptions::default()
    };
    Arc::new(SqliteStore::open(path, options).unwrap())
}

mod writer_journals {
    use super::fresh;
    sluice_store::store_conformance_tests!(async { fresh(false) });
}

mod callers_journal {
    use super::fresh;
    sluice_store::store_conformance_tests!(async { fresh(true) });
}
