//! The README's greeter demo, as processes: a registry, two greeter-servers, a greeter-client;
//! and a greeter-server stopped the way an orchestrator stops it, with SIGTERM.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;

use signpost_tests::greeters::GreeterProcess;
use signpost_tests::process::run;
use signpost_tests::{TestServer, within};

fn start(registry: &str) -> GreeterProcess {
    GreeterProcess::start(
        Path::new(env!("CARGO_BIN_EXE_greeter-server")),
        registry,
        &[],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_greeters_share_the_calls_and_one_leaves_cleanly() {
    let registry = TestServer::start().await;
    let url = registry.url();
    let greeters = [start(&url), start(&url)];
    let ids: Vec<String> = greeters.iter().map(|g| g.id.clone()).collect();

    let client_url = url.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        run(Command::new(env!("CARGO_BIN_EXE_greeter-client")).args([
            "--registry",
            &client_url,
            "--count",
            "60",
            "--interval-ms",
            "5",
        ]))
    })
    .await
    .unwrap();
    assert!(ok, "greeter-client failed: {err}");
    assert!(!out.contains("failed"), "{out}");
    for id in &ids {
        assert!(
            out.contains(&format!("answered by {id}")),
            "{id} answered no call:\n{out}"
        );
    }

    // Ctrl-C: the greeter deregisters first, then stops, and exits cleanly.
    let [mut first, _second] = greeters;
    first.signal("INT");
    first.wait_for("deregistered (existed: true)");
    let status = first.exit_status();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_the_greeter_before_it_exits() {
    let registry = TestServer::start().await;
    let mut greeter = start(&registry.url());
    let id = greeter.id.clone();
    let client = signpost_client::Client::new(registry.url()).unwrap();
    let listed = |instances: Vec<signpost_client::Instance>| -> Vec<String> {
        instances.into_iter().map(|i| i.id).collect()
    };
    assert_eq!(listed(client.discover("greeter").await.unwrap()), [id]);

    greeter.signal("TERM");
    let line = greeter.wait_for("deregistered");
    assert!(line.contains("(existed: true) on SIGTERM"), "{line}");
    let status = tokio::task::block_in_place(|| greeter.exit_status());
    assert!(status.success(), "{status:?}");
    // Gone at once, not after its lease ran out: a Discover needs no waiting.
    let left = within(
        "discover after the greeter left",
        client.discover("greeter"),
    )
    .await;
    assert_eq!(
        listed(left.unwrap()),
        Vec::<String>::new(),
        "still registered"
    );
}
