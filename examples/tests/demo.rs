//! The README's greeter demo, as processes: a registry, two greeter-servers, a greeter-client.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use signpost_tests::process::run;
use signpost_tests::{DEADLINE, TestServer};

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
    let ids: Vec<String> = greeters
        .iter()
        .map(|g| {
            let line = g.wait_for("serving on");
            line.split_whitespace().next().unwrap().to_owned()
        })
        .collect();

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
    let pid = first.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    first.wait_for("deregistered (existed: true)");
    let status = first.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}
