//! Consul's agent, catalog, health and status endpoints over the registry.
//!
//! A Consul agent service is a persistent Signpost instance (a TTL check puts it on a lease);
//! Consul's service ID is the instance id, unique in a namespace as far as these endpoints go.
//! Each instance is reported on one node, [`HttpConfig::node_name`], with the instance's own
//! address, and with exactly one check: its own (an instance without one gets a passing entry
//! for its registration), so `Checks[0]` is the check of that instance and no node check can
//! hide it.
//!
//! `X-Consul-Index` is the revision of the last change of the service asked about (for
//! `/v1/catalog/services`, of the namespace's list of services and their tags): a blocking query
//! wakes for its own service only, and never misses a change because the index only grows while
//! the service is followed. The views behind blocking queries are kept for a while after the
//! last query, so that a client's loop of queries keeps one view and one index; a view started
//! anew starts at the store's current revision, which can only wake a query early (allowed:
//! a return never promises a change), never late.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use signpost_proto::v1 as pb;
use signpost_store::{FeedItem, Health, Instance, Probe, Store};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::expr::Filter;
use super::register;
use super::request::{Call, Failure, decode, empty, failure, json};
use crate::Registry;
use crate::auth::{Principal, Verb};
use crate::convert::{check_to_pb, duration_to_pb};
use crate::view::{LiveView, ViewReceiver, ViewState, Views};

/// Consul's default and longest `wait` of a blocking query.
const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// How long a view stays followed after its last query: past the longest wait, so that a
/// client's next query finds it.
const KEEP: Duration = Duration::from_secs(11 * 60);
/// Views and namespace catalogs kept at most; past that, queries read without keeping one.
const MAX_KEPT: usize = 10_000;
const MAX_CATALOGS: usize = 256;
/// How long a first read of a service may take before the query answers 503.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a plain read waits for its view to catch up with the store (it follows the store's
/// feed a moment behind) before answering with the view as it is.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The datacenter Consul clients are told they talk to (`dc1`, Consul's default).
    pub datacenter: String,
    /// The node every instance is reported on: Signpost has no nodes of its own.
    pub node_name: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            datacenter: "dc1".into(),
            node_name: "signpost".into(),
        }
    }
}

pub(crate) struct Api {
    registry: Registry,
    config: HttpConfig,
    local: Option<SocketAddr>,
    kept: Kept,
    catalogs: Catalogs,
    shutdown: CancellationToken,
}

