//! The durable backend: the memory engine, with every change committed to an embedded database
//! (redb) before it is acknowledged or streamed to watchers.
//!
//! Writers apply their change to the in-memory state under the lock and queue it for the commit
//! thread. The thread takes everything queued, writes it in one transaction and one fsync (group
//! commit), then publishes the changes and wakes their writers, in revision order. So concurrent
//! writers share fsyncs, and a change is never streamed before it is on disk.
//!
//! What is kept: every instance, every lease with its ttl, the revision counter and the next
//! lease id. What is not: lease deadlines (after a restart every lease gets its full ttl again, so
//! clients have time to reconnect and refresh it — etcd does the same on a leader change) and the
//! watch history (a watcher resuming from before a restart gets a fresh reset, never a gap).
//!
//! Reads may see a change a moment before it is on disk. So that no revision or lease id a reader
//! may have seen before a crash is ever handed out again for something else, a restarted store
//! starts both counters [`MAX_IN_FLIGHT`] above what it finds on disk: at most that many changes
//! are ever applied in memory and not yet committed.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::codec::{decode_instance, encode_instance, key_bytes};
use crate::engine::{CommitLog, Engine, LeaseOp, Pending};
use crate::model::{Change, Instance, LeaseId, Revision};
use crate::state::State;
use crate::{Error, MemoryConfig, Result};

/// The most changes applied in memory and not yet on disk at any moment.
pub const MAX_IN_FLIGHT: u64 = 4_096;

/// The most queued mutations one transaction takes.
const MAX_BATCH: usize = 1_024;

const INSTANCES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("instances");
const LEASES: TableDefinition<u64, u64> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The database file inside the data directory.
pub const DATA_FILE: &str = "signpost.redb";
/// Held (flock) by the process that has the data directory open.
pub const LOCK_FILE: &str = "LOCK";

/// A store that survives restarts and crashes. Cheap to clone: clones share one state.
#[derive(Debug, Clone)]
pub struct DurableStore {
    engine: Arc<Engine>,
    closed: watch::Receiver<bool>,
    dir: PathBuf,
}

