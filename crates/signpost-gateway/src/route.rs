//! Which service a request is for, and the path it is sent on with: pure rules over the
//! request's head, so that they are tested without sockets.
//!
//! In order: a gRPC request (`content-type: application/grpc…`) whose service (the first path
//! segment, `pkg.Service`) a `grpc=` route names goes there, path unchanged; a request whose
//! `Host` (or `:authority`) a `host=` route names goes there, path unchanged; the longest
//! `prefix=` route that matches takes the path with its prefix removed; and every other path is
//! `/{service}/{rest}`, sent on as `/{rest}` (Spring Cloud Gateway's discovery locator).

use std::fmt;
use std::time::Duration;

/// Which instances a request may go to: a service, and optionally a tag and a selector that
/// narrow it (a `v2` route). One balancer follows each.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub service: String,
    pub tag: Option<String>,
    pub selector: Option<String>,
}

impl Target {
    pub fn service(service: impl Into<String>) -> Target {
        Target {
            service: service.into(),
            tag: None,
            selector: None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.service)?;
        if let Some(tag) = &self.tag {
            write!(f, " tag {tag}")?;
        }
        if let Some(selector) = &self.selector {
            write!(f, " selector {selector}")?;
        }
        Ok(())
    }
}

/// What a route matches on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Matcher {
    /// The request's host, exactly, or `*.rest`: the label in place of `*` is the service.
    Host(String),
    /// A gRPC service name, `pkg.Service`.
    Grpc(String),
    /// A path prefix, removed before the request is sent on.
    Prefix(String),
}

/// One `--route`: a matcher, the instances it goes to, and its timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    matcher: Matcher,
    /// `None` for a wildcard host route, whose service comes from the host.
    target: Option<Target>,
    pub timeouts: Timeouts,
}

/// How long a request may wait for its answer's head, and how long its bodies may go without a
/// byte, on a route; `None` keeps the gateway's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub idle: Option<Duration>,
}

/// Where a request goes: the instances, and the path and query to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    pub target: Target,
    pub path_and_query: String,
    pub timeouts: Timeouts,
    /// A route names the service (rather than the path or a wildcard host): a service with no
    /// instance is then unavailable, not unknown.
    pub explicit: bool,
}

/// Why a request has no route, in words for its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// The path names no service (`/` or `//x`).
    NoService,
    /// The first segment cannot be a service name.
    BadName(String),
}

impl fmt::Display for NoRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoRoute::NoService => f.write_str(
                "the path names no service: ask for /{service}/{path}, for example /greeter/hello",
            ),
            NoRoute::BadName(why) => f.write_str(why),
        }
    }
}

/// The routes of a gateway, in the order they are tried.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// Parses `--route` values: `host=NAME,service=S`, `host=*.DOMAIN`, `grpc=pkg.Service,service=S`
    /// or `prefix=/PATH,service=S`, each with optional `tag=T`, `selector=EXPR`, `timeout=5s` and
    /// `idle=60s`. The error names the route and what is wrong with it.
    pub fn parse(specs: &[String]) -> Result<Routes, String> {
        let mut routes = Vec::new();
        for spec in specs {
            routes.push(parse_route(spec).map_err(|e| format!("route {spec:?}: {e}"))?);
        }
        // Longest prefixes first, so that /api/v2 wins over /api.
        routes.sort_by_key(|r| match &r.matcher {
            Matcher::Prefix(p) => std::cmp::Reverse(p.len()),
            _ => std::cmp::Reverse(usize::MAX),
        });
        Ok(Routes { routes })
    }

    /// The route of a request: its path and query, its host (without the port), and whether it
    /// is gRPC.
    pub fn route(
        &self,
        path_and_query: &str,
        host: Option<&str>,
        grpc: bool,
    ) -> Result<Routed, NoRoute> {
        let (path, query) = match path_and_query.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (path_and_query, None),
        };
        let routed = |target: Target, path: &str, route: Option<&Route>| Routed {
            target,
            path_and_query: match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            },
            timeouts: route.map(|r| r.timeouts).unwrap_or_default(),
            explicit: route
                .and_then(|r| r.target.as_ref())
                .is_some_and(|t| !t.service.is_empty()),
        };
        if grpc {
            let name = path.trim_start_matches('/').split('/').next().unwrap_or("");
            for route in &self.routes {
                if let (Matcher::Grpc(service), Some(target)) = (&route.matcher, &route.target)
                    && service == name
                {
                    return Ok(routed(target.clone(), path, Some(route)));
                }
            }
        }
        if let Some(host) = host.map(|h| h.to_ascii_lowercase()) {
            for route in &self.routes {
                let Matcher::Host(pattern) = &route.matcher else {
                    continue;
                };
                if let Some(target) = host_match(pattern, &host, route.target.as_ref()) {
                    return Ok(routed(target, path, Some(route)));
                }
            }
        }
        for route in &self.routes {
            if let (Matcher::Prefix(prefix), Some(target)) = (&route.matcher, &route.target)
                && let Some(rest) = strip_segments(path, prefix)
            {
                return Ok(routed(target.clone(), rest, Some(route)));
            }
        }
        let trimmed = path.strip_prefix('/').unwrap_or(path);
        let (service, rest) = match trimmed.find('/') {
            Some(at) => (&trimmed[..at], &trimmed[at..]),
            None => (trimmed, "/"),
        };
        if service.is_empty() {
            return Err(NoRoute::NoService);
        }
        check_service_name(service).map_err(NoRoute::BadName)?;
        Ok(routed(Target::service(service), rest, None))
    }
}

