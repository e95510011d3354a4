//! Input rules for names, addresses, tags and metadata. Every failure names the field.

use signpost_store::Metadata;
use std::net::IpAddr;

use crate::error::{Error, Result};

/// The namespace used when a request leaves it empty.
pub const DEFAULT_NAMESPACE: &str = "default";

pub(crate) const MAX_NAMESPACE_LEN: usize = 63;
pub(crate) const MAX_SERVICE_LEN: usize = 63;
pub(crate) const MAX_ID_LEN: usize = 128;
pub(crate) const MAX_TAGS: usize = 32;
pub(crate) const MAX_TAGS_BYTES: usize = 2 * 1024;
pub(crate) const MAX_METADATA: usize = 64;
pub(crate) const MAX_METADATA_BYTES: usize = 16 * 1024;
pub(crate) const MAX_METADATA_KEY_LEN: usize = 253;
pub(crate) const MAX_ZONE_LEN: usize = 128;
pub(crate) const MAX_HOSTNAME_LEN: usize = 253;

/// A namespace, service or id: lowercase letters, digits, '-', '.', '_'.
pub(crate) fn name(field: &str, value: &str, max: usize) -> Result<()> {
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'));
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if !ok_chars || value.len() > max {
        return Err(Error::invalid(
            field,
            format!("{value:?} is invalid: use a-z, 0-9, '-', '.', '_' (1 to {max} characters)"),
        ));
    }
    Ok(())
}

/// An empty namespace means the default one.
pub(crate) fn namespace(field: &str, value: String) -> Result<String> {
    if value.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_owned());
    }
    name(field, &value, MAX_NAMESPACE_LEN)?;
    Ok(value)
}

pub(crate) fn service(field: &str, value: &str) -> Result<()> {
    name(field, value, MAX_SERVICE_LEN)
}

pub(crate) fn id(field: &str, value: &str) -> Result<()> {
    name(field, value, MAX_ID_LEN)
}

/// A hostname, IPv4 or IPv6 address. Brackets around an IPv6 address are accepted and dropped, so
/// that the stored form is one that `format!("[{addr}]:{port}")` and DNS resolvers both take.
pub(crate) fn address(field: &str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ip.to_string());
    }
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if bare.len() > MAX_HOSTNAME_LEN || !bare.split('.').all(valid_label) {
        return Err(Error::invalid(
            field,
            format!("{value:?} is not a hostname, IPv4 or IPv6 address"),
        ));
    }
    Ok(bare.to_owned())
}

pub(crate) fn port(field: &str, value: u32) -> Result<u16> {
    match u16::try_from(value) {
        Ok(port) if port != 0 => Ok(port),
        _ => Err(Error::invalid(
            field,
            format!("{value} is out of range 1-65535"),
        )),
    }
}

fn printable(value: &str) -> bool {
    !value.chars().any(char::is_control)
}

/// Tags, de-duplicated in their first order.
pub(crate) fn tags(field: &str, values: Vec<String>) -> Result<Vec<String>> {
    if values.len() > MAX_TAGS {
        return Err(Error::invalid(
            field,
            format!(
                "has {} entries; at most {MAX_TAGS} are allowed",
                values.len()
            ),
        ));
    }
    let total: usize = values.iter().map(String::len).sum();
    if total > MAX_TAGS_BYTES {
        return Err(Error::invalid(
            field,
            format!("take {total} bytes; at most {MAX_TAGS_BYTES} are allowed"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for (i, tag) in values.into_iter().enumerate() {
        if tag.is_empty() || !printable(&tag) {
            return Err(Error::invalid(
                format!("{field}[{i}]"),
                format!("{tag:?} is invalid: a tag is non-empty and has no control characters"),
            ));
        }
        if !out.contains(&tag) {
            out.push(tag);
        }
    }
    Ok(out)
}

/// Metadata keys follow label-key syntax, so that a selector can always name them; values are
/// free text without control characters.
pub(crate) fn metadata(
    field: &str,
    values: impl IntoIterator<Item = (String, String)>,
) -> Result<Metadata> {
    let map: Metadata = values.into_iter().collect();
    if map.len() > MAX_METADATA {
        return Err(Error::invalid(
            field,
            format!(
                "has {} entries; at most {MAX_METADATA} are allowed",
                map.len()
            ),
        ));
    }
    let total: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_METADATA_BYTES {
        return Err(Error::invalid(
            field,
            format!("takes {total} bytes; at most {MAX_METADATA_BYTES} are allowed"),
        ));
    }
    for (key, value) in &map {
        if !metadata_key_ok(key) {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                format!(
                    "key is invalid: use letters, digits, '-', '.', '_', '/' (1 to {MAX_METADATA_KEY_LEN} characters)"
                ),
            ));
        }
        if !printable(value) {
            return Err(Error::invalid(
                format!("{field}[{key:?}]"),
                "value has control characters",
            ));
        }
    }
    Ok(map)
}

pub(crate) fn metadata_key_ok(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_METADATA_KEY_LEN
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'/'))
}

