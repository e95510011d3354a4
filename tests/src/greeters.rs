//! Greeters for the balancer's tests: in-process ones on loopback sockets (`Backend`), real
//! `greeter-server` processes (`GreeterProcess`), and callers that count who answered
//! (`Caller`).

// Test code: a failed expectation is the test failing.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use signpost_client::{BalancedChannel, Client, Registration, RegistrationBuilder};
use signpost_examples::Greeter;
use signpost_examples::pb::SayHelloRequest;
use signpost_examples::pb::greeter_service_client::GreeterServiceClient;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{DEADLINE, must, within};

/// A client with short backoffs, as every test wants.
pub fn test_client(url: String) -> Client {
    must(
        Client::builder()
            .registry(url)
            .backoff(Duration::from_millis(50), Duration::from_millis(500))
            .build(),
        "client",
    )
}

/// A greeter serving on a loopback port and registered with the registry.
#[derive(Debug)]
pub struct Backend {
    pub id: String,
    pub port: u16,
    pub greeter: Greeter,
    pub registration: Option<Registration>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Backend {
    /// A greeter of service `greeter` registered as `id` with `ttl`.
    pub async fn start(client: &Client, id: &str, ttl: Duration) -> Backend {
        Self::start_with(
            client,
            Greeter::new(id),
            RegistrationBuilder::new("greeter").id(id).ttl(ttl),
        )
        .await
    }

    /// Serves `greeter` on a free port and registers it as `registration` says (its address
    /// and port are filled in).
    pub async fn start_with(
        client: &Client,
        greeter: Greeter,
        registration: RegistrationBuilder,
    ) -> Backend {
        let (listener, bound) = must(
            signpost_examples::bind("127.0.0.1", 0).await,
            "bind greeter",
        );
        let (stop, task) = Self::serve(&greeter, listener);
        let registration = client
            .register(registration.address("127.0.0.1").port(bound.port()))
            .await;
        let registration = must(registration, "register greeter");
        Backend {
            id: registration.id().to_owned(),
            port: bound.port(),
            greeter,
            registration: Some(registration),
            stop: Some(stop),
            task,
        }
    }

    fn serve(
        greeter: &Greeter,
        listener: tokio::net::TcpListener,
    ) -> (
        oneshot::Sender<()>,
        JoinHandle<Result<(), tonic::transport::Error>>,
    ) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(greeter.clone().serve(listener, async {
            let _ = stopped.await;
        }));
        (stop, task)
    }

    /// Stops serving (the listener closes, connections get GOAWAY) and leaves the
    /// registration as it is.
    pub async fn stop_serving(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        must(must(within("greeter stop", task).await, "join"), "serve");
    }

    /// Serves again on the same port.
    pub async fn serve_again(&mut self) {
        let (listener, _) = must(
            signpost_examples::bind("127.0.0.1", self.port).await,
            "bind the same port again",
        );
        let (stop, task) = Self::serve(&self.greeter, listener);
        self.stop = Some(stop);
        self.task = task;
    }
}

