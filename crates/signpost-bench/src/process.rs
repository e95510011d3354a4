//! The outside programs a workload starts: a registry and greeter servers. Each is a child
//! process killed when its handle is dropped (`kill_on_drop`), so an error, a panic or an
//! interrupt anywhere in a workload leaves nothing running behind it.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// How long a program may take to say it is up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Lines of a program's output kept to explain a failure.
const KEPT_LINES: usize = 20;

/// Finds the binary `name`: at `given` when set; else next to this executable (cargo puts every
/// binary of a profile in one directory); else under `$CARGO_TARGET_DIR/release`, as
/// `bench/compare.sh` does, with `target` when the variable is unset.
pub(crate) fn find_binary(name: &str, given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("{} is not a file", path.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join(name));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    candidates.push(target.join("release").join(name));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "no {name} binary next to signpost-bench or under {}/release: build it in release \
             (cargo build --release -p signpost -p signpost-examples) or pass its path",
                target.display()
            )
        })
}

/// A running child process; killed (SIGKILL) when dropped.
#[derive(Debug)]
pub(crate) struct Process {
    name: String,
    child: Child,
    output: Arc<Mutex<VecDeque<String>>>,
}

/// Which of a program's streams says that it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stream {
    Stdout,
    Stderr,
}

impl Process {
    /// Kills the process with SIGKILL, without waiting for it: the way a machine or a process
    /// dies, with no chance to deregister or finish its calls.
    pub(crate) fn kill(&mut self) -> anyhow::Result<()> {
        self.child
            .start_kill()
            .with_context(|| format!("cannot kill {}", self.name))
    }

    /// Kills the process and waits until it is gone.
    pub(crate) async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }

    /// The last lines the process printed, for error messages.
    fn last_output(&self) -> String {
        let lines = self.output.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Starts `command` and waits until a line of `stream` satisfies `ready`, which returns what
    /// the caller needs from that line.
    async fn start(
        name: String,
        mut command: Command,
        stream: Stream,
        ready: fn(&str) -> Option<String>,
    ) -> anyhow::Result<(Process, String)> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let output = Arc::new(Mutex::new(VecDeque::new()));
        let (found_tx, found_rx) = oneshot::channel();
        let mut found_tx = Some(found_tx);
        // Both streams are read to their end, so that a chatty program never blocks on a full
        // pipe; only the last lines are kept.
        if let Some(out) = child.stdout.take() {
            let tx = if stream == Stream::Stdout {
                found_tx.take()
            } else {
                None
            };
            tokio::spawn(drain(out, output.clone(), tx, ready));
        }
        if let Some(err) = child.stderr.take() {
            let tx = if stream == Stream::Stderr {
                found_tx.take()
            } else {
                None
            };
            tokio::spawn(drain(err, output.clone(), tx, ready));
        }
        let mut process = Process {
            name,
            child,
            output,
        };
        match tokio::time::timeout(START_TIMEOUT, found_rx).await {
            Ok(Ok(found)) => Ok((process, found)),
            outcome => {
                let why = match outcome {
                    Err(_) => format!("did not come up within {START_TIMEOUT:?}"),
                    _ => match process.child.try_wait() {
                        Ok(Some(status)) => format!("exited ({status})"),
                        _ => "closed its output".to_owned(),
                    },
                };
                // Give the readers a moment to collect the last words.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let (output, name) = (process.last_output(), process.name.clone());
                process.stop().await;
                bail!("{name} {why}; its last output:\n{output}")
            }
        }
    }
}

async fn drain(
    stream: impl AsyncRead + Unpin,
    output: Arc<Mutex<VecDeque<String>>>,
    mut found: Option<oneshot::Sender<String>>,
    ready: fn(&str) -> Option<String>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        if found.is_some()
            && let Some(value) = ready(&line)
            && let Some(tx) = found.take()
        {
            let _ = tx.send(value);
        }
        let mut kept = output.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == KEPT_LINES {
            kept.pop_front();
        }
        kept.push_back(line);
    }
}

/// A memory-store registry on a free loopback port; returns it and its `http://` address.
pub(crate) async fn start_registry(binary: &Path) -> anyhow::Result<(Process, String)> {
    let mut command = Command::new(binary);
    command
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "memory"])
        .env("RUST_LOG", "warn,signpost=info");
    let (process, addr) =
        Process::start("the registry".to_owned(), command, Stream::Stderr, |line| {
            let (_, rest) = line.split_once("listening on ")?;
            Some(rest.split_whitespace().next()?.to_owned())
        })
        .await?;
    Ok((process, format!("http://{addr}")))
}

/// A greeter process registered with `registry` under the service `greeter`.
#[derive(Debug)]
pub(crate) struct GreeterProcess {
    pub(crate) id: String,
    pub(crate) process: Process,
}

/// Starts `greeter-server` on a free loopback port and waits until it has registered.
pub(crate) async fn start_greeter(
    binary: &Path,
    registry: &str,
    ttl_secs: u64,
) -> anyhow::Result<GreeterProcess> {
    let mut command = Command::new(binary);
    command
        .args([
            "--registry",
            registry,
            "--address",
            "127.0.0.1",
            "--port",
            "0",
        ])
        .args(["--ttl-secs", &ttl_secs.to_string()])
        .env("RUST_LOG", "warn");
    // It prints `greeter-NNNN serving on ADDR, registered with URL` once registered.
    let (process, id) = Process::start(
        "greeter-server".to_owned(),
        command,
        Stream::Stdout,
        |line| {
            let (id, _) = line.split_once(" serving on ")?;
            Some(id.trim().to_owned())
        },
    )
    .await?;
    Ok(GreeterProcess { id, process })
}
