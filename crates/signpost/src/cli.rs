//! The operator's commands: `services`, `ls`, `register`, `deregister`, `watch`. All go through
//! `signpost-client`, print a table (or JSON with `-o json`), and fail with one clear line.
//!
//! One-shot commands give up after `--timeout`; the long-running ones (`watch`, `register
//! --ttl`) keep trying, and say on stderr what they are waiting for each time they retry.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;
use signpost_client::{
    Client, Event, Filter, Health, HealthCheck, Instance, Probe, RegistrationBuilder,
    RegistrationState, RemovalReason,
};
use tokio_stream::StreamExt;

use crate::duration;
use crate::output::{age, line, rfc3339, table_with_notes};

/// `println!` that returns the error (a closed pipe) instead of panicking.
macro_rules! say {
    ($($arg:tt)*) => {
        line(&format!($($arg)*))?
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// What every operator command takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Output: a table for people, or JSON (one object per line for `watch`).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub format: Format,
}

/// How to reach the registry: every command that talks to it takes these.
#[derive(Debug, clap::Args)]
pub struct RegistryArgs {
    /// The registry to talk to.
    #[arg(
        long,
        env = "SIGNPOST_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    pub registry: String,
    /// The namespace.
    #[arg(
        short = 'n',
        long,
        default_value = "default",
        env = "SIGNPOST_NAMESPACE"
    )]
    pub namespace: String,
    /// The access token (sent as `authorization: Bearer TOKEN`).
    #[arg(long, env = "SIGNPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    // The three files are read from the environment here rather than by clap, so that a mistake
    // in a variable (one set empty, one without the other) is reported as that variable.
    /// Speak TLS and trust this CA (PEM) for the registry's certificate [env: SIGNPOST_CA_CERT].
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// Present this certificate (PEM) to a registry that requires mutual TLS; needs --client-key
    /// [env: SIGNPOST_CLIENT_CERT].
    #[arg(long)]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM) [env: SIGNPOST_CLIENT_KEY].
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    /// Check the registry's certificate against this name instead of the address's host.
    #[arg(long, env = "SIGNPOST_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

/// How long a one-shot command may wait for the registry.
#[derive(Debug, clap::Args)]
pub struct Deadline {
    /// Give up (exit 1) when the registry has not answered within this long.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    timeout: Duration,
}

/// A file setting and where it came from: the flag, or else the environment variable, named as
/// such in messages so that an empty `SIGNPOST_CLIENT_CERT=` is not reported as a flag.
fn file_setting(flag_value: &Option<PathBuf>, flag: &str, var: &str) -> Option<(PathBuf, String)> {
    match flag_value {
        Some(path) => Some((path.clone(), flag.to_owned())),
        None => std::env::var_os(var).map(|v| (PathBuf::from(v), var.to_owned())),
    }
}