/// Callers that call until stopped, counting answers per instance and failures.
#[derive(Debug)]
pub struct Caller {
    answers: Arc<Mutex<BTreeMap<String, u64>>>,
    /// When each failure happened.
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    total: Arc<AtomicU64>,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Caller {
    /// One caller, a call every 2 ms.
    pub fn start(channel: BalancedChannel) -> Caller {
        Self::start_many(channel, 1, Duration::from_millis(2), DEADLINE)
    }

    /// `callers` concurrent callers, each pausing `pause` between calls and giving up on a
    /// call after `timeout`.
    pub fn start_many(
        channel: BalancedChannel,
        callers: usize,
        pause: Duration,
        timeout: Duration,
    ) -> Caller {
        let answers: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
        let failures: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let total = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let tasks = (0..callers)
            .map(|_| {
                let (answers, failures, total) = (answers.clone(), failures.clone(), total.clone());
                let mut greeter = GreeterServiceClient::new(channel.clone());
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    while !*stopped.borrow() {
                        let call = greeter.say_hello(SayHelloRequest { name: "t".into() });
                        match tokio::time::timeout(timeout, call).await {
                            Ok(Ok(answer)) => {
                                let id = answer.into_inner().instance_id;
                                *answers.lock().unwrap().entry(id).or_default() += 1;
                            }
                            Ok(Err(status)) => {
                                eprintln!("call failed: {status:?}");
                                failures
                                    .lock()
                                    .unwrap()
                                    .push((Instant::now(), status.message().to_owned()));
                            }
                            Err(_) => {
                                eprintln!("call timed out after {timeout:?}");
                                failures
                                    .lock()
                                    .unwrap()
                                    .push((Instant::now(), "timed out".to_owned()));
                            }
                        }
                        total.fetch_add(1, Ordering::SeqCst);
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Caller {
            answers,
            failures,
            total,
            stop: Some(stop),
            tasks,
        }
    }

    /// Waits until `n` more calls have completed, failing the test if none completes for
    /// [`DEADLINE`]: a stall is the defect, while how long `n` paced calls take depends on
    /// the host's timer and load.
    #[track_caller]
    pub fn calls(&self, n: u64) -> impl std::future::Future<Output = ()> + '_ {
        let caller = std::panic::Location::caller();
        async move {
            let target = self.total.load(Ordering::SeqCst) + n;
            let mut seen = self.total.load(Ordering::SeqCst);
            let mut progress = Instant::now();
            while seen < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = self.total.load(Ordering::SeqCst);
                if now != seen {
                    (seen, progress) = (now, Instant::now());
                } else if progress.elapsed() > DEADLINE {
                    panic!(
                        "calls: {} of {n} done, then none for {DEADLINE:?} (at {caller})",
                        n - (target - seen)
                    );
                }
            }
        }
    }

    pub fn answered_by(&self, id: &str) -> u64 {
        self.answers.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    pub fn answers(&self) -> BTreeMap<String, u64> {
        self.answers.lock().unwrap().clone()
    }

    /// When each failure so far happened, and its message.
    pub fn failures(&self) -> Vec<(Instant, String)> {
        self.failures.lock().unwrap().clone()
    }

    /// Stops every caller; the answers per instance and the number of failures.
    pub async fn stop(mut self) -> (BTreeMap<String, u64>, u64) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        for task in &mut self.tasks {
            must(within("caller stop", task).await, "caller");
        }
        let failures = self.failures.lock().unwrap().len() as u64;
        (self.answers(), failures)
    }
}

/// Waits until the channel's view holds exactly `ids`, sorted.
pub async fn wait_for_ids(channel: &BalancedChannel, ids: &[&str]) {
    within("balanced channel view", async {
        loop {
            let now: Vec<String> = channel.instances().into_iter().map(|i| i.id).collect();
            if now == ids {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Waits until the channel's view holds `n` instances and `n` of its endpoints are connected.
pub async fn wait_for_connected(channel: &BalancedChannel, n: usize) {
    crate::within_for(Duration::from_secs(20), "endpoints connected", async {
        loop {
            let ready = channel
                .stats()
                .endpoints
                .iter()
                .filter(|e| e.state == signpost_client::EndpointState::Ready)
                .count();
            if ready == n && channel.instances().len() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// A `greeter-server` process, killed when dropped.
#[derive(Debug)]
pub struct GreeterProcess {
    pub child: Child,
    /// The instance id it registered (`greeter-PORT`).
    pub id: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl GreeterProcess {
    /// Starts `exe` against `registry` with `args` and waits until it serves.
    pub fn start(exe: &Path, registry: &str, args: &[&str]) -> GreeterProcess {
        let mut child = Command::new(exe)
            .args(["--registry", registry, "--port", "0"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("greeter-server");
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut greeter = GreeterProcess {
            child,
            id: String::new(),
            lines,
        };
        let line = greeter.wait_for("serving on");
        greeter.id = line
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned();
        greeter
    }

    /// The next line of its output that holds `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
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

    /// Waits for the process to exit, failing the test past the deadline.
    pub fn exit_status(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "greeter-server did not exit within {DEADLINE:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`, ...) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {pid}");
        if signal == "STOP" {
            // kill(2) returns before every thread of the target has stopped; a call sent at
            // once could still be answered. A stopped thread is in state T in /proc.
            let deadline = Instant::now() + Duration::from_secs(5);
            while !all_threads_stopped(&pid) {
                assert!(
                    Instant::now() < deadline,
                    "process {pid} did not stop within 5 s"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

impl Drop for GreeterProcess {
    fn drop(&mut self) {
        // A stopped process must be continued to die promptly.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether every thread of process `pid` is stopped (state T).
fn all_threads_stopped(pid: &str) -> bool {
    let Ok(threads) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    threads.flatten().all(|thread| {
        std::fs::read_to_string(thread.path().join("stat")).is_ok_and(|stat| {
            stat.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
        })
    })
}