pub(crate) fn zone(field: &str, value: String) -> Result<String> {
    if value.len() > MAX_ZONE_LEN || !printable(&value) {
        return Err(Error::invalid(
            field,
            format!("is invalid: at most {MAX_ZONE_LEN} bytes without control characters"),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(result: Result<impl std::fmt::Debug>) -> String {
        match result {
            Ok(v) => panic!("expected an error, got {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn names_accept_the_documented_alphabet_and_lengths() {
        for ok in ["a", "greeter", "greeter-v2.prod_1", &"x".repeat(63)] {
            assert!(service("service", ok).is_ok(), "{ok}");
        }
        assert!(id("id", &"x".repeat(128)).is_ok());
        let cases = [
            ("", "service is required"),
            ("Bad Name!", "service \"Bad Name!\" is invalid"),
            ("UPPER", "is invalid"),
            ("with space", "is invalid"),
            ("slash/y", "is invalid"),
        ];
        for (input, expected) in cases {
            let msg = message(service("service", input));
            assert!(msg.contains(expected), "{input:?}: {msg}");
        }
        assert!(message(service("service", &"x".repeat(64))).contains("1 to 63"));
        assert!(message(id("instance.id", &"x".repeat(129))).starts_with("instance.id"));
    }

    #[test]
    fn an_empty_namespace_is_the_default() {
        assert_eq!(
            namespace("namespace", String::new()).ok().as_deref(),
            Some("default")
        );
        assert!(namespace("namespace", "Prod".into()).is_err());
    }

    #[test]
    fn addresses_are_hostnames_or_ips() {
        let ok = [
            ("10.0.0.1", "10.0.0.1"),
            ("::1", "::1"),
            ("[fe80::1]", "fe80::1"),
            ("greeter-1.svc.cluster.local", "greeter-1.svc.cluster.local"),
            ("localhost", "localhost"),
        ];
        for (input, stored) in ok {
            assert_eq!(
                address("address", input).ok().as_deref(),
                Some(stored),
                "{input}"
            );
        }
        for bad in [
            "",
            "-bad.example",
            "a..b",
            "host:80",
            "http://x",
            "a b",
            &"a".repeat(64),
        ] {
            assert!(address("instance.address", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(port("port", 1).ok(), Some(1));
        assert_eq!(port("port", 65535).ok(), Some(65535));
        assert!(message(port("instance.port", 0)).contains("instance.port 0 is out of range"));
        assert!(port("port", 65536).is_err());
    }

    #[test]
    fn tags_are_bounded_and_deduplicated() {
        let tags_ok = tags("tags", vec!["a".into(), "b".into(), "a".into()]);
        assert_eq!(tags_ok.ok(), Some(vec!["a".to_string(), "b".to_string()]));
        let too_many = (0..33).map(|i| i.to_string()).collect();
        assert!(message(tags("instance.tags", too_many)).contains("at most 32"));
        assert!(message(tags("instance.tags", vec!["x".repeat(2049)])).contains("at most 2048"));
        assert!(
            message(tags("instance.tags", vec![String::new()])).starts_with("instance.tags[0]")
        );
    }

    #[test]
    fn metadata_is_bounded_and_keys_are_selectable() {
        let ok = metadata(
            "metadata",
            [("app.kubernetes.io/version".into(), "v 2!".into())],
        );
        assert!(ok.is_ok());
        let too_many = (0..65).map(|i| (format!("k{i}"), String::new()));
        assert!(message(metadata("instance.metadata", too_many)).contains("at most 64"));
        let big = [("k".to_string(), "v".repeat(16 * 1024))];
        assert!(message(metadata("instance.metadata", big)).contains("at most 16384"));
        let bad_key = [("has space".to_string(), "v".to_string())];
        assert!(
            message(metadata("instance.metadata", bad_key))
                .contains("instance.metadata[\"has space\"]")
        );
        let bad_value = [("k".to_string(), "a\nb".to_string())];
        assert!(metadata("instance.metadata", bad_value).is_err());
    }
}
