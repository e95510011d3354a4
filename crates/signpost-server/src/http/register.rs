//! A Consul service registration (`PUT /v1/agent/service/register`) read into a Signpost
//! registration. Consul decodes bodies case-insensitively and clients differ (python-consul sends
//! `check`, py-consul lower-case `checks`, Go's client `Check`/`Checks`; some send snake case), so
//! keys are matched ignoring case and underscores. What Signpost cannot honour is refused with the
//! field named, never dropped; what has no meaning here (`EnableTagOverride`, a check's `Name`)
//! is ignored, as docs/consul.md lists.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Map, Value};
use signpost_proto::v1 as pb;

use super::request::Failure;
use crate::convert::duration_to_pb;
use crate::error::{Error, Result};

/// What a Consul registration asks of the registry.
#[derive(Debug)]
pub(crate) struct Registration {
    pub(crate) instance: pb::Instance,
    /// A TTL check: the lease the instance lives on, refreshed by its reports.
    pub(crate) ttl: Option<Duration>,
    /// The request named no check: without `replace-existing-checks`, the instance keeps the one
    /// it has (as a Consul agent keeps a service's checks).
    pub(crate) no_check: bool,
}

/// A Consul check's timeout when it gives none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An object whose keys are matched as Consul matches them.
struct Obj<'a>(&'a Map<String, Value>);

fn normal(key: &str) -> String {
    key.chars()
        .filter(|c| *c != '_' && *c != '-')
        .flat_map(char::to_lowercase)
        .collect()
}

impl<'a> Obj<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        let want = normal(key);
        self.0
            .iter()
            .find(|(k, _)| normal(k) == want)
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    }

    fn string(&self, key: &str, field: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Error::invalid(field, "must be a string")),
        }
    }

    fn present(&self, key: &str) -> bool {
        match self.get(key) {
            None => false,
            Some(Value::String(s)) => !s.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(Value::Object(o)) => !o.is_empty(),
            Some(Value::Bool(b)) => *b,
            Some(_) => true,
        }
    }
}

fn object<'a>(value: &'a Value, field: &str) -> Result<Obj<'a>> {
    match value {
        Value::Object(map) => Ok(Obj(map)),
        _ => Err(Error::invalid(field, "must be a JSON object")),
    }
}

/// A Go duration ("10s", "1m30s", "500ms", "1.5h"), or a number of nanoseconds, as Consul takes.
pub(crate) fn go_duration(field: &str, value: &Value) -> Result<Duration> {
    let bad = |why: &str| Error::invalid(field, format!("{value} is not a duration: {why}"));
    let text = match value {
        Value::Number(n) => {
            return n
                .as_u64()
                .map(Duration::from_nanos)
                .ok_or_else(|| bad("a number of nanoseconds must be a whole number >= 0"));
        }
        Value::String(s) => s.trim(),
        _ => return Err(bad("give a string such as \"10s\"")),
    };
    parse_go_duration(text)
        .ok_or_else(|| bad("use a number and a unit, such as 10s, 1m30s or 500ms"))
}

pub(crate) fn parse_go_duration(text: &str) -> Option<Duration> {
    if text == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest.get(..number_len)?.parse().ok()?;
        rest = rest.get(number_len..)?;
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match rest.get(..unit_len)? {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = rest.get(unit_len..)?;
        total += number * seconds;
    }
    (total.is_finite() && total < 1e12).then(|| Duration::from_secs_f64(total))
}

/// Whether two hosts name the same machine, as far as a check's target can tell: the same
/// address, or both this machine's loopback.
fn same_host(a: &str, b: &str) -> bool {
    let loopback = |h: &str| {
        h.eq_ignore_ascii_case("localhost") || h.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
    };
    let bare = |h: &str| {
        h.trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase()
    };
    let (a, b) = (bare(a), bare(b));
    match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
        (Ok(x), Ok(y)) if x == y => return true,
        _ => {}
    }
    a == b || (loopback(&a) && loopback(&b))
}

/// Splits `host:port` (`[v6]:port` too).
fn host_port(field: &str, text: &str) -> Result<(String, u16)> {
    let bad = || Error::invalid(field, format!("{text:?} is not host:port"));
    let (host, port) = match text.strip_prefix('[') {
        Some(rest) => {
            let (host, after) = rest.split_once(']').ok_or_else(bad)?;
            (host, after.strip_prefix(':').ok_or_else(bad)?)
        }
        None => match text.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, port),
            _ => return Err(bad()),
        },
    };
    Ok((host.to_owned(), port.parse().map_err(|_| bad())?))
}

