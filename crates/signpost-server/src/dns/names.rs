//! The names the DNS server answers, read from the labels of a query below its domain.
//!
//! Two conventions, so that programs written for Consul or for Kubernetes find services the way
//! they already do:
//!
//! - Consul: `[<tag>.]<service>.service[.<namespace>]` and RFC 2782's
//!   `_<service>._<tag>.service[.<namespace>]` (`_tcp` or `_udp` in place of the tag: no tag).
//!   The service is one label here, so a service whose name has a dot is found by the
//!   Kubernetes form only.
//! - Kubernetes: `<service>.<namespace>.svc` and `_<port-name>._tcp.<service>.<namespace>.svc`.
//!
//! `<hex>.addr` names one address (8 hex digits for IPv4, 32 for IPv6), as Consul's SRV targets
//! do: an SRV record must point at a name, and this one needs no state to answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::validate::DEFAULT_NAMESPACE;

/// What a query name asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Asked {
    /// The domain itself (its SOA).
    Apex,
    /// A name with names below it and no records of its own (`service`, `<namespace>.svc`,
    /// `_tcp.service`...): it exists, so it is NODATA, never NXDOMAIN (RFC 8020).
    Between,
    /// One address, from an SRV target.
    Addr(IpAddr),
    Service(ServiceName),
    /// A name below the domain that no convention gives a meaning to.
    Unknown,
}

/// The instances a service name stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceName {
    pub(crate) namespace: String,
    pub(crate) service: String,
    /// Only instances carrying this tag (compared without case: DNS names have none).
    pub(crate) tag: Option<String>,
    /// Only instances that name a port so (Kubernetes' SRV form), and that port.
    pub(crate) port_name: Option<String>,
}

/// Reads `labels` (lowercase, below the domain, leftmost first).
pub(crate) fn parse(labels: &[&str]) -> Asked {
    match labels {
        [] => Asked::Apex,
        ["addr"] | ["svc"] | [_, "svc"] | ["service"] | ["service", _] => Asked::Between,
        [proto, "service", ..] if proto.starts_with('_') && labels.len() <= 3 => Asked::Between,
        [proto, .., _, "svc"] if *proto == "_tcp" => Asked::Between,
        [hex, "addr"] => addr(hex).map_or(Asked::Unknown, Asked::Addr),
        [rest @ .., namespace, "svc"] => kubernetes(rest, namespace),
        _ => consul(labels),
    }
}

fn kubernetes(rest: &[&str], namespace: &str) -> Asked {
    let (port_name, service) = match rest {
        [port, "_tcp", service @ ..] if port.len() > 1 && port.starts_with('_') => {
            (Some(port[1..].to_owned()), service)
        }
        service => (None, service),
    };
    if service.is_empty() || service.iter().any(|l| l.starts_with('_')) {
        return Asked::Unknown;
    }
    Asked::Service(ServiceName {
        namespace: namespace.to_owned(),
        service: service.join("."),
        tag: None,
        port_name,
    })
}

fn consul(labels: &[&str]) -> Asked {
    // The last `service` label, with at most a namespace after it.
    let at = match labels {
        [.., "service"] => labels.len() - 1,
        [.., "service", _] => labels.len() - 2,
        _ => return Asked::Unknown,
    };
    let namespace = labels.get(at + 1).copied().unwrap_or(DEFAULT_NAMESPACE);
    let (tag, service) = match &labels[..at] {
        [service, proto] if service.starts_with('_') && proto.starts_with('_') => {
            let tag = match &proto[1..] {
                "tcp" | "udp" => None,
                tag => Some(tag),
            };
            (tag, &service[1..])
        }
        [service] => (None, *service),
        [tag, service] => (Some(*tag), *service),
        _ => return Asked::Unknown,
    };
    if service.is_empty() || service.starts_with('_') || tag.is_some_and(str::is_empty) {
        return Asked::Unknown;
    }
    Asked::Service(ServiceName {
        namespace: namespace.to_owned(),
        service: service.to_owned(),
        tag: tag.map(str::to_owned),
        port_name: None,
    })
}

/// The `<hex>.addr` label of an address.
pub(crate) fn addr_label(ip: IpAddr) -> String {
    let octets: Vec<u8> = match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    octets.iter().map(|b| format!("{b:02x}")).collect()
}

fn addr(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    match bytes?.as_slice() {
        &[a, b, c, d] if hex.len() == 8 => Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        v6 if hex.len() == 32 => {
            let octets: [u8; 16] = v6.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(namespace: &str, service: &str, tag: Option<&str>, port: Option<&str>) -> Asked {
        Asked::Service(ServiceName {
            namespace: namespace.into(),
            service: service.into(),
            tag: tag.map(Into::into),
            port_name: port.map(Into::into),
        })
    }

    fn read(name: &str) -> Asked {
        let labels: Vec<&str> = name.split('.').filter(|l| !l.is_empty()).collect();
        parse(&labels)
    }

    #[test]
    fn consul_names() {
        assert_eq!(read("web.service"), service("default", "web", None, None));
        assert_eq!(
            read("web.service.payments"),
            service("payments", "web", None, None)
        );
        assert_eq!(
            read("v2.web.service"),
            service("default", "web", Some("v2"), None)
        );
        assert_eq!(
            read("v2.web.service.payments"),
            service("payments", "web", Some("v2"), None)
        );
        assert_eq!(
            read("_web._tcp.service"),
            service("default", "web", None, None)
        );
        assert_eq!(
            read("_web._v2.service.payments"),
            service("payments", "web", Some("v2"), None)
        );
        for unknown in ["a.b.c.service", "web", "web.node", "x.y"] {
            assert_eq!(read(unknown), Asked::Unknown, "{unknown}");
        }
    }

    #[test]
    fn kubernetes_names() {
        assert_eq!(
            read("web.default.svc"),
            service("default", "web", None, None)
        );
        assert_eq!(
            read("api.v1.payments.svc"),
            service("payments", "api.v1", None, None),
            "a service name with a dot"
        );
        assert_eq!(
            read("_grpc._tcp.web.payments.svc"),
            service("payments", "web", None, Some("grpc"))
        );
        for unknown in ["_grpc._tcp.default.svc", "_grpc._udp.web.default.svc"] {
            assert_eq!(read(unknown), Asked::Unknown, "{unknown}");
        }
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.1.2.3", "::1", "2001:db8::42"] {
            let ip: IpAddr = ip.parse().unwrap_or_else(|_| unreachable!());
            assert_eq!(read(&format!("{}.addr", addr_label(ip))), Asked::Addr(ip));
        }
        for bad in [
            "0a01.addr",
            "zz010203.addr",
            "0a0102030.addr",
            "+a+b+c+d.addr",
        ] {
            assert_eq!(read(bad), Asked::Unknown, "{bad}");
        }
        assert_eq!(read(""), Asked::Apex);
        for between in [
            "addr",
            "svc",
            "default.svc",
            "service",
            "service.payments",
            "_tcp.service",
            "_web.service",
            "_tcp.service.payments",
            "_tcp.web.default.svc",
        ] {
            assert_eq!(read(between), Asked::Between, "{between}");
        }
    }
}
