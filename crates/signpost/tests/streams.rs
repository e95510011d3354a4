//! Thousands of Watch streams on one connection to the real server process: opened in one burst,
//! then all sent one change. The server runs in its own process, as in production, so that the
//! client can open streams faster than the server takes them in.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_tests::process::ServerProcess;
use signpost_tests::{Client, instance, must, register, watch_request, within_for};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");
const STREAMS: usize = 10_000;

fn ids(message: &pb::WatchResponse) -> Vec<String> {
    message
        .events
        .iter()
        .filter_map(|e| e.instance.as_ref().map(|i| i.id.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_watches_on_one_connection_is_served_and_a_change_reaches_all_of_them() {
    // Each new Watch is a small DATA frame; HTTP/2 servers close a connection that sends "too
    // many" of them unread. A burst of watches is not an attack and must not cost the client its
    // connection (and every stream on it).
    let server = ServerProcess::start(Path::new(EXE), &["--store", "memory"]);
    let mut client = Client::connect(server.url()).await.unwrap();
    register(&mut client, instance("burst", "first", 1)).await;

    let mut opens = tokio::task::JoinSet::new();
    for _ in 0..STREAMS {
        let mut client = client.clone();
        opens.spawn(async move {
            let mut stream = client.watch(watch_request("burst")).await?.into_inner();
            let reset = stream.message().await?;
            Ok::<_, tonic::Status>((reset, stream))
        });
    }
    let mut streams = Vec::with_capacity(STREAMS);
    within_for(Duration::from_secs(120), "every watch opened", async {
        while let Some(opened) = opens.join_next().await {
            let (reset, stream) = must(must(opened, "watch task"), "watch");
            let reset = must(reset.ok_or("stream ended"), "reset");
            assert!(reset.reset);
            assert_eq!(ids(&reset), ["first"]);
            streams.push(stream);
        }
    })
    .await;

    register(&mut client, instance("burst", "second", 2)).await;
    let mut reads = tokio::task::JoinSet::new();
    for mut stream in streams {
        reads.spawn(async move {
            loop {
                match stream.message().await {
                    // Progress messages carry no events.
                    Ok(Some(message)) if message.events.is_empty() => continue,
                    Ok(Some(message)) => return Ok(message),
                    Ok(None) => return Err(tonic::Status::aborted("stream ended")),
                    Err(status) => return Err(status),
                }
            }
        });
    }
    let mut reached = 0;
    within_for(
        Duration::from_secs(120),
        "the change on every stream",
        async {
            while let Some(read) = reads.join_next().await {
                let message = must(must(read, "read task"), "watch message");
                assert_eq!(ids(&message), ["second"]);
                reached += 1;
            }
        },
    )
    .await;
    assert_eq!(reached, STREAMS);
}