/// The check's target must be the instance itself: Signpost probes an instance at its
/// registered address and port, never another host (which would let any client make the
/// registry connect anywhere).
fn same_target(field: &str, host: &str, port: u16, address: &str, service_port: u32) -> Result<()> {
    if !same_host(host, address) {
        return Err(Error::invalid(
            field,
            format!(
                "targets host {host:?} but the service's Address is {address:?}: Signpost checks \
                 an instance at its own address and port"
            ),
        ));
    }
    if u32::from(port) != service_port {
        return Err(Error::invalid(
            field,
            format!(
                "targets port {port} but the service's Port is {service_port}: Signpost checks an \
                 instance at its own address and port"
            ),
        ));
    }
    Ok(())
}

/// Reads a registration body. `peer` is the address of the client that sent it: a registration
/// without `Address` is for a service on the client's machine, as one made to a local Consul
/// agent is.
pub(crate) fn parse(body: &Value, peer: IpAddr) -> Result<Registration> {
    let top = object(body, "body")?;
    for (key, what) in [
        ("Kind", "Connect proxies and gateways"),
        ("Proxy", "Connect proxies"),
        ("Connect", "Connect"),
    ] {
        if top.present(key) {
            return Err(Error::invalid(
                key,
                format!("is not supported: Signpost has no {what} (see docs/consul.md)"),
            ));
        }
    }
    let name = top
        .string("Name", "Name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::invalid("Name", "is required"))?;
    let id = top
        .string("ID", "ID")?
        .filter(|i| !i.is_empty())
        .unwrap_or(name);
    let address = match top.string("Address", "Address")? {
        Some(a) if !a.is_empty() => a.to_owned(),
        _ => peer.to_string(),
    };
    let port = match top.get("Port") {
        None => 0,
        Some(v) => v
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .ok_or_else(|| Error::invalid("Port", format!("{v} is not a port number")))?,
    };
    let tags = match top.get("Tags") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::invalid(format!("Tags[{i}]"), "must be a string"))
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(Error::invalid("Tags", "must be a list of strings")),
    };
    let metadata = match top.get("Meta") {
        None => Default::default(),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => Ok((k.clone(), s.clone())),
                _ => Err(Error::invalid(format!("Meta[{k:?}]"), "must be a string")),
            })
            .collect::<Result<_>>()?,
        Some(_) => return Err(Error::invalid("Meta", "must be an object of strings")),
    };
    let weight = match top.get("Weights") {
        None => 0,
        Some(w) => {
            let w = object(w, "Weights")?;
            match w.get("Passing") {
                None => 0,
                Some(v) => v
                    .as_u64()
                    .filter(|p| *p >= 1)
                    .and_then(|p| u32::try_from(p).ok())
                    .ok_or_else(|| {
                        Error::invalid(
                            "Weights.Passing",
                            format!("{v} is not a weight of 1 or more"),
                        )
                    })?,
            }
        }
    };

    let mut checks: Vec<(&Value, String)> = Vec::new();
    if let Some(check) = top.get("Check") {
        checks.push((check, "Check".to_owned()));
    }
    match top.get("Checks") {
        None => {}
        Some(Value::Array(list)) => {
            for (i, c) in list.iter().enumerate().filter(|(_, c)| !c.is_null()) {
                checks.push((c, format!("Checks[{i}]")));
            }
        }
        Some(_) => return Err(Error::invalid("Checks", "must be a list of checks")),
    }
    if checks.len() > 1 {
        return Err(Error::invalid(
            "Checks",
            format!(
                "has {} checks: Signpost runs one check per instance (see docs/consul.md)",
                checks.len()
            ),
        ));
    }
    let (check, ttl) = match checks.first() {
        None => (None, None),
        Some((value, field)) => check(value, field, &address, port, id)?,
    };
    Ok(Registration {
        no_check: checks.is_empty(),
        instance: pb::Instance {
            service: name.to_owned(),
            id: id.to_owned(),
            address,
            port,
            tags,
            metadata,
            weight,
            check,
            ..pb::Instance::default()
        },
        ttl,
    })
}

