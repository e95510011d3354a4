//! Access tokens: who may read and who may write which namespaces.
//!
//! The token file (TOML) lists each token with a name and its grants:
//!
//! ```toml
//! [[token]]
//! name = "payments"
//! # The token's SHA-256, in hex (`printf %s "$TOKEN" | sha256sum`); or `secret = "…"` in clear.
//! sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
//! read = ["*"]
//! write = ["payments"]
//! ```
//!
//! A request presents `authorization: Bearer <token>`. The presented token is hashed and compared
//! with every entry's hash in constant time, so neither the comparison nor the order of the file
//! tells an attacker how close a guess was.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::Error;

/// What a request wants to do to a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    /// Discover, Watch, ListServices.
    Read,
    /// Register, Deregister, KeepAlive.
    Write,
}

impl std::fmt::Display for Verb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verb::Read => "read",
            Verb::Write => "write",
        })
    }
}

/// The namespaces one verb is granted on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Grant {
    All,
    Some(BTreeSet<String>),
}

impl Grant {
    fn from_list(list: Vec<String>) -> Self {
        if list.iter().any(|n| n == "*") {
            Grant::All
        } else {
            Grant::Some(list.into_iter().collect())
        }
    }

    fn allows(&self, namespace: &str) -> bool {
        match self {
            Grant::All => true,
            Grant::Some(names) => names.contains(namespace),
        }
    }

    fn any(&self) -> bool {
        match self {
            Grant::All => true,
            Grant::Some(names) => !names.is_empty(),
        }
    }
}

/// The token a request was authenticated with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: Arc<str>,
    read: Grant,
    write: Grant,
}

impl Principal {
    /// Whether this token may `verb` in `namespace`; the error names both and nothing else, so
    /// that it says nothing about what the namespace holds.
    pub(crate) fn check(&self, verb: Verb, namespace: &str) -> Result<(), Error> {
        let grant = match verb {
            Verb::Read => &self.read,
            Verb::Write => &self.write,
        };
        if grant.allows(namespace) {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "token \"{}\" may not {verb} namespace \"{namespace}\"",
                self.name
            )))
        }
    }

    /// Whether this token may `verb` anywhere at all (KeepAlive names a lease, not a namespace).
    pub(crate) fn check_any(&self, verb: Verb) -> Result<(), Error> {
        let grant = match verb {
            Verb::Read => &self.read,
            Verb::Write => &self.write,
        };
        if grant.any() {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "token \"{}\" may not {verb} any namespace",
                self.name
            )))
        }
    }
}

#[derive(Debug)]
struct Entry {
    hash: [u8; 32],
    principal: Principal,
}

