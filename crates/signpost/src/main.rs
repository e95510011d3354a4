//! `signpost`: the Signpost registry server (`signpost serve`), the gateway (`gateway`), and the
//! operator's commands (`services`, `ls`, `register`, `deregister`, `watch`, and `xds-bootstrap`,
//! which prints a gRPC client's xDS bootstrap file, in `xds`).
//!
//! This binary is a thin edge over the library crates: it reads flags and `SIGNPOST_*` environment
//! variables with clap, sets up `tracing` logs, builds the chosen store, and hands both to
//! `signpost_server::serve` until SIGINT or SIGTERM. The operator's commands (`cli`) are built on
//! `signpost-client`; `output` prints their tables. `serde`/`serde_json` are here for `-o json`.
//! `toml` is here for `serve --config FILE` (docs/config.md), read for people who run the server
//! under a supervisor and would rather keep its settings in a file than in a unit's command line.
//!
//! The workspace builds with `--cfg tokio_unstable` (`.cargo/config.toml`) so that the runtime can
//! run without its LIFO slot (see `main`); a build without the flag works the same, with slower
//! watch fan-out.

mod cli;
mod duration;
mod gateway;
mod output;
mod xds;

/// mimalloc instead of the system allocator: building each answer allocates many small strings and
/// maps, and a profile of Discover under load showed glibc's malloc and free taking about a quarter
/// of the server's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use signpost_store::{DurableStore, EtcdConfig, EtcdStore, MemoryConfig, MemoryStore, Store};
use tokio::net::TcpListener;

