//! The shared store conformance suite, on the SQLite backend (a fresh database file per case).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use sluice_store_sqlite::{SqliteOptions, SqliteStore};

/// A store on a new database in its own temporary directory.
fn fresh() -> Arc<SqliteStore> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sluice.db");
    // Keep the directory for the whole test: the store's files live in it.
    std::mem::forget(dir);
    Arc::new(SqliteStore::open(path, SqliteOptions::default()).unwrap())
}

sluice_store::store_conformance_tests!(async { fresh() });
