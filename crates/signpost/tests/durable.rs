//! The durable store through the real binary: crash it with SIGKILL at random moments under
//! concurrent registrations; nothing acknowledged may be lost and revisions never go back.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use signpost_proto::v1 as pb;
use signpost_proto::v1::registry_service_client::RegistryServiceClient;
use signpost_tests::process::ServerProcess;
use signpost_tests::{DEADLINE, instance, register_request, within};

const EXE: &str = env!("CARGO_BIN_EXE_signpost");

async fn connect(url: String) -> RegistryServiceClient<tonic::transport::Channel> {
    within("connect", RegistryServiceClient::connect(url))
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_acknowledged_is_lost_across_twenty_kill_9_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill timing seed: {seed}");
    let mut rng = seed;
    let mut next_delay = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        Duration::from_millis(20 + rng % 300)
    };

    let acknowledged: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let mut highest_acknowledged = 0;
    for cycle in 0..20 {
        let server = ServerProcess::start(
            Path::new(EXE),
            &["--store", "durable", "--data-dir", &data_dir],
        );
        let url = server.url();

        // Everything acknowledged in earlier cycles is here, and revisions went on upwards.
        let mut client = connect(url.clone()).await;
        let found = within(
            "discover",
            client.discover(pb::DiscoverRequest {
                service: "crash".into(),
                ..Default::default()
            }),
        )
        .await
        .expect("discover")
        .into_inner();
        let present: std::collections::BTreeSet<String> =
            found.instances.iter().map(|i| i.id.clone()).collect();
        for (id, revision) in acknowledged.lock().unwrap().iter() {
            assert!(
                present.contains(id),
                "cycle {cycle}: {id} (acknowledged at revision {revision}) was lost"
            );
        }
        assert!(
            found.revision >= highest_acknowledged,
            "cycle {cycle}: revision went back from {highest_acknowledged} to {}",
            found.revision
        );

        let writers: Vec<_> = (0..8)
            .map(|task| {
                let url = url.clone();
                let acknowledged = acknowledged.clone();
                tokio::spawn(async move {
                    // The kill may come before this writer connects, or while a call waits for
                    // its answer: either way the server is gone, and an unanswered call was not
                    // acknowledged. Bounded, so that a connection whose end is never seen
                    // cannot hold the test.
                    let Ok(Ok(mut client)) =
                        tokio::time::timeout(DEADLINE, RegistryServiceClient::connect(url)).await
                    else {
                        return;
                    };
                    let mut last = 0;
                    for n in 0.. {
                        let id = format!("c{cycle}-t{task}-{n}");
                        let call =
                            client.register(register_request(instance("crash", &id, 9000), None));
                        match tokio::time::timeout(DEADLINE, call)
                            .await
                            .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer")))
                        {
                            Ok(answer) => {
                                let revision = answer.into_inner().revision;
                                assert!(revision > last, "one writer's revisions increase");
                                last = revision;
                                acknowledged.lock().unwrap().push((id, revision));
                            }
                            Err(_) => break, // the server is gone
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(next_delay()).await;
        server.kill9();
        for writer in writers {
            within("a writer stops", writer).await.expect("writer task");
        }
        highest_acknowledged = acknowledged
            .lock()
            .unwrap()
            .iter()
            .map(|(_, r)| *r)
            .max()
            .unwrap_or(0);
    }
    let total = acknowledged.lock().unwrap().len();
    eprintln!("{total} registrations acknowledged over 20 crashes");
    assert!(
        total > 100,
        "only {total} registrations were acknowledged in 20 cycles"
    );

    let server = ServerProcess::start(
        Path::new(EXE),
        &["--store", "durable", "--data-dir", &data_dir],
    );
    let mut client = connect(server.url()).await;
    let found = client
        .discover(pb::DiscoverRequest {
            service: "crash".into(),
            ..Default::default()
        })
        .await
        .expect("discover")
        .into_inner();
    assert!(found.instances.len() >= total);
    let next = client
        .register(register_request(instance("crash", "after", 1), None))
        .await
        .expect("register")
        .into_inner();
    assert!(next.revision > highest_acknowledged);
}

#[test]
fn a_data_directory_in_use_is_refused_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let _first = ServerProcess::start(Path::new(EXE), &["--data-dir", data_dir]);
    let second = ServerProcess::spawn(Path::new(EXE), &["--data-dir", data_dir]);
    let (status, logs) = second.wait_exit();
    assert!(
        !status.success(),
        "a second server on the same data directory must not run"
    );
    assert!(logs.contains("in use by another signpost server"), "{logs}");
    assert!(logs.contains(data_dir), "{logs}");
}

#[test]
fn an_unusable_data_directory_is_one_clear_error_and_a_non_zero_exit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("data");
    let output = std::process::Command::new(EXE)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            bad.to_str().unwrap(),
        ])
        .output()
        .expect("run signpost");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot open the data directory"),
        "{stderr}"
    );
    assert!(stderr.contains(bad.to_str().unwrap()), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