impl RegistryArgs {
    /// A client whose calls each end within `timeout`: a one-shot command's deadline, or the
    /// library's default for the long-running ones.
    pub fn client(&self, timeout: Option<Duration>) -> anyhow::Result<Client> {
        let read = |(path, from): &(PathBuf, String)| {
            if path.as_os_str().is_empty() {
                usage_error(format!(
                    "{from} is empty: give it the path of a PEM file, or unset it"
                ));
            }
            std::fs::read(path).with_context(|| {
                format!(
                    "cannot read {} (from {from}): check the path",
                    path.display()
                )
            })
        };
        let connect = timeout.map_or(Duration::from_secs(3), |t| t.min(Duration::from_secs(3)));
        let mut builder = Client::builder()
            .registry(self.registry.clone())
            .connect_timeout(connect);
        if let Some(timeout) = timeout {
            // A little past the command's deadline, so that the deadline's message, which names
            // --timeout, is the one the user sees.
            builder = builder.request_timeout(timeout + Duration::from_millis(500));
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(ca) = file_setting(&self.ca_cert, "--ca-cert", "SIGNPOST_CA_CERT") {
            builder = builder.ca_certificate(read(&ca)?);
        }
        let cert = file_setting(&self.client_cert, "--client-cert", "SIGNPOST_CLIENT_CERT");
        let key = file_setting(&self.client_key, "--client-key", "SIGNPOST_CLIENT_KEY");
        match (cert, key) {
            (Some(cert), Some(key)) => builder = builder.identity(read(&cert)?, read(&key)?),
            (Some((_, from)), None) => usage_error(format!(
                "{from} needs a key too: give --client-key or SIGNPOST_CLIENT_KEY"
            )),
            (None, Some((_, from))) => usage_error(format!(
                "{from} needs its certificate: give --client-cert or SIGNPOST_CLIENT_CERT"
            )),
            (None, None) => {}
        }
        if let Some(domain) = &self.tls_domain {
            builder = builder.tls_domain(domain.clone());
        }
        Ok(builder.build()?)
    }
}

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    /// Only services with an instance whose metadata matches this label selector (e.g.
    /// `app=web,tier!=canary`), counting those instances alone.
    #[arg(long, default_value = "")]
    selector: String,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    deadline: Deadline,
}

/// Which instances of a service: the filter `ls` and `watch` share.
#[derive(Debug, clap::Args)]
pub struct FilterArgs {
    /// The service.
    service: String,
    /// Only instances with all these tags (comma-separated).
    #[arg(long, value_delimiter = ',')]
    tags: Vec<String>,
    /// A label selector over metadata, e.g. `version=v2,env!=dev`.
    #[arg(long, default_value = "")]
    selector: String,
    /// Include critical instances.
    #[arg(long)]
    all: bool,
}

#[derive(Debug, clap::Args)]
pub struct LsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    deadline: Deadline,
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("check").args(["http_check", "tcp_check", "grpc_check"])))]
pub struct RegisterArgs {
    /// The service to register an instance of.
    service: String,
    /// The instance id (default: ADDRESS-PORT).
    #[arg(long)]
    id: Option<String>,
    /// The instance's address (hostname, IPv4 or IPv6).
    #[arg(long)]
    address: String,
    /// The instance's port (1-65535).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// A tag; repeat for more.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata as key=value; repeat for more.
    #[arg(long = "meta", value_parser = parse_meta)]
    metadata: Vec<(String, String)>,
    /// The instance's share of calls, relative to the other instances' (twice the weight, twice
    /// the calls).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    weight: u32,
    /// The zone the instance runs in (e.g. eu-1a), shown by `ls` and given to clients.
    #[arg(long, default_value = "")]
    zone: String,
    /// Register on a lease with this ttl (at least 1s) and keep it alive until Ctrl-C, then
    /// deregister. Without it the instance is persistent.
    #[arg(long, value_parser = parse_ttl)]
    ttl: Option<Duration>,
    /// The registry checks the instance with `GET PATH`: 2xx passing, 429 warning, else critical.
    #[arg(long, value_name = "PATH")]
    http_check: Option<String>,
    /// The registry checks the instance by opening a TCP connection to it.
    #[arg(long)]
    tcp_check: bool,
    /// The registry checks the instance with grpc.health.v1 Check for SERVICE (without a value:
    /// the whole server).
    #[arg(long, value_name = "SERVICE", num_args = 0..=1, default_missing_value = "")]
    grpc_check: Option<String>,
    /// How often the registry runs the check (at least 1s; default 10s).
    #[arg(long, requires = "check", value_parser = parse_at_least_a_second)]
    interval: Option<Duration>,
    /// How long one probe may take (below --interval; default: half of it, at most 5s).
    #[arg(long, requires = "check", value_parser = parse_timeout)]
    check_timeout: Option<Duration>,
    /// Without --ttl: give up (exit 1) when the registry has not answered within this long
    /// (default 10s).
    #[arg(long, value_parser = parse_timeout, conflicts_with = "ttl")]
    timeout: Option<Duration>,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct DeregisterArgs {
    /// The service the instance belongs to.
    service: String,
    /// The instance's id: the one `register --id` gave, or by default ADDRESS-PORT
    /// (e.g. 10.0.0.1-8080).
    id: String,
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    deadline: Deadline,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    common: Common,
}

/// What `--interval` defaults to when a check is given.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
/// What a one-shot command waits for the registry by default.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The registry keeps leases and runs checks in whole seconds; less would be refused by the
/// registry with a less helpful message, or shown as `0ns`.
fn parse_at_least_a_second(text: &str) -> Result<Duration, String> {
    let d = duration::parse(text)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?} is too short: use at least 1s"));
    }
    Ok(d)
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = duration::parse(text)?;
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{text:?} is too short: a lease lives at least 1s (e.g. --ttl 10s)"
        ));
    }
    Ok(d)
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    let d = duration::parse(text)?;
    if d.is_zero() {
        return Err(format!(
            "{text:?} would give up before starting: use e.g. 10s"
        ));
    }
    Ok(d)
}