impl Api {
    pub(crate) fn new(
        registry: Registry,
        config: HttpConfig,
        local: Option<SocketAddr>,
        shutdown: CancellationToken,
    ) -> Api {
        let kept = Kept {
            views: registry.views(),
            map: Arc::default(),
        };
        let sweep = kept.map.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(60)) => Kept::sweep(&sweep),
                }
            }
        });
        Api {
            catalogs: Catalogs {
                store: registry.store().clone(),
                map: Mutex::default(),
                shutdown: shutdown.clone(),
            },
            registry,
            config,
            local,
            kept,
            shutdown,
        }
    }

    pub(crate) async fn handle(
        &self,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<Full<Bytes>> {
        let call = Call::new(request, peer);
        let (method, path) = (call.method.clone(), call.path.clone());
        match self.route(call).await {
            Ok(response) => response,
            Err(f) => {
                tracing::debug!(%method, %path, status = f.status.as_u16(), message = %f.message, "HTTP API request refused");
                failure(f)
            }
        }
    }

    async fn route(&self, call: Call) -> Result<Response<Full<Bytes>>, Failure> {
        let path = call.path.clone();
        let segments: Vec<String> = path
            .trim_start_matches('/')
            .split('/')
            .map(decode)
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let read = || expect(&call.method, &[Method::GET, Method::HEAD], &path);
        let write = || expect(&call.method, &[Method::PUT], &path);
        if let Some(dc) = call.param("dc").filter(|dc| !dc.is_empty())
            && dc != self.config.datacenter
        {
            return Err(Failure::bad_request(format!(
                "No path to datacenter {dc:?}: this server is datacenter {:?}",
                self.config.datacenter
            )));
        }
        match segments.as_slice() {
            ["v1", "health", "service", service] => {
                read()?;
                self.health_service(&call, service).await
            }
            ["v1", "catalog", "service", service] => {
                read()?;
                self.catalog_service(&call, service).await
            }
            ["v1", "catalog", "services"] => {
                read()?;
                self.catalog_services(&call).await
            }
            ["v1", "catalog", "datacenters"] => {
                read()?;
                self.caller(&call, Verb::Read)?;
                Ok(json(&[&self.config.datacenter], None))
            }
            ["v1", "agent", "services"] => {
                read()?;
                self.agent_services(&call)
            }
            ["v1", "agent", "service", "register"] => {
                write()?;
                self.register(call).await
            }
            // python-consul before 1.0.1 deregistered with GET.
            ["v1", "agent", "service", "deregister", id] => {
                expect(&call.method, &[Method::PUT, Method::GET], &path)?;
                self.deregister(&call, id).await
            }
            ["v1", "agent", "service", id] => {
                read()?;
                self.agent_service(&call, id)
            }
            [
                "v1",
                "agent",
                "check",
                verdict @ ("pass" | "warn" | "fail" | "update"),
                check,
            ] => {
                write()?;
                self.report(call, verdict, check).await
            }
            ["v1", "agent", "self"] => {
                read()?;
                self.agent_self(&call)
            }
            ["v1", "status", "leader"] => {
                read()?;
                self.caller(&call, Verb::Read)?;
                Ok(json(&self.leader(), None))
            }
            ["v1", "status", "peers"] => {
                read()?;
                self.caller(&call, Verb::Read)?;
                Ok(json(&[self.leader()], None))
            }
            ["prometheus", "targets"] => {
                read()?;
                super::prometheus::targets(&self.registry, &call)
            }
            _ => Err(Failure::not_found(format!(
                "{path} is not served: Signpost answers the part of Consul's API in docs/consul.md"
            ))),
        }
    }

    /// Consul's leader address: this server's, as Raft's would be.
    fn leader(&self) -> String {
        self.local.map(|a| a.to_string()).unwrap_or_default()
    }

    /// The caller, and the namespace it may `verb`.
    fn caller(&self, call: &Call, verb: Verb) -> Result<(Option<Principal>, String), Failure> {
        let principal = call.principal(&self.registry)?;
        let namespace = call.namespace()?;
        self.registry
            .allow(principal.as_ref(), verb, &namespace)
            .map_err(Failure::from)?;
        Ok((principal, namespace))
    }

    fn service_name(service: &str) -> Result<(), Failure> {
        crate::validate::service("service", service).map_err(|e| {
            Failure::bad_request(format!("{e} (Signpost service names are lower case)"))
        })
    }

    /// `?index=N&wait=D`: the index to wait past and for how long, jitter included.
    fn blocking(call: &Call) -> Result<Option<(u64, Duration)>, Failure> {
        let Some(index) = call.param("index").filter(|i| !i.is_empty()) else {
            return Ok(None);
        };
        let index: u64 = index
            .parse()
            .map_err(|_| Failure::bad_request(format!("Invalid index {index:?}: not a number")))?;
        if index == 0 {
            return Ok(None);
        }
        let wait = match call.param("wait").filter(|w| !w.is_empty()) {
            None => DEFAULT_WAIT,
            Some(w) => register::parse_go_duration(w).ok_or_else(|| {
                Failure::bad_request(format!("Invalid wait {w:?}: use a duration such as 30s"))
            })?,
        }
        .min(MAX_WAIT);
        // As Consul: up to a sixteenth more, so that watchers started together do not come back
        // together.
        let jitter = wait.mul_f64(fastrand::f64() / 16.0);
        Ok(Some((index, wait + jitter)))
    }

    /// The service's view: for a blocking query, once its index differs from the query's (or
    /// the wait ends); otherwise once it has caught up with the store, so that a read right
    /// after a write sees it.
    async fn view(
        &self,
        namespace: &str,
        service: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<Arc<LiveView>, Failure> {
        let unavailable = |why: &str| Failure::new(StatusCode::SERVICE_UNAVAILABLE, why.to_owned());
        // A client's loop starts with a plain read whose index its first blocking query sends
        // back, so plain reads keep their view too; but only of a service that has instances,
        // so that reads of made-up names cannot fill the room blocking queries need.
        let keep = block.is_some() || self.kept.views.has_instances(namespace, service);
        let mut rx = self.kept.follow(namespace, service, keep);
        let started = Instant::now();
        // A first read may take longer than a short wait; the wait counts from the first version.
        let mut deadline = started + READ_TIMEOUT;
        let mut last: Option<Arc<LiveView>> = None;
        let mut restarted = false;
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                ViewState::Live(view) => {
                    if last.is_none() {
                        deadline = match block {
                            Some((_, wait)) => started + wait,
                            // A service changing without pause may never match a read of the
                            // store: a plain read waits for that only so long.
                            None => Instant::now() + CATCH_UP,
                        };
                    }
                    match block {
                        Some((index, _)) if view.revision.max(1) == index => last = Some(view),
                        Some(_) => return Ok(view),
                        None if self.caught_up(namespace, service, &view) => return Ok(view),
                        None => last = Some(view),
                    }
                }
                ViewState::Reading => {}
                ViewState::Ended if restarted || self.shutdown.is_cancelled() => {
                    return last
                        .ok_or_else(|| unavailable("the registry cannot read this service now"));
                }
                ViewState::Ended => {
                    restarted = true;
                    self.kept.forget(namespace, service);
                    rx = self.kept.follow(namespace, service, keep);
                    continue;
                }
            }
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return last.ok_or_else(|| unavailable("the registry stopped following this service"));
                },
                _ = tokio::time::sleep_until(deadline) => {
                    return last.ok_or_else(|| unavailable("the registry did not read this service in time"));
                }
                _ = self.shutdown.cancelled() => {
                    return last.ok_or_else(|| unavailable("the registry is shutting down"));
                }
            }
        }
    }

    /// Whether `view` holds what the store holds now: the same instances at the same
    /// revisions. The view follows the store's feed a moment behind it.
    fn caught_up(&self, namespace: &str, service: &str, view: &LiveView) -> bool {
        match self.registry.store().list(namespace, service) {
            Ok(snapshot) => {
                snapshot.instances.len() == view.instances.len()
                    && snapshot
                        .instances
                        .iter()
                        .zip(&view.instances)
                        .all(|(a, b)| a.id == b.id && a.mod_revision == b.mod_revision)
            }
            // The view is what there is to answer from.
            Err(_) => true,
        }
    }

    /// A health or catalog query: its view (once past the index of a blocking one), and which
    /// of its instances it selects.
    async fn query(
        &self,
        call: &Call,
        service: &str,
    ) -> Result<(Arc<LiveView>, Selection), Failure> {
        let (_, namespace) = self.caller(call, Verb::Read)?;
        Self::service_name(service)?;
        let selection = Selection {
            filter: parse_filter(call)?,
            tags: call.params("tag").to_vec(),
            // Signpost's nodes carry no metadata: a node-meta condition matches nothing.
            node_meta: !call.params("node-meta").is_empty(),
            passing_only: false,
        };
        let block = Self::blocking(call)?;
        let view = self.view(&namespace, service, block).await?;
        Ok((view, selection))
    }

    async fn health_service(
        &self,
        call: &Call,
        service: &str,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let (view, mut selection) = self.query(call, service).await?;
        selection.passing_only = call.flag("passing");
        let out = selection.select(&view, |i| ServiceEntry {
            node: self.node(i),
            service: AgentService::of(i, &self.config),
            checks: vec![CheckEntry::of(i, &self.config)],
        });
        Ok(json(&out, Some(view.revision)))
    }

    async fn catalog_service(
        &self,
        call: &Call,
        service: &str,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let (view, selection) = self.query(call, service).await?;
        let out = selection.select(&view, |i| CatalogService::of(i, &self.config));
        Ok(json(&out, Some(view.revision)))
    }

    fn node<'a>(&'a self, i: &'a Instance) -> Node<'a> {
        Node {
            id: "",
            node: &self.config.node_name,
            address: &i.address,
            datacenter: &self.config.datacenter,
            tagged_addresses: BTreeMap::new(),
            meta: BTreeMap::new(),
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }

    async fn catalog_services(&self, call: &Call) -> Result<Response<Full<Bytes>>, Failure> {
        let (_, namespace) = self.caller(call, Verb::Read)?;
        if call.param("filter").is_some_and(|f| !f.is_empty()) {
            return Err(Failure::bad_request(
                "filter is not supported on /v1/catalog/services: filter /v1/health/service instead",
            ));
        }
        let block = Self::blocking(call)?;
        let catalog = self.catalogs.wait(&namespace, block).await?;
        Ok(json(&catalog.services, Some(catalog.revision)))
    }

    /// Every instance of the namespace, read now (no blocking: Consul's agent endpoints have
    /// their own, hash-based, blocking that these clients do not use).
    fn instances(&self, namespace: &str) -> Result<Vec<Arc<Instance>>, Failure> {
        let store = self.registry.store();
        let mut out = Vec::new();
        for summary in store
            .list_services(namespace)
            .map_err(|e| Failure::from(crate::error::Error::from(e)))?
            .services
        {
            let snapshot = store
                .list(namespace, &summary.name)
                .map_err(|e| Failure::from(crate::error::Error::from(e)))?;
            out.extend(snapshot.instances);
        }
        Ok(out)
    }

    /// The instances of the namespace with Consul service ID `id`.
    fn by_id(&self, namespace: &str, id: &str) -> Result<Vec<Arc<Instance>>, Failure> {
        Ok(self
            .instances(namespace)?
            .into_iter()
            .filter(|i| i.id == id)
            .collect())
    }

    /// The one instance with Consul service ID `id`.
    fn one(&self, namespace: &str, id: &str) -> Result<Option<Arc<Instance>>, Failure> {
        let mut found = self.by_id(namespace, id)?;
        if found.len() > 1 {
            let services: Vec<&str> = found.iter().map(|i| i.service.as_str()).collect();
            return Err(Failure::new(
                StatusCode::CONFLICT,
                format!(
                    "service ID {id:?} is registered under several services ({}): Consul's API \
                     cannot tell them apart; deregister through the gRPC API, which names the service",
                    services.join(", ")
                ),
            ));
        }
        Ok(found.pop())
    }

    fn agent_services(&self, call: &Call) -> Result<Response<Full<Bytes>>, Failure> {
        let (_, namespace) = self.caller(call, Verb::Read)?;
        let filter = parse_filter(call)?;
        let mut out: BTreeMap<String, AgentService<'_>> = BTreeMap::new();
        let instances = self.instances(&namespace)?;
        for i in &instances {
            let entry = AgentService::of(i, &self.config);
            if let Some(filter) = &filter
                && !filter.matches(&serde_json::to_value(&entry).unwrap_or_default())
            {
                continue;
            }
            // A Consul ID names one service; where two Signpost services share an id, the
            // second is keyed by service and id so that neither hides the other.
            let key = if out.contains_key(&i.id) {
                format!("{}/{}", i.service, i.id)
            } else {
                i.id.clone()
            };
            out.insert(key, entry);
        }
        Ok(json(&out, None))
    }

    fn agent_service(&self, call: &Call, id: &str) -> Result<Response<Full<Bytes>>, Failure> {
        let (_, namespace) = self.caller(call, Verb::Read)?;
        match self.one(&namespace, id)? {
            Some(i) => Ok(json(
                &AgentService::of(&i, &self.config),
                Some(i.mod_revision),
            )),
            None => Err(Failure::not_found(format!("unknown service ID {id:?}"))),
        }
    }

    fn agent_self(&self, call: &Call) -> Result<Response<Full<Bytes>>, Failure> {
        self.caller(call, Verb::Read)?;
        let address = self.local.map(|a| a.ip().to_string()).unwrap_or_default();
        Ok(json(
            &serde_json::json!({
                "Config": {
                    "Datacenter": self.config.datacenter,
                    "NodeName": self.config.node_name,
                    "NodeID": "",
                    "Server": true,
                    "Version": env!("CARGO_PKG_VERSION"),
                    "Revision": "signpost",
                },
                "Member": {
                    "Name": self.config.node_name,
                    "Addr": address,
                    "Port": self.local.map_or(0, |a| a.port()),
                    "Tags": {"dc": self.config.datacenter, "role": "consul"},
                    "Status": 1,
                },
                "Meta": {},
                "Stats": {},
            }),
            None,
        ))
    }

    async fn register(&self, call: Call) -> Result<Response<Full<Bytes>>, Failure> {
        let (principal, namespace) = self.caller(&call, Verb::Write)?;
        let replace = call.flag("replace-existing-checks");
        let peer = call.peer.ip();
        let (limit, _) = self.registry.message_limits();
        let body = call.json(limit).await?;
        let registration = register::parse(&body, peer).map_err(register::failure)?;
        let mut instance = registration.instance;
        instance.namespace = namespace.clone();
        let mut lease_id = 0;
        if registration.no_check && !replace {
            // As a Consul agent keeps a service's checks when it is registered again without
            // them; a ttl check keeps its lease too.
            let store = self.registry.store();
            let current = store
                .list(&namespace, &instance.service)
                .map_err(|e| Failure::from(crate::error::Error::from(e)))?;
            if let Some(existing) = current.instances.iter().find(|i| i.id == instance.id)
                && let Some(check) = &existing.check
            {
                instance.check = Some(check_to_pb(check));
                if !check.probe.is_probed() {
                    lease_id = existing.lease_id.unwrap_or(0);
                }
            }
        }
        let request = pb::RegisterRequest {
            instance: Some(instance),
            ttl: registration.ttl.map(duration_to_pb),
            lease_id,
        };
        self.registry
            .do_register(principal, request)
            .await
            .map_err(register::failure)?;
        Ok(empty())
    }

    async fn deregister(&self, call: &Call, id: &str) -> Result<Response<Full<Bytes>>, Failure> {
        let (principal, namespace) = self.caller(call, Verb::Write)?;
        let Some(instance) = self.one(&namespace, id)? else {
            return Err(Failure::not_found(format!("Unknown service ID {id:?}")));
        };
        let request = pb::DeregisterRequest {
            namespace,
            service: instance.service.clone(),
            id: instance.id.clone(),
        };
        self.registry
            .do_deregister(principal, request)
            .await
            .map_err(Failure::from)?;
        Ok(empty())
    }

    /// `/v1/agent/check/pass|warn|fail/service:<id>?note=`, and `update` with a JSON
    /// `{"Status", "Output"}`: the status a TTL-checked instance reports of itself.
    async fn report(
        &self,
        call: Call,
        verdict: &str,
        check: &str,
    ) -> Result<Response<Full<Bytes>>, Failure> {
        let (principal, namespace) = self.caller(&call, Verb::Write)?;
        let id = check.strip_prefix("service:").ok_or_else(|| {
            Failure::not_found(format!(
                "Unknown check ID {check:?}: a service's check is \"service:<service ID>\""
            ))
        })?;
        let note = call.param("note").unwrap_or_default().to_owned();
        let instance = self.one(&namespace, id)?;
        let (health, output) = match verdict {
            "pass" => (Health::Passing, note),
            "warn" => (Health::Warning, note),
            "fail" => (Health::Critical, note),
            _ => {
                let (limit, _) = self.registry.message_limits();
                let body = call.json(limit).await?;
                let body = body.as_object().cloned().unwrap_or_default();
                let field = |key: &str| {
                    body.iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(key))
                        .and_then(|(_, v)| v.as_str())
                        .map(str::to_owned)
                };
                let health = match field("Status").as_deref() {
                    Some("passing") => Health::Passing,
                    Some("warning") => Health::Warning,
                    Some("critical") => Health::Critical,
                    other => {
                        return Err(Failure::bad_request(format!(
                            "Invalid Status {other:?}: passing, warning or critical"
                        )));
                    }
                };
                (health, field("Output").unwrap_or_default())
            }
        };
        let unknown = || {
            Failure::not_found(format!(
                "CheckID {check:?} does not have associated TTL: no such instance, or its TTL ran out"
            ))
        };
        let instance = instance.ok_or_else(unknown)?;
        let output = if output.len() > 4096 {
            output.chars().take(4096).collect()
        } else {
            output
        };
        match self
            .registry
            .report(principal.as_ref(), &instance, health, output)
            .await
        {
            Ok(Some(_)) => Ok(empty()),
            Ok(None) => Err(unknown()),
            Err(crate::error::Error::Invalid { reason, .. }) => Err(Failure::bad_request(format!(
                "CheckID {check:?} does not have associated TTL: {reason}"
            ))),
            Err(e) => Err(Failure::from(e)),
        }
    }
}

