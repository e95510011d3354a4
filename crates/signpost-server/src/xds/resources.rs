//! What each xDS resource name means, and the resource answered for it.
//!
//! A gRPC client for `xds:///greeter` asks for the Listener `greeter`; everything after that it
//! asks for by the names the previous resource gave. So only a Listener name is chosen by a
//! user; the route, cluster and endpoint names are ours, all the same canonical
//! `namespace/service` (a `/` is in no service or namespace name, so it parses back exactly).
//!
//! Listener names (documented in docs/xds.md):
//! - `greeter`: the service in the namespace the client's bootstrap names in its node metadata
//!   (`signpost.namespace`), else in `default`;
//! - `greeter.payments.svc`: the service `greeter` in the namespace `payments` (split at the last
//!   dot before `.svc`);
//! - either with a `:port` (as in `xds:///greeter:50051`), which is ignored: an instance's port
//!   is the registry's.

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::cluster::v3::cluster::{
    ClusterDiscoveryType, DiscoveryType, EdsClusterConfig, LbPolicy,
};
use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
use envoy_types::pb::envoy::config::core::v3::config_source::ConfigSourceSpecifier;
use envoy_types::pb::envoy::config::core::v3::socket_address::{PortSpecifier, Protocol};
use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality,
    SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::route::Action;
use envoy_types::pb::envoy::config::route::v3::route_action::ClusterSpecifier;
use envoy_types::pb::envoy::config::route::v3::route_match::PathSpecifier;
use envoy_types::pb::envoy::config::route::v3::{
    Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_connection_manager::RouteSpecifier;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::bytes::Bytes;
use prost::{Message, Name};
use signpost_store::Instance;
use std::net::IpAddr;

use crate::validate;

/// The four kinds of resource a proxyless gRPC client asks for, in the order it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoints,
}

impl Kind {
    pub(crate) const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoints];

    pub(crate) fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == url)
    }

    pub(crate) fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            Kind::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            Kind::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            Kind::Endpoints => "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
        }
    }

    pub(crate) fn short(self) -> &'static str {
        match self {
            Kind::Listener => "listener",
            Kind::Route => "route",
            Kind::Cluster => "cluster",
            Kind::Endpoints => "endpoints",
        }
    }
}

/// A service of the registry, as one resource name names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Target {
    pub(crate) namespace: String,
    pub(crate) service: String,
}

impl Target {
    /// The name of the route, cluster and endpoints of this service.
    pub(crate) fn canonical(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }

    /// The service a Listener name asks for; `default_namespace` is the client's own.
    pub(crate) fn from_listener(name: &str, default_namespace: &str) -> Result<Target, String> {
        // `xds:///greeter:50051` asks for `greeter:50051`.
        let name = match name.rsplit_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
                host
            }
            _ => name,
        };
        let (namespace, service) = match name.strip_suffix(".svc") {
            Some(qualified) => match qualified.rsplit_once('.') {
                Some((service, namespace)) => (namespace, service),
                None => {
                    return Err(format!(
                        "{name:?} names no namespace: use <service>.<namespace>.svc"
                    ));
                }
            },
            None => (default_namespace, name),
        };
        Target::checked(namespace, service)
    }

    /// The service a route, cluster or endpoints name (always [`canonical`](Self::canonical))
    /// asks for.
    pub(crate) fn from_canonical(name: &str) -> Result<Target, String> {
        match name.split_once('/') {
            Some((namespace, service)) => Target::checked(namespace, service),
            None => Err(format!(
                "{name:?} is not a name this server gave (namespace/service)"
            )),
        }
    }

    fn checked(namespace: &str, service: &str) -> Result<Target, String> {
        let namespace =
            validate::namespace("namespace", namespace.to_owned()).map_err(|e| e.to_string())?;
        validate::service("service", service).map_err(|e| e.to_string())?;
        Ok(Target {
            namespace,
            service: service.to_owned(),
        })
    }
}

fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// A resource as a response carries it: an encoded `Any`.
fn encoded<M: Message + Name>(message: &M) -> Bytes {
    Bytes::from(any(message).encode_to_vec())
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3.into(),
        ..ConfigSource::default()
    }
}

/// The Listener `name`: an API listener whose route comes over the same stream.
pub(crate) fn listener(name: &str, target: &Target) -> Bytes {
    let manager = HttpConnectionManager {
        stat_prefix: target.canonical(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: target.canonical(),
        })),
        // gRPC fails every call of a listener whose filters do not end with the router.
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(ConfigType::TypedConfig(any(&Router::default()))),
            ..HttpFilter::default()
        }],
        ..HttpConnectionManager::default()
    };
    encoded(&Listener {
        name: name.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(any(&manager)),
        }),
        ..Listener::default()
    })
}

