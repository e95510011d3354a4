//! The storage layer of Signpost: the [`Store`] trait, the data model it speaks, and its backends.
//!
//! The gRPC server (`signpost-server`) turns every request into one call on a [`Store`]; the store
//! assigns each change a revision, keeps a bounded history of changes, and publishes them on a
//! [`ChangeFeed`] that the server's watch fan-out reads. This crate knows nothing of gRPC.
//!
//! - [`model`]: instances, leases, revisions, and the [`Change`]s the store publishes.
//! - [`MemoryStore`]: everything in one process; for tests and ephemeral single nodes.
//! - [`DurableStore`]: the same engine with every change committed to an embedded database
//!   ([redb](https://docs.rs/redb): pure Rust, ACID, a stable file format, no server to run) before
//!   it is acknowledged; one node that survives restarts and crashes.
//! - [`EtcdStore`] (feature `etcd`, on by default): several servers over one etcd cluster, each
//!   serving reads and watches from a replica its etcd watch keeps current. It is built on
//!   [etcd-client](https://docs.rs/etcd-client), the maintained Rust client of etcd's v3 API.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> signpost_store::Result<()> {
//! use signpost_store::{Instance, MemoryConfig, MemoryStore, Quota, Store, Write};
//! use std::time::Duration;
//!
//! let store = MemoryStore::new(MemoryConfig::default());
//! let lease = store.grant_lease(Duration::from_secs(10), Quota::default()).await?;
//! let instance = Instance {
//!     namespace: "default".into(),
//!     service: "greeter".into(),
//!     id: "greeter-1".into(),
//!     address: "127.0.0.1".into(),
//!     port: 50051,
//!     ..Instance::default()
//! };
//! let written = store.write(Write::put(instance, Some(lease.id))).await?;
//! let snapshot = store.list("default", "greeter")?;
//! assert_eq!(Some(&snapshot.instances[0]), written.stored());
//! # Ok(())
//! # }
//! ```

mod codec;
#[cfg(feature = "test-util")]
pub mod conformance;
mod durable;
mod engine;
mod error;
#[cfg(feature = "etcd")]
mod etcd;
mod feed;
mod memory;
pub mod model;
mod state;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use durable::{DATA_FILE, DurableStore, LOCK_FILE, MAX_IN_FLIGHT};
pub use error::{Error, Result};
#[cfg(feature = "etcd")]
pub use etcd::{EtcdConfig, EtcdStore};
pub use feed::{ChangeFeed, FeedItem};
pub use memory::{MemoryConfig, MemoryStore};
pub use model::{
    Change, Condition, Event, Health, HealthCheck, Instance, InstanceKey, Lease, LeaseId, Memo,
    Metadata, Probe, Quota, RemovalCause, Revision, ServiceList, ServiceSummary, Snapshot, Usage,
    Write, Written,
};

impl Default for Instance {
    fn default() -> Self {
        Instance {
            namespace: "default".into(),
            service: String::new(),
            id: String::new(),
            address: String::new(),
            port: 0,
            tags: Vec::new(),
            metadata: Default::default(),
            weight: 100,
            zone: String::new(),
            check: None,
            owner: None,
            health: Health::Passing,
            health_output: String::new(),
            health_checked_at: None,
            lease_id: None,
            created_at: None,
            create_revision: 0,
            mod_revision: 0,
            memo: Default::default(),
        }
    }
}

/// A health verdict from the server's checker, for [`Write::Health`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthUpdate {
    pub key: InstanceKey,
    /// The verdict is for this registration of the instance, not a later one.
    pub create_revision: Revision,
    /// The check that produced it; a verdict for a check that has since changed is dropped.
    pub check: HealthCheck,
    pub health: Health,
    pub output: String,
    pub checked_at: std::time::SystemTime,
}

/// Where a watch starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStart {
    /// The whole current view of the service; the feed goes on after `snapshot.revision`.
    Snapshot(Snapshot),
    /// Every change after the requested revision up to `revision`, in order (for every service:
    /// the caller filters). The feed goes on after `revision`.
    Replay {
        changes: Vec<Arc<Change>>,
        revision: Revision,
    },
}