/// What a health or catalog query keeps of a service's instances.
struct Selection {
    filter: Option<Filter>,
    tags: Vec<String>,
    node_meta: bool,
    passing_only: bool,
}

impl Selection {
    fn select<'a, T: Serialize>(
        &self,
        view: &'a LiveView,
        shape: impl Fn(&'a Instance) -> T,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for instance in &view.instances {
            if self.node_meta
                || (self.passing_only && instance.health != Health::Passing)
                || !self.tags.iter().all(|t| instance.tags.contains(t))
            {
                continue;
            }
            let entry = shape(instance);
            if let Some(filter) = &self.filter
                && !filter.matches(&serde_json::to_value(&entry).unwrap_or_default())
            {
                continue;
            }
            out.push(entry);
        }
        out
    }
}

fn expect(method: &Method, allowed: &[Method], path: &str) -> Result<(), Failure> {
    if allowed.contains(method) {
        return Ok(());
    }
    let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
    Err(Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "method {method} not allowed on {path}: use {}",
            names.join(" or ")
        ),
    ))
}

/// The longest `filter` taken: each entry of an answer is matched against it.
const MAX_FILTER: usize = 4096;

fn parse_filter(call: &Call) -> Result<Option<Filter>, Failure> {
    match call.param("filter").filter(|f| !f.trim().is_empty()) {
        None => Ok(None),
        Some(text) if text.len() > MAX_FILTER => Err(Failure::bad_request(format!(
            "filter is {} bytes: at most {MAX_FILTER} are taken",
            text.len()
        ))),
        Some(text) => Filter::parse(text)
            .map(Some)
            .map_err(|e| Failure::bad_request(format!("Failed to create boolean expression evaluator: filter {text:?}: {e} (see docs/consul.md for what is supported)"))),
    }
}