/// The RouteConfiguration of `target`: every call to its cluster.
pub(crate) fn route(target: &Target) -> Bytes {
    let name = target.canonical();
    encoded(&RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name: name.clone(),
            domains: vec!["*".into()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(String::new())),
                    ..RouteMatch::default()
                }),
                action: Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(name)),
                    ..RouteAction::default()
                })),
                ..Route::default()
            }],
            ..VirtualHost::default()
        }],
        ..RouteConfiguration::default()
    })
}

/// The Cluster of `target`: round robin over endpoints that come over the same stream.
pub(crate) fn cluster(target: &Target) -> Bytes {
    encoded(&Cluster {
        name: target.canonical(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds.into())),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        lb_policy: LbPolicy::RoundRobin.into(),
        ..Cluster::default()
    })
}

/// What the endpoints of one service version came to.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    /// The ClusterLoadAssignment as an encoded `Any`.
    pub(crate) resource: Bytes,
    /// Healthy instances left out because their address is a hostname, not an IP.
    pub(crate) hostnames: usize,
}

/// The ClusterLoadAssignment of `target` from its instances: the healthy ones (passing or
/// warning), one locality per zone weighted by the sum of its instances' weights (gRPC's round
/// robin shares calls between localities by that weight and evenly within one), each endpoint
/// with its own weight for clients whose policy uses it.
///
/// gRPC needs IP literals: an instance registered by hostname is left out (and counted), since
/// resolving it here would answer with whatever the server's resolver said at one moment.
pub(crate) fn endpoints<'a>(
    target: &Target,
    instances: impl IntoIterator<Item = &'a Instance>,
) -> Endpoints {
    let mut hostnames = 0;
    let mut zones: Vec<LocalityLbEndpoints> = Vec::new();
    for i in instances {
        if !i.health.is_healthy() || i.weight == 0 {
            continue;
        }
        let Ok(ip) = i.address.parse::<IpAddr>() else {
            hostnames += 1;
            continue;
        };
        let endpoint = LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(Address {
                    address: Some(AddressKind::SocketAddress(SocketAddress {
                        protocol: Protocol::Tcp.into(),
                        address: ip.to_string(),
                        port_specifier: Some(PortSpecifier::PortValue(u32::from(i.port))),
                        ..SocketAddress::default()
                    })),
                }),
                hostname: i.id.clone(),
                ..Endpoint::default()
            })),
            health_status: HealthStatus::Healthy.into(),
            load_balancing_weight: Some(UInt32Value { value: i.weight }),
            ..LbEndpoint::default()
        };
        let at = match zones
            .iter()
            .position(|z| z.locality.as_ref().is_some_and(|l| l.zone == i.zone))
        {
            Some(at) => at,
            None => {
                zones.push(LocalityLbEndpoints {
                    locality: Some(Locality {
                        zone: i.zone.clone(),
                        ..Locality::default()
                    }),
                    // gRPC skips a locality without a weight.
                    load_balancing_weight: Some(UInt32Value { value: 0 }),
                    ..LocalityLbEndpoints::default()
                });
                zones.len() - 1
            }
        };
        let zone = &mut zones[at];
        if let Some(w) = zone.load_balancing_weight.as_mut() {
            w.value = w.value.saturating_add(i.weight);
        }
        zone.lb_endpoints.push(endpoint);
    }
    Endpoints {
        resource: encoded(&ClusterLoadAssignment {
            cluster_name: target.canonical(),
            endpoints: zones,
            ..ClusterLoadAssignment::default()
        }),
        hostnames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signpost_store::Health;

    fn target(namespace: &str, service: &str) -> Target {
        Target {
            namespace: namespace.into(),
            service: service.into(),
        }
    }

    #[test]
    fn listener_names_name_a_service_and_maybe_its_namespace() {
        let parse = |name| Target::from_listener(name, "default");
        assert_eq!(parse("greeter"), Ok(target("default", "greeter")));
        assert_eq!(parse("greeter:50051"), Ok(target("default", "greeter")));
        assert_eq!(
            parse("greeter.payments.svc"),
            Ok(target("payments", "greeter"))
        );
        assert_eq!(
            parse("api.v2.payments.svc:443"),
            Ok(target("payments", "api.v2"))
        );
        assert_eq!(
            Target::from_listener("greeter", "payments"),
            Ok(target("payments", "greeter"))
        );
        assert!(parse("payments.svc").is_err());
        assert!(parse("Greeter").is_err());
        assert!(parse("").is_err());
        let canonical = target("payments", "api.v2").canonical();
        assert_eq!(
            Target::from_canonical(&canonical),
            Ok(target("payments", "api.v2"))
        );
        assert!(Target::from_canonical("greeter").is_err());
    }

    fn instance(id: &str, address: &str, zone: &str, weight: u32, health: Health) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "greeter".into(),
            id: id.into(),
            address: address.into(),
            port: 50051,
            zone: zone.into(),
            weight,
            health,
            ..Instance::default()
        }
    }

    #[test]
    fn endpoints_are_the_healthy_ip_instances_by_zone_with_weights() {
        let instances = [
            instance("a1", "10.0.0.1", "a", 100, Health::Passing),
            instance("a2", "10.0.0.2", "a", 50, Health::Warning),
            instance("a3", "10.0.0.3", "a", 100, Health::Critical),
            instance("b1", "::1", "b", 100, Health::Passing),
            instance("h1", "host.example", "b", 100, Health::Passing),
        ];
        let made = endpoints(&target("default", "greeter"), &instances);
        assert_eq!(made.hostnames, 1);
        let resource = Any::decode(made.resource.clone()).unwrap();
        assert_eq!(resource.type_url, Kind::Endpoints.type_url());
        let cla = ClusterLoadAssignment::decode(resource.value.as_slice()).unwrap();
        assert_eq!(cla.cluster_name, "default/greeter");
        // (zone, its weight, its endpoints as (address, port, weight))
        type Zone = (String, u32, Vec<(String, u32, u32)>);
        let zones: Vec<Zone> = cla
            .endpoints
            .iter()
            .map(|z| {
                let endpoints = z
                    .lb_endpoints
                    .iter()
                    .map(|e| {
                        let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                            panic!("an endpoint without an address");
                        };
                        let Some(AddressKind::SocketAddress(sa)) =
                            ep.address.as_ref().and_then(|a| a.address.as_ref())
                        else {
                            panic!("an endpoint without a socket address");
                        };
                        let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                            panic!("no port");
                        };
                        (
                            sa.address.clone(),
                            port,
                            e.load_balancing_weight.as_ref().map_or(0, |w| w.value),
                        )
                    })
                    .collect();
                (
                    z.locality
                        .as_ref()
                        .map(|l| l.zone.clone())
                        .unwrap_or_default(),
                    z.load_balancing_weight.as_ref().map_or(0, |w| w.value),
                    endpoints,
                )
            })
            .collect();
        assert_eq!(
            zones,
            vec![
                (
                    "a".to_owned(),
                    150,
                    vec![
                        ("10.0.0.1".to_owned(), 50051, 100),
                        ("10.0.0.2".to_owned(), 50051, 50)
                    ]
                ),
                ("b".to_owned(), 100, vec![("::1".to_owned(), 50051, 100)]),
            ]
        );
    }

    #[test]
    fn the_listener_ends_its_filters_with_the_router_and_routes_over_ads() {
        let t = target("default", "greeter");
        let value = |bytes: Bytes| Any::decode(bytes).unwrap().value;
        let l = Listener::decode(value(listener("greeter", &t)).as_slice()).unwrap();
        assert_eq!(l.name, "greeter");
        let api = l.api_listener.and_then(|a| a.api_listener).unwrap();
        assert_eq!(api.type_url, HttpConnectionManager::type_url());
        let hcm = HttpConnectionManager::decode(api.value.as_slice()).unwrap();
        let last = hcm.http_filters.last().unwrap();
        let Some(ConfigType::TypedConfig(router)) = &last.config_type else {
            panic!("the last filter has no typed config");
        };
        assert_eq!(router.type_url, Router::type_url());
        let Some(RouteSpecifier::Rds(rds)) = hcm.route_specifier else {
            panic!("the route is not over RDS");
        };
        assert_eq!(rds.route_config_name, "default/greeter");

        let r = RouteConfiguration::decode(value(route(&t)).as_slice()).unwrap();
        let action = r.virtual_hosts[0].routes[0].action.clone();
        assert_eq!(
            action,
            Some(Action::Route(RouteAction {
                cluster_specifier: Some(ClusterSpecifier::Cluster("default/greeter".into())),
                ..RouteAction::default()
            }))
        );
        let c = Cluster::decode(value(cluster(&t)).as_slice()).unwrap();
        assert_eq!(c.name, "default/greeter");
        assert_eq!(c.lb_policy, i32::from(LbPolicy::RoundRobin));
    }
}