/// A usage mistake clap cannot see (it spans two flags): reported as clap reports its own, with
/// exit code 2.
fn usage_error(message: String) -> ! {
    clap::Error::raw(
        clap::error::ErrorKind::ValueValidation,
        format!("{message}\n"),
    )
    .exit()
}

/// `12s`, `1.5s`, `250ms`: how long, in the words an operator would type.
fn human(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// Runs one call of a one-shot command within its deadline. The library's own timeouts bound
/// each attempt; this bounds the whole command, as a script expects.
async fn within<T>(
    client: &Client,
    timeout: Duration,
    call: impl Future<Output = signpost_client::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => Ok(answer?),
        Err(_) => anyhow::bail!(
            "no answer from registry at {} within {}: check the address, or allow longer with --timeout",
            client.addresses(),
            human(timeout)
        ),
    }
}

/// What a long-running command is waiting for, in one line.
fn waiting_for(error: &signpost_client::Error) -> String {
    match error {
        signpost_client::Error::Unavailable { address, reason } => {
            format!("registry at {address}: {reason}")
        }
        signpost_client::Error::StoreUnavailable { address, reason } => {
            format!("the store of registry at {address}: {reason}")
        }
        other => other.to_string(),
    }
}

/// Waits until a registry answers, saying on stderr each time it does not and when it tries
/// again; `said` is set once a line was printed. Any answer counts, a refusal too: the command's
/// own call then reports it.
async fn wait_for_registry(client: &Client, namespace: &str, said: &AtomicBool) {
    let mut delay = Duration::from_secs(1);
    loop {
        match client.services(namespace).await {
            Err(e) if e.is_transient() => {
                eprintln!(
                    "signpost: waiting for {}; retrying in {}",
                    waiting_for(&e),
                    human(delay)
                );
                said.store(true, Ordering::Relaxed);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            _ => return,
        }
    }
}

/// The existing name nearest to `name`, if it is near enough to be a typo of it.
fn nearest<'a>(name: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(2);
    names
        .into_iter()
        .map(|candidate| (edit_distance(name, candidate), candidate))
        .filter(|(d, _)| *d <= limit)
        .min()
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The probe output shown under a row, cut so that one line stays one line.
fn check_note(i: &Instance) -> Option<String> {
    const MAX: usize = 100;
    if i.health == Health::Passing || i.health_output.trim().is_empty() {
        return None;
    }
    let flat = i
        .health_output
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let cut: String = flat.chars().take(MAX).collect();
    let ellipsis = if flat.chars().count() > MAX {
        "…"
    } else {
        ""
    };
    Some(format!("check: {cut}{ellipsis}"))
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

fn filter(common: &Common, args: &FilterArgs) -> Filter {
    let mut filter = Filter::service(args.service.clone())
        .namespace(common.registry.namespace.clone())
        .selector(args.selector.clone())
        .include_unhealthy(args.all);
    for tag in &args.tags {
        filter = filter.tag(tag.clone());
    }
    filter
}

fn health_name(health: Health) -> &'static str {
    match health {
        Health::Passing => "PASSING",
        Health::Warning => "WARNING",
        Health::Critical => "CRITICAL",
        Health::Unknown => "UNKNOWN",
    }
}

fn reason_name(reason: RemovalReason) -> &'static str {
    match reason {
        RemovalReason::Deregistered => "DEREGISTERED",
        RemovalReason::Expired => "EXPIRED",
        RemovalReason::Unhealthy => "UNHEALTHY",
        RemovalReason::Filtered => "FILTERED",
        RemovalReason::Unknown => "UNKNOWN",
    }
}

