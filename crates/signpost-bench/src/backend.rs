//! `signpost-bench http-backend`: the HTTP instance behind the gateway benchmark, fast enough
//! that the proxies in front of it are what is measured. HTTP/1.1 with keep-alive and HTTP/2
//! with prior knowledge on one port (hyper-util's `auto`); every answer is 200 with a short
//! body naming the backend.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub(crate) async fn serve(port: u16, id: String) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    println!("serving on {}", listener.local_addr()?.port());
    let body = Bytes::from(format!("{id}\n"));
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_request| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(body))) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