/// One Consul check definition: the Signpost check, and for a TTL check the lease's ttl.
fn check(
    value: &Value,
    field: &str,
    address: &str,
    port: u32,
    id: &str,
) -> Result<(Option<pb::HealthCheck>, Option<Duration>)> {
    let c = object(value, field)?;
    let sub = |key: &str| format!("{field}.{key}");
    if let Some(check_id) = c
        .string("CheckID", &sub("CheckID"))?
        .filter(|s| !s.is_empty())
        && check_id != format!("service:{id}")
    {
        return Err(Error::invalid(
            sub("CheckID"),
            format!(
                "{check_id:?} is not supported: a service's check is \"service:{id}\", which \
                 /v1/agent/check/* take"
            ),
        ));
    }
    for key in [
        "Args",
        "ScriptArgs",
        "DockerContainerID",
        "H2PING",
        "UDP",
        "OSService",
        "AliasService",
        "AliasNode",
    ] {
        if c.present(key) {
            return Err(Error::invalid(
                sub(key),
                "is not supported: Signpost checks are HTTP, TCP, gRPC or TTL",
            ));
        }
    }
    if let Some(ttl) = c.get("TTL") {
        let ttl = go_duration(&sub("TTL"), ttl)?;
        let check = pb::HealthCheck {
            probe: Some(pb::health_check::Probe::Ttl(pb::TtlProbe {})),
            ..pb::HealthCheck::default()
        };
        return Ok((Some(check), Some(ttl)));
    }
    let probe = if let Some(url) = c.string("HTTP", &sub("HTTP"))? {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| Error::invalid(sub("HTTP"), format!("{url:?} is not a URL: {e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            _ => {
                return Err(Error::invalid(
                    sub("HTTP"),
                    format!("{url:?} is not supported: Signpost's HTTP checks are plain http://"),
                ));
            }
        }
        let host = uri.host().unwrap_or_default();
        same_target(
            &sub("HTTP"),
            host,
            uri.port_u16().unwrap_or(80),
            address,
            port,
        )?;
        let method = c
            .string("Method", &sub("Method"))?
            .unwrap_or_default()
            .to_owned();
        if c.present("Body") {
            return Err(Error::invalid(
                sub("Body"),
                "is not supported: Signpost's HTTP checks send no body",
            ));
        }
        // Consul's Header is a map of names to lists of values; one line per name here, the
        // values joined as HTTP joins repeated fields.
        let mut headers = std::collections::HashMap::new();
        match c.get("Header") {
            None => {}
            Some(Value::Object(map)) => {
                for (name, values) in map {
                    let joined = match values {
                        Value::String(v) => v.clone(),
                        Value::Array(items) => items
                            .iter()
                            .map(|v| v.as_str().map(str::to_owned))
                            .collect::<Option<Vec<_>>>()
                            .ok_or_else(|| {
                                Error::invalid(
                                    format!("{}[{name:?}]", sub("Header")),
                                    "must be a list of strings",
                                )
                            })?
                            .join(", "),
                        _ => {
                            return Err(Error::invalid(
                                format!("{}[{name:?}]", sub("Header")),
                                "must be a list of strings",
                            ));
                        }
                    };
                    headers.insert(name.clone(), joined);
                }
            }
            Some(_) => {
                return Err(Error::invalid(
                    sub("Header"),
                    "must be an object of header lists",
                ));
            }
        }
        let path = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        pb::health_check::Probe::Http(pb::HttpProbe {
            path,
            method,
            headers,
        })
    } else if let Some(target) = c.string("TCP", &sub("TCP"))? {
        let (host, target_port) = host_port(&sub("TCP"), target)?;
        same_target(&sub("TCP"), &host, target_port, address, port)?;
        pb::health_check::Probe::Tcp(pb::TcpProbe {})
    } else if let Some(target) = c.string("GRPC", &sub("GRPC"))? {
        if matches!(c.get("GRPCUseTLS"), Some(Value::Bool(true))) {
            return Err(Error::invalid(
                sub("GRPCUseTLS"),
                "is not supported: Signpost's gRPC checks are plaintext",
            ));
        }
        let (authority, service) = target.split_once('/').unwrap_or((target, ""));
        let (host, target_port) = host_port(&sub("GRPC"), authority)?;
        same_target(&sub("GRPC"), &host, target_port, address, port)?;
        pb::health_check::Probe::Grpc(pb::GrpcProbe {
            service: service.to_owned(),
        })
    } else {
        return Err(Error::invalid(
            field,
            "names no check: give HTTP, TCP, GRPC or TTL",
        ));
    };
    let interval = c
        .get("Interval")
        .ok_or_else(|| Error::invalid(sub("Interval"), "is required"))
        .and_then(|v| go_duration(&sub("Interval"), v))?;
    let mut timeout = match c.get("Timeout") {
        Some(v) => go_duration(&sub("Timeout"), v)?,
        None => DEFAULT_TIMEOUT,
    };
    // Consul lets a probe run past its interval; Signpost does not pile probes up, so a timeout
    // at or past the interval is shortened to three quarters of it.
    if timeout >= interval || timeout.is_zero() {
        timeout = interval.mul_f64(0.75);
    }
    let deregister = c
        .get("DeregisterCriticalServiceAfter")
        .map(|v| go_duration(&sub("DeregisterCriticalServiceAfter"), v))
        .transpose()?;
    let count = |key: &str| -> Result<u32> {
        match c.get(key) {
            None => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Error::invalid(sub(key), format!("{v} is not a count"))),
        }
    };
    Ok((
        Some(pb::HealthCheck {
            probe: Some(probe),
            interval: Some(duration_to_pb(interval)),
            timeout: Some(duration_to_pb(timeout)),
            deregister_critical_after: deregister.map(duration_to_pb),
            successes_before_passing: count("SuccessBeforePassing")?,
            failures_before_critical: count("FailuresBeforeCritical")?,
        }),
        None,
    ))
}

