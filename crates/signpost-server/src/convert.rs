//! Conversions between the wire types of `signpost-proto` and the domain types of
//! `signpost-store`. Conversions from the wire validate as they go.

use std::time::Duration;

use signpost_proto::v1 as pb;
use signpost_store::{Health, HealthCheck, Instance, Probe, RemovalCause};

use crate::error::{Error, Result};
use crate::validate;

/// The weight given to instances registered without one.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Reads a registered instance; `field` is how the request names it (e.g. `instance`).
pub(crate) fn instance_from_pb(field: &str, pb: pb::Instance) -> Result<Instance> {
    let namespace = validate::namespace(&format!("{field}.namespace"), pb.namespace)?;
    validate::service(&format!("{field}.service"), &pb.service)?;
    validate::id(&format!("{field}.id"), &pb.id)?;
    let address = validate::address(&format!("{field}.address"), &pb.address)?;
    let port = validate::port(&format!("{field}.port"), pb.port)?;
    let tags = validate::tags(&format!("{field}.tags"), pb.tags)?;
    let metadata = validate::metadata(&format!("{field}.metadata"), pb.metadata)?;
    let zone = validate::zone(&format!("{field}.zone"), pb.zone)?;
    let check = pb
        .check
        .map(|c| check_from_pb(&format!("{field}.check"), c))
        .transpose()?;
    Ok(Instance {
        namespace,
        service: pb.service,
        id: pb.id,
        address,
        port,
        tags,
        metadata,
        weight: if pb.weight == 0 {
            DEFAULT_WEIGHT
        } else {
            pb.weight
        },
        zone,
        check,
        ..Instance::default()
    })
}

fn check_from_pb(field: &str, pb: pb::HealthCheck) -> Result<HealthCheck> {
    let probe = match pb.probe {
        Some(pb::health_check::Probe::Http(http)) => {
            let path = http.path;
            if !path.starts_with('/')
                || path.len() > 1024
                || path.chars().any(|c| c.is_control() || c == ' ')
            {
                return Err(Error::invalid(
                    format!("{field}.http.path"),
                    format!(
                        "{path:?} is invalid: an absolute path such as /health, without spaces, up to 1024 bytes"
                    ),
                ));
            }
            let method = http_method(&format!("{field}.http.method"), http.method)?;
            let headers = http_headers(&format!("{field}.http.headers"), http.headers)?;
            Probe::Http {
                path,
                method,
                headers,
            }
        }
        Some(pb::health_check::Probe::Tcp(_)) => Probe::Tcp,
        Some(pb::health_check::Probe::Ttl(_)) => {
            // Reported by the instance: nothing to time. Its lease is checked where the request
            // is (a ttl check needs one).
            return Ok(HealthCheck {
                probe: Probe::Ttl,
                interval: Duration::ZERO,
                timeout: Duration::ZERO,
                deregister_critical_after: None,
                successes_before_passing: 1,
                failures_before_critical: 1,
            });
        }
        Some(pb::health_check::Probe::Grpc(grpc)) => {
            if grpc.service.len() > 255 || grpc.service.chars().any(char::is_control) {
                return Err(Error::invalid(
                    format!("{field}.grpc.service"),
                    "is invalid: up to 255 printable characters",
                ));
            }
            Probe::Grpc {
                service: grpc.service,
            }
        }
        None => {
            return Err(Error::invalid(
                format!("{field}.probe"),
                "is required: set http, tcp, grpc or ttl",
            ));
        }
    };
    let required = |name: &str, d: Option<prost_types::Duration>| {
        let name = format!("{field}.{name}");
        match d {
            Some(d) => duration_from_pb(&name, d),
            None => Err(Error::invalid(name, "is required")),
        }
    };
    let interval = required("interval", pb.interval)?;
    if !(MIN_CHECK_INTERVAL..=MAX_CHECK_INTERVAL).contains(&interval) {
        return Err(Error::invalid(
            format!("{field}.interval"),
            format!("{interval:?} is out of range: use 1s to 1h"),
        ));
    }
    let timeout = required("timeout", pb.timeout)?;
    if timeout.is_zero() || timeout >= interval {
        return Err(Error::invalid(
            format!("{field}.timeout"),
            format!(
                "{timeout:?} is invalid: it must be above zero and below the interval ({interval:?})"
            ),
        ));
    }
    let deregister_critical_after = pb
        .deregister_critical_after
        .map(|d| duration_from_pb(&format!("{field}.deregister_critical_after"), d))
        .transpose()?;
    if let Some(after) = deregister_critical_after
        && after < MIN_CHECK_INTERVAL
    {
        return Err(Error::invalid(
            format!("{field}.deregister_critical_after"),
            format!("{after:?} is too short: at least 1s"),
        ));
    }
    let count = |name: &str, value: u32| {
        if value > 100 {
            Err(Error::invalid(
                format!("{field}.{name}"),
                format!("{value} is out of range 0-100"),
            ))
        } else {
            Ok(value.max(1))
        }
    };
    Ok(HealthCheck {
        probe,
        interval,
        timeout,
        deregister_critical_after,
        successes_before_passing: count("successes_before_passing", pb.successes_before_passing)?,
        failures_before_critical: count("failures_before_critical", pb.failures_before_critical)?,
    })
}