/// The tokens a server accepts.
#[derive(Debug)]
pub struct Tokens {
    entries: Vec<Entry>,
    /// Names of tokens written in clear in the file, to warn about at start-up.
    pub in_clear: Vec<String>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<FileEntry>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    name: String,
    sha256: Option<String>,
    secret: Option<String>,
    #[serde(default)]
    read: Vec<String>,
    #[serde(default)]
    write: Vec<String>,
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("token file {path}: {reason}")]
pub struct TokensError {
    path: String,
    reason: String,
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_hex(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Equal in time independent of where the first difference is.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Tokens {
    /// Reads a token file.
    pub fn load(path: &Path) -> Result<Tokens, TokensError> {
        let fail = |reason: String| TokensError {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        Tokens::parse(&text).map_err(fail)
    }

    /// Parses the TOML of a token file.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if file.token.is_empty() {
            return Err("no [[token]] entries: every request would be refused".into());
        }
        let mut names = BTreeSet::new();
        let mut entries = Vec::with_capacity(file.token.len());
        let mut in_clear = Vec::new();
        for entry in file.token {
            if entry.name.is_empty() {
                return Err("a token has an empty name".into());
            }
            if !names.insert(entry.name.clone()) {
                return Err(format!("token name \"{}\" is used twice", entry.name));
            }
            let hash = match (&entry.sha256, &entry.secret) {
                (Some(hex), None) => parse_hex(hex).ok_or_else(|| {
                    format!(
                        "token \"{}\": sha256 must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)",
                        entry.name
                    )
                })?,
                (None, Some(secret)) if !secret.is_empty() => {
                    in_clear.push(entry.name.clone());
                    sha256(secret.as_bytes())
                }
                _ => {
                    return Err(format!(
                        "token \"{}\" needs exactly one of sha256 or secret",
                        entry.name
                    ));
                }
            };
            if entries.iter().any(|e: &Entry| same(&e.hash, &hash)) {
                return Err(format!(
                    "token \"{}\" has the same secret as another token",
                    entry.name
                ));
            }
            entries.push(Entry {
                hash,
                principal: Principal {
                    name: Arc::from(entry.name.as_str()),
                    read: Grant::from_list(entry.read),
                    write: Grant::from_list(entry.write),
                },
            });
        }
        Ok(Tokens { entries, in_clear })
    }

    /// How many tokens the file holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true for a loaded file (an empty one is refused).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The principal for an `authorization` header value, or why there is none.
    pub(crate) fn authenticate(&self, header: Option<&str>) -> Result<Principal, Error> {
        let Some(header) = header else {
            return Err(Error::Unauthenticated(
                "no access token: send `authorization: Bearer <token>`".into(),
            ));
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .ok_or_else(|| {
                Error::Unauthenticated("the authorization header must be `Bearer <token>`".into())
            })?
            .trim();
        let presented = sha256(token.as_bytes());
        // Every entry is compared, match or not, so the time taken does not say which one matched.
        let mut found = None;
        for entry in &self.entries {
            if same(&entry.hash, &presented) {
                found = Some(&entry.principal);
            }
        }
        found
            .cloned()
            .ok_or_else(|| Error::Unauthenticated("the access token is not valid".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        [[token]]
        name = "reader"
        secret = "r-secret"
        read = ["*"]

        [[token]]
        name = "payments"
        sha256 = "0a1fd0a86b3f1e47fc8ef4ac6a8a6c4b4e3e3a43a34e4b8e1d1d0d1e8f5c2a3b"
        read = ["payments"]
        write = ["payments"]
    "#;

    #[test]
    fn grants_are_per_verb_and_namespace() {
        let tokens = Tokens::parse(FILE).unwrap();
        assert_eq!(tokens.in_clear, ["reader"]);
        let reader = tokens.authenticate(Some("Bearer r-secret")).unwrap();
        assert!(reader.check(Verb::Read, "anything").is_ok());
        let denied = reader.check(Verb::Write, "prod").unwrap_err().to_string();
        assert_eq!(denied, "token \"reader\" may not write namespace \"prod\"");
        assert!(reader.check_any(Verb::Write).is_err());
    }

    #[test]
    fn hashed_tokens_match_their_secret_only() {
        let hash: String = sha256(b"s3cret")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let tokens = Tokens::parse(&format!(
            "[[token]]\nname = \"p\"\nsha256 = \"{hash}\"\nwrite = [\"payments\"]\n"
        ))
        .unwrap();
        let p = tokens.authenticate(Some("Bearer s3cret")).unwrap();
        assert!(p.check(Verb::Write, "payments").is_ok());
        assert!(p.check(Verb::Write, "other").is_err());
        assert!(p.check(Verb::Read, "payments").is_err());
        for bad in [None, Some("s3cret"), Some("Bearer s3cre"), Some("Bearer ")] {
            assert!(matches!(
                tokens.authenticate(bad),
                Err(Error::Unauthenticated(_))
            ));
        }
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        for (text, says) in [
            ("", "no [[token]]"),
            ("[[token]]\nname = \"a\"\n", "exactly one of"),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"zz\"\n",
                "64 hex digits",
            ),
            (
                "[[token]]\nname = \"a\"\nsecret = \"x\"\n[[token]]\nname = \"a\"\nsecret = \"y\"\n",
                "used twice",
            ),
            (
                "[[token]]\nname = \"a\"\nsecret = \"x\"\n[[token]]\nname = \"b\"\nsecret = \"x\"\n",
                "same secret",
            ),
            (
                "[[token]]\nname = \"a\"\nsecret = \"x\"\nwrites = []\n",
                "unknown field",
            ),
        ] {
            let err = Tokens::parse(text).unwrap_err();
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
