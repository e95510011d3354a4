//! The `filter` query parameter: a subset of Consul's filter language (go-bexpr), evaluated over
//! the JSON of each answer entry, so that the selectors are the field names the client reads.
//!
//! Supported: `Sel == "v"`, `Sel != "v"`, `Sel contains "v"`, `Sel not contains "v"`,
//! `"v" in Sel`, `"v" not in Sel`, `Sel is empty`, `Sel is not empty`, `not TERM`, joined by
//! `and` (binding tighter) and `or`. Selectors are dotted field names (`Service.Meta.version`,
//! or `Service.Meta["version"]`), matched without regard to case. Parentheses and `matches`
//! are refused with a message saying so, rather than read wrongly.

use serde_json::Value;

/// A parsed filter: entries matching any of the groups, each group all of its terms.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Filter {
    any: Vec<Vec<Term>>,
}

#[derive(Debug, Clone, PartialEq)]
struct Term {
    negate: bool,
    test: Test,
}

#[derive(Debug, Clone, PartialEq)]
enum Test {
    Equal(Vec<String>, String),
    Contains(Vec<String>, String),
    Empty(Vec<String>),
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Word(String),
    Quoted(String),
    Eq,
    Ne,
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut tokens = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '"' | '`' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => return Err("a quoted value is not closed".into()),
                        Some('\\') if c == '"' => match chars.next() {
                            Some(e) => s.push(e),
                            None => return Err("a quoted value is not closed".into()),
                        },
                        Some(q) if q == c => break,
                        Some(other) => s.push(other),
                    }
                }
                tokens.push(Token::Quoted(s));
            }
            '=' | '!' => {
                chars.next();
                if chars.next() != Some('=') {
                    return Err(format!("'{c}' must be followed by '=' (== or !=)"));
                }
                tokens.push(if c == '=' { Token::Eq } else { Token::Ne });
            }
            '(' | ')' => {
                return Err("parentheses are not supported; write OR of ANDs".into());
            }
            _ => {
                let mut word = String::new();
                while let Some(&w) = chars.peek() {
                    if w.is_whitespace() || matches!(w, '=' | '!' | '(' | ')') {
                        break;
                    }
                    // A map key in brackets: Service.Meta["a b"].
                    if w == '[' {
                        word.push(w);
                        chars.next();
                        for k in chars.by_ref() {
                            word.push(k);
                            if k == ']' {
                                break;
                            }
                        }
                        continue;
                    }
                    word.push(w);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

fn selector(word: &str) -> Result<Vec<String>, String> {
    let mut path = Vec::new();
    for part in word.split('.') {
        if let Some((name, key)) = part.split_once('[') {
            let key = key
                .strip_suffix(']')
                .map(|k| k.trim_matches('"'))
                .ok_or_else(|| format!("{word:?}: a [ is not closed"))?;
            if !name.is_empty() {
                path.push(name.to_owned());
            }
            path.push(key.to_owned());
        } else if part.is_empty() {
            return Err(format!("{word:?} is not a selector"));
        } else {
            path.push(part.to_owned());
        }
    }
    Ok(path)
}

impl Filter {
    pub(crate) fn parse(text: &str) -> Result<Filter, String> {
        let tokens = tokenize(text)?;
        let mut at = 0;
        let word = |t: Option<&Token>, w: &str| matches!(t, Some(Token::Word(x)) if x.eq_ignore_ascii_case(w));
        let value = |t: Option<&Token>| match t {
            Some(Token::Quoted(s) | Token::Word(s)) => Some(s.clone()),
            _ => None,
        };
        let mut any = vec![Vec::new()];
        loop {
            let mut negate = false;
            while word(tokens.get(at), "not") {
                negate = !negate;
                at += 1;
            }
            let first = tokens.get(at).ok_or("a condition is missing")?;
            at += 1;
            let test = match first {
                // "v" in Sel / "v" not in Sel
                Token::Quoted(v) => {
                    if word(tokens.get(at), "not") {
                        negate = !negate;
                        at += 1;
                    }
                    if !word(tokens.get(at), "in") {
                        return Err(format!("expected `in` after {v:?}"));
                    }
                    let Some(Token::Word(sel)) = tokens.get(at + 1) else {
                        return Err("expected a selector after `in`".into());
                    };
                    at += 2;
                    Test::Contains(selector(sel)?, v.clone())
                }
                Token::Word(sel) => {
                    let path = selector(sel)?;
                    match tokens.get(at) {
                        Some(Token::Eq | Token::Ne) => {
                            if tokens.get(at) == Some(&Token::Ne) {
                                negate = !negate;
                            }
                            let v = value(tokens.get(at + 1)).ok_or("expected a value after ==")?;
                            at += 2;
                            Test::Equal(path, v)
                        }
                        t if word(t, "contains") => {
                            let v = value(tokens.get(at + 1))
                                .ok_or("expected a value after contains")?;
                            at += 2;
                            Test::Contains(path, v)
                        }
                        t if word(t, "not") && word(tokens.get(at + 1), "contains") => {
                            negate = !negate;
                            let v = value(tokens.get(at + 2))
                                .ok_or("expected a value after contains")?;
                            at += 3;
                            Test::Contains(path, v)
                        }
                        t if word(t, "in") => {
                            // Bare-word value: v in Sel.
                            let Some(Token::Word(target)) = tokens.get(at + 1) else {
                                return Err("expected a selector after `in`".into());
                            };
                            at += 2;
                            Test::Contains(selector(target)?, sel.clone())
                        }
                        t if word(t, "is") => {
                            at += 1;
                            if word(tokens.get(at), "not") {
                                negate = !negate;
                                at += 1;
                            }
                            if !word(tokens.get(at), "empty") {
                                return Err("expected `is empty` or `is not empty`".into());
                            }
                            at += 1;
                            Test::Empty(path)
                        }
                        t if word(t, "matches") || word(t, "not") => {
                            return Err("`matches` (regular expressions) is not supported".into());
                        }
                        Some(other) => return Err(format!("unexpected {other:?} after {sel:?}")),
                        None => return Err(format!("{sel:?} needs an operator such as ==")),
                    }
                }
                other => return Err(format!("unexpected {other:?}")),
            };
            if let Some(group) = any.last_mut() {
                group.push(Term { negate, test });
            }
            match tokens.get(at) {
                None => break,
                t if word(t, "and") => at += 1,
                t if word(t, "or") => {
                    at += 1;
                    any.push(Vec::new());
                }
                Some(other) => return Err(format!("expected `and` or `or`, found {other:?}")),
            }
        }
        Ok(Filter { any })
    }

    pub(crate) fn matches(&self, entry: &Value) -> bool {
        self.any.iter().any(|group| {
            group
                .iter()
                .all(|term| term.test.holds(entry) != term.negate)
        })
    }
}

/// The values a selector reaches: a field of each element when it crosses a list.
fn resolve<'a>(value: &'a Value, path: &[String], out: &mut Vec<&'a Value>) {
    let Some((head, rest)) = path.split_first() else {
        out.push(value);
        return;
    };
    match value {
        Value::Object(map) => {
            if let Some(v) = map.get(head.as_str()).or_else(|| {
                map.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(head))
                    .map(|(_, v)| v)
            }) {
                resolve(v, rest, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                resolve(item, path, out);
            }
        }
        _ => {}
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl Test {
    fn holds(&self, entry: &Value) -> bool {
        let mut found = Vec::new();
        match self {
            Test::Equal(path, want) => {
                resolve(entry, path, &mut found);
                found.iter().any(|v| text(v).as_deref() == Some(want))
            }
            Test::Contains(path, want) => {
                resolve(entry, path, &mut found);
                found.iter().any(|v| match v {
                    Value::Array(items) => items.iter().any(|i| text(i).as_deref() == Some(want)),
                    Value::Object(map) => map.contains_key(want.as_str()),
                    Value::String(s) => s.contains(want.as_str()),
                    _ => false,
                })
            }
            Test::Empty(path) => {
                resolve(entry, path, &mut found);
                found.iter().all(|v| match v {
                    Value::Null => true,
                    Value::String(s) => s.is_empty(),
                    Value::Array(a) => a.is_empty(),
                    Value::Object(o) => o.is_empty(),
                    _ => false,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry() -> Value {
        json!({"Node": {"Node": "signpost"}, "Service": {"ID": "web-1", "Service": "web",
            "Tags": ["v1", "primary"], "Meta": {"version": "2", "zone": "a"}, "Port": 8080},
            "Checks": [{"Status": "passing"}]})
    }

    fn holds(filter: &str) -> bool {
        Filter::parse(filter)
            .unwrap_or_else(|e| panic!("{filter}: {e}"))
            .matches(&entry())
    }

    #[test]
    fn consul_filters_select_as_consul_selects() {
        assert!(holds(r#"Service.Meta.version == "2""#));
        assert!(holds(r#"Service.Meta["version"] == 2"#));
        assert!(!holds(r#"Service.Meta.version != "2""#));
        assert!(holds(r#""primary" in Service.Tags"#));
        assert!(holds(r#""canary" not in Service.Tags"#));
        assert!(holds(
            r#"Service.Tags contains "v1" and Service.Port == 8080"#
        ));
        assert!(holds(r#"Service.ID == "other" or Service.service == web"#));
        assert!(!holds(
            r#"Service.ID == "other" or Service.Tags contains canary"#
        ));
        assert!(holds(r#"not Service.ID == "other""#));
        assert!(holds(r#"Checks.Status == passing"#));
        assert!(holds(r#"Service.Meta.missing is empty"#));
        assert!(holds(r#"Service.Tags is not empty"#));
        assert!(holds(r#"Service.Meta contains "zone""#));
    }

    #[test]
    fn what_is_not_supported_is_refused_not_read_wrongly() {
        for bad in [
            r#"(Service.ID == "a")"#,
            r#"Service.ID matches "a.*""#,
            r#"Service.ID == "a"#,
            r#"Service.ID"#,
            r#"Service.ID == "a" also"#,
            "",
        ] {
            assert!(Filter::parse(bad).is_err(), "{bad:?}");
        }
    }
}
