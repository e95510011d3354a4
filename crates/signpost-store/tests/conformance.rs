//! The store conformance suite on every in-process backend.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use signpost_store::conformance::Options;
use signpost_store::{DurableStore, MemoryConfig, MemoryStore};

fn config(options: Options) -> MemoryConfig {
    MemoryConfig {
        history_limit: options.history_limit,
        feed_capacity: options.feed_capacity,
    }
}

mod memory {
    use super::*;

    async fn make(options: Options) -> (MemoryStore, ()) {
        (MemoryStore::new(config(options)), ())
    }

    signpost_store::conformance_tests!(make);
}

mod durable {
    use super::*;

    async fn make(options: Options) -> (DurableStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = DurableStore::open(dir.path(), config(options)).expect("open");
        (store, dir)
    }

    signpost_store::conformance_tests!(make);
}
