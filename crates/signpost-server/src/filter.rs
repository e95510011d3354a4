//! The filter shared by Discover and Watch, and how a store change looks through it.

use signpost_store::{Event, Instance, RemovalCause};

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
    /// the view is added, one changing inside it updated, one leaving it removed with the reason.
    pub(crate) fn view_event<'a>(&self, event: &'a Event) -> Option<View<'a>> {
        let was = event.prev.as_deref().filter(|i| self.matches(i));
        let is = event.current.as_deref().filter(|i| self.matches(i));
        Some(match (was, is) {
            (None, None) => return None,
            (None, Some(now)) => View::Added(now),
            (Some(_), Some(now)) => View::Updated(now),
            (Some(before), None) => View::Removed(
                before,
                match (&event.current, event.removal) {
                    (None, Some(cause)) => Left::Gone(cause),
                    // Removed without a recorded cause: only a deregister does that.
                    (None, None) => Left::Gone(RemovalCause::Deregistered),
                    (Some(now), _) if self.matches_ignoring_health(now) => Left::Unhealthy,
                    (Some(_), _) => Left::Filtered,
                },
            ),
        })
    }
}

/// A store event as one view sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View<'a> {
    Added(&'a Instance),
    Updated(&'a Instance),
    /// The instance as the view last saw it, and why it left.
    Removed(&'a Instance, Left),
}

/// Why an instance left a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Left {
    /// It left the store.
    Gone(RemovalCause),
    /// It is still registered, but critical.
    Unhealthy,
    /// It is still registered, but no longer matches the view's tags or selector.
    Filtered,
}