/// The methods an HTTP check may send (bodiless: the probe has nothing to send).
const HTTP_METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const MAX_CHECK_HEADERS: usize = 16;
const MAX_CHECK_HEADER_BYTES: usize = 4096;

/// An HTTP check's method, upper case; empty (GET) stays empty.
fn http_method(field: &str, method: String) -> Result<String> {
    let upper = method.to_ascii_uppercase();
    if upper.is_empty() || upper == "GET" {
        return Ok(String::new());
    }
    if HTTP_METHODS.contains(&upper.as_str()) {
        Ok(upper)
    } else {
        Err(Error::invalid(
            field,
            format!("{method:?} is not one of {}", HTTP_METHODS.join(", ")),
        ))
    }
}

/// An HTTP check's headers, sorted by name (lower case), as they can be sent.
fn http_headers(
    field: &str,
    headers: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<(String, String)>> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value) in headers {
        let parsed = hyper::header::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
            Error::invalid(format!("{field}[{name:?}]"), "is not a valid header name")
        })?;
        if hyper::header::HeaderValue::from_str(&value).is_err() {
            return Err(Error::invalid(
                format!("{field}[{name:?}]"),
                "has a value that cannot be sent (control characters)",
            ));
        }
        use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
        if [HOST, CONTENT_LENGTH, CONNECTION, TRANSFER_ENCODING].contains(&parsed) {
            return Err(Error::invalid(
                format!("{field}[{name:?}]"),
                "is set by the probe itself",
            ));
        }
        out.push((parsed.as_str().to_owned(), value));
    }
    let bytes: usize = out.iter().map(|(k, v)| k.len() + v.len()).sum();
    if out.len() > MAX_CHECK_HEADERS || bytes > MAX_CHECK_HEADER_BYTES {
        return Err(Error::invalid(
            field,
            format!(
                "has {} headers in {bytes} bytes: at most {MAX_CHECK_HEADERS} in {MAX_CHECK_HEADER_BYTES}",
                out.len()
            ),
        ));
    }
    out.sort();
    Ok(out)
}

/// The shortest and longest health check intervals.
pub const MIN_CHECK_INTERVAL: Duration = Duration::from_secs(1);
pub const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(3600);

pub(crate) fn duration_from_pb(field: &str, d: prost_types::Duration) -> Result<Duration> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(Error::invalid(
            field,
            format!(
                "{}s {}ns is not a valid non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    // Both checked non-negative just above.
    Ok(Duration::new(
        d.seconds.unsigned_abs(),
        d.nanos.unsigned_abs(),
    ))
}

pub(crate) fn duration_to_pb(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Always below one billion, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

pub(crate) fn health_to_pb(health: Health) -> pb::HealthStatus {
    match health {
        Health::Passing => pb::HealthStatus::Passing,
        Health::Warning => pb::HealthStatus::Warning,
        Health::Critical => pb::HealthStatus::Critical,
    }
}

pub(crate) fn removal_to_pb(cause: RemovalCause) -> pb::RemovalReason {
    match cause {
        RemovalCause::Deregistered => pb::RemovalReason::Deregistered,
        RemovalCause::Expired => pb::RemovalReason::Expired,
        RemovalCause::Unhealthy => pb::RemovalReason::Unhealthy,
    }
}

pub(crate) fn instance_to_pb(i: &Instance) -> pb::Instance {
    pb::Instance {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        id: i.id.clone(),
        address: i.address.clone(),
        port: u32::from(i.port),
        tags: i.tags.clone(),
        metadata: i
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        weight: i.weight,
        zone: i.zone.clone(),
        check: i.check.as_ref().map(check_to_pb),
        health: health_to_pb(i.health).into(),
        lease_id: i.lease_id.unwrap_or(0),
        create_revision: i.create_revision,
        mod_revision: i.mod_revision,
        health_output: i.health_output.clone(),
        health_checked_at: i.health_checked_at.map(prost_types::Timestamp::from),
        create_time: i.created_at.map(prost_types::Timestamp::from),
    }
}

pub(crate) fn check_to_pb(c: &HealthCheck) -> pb::HealthCheck {
    let probe = match &c.probe {
        Probe::Http {
            path,
            method,
            headers,
        } => pb::health_check::Probe::Http(pb::HttpProbe {
            path: path.clone(),
            method: method.clone(),
            headers: headers.iter().cloned().collect(),
        }),
        Probe::Tcp => pb::health_check::Probe::Tcp(pb::TcpProbe {}),
        Probe::Grpc { service } => pb::health_check::Probe::Grpc(pb::GrpcProbe {
            service: service.clone(),
        }),
        Probe::Ttl => {
            return pb::HealthCheck {
                probe: Some(pb::health_check::Probe::Ttl(pb::TtlProbe {})),
                ..pb::HealthCheck::default()
            };
        }
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