/// A boxed future: what a [`Store`] method that may wait on I/O answers, so that the trait can
/// be used as `Arc<dyn Store>`.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A registry backend.
///
/// # Contract
///
/// Every backend passes the same conformance suite; these are the rules it checks.
///
/// - **Revisions.** One store-wide counter. Every change (put, delete, lease expiry or revoke) is
///   atomic and takes exactly one new revision, higher than every revision before it, across
///   restarts too. A lease expiry removes all the lease's instances at one revision. Operations
///   that change nothing (deleting what does not exist, granting or refreshing a lease) take none.
/// - **Instances.** A [`Write::Put`] is an upsert. The store owns `health` (kept across an update
///   with the same check; a new check starts critical), `lease_id`, `created_at` and
///   `create_revision` (kept across updates) and `mod_revision` (the change's revision).
/// - **Conditions and quotas.** A write's [`Condition`] and [`Quota`] are judged atomically with
///   it: however many writers race, a create-only put creates once, an owned instance is never
///   overwritten by another owner, and no limit is passed by even one instance or lease. A
///   refused write changes nothing ([`Error::Conflict`], [`Error::Limit`]).
/// - **Health.** A [`Write::Health`] verdict takes a revision only when it changes the status (or
///   is the check's first, or, for a check the instance reports itself, changes its output); one for an instance that is gone, registered anew, or whose check
///   changed is refused as stale. An eviction is a [`Write::Delete`] on
///   [`Condition::Registration`].
/// - **Leases.** A lease lives for its ttl after its grant or last refresh; then, within about a
///   second, every instance on it is removed with [`RemovalCause::Expired`]. A lease past its
///   deadline counts as gone even before that sweep: it cannot be refreshed or attached to.
/// - **Reads.** [`list`](Store::list) and [`list_services`](Store::list_services) see every change
///   up to the revision they report and none after it.
/// - **Watch.** A feed from [`changes`](Store::changes) subscribed before [`watch`](Store::watch)
///   is called leaves no gap after the start: every change after the start's revision is
///   delivered on it, in order (it may also repeat changes at or before it, which the caller
///   skips). Resuming `after` a
///   revision replays exactly the changes after it when the history still holds them all; when it
///   does not (compacted, or a revision this store never reached), the start is a fresh snapshot
///   instead — never a replay with holes.
/// - **Slow readers.** A feed subscriber that falls behind gets [`FeedItem::Lagged`]; it then reads
///   a fresh [`list`](Store::list) and skips the feed's changes at or before its revision. A lagging
///   subscriber never slows writers or other subscribers.
/// - **Errors.** A backend that cannot be reached answers [`Error::Unavailable`].
pub trait Store: Send + Sync + 'static {
    /// Applies one write to an instance — a put, a delete, a health verdict — if its condition
    /// and quota hold, atomically with checking them (see [`Write`], [`Condition`], [`Quota`]).
    fn write(&self, write: Write) -> BoxFuture<'_, Result<Written>>;

    /// Grants a lease that lives for `ttl` unless refreshed, if one more fits the quota.
    fn grant_lease(&self, ttl: Duration, quota: Quota) -> BoxFuture<'_, Result<Lease>>;

    /// Keeps a live lease alive, answering how long it now lives at least: its full ttl, or
    /// (etcd, which answers a refresh that closely follows another from that one) what is left
    /// of it, never less than nine tenths of it. `None` when the lease is unknown or expired.
    fn keep_alive(&self, lease: LeaseId) -> BoxFuture<'_, Result<Option<Lease>>>;

    /// Ends a lease now, removing its instances as an expiry would. `false` when it did not exist.
    fn revoke_lease(&self, lease: LeaseId) -> BoxFuture<'_, Result<bool>>;

    /// The namespace of the instances `lease` holds (a lease holds instances of one namespace
    /// only); `None` when it holds none, or is unknown.
    fn lease_namespace(&self, lease: LeaseId) -> BoxFuture<'_, Result<Option<String>>>;

    /// The instances of one service, sorted by id. Every backend answers reads from memory.
    fn list(&self, namespace: &str, service: &str) -> Result<Snapshot>;

    /// The services of a namespace with their counts, sorted by name.
    fn list_services(&self, namespace: &str) -> Result<ServiceList>;

    /// How much the store holds, in all and in `namespace` and its `service`.
    fn usage(&self, namespace: &str, service: &str) -> Result<Usage>;

    /// Every change from now on, of every service, in revision order. It has no start of its own:
    /// a reader subscribes here first and then asks [`watch`](Store::watch) where to start, which
    /// then covers every change this feed may have missed.
    fn changes(&self) -> ChangeFeed;

    /// Where following `namespace`/`service` starts: a snapshot, or a replay of the changes
    /// after `after` when the history allows. See the contract above.
    fn watch<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
        after: Option<Revision>,
    ) -> BoxFuture<'a, Result<WatchStart>>;

    /// Every instance with a health check (all namespaces), and a feed of what follows, with
    /// the same no-gap guarantee as [`watch`](Store::watch).
    ///
    /// A backend shared by several servers answers on one of them at a time (the others wait
    /// here), and closes the feed when that server must stop checking.
    fn watch_checks(&self) -> BoxFuture<'_, Result<(Snapshot, ChangeFeed)>>;

    /// Whether the backend can serve, as it changes (`Err` with the reason when it cannot), for
    /// the server's health status. `None` for a backend that is up whenever the process is.
    fn serving(&self) -> Option<tokio::sync::watch::Receiver<std::result::Result<(), String>>> {
        None
    }
}
