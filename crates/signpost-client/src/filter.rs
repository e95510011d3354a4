//! Which instances of a service a caller wants: the filter of Discover and Watch.

use signpost_proto::v1 as pb;

/// A service, and optionally tags, a label selector, a namespace and whether to include
/// critical instances. Built from a service name: `Filter::from("greeter").tag("v2")`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Filter {
    namespace: String,
    service: String,
    tags: Vec<String>,
    selector: String,
    include_unhealthy: bool,
}

impl Filter {
    /// Every healthy instance of `service` in the default namespace.
    pub fn service(service: impl Into<String>) -> Self {
        Filter {
            service: service.into(),
            ..Filter::default()
        }
    }

    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// Only instances carrying `tag` (every tag added must be present).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        let tag = tag.into();
        if let Err(at) = self.tags.binary_search(&tag) {
            self.tags.insert(at, tag);
        }
        self
    }

    /// A Kubernetes label selector over metadata, e.g. `version=v2,env!=dev`.
    pub fn selector(mut self, selector: impl Into<String>) -> Self {
        self.selector = selector.into();
        self
    }

    /// Include critical instances too (by default only passing and warning ones).
    pub fn include_unhealthy(mut self, include: bool) -> Self {
        self.include_unhealthy = include;
        self
    }

    pub(crate) fn includes_unhealthy(&self) -> bool {
        self.include_unhealthy
    }

    pub fn service_name(&self) -> &str {
        &self.service
    }

    pub(crate) fn discover_request(&self) -> pb::DiscoverRequest {
        pb::DiscoverRequest {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            tags: self.tags.clone(),
            selector: self.selector.clone(),
            include_unhealthy: self.include_unhealthy,
        }
    }

    pub(crate) fn watch_request(&self, start_revision: u64) -> pb::WatchRequest {
        pb::WatchRequest {
            namespace: self.namespace.clone(),
            service: self.service.clone(),
            tags: self.tags.clone(),
            selector: self.selector.clone(),
            include_unhealthy: self.include_unhealthy,
            start_revision,
        }
    }
}

impl From<&str> for Filter {
    fn from(service: &str) -> Self {
        Filter::service(service)
    }
}

impl From<String> for Filter {
    fn from(service: String) -> Self {
        Filter::service(service)
    }
}
