//! The HTTP API, on a port of its own: the part of Consul's HTTP API that Consul's clients use
//! (`consul`: python-consul, py-consul, Prometheus' `consul_sd_configs`, Traefik's Consul
//! Catalog), and Prometheus' HTTP service discovery (`prometheus`).
//!
//! Every request goes through the same [`Registry`] as the gRPC API: the same tokens and grants,
//! validation, limits and store writes; reads come from the live views (`view`) that xDS and DNS
//! use, so that a blocking query wakes when its service changes and only then. This module owns
//! the listener; `request` what every handler shares (the request as read, and the answers in
//! Consul's status codes, plain-text errors and `X-Consul-*` headers); `consul` routes.

mod consul;
mod expr;
mod prometheus;
mod register;
mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Registry;

pub use consul::HttpConfig;

/// A bound HTTP API listener, with its settings.
#[derive(Debug)]
pub struct HttpListener {
    listener: TcpListener,
    config: HttpConfig,
}

impl HttpListener {
    pub async fn bind(addr: SocketAddr, config: HttpConfig) -> std::io::Result<HttpListener> {
        Ok(HttpListener {
            listener: TcpListener::bind(addr).await?,
            config,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// How long a request's headers may take to arrive.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open requests (blocking queries among them) get to finish on shutdown.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves the HTTP API until `shutdown` is cancelled.
pub(crate) async fn serve(listener: HttpListener, registry: Registry, shutdown: CancellationToken) {
    let local = listener.local_addr().ok();
    let HttpListener { listener, config } = listener;
    let api = Arc::new(consul::Api::new(registry, config, local, shutdown.clone()));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "the HTTP API cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let api = api.clone();
        let service = hyper::service::service_fn(move |request| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request, peer).await) }
        });
        let connection = builder.serve_connection(TokioIo::new(tcp), service);
        let watched = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = watched.await {
                tracing::debug!(%peer, %error, "HTTP API connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => {}
    }
}
