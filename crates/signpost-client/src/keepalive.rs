//! One KeepAlive stream per client, shared by all its registrations: each lease is refreshed at
//! its own interval, and a lease the registry reports expired is handed back to its owner.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use signpost_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;

use crate::backoff::Backoff;
use crate::connections::Connections;

enum Command {
    Add {
        lease: u64,
        every: Duration,
        expired: oneshot::Sender<()>,
    },
    Remove {
        lease: u64,
    },
}

/// A handle on the shared stream. The stream's task ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct KeepAlives {
    tx: mpsc::UnboundedSender<Command>,
}

struct Entry {
    every: Duration,
    due: Instant,
    expired: oneshot::Sender<()>,
}

impl KeepAlives {
    pub(crate) fn start(conn: Arc<Connections>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(conn, rx));
        KeepAlives { tx }
    }

    /// Refreshes `lease` every `every` until removed; `expired` fires if the registry says the
    /// lease is gone.
    pub(crate) fn add(&self, lease: u64, every: Duration, expired: oneshot::Sender<()>) {
        let _ = self.tx.send(Command::Add {
            lease,
            every,
            expired,
        });
    }

    pub(crate) fn remove(&self, lease: u64) {
        let _ = self.tx.send(Command::Remove { lease });
    }
}

/// Applies a command; false when every handle is gone and the task should end.
fn command(leases: &mut HashMap<u64, Entry>, command: Option<Command>) -> bool {
    match command {
        None => false,
        Some(Command::Add {
            lease,
            every,
            expired,
        }) => {
            let due = Instant::now() + every;
            leases.insert(
                lease,
                Entry {
                    every,
                    due,
                    expired,
                },
            );
            true
        }
        Some(Command::Remove { lease }) => {
            leases.remove(&lease);
            true
        }
    }
}

async fn run(conn: Arc<Connections>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let (base, max) = conn.backoff;
    let mut backoff = Backoff::new(base, max);
    let mut leases: HashMap<u64, Entry> = HashMap::new();
    loop {
        // Nothing to refresh: no stream either, until a lease is added.
        if leases.is_empty() && !command(&mut leases, commands.recv().await) {
            return;
        }
        let (requests, outbound) = mpsc::channel::<pb::KeepAliveRequest>(256);
        let (index, mut client) = conn.current();
        let mut inbound = match client.keep_alive(ReceiverStream::new(outbound)).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let error = conn.error(index, status);
                if error.is_transient() {
                    conn.failed(index);
                }
                let delay = backoff.next_delay();
                tracing::warn!(%error, ?delay, "keep-alive stream cannot connect; retrying");
                let wait = tokio::time::sleep(delay);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        c = commands.recv() => if !command(&mut leases, c) { return },
                    }
                }
                continue;
            }
        };
        // A fresh stream refreshes everything at once: the gap may have eaten into the ttls.
        let now = Instant::now();
        for entry in leases.values_mut() {
            entry.due = now;
        }
        loop {
            let next_due = leases.values().map(|e| e.due).min();
            tokio::select! {
                c = commands.recv() => if !command(&mut leases, c) { return },
                _ = async {
                    match next_due {
                        Some(due) => tokio::time::sleep_until(due).await,
                        None => std::future::pending().await,
                    }
                } => {
                    let now = Instant::now();
                    for (lease, entry) in leases.iter_mut().filter(|(_, e)| e.due <= now) {
                        entry.due = now + entry.every;
                        if requests.try_send(pb::KeepAliveRequest { lease_id: *lease }).is_err() {
                            // The stream is not taking requests: let the next turn find out why.
                            break;
                        }
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(answer)) => {
                        backoff.reset();
                        if answer.expired && let Some(entry) = leases.remove(&answer.lease_id) {
                            tracing::warn!(lease = answer.lease_id, "registry says the lease expired");
                            let _ = entry.expired.send(());
                        }
                    }
                    Ok(None) | Err(_) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(?delay, "keep-alive stream broke; reconnecting");
                        tokio::time::sleep(delay).await;
                        break;
                    }
                },
            }
        }
    }
}