fn address(i: &Instance) -> String {
    if i.address.contains(':') {
        format!("[{}]:{}", i.address, i.port)
    } else {
        format!("{}:{}", i.address, i.port)
    }
}

#[derive(Serialize)]
struct InstanceJson<'a> {
    namespace: &'a str,
    service: &'a str,
    id: &'a str,
    address: &'a str,
    port: u16,
    health: &'static str,
    health_output: &'a str,
    zone: &'a str,
    weight: u32,
    tags: &'a [String],
    metadata: &'a BTreeMap<String, String>,
    lease_id: u64,
    created_at: Option<String>,
    mod_revision: u64,
}

impl<'a> From<&'a Instance> for InstanceJson<'a> {
    fn from(i: &'a Instance) -> Self {
        InstanceJson {
            namespace: &i.namespace,
            service: &i.service,
            id: &i.id,
            address: &i.address,
            port: i.port,
            health: health_name(i.health),
            health_output: &i.health_output,
            zone: &i.zone,
            weight: i.weight,
            tags: &i.tags,
            metadata: &i.metadata,
            lease_id: i.lease_id,
            created_at: i.created_at.map(rfc3339),
            mod_revision: i.mod_revision,
        }
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    say!(
        "{}",
        serde_json::to_string(value).context("cannot encode JSON")?
    );
    Ok(())
}