/// `path` with `prefix` removed, when `prefix` matches whole segments (`/api` matches `/api`
/// and `/api/x`, not `/apix`); the rest always starts with `/`.
fn strip_segments<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = path.strip_prefix(prefix)?;
    if rest.is_empty() {
        Some("/")
    } else if rest.starts_with('/') || prefix.ends_with('/') {
        Some(if rest.starts_with('/') {
            rest
        } else {
            path.get(prefix.len() - 1..)?
        })
    } else {
        None
    }
}

fn host_match(pattern: &str, host: &str, target: Option<&Target>) -> Option<Target> {
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            let label = host.strip_suffix(domain)?.strip_suffix('.')?;
            if label.is_empty() || label.contains('.') || check_service_name(label).is_err() {
                return None;
            }
            let mut t = target.cloned().unwrap_or_else(|| Target::service(label));
            t.service = label.to_owned();
            Some(t)
        }
        None => (pattern == host).then(|| target.cloned()).flatten(),
    }
}

/// The registry's rule for a service name (lowercase letters, digits, `-`, `.`, `_`; 1 to 63),
/// checked here so that a bad path costs no watch.
pub fn check_service_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c);
    if name.is_empty() || name.len() > 63 {
        return Err(format!(
            "{:?} is not a service name: a service name has 1 to 63 characters",
            truncate(name)
        ));
    }
    if !name.chars().all(ok_char) {
        return Err(format!(
            "{:?} is not a service name: a service name has only lowercase letters, digits, '-', '.' and '_'",
            truncate(name)
        ));
    }
    Ok(())
}

fn truncate(text: &str) -> String {
    text.chars().take(80).collect()
}

fn parse_route(spec: &str) -> Result<Route, String> {
    let mut matcher = None;
    let mut service = None;
    let mut tag = None;
    let mut selector = None;
    let mut timeouts = Timeouts::default();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not key=value"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("{key} is empty"));
        }
        let set_matcher = |m: Matcher, matcher: &mut Option<Matcher>| match matcher {
            Some(_) => Err("a route matches on one of host, grpc or prefix".to_owned()),
            None => {
                *matcher = Some(m);
                Ok(())
            }
        };
        match key.trim() {
            "host" => set_matcher(Matcher::Host(value.to_ascii_lowercase()), &mut matcher)?,
            "grpc" => set_matcher(Matcher::Grpc(value.to_owned()), &mut matcher)?,
            "prefix" => {
                if !value.starts_with('/') {
                    return Err(format!("prefix {value:?} must start with '/'"));
                }
                let prefix = if value.len() > 1 {
                    value.trim_end_matches('/')
                } else {
                    value
                };
                set_matcher(Matcher::Prefix(prefix.to_owned()), &mut matcher)?
            }
            "service" => {
                check_service_name(value)?;
                service = Some(value.to_owned());
            }
            "tag" => tag = Some(value.to_owned()),
            "selector" => selector = Some(value.to_owned()),
            "timeout" => timeouts.request = Some(parse_duration(value)?),
            "idle" => timeouts.idle = Some(parse_duration(value)?),
            other => {
                return Err(format!(
                    "unknown key {other:?}: the keys are host, grpc, prefix, service, tag, selector, timeout, idle"
                ));
            }
        }
    }
    let matcher = matcher.ok_or("a route needs one of host=, grpc= or prefix=")?;
    let wildcard = matches!(&matcher, Matcher::Host(h) if h.starts_with("*."));
    let target = match (service, wildcard) {
        (Some(_), true) => {
            return Err(
                "a wildcard host route takes its service from the host: drop service=".into(),
            );
        }
        (Some(service), false) => Some(Target {
            service,
            tag: tag.clone(),
            selector: selector.clone(),
        }),
        (None, true) => Some(Target {
            service: String::new(),
            tag: tag.clone(),
            selector: selector.clone(),
        }),
        (None, false) => return Err("a route needs service=".into()),
    };
    Ok(Route {
        matcher,
        target,
        timeouts,
    })
}

