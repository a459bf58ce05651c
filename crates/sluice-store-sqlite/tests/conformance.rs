//! The shared store conformance suite, on the SQLite backend (a fresh database file per case),
//! with small appends journaled by the writer thread (the default) and by the caller's task.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use sluice_store_sqlite::{SqliteOptions, SqliteStore};

/// A store on a new database in its own temporary directory.
fn fresh(inline_appends: bool) -> Arc<SqliteStore> {
    fresh_with(SqliteOptions {
        inline_appends,
        ..SqliteOptions::default()
    })
}

fn fresh_with(options: SqliteOptions) -> Arc<SqliteStore> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    // Keep the directory for the whole test: the store's files live in it.
    std::mem::forget(dir);
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

/// The engine's driver yields before a small batch only where appends are not grouped already.
#[tokio::test]
async fn appends_are_grouped_by_the_writer_unless_the_caller_journals_them() {
    use sluice_store::Store;
    use sluice_store_sqlite::Synchronous;
    assert!(fresh(false).groups_appends());
    assert!(!fresh(true).groups_appends());
    // With `synchronous = FULL` the writer journals every append (one sync for a whole group).
    let full = fresh_with(SqliteOptions {
        inline_appends: true,
        synchronous: Synchronous::Full,
        ..SqliteOptions::default()
    });
    assert!(full.groups_appends());
}
