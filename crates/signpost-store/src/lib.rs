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
//! use signpost_store::{Instance, MemoryConfig, MemoryStore, Store};
//! use std::time::Duration;
//!
//! let store = MemoryStore::new(MemoryConfig::default());
//! let lease = store.grant_lease(Duration::from_secs(10)).await?;
//! let instance = Instance {
//!     namespace: "default".into(),
//!     service: "greeter".into(),
//!     id: "greeter-1".into(),
//!     address: "127.0.0.1".into(),
//!     port: 50051,
//!     ..Instance::default()
//! };
//! let stored = store.put(instance, Some(lease.id)).await?;
//! let snapshot = store.list("default", "greeter").await?;
//! assert_eq!(snapshot.instances, vec![stored]);
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
    Change, Counts, Deleted, Encoded, Event, Health, HealthCheck, Instance, InstanceKey, Lease,
    LeaseId, Metadata, Probe, RemovalCause, Revision, ServiceList, ServiceSummary, Sizes, Snapshot,
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
            encoded: Default::default(),
        }
    }
}

/// A health verdict from the server's checker, for [`Store::set_health`].
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

/// The answer to [`Store::watch`]: where to start, and the feed of what comes after.
#[derive(Debug)]
pub struct Watch {
    pub start: WatchStart,
    /// May also deliver changes at or before the start's revision: skip those.
    pub feed: ChangeFeed,
}

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
/// - **Instances.** [`put`](Store::put) is an upsert. The store owns `health`, `lease_id`,
///   `create_revision` (kept across updates) and `mod_revision` (the change's revision).
/// - **Leases.** A lease lives for its ttl after its grant or last refresh; then, within about a
///   second, every instance on it is removed with [`RemovalCause::Expired`]. A lease past its
///   deadline counts as gone even before that sweep: it cannot be refreshed or attached to.
/// - **Reads.** [`list`](Store::list) and [`list_services`](Store::list_services) see every change
///   up to the revision they report and none after it.
/// - **Watch.** [`watch`](Store::watch) returns a start and a feed with no gap and no overlap in
///   meaning: every change after the start's revision is delivered on the feed, in order (the
///   feed may also repeat changes at or before it, which the caller skips). Resuming `after` a
///   revision replays exactly the changes after it when the history still holds them all; when it
///   does not (compacted, or a revision this store never reached), the start is a fresh snapshot
///   instead — never a replay with holes.
/// - **Slow readers.** A feed subscriber that falls behind gets [`FeedItem::Lagged`]; it then reads
///   a fresh [`list`](Store::list) and skips the feed's changes at or before its revision. A lagging
///   subscriber never slows writers or other subscribers.
/// - **Errors.** A backend that cannot be reached answers [`Error::Unavailable`].
pub trait Store: Send + Sync + 'static {
    /// Upserts an instance, attached to `lease` when one is given (which must be live).
    fn put(
        &self,
        instance: Instance,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Arc<Instance>>> + Send;

    /// Removes an instance with [`RemovalCause::Deregistered`]; idempotent.
    fn delete(&self, key: &InstanceKey) -> impl Future<Output = Result<Deleted>> + Send;

    /// Grants a lease that lives for `ttl` unless refreshed.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<Lease>> + Send;

    /// Gives a live lease its full ttl again. `None` when the lease is unknown or expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<Option<Lease>>> + Send;

    /// Ends a lease now, removing its instances as an expiry would. `false` when it did not exist.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<bool>> + Send;

    /// The instances of one service, sorted by id.
    fn list(&self, namespace: &str, service: &str)
    -> impl Future<Output = Result<Snapshot>> + Send;

    /// The services of a namespace with their counts, sorted by name.
    fn list_services(&self, namespace: &str) -> impl Future<Output = Result<ServiceList>> + Send;

    /// Every change from now on, of every service, in revision order: for a reader that routes
    /// changes onwards (the server's watch fan-out). It has no start of its own; a reader that
    /// needs one subscribes here first and then calls [`watch`](Store::watch), whose start then
    /// covers every change this feed may have missed.
    fn changes(&self) -> ChangeFeed;

    /// Starts following changes: a snapshot of `namespace`/`service`, or a replay of the changes
    /// after `after` when the history allows. See the contract above.
    fn watch(
        &self,
        namespace: &str,
        service: &str,
        after: Option<Revision>,
    ) -> impl Future<Output = Result<Watch>> + Send;

    /// Records a health verdict. Only a change of status is a change (one revision), and the
    /// first verdict on a check even when the status stays the same (so that its output is
    /// there for an instance that never passed); a verdict
    /// for an instance that is gone, was registered anew, or whose check changed is dropped.
    /// Answers the stored instance when it changed.
    fn set_health(
        &self,
        update: HealthUpdate,
    ) -> impl Future<Output = Result<Option<Arc<Instance>>>> + Send;

    /// Removes an instance that stayed critical too long ([`RemovalCause::Unhealthy`]), if it is
    /// still the registration with `create_revision`.
    fn evict(
        &self,
        key: &InstanceKey,
        create_revision: Revision,
    ) -> impl Future<Output = Result<Deleted>> + Send;

    /// One instance, if it is registered.
    fn get(&self, key: &InstanceKey) -> impl Future<Output = Result<Option<Arc<Instance>>>> + Send;

    /// How many instances `namespace` and its `service` hold, and how many leases are live.
    /// Backends that do not track leases (etcd, whose leases are its own) answer 0 for them.
    fn sizes(&self, namespace: &str, service: &str) -> impl Future<Output = Result<Sizes>> + Send;

    /// How much the store holds, for metrics.
    fn counts(&self) -> impl Future<Output = Result<Counts>> + Send;

    /// Every instance with a health check (all namespaces), and a feed of what follows, with
    /// the same no-gap guarantee as [`watch`](Store::watch).
    ///
    /// A backend shared by several servers answers on one of them at a time (the others wait
    /// here), and closes the feed when that server must stop checking.
    fn watch_checks(&self) -> impl Future<Output = Result<(Snapshot, ChangeFeed)>> + Send;

    /// Whether the backend can serve, as it changes (`Err` with the reason when it cannot), for
    /// the server's health status. `None` for a backend that is up whenever the process is.
    fn serving(&self) -> Option<tokio::sync::watch::Receiver<std::result::Result<(), String>>> {
        None
    }
}
