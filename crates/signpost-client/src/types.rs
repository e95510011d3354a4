//! The typed domain of the client API, and its conversions from and to the wire types, in one
//! place.

use std::collections::BTreeMap;
use std::time::Duration;

use signpost_proto::v1 as pb;

/// The health of an instance as the registry sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    Passing,
    Warning,
    Critical,
    /// A status this client does not know (a newer registry).
    Unknown,
}

/// An active health check for the registry to run against a registered instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// At least 1 s.
    pub interval: Duration,
    /// Below the interval.
    pub timeout: Duration,
    pub deregister_critical_after: Option<Duration>,
    /// Good probes in a row that make a critical instance passing (0 means 1).
    pub successes_before_passing: u32,
    /// Failed probes in a row that make a healthy instance critical (0 means 1).
    pub failures_before_critical: u32,
}

impl HealthCheck {
    /// A check with `probe` every `interval`, a timeout of half the interval (at most 5 s), and
    /// one result in either direction to change the status.
    pub fn new(probe: Probe, interval: Duration) -> Self {
        HealthCheck {
            probe,
            interval,
            timeout: (interval / 2).min(Duration::from_secs(5)),
            deregister_critical_after: None,
            successes_before_passing: 1,
            failures_before_critical: 1,
        }
    }

    /// `GET path` on the instance every `interval`.
    pub fn http(path: impl Into<String>, interval: Duration) -> Self {
        Self::new(Probe::Http { path: path.into() }, interval)
    }
}

/// What a [`HealthCheck`] probes, at the instance's own address and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `GET path`: 2xx passing, 429 warning, anything else critical.
    Http { path: String },
    /// A TCP connect.
    Tcp,
    /// `grpc.health.v1.Health/Check` for `service` ("" for the whole server).
    Grpc { service: String },
}

/// A registered instance, as discovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub namespace: String,
    pub service: String,
    pub id: String,
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
    pub weight: u32,
    pub zone: String,
    pub health: Health,
    /// With a check: the probe result behind the last health change.
    pub health_output: String,
    /// 0 for a persistent instance.
    pub lease_id: u64,
    /// When the instance was first registered.
    pub created_at: Option<std::time::SystemTime>,
    pub create_revision: u64,
    pub mod_revision: u64,
}

impl Instance {
    /// `http://address:port`, with brackets around an IPv6 address.
    pub fn uri(&self) -> String {
        format!("http://{}", self.authority_text())
    }

    fn authority_text(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    /// `address:port` as an HTTP authority (brackets around an IPv6 address); the error says
    /// why the address cannot be one.
    pub fn authority(&self) -> Result<http::uri::Authority, String> {
        let text = self.authority_text();
        http::uri::Authority::try_from(text.as_str())
            .map_err(|e| format!("address {text:?} is not usable: {e}"))
    }
}

/// Why an instance left a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RemovalReason {
    Deregistered,
    Expired,
    Unhealthy,
    Filtered,
    Unknown,
}

/// What happened to an instance in a view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Added(Instance),
    Updated(Instance),
    Removed(Instance, RemovalReason),
}

impl Event {
    pub fn instance(&self) -> &Instance {
        match self {
            Event::Added(i) | Event::Updated(i) | Event::Removed(i, _) => i,
        }
    }
}

/// One message of a watch, typed. After a `reset`, `events` holds the whole view as
/// [`Event::Added`]: replace what you had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchUpdate {
    pub revision: u64,
    pub reset: bool,
    pub events: Vec<Event>,
}

// === conversions ===

pub(crate) fn instance_from_pb(i: pb::Instance) -> Instance {
    let health = match i.health() {
        pb::HealthStatus::Passing => Health::Passing,
        pb::HealthStatus::Warning => Health::Warning,
        pb::HealthStatus::Critical => Health::Critical,
        pb::HealthStatus::Unspecified => Health::Unknown,
    };
    Instance {
        port: u16::try_from(i.port).unwrap_or(0),
        namespace: i.namespace,
        service: i.service,
        id: i.id,
        address: i.address,
        tags: i.tags,
        metadata: i.metadata.into_iter().collect(),
        weight: i.weight,
        zone: i.zone,
        health,
        health_output: i.health_output,
        lease_id: i.lease_id,
        created_at: i
            .create_time
            .and_then(|t| std::time::SystemTime::try_from(t).ok()),
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
    }
}

pub(crate) fn event_from_pb(e: pb::Event) -> Option<Event> {
    let kind = e.r#type();
    let reason = match e.reason() {
        pb::RemovalReason::Deregistered => RemovalReason::Deregistered,
        pb::RemovalReason::Expired => RemovalReason::Expired,
        pb::RemovalReason::Unhealthy => RemovalReason::Unhealthy,
        pb::RemovalReason::Filtered => RemovalReason::Filtered,
        pb::RemovalReason::Unspecified => RemovalReason::Unknown,
    };
    let instance = instance_from_pb(e.instance?);
    match kind {
        pb::EventType::Added => Some(Event::Added(instance)),
        pb::EventType::Updated => Some(Event::Updated(instance)),
        pb::EventType::Removed => Some(Event::Removed(instance, reason)),
        pb::EventType::Unspecified => None,
    }
}

pub(crate) fn update_from_pb(m: pb::WatchResponse) -> WatchUpdate {
    WatchUpdate {
        revision: m.revision,
        reset: m.reset,
        events: m.events.into_iter().filter_map(event_from_pb).collect(),
    }
}

pub(crate) fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn check_to_pb(c: &HealthCheck) -> pb::HealthCheck {
    let probe = match &c.probe {
        Probe::Http { path } => pb::health_check::Probe::Http(pb::HttpProbe {
            path: path.clone(),
            ..Default::default()
        }),
        Probe::Tcp => pb::health_check::Probe::Tcp(pb::TcpProbe {}),
        Probe::Grpc { service } => pb::health_check::Probe::Grpc(pb::GrpcProbe {
            service: service.clone(),
        }),
    };
    pb::HealthCheck {
        probe: Some(probe),
        interval: Some(duration_to_pb(c.interval)),
        timeout: Some(duration_to_pb(c.timeout)),
        deregister_critical_after: c.deregister_critical_after.map(duration_to_pb),
        successes_before_passing: c.successes_before_passing,
        failures_before_critical: c.failures_before_critical,
    }
}
