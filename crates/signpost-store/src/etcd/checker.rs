//! The checker election: active health checks run on the one server that holds the checker key,
//! put on a short etcd lease that it keeps alive for as long as it can.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio::time::Instant;

use super::members::{Members, Repeat};
use super::refresh::Refresher;
use super::write::{Cas, else_kv};
use super::{EtcdStore, unavailable};
use crate::Result;

impl EtcdStore {
    /// Becomes the server that runs the health checks, waiting for as long as another one is.
    /// The returned watch turns false when this server is no longer it.
    pub(super) async fn campaign(&self) -> Result<watch::Receiver<bool>> {
        // Held from an earlier call (the checker re-subscribes after a lag): keep it.
        let mut checker = self.inner.checker.lock().await;
        if let Some(held) = checker.as_ref().filter(|held| *held.borrow()) {
            return Ok(held.clone());
        }
        let held = self.win_checker().await?;
        *checker = Some(held.clone());
        Ok(held)
    }

    async fn win_checker(&self) -> Result<watch::Receiver<bool>> {
        let ttl = self.inner.config.checker_ttl.max(Duration::from_secs(1));
        let secs = i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX);
        let key = self.inner.keys.checker.clone();
        let members = &self.inner.members;
        loop {
            self.replica().check()?;
            // Safe to repeat: a grant whose answer was lost leaves a lease nothing is attached
            // to, which etcd expires after its ttl.
            // A member failing over is no reason to stop campaigning: only a store that cannot
            // follow etcd at all (checked above) is.
            let lease = match members
                .call(Repeat::Safe, self.deadline(), |client| async move {
                    client.lease_client().grant(secs, None).await
                })
                .await
            {
                Ok(granted) => granted.id(),
                Err(e) => {
                    tracing::debug!(error = %unavailable(e), "cannot campaign for the checker key yet");
                    tokio::time::sleep(ttl / 3).await;
                    continue;
                }
            };
            // Safe to repeat (see `cas`): the compare is on the key's absence, which an applied
            // attempt ended; a refused repeat that finds the key on this very lease is that
            // attempt's win.
            let txn = Txn::new()
                .when([Compare::create_revision(
                    key.as_slice(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(
                    key.as_slice(),
                    format!("pid {}", std::process::id()),
                    Some(PutOptions::new().with_lease(lease)),
                )])
                .or_else([TxnOp::get(key.as_slice(), None)]);
            let won = match self.cas(txn).await {
                Ok(Cas::Applied(_)) => true,
                Ok(Cas::Refused { resp, repeated }) => {
                    repeated && else_kv(&resp).is_some_and(|kv| kv.lease() == lease)
                }
                // Unknown whether it applied: if it did, the key sits on a lease nobody keeps
                // alive and is free again within its ttl.
                Err(e) => {
                    tracing::debug!(error = %unavailable(e), "cannot campaign for the checker key yet");
                    false
                }
            };
            if won {
                let (held_tx, held) = watch::channel(true);
                // Not aborted with the store: when the store goes, its receiver of `held` goes,
                // and the task revokes the key's lease on its way out, so that another server
                // takes the checks over at once rather than after the lease's ttl.
                tokio::spawn(hold(
                    members.clone(),
                    self.inner.refresher.clone(),
                    ttl,
                    held_tx,
                    lease,
                ));
                tracing::info!("this server runs the health checks");
                return Ok(held);
            }
            let _ = members
                .call(Repeat::Safe, self.deadline(), |client| async move {
                    client.lease_client().revoke(lease).await
                })
                .await;
            tokio::time::sleep(ttl / 3).await;
        }
    }
}

/// Keeps the checker lease alive until it cannot; then says so and gives the lease up.
///
/// Each refresh is one call through the member set, so that a member dying moves the refreshes
/// to another instead of losing the key; one that hangs (a member whose leader just died) is
/// given up on after a third of the ttl and the next refresh goes elsewhere. The key counts as
/// lost once no refresh has worked for five sixths of the ttl, counted from when the last good
/// one was sent: etcd's deadline runs from no earlier than that, so this server stops before
/// another can win. A leader election alone does not lose it: etcd's new leader extends every
/// lease.
async fn hold(
    members: Arc<Members>,
    refresher: Arc<Refresher>,
    ttl: Duration,
    held: watch::Sender<bool>,
    lease: i64,
) {
    let mut refreshed_at = Instant::now();
    loop {
        tokio::select! {
            _ = held.closed() => break,
            _ = tokio::time::sleep(ttl / 6) => {}
        }
        let sent = Instant::now();
        let give_up = refreshed_at + ttl * 5 / 6;
        // Safe to repeat: a refresh applied twice is one refresh.
        let refreshed = members
            .call_on(
                Repeat::Safe,
                (sent + ttl / 3).min(give_up),
                |member, client| refresher.refresh(member, client, lease),
            )
            .await;
        match refreshed {
            Ok(Some(_)) => refreshed_at = sent,
            Ok(None) => {
                tracing::warn!(
                    "lost the checker key (its lease expired): health checks move to another server"
                );
                break;
            }
            Err(e) if Instant::now() >= give_up => {
                tracing::warn!(error = %e, "lost the checker key: health checks move to another server");
                break;
            }
            Err(_) => {}
        }
    }
    held.send_replace(false);
    let deadline = Instant::now() + ttl;
    let _ = members
        .call(Repeat::Safe, deadline, |client| async move {
            client.lease_client().revoke(lease).await
        })
        .await;
}