/// `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} needs a unit: ms, s, m or h"))?;
    let (digits, unit) = text.split_at(split);
    let amount: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 5s or 1m"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(amount),
        "s" => Duration::from_secs(amount),
        "m" => Duration::from_secs(amount.saturating_mul(60)),
        "h" => Duration::from_secs(amount.saturating_mul(3600)),
        _ => return Err(format!("{text:?} has an unknown unit: use ms, s, m or h")),
    };
    if duration.is_zero() {
        return Err(format!("{text:?} is zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(specs: &[&str]) -> Routes {
        let specs: Vec<String> = specs.iter().map(|s| s.to_string()).collect();
        match Routes::parse(&specs) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    fn go(r: &Routes, path: &str, host: Option<&str>, grpc: bool) -> (String, String) {
        let routed = r.route(path, host, grpc).unwrap();
        (routed.target.to_string(), routed.path_and_query)
    }

    #[test]
    fn the_first_segment_is_the_service_and_is_stripped() {
        let r = Routes::default();
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            go(&r, "/web/a/b?x=1&y", None, false),
            s("web", "/a/b?x=1&y")
        );
        assert_eq!(go(&r, "/web", None, false), s("web", "/"));
        assert_eq!(go(&r, "/web/", None, false), s("web", "/"));
        assert_eq!(go(&r, "/web?q=1", None, false), s("web", "/?q=1"));
        assert_eq!(r.route("/", None, false), Err(NoRoute::NoService));
        assert_eq!(r.route("//x", None, false), Err(NoRoute::NoService));
        assert!(matches!(
            r.route("/Web/x", None, false),
            Err(NoRoute::BadName(_))
        ));
        let long = format!("/{}/x", "a".repeat(64));
        assert!(matches!(
            r.route(&long, None, false),
            Err(NoRoute::BadName(_))
        ));
    }

    #[test]
    fn routes_by_grpc_service_host_and_prefix() {
        let r = routes(&[
            "grpc=helloworld.Greeter,service=greeter",
            "host=api.example,service=api,tag=v2",
            "host=*.svc.example",
            "prefix=/v2/users,service=users,selector=version=2,timeout=2s",
            "prefix=/v2,service=v2-all",
        ]);
        let s = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(
            go(&r, "/helloworld.Greeter/SayHello", Some("gw"), true),
            s("greeter", "/helloworld.Greeter/SayHello")
        );
        // Not gRPC: the grpc route does not apply.
        assert!(
            r.route("/helloworld.Greeter/SayHello", None, false)
                .is_err()
        );
        assert_eq!(
            go(&r, "/x?a", Some("API.example"), false),
            s("api tag v2", "/x?a")
        );
        assert_eq!(
            go(&r, "/x", Some("orders.svc.example"), false),
            s("orders", "/x")
        );
        // Two labels in place of `*`: no host route; the path names the service.
        assert_eq!(go(&r, "/x", Some("a.b.svc.example"), false), s("x", "/"));
        let users = r.route("/v2/users/7?full", None, false).unwrap();
        assert_eq!(users.target.selector.as_deref(), Some("version=2"));
        assert_eq!(users.path_and_query, "/7?full");
        assert_eq!(users.timeouts.request, Some(Duration::from_secs(2)));
        assert_eq!(
            go(&r, "/v2/users", None, false),
            s("users selector version=2", "/")
        );
        assert_eq!(go(&r, "/v2/other", None, false), s("v2-all", "/other"));
        // Whole segments only.
        assert_eq!(go(&r, "/v2usersx/a", None, false), s("v2usersx", "/a"));
    }

    #[test]
    fn bad_routes_are_refused_with_the_reason() {
        for (spec, needle) in [
            ("service=a", "needs one of"),
            ("host=a", "needs service"),
            ("host=a,grpc=b,service=c", "one of host"),
            ("prefix=api,service=a", "must start with"),
            ("host=a,service=A", "not a service name"),
            ("host=*.x,service=a", "wildcard"),
            ("host=a,service=b,timeout=5", "needs a unit"),
            ("host=a,service=b,color=red", "unknown key"),
            ("host=,service=b", "empty"),
        ] {
            let err = Routes::parse(&[spec.to_owned()]).unwrap_err();
            assert!(err.contains(needle), "{spec}: {err}");
            assert!(err.contains(spec), "the error names the route: {err}");
        }
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("s").is_err());
    }
}