/// Signpost: service discovery for gRPC.
///
/// Services register their instances; clients discover them and follow every change as a stream.
#[derive(Debug, Parser)]
#[command(name = "signpost", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the registry server.
    ///
    /// Serves signpost.v1.RegistryService, grpc.health.v1.Health and server reflection on one port,
    /// so `grpcurl -plaintext 127.0.0.1:7070 list` works. Stops gracefully on Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// List the services of a namespace: instances and healthy counts.
    Services(cli::ServicesArgs),
    /// List the instances of a service.
    Ls(cli::LsArgs),
    /// Register an instance; with --ttl, keep it alive until Ctrl-C, then deregister.
    Register(cli::RegisterArgs),
    /// Remove an instance.
    Deregister(cli::DeregisterArgs),
    /// Server-side discovery: a reverse proxy that sends /{service}/{path} to a healthy instance.
    ///
    /// HTTP/1.1, HTTP/2 and gRPC pass through; WebSockets are tunnelled. Keeps routing to the
    /// last known instances while the registry is unreachable. Stops gracefully on SIGTERM.
    Gateway(gateway::GatewayArgs),
    /// Print every change to a service as it happens, until Ctrl-C; reconnects on its own.
    Watch(cli::WatchArgs),
    /// Print the xDS bootstrap file that makes gRPC clients use the registry as their control
    /// plane: `GRPC_XDS_BOOTSTRAP=file`, then `xds:///service` targets.
    XdsBootstrap(xds::XdsBootstrapArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StoreKind {
    /// On disk in --data-dir: survives restarts and crashes; each change is on disk before it is
    /// acknowledged.
    Durable,
    /// Everything in memory: fast, and forgotten when the server stops.
    Memory,
    /// In an etcd cluster (--etcd-endpoints): run several servers over one cluster; any of them
    /// answers any client.
    Etcd,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Read settings from this TOML file (docs/config.md): each key is a flag's long name
    /// (`listen = "0.0.0.0:7070"`). Flags and environment variables override the file.
    #[arg(long, env = "SIGNPOST_CONFIG")]
    config: Option<PathBuf>,

    /// Address to listen on. Use 0.0.0.0:7070 to accept connections from other hosts.
    #[arg(long, env = "SIGNPOST_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,

    /// Where registrations are kept.
    #[arg(long, value_enum, env = "SIGNPOST_STORE", default_value = "durable")]
    store: StoreKind,

    /// The durable store's directory; created if missing. Only one server may use it at a time.
    #[arg(long, env = "SIGNPOST_DATA_DIR", default_value = "./signpost-data")]
    data_dir: PathBuf,

    /// The etcd cluster's client URLs for --store etcd, comma-separated.
    #[arg(
        long,
        env = "SIGNPOST_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd_endpoints: Vec<String>,

    /// Every etcd key Signpost writes starts with this; registries sharing a cluster need their own.
    #[arg(long, env = "SIGNPOST_ETCD_PREFIX", default_value = "/signpost/")]
    etcd_prefix: String,

    /// How often an idle Watch stream gets a progress message (e.g. 5s, 500ms, 1m). Each stream's
    /// wait is shortened by up to a quarter, so that streams do not all send at once.
    #[arg(long, env = "SIGNPOST_WATCH_PROGRESS_INTERVAL", default_value = "5s", value_parser = duration::parse)]
    watch_progress_interval: Duration,

    /// How many changes are kept so that a reconnecting watcher can resume by revision. Older
    /// resumes get a fresh snapshot instead.
    #[arg(long, env = "SIGNPOST_HISTORY_SIZE", default_value_t = 10_000)]
    history_size: usize,

    /// How long to wait for in-flight calls after SIGINT/SIGTERM before exiting anyway.
    #[arg(long, env = "SIGNPOST_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration::parse)]
    shutdown_grace: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9090).
    #[arg(long, env = "SIGNPOST_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,

    /// Answer DNS on this address, UDP and TCP (e.g. 127.0.0.1:8600); see docs/dns.md.
    #[arg(long, env = "SIGNPOST_DNS_LISTEN")]
    dns_listen: Option<SocketAddr>,

    /// The domain DNS answers for (`consul` for clients written for Consul's DNS).
    #[arg(
        long,
        env = "SIGNPOST_DNS_DOMAIN",
        default_value = "signpost",
        requires = "dns_listen"
    )]
    dns_domain: String,

    /// The TTL of DNS records and of negative answers.
    #[arg(long, env = "SIGNPOST_DNS_TTL", default_value = "5s", value_parser = duration::parse, requires = "dns_listen")]
    dns_ttl: Duration,

    /// The most records in one UDP answer; a larger one is marked truncated and given whole over
    /// TCP.
    #[arg(long, env = "SIGNPOST_DNS_UDP_MAX_RECORDS", default_value_t = 32, value_parser = clap::value_parser!(u16).range(1..), requires = "dns_listen")]
    dns_udp_max_records: u16,

    /// Answer only these namespaces over DNS, comma-separated (DNS carries no token: with
    /// --auth-tokens, list the namespaces anyone who can reach the port may read).
    #[arg(
        long,
        env = "SIGNPOST_DNS_NAMESPACES",
        value_delimiter = ',',
        requires = "dns_listen"
    )]
    dns_namespaces: Option<Vec<String>>,

    /// Serve Consul's HTTP API and Prometheus' HTTP service discovery on this address
    /// (e.g. 127.0.0.1:8500, Consul's port); see docs/consul.md.
    #[arg(long, env = "SIGNPOST_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,

    /// The datacenter Consul clients are told they talk to.
    #[arg(
        long,
        env = "SIGNPOST_CONSUL_DATACENTER",
        default_value = "dc1",
        requires = "http_listen"
    )]
    consul_datacenter: String,

    /// The node name every instance is reported on through the Consul API.
    #[arg(
        long,
        env = "SIGNPOST_CONSUL_NODE_NAME",
        default_value = "signpost",
        requires = "http_listen"
    )]
    consul_node_name: String,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SIGNPOST_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "SIGNPOST_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Require clients to present a certificate signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "SIGNPOST_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,

    /// Access tokens and their grants (TOML). Without it, anyone who can connect may do anything.
    #[arg(long, env = "SIGNPOST_AUTH_TOKENS")]
    auth_tokens: Option<PathBuf>,

    /// A token may only update or deregister the instances it registered.
    #[arg(long, env = "SIGNPOST_STRICT_OWNERSHIP", requires = "auth_tokens")]
    strict_ownership: bool,

    /// Do not serve gRPC reflection.
    #[arg(long, env = "SIGNPOST_NO_REFLECTION")]
    no_reflection: bool,

    /// The longest a unary call may run.
    #[arg(long, env = "SIGNPOST_REQUEST_TIMEOUT", default_value = "30s", value_parser = duration::parse)]
    request_timeout: Duration,

    /// At most this many instances in one service.
    #[arg(long, env = "SIGNPOST_MAX_INSTANCES_PER_SERVICE", default_value_t = signpost_server::Limits::default().max_instances_per_service)]
    max_instances_per_service: u64,

    /// At most this many instances in one namespace.
    #[arg(long, env = "SIGNPOST_MAX_INSTANCES_PER_NAMESPACE", default_value_t = signpost_server::Limits::default().max_instances_per_namespace)]
    max_instances_per_namespace: u64,

    /// At most this many live leases (with --store etcd: leases that hold instances).
    #[arg(long, env = "SIGNPOST_MAX_LEASES", default_value_t = signpost_server::Limits::default().max_leases)]
    max_leases: u64,

    /// At most this many open Watch streams.
    #[arg(long, env = "SIGNPOST_MAX_WATCHES", default_value_t = signpost_server::Limits::default().max_watches)]
    max_watches: usize,

    /// At most this many open Watch streams on one client connection.
    #[arg(long, env = "SIGNPOST_MAX_WATCHES_PER_CONNECTION", default_value_t = signpost_server::Limits::default().max_watches_per_connection)]
    max_watches_per_connection: usize,

    /// Log format: human-readable text or one JSON object per line. Filter with RUST_LOG.
    #[arg(long, value_enum, env = "SIGNPOST_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

