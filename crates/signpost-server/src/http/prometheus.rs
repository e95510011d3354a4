//! Prometheus' HTTP service discovery (`http_sd_configs`): `GET /prometheus/targets` lists the
//! healthy (passing or warning) instances of a namespace as target groups, one per instance,
//! read from the store at the time of the request. Prometheus polls it (`refresh_interval`).
//!
//! Each group has the plain labels `namespace`, `service` and, when set, `zone` (they become
//! the series' labels as they are), and `__meta_signpost_*` labels for relabelling: `id`,
//! `tags` (`,a,b,` as Consul's), `health`, `zone` and `metadata_<key>` (the key with every
//! character outside `[a-zA-Z0-9_]` as `_`). `?service=` (repeatable) and `?tag=` narrow the
//! list; `?ns=` picks the namespace.

use std::collections::BTreeMap;

use http_body_util::Full;
use hyper::Response;
use hyper::body::Bytes;
use serde::Serialize;

use super::request::{Call, Failure, json};
use crate::Registry;
use crate::auth::Verb;
use crate::probe::authority;

#[derive(Serialize)]
struct Group {
    targets: [String; 1],
    labels: BTreeMap<String, String>,
}

fn label_name(key: &str) -> String {
    key.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub(crate) fn targets(registry: &Registry, call: &Call) -> Result<Response<Full<Bytes>>, Failure> {
    let principal = call.principal(registry)?;
    let namespace = call.namespace()?;
    registry
        .allow(principal.as_ref(), Verb::Read, &namespace)
        .map_err(Failure::from)?;
    let failed = |e: signpost_store::Error| Failure::from(crate::error::Error::from(e));
    let store = registry.store();
    let wanted = call.params("service");
    let tags = call.params("tag");
    let list = store.list_services(&namespace).map_err(failed)?;
    let mut groups = Vec::new();
    for summary in &list.services {
        if !wanted.is_empty() && !wanted.contains(&summary.name) {
            continue;
        }
        let snapshot = store.list(&namespace, &summary.name).map_err(failed)?;
        for i in &snapshot.instances {
            if !i.health.is_healthy() || !tags.iter().all(|t| i.tags.contains(t)) {
                continue;
            }
            let mut labels = BTreeMap::new();
            labels.insert("namespace".to_owned(), i.namespace.clone());
            labels.insert("service".to_owned(), i.service.clone());
            if !i.zone.is_empty() {
                labels.insert("zone".to_owned(), i.zone.clone());
                labels.insert("__meta_signpost_zone".to_owned(), i.zone.clone());
            }
            labels.insert("__meta_signpost_id".to_owned(), i.id.clone());
            labels.insert(
                "__meta_signpost_tags".to_owned(),
                format!(",{},", i.tags.join(",")),
            );
            labels.insert(
                "__meta_signpost_health".to_owned(),
                match i.health {
                    signpost_store::Health::Passing => "passing",
                    signpost_store::Health::Warning => "warning",
                    signpost_store::Health::Critical => "critical",
                }
                .to_owned(),
            );
            for (k, v) in i.metadata.iter() {
                labels.insert(
                    format!("__meta_signpost_metadata_{}", label_name(k)),
                    v.clone(),
                );
            }
            groups.push(Group {
                targets: [authority(&i.address, i.port)],
                labels,
            });
        }
    }
    Ok(json(&groups, Some(list.revision)))
}
