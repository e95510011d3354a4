//! `signpost gateway`: the flags of `signpost-gateway`'s [`Config`], and the listeners.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use signpost_gateway::{BudgetPolicy, Config, Gateway, Routes, Tls};
use tokio::net::TcpListener;

use crate::cli::RegistryArgs;
use crate::duration;

#[derive(Debug, clap::Args)]
pub struct GatewayArgs {
    /// Where clients connect: plain HTTP/1.1 and HTTP/2 (h2c) on one port.
    #[arg(
        long,
        env = "SIGNPOST_GATEWAY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    listen: SocketAddr,

    #[command(flatten)]
    registry: RegistryArgs,

    /// A route tried before /{service}/{path}, as `host=NAME,service=S`, `host=*.DOMAIN`,
    /// `grpc=pkg.Service,service=S` or `prefix=/PATH,service=S`, each with optional `tag=`,
    /// `selector=`, `timeout=` and `idle=`. Repeat for more; in the environment, separate them
    /// with `;`.
    #[arg(long = "route", env = "SIGNPOST_GATEWAY_ROUTES", value_delimiter = ';')]
    routes: Vec<String>,

    /// Serve Prometheus metrics at /metrics on this address.
    #[arg(long, env = "SIGNPOST_GATEWAY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Also serve HTTPS (HTTP/2 and HTTP/1.1 by ALPN) here; needs --tls-cert and --tls-key.
    #[arg(long, env = "SIGNPOST_GATEWAY_TLS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    tls_listen: Option<SocketAddr>,

    /// The certificate chain (PEM) of the HTTPS listener.
    #[arg(long, env = "SIGNPOST_GATEWAY_TLS_CERT", requires = "tls_listen")]
    tls_cert: Option<PathBuf>,

    /// The key (PEM) of --tls-cert.
    #[arg(long, env = "SIGNPOST_GATEWAY_TLS_KEY", requires = "tls_listen")]
    tls_key: Option<PathBuf>,

    /// The gateway's zone: instances of this zone are preferred while enough of them are up.
    #[arg(long, env = "SIGNPOST_GATEWAY_ZONE", default_value = "")]
    zone: String,

    /// How long a request may wait for its answer's head before it is answered 504.
    #[arg(long, env = "SIGNPOST_GATEWAY_REQUEST_TIMEOUT", default_value = "15s", value_parser = duration::parse)]
    request_timeout: Duration,

    /// How long a request's or an answer's body may go without a byte before it is cut off.
    #[arg(long, env = "SIGNPOST_GATEWAY_IDLE_TIMEOUT", default_value = "5m", value_parser = duration::parse)]
    idle_timeout: Duration,

    /// How long connecting to an instance may take.
    #[arg(long, env = "SIGNPOST_GATEWAY_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration::parse)]
    connect_timeout: Duration,

    /// Attempts per request, each on a different instance.
    #[arg(long, env = "SIGNPOST_GATEWAY_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    max_attempts: u32,

    /// Retries of requests that reached an instance, per request on average (plus 10 a second).
    #[arg(long, env = "SIGNPOST_GATEWAY_RETRY_BUDGET", default_value_t = 0.2)]
    retry_budget: f64,

    /// Client connections open at once; more wait until one closes.
    #[arg(
        long,
        env = "SIGNPOST_GATEWAY_MAX_CONNECTIONS",
        default_value_t = 10_000
    )]
    max_connections: usize,

    /// The largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(
        long,
        env = "SIGNPOST_GATEWAY_MAX_HEADER_BYTES",
        default_value_t = 65_536
    )]
    max_header_bytes: usize,

    /// Log one line per request (target signpost_gateway::access).
    #[arg(long, env = "SIGNPOST_GATEWAY_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,

    /// Log format: human-readable text or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, value_enum, env = "SIGNPOST_LOG_FORMAT", default_value = "text")]
    pub log_format: crate::LogFormat,
}

pub async fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let routes = Routes::parse(&args.routes).map_err(|e| anyhow::anyhow!("--route: {e}"))?;
    if !(0.0..=10.0).contains(&args.retry_budget) {
        anyhow::bail!("--retry-budget must be between 0 and 10 retries per request");
    }
    let client = args.registry.client(None)?;
    let config = Config {
        namespace: args.registry.namespace.clone(),
        routes,
        zone: args.zone,
        request_timeout: args.request_timeout,
        idle_timeout: args.idle_timeout,
        connect_timeout: args.connect_timeout,
        max_attempts: args.max_attempts,
        retry_budget: BudgetPolicy {
            ratio: args.retry_budget,
            ..BudgetPolicy::default()
        },
        max_connections: args.max_connections,
        max_header_bytes: args.max_header_bytes,
        access_log: args.access_log,
        ..Config::default()
    };
    let tls = match (&args.tls_listen, &args.tls_cert, &args.tls_key) {
        (Some(addr), Some(cert), Some(key)) => {
            let read = |path: &PathBuf| {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
            };
            let acceptor = Tls {
                cert_pem: read(cert)?,
                key_pem: read(key)?,
            }
            .acceptor()
            .map_err(|e| anyhow::anyhow!("--tls-cert/--tls-key: {e}"))?;
            Some((*addr, acceptor))
        }
        _ => None,
    };
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let gateway = Gateway::new(client, config);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    if let Some(addr) = args.metrics_listen {
        let metrics = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for metrics"))?;
        tracing::info!(addr = %metrics.local_addr().unwrap_or(addr), "gateway metrics at /metrics");
        let stop = stop.clone();
        tasks.push(tokio::spawn(signpost_gateway::serve_metrics(
            metrics,
            gateway.metrics(),
            async move { stop.cancelled().await },
        )));
    }
    if let Some((addr, acceptor)) = tls {
        let secure = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for HTTPS"))?;
        tracing::info!(addr = %secure.local_addr().unwrap_or(addr), "gateway serving HTTPS");
        let (gateway, stop) = (gateway.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            gateway
                .serve(secure, Some(acceptor), stop.cancelled())
                .await
        }));
    }
    let local = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(addr = %local, registry = %args.registry.registry, namespace = %args.registry.namespace, "gateway listening");
    let signal = {
        let stop = stop.clone();
        async move {
            crate::shutdown_signal().await;
            tracing::info!("shutting down: draining requests in flight");
            stop.cancel();
        }
    };
    tokio::spawn(signal);
    gateway.serve(listener, None, stop.cancelled()).await;
    for task in tasks {
        let _ = task.await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}