impl DurableStore {
    /// Opens (creating if missing) the data directory `dir`. Must be called inside a Tokio
    /// runtime. Fails with [`Error::Open`] naming the path when the directory cannot be created
    /// or written, is in use by another process, or holds a corrupt database.
    pub fn open(dir: impl AsRef<Path>, config: MemoryConfig) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let open_error = |path: &Path, reason: String| Error::Open {
            path: path.to_path_buf(),
            reason,
        };
        std::fs::create_dir_all(&dir).map_err(|e| open_error(&dir, e.to_string()))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| open_error(&lock_path, e.to_string()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(open_error(
                    &dir,
                    "it is in use by another signpost server (only one may run on a data directory)"
                        .into(),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(open_error(&lock_path, format!("cannot lock: {e}")));
            }
        }
        let data_path = dir.join(DATA_FILE);
        let db = Database::create(&data_path).map_err(|e| open_error(&data_path, e.to_string()))?;
        let loaded = load(&db).map_err(|e| open_error(&data_path, e))?;
        let now = Instant::now();
        let (state, orphans) = State::restore(
            loaded.revision,
            loaded.next_lease,
            config.history_limit,
            loaded.leases,
            loaded.instances,
            now,
        );
        if !orphans.is_empty() {
            tracing::warn!(
                count = orphans.len(),
                "dropping instances whose lease was not found on disk"
            );
        }
        persist_start(&db, &state, &orphans).map_err(|e| open_error(&data_path, e))?;
        tracing::info!(
            path = %dir.display(),
            revision = state.revision(),
            instances = loaded.count,
            "opened data directory"
        );

        let (feed, _) = broadcast::channel(config.feed_capacity.max(1));
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(OnceLock::new());
        let (closed_tx, closed) = watch::channel(false);
        let committer = Committer {
            db,
            rx,
            feed: feed.clone(),
            failed: failed.clone(),
            _lock: lock,
        };
        std::thread::Builder::new()
            .name("signpost-commit".into())
            .spawn(move || {
                committer.run();
                let _ = closed_tx.send(true);
            })
            .map_err(|e| open_error(&dir, format!("cannot start the commit thread: {e}")))?;
        let log = CommitLog {
            tx,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
            failed,
        };
        Ok(DurableStore {
            engine: Engine::start(state, feed, Some(log)),
            closed,
            dir,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Drops this handle and waits until the database is closed and the directory unlocked,
    /// which happens once every clone is dropped.
    pub async fn close(self) {
        let DurableStore {
            engine, mut closed, ..
        } = self;
        drop(engine);
        let _ = closed.wait_for(|closed| *closed).await;
    }
}

struct Loaded {
    revision: Revision,
    next_lease: LeaseId,
    leases: Vec<(LeaseId, Duration)>,
    instances: Vec<Instance>,
    count: usize,
}

fn load(db: &Database) -> std::result::Result<Loaded, String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    let loaded = {
        let meta = txn.open_table(META).map_err(|e| e.to_string())?;
        let leases_table = txn.open_table(LEASES).map_err(|e| e.to_string())?;
        let instances_table = txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
        let get = |name: &str| -> std::result::Result<Option<u64>, String> {
            Ok(meta
                .get(name)
                .map_err(|e| e.to_string())?
                .map(|v| v.value()))
        };
        let fresh = get("revision")?.is_none();
        let gap = if fresh { 0 } else { MAX_IN_FLIGHT };
        let revision = get("revision")?.unwrap_or(0).saturating_add(gap);
        let next_lease = get("next_lease")?.unwrap_or(1).saturating_add(gap);
        let mut leases = Vec::new();
        for row in leases_table.iter().map_err(|e| e.to_string())? {
            let (id, ttl) = row.map_err(|e| e.to_string())?;
            leases.push((id.value(), Duration::from_nanos(ttl.value())));
        }
        let mut instances = Vec::new();
        for row in instances_table.iter().map_err(|e| e.to_string())? {
            let (_, value) = row.map_err(|e| e.to_string())?;
            instances.push(decode_instance(value.value()).map_err(|e| e.to_string())?);
        }
        let count = instances.len();
        Loaded {
            revision,
            next_lease,
            leases,
            instances,
            count,
        }
    };
    txn.commit().map_err(|e| e.to_string())?;
    Ok(loaded)
}

/// Writes the new starting counters (and drops orphaned rows) before anything is served, so a
/// second crash before the first commit still restarts above them.
fn persist_start(
    db: &Database,
    state: &State,
    orphans: &[Instance],
) -> std::result::Result<(), String> {
    let txn = db.begin_write().map_err(|e| e.to_string())?;
    {
        let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
        meta.insert("revision", state.revision())
            .map_err(|e| e.to_string())?;
        meta.insert("next_lease", state.next_lease())
            .map_err(|e| e.to_string())?;
        let mut instances = txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
        for orphan in orphans {
            instances
                .remove(key_bytes(&orphan.key()).as_slice())
                .map_err(|e| e.to_string())?;
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

struct Committer {
    db: Database,
    rx: mpsc::UnboundedReceiver<Pending>,
    feed: broadcast::Sender<Arc<Change>>,
    failed: Arc<OnceLock<String>>,
    // Released only when the database is closed, after the last commit.
    _lock: File,
}

impl Committer {
    fn run(mut self) {
        while let Some(first) = self.rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.rx.try_recv() {
                    Ok(pending) => batch.push(pending),
                    Err(_) => break,
                }
            }
            let result = match self.failed.get() {
                Some(reason) => Err(reason.clone()),
                None => self.write(&batch),
            };
            match result {
                Ok(()) => {
                    for pending in batch {
                        for change in pending.changes {
                            let _ = self.feed.send(change);
                        }
                        let _ = pending.done.send(Ok(()));
                    }
                }
                Err(reason) => {
                    if self.failed.set(reason.clone()).is_ok() {
                        tracing::error!(error = %reason, "cannot write to the data directory; the store stops serving");
                    }
                    for pending in batch {
                        let _ = pending.done.send(Err(Error::Unavailable(format!(
                            "cannot write to the data directory: {reason}"
                        ))));
                    }
                }
            }
        }
    }

    fn write(&self, batch: &[Pending]) -> std::result::Result<(), String> {
        let txn = self.db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut instances = txn.open_table(INSTANCES).map_err(|e| e.to_string())?;
            let mut leases = txn.open_table(LEASES).map_err(|e| e.to_string())?;
            let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
            for pending in batch {
                for change in &pending.changes {
                    for event in &change.events {
                        match (&event.current, &event.prev) {
                            (Some(current), _) => {
                                let key = key_bytes(&current.key());
                                instances
                                    .insert(key.as_slice(), encode_instance(current).as_slice())
                                    .map_err(|e| e.to_string())?;
                            }
                            (None, Some(prev)) => {
                                instances
                                    .remove(key_bytes(&prev.key()).as_slice())
                                    .map_err(|e| e.to_string())?;
                            }
                            (None, None) => {}
                        }
                    }
                }
                for op in &pending.leases {
                    match op {
                        LeaseOp::Put { id, ttl } => {
                            let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
                            leases.insert(*id, ttl).map_err(|e| e.to_string())?;
                        }
                        LeaseOp::Delete(id) => {
                            leases.remove(*id).map_err(|e| e.to_string())?;
                        }
                    }
                }
            }
            if let Some(last) = batch.last() {
                meta.insert("revision", last.revision)
                    .map_err(|e| e.to_string())?;
                meta.insert("next_lease", last.next_lease)
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }
}

crate::engine::store_on_engine!(DurableStore);
