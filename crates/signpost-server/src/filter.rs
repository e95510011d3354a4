//! The filter shared by Discover and Watch, and how a store change looks through it.

use signpost_proto::v1 as pb;
use signpost_store::{Event, Instance};

use crate::convert::removal_to_pb;
use crate::error::{Error, Result};
use crate::selector::Selector;
use crate::validate;

/// Which instances of one service a caller wants to see.
#[derive(Debug, Clone)]
pub(crate) struct Filter {
    pub(crate) namespace: String,
    pub(crate) service: String,
    tags: Vec<String>,
    selector: Selector,
    pub(crate) include_unhealthy: bool,
}

impl Filter {
    pub(crate) fn new(
        namespace: String,
        service: String,
        tags: Vec<String>,
        selector: &str,
        include_unhealthy: bool,
    ) -> Result<Self> {
        let namespace = validate::namespace("namespace", namespace)?;
        validate::service("service", &service)?;
        let tags = validate::tags("tags", tags)?;
        let selector = Selector::parse(selector)
            .map_err(|e| Error::invalid("selector", format!("{selector:?} is invalid: {e}")))?;
        Ok(Filter {
            namespace,
            service,
            tags,
            selector,
            include_unhealthy,
        })
    }

    /// Whether this filter sees its whole service (no tags, no selector): every such filter with
    /// the same `include_unhealthy` sees a change to the service the same way.
    pub(crate) fn is_whole_service(&self) -> bool {
        self.tags.is_empty() && self.selector.is_empty()
    }

    fn matches_ignoring_health(&self, i: &Instance) -> bool {
        i.is_in(&self.namespace, &self.service)
            && self.tags.iter().all(|t| i.tags.contains(t))
            && self.selector.matches(&i.metadata)
    }

    pub(crate) fn matches(&self, i: &Instance) -> bool {
        self.matches_ignoring_health(i) && (self.include_unhealthy || i.health.is_healthy())
    }

    /// What a store event means to a view through this filter, if anything: an instance entering
    /// the view is ADDED, one changing inside it UPDATED, one leaving it REMOVED with the reason.
    pub(crate) fn view_event(&self, event: &Event, revision: u64) -> Option<crate::wire::Event> {
        let was = event.prev.as_deref().filter(|i| self.matches(i));
        let is = event.current.as_deref().filter(|i| self.matches(i));
        let (kind, instance, reason) = match (was, is) {
            (None, None) => return None,
            (None, Some(now)) => (pb::EventType::Added, now, pb::RemovalReason::Unspecified),
            (Some(_), Some(now)) => (pb::EventType::Updated, now, pb::RemovalReason::Unspecified),
            (Some(before), None) => {
                let reason = match (&event.current, event.removal) {
                    (None, Some(cause)) => removal_to_pb(cause),
                    // Removed without a recorded cause: only a deregister does that.
                    (None, None) => pb::RemovalReason::Deregistered,
                    (Some(now), _) if self.matches_ignoring_health(now) => {
                        pb::RemovalReason::Unhealthy
                    }
                    (Some(_), _) => pb::RemovalReason::Filtered,
                };
                (pb::EventType::Removed, before, reason)
            }
        };
        Some(crate::wire::Event {
            r#type: kind.into(),
            instance: crate::wire::encoded(instance),
            reason: reason.into(),
            revision,
        })
    }
}
