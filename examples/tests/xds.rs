//! gRPC's own xDS clients, Python's grpcio and Node's grpc-js, calling the Rust greeters through a plain
//! `grpc.insecure_channel("xds:///greeter")` with Signpost as its control plane: no Signpost
//! code on the calling side, only a bootstrap file.

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use signpost_client::{HealthCheck, Probe, RegistrationBuilder};
use signpost_examples::Greeter;
use signpost_server::xds::Bootstrap;
use signpost_tests::greeters::{Backend, GreeterProcess, test_client};
use signpost_tests::process::{require_program, require_python_modules};
use signpost_tests::{DEADLINE, TestServer};
use tokio::sync::mpsc;

const GREETER: &str = env!("CARGO_BIN_EXE_greeter-server");

#[derive(Debug, Clone, Copy)]
enum Language {
    Python,
    Node,
}

/// Node with grpc-js and its xDS plugin, installed by `npm ci` in tests/xds/node.
fn node_grpc() -> bool {
    if require_program("node").is_none() {
        return false;
    }
    let installed = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/xds/node/node_modules/@grpc/grpc-js-xds")
        .is_dir();
    if !installed {
        assert!(
            std::env::var_os("SIGNPOST_REQUIRE_ALL").is_none(),
            "@grpc/grpc-js-xds is required (SIGNPOST_REQUIRE_ALL is set): npm ci --prefix examples/tests/xds/node"
        );
        eprintln!("skipping: npm ci --prefix examples/tests/xds/node has not been run");
    }
    installed
}

fn python_grpc() -> bool {
    require_python_modules(&[("grpc", "grpcio"), ("grpc_tools", "grpcio-tools")])
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok(String),
    Err(String),
}

impl Answer {
    fn is(&self, id: &str) -> bool {
        matches!(self, Answer::Ok(got) if got == id)
    }
}

/// `tests/xds/caller.py` or `tests/xds/node/caller.js`: calls one after another through an
/// `xds:///` channel; killed when dropped.
struct Caller {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Everything it printed that was not an answer (grpcio's own logs), for failure messages.
    log: Vec<String>,
    _bootstrap: tempfile::TempDir,
}

impl Caller {
    fn start(bootstrap: &Bootstrap, target: &str) -> Caller {
        Caller::start_in(Language::Python, bootstrap, target)
    }

    fn start_in(language: Language, bootstrap: &Bootstrap, target: &str) -> Caller {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bootstrap.json");
        std::fs::write(&file, bootstrap.to_json()).unwrap();
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut command = match language {
            Language::Python => {
                let mut c = Command::new("python3");
                c.arg(here.join("tests/xds/caller.py"));
                c
            }
            Language::Node => {
                let mut c = Command::new("node");
                c.arg(here.join("tests/xds/node/caller.js"));
                c
            }
        };
        let mut child = command
            .args(["--target", target])
            .arg("--proto-dir")
            .arg(here.join("proto"))
            .env("GRPC_XDS_BOOTSTRAP", &file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3");
        let (tx, lines) = mpsc::unbounded_channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(format!("stderr: {line}"));
            }
        });
        let mut caller = Caller {
            child,
            lines,
            log: Vec::new(),
            _bootstrap: dir,
        };
        caller.started();
        caller
    }

    /// Waits until the script has its stubs and starts calling.
    fn started(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match self.lines.try_recv() {
                Ok(line) if line == "calling" => return,
                Ok(line) => self.log.push(line),
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        panic!("the caller did not start:\n{}", self.log.join("\n"));
    }

    /// The next call's outcome; the test fails if none comes within [`DEADLINE`].
    async fn next(&mut self) -> Answer {
        loop {
            let line = match tokio::time::timeout(DEADLINE, self.lines.recv()).await {
                Ok(Some(line)) => line,
                Ok(None) => panic!("the caller ended:\n{}", self.log.join("\n")),
                Err(_) => panic!(
                    "the caller finished no call within {DEADLINE:?}:\n{}",
                    self.log.join("\n")
                ),
            };
            if let Some(id) = line.strip_prefix("ok ") {
                return Answer::Ok(id.to_owned());
            }
            if let Some(error) = line.strip_prefix("err ") {
                return Answer::Err(error.to_owned());
            }
            self.log.push(line);
        }
    }

    /// The outcomes of calls until `done` says so of one (included); the test fails if that
    /// takes longer than `limit`.
    async fn until(
        &mut self,
        what: &str,
        limit: Duration,
        mut done: impl FnMut(&Answer) -> bool,
    ) -> Vec<Answer> {
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            let answer = self.next().await;
            let finished = done(&answer);
            seen.push(answer);
            if finished {
                return seen;
            }
            assert!(
                started.elapsed() < limit,
                "{what}: not within {limit:?}; answers: {:?}",
                tally(&seen)
            );
        }
    }

    async fn take(&mut self, n: usize) -> Vec<Answer> {
        let mut seen = Vec::with_capacity(n);
        for _ in 0..n {
            seen.push(self.next().await);
        }
        seen
    }
}