fn main() -> std::process::ExitCode {
    let cli = match parse(std::env::args_os().collect()) {
        Ok(cli) => cli,
        Err(error) => match error.downcast::<clap::Error>() {
            // --help, --version and bad flags, as clap says them.
            Ok(clap_error) => clap_error.exit(),
            Err(error) => {
                eprintln!("signpost: {error:#}");
                return std::process::ExitCode::from(2);
            }
        },
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // A task woken by another runs next in the LIFO slot. A change fanned out to thousands of
    // watch streams then goes out one write per stream: each stream's frame wakes its
    // connection's task, which runs at once and writes that one frame. Without the slot the
    // connection's task runs after the other streams have queued theirs and writes them all
    // together: server CPU per change to 5,000 watchers ~72 -> ~20 ms, and Discover and Register
    // cost less too (docs/benchmarks.md). The flag comes from .cargo/config.toml.
    // The gateway is the opposite case: each request is a hand-off from the client's
    // connection task to the instance's and back, which the LIFO slot runs at once.
    #[cfg(tokio_unstable)]
    if !matches!(cli.command, Command::Gateway(_)) {
        builder.disable_lifo_slot();
    }
    let result = builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| runtime.block_on(run(cli)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // The reader went away (`signpost watch | head -1`): nothing left to say.
        Err(error)
            if error
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("signpost: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Parses the command line. For `serve` with `--config FILE` (or `SIGNPOST_CONFIG`), each of the
/// file's settings that neither a flag nor the environment gave is added as the flag it names,
/// and the whole is parsed again: the file is checked by the same parsers as the flags, and flags
/// and environment win.
fn parse(args: Vec<std::ffi::OsString>) -> anyhow::Result<Cli> {
    // The first pass only finds the file and what is already set: a flag may need another that
    // only the file gives (`--strict-ownership` with `auth-tokens` in the file), so the
    // `requires` between flags wait for the second pass.
    let relaxed = Cli::command().mut_subcommand("serve", |serve| {
        serve.mut_args(|arg| arg.requires(clap::builder::Resettable::<clap::Id>::Reset))
    });
    let matches = relaxed.try_get_matches_from(&args)?;
    let config = matches
        .subcommand_matches("serve")
        .and_then(|serve| Some((serve, serve.get_one::<PathBuf>("config")?)));
    let Some((serve, path)) = config else {
        return Ok(Cli::try_parse_from(args)?);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let extra = config_flags(&text, serve)
        .with_context(|| format!("in the config file {}", path.display()))?;
    let mut all = args;
    all.extend(extra.into_iter().map(std::ffi::OsString::from));
    Cli::try_parse_from(all).map_err(|e| {
        // clap names the flag; say that the value came from the file.
        let said = e.render().to_string();
        let first = said.lines().next().unwrap_or_default();
        anyhow::anyhow!(
            "in the config file {}: {}",
            path.display(),
            first.trim_start_matches("error: ")
        )
    })
}

/// The flags a config file's settings stand for, leaving out those the command line or the
/// environment already set. An unknown key, or a value of the wrong kind, is an error naming it.
fn config_flags(text: &str, serve: &clap::ArgMatches) -> anyhow::Result<Vec<String>> {
    use clap::parser::ValueSource;
    let table: toml::Table = text.parse().context("not valid TOML")?;
    let command = Cli::command();
    let serve_command = command
        .find_subcommand("serve")
        .context("the serve command has no arguments")?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let arg = serve_command
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()) && key != "config");
        let Some(arg) = arg else {
            anyhow::bail!(
                "unknown key {key:?}: the keys are the long names of `signpost serve`'s flags \
                 (see `signpost serve --help` and docs/config.md)"
            );
        };
        let id = arg.get_id().as_str();
        if matches!(
            serve.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let is_switch = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        match value {
            toml::Value::Boolean(on) if is_switch => {
                if *on {
                    flags.push(format!("--{key}"));
                }
            }
            _ if is_switch => anyhow::bail!("{key} is true or false, not a {}", value.type_str()),
            toml::Value::String(s) => flags.push(format!("--{key}={s}")),
            toml::Value::Integer(n) => flags.push(format!("--{key}={n}")),
            toml::Value::Array(items) if arg.get_value_delimiter().is_some() => {
                let mut parts = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => parts.push(s.clone()),
                        other => anyhow::bail!(
                            "{key} is a list of strings, not one with a {}",
                            other.type_str()
                        ),
                    }
                }
                flags.push(format!("--{key}={}", parts.join(",")));
            }
            other => anyhow::bail!("{key} is a string or a number, not a {}", other.type_str()),
        }
    }
    Ok(flags)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Gateway(args) = &cli.command {
        init_logs(args.log_format);
    } else if !matches!(cli.command, Command::Serve(_)) {
        // The operator's commands print their own one-line errors; library logs go to stderr
        // only when asked for with RUST_LOG.
        if std::env::var_os("RUST_LOG").is_some() {
            init_logs(LogFormat::Text);
        }
    }
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Services(args) => cli::services(args).await,
        Command::Ls(args) => cli::ls(args).await,
        Command::Register(args) => cli::register(args).await,
        Command::Deregister(args) => cli::deregister(args).await,
        Command::Watch(args) => cli::watch(args).await,
        Command::Gateway(args) => gateway::run(args).await,
        Command::XdsBootstrap(args) => xds::bootstrap(args),
    }
}

