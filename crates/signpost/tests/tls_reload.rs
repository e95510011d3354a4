//! Certificates replaced while the server runs: on SIGHUP and when the files change, new
//! connections get the new certificate, connections and streams already open go on, and files
//! that cannot be used keep the certificates being served.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use signpost_tests::process::ServerProcess;
use signpost_tests::tls::Pki;
use signpost_tests::{instance, register_request, watch_request, within};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

async fn channel(server: &ServerProcess, ca: &str) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    Endpoint::from_shared(format!("https://{}", server.addr))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// Whether a new connection trusting `ca` is answered.
async fn served(server: &ServerProcess, ca: &str) -> bool {
    match channel(server, ca).await {
        Err(_) => false,
        Ok(channel) => RegistryServiceClient::new(channel)
            .list_services(pb::ListServicesRequest::default())
            .await
            .is_ok(),
    }
}

/// Replaces `path` at once, as certificate tools do: no reader sees half a file.
fn replace(path: &Path, contents: &str) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, contents).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificates_serve_new_connections_while_open_streams_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("server.pem"), dir.path().join("server.key"));
    let first = Pki::new("first");
    replace(&cert, &first.server_cert_pem);
    replace(&key, &first.server_key_pem);
    let mut server = ServerProcess::start(
        Path::new(EXE),
        &[
            "--store",
            "memory",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let mut before = RegistryServiceClient::new(channel(&server, &first.ca_pem).await.unwrap());
    let mut watch = before
        .watch(watch_request("svc"))
        .await
        .unwrap()
        .into_inner();
    let reset = within("the watch's first message", watch.message()).await;
    assert!(reset.unwrap().unwrap().reset);

    // Renewed in place, then SIGHUP, as `systemctl reload` sends it.
    let second = Pki::new("second");
    replace(&cert, &second.server_cert_pem);
    replace(&key, &second.server_key_pem);
    server.hangup();
    server.wait_for_log("TLS certificates replaced");
    assert!(
        served(&server, &second.ca_pem).await,
        "a new connection gets the new certificate"
    );
    assert!(
        !served(&server, &first.ca_pem).await,
        "and no longer the old one"
    );

    // The stream opened before the change goes on, on its connection of the old certificate.
    let mut after = RegistryServiceClient::new(channel(&server, &second.ca_pem).await.unwrap());
    after
        .register(register_request(instance("svc", "after", 1), None))
        .await
        .unwrap();
    loop {
        let message = within("the open watch's next event", watch.message())
            .await
            .unwrap()
            .unwrap();
        if let Some(event) = message.events.first() {
            assert_eq!(event.instance.as_ref().unwrap().id, "after");
            break;
        }
    }
    before
        .list_services(pb::ListServicesRequest::default())
        .await
        .expect("the old connection goes on too");

    // A certificate that does not match its key is refused; the one before stays in use. No
    // signal this time: the changed files are noticed by themselves.
    let third = Pki::new("third");
    replace(&cert, &third.server_cert_pem);
    server.wait_for_log("cannot use the new TLS certificates");
    assert!(
        served(&server, &second.ca_pem).await,
        "still the second certificate"
    );

    // Completed, the pair is taken up without a signal either.
    replace(&key, &third.server_key_pem);
    server.wait_for_log("TLS certificates replaced");
    assert!(
        served(&server, &third.ca_pem).await,
        "the third certificate"
    );
    server.terminate();
}
