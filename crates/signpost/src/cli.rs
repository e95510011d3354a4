//! The operator's commands: `services`, `ls`, `register`, `deregister`, `watch`. All go through
//! `signpost-client`, print a table (or JSON with `-o json`), and fail with one clear line.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;
use signpost_client::{
    Client, Event, Filter, Health, HealthCheck, Instance, RegistrationBuilder, RegistrationState,
    RemovalReason,
};
use tokio_stream::StreamExt;

use crate::duration;
use crate::output::{age, line, rfc3339, table};

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
    /// The registry to talk to.
    #[arg(
        long,
        env = "SIGNPOST_REGISTRY",
        default_value = "http://127.0.0.1:7070"
    )]
    pub registry: String,
    /// Output: a table for people, or JSON (one object per line for `watch`).
    #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
    pub format: Format,
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
    /// Speak TLS and trust this CA (PEM) for the registry's certificate.
    #[arg(long, env = "SIGNPOST_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Present this certificate (PEM) to a registry that requires mutual TLS; needs --client-key.
    #[arg(long, env = "SIGNPOST_CLIENT_CERT", requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    /// The key of --client-cert (PEM).
    #[arg(long, env = "SIGNPOST_CLIENT_KEY", requires = "client_cert")]
    pub client_key: Option<PathBuf>,
    /// Check the registry's certificate against this name instead of the address's host.
    #[arg(long, env = "SIGNPOST_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
}

impl Common {
    fn client(&self) -> anyhow::Result<Client> {
        let read = |path: &PathBuf| {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
        };
        let mut builder = Client::builder()
            .registry(self.registry.clone())
            .connect_timeout(Duration::from_secs(3));
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(ca) = &self.ca_cert {
            builder = builder.ca_certificate(read(ca)?);
        }
        if let (Some(cert), Some(key)) = (&self.client_cert, &self.client_key) {
            builder = builder.identity(read(cert)?, read(key)?);
        }
        if let Some(domain) = &self.tls_domain {
            builder = builder.tls_domain(domain.clone());
        }
        Ok(builder.build()?)
    }
}

#[derive(Debug, clap::Args)]
pub struct ServicesArgs {
    #[command(flatten)]
    common: Common,
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
}

#[derive(Debug, clap::Args)]
pub struct RegisterArgs {
    /// The service to register an instance of.
    service: String,
    /// The instance id (default: ADDRESS-PORT).
    #[arg(long)]
    id: Option<String>,
    /// The instance's address (hostname, IPv4 or IPv6).
    #[arg(long)]
    address: String,
    /// The instance's port.
    #[arg(long)]
    port: u16,
    /// A tag; repeat for more.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Metadata as key=value; repeat for more.
    #[arg(long = "meta", value_parser = parse_meta)]
    metadata: Vec<(String, String)>,
    #[arg(long, default_value_t = 0)]
    weight: u32,
    #[arg(long, default_value = "")]
    zone: String,
    /// Register on a lease with this ttl and keep it alive until Ctrl-C, then deregister.
    /// Without it the instance is persistent.
    #[arg(long, value_parser = duration::parse)]
    ttl: Option<Duration>,
    /// An HTTP health check on this path of the instance.
    #[arg(long)]
    http_check: Option<String>,
    /// How often to run the health check.
    #[arg(long, default_value = "10s", value_parser = duration::parse)]
    interval: Duration,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct DeregisterArgs {
    service: String,
    id: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    #[command(flatten)]
    filter: FilterArgs,
    #[command(flatten)]
    common: Common,
}

fn parse_meta(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{text:?} is not key=value"))
}

fn filter(common: &Common, args: &FilterArgs) -> Filter {
    let mut filter = Filter::service(args.service.clone())
        .namespace(common.namespace.clone())
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
    let services = args
        .common
        .client()?
        .services(&args.common.namespace)
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
                say!("no services in namespace {:?}", args.common.namespace);
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
            Ok(table(&["SERVICE", "INSTANCES", "HEALTHY"], &rows)?)
        }
    }
}

pub async fn ls(args: LsArgs) -> anyhow::Result<()> {
    let filter = filter(&args.common, &args.filter);
    let instances = args.common.client()?.discover(filter).await?;
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
            Ok(table(
                &["ID", "ADDRESS", "HEALTH", "ZONE", "TAGS", "METADATA", "AGE"],
                &rows,
            )?)
        }
    }
}

pub async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    let client = args.common.client()?;
    let mut builder = RegistrationBuilder::new(args.service.clone())
        .namespace(args.common.namespace.clone())
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
    if let Some(path) = &args.http_check {
        builder = builder.check(HealthCheck::http(path.clone(), args.interval));
    }
    let Some(ttl) = args.ttl else {
        let stored = client.register_persistent(builder).await?;
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
                    eprintln!("signpost: not registered right now ({reason}); retrying")
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
    let existed = args
        .common
        .client()?
        .deregister(&args.common.namespace, &args.service, &args.id)
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
            say!("{}/{} was not registered", args.service, args.id);
            Ok(())
        }
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
    let client = args.common.client()?;
    let mut updates = client.watch(filter);
    // What we have shown, so a reset after a reconnect prints only what really changed.
    let mut shown: BTreeMap<String, Instance> = BTreeMap::new();
    let format = args.common.format;
    loop {
        let update = tokio::select! {
            _ = crate::shutdown_signal() => return Ok(()),
            update = updates.next() => match update {
                Some(update) => update?,
                None => return Ok(()),
            },
        };
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