fn init_logs(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The DNS server logs every query at info; that is for RUST_LOG=hickory_server=info to ask.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("hickory")) {
        for quiet in [
            "hickory_server=warn",
            "hickory_net=warn",
            "hickory_proto=warn",
        ] {
            if let Ok(directive) = quiet.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logs(args.log_format);
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener
        .local_addr()
        .context("cannot read the bound address")?;
    let memory = MemoryConfig {
        history_limit: args.history_size,
        ..MemoryConfig::default()
    };
    match args.store {
        StoreKind::Memory => {
            tracing::info!(%addr, store = "memory", "signpost listening on {addr}");
            run_server(Arc::new(MemoryStore::new(memory)), listener, &args).await
        }
        StoreKind::Durable => {
            let store = DurableStore::open(&args.data_dir, memory)?;
            tracing::info!(%addr, store = "durable", data_dir = %args.data_dir.display(), "signpost listening on {addr}");
            run_server(Arc::new(store), listener, &args).await
        }
        StoreKind::Etcd => {
            let endpoints = args.etcd_endpoints.join(",");
            let store = EtcdStore::connect(EtcdConfig {
                endpoints: args.etcd_endpoints.clone(),
                prefix: args.etcd_prefix.clone(),
                history_limit: args.history_size,
                ..EtcdConfig::default()
            })
            .await?;
            tracing::info!(%addr, store = "etcd", etcd = %endpoints, prefix = %args.etcd_prefix, "signpost listening on {addr}");
            run_server(Arc::new(store), listener, &args).await
        }
    }
}

/// The TLS files of `serve`, read at start and again on SIGHUP or when one of them changes.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn read(&self) -> anyhow::Result<signpost_server::Tls> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read the {what} {}", path.display()))
        };
        Ok(signpost_server::Tls {
            cert_pem: read(&self.cert, "TLS certificate")?,
            key_pem: read(&self.key, "TLS key")?,
            client_ca_pem: self
                .client_ca
                .as_ref()
                .map(|ca| read(ca, "client CA"))
                .transpose()?,
        })
    }

    /// When the files were last changed, to notice a renewal without being told.
    fn modified(&self) -> Vec<Option<std::time::SystemTime>> {
        [Some(&self.cert), Some(&self.key), self.client_ca.as_ref()]
            .into_iter()
            .flatten()
            .map(|path| std::fs::metadata(path).and_then(|m| m.modified()).ok())
            .collect()
    }

    /// The files' contents as they change: re-read on SIGHUP (as systemd's `ExecReload` sends
    /// it) and when their modification times change (a certificate renewed in place). Files that
    /// cannot be read, half-written ones included, keep the certificates being served; the
    /// server refuses material it cannot use.
    fn follow(
        &self,
        first: signpost_server::Tls,
    ) -> tokio::sync::watch::Receiver<signpost_server::Tls> {
        let (tx, rx) = tokio::sync::watch::channel(first);
        let files = self.clone();
        tokio::spawn(async move {
            let mut hangup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(signal) => Some(signal),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGHUP: TLS files are re-read when they change only");
                    None
                }
            };
            let mut poll = tokio::time::interval(Duration::from_secs(2));
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut seen = files.modified();
            loop {
                let hup = async {
                    match hangup.as_mut() {
                        Some(signal) => signal.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = hup => tracing::info!("SIGHUP: re-reading the TLS files"),
                    _ = poll.tick() => {
                        let now = files.modified();
                        if now == seen {
                            continue;
                        }
                        seen = now;
                    }
                }
                match files.read() {
                    Ok(tls) => {
                        tx.send_if_modified(|current| {
                            let changed = current.cert_pem != tls.cert_pem
                                || current.key_pem != tls.key_pem
                                || current.client_ca_pem != tls.client_ca_pem;
                            if changed {
                                *current = tls;
                            }
                            changed
                        });
                    }
                    Err(e) => tracing::error!(
                        error = format!("{e:#}"),
                        "cannot re-read the TLS files; still serving the certificates before"
                    ),
                }
            }
        });
        rx
    }
}

