//! The shared store conformance suite, on the in-memory backend.

use std::sync::Arc;

use sluice_store_memory::MemoryStore;

sluice_store::store_conformance_tests!(async { Arc::new(MemoryStore::new()) });