pub async fn services(args: ServicesArgs) -> anyhow::Result<()> {
    let timeout = args.deadline.timeout;
    let client = args.common.registry.client(Some(timeout))?;
    let services = within(
        &client,
        timeout,
        client.services_matching(&args.common.registry.namespace, &args.selector),
    )
    .await?;
    match args.common.format {
        Format::Json => {
            #[derive(Serialize)]
            struct Row<'a> {
                name: &'a str,
                instances: u32,
                healthy: u32,
            }
            let rows: Vec<Row> = services
                .iter()
                .map(|s| Row {
                    name: &s.name,
                    instances: s.instances,
                    healthy: s.healthy,
                })
                .collect();
            print_json(&rows)
        }
        Format::Table => {
            if services.is_empty() {
                if args.selector.is_empty() {
                    say!(
                        "no services in namespace {:?}",
                        args.common.registry.namespace
                    );
                } else {
                    say!(
                        "no services in namespace {:?} with an instance matching {:?}",
                        args.common.registry.namespace,
                        args.selector
                    );
                }
                return Ok(());
            }
            let rows: Vec<Vec<String>> = services
                .iter()
                .map(|s| {
                    vec![
                        s.name.clone(),
                        s.instances.to_string(),
                        s.healthy.to_string(),
                    ]
                })
                .collect();
            Ok(table_with_notes(
                &["SERVICE", "INSTANCES", "HEALTHY"],
                &rows,
                &[],
            )?)
        }
    }
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let filter = filter(&args.common, &args.filter);
    let timeout = args.deadline.timeout;
    let client = args.common.registry.client(Some(timeout))?;
    let instances = within(&client, timeout, client.discover(filter)).await?;
    if instances.is_empty() {
        // Nothing matched: say whether the service exists at all, since a typo and a service
        // with no matching instance look the same otherwise.
        let services = within(
            &client,
            timeout,
            client.services(&args.common.registry.namespace),
        )
        .await?;
        let name = &args.filter.service;
        if !services.iter().any(|s| &s.name == name) {
            let hint = match nearest(name, services.iter().map(|s| s.name.as_str())) {
                Some(near) => format!("; did you mean {near:?}?"),
                None => "; `signpost services` lists them".to_owned(),
            };
            anyhow::bail!(
                "no service {name:?} in namespace {:?}{hint}",
                args.common.registry.namespace
            );
        }
    }
    match args.common.format {
        Format::Json => {
            let rows: Vec<InstanceJson> = instances.iter().map(InstanceJson::from).collect();
            print_json(&rows)
        }
        Format::Table => {
            if instances.is_empty() {
                say!("no instances of {:?} match", args.filter.service);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = instances
                .iter()
                .map(|i| {
                    let metadata: Vec<String> =
                        i.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        i.id.clone(),
                        address(i),
                        health_name(i.health).to_owned(),
                        if i.zone.is_empty() {
                            "-".into()
                        } else {
                            i.zone.clone()
                        },
                        if i.tags.is_empty() {
                            "-".into()
                        } else {
                            i.tags.join(",")
                        },
                        if metadata.is_empty() {
                            "-".into()
                        } else {
                            metadata.join(",")
                        },
                        age(i.created_at),
                    ]
                })
                .collect();
            let notes: Vec<Option<String>> = instances.iter().map(check_note).collect();
            Ok(table_with_notes(
                &["ID", "ADDRESS", "HEALTH", "ZONE", "TAGS", "METADATA", "AGE"],
                &rows,
                &notes,
            )?)
        }
    }
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let timeout = args.timeout.unwrap_or(DEFAULT_TIMEOUT);
    let client = args
        .common
        .registry
        .client(args.ttl.is_none().then_some(timeout))?;
    let mut builder = RegistrationBuilder::new(args.service.clone())
        .namespace(args.common.registry.namespace.clone())
        .address(args.address.clone())
        .port(args.port)
        .weight(args.weight)
        .zone(args.zone.clone());
    if let Some(id) = &args.id {
        builder = builder.id(id.clone());
    }
    for tag in &args.tags {
        builder = builder.tag(tag.clone());
    }
    for (k, v) in &args.metadata {
        builder = builder.metadata(k.clone(), v.clone());
    }
    let probe = match (&args.http_check, args.tcp_check, &args.grpc_check) {
        (Some(path), _, _) => Some(Probe::Http { path: path.clone() }),
        (_, true, _) => Some(Probe::Tcp),
        (_, _, Some(service)) => Some(Probe::Grpc {
            service: service.clone(),
        }),
        _ => None,
    };
    if let Some(probe) = probe {
        let interval = args.interval.unwrap_or(DEFAULT_INTERVAL);
        let mut check = HealthCheck::new(probe, interval);
        if let Some(limit) = args.check_timeout {
            if limit >= interval {
                usage_error(format!(
                    "--check-timeout {} must be below --interval {}: a probe has to end before \
                     the next one starts",
                    human(limit),
                    human(interval)
                ));
            }
            check.timeout = limit;
        }
        builder = builder.check(check);
    }
    let Some(ttl) = args.ttl else {
        let stored = within(&client, timeout, client.register_persistent(builder)).await?;
        return match args.common.format {
            Format::Json => print_json(&InstanceJson::from(&stored)),
            Format::Table => {
                say!(
                    "registered {}/{} at {} (persistent: stays until deregistered)",
                    stored.service,
                    stored.id,
                    address(&stored)
                );
                Ok(())
            }
        };
    };
    // The library retries an unreachable registry quietly; waiting here first says so.
    wait_for_registry(
        &client,
        &args.common.registry.namespace,
        &AtomicBool::new(false),
    )
    .await;
    let registration = client.register(builder.ttl(ttl)).await?;
    let lease = match registration.state() {
        RegistrationState::Registered { lease_id } => lease_id,
        _ => 0,
    };
    match args.common.format {
        Format::Json => {
            #[derive(Serialize)]
            struct Registered<'a> {
                event: &'static str,
                service: &'a str,
                id: &'a str,
                lease_id: u64,
                ttl_seconds: f64,
            }
            print_json(&Registered {
                event: "registered",
                service: registration.service(),
                id: registration.id(),
                lease_id: lease,
                ttl_seconds: ttl.as_secs_f64(),
            })?;
        }
        Format::Table => say!(
            "registered {}/{} (lease {lease}, ttl {ttl:?}); keeping it alive until Ctrl-C",
            registration.service(),
            registration.id()
        ),
    }
    let mut states = registration.subscribe();
    // Reports what happens to the registration; ends with the reason if the registry refused
    // to take it back (retrying cannot fix that).
    let report = async {
        while states.changed().await.is_ok() {
            let state = states.borrow_and_update().clone();
            match state {
                RegistrationState::Retrying { reason } => {
                    eprintln!(
                        "signpost: lost the registration, waiting to register again: {reason}"
                    )
                }
                RegistrationState::Registered { lease_id } => {
                    eprintln!("signpost: registered again (lease {lease_id})")
                }
                RegistrationState::Failed { reason } => return Some(reason),
                RegistrationState::Stopped => break,
            }
        }
        std::future::pending::<Option<String>>().await
    };
    let refused = tokio::select! {
        _ = crate::shutdown_signal() => None,
        refused = report => refused,
    };
    if let Some(reason) = refused {
        anyhow::bail!(
            "the registry refused to register {}/{} again: {reason}",
            registration.service(),
            registration.id()
        );
    }
    let existed = registration.deregister().await?;
    match args.common.format {
        Format::Json => {
            #[derive(Serialize)]
            struct Deregistered {
                event: &'static str,
                existed: bool,
            }
            print_json(&Deregistered {
                event: "deregistered",
                existed,
            })
        }
        Format::Table => {
            say!(
                "deregistered {}/{}",
                args.service,
                args.id.as_deref().unwrap_or("(default id)")
            );
            Ok(())
        }
    }
}

