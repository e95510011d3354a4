//! The store conformance suite, unchanged, on a real etcd (one member per test).

use signpost_store::EtcdConfig;
use signpost_store::conformance::Options;
use signpost_tests::etcd::Etcd;
use signpost_tests::process::require_program;

fn etcd_installed() -> bool {
    require_program("etcd").is_some()
}

async fn make(options: Options) -> (signpost_store::EtcdStore, Etcd) {
    let Some(etcd) = Etcd::start(1).await else {
        unreachable!("checked by etcd_installed");
    };
    let store = etcd
        .store(EtcdConfig {
            history_limit: options.history_limit,
            feed_capacity: options.feed_capacity,
            ..EtcdConfig::default()
        })
        .await;
    (store, etcd)
}

signpost_store::conformance_tests!(make, if etcd_installed);
