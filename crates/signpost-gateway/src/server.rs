//! The client side: accept connections (plain, or TLS with ALPN `h2` and `http/1.1`), serve
//! HTTP/1.1 and HTTP/2 on each (hyper-util's `auto` builder tells them apart by the first
//! bytes, so h2c with prior knowledge works on the plain port), with upgrades, and drain on
//! shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::h1;
use crate::pace::Stall;
use crate::proxy::Proxy;

/// Limits on the client side.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    /// The largest request head (request line and headers) accepted; past it, 431.
    pub(crate) max_header_bytes: usize,
    /// How long a client may take to send a request's head.
    pub(crate) header_timeout: Duration,
    /// How long shutdown waits for requests in flight.
    pub(crate) drain_timeout: Duration,
}

/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20);
    let builder = Arc::new(builder);
    let limits = Arc::new(limits);
    // hyper's connections drain through `graceful`; those on the gateway's own HTTP/1.1 path
    // stop between requests when `stop` fires, and `connections` waits for all of them.
    let stop = CancellationToken::new();
    let connections = TaskTracker::new();
    tokio::pin!(shutdown);
    loop {
        // A connection past the limit waits in the kernel's backlog until one ends.
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors, most often: wait rather than spin.
                    tracing::warn!(%error, "the gateway cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            proxy.metrics.connections.inc();
            match tls {
                None => match h1::serve(
                    tcp,
                    peer,
                    proxy.clone(),
                    limits.max_header_bytes,
                    limits.header_timeout,
                    &stop,
                )
                .await
                {
                    h1::Outcome::Done => {}
                    h1::Outcome::Handoff(rest) => {
                        let rest = Stall::new(rest, proxy.settings.idle_timeout);
                        serve_connection(&builder, rest, peer, false, proxy.clone(), watcher).await
                    }
                },
                Some(acceptor) => {
                    // Beneath TLS, so that what is paced is the socket itself.
                    let tcp = Stall::new(tcp, proxy.settings.idle_timeout);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(&builder, stream, peer, true, proxy.clone(), watcher)
                                .await
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            proxy.metrics.connections.dec();
        });
    }
    drop(listener);
    stop.cancel();
    connections.close();
    tokio::select! {
        _ = async { tokio::join!(graceful.shutdown(), connections.wait()) } => {}
        _ = tokio::time::sleep(limits.drain_timeout) => {
            tracing::warn!(timeout = ?limits.drain_timeout, "requests still in flight at the end of the drain; closing");
        }
    }
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    peer: SocketAddr,
    https: bool,
    proxy: Arc<Proxy>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let proxy = proxy.clone();
        // Boxed: hyper moves each request's future into a task of its own, and the proxy's
        // future is kilobytes; a pointer moves cheaper.
        let handling = Box::pin(proxy.handle(request, peer, https));
        async move { Ok::<_, std::convert::Infallible>(handling.await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(error) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(%peer, %error, "client connection ended with an error");
    }
}
