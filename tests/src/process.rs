//! Running the real `signpost` binary and outside programs (grpcurl, python) in tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::DEADLINE;

/// Finds `program` on PATH. A missing program skips the test (returns `None`) unless
/// `SIGNPOST_REQUIRE_ALL` is set, as it is in CI, where it fails the test instead.
///
/// A skipped test still reports `ok`, so the skip is said where a person sees it: a line
/// `SKIPPED: <test>: <program> not installed` straight to stderr (past libtest's capture of
/// `eprintln!`, which would hide it), and the same line appended to [`skips_file`], which
/// `.ci/run` sums up at the end of a run.
pub fn require_program(program: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(path) => Some(path),
        None if std::env::var_os("SIGNPOST_REQUIRE_ALL").is_some() => {
            panic!("{program} is required (SIGNPOST_REQUIRE_ALL is set) but is not on PATH")
        }
        None => {
            report_skip(program);
            None
        }
    }
}

/// Whether `python3` can import every module of `modules` (named by their pip package in the
/// skip line); skips as [`require_program`] does when it cannot.
pub fn require_python_modules(modules: &[(&str, &str)]) -> bool {
    if require_program("python3").is_none() {
        return false;
    }
    for (module, package) in modules {
        let imported = Command::new("python3")
            .args(["-c", &format!("import {module}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if imported {
            continue;
        }
        if std::env::var_os("SIGNPOST_REQUIRE_ALL").is_some() {
            panic!(
                "the Python package {package} is required (SIGNPOST_REQUIRE_ALL is set): pip install {package}"
            );
        }
        report_skip(&format!("Python package {package}"));
        return false;
    }
    true
}

/// Where `.ci/run` installs a Python package that cannot share site-packages with another
/// (py-consul and python-consul both install a module named `consul`):
/// `target/test-python/PACKAGE` of the workspace, for `PYTHONPATH`. `None` (a skip, or a failure
/// under `SIGNPOST_REQUIRE_ALL`) when it is not there.
pub fn python_package_dir(package: &str) -> Option<PathBuf> {
    require_program("python3")?;
    let dir = target_dir().join("test-python").join(package);
    if dir.is_dir() {
        return Some(dir);
    }
    let install = format!(
        "python3 -m pip install --target {} {package}",
        dir.display()
    );
    if std::env::var_os("SIGNPOST_REQUIRE_ALL").is_some() {
        panic!("the Python package {package} is required (SIGNPOST_REQUIRE_ALL is set): {install}");
    }
    report_skip(&format!("Python package {package} ({install})"));
    None
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}

/// `target/signpost-skips.txt` of the workspace (or of `CARGO_TARGET_DIR`): one line per test
/// skipped for a missing program.
pub fn skips_file() -> PathBuf {
    target_dir().join("signpost-skips.txt")
}

fn report_skip(program: &str) {
    use std::io::Write;
    // libtest names each test's thread after the test.
    let current = std::thread::current();
    let test = current.name().unwrap_or("a test");
    let line = format!("SKIPPED: {test}: {program} not installed");
    let _ = writeln!(
        std::io::stderr(),
        "{line} (set SIGNPOST_REQUIRE_ALL to make this fail)"
    );
    let path = skips_file();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // One write of one short line per skip: appends from parallel tests do not interleave.
    let appended = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut file| file.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = appended {
        let _ = writeln!(
            std::io::stderr(),
            "cannot record the skip in {}: {e}",
            path.display()
        );
    }
}

/// The address `server` logs right after `prefix` (such as `"dns on "`), once it has.
pub fn logged_addr(server: &mut ServerProcess, prefix: &str) -> SocketAddr {
    let line = server.wait_for_log(prefix);
    line.split(prefix)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address after {prefix:?} in {line:?}"))
}

/// `EXE ARGS --registry URL` against `server`, which must succeed; what it printed.
pub fn cli(exe: &Path, server: &ServerProcess, args: &[&str]) -> String {
    let (ok, out, err) = run(Command::new(exe)
        .args(args)
        .args(["--registry", &server.url()]));
    assert!(ok, "signpost {args:?} failed: {out}{err}");
    out
}

/// A running `signpost serve`, killed when dropped.
#[derive(Debug)]
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// Every line the server logged so far is sent here.
    pub logs: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `exe serve --listen 127.0.0.1:0 ARGS…` and waits for the address it bound.
    pub fn start(exe: &Path, args: &[&str]) -> Self {
        Self::start_at(exe, "127.0.0.1:0", args)
    }

    /// Starts `exe serve --listen LISTEN ARGS…` (the address of a server that was just stopped,
    /// say) and waits for the address it bound.
    pub fn start_at(exe: &Path, listen: &str, args: &[&str]) -> Self {
        let mut server = Self::spawn_at(exe, listen, args);
        let line = server.wait_for_log("listening on ");
        let addr = line
            .rsplit("listening on ")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        server.addr = addr;
        server
    }

    /// Starts `exe serve --listen 127.0.0.1:0 ARGS…` without waiting for anything.
    pub fn spawn(exe: &Path, args: &[&str]) -> Self {
        Self::spawn_at(exe, "127.0.0.1:0", args)
    }

    fn spawn_at(exe: &Path, listen: &str, args: &[&str]) -> Self {
        let mut child = Command::new(exe)
            .args(["serve", "--listen", listen])
            .args(args)
            .env("RUST_LOG", "info")
            .env("SIGNPOST_LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
        let (tx, logs) = mpsc::channel();
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        }
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits for a log line containing `needle` and returns it.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {needle:?} within {DEADLINE:?}"),
            }
        }
    }

    /// Sends SIGHUP (what `systemctl reload` sends); the process goes on.
    pub fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -HUP failed");
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM failed");
        wait_with_deadline(&mut self.child, DEADLINE)
    }
}

impl ServerProcess {
    /// Kills the process with SIGKILL (no chance to flush or clean up) and reaps it.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit by itself; returns its status and everything it logged.
    pub fn wait_exit(mut self) -> (ExitStatus, String) {
        let status = wait_with_deadline(&mut self.child, DEADLINE);
        let logs: Vec<String> = self.logs.try_iter().collect();
        (status, logs.join("\n"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => panic!("process did not exit within {limit:?}"),
            Err(e) => panic!("cannot wait for process: {e}"),
        }
    }
}

/// Runs a command to completion with a deadline; returns (success, stdout, stderr).
pub fn run(command: &mut Command) -> (bool, String, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let out = read(stdout.map(|p| Box::new(p) as _));
    let err = read(stderr.map(|p| Box::new(p) as _));
    let status = wait_with_deadline(&mut child, Duration::from_secs(60));
    (
        status.success(),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// The shell lines of a README block between `<!-- NAME:start -->` and `<!-- NAME:end -->`,
/// without the code fences, as the README's tests run them.
pub fn readme_block(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let start = readme
        .find(&format!("<!-- {name}:start -->"))
        .unwrap_or_else(|| panic!("README has no {name}:start marker"));
    let end = readme
        .find(&format!("<!-- {name}:end -->"))
        .unwrap_or_else(|| panic!("README has no {name}:end marker"));
    readme[start..end]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--"))
        .collect::<Vec<_>>()
        .join("\n")
}