/// The registry's answer to a registration, with its field named as Consul names it.
pub(crate) fn failure(error: Error) -> Failure {
    match error {
        Error::Invalid { field, reason } => {
            Failure::bad_request(format!("Invalid {}: {reason}", consul_field(&field)))
        }
        other => Failure::from(other),
    }
}

/// The Consul name of a field of a Signpost registration, for errors the registry finds after
/// the body was read (`instance.service` is `Name` to a Consul client).
pub(crate) fn consul_field(field: &str) -> String {
    if field == "ttl" {
        return "Check.TTL".to_owned();
    }
    let Some(rest) = field.strip_prefix("instance.") else {
        return field.to_owned();
    };
    let (head, tail) = rest
        .split_once(['.', '['])
        .map_or((rest, ""), |(h, _)| (h, &rest[h.len()..]));
    let name = match head {
        "service" => "Name",
        "id" => "ID",
        "address" => "Address",
        "port" => "Port",
        "tags" => "Tags",
        "metadata" => "Meta",
        "weight" => "Weights.Passing",
        "check" => "Check",
        other => other,
    };
    format!("{name}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn peer() -> IpAddr {
        IpAddr::from([10, 0, 0, 9])
    }

    #[test]
    fn go_durations_read_as_consul_writes_them() {
        let d = |s: &str| parse_go_duration(s);
        assert_eq!(d("10s"), Some(Duration::from_secs(10)));
        assert_eq!(d("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(d("0"), Some(Duration::ZERO));
        for bad in ["", "10", "s", "10x", "1m30", "-1s"] {
            assert_eq!(d(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn python_consul_and_py_consul_bodies_read_the_same() {
        // python-consul 1.1.0: `check`, lower-case keys.
        let old = json!({"name": "web", "id": "web-1", "address": "10.0.0.5", "port": 8080,
            "tags": ["v1"], "check": {"http": "http://10.0.0.5:8080/health", "interval": "10s",
            "timeout": "5s"}});
        // py-consul: `checks` list, and meta and weights.
        let new = json!({"name": "web", "id": "web-1", "address": "10.0.0.5", "port": 8080,
            "tags": ["v1"], "meta": {"zone": "a"}, "weights": {"passing": 3, "warning": 1},
            "checks": [{"http": "http://10.0.0.5:8080/health", "interval": "10s", "timeout": "5s"}]});
        for body in [old, new] {
            let r = parse(&body, peer()).unwrap();
            assert_eq!(r.instance.service, "web");
            assert_eq!(r.instance.id, "web-1");
            assert_eq!(r.instance.port, 8080);
            let check = r.instance.check.unwrap();
            assert_eq!(
                check.probe,
                Some(pb::health_check::Probe::Http(pb::HttpProbe {
                    path: "/health".into(),
                    ..Default::default()
                }))
            );
            assert_eq!(
                check.interval,
                Some(duration_to_pb(Duration::from_secs(10)))
            );
            assert_eq!(check.timeout, Some(duration_to_pb(Duration::from_secs(5))));
            assert!(r.ttl.is_none());
        }
    }

    #[test]
    fn an_http_checks_method_and_headers_are_sent_as_given() {
        let body = json!({"Name": "a", "Address": "10.0.0.5", "Port": 80, "Check": {
            "HTTP": "http://10.0.0.5/ready?full=1", "Interval": "5s", "Method": "HEAD",
            "Header": {"X-Probe": ["signpost"], "Accept": ["text/plain", "application/json"]}}});
        let check = parse(&body, peer()).unwrap().instance.check.unwrap();
        let Some(pb::health_check::Probe::Http(http)) = check.probe else {
            panic!("{check:?}")
        };
        assert_eq!(
            (http.path.as_str(), http.method.as_str()),
            ("/ready?full=1", "HEAD")
        );
        assert_eq!(http.headers["X-Probe"], "signpost");
        assert_eq!(http.headers["Accept"], "text/plain, application/json");
    }

    #[test]
    fn a_registration_without_address_or_id_is_the_senders_and_named_after_the_service() {
        let r = parse(&json!({"Name": "db", "Port": 5432}), peer()).unwrap();
        assert_eq!(
            (r.instance.id.as_str(), r.instance.address.as_str()),
            ("db", "10.0.0.9")
        );
        assert!(r.no_check);
    }

    #[test]
    fn a_ttl_check_is_a_lease_and_a_reported_check() {
        let r = parse(
            &json!({"Name": "job", "Port": 1, "Check": {"TTL": "15s", "DeregisterCriticalServiceAfter": "1m"}}),
            peer(),
        )
        .unwrap();
        assert_eq!(r.ttl, Some(Duration::from_secs(15)));
        assert!(matches!(
            r.instance.check.and_then(|c| c.probe),
            Some(pb::health_check::Probe::Ttl(_))
        ));
    }

    #[test]
    fn what_signpost_cannot_honour_is_refused_with_the_field_named() {
        let cases = [
            (
                json!({"Name": "a", "Port": 1, "Kind": "connect-proxy"}),
                "Kind",
            ),
            (json!({"Port": 1}), "Name"),
            (
                json!({"Name": "a", "Address": "10.0.0.5", "Port": 80,
                "Check": {"HTTP": "http://10.0.0.6/health", "Interval": "5s"}}),
                "Check.HTTP",
            ),
            (
                json!({"Name": "a", "Address": "10.0.0.5", "Port": 80,
                "Check": {"HTTP": "http://10.0.0.5:9000/health", "Interval": "5s"}}),
                "Check.HTTP",
            ),
            (
                json!({"Name": "a", "Address": "10.0.0.5", "Port": 80,
                "Check": {"HTTP": "http://10.0.0.5/", "Interval": "5s", "Body": "{}"}}),
                "Check.Body",
            ),
            (
                json!({"Name": "a", "Address": "10.0.0.5", "Port": 80,
                "Check": {"HTTP": "http://10.0.0.5/", "Interval": "5s", "Header": {"X": [1]}}}),
                "Check.Header[\"X\"]",
            ),
            (
                json!({"Name": "a", "Port": 80, "Checks": [{"TTL": "5s"}, {"TTL": "6s"}]}),
                "Checks",
            ),
            (
                json!({"Name": "a", "Port": 80, "Check": {"Args": ["/bin/true"], "Interval": "5s"}}),
                "Check.Args",
            ),
            (
                json!({"Name": "a", "Port": 80, "Check": {"TTL": "soon"}}),
                "Check.TTL",
            ),
            (
                json!({"Name": "a", "Port": 80, "Check": {"CheckID": "mine", "TTL": "5s"}}),
                "Check.CheckID",
            ),
            (
                json!({"Name": "a", "Port": 80, "Weights": {"Passing": 0}}),
                "Weights.Passing",
            ),
        ];
        for (body, field) in cases {
            match parse(&body, peer()) {
                Err(Error::Invalid { field: f, .. }) => assert_eq!(f, field, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_loopback_check_of_a_loopback_service_is_its_own() {
        let body = json!({"Name": "a", "Address": "127.0.0.1", "Port": 8080,
            "Check": {"TCP": "localhost:8080", "Interval": "10s", "Timeout": "10s"}});
        let check = parse(&body, peer()).unwrap().instance.check.unwrap();
        // A timeout that is not below the interval is shortened.
        assert_eq!(
            check.timeout,
            Some(duration_to_pb(Duration::from_millis(7500)))
        );
    }

    #[test]
    fn registry_fields_are_named_as_consul_names_them() {
        assert_eq!(consul_field("instance.service"), "Name");
        assert_eq!(consul_field("instance.metadata[\"x y\"]"), "Meta[\"x y\"]");
        assert_eq!(consul_field("instance.check.interval"), "Check.interval");
        assert_eq!(consul_field("namespace"), "namespace");
    }
}
