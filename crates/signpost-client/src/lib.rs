//! The Rust client of Signpost, the service registry for gRPC.
//!
//! Two jobs. A service registers itself and stays registered through anything short of its own
//! death ([`Client::register`] → [`Registration`]). A caller gets a balanced channel, the
//! transport of any tonic-generated client, that spreads calls over the live instances of a
//! service, follows every change, and never sends a call to an instance whose connection is down
//! ([`Client::channel`] → [`BalancedChannel`]).
//!
//! How it fits: a [`Client`] holds one lazily connected HTTP/2 channel per registry address
//! (failing over to the next when one is unreachable). All its registrations share one KeepAlive
//! stream (`keepalive`), refreshing each lease at a third of its ttl; a lease the registry reports
//! expired is registered again. A balanced channel runs a watch (`watcher`) that survives the
//! registry going away — it keeps the last view, reconnects with backoff and resumes from the last
//! revision — and keeps one endpoint per instance (`balance`). Each endpoint owns an HTTP/2
//! connection and its state (`endpoint`); a call (`channel`) picks a ready endpoint by the rules
//! of `pick` (health, panic threshold, zone, power of two choices on latency and weight), retries
//! elsewhere a call that never left, and reports each answer to outlier detection (`outlier`).
//! [`Client::discover`] answers from such a watch's view when one runs for the same filter,
//! without a round trip.
//!
//! The HTTP/2 connections to instances are hyper's own (`hyper`, `hyper-util`, `h2`, `http`,
//! `http-body`, `bytes`, `tower-service`: the crates tonic is built on), so that the balancer
//! sees each connection end and gets back a request that was never written; `tokio-rustls`
//! (tonic's own TLS) speaks TLS to instances that want it (`tls`); `fastrand` draws the weighted
//! picks; `signpost-backoff` is the retry schedule every reconnect loop waits by.
//!
//! ```no_run
//! use std::time::Duration;
//! use signpost_client::{Client, RegistrationBuilder};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::new("http://127.0.0.1:7070")?;
//!
//! // A service registers itself; the lease is kept alive in the background.
//! let registration = client
//!     .register(
//!         RegistrationBuilder::new("greeter")
//!             .address("127.0.0.1")
//!             .port(50051)
//!             .tag("v1")
//!             .ttl(Duration::from_secs(10)),
//!     )
//!     .await?;
//!
//! // A caller balances over every live greeter.
//! let greeters = client.channel("greeter");
//! greeters.wait_for_ready(Duration::from_secs(5)).await?;
//! // Any generated client works on the channel; here, the standard gRPC health service.
//! let mut health = tonic_health::pb::health_client::HealthClient::new(greeters.channel());
//! let answer = health.check(tonic_health::pb::HealthCheckRequest::default()).await?;
//! println!("a greeter says {:?}", answer.into_inner().status());
//!
//! // On the way out.
//! registration.deregister().await?;
//! # Ok(())
//! # }
//! ```

mod balance;
mod channel;
mod client;
mod connections;
mod endpoint;
mod error;
mod filter;
mod keepalive;
mod load;
mod outlier;
mod pick;
mod registration;
mod signal;
mod tls;
mod types;
mod watcher;

pub use balance::{BalancedChannel, BalancedChannelBuilder};
pub use channel::{ChannelStats, EndpointStats, ResponseBody};
pub use client::{Client, ClientBuilder};
pub use endpoint::EndpointState;
pub use error::{Error, Result};
pub use filter::Filter;
pub use outlier::OutlierDetection;
pub use registration::{Registration, RegistrationBuilder, RegistrationState};
pub use signal::{Signal, shutdown_signal};
pub use signpost_backoff::Backoff;
pub use tls::InstanceTls;
pub use types::{Event, Health, HealthCheck, Instance, Probe, RemovalReason, WatchUpdate};
pub use watcher::{WatchCounts, WatchStats};

/// The balancer's rules, for balancers over Signpost that keep their own connections (the
/// gateway's HTTP/1.1 pools): which endpoint takes a call, when one is ejected, and how load is
/// weighed are then the same as a [`BalancedChannel`]'s.
pub mod rules {
    pub use crate::channel::grpc_timeout;
    pub use crate::load::{DECAY, Load};
    pub use crate::outlier::{Outlier, may_eject, record};
    pub use crate::pick::{Candidate, Known, Picked, Policy, pick};
}