impl Drop for Caller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How many calls each instance answered, and each error.
fn tally(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for a in answers {
        let key = match a {
            Answer::Ok(id) => id.clone(),
            Answer::Err(e) => format!("error: {e}"),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

fn errors(answers: &[Answer]) -> usize {
    answers
        .iter()
        .filter(|a| matches!(a, Answer::Err(_)))
        .count()
}

fn bootstrap(server: &TestServer, namespace: Option<&str>) -> Bootstrap {
    Bootstrap {
        server_uri: server.addr.to_string(),
        node_id: "xds-test".into(),
        namespace: namespace.map(str::to_owned),
        ..Bootstrap::default()
    }
}

async fn start_greeters(registry: &str, n: usize) -> Vec<GreeterProcess> {
    let mut greeters = Vec::new();
    for _ in 0..n {
        let registry = registry.to_owned();
        greeters.push(
            tokio::task::spawn_blocking(move || {
                GreeterProcess::start(Path::new(GREETER), &registry, &["--ttl-secs", "2"])
            })
            .await
            .unwrap(),
        );
    }
    greeters
}

/// Reads calls until `id` has answered none of the last 50, within `limit`.
async fn until_none_from(caller: &mut Caller, id: &str, what: &str, limit: Duration) {
    let mut without = 0;
    caller
        .until(what, limit, |a| {
            without = if a.is(id) { 0 } else { without + 1 };
            without >= 50
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_xds_calls_spread_and_follow_registrations_deregistrations_and_a_kill() {
    if python_grpc() {
        calls_spread_and_follow_changes(Language::Python).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_xds_calls_spread_and_follow_registrations_deregistrations_and_a_kill() {
    if node_grpc() {
        calls_spread_and_follow_changes(Language::Node).await;
    }
}

async fn calls_spread_and_follow_changes(language: Language) {
    let server = TestServer::start().await;
    let url = server.url();
    let mut greeters = start_greeters(&url, 3).await;
    let mut caller = Caller::start_in(language, &bootstrap(&server, None), "xds:///greeter");

    let ids: BTreeSet<String> = greeters.iter().map(|g| g.id.clone()).collect();
    let mut seen = BTreeSet::new();
    let first = caller
        .until("every greeter answers", DEADLINE, |a| {
            if let Answer::Ok(id) = a {
                seen.insert(id.clone());
            }
            seen == ids
        })
        .await;
    assert_eq!(errors(&first), 0, "{:?}", tally(&first));
    let spread = caller.take(300).await;
    let counts = tally(&spread);
    eprintln!("300 calls over three greeters: {counts:?}");
    assert_eq!(errors(&spread), 0, "{counts:?}");
    for id in &ids {
        let n = counts.get(id).copied().unwrap_or(0);
        assert!(n >= 60, "{id} answered {n} of 300: {counts:?}");
    }

    // A new greeter gets calls within a second of registering.
    let newcomer = start_greeters(&url, 1).await.remove(0);
    let registered = Instant::now();
    let joined = caller
        .until("the new greeter answers", Duration::from_secs(1), |a| {
            a.is(&newcomer.id)
        })
        .await;
    eprintln!(
        "a new greeter's first call {:?} after it registered",
        registered.elapsed()
    );
    assert_eq!(errors(&joined), 0, "{:?}", tally(&joined));

    // A deregistered one gets none after, and no call fails on its way out.
    let leaving = greeters.remove(0);
    leaving.signal("TERM");
    leaving.wait_for("deregistered");
    until_none_from(
        &mut caller,
        &leaving.id,
        "the deregistered greeter is left out",
        Duration::from_secs(1),
    )
    .await;
    let after = caller.take(200).await;
    assert!(
        !after.iter().any(|a| a.is(&leaving.id)),
        "{:?}",
        tally(&after)
    );
    assert_eq!(errors(&after), 0, "{:?}", tally(&after));
    drop(leaving);

    // kill -9: the connection's end takes it out of the round at once; at most the one call
    // in flight on it fails.
    let victim = greeters.remove(0);
    victim.signal("KILL");
    let victim_id = victim.id.clone();
    drop(victim);
    let after_kill = caller.take(300).await;
    let counts = tally(&after_kill);
    eprintln!("300 calls after kill -9 of {victim_id}: {counts:?}");
    assert!(errors(&after_kill) <= 1, "{counts:?}");
    // Only the call in flight at the kill could have been the victim's.
    assert!(
        !after_kill[1..].iter().any(|a| a.is(&victim_id)),
        "{counts:?}"
    );
}

fn grpc_checked(id: &str) -> RegistrationBuilder {
    let mut check = HealthCheck::new(
        Probe::Grpc {
            service: String::new(),
        },
        Duration::from_secs(1),
    );
    check.failures_before_critical = 1;
    check.successes_before_passing = 1;
    RegistrationBuilder::new("greeter").id(id).check(check)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeter_whose_check_turns_critical_gets_no_calls_until_it_passes_again() {
    if !python_grpc() {
        return;
    }
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let h1 = Backend::start_with(&client, Greeter::new("h1"), grpc_checked("h1")).await;
    let _h2 = Backend::start_with(&client, Greeter::new("h2"), grpc_checked("h2")).await;
    let mut caller = Caller::start(&bootstrap(&server, None), "xds:///greeter");
    let (mut one, mut two) = (false, false);
    caller
        .until("both greeters answer", DEADLINE, |a| {
            one |= a.is("h1");
            two |= a.is("h2");
            one && two
        })
        .await;

    h1.greeter.set_serving(false).await;
    // One probe a second, one failure to turn critical.
    until_none_from(
        &mut caller,
        "h1",
        "the critical greeter is left out",
        DEADLINE,
    )
    .await;
    let critical = caller.take(200).await;
    assert!(
        critical.iter().all(|a| a.is("h2")),
        "{:?}",
        tally(&critical)
    );

    h1.greeter.set_serving(true).await;
    caller
        .until("the greeter passing again answers", DEADLINE, |a| {
            a.is("h1")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_yet_registered_fails_at_once_and_recovers_when_it_registers() {
    if !python_grpc() {
        return;
    }
    let server = TestServer::start().await;
    let client = test_client(server.url());
    let mut caller = Caller::start(&bootstrap(&server, None), "xds:///late.payments.svc");
    let started = Instant::now();
    let first = caller.next().await;
    let waited = started.elapsed();
    eprintln!("first call to a service with no instance: {first:?} after {waited:?}");
    assert!(
        matches!(&first, Answer::Err(e) if e.starts_with("UNAVAILABLE")),
        "{first:?}"
    );
    // grpcio would wait 15 s for a resource it never got; an empty cluster fails at once.
    assert!(waited < Duration::from_secs(5), "{waited:?}");

    let _late = Backend::start_with(
        &client,
        Greeter::new("late1"),
        RegistrationBuilder::new("late")
            .namespace("payments")
            .id("late1"),
    )
    .await;
    let registered = Instant::now();
    caller
        .until("the registered service answers", DEADLINE, |a| {
            a.is("late1")
        })
        .await;
    eprintln!("recovered {:?} after it registered", registered.elapsed());

    // The same service by its plain name, from a client whose bootstrap names its namespace.
    let mut local = Caller::start(&bootstrap(&server, Some("payments")), "xds:///late");
    let answers = local.take(20).await;
    assert!(
        answers.iter().all(|a| a.is("late1")),
        "{:?}",
        tally(&answers)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_lines_reach_a_greeter() {
    if !python_grpc() {
        return;
    }
    let server = TestServer::start().await;
    let greeter = start_greeters(&server.url(), 1).await.remove(0);
    let dir = tempfile::tempdir().unwrap();
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The README's own stub command, run where the snippet runs.
    let (ok, _, err) = signpost_tests::process::run(
        Command::new("python3")
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(here.join("proto"))
            .args([
                "--python_out=.",
                "--grpc_python_out=.",
                "greeter/v1/greeter.proto",
            ])
            .current_dir(dir.path()),
    );
    assert!(ok, "protoc: {err}");
    let bootstrap = dir.path().join("bootstrap.json");
    std::fs::write(&bootstrap, self::bootstrap(&server, None).to_json()).unwrap();
    let snippet = signpost_tests::process::readme_block("xds-python");
    assert_eq!(snippet.lines().count(), 3, "{snippet}");
    let (ok, out, err) = tokio::task::spawn_blocking({
        let dir = dir.path().to_owned();
        move || {
            signpost_tests::process::run(
                Command::new("python3")
                    .args(["-c", &snippet])
                    .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
                    .current_dir(dir),
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "{out}{err}");
    assert_eq!(out.trim(), greeter.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_that_requires_mutual_tls_is_a_control_plane_over_it() {
    if !python_grpc() {
        return;
    }
    let pki = signpost_tests::tls::Pki::new("xds");
    let metrics = std::sync::Arc::new(signpost_server::metrics::Metrics::new());
    let server = TestServer::start_with(
        signpost_server::Config {
            tls: Some(pki.server_tls(true)),
            metrics: Some(metrics.clone()),
            ..signpost_server::Config::default()
        },
        signpost_store::MemoryConfig::default(),
    )
    .await;
    let client = signpost_client::Client::builder()
        .registry(format!("https://{}", server.addr))
        .ca_certificate(pki.ca_pem.clone())
        .identity(pki.client_cert_pem.clone(), pki.client_key_pem.clone())
        .build()
        .unwrap();
    let _greeter = Backend::start_with(
        &client,
        Greeter::new("tls1"),
        RegistrationBuilder::new("greeter").id("tls1"),
    )
    .await;
    let files = tempfile::tempdir().unwrap();
    pki.write(files.path());
    let path = |name: &str| files.path().join(name).display().to_string();
    let mut bootstrap = bootstrap(&server, None);
    bootstrap.tls = Some(signpost_server::xds::BootstrapTls {
        ca_certificate_file: path("ca.pem"),
        certificate_file: Some(path("client.pem")),
        private_key_file: Some(path("client.key")),
    });
    let mut caller = Caller::start(&bootstrap, "xds:///greeter");
    let answers = caller.take(5).await;
    assert!(
        answers.iter().all(|a| a.is("tls1")),
        "{:?}",
        tally(&answers)
    );

    // Without a client certificate the registry refuses the control-plane connection.
    bootstrap.tls = Some(signpost_server::xds::BootstrapTls {
        ca_certificate_file: path("ca.pem"),
        ..Default::default()
    });
    let mut stranger = Caller::start(&bootstrap, "xds:///greeter");
    let refused = stranger.next().await;
    assert!(
        matches!(&refused, Answer::Err(e) if e.starts_with("UNAVAILABLE")),
        "{refused:?}"
    );
    // Refused at the handshake: the trusted caller's is the only stream the registry opened.
    let text = metrics.render(&*server.store);
    assert!(
        text.lines().any(|l| l == "signpost_xds_streams 1"),
        "{text}"
    );
}
