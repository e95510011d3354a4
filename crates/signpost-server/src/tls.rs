//! TLS on the registry port, with certificates that can be replaced while it serves.
//!
//! tonic's own TLS takes its certificates once, at start. Here the listener's connections are
//! accepted and their TLS handshakes made by this module, each with the configuration current at
//! that moment, and tonic serves the TLS streams it hands on. A new certificate (renewed, or a new
//! client CA) applies to every connection made after it arrives; connections already open, and
//! the Watch and KeepAlive streams on them, go on as they are. A configuration that cannot be
//! used (a key that does not match, a file cut short) is refused and the one before is kept.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::Tls;

/// The longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; a connection past that waits to start its own, so that
/// clients that connect and say nothing cannot take every file descriptor and task.
const MAX_HANDSHAKES: usize = 1_024;

/// The rustls configuration for `tls`, or what is wrong with it.
pub(crate) fn server_config(tls: &Tls) -> Result<Arc<ServerConfig>, String> {
    // Named, not the process default: a second crypto provider anywhere in the build would
    // otherwise leave rustls unable to choose, at run time.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&tls.key_pem)
        .map_err(|e| format!("the key is not a PEM private key: {e}"))?;
    let builder = match &tls.client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                let cert = cert.map_err(|e| format!("the client CA is not PEM: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("the client CA cannot be used: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                .build()
                .map_err(|e| format!("the client CA cannot be used: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("the certificate and key cannot be used together: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Follows `updates` into `current` until `stop`: each new configuration that can be used
/// replaces it; one that cannot is logged and dropped.
pub(crate) async fn follow(
    mut updates: watch::Receiver<Tls>,
    current: watch::Sender<Arc<ServerConfig>>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
        let tls = updates.borrow_and_update().clone();
        match server_config(&tls) {
            Ok(config) => {
                current.send_replace(config);
                tracing::info!("TLS certificates replaced: new connections use them");
            }
            Err(reason) => tracing::error!(
                %reason,
                "cannot use the new TLS certificates; still serving the ones before"
            ),
        }
    }
}

/// The connections `listener` accepts, as TLS streams made with the configuration current at
/// each handshake. The accepting task ends when the stream is dropped.
pub(crate) fn incoming(
    listener: TcpListener,
    config: watch::Receiver<Arc<ServerConfig>>,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = tx.closed() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors, most often: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Without TCP_NODELAY, answers larger than a segment wait ~40 ms on delayed ACKs.
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