async fn run_server<S: Store>(
    store: Arc<S>,
    listener: TcpListener,
    args: &ServeArgs,
) -> anyhow::Result<()> {
    let metrics = Arc::new(signpost_server::metrics::Metrics::new());
    let tls_files = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: args.tls_client_ca.clone(),
        }),
        _ => None,
    };
    let tls = tls_files.as_ref().map(TlsFiles::read).transpose()?;
    let auth = match &args.auth_tokens {
        Some(path) => {
            let tokens = signpost_server::auth::Tokens::load(path)?;
            for name in &tokens.in_clear {
                tracing::warn!(token = %name, "token \"{name}\" is written in clear in the token file: store its sha256 instead");
            }
            Some(Arc::new(tokens))
        }
        None => None,
    };
    let tls_mode = match &tls {
        None => "off",
        Some(t) if t.client_ca_pem.is_some() => "mutual",
        Some(_) => "on",
    };
    tracing::info!(
        tls = tls_mode,
        tokens = auth.as_ref().map_or(0, |a| a.len()),
        strict_ownership = args.strict_ownership,
        reflection = !args.no_reflection,
        "security settings"
    );
    let tls_updates = match (&tls_files, &tls) {
        (Some(files), Some(first)) => Some(files.follow(first.clone())),
        _ => None,
    };
    let config = signpost_server::Config {
        watch_progress_interval: args.watch_progress_interval,
        metrics: Some(metrics.clone()),
        tls,
        tls_updates,
        auth,
        strict_ownership: args.strict_ownership,
        reflection: !args.no_reflection,
        request_timeout: args.request_timeout,
        limits: signpost_server::Limits {
            max_instances_per_service: args.max_instances_per_service,
            max_instances_per_namespace: args.max_instances_per_namespace,
            max_leases: args.max_leases,
            max_watches: args.max_watches,
            max_watches_per_connection: args.max_watches_per_connection,
        },
        ..signpost_server::Config::default()
    };
    let (signalled_tx, signalled_rx) = tokio::sync::watch::channel(false);
    if let Some(addr) = args.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {addr}"))?;
        let bound = listener
            .local_addr()
            .context("cannot read the metrics address")?;
        tracing::info!("metrics on http://{bound}/metrics");
        let mut stop = signalled_rx.clone();
        tokio::spawn(signpost_server::metrics::serve_metrics(
            listener,
            metrics,
            store.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
    }
    let shutdown = async move {
        shutdown_signal().await;
        let _ = signalled_tx.send(true);
    };
    let dns = match args.dns_listen {
        None => None,
        Some(addr) => {
            let dns = signpost_server::dns::DnsListener::bind(
                addr,
                signpost_server::dns::DnsConfig {
                    domain: args.dns_domain.clone(),
                    ttl: args.dns_ttl,
                    udp_max_records: usize::from(args.dns_udp_max_records),
                    namespaces: args.dns_namespaces.clone(),
                    ..signpost_server::dns::DnsConfig::default()
                },
            )
            .await?;
            let bound = dns.local_addr().context("cannot read the DNS address")?;
            tracing::info!(domain = %args.dns_domain, "dns on {bound} (udp and tcp)");
            if args.auth_tokens.is_some() && args.dns_namespaces.is_none() {
                tracing::warn!(
                    "DNS carries no token: anyone who can reach {bound} can read every namespace; \
                     limit it with --dns-namespaces"
                );
            }
            Some(dns)
        }
    };
    let http = match args.http_listen {
        None => None,
        Some(addr) => {
            let http = signpost_server::http::HttpListener::bind(
                addr,
                signpost_server::http::HttpConfig {
                    datacenter: args.consul_datacenter.clone(),
                    node_name: args.consul_node_name.clone(),
                },
            )
            .await
            .with_context(|| format!("cannot listen for the HTTP API on {addr}"))?;
            let bound = http
                .local_addr()
                .context("cannot read the HTTP API address")?;
            tracing::info!("http api on http://{bound} (Consul's API, Prometheus' http_sd)");
            if args.tls_cert.is_some() {
                tracing::warn!(
                    "the HTTP API on {bound} is plaintext: tokens sent to it cross the network in \
                     the clear; keep it on a trusted network or loopback"
                );
            }
            Some(http)
        }
    };
    let more = signpost_server::Listeners { dns, http };
    let server = signpost_server::serve_with(store, config, listener, more, shutdown);
    tokio::pin!(server);
    let grace = args.shutdown_grace;
    tokio::select! {
        result = &mut server => result.context("server failed")?,
        _ = async {
            let mut signalled = signalled_rx;
            let _ = signalled.wait_for(|s| *s).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "in-flight calls did not finish in time; exiting anyway");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT or SIGTERM (what systemd, Docker and Kubernetes send). If the handlers cannot be
/// installed, logs why and never completes: the process can still be killed, and a service that
/// cannot hear a stop request should not stop on its own.
pub(crate) async fn shutdown_signal() {
    match signpost_client::shutdown_signal().await {
        Ok(signal) => tracing::info!(%signal, "asked to stop"),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGINT or SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    // Test code: a failed expectation is the test failing.
    #![allow(clippy::expect_used, clippy::unwrap_used)]

    use super::*;

    fn serve_with(file: &str, flags: &[&str]) -> anyhow::Result<ServeArgs> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signpost.toml");
        std::fs::write(&path, file).unwrap();
        let mut args: Vec<std::ffi::OsString> = vec!["signpost".into(), "serve".into()];
        args.push("--config".into());
        args.push(path.into_os_string());
        args.extend(flags.iter().map(Into::into));
        match parse(args)?.command {
            Command::Serve(serve) => Ok(serve),
            other => panic!("not serve: {other:?}"),
        }
    }

    #[test]
    fn the_file_fills_in_what_the_flags_leave_out() {
        let serve = serve_with(
            r#"
            listen = "0.0.0.0:7171"
            store = "etcd"
            etcd-endpoints = ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
            watch-progress-interval = "2s"
            history-size = 500
            no-reflection = true
            "#,
            &["--listen", "127.0.0.1:7272"],
        )
        .unwrap();
        assert_eq!(serve.listen.to_string(), "127.0.0.1:7272", "the flag wins");
        assert_eq!(serve.store, StoreKind::Etcd);
        assert_eq!(
            serve.etcd_endpoints,
            ["http://10.0.0.1:2379", "http://10.0.0.2:2379"]
        );
        assert_eq!(serve.watch_progress_interval, Duration::from_secs(2));
        assert_eq!(serve.history_size, 500);
        assert!(serve.no_reflection);
        assert!(!serve.strict_ownership);

        // A flag may need a setting that only the file gives.
        let serve = serve_with(
            "auth-tokens = \"/etc/signpost/tokens.toml\"\n",
            &["--strict-ownership"],
        )
        .unwrap();
        assert!(serve.strict_ownership && serve.auth_tokens.is_some());
        assert!(
            serve_with("", &["--strict-ownership"]).is_err(),
            "and without it the flag is refused as before"
        );
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let full = format!("{:#}", serve_with("listen-port = 7070\n", &[]).unwrap_err());
        assert!(full.contains("unknown key \"listen-port\""), "{full}");
        let config = format!("{:#}", serve_with("config = \"x\"\n", &[]).unwrap_err());
        assert!(config.contains("unknown key \"config\""), "{config}");
    }

    #[test]
    fn a_bad_value_names_its_key_and_the_file() {
        let error = format!(
            "{:#}",
            serve_with("history-size = \"many\"\n", &[]).unwrap_err()
        );
        assert!(
            error.contains("in the config file") && error.contains("--history-size"),
            "{error}"
        );
        let error = format!(
            "{:#}",
            serve_with("no-reflection = \"yes\"\n", &[]).unwrap_err()
        );
        assert!(error.contains("no-reflection is true or false"), "{error}");
        let error = format!("{:#}", serve_with("listen = [1, 2]\n", &[]).unwrap_err());
        assert!(error.contains("listen is a string or a number"), "{error}");
    }
}