pub async fn deregister(args: DeregisterArgs) -> anyhow::Result<()> {
    let timeout = args.deadline.timeout;
    let client = args.common.registry.client(Some(timeout))?;
    let existed = within(
        &client,
        timeout,
        client.deregister(&args.common.registry.namespace, &args.service, &args.id),
    )
    .await?;
    match args.common.format {
        Format::Json => {
            #[derive(Serialize)]
            struct Answer {
                existed: bool,
            }
            print_json(&Answer { existed })
        }
        Format::Table if existed => {
            say!("deregistered {}/{}", args.service, args.id);
            Ok(())
        }
        Format::Table => {
            // Exit 0: the instance is gone either way, so a cleanup script may run this twice.
            say!(
                "{}/{} was not registered; nothing to do",
                args.service,
                args.id
            );
            Ok(())
        }
    }
}

/// A probe that says what a watch waits for while it has no stream.
struct Waiting {
    task: tokio::task::JoinHandle<()>,
    said: Arc<AtomicBool>,
    lost: bool,
}

impl Waiting {
    /// `lost`: the user was told the stream broke, so its return is worth a line too.
    fn start(client: &Client, namespace: &str, lost: bool) -> Waiting {
        let said = Arc::new(AtomicBool::new(false));
        let (client, namespace, flag) = (client.clone(), namespace.to_owned(), said.clone());
        let task = tokio::spawn(async move { wait_for_registry(&client, &namespace, &flag).await });
        Waiting { task, said, lost }
    }