fn status(health: Health) -> &'static str {
    match health {
        Health::Passing => "passing",
        Health::Warning => "warning",
        Health::Critical => "critical",
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: u32,
    warning: u32,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Node<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: BTreeMap<&'a str, &'a str>,
    meta: BTreeMap<&'a str, &'a str>,
    create_index: u64,
    modify_index: u64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentService<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    service: &'a str,
    tags: &'a [String],
    meta: BTreeMap<&'a str, &'a str>,
    port: u16,
    address: &'a str,
    weights: Weights,
    enable_tag_override: bool,
    datacenter: &'a str,
    namespace: &'a str,
    create_index: u64,
    modify_index: u64,
}

impl<'a> AgentService<'a> {
    fn of(i: &'a Instance, config: &'a HttpConfig) -> Self {
        AgentService {
            id: &i.id,
            service: &i.service,
            tags: &i.tags,
            meta: i
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            port: i.port,
            address: &i.address,
            weights: Weights {
                passing: i.weight,
                warning: i.weight,
            },
            enable_tag_override: false,
            datacenter: &config.datacenter,
            namespace: &i.namespace,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CheckEntry<'a> {
    node: &'a str,
    #[serde(rename = "CheckID")]
    check_id: String,
    name: String,
    status: &'static str,
    notes: &'a str,
    output: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    #[serde(rename = "Type")]
    kind: &'static str,
    namespace: &'a str,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CheckEntry<'a> {
    fn of(i: &'a Instance, config: &'a HttpConfig) -> Self {
        let (name, kind, output) = match i.check.as_ref().map(|c| &c.probe) {
            None => (
                "Signpost registration".to_owned(),
                "",
                "registered without a health check",
            ),
            Some(probe) => (
                format!("Service '{}' check", i.service),
                match probe {
                    Probe::Http { .. } => "http",
                    Probe::Tcp => "tcp",
                    Probe::Grpc { .. } => "grpc",
                    Probe::Ttl => "ttl",
                },
                i.health_output.as_str(),
            ),
        };
        CheckEntry {
            node: &config.node_name,
            check_id: format!("service:{}", i.id),
            name,
            status: status(i.health),
            notes: "",
            output,
            service_id: &i.id,
            service_name: &i.service,
            service_tags: &i.tags,
            kind,
            namespace: &i.namespace,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct ServiceEntry<'a> {
    node: Node<'a>,
    service: AgentService<'a>,
    checks: Vec<CheckEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct CatalogService<'a> {
    #[serde(rename = "ID")]
    id: &'a str,
    node: &'a str,
    address: &'a str,
    datacenter: &'a str,
    tagged_addresses: BTreeMap<&'a str, &'a str>,
    node_meta: BTreeMap<&'a str, &'a str>,
    service_kind: &'a str,
    #[serde(rename = "ServiceID")]
    service_id: &'a str,
    service_name: &'a str,
    service_tags: &'a [String],
    service_address: &'a str,
    service_weights: Weights,
    service_meta: BTreeMap<&'a str, &'a str>,
    service_port: u16,
    service_enable_tag_override: bool,
    namespace: &'a str,
    create_index: u64,
    modify_index: u64,
}

impl<'a> CatalogService<'a> {
    fn of(i: &'a Instance, config: &'a HttpConfig) -> Self {
        CatalogService {
            id: "",
            node: &config.node_name,
            address: &i.address,
            datacenter: &config.datacenter,
            tagged_addresses: BTreeMap::new(),
            node_meta: BTreeMap::new(),
            service_kind: "",
            service_id: &i.id,
            service_name: &i.service,
            service_tags: &i.tags,
            service_address: &i.address,
            service_weights: Weights {
                passing: i.weight,
                warning: i.weight,
            },
            service_meta: i
                .metadata
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
            service_port: i.port,
            service_enable_tag_override: false,
            namespace: &i.namespace,
            create_index: i.create_revision,
            modify_index: i.mod_revision,
        }
    }
}

type Key = (String, String);

/// The views that blocking queries follow, kept past their last query (see the module doc).
struct Kept {
    views: Arc<Views>,
    map: Arc<Mutex<HashMap<Key, (ViewReceiver, Instant)>>>,
}

impl Kept {
    fn lock(
        map: &Mutex<HashMap<Key, (ViewReceiver, Instant)>>,
    ) -> MutexGuard<'_, HashMap<Key, (ViewReceiver, Instant)>> {
        // Single inserts and removes: a panic cannot leave the map half-changed.
        map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view of a service; kept past this query when `keep` (a blocking query).
    fn follow(&self, namespace: &str, service: &str, keep: bool) -> ViewReceiver {
        let key = (namespace.to_owned(), service.to_owned());
        let mut map = Self::lock(&self.map);
        if let Some((rx, used)) = map.get_mut(&key)
            && !matches!(*rx.borrow(), ViewState::Ended)
        {
            *used = Instant::now();
            return rx.clone();
        }
        let rx = self.views.follow(namespace, service);
        if keep && (map.len() < MAX_KEPT || map.contains_key(&key)) {
            map.insert(key, (rx.clone(), Instant::now()));
        }
        rx
    }

    fn forget(&self, namespace: &str, service: &str) {
        Self::lock(&self.map).remove(&(namespace.to_owned(), service.to_owned()));
    }

    fn sweep(map: &Mutex<HashMap<Key, (ViewReceiver, Instant)>>) {
        Self::lock(map).retain(|_, (rx, used)| {
            used.elapsed() < KEEP && !matches!(*rx.borrow(), ViewState::Ended)
        });
    }
}

/// A namespace's services and their tags, as `/v1/catalog/services` answers, at the revision
/// of its last change.
#[derive(Debug, PartialEq)]
struct Catalog {
    revision: u64,
    services: BTreeMap<String, Vec<String>>,
}

/// One task per namespace asked about follows the store's feed and publishes its catalog when
/// the list of services or their tags change, so that a blocking query wakes only then.
struct Catalogs {
    store: Arc<dyn Store>,
    map: Mutex<HashMap<String, watch::Receiver<Option<Arc<Catalog>>>>>,
    shutdown: CancellationToken,
}

impl Catalogs {
    fn follow(&self, namespace: &str) -> Option<watch::Receiver<Option<Arc<Catalog>>>> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = map.get(namespace)
            && rx.has_changed().is_ok()
        {
            return Some(rx.clone());
        }
        if map.len() >= MAX_CATALOGS && !map.contains_key(namespace) {
            return None;
        }
        let (tx, rx) = watch::channel(None);
        map.insert(namespace.to_owned(), rx.clone());
        tokio::spawn(follow_catalog(
            self.store.clone(),
            namespace.to_owned(),
            tx,
            self.shutdown.clone(),
        ));
        Some(rx)
    }

    async fn wait(
        &self,
        namespace: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<Arc<Catalog>, Failure> {
        let Some(mut rx) = self.follow(namespace) else {
            // Too many namespaces followed: answer from a read, without blocking.
            return read_catalog(&*self.store, namespace).map(Arc::new);
        };
        let started = Instant::now();
        let mut deadline = started + READ_TIMEOUT;
        let mut last: Option<Arc<Catalog>> = None;
        loop {
            if let Some(catalog) = rx.borrow_and_update().clone() {
                if last.is_none() {
                    deadline = match block {
                        Some((_, wait)) => started + wait,
                        None => Instant::now() + CATCH_UP,
                    };
                }
                match block {
                    Some((index, _)) if catalog.revision.max(1) == index => last = Some(catalog),
                    Some(_) => return Ok(catalog),
                    // A read right after a write sees it: the follower is a moment behind.
                    None => match read_catalog(&*self.store, namespace) {
                        Ok(now) if now.services != catalog.services => last = Some(catalog),
                        _ => return Ok(catalog),
                    },
                }
            }
            let unavailable = || {
                Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the registry cannot read the catalog now",
                )
            };
            tokio::select! {
                changed = rx.changed() => if changed.is_err() {
                    return last.ok_or_else(unavailable);
                },
                _ = tokio::time::sleep_until(deadline) => return last.ok_or_else(unavailable),
                _ = self.shutdown.cancelled() => return last.ok_or_else(unavailable),
            }
        }
    }
}

fn tags_of(instances: &[Arc<Instance>]) -> Vec<String> {
    let tags: BTreeSet<&String> = instances.iter().flat_map(|i| &i.tags).collect();
    tags.into_iter().cloned().collect()
}

fn read_catalog(store: &dyn Store, namespace: &str) -> Result<Catalog, Failure> {
    let failed = |e: signpost_store::Error| Failure::from(crate::error::Error::from(e));
    let list = store.list_services(namespace).map_err(failed)?;
    let mut services = BTreeMap::new();
    for summary in &list.services {
        let snapshot = store.list(namespace, &summary.name).map_err(failed)?;
        if !snapshot.instances.is_empty() {
            services.insert(summary.name.clone(), tags_of(&snapshot.instances));
        }
    }
    Ok(Catalog {
        revision: list.revision,
        services,
    })
}

/// Publishes the catalog of `namespace` as it changes, until shutdown (namespaces followed are
/// few, and capped).
async fn follow_catalog(
    store: Arc<dyn Store>,
    namespace: String,
    tx: watch::Sender<Option<Arc<Catalog>>>,
    shutdown: CancellationToken,
) {
    let mut retry =
        signpost_backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    'read: loop {
        // Subscribed before the read, so that no change falls between the two.
        let mut feed = store.changes();
        let mut current = match read_catalog(&*store, &namespace) {
            Ok(catalog) => catalog,
            Err(e) => {
                tracing::warn!(%namespace, error = %e.message, "cannot read the catalog; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(retry.next_delay()) => continue 'read,
                }
            }
        };
        retry.reset();
        let changed = tx
            .borrow()
            .as_ref()
            .is_none_or(|c| c.services != current.services);
        if changed {
            tx.send_replace(Some(Arc::new(Catalog {
                revision: current.revision,
                services: current.services.clone(),
            })));
        }
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => return,
                item = feed.next() => item,
            };
            let change = match item {
                FeedItem::Change(change) if change.revision <= current.revision => continue,
                FeedItem::Change(change) => change,
                FeedItem::Lagged => continue 'read,
                FeedItem::Closed => return,
            };
            current.revision = change.revision;
            let touched: BTreeSet<&str> = change
                .events
                .iter()
                .filter_map(|e| e.current.as_deref().or(e.prev.as_deref()))
                .filter(|i| i.namespace == namespace)
                .map(|i| i.service.as_str())
                .collect();
            if touched.is_empty() {
                continue;
            }
            let mut services = current.services.clone();
            for service in touched {
                match store.list(&namespace, service) {
                    Ok(s) if s.instances.is_empty() => {
                        services.remove(service);
                    }
                    Ok(s) => {
                        services.insert(service.to_owned(), tags_of(&s.instances));
                    }
                    Err(_) => continue 'read,
                }
            }
            if services != current.services {
                current.services = services;
                tx.send_replace(Some(Arc::new(Catalog {
                    revision: current.revision,
                    services: current.services.clone(),
                })));
            }
        }
    }
}
