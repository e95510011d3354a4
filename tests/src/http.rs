//! A real HTTP/1.1 server for health-check tests whose answer the test flips: a status code,
//! or hanging without answering. It counts the requests each path received.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// Answers every request with the current status; [`HANG`](FlipServer::HANG) answers nothing.
#[derive(Debug)]
pub struct FlipServer {
    pub addr: SocketAddr,
    status: Arc<AtomicU16>,
    hits: Arc<Mutex<HashMap<String, u64>>>,
    task: JoinHandle<()>,
}

impl FlipServer {
    /// The status that makes the server hang instead of answering.
    pub const HANG: u16 = 0;

    pub async fn start(status: u16) -> FlipServer {
        let listener = crate::must(TcpListener::bind("127.0.0.1:0").await, "http bind");
        let addr = crate::must(listener.local_addr(), "http addr");
        let current = Arc::new(AtomicU16::new(status));
        let hits: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let task = tokio::spawn({
            let (current, hits) = (current.clone(), hits.clone());
            async move {
                while let Ok((mut socket, _)) = listener.accept().await {
                    let (current, hits) = (current.clone(), hits.clone());
                    tokio::spawn(async move {
                        let mut head = Vec::new();
                        let mut buf = [0u8; 1024];
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match socket.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let text = String::from_utf8_lossy(&head);
                        let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
                        *hits
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .entry(path)
                            .or_default() += 1;
                        let status = current.load(Ordering::SeqCst);
                        if status == FlipServer::HANG {
                            std::future::pending::<()>().await;
                        }
                        let answer = format!(
                            "HTTP/1.1 {status} Status\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        );
                        let _ = socket.write_all(answer.as_bytes()).await;
                    });
                }
            }
        });
        FlipServer {
            addr,
            status: current,
            hits,
            task,
        }
    }

    pub fn set(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    pub fn port(&self) -> u32 {
        u32::from(self.addr.port())
    }

    /// Requests per path so far.
    pub fn hits(&self) -> HashMap<String, u64> {
        self.hits.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for FlipServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
