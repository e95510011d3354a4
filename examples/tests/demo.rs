//! The README's greeter demo, as processes: a registry, two greeter-servers, a greeter-client;
//! and a greeter-server stopped the way an orchestrator stops it, with SIGTERM.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use signpost_tests::process::run;
use signpost_tests::{DEADLINE, TestServer, within};

struct Greeter {
    child: Child,
    lines: Receiver<String>,
}

impl Greeter {
    fn start(registry: &str) -> Greeter {
        let mut child = Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--registry", registry, "--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("greeter-server");
        let (tx, lines) = channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Greeter { child, lines }
    }

    /// The instance id from its "serving on" line.
    fn serving(&self) -> String {
        let line = self.wait_for("serving on");
        line.split_whitespace().next().unwrap().to_owned()
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args([signal, &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the process to exit, failing the test past the deadline.
    fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "greeter-server did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("greeter-server printed no line with {needle:?}"),
            }
        }
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_greeters_share_the_calls_and_one_leaves_cleanly() {
    let registry = TestServer::start().await;
    let url = registry.url();
    let greeters = [Greeter::start(&url), Greeter::start(&url)];
    let ids: Vec<String> = greeters.iter().map(Greeter::serving).collect();

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
    first.signal("-INT");
    first.wait_for("deregistered (existed: true)");
    let status = first.exit_status();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deregisters_the_greeter_before_it_exits() {
    let registry = TestServer::start().await;
    let mut greeter = Greeter::start(&registry.url());
    let id = greeter.serving();
    let client = signpost_client::Client::new(registry.url()).unwrap();
    let listed = |instances: Vec<signpost_client::Instance>| -> Vec<String> {
        instances.into_iter().map(|i| i.id).collect()
    };
    assert_eq!(listed(client.discover("greeter").await.unwrap()), [id]);

    greeter.signal("-TERM");
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