    /// Stops the probe; true when the user heard of the wait and should hear that it ended.
    fn stop(self) -> bool {
        self.task.abort();
        self.lost && self.said.load(Ordering::Relaxed)
    }
}

#[derive(Serialize)]
struct EventJson<'a> {
    time: String,
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    address: &'a str,
    port: u16,
    health: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    revision: u64,
}

fn print_event(
    format: Format,
    kind: &'static str,
    i: &Instance,
    reason: Option<&'static str>,
    revision: u64,
) -> anyhow::Result<()> {
    let time = rfc3339(SystemTime::now());
    match format {
        Format::Json => print_json(&EventJson {
            time,
            kind,
            id: &i.id,
            address: &i.address,
            port: i.port,
            health: health_name(i.health),
            reason,
            revision,
        }),
        Format::Table => {
            let reason = reason.map(|r| format!(" {r}")).unwrap_or_default();
            say!(
                "{time} {kind:<8} {} {} {}{reason}",
                i.id,
                address(i),
                health_name(i.health)
            );
            Ok(())
        }
    }
}

pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let filter = filter(&args.common, &args.filter);
    let client = args.common.registry.client(None)?;
    let (mut updates, stats) = client.watch_with_stats(filter);
    // What we have shown, so a reset after a reconnect prints only what really changed.
    let mut shown: BTreeMap<String, Instance> = BTreeMap::new();
    let format = args.common.format;
    // The watch reconnects by itself without a word; until a stream delivers, a probe says on
    // stderr what the watch waits for.
    let mut waiting = Some(Waiting::start(
        &client,
        &args.common.registry.namespace,
        false,
    ));
    let mut reconnects = stats.counts().reconnects;
    // The counts are the only sign of a broken stream; a quarter second is soon enough to say so.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        let update = tokio::select! {
            _ = crate::shutdown_signal() => return Ok(()),
            _ = tick.tick() => {
                let now = stats.counts().reconnects;
                if now != reconnects && waiting.is_none() {
                    eprintln!(
                        "signpost: lost the watch stream from registry at {}; reconnecting",
                        client.addresses()
                    );
                    waiting = Some(Waiting::start(&client, &args.common.registry.namespace, true));
                }
                reconnects = now;
                continue;
            }
            update = updates.next() => match update {
                Some(update) => update?,
                None => return Ok(()),
            },
        };
        if let Some(done) = waiting.take() {
            let again = if done.lost { " again" } else { "" };
            if done.stop() {
                eprintln!(
                    "signpost: watching{again} (registry at {})",
                    client.addresses()
                );
            }
            reconnects = stats.counts().reconnects;
        }
        if update.reset {
            let now: BTreeMap<String, Instance> = update
                .events
                .iter()
                .map(|e| (e.instance().id.clone(), e.instance().clone()))
                .collect();
            for (id, old) in &shown {
                if !now.contains_key(id) {
                    print_event(format, "REMOVED", old, Some("RESET"), update.revision)?;
                }
            }
            for (id, new) in &now {
                match shown.get(id) {
                    None => print_event(format, "ADDED", new, None, update.revision)?,
                    Some(old) if old != new => {
                        print_event(format, "UPDATED", new, None, update.revision)?
                    }
                    Some(_) => {}
                }
            }
            shown = now;
            continue;
        }
        for event in &update.events {
            match event {
                Event::Added(i) => {
                    print_event(format, "ADDED", i, None, update.revision)?;
                    shown.insert(i.id.clone(), i.clone());
                }
                Event::Updated(i) => {
                    print_event(format, "UPDATED", i, None, update.revision)?;
                    shown.insert(i.id.clone(), i.clone());
                }
                Event::Removed(i, reason) => {
                    print_event(
                        format,
                        "REMOVED",
                        i,
                        Some(reason_name(*reason)),
                        update.revision,
                    )?;
                    shown.remove(&i.id);
                }
            }
        }
    }
}
