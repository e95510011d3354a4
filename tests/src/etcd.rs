//! Real etcd clusters on loopback ports for the etcd backend's tests.
//!
//! Members run with a 50 ms heartbeat and a 500 ms election timeout: elections after a member dies
//! take well under a second, and etcd's smallest lease ttl is one second (with the defaults it
//! raises anything under two seconds to two).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use signpost_store::{EtcdConfig, EtcdStore};

use crate::process::require_program;
use crate::{DEADLINE, must};

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// A running etcd cluster, killed and removed when dropped.
#[derive(Debug)]
pub struct Etcd {
    exe: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// Ports that were free a moment ago, all distinct.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| must(TcpListener::bind("127.0.0.1:0"), "bind a free port"))
        .collect();
    listeners
        .iter()
        .map(|l| must(l.local_addr(), "local_addr").port())
        .collect()
}

impl Etcd {
    /// Starts a cluster of `size` members and waits until it answers. `None` (the test skips)
    /// when etcd is not installed and `SIGNPOST_REQUIRE_ALL` is unset.
    pub async fn start(size: usize) -> Option<Etcd> {
        let exe = require_program("etcd")?;
        let dir = must(tempfile::tempdir(), "temp dir");
        let ports = free_ports(size * 2);
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: ports[2 * i],
                peer_port: ports[2 * i + 1],
                child: None,
            })
            .collect();
        let mut etcd = Etcd { exe, dir, members };
        for i in 0..size {
            etcd.spawn(i);
        }
        etcd.ready().await;
        Some(etcd)
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let member = &self.members[i];
        let client = format!("http://127.0.0.1:{}", member.client_port);
        let peer = format!("http://127.0.0.1:{}", member.peer_port);
        let data = self.dir.path().join(&member.name);
        let child = Command::new(&self.exe)
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "signpost-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        self.members[i].child = Some(must(child, "start etcd"));
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Kills member `i` with SIGKILL.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data directory.
    pub async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.ready().await;
    }

    /// Waits until a write through every running member succeeds.
    pub async fn ready(&self) {
        for (i, member) in self.members.iter().enumerate() {
            if member.child.is_none() {
                continue;
            }
            let endpoint = self.endpoint(i);
            crate::within("etcd answering", async {
                loop {
                    if let Ok(Ok(mut client)) = tokio::time::timeout(
                        Duration::from_secs(1),
                        etcd_client::Client::connect([&endpoint], None),
                    )
                    .await
                        && let Ok(Ok(_)) = tokio::time::timeout(
                            Duration::from_secs(1),
                            // A linearizable read needs a leader, like a write, but takes no
                            // revision: a write given up on here can still land later and move
                            // the revision under a test that counts revisions.
                            client.get("/ready", None),
                        )
                        .await
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
        }
    }

    /// The index of the member that is the raft leader now.
    pub async fn leader(&self) -> usize {
        crate::within("finding etcd's leader", async {
            loop {
                for (i, member) in self.members.iter().enumerate() {
                    if member.child.is_none() {
                        continue;
                    }
                    let Ok(mut client) =
                        etcd_client::Client::connect([self.endpoint(i)], None).await
                    else {
                        continue;
                    };
                    if let Ok(status) = client.status().await
                        && status.header().map(|h| h.member_id()) == Some(status.leader())
                    {
                        return i;
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// The lease renewals etcd has applied, over every member (etcd's own
    /// `etcd_debugging_lease_renewed_total`, counted by the leader): what refreshes cost etcd.
    pub async fn leases_renewed(&self) -> u64 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut total = 0;
        for member in self.members.iter().filter(|m| m.child.is_some()) {
            let mut conn = must(
                tokio::net::TcpStream::connect(("127.0.0.1", member.client_port)).await,
                "connect to etcd's metrics",
            );
            must(
                conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                    .await,
                "ask etcd for its metrics",
            );
            let mut page = String::new();
            must(conn.read_to_string(&mut page).await, "read etcd's metrics");
            total += page
                .lines()
                .find_map(|l| l.strip_prefix("etcd_debugging_lease_renewed_total "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("etcd's metrics have no lease renewal count:\n{page}"))
                as u64;
        }
        total
    }

    /// A client of the whole cluster.
    pub async fn client(&self) -> etcd_client::Client {
        must(
            etcd_client::Client::connect(self.endpoints(), None).await,
            "connect to etcd",
        )
    }

    /// Compacts etcd's history up to its current revision, as an operator's (or etcd's own
    /// periodic) compaction does; returns that revision.
    pub async fn compact(&self) -> i64 {
        let mut client = self.client().await;
        let head = must(client.get("/", None).await, "read etcd's revision");
        let revision = head.header().map_or(0, |h| h.revision());
        must(
            client
                .compact(
                    revision,
                    Some(etcd_client::CompactionOptions::new().with_physical()),
                )
                .await,
            "compact",
        );
        revision
    }

    /// A store on this cluster, tuned like a server's.
    pub async fn store(&self, config: EtcdConfig) -> EtcdStore {
        let config = EtcdConfig {
            endpoints: self.endpoints(),
            ..config
        };
        must(
            tokio::time::timeout(DEADLINE, EtcdStore::connect(config))
                .await
                .map_err(|_| "timed out"),
            "connect the etcd store",
        )
        .unwrap_or_else(|e| panic!("connect the etcd store: {e}"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
