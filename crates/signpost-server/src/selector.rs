//! Kubernetes label selectors over instance metadata.
//!
//! Grammar (requirements are joined by commas and must all hold):
//! `key=value`, `key==value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`, `key` (exists),
//! `!key` (does not exist). As in Kubernetes, `!=` and `notin` also match instances without the key.

use signpost_store::Metadata;
use std::fmt;

/// A parsed selector. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Why a selector did not parse, with the byte offset where it went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub position: usize,
    pub reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at position {}", self.reason, self.position)
    }
}

impl std::error::Error for ParseError {}

impl Selector {
    /// Parses `input`; see the module docs for the grammar.
    pub fn parse(input: &str) -> Result<Selector, ParseError> {
        Parser::new(input)?.selector()
    }

    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Metadata) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Bang,
    Eq,
    DoubleEq,
    NotEq,
    Open,
    Close,
    Comma,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Bang => "\"!\"".into(),
            Token::Eq => "\"=\"".into(),
            Token::DoubleEq => "\"==\"".into(),
            Token::NotEq => "\"!=\"".into(),
            Token::Open => "\"(\"".into(),
            Token::Close => "\")\"".into(),
            Token::Comma => "\",\"".into(),
        }
    }
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/')
}

fn lex(input: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let bytes = input.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let start = i;
        let token = match b {
            b' ' | b'\t' => {
                i += 1;
                continue;
            }
            b'!' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Token::NotEq
            }
            b'!' => {
                i += 1;
                Token::Bang
            }
            b'=' if bytes.get(i + 1) == Some(&b'=') => {
                i += 2;
                Token::DoubleEq
            }
            b'=' => {
                i += 1;
                Token::Eq
            }
            b'(' => {
                i += 1;
                Token::Open
            }
            b')' => {
                i += 1;
                Token::Close
            }
            b',' => {
                i += 1;
                Token::Comma
            }
            b if is_word_byte(b) => {
                while i < bytes.len() && is_word_byte(bytes[i]) {
                    i += 1;
                }
                Token::Word(input[start..i].to_owned())
            }
            _ => {
                let c = input[start..].chars().next().unwrap_or('?');
                return Err(ParseError {
                    position: start,
                    reason: format!("unexpected character {c:?}"),
                });
            }
        };
        tokens.push((start, token));
    }
    Ok(tokens)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    next: usize,
    end: usize,
}

impl Parser {
    fn new(input: &str) -> Result<Self, ParseError> {
        Ok(Parser {
            tokens: lex(input)?,
            next: 0,
            end: input.len(),
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.next).map(|(_, t)| t)
    }

    fn position(&self) -> usize {
        self.tokens.get(self.next).map_or(self.end, |(p, _)| *p)
    }

    fn error<T>(&self, reason: impl Into<String>) -> Result<T, ParseError> {
        Err(ParseError {
            position: self.position(),
            reason: reason.into(),
        })
    }

    fn found(&self) -> String {
        self.peek()
            .map_or_else(|| "the end".to_owned(), Token::describe)
    }

    fn bump(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.next).map(|(_, t)| t.clone());
        self.next += 1;
        token
    }

    fn selector(mut self) -> Result<Selector, ParseError> {
        let mut requirements = Vec::new();
        if self.peek().is_none() {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(self.requirement()?);
            match self.bump() {
                None => return Ok(Selector { requirements }),
                Some(Token::Comma) => {}
                Some(_) => {
                    self.next -= 1;
                    return self
                        .error(format!("expected \",\" or the end, found {}", self.found()));
                }
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, ParseError> {
        if self.peek() == Some(&Token::Bang) {
            self.bump();
            let key = self.key()?;
            return Ok(Requirement::NotExists(key));
        }
        let key = self.key()?;
        match self.peek() {
            None | Some(Token::Comma) => Ok(Requirement::Exists(key)),
            Some(Token::Eq | Token::DoubleEq) => {
                self.bump();
                Ok(Requirement::Equals(key, self.value()?))
            }
            Some(Token::NotEq) => {
                self.bump();
                Ok(Requirement::NotEquals(key, self.value()?))
            }
            Some(Token::Word(w)) if w == "in" => {
                self.bump();
                Ok(Requirement::In(key, self.set()?))
            }
            Some(Token::Word(w)) if w == "notin" => {
                self.bump();
                Ok(Requirement::NotIn(key, self.set()?))
            }
            Some(_) => self.error(format!(
                "expected an operator (=, ==, !=, in, notin), \",\" or the end after key {key:?}, found {}",
                self.found()
            )),
        }
    }

    fn key(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Token::Word(w)) if crate::validate::metadata_key_ok(w) => {
                let key = w.clone();
                self.bump();
                Ok(key)
            }
            _ => self.error(format!("expected a key, found {}", self.found())),
        }
    }

    /// A value may be empty (`env=`), as in Kubernetes.
    fn value(&mut self) -> Result<String, ParseError> {
        match self.peek() {
            Some(Token::Word(w)) if !w.contains('/') => {
                let value = w.clone();
                self.bump();
                Ok(value)
            }
            None | Some(Token::Comma | Token::Close) => Ok(String::new()),
            _ => self.error(format!("expected a value, found {}", self.found())),
        }
    }

    fn set(&mut self) -> Result<Vec<String>, ParseError> {
        if self.bump() != Some(Token::Open) {
            self.next -= 1;
            return self.error(format!("expected \"(\", found {}", self.found()));
        }
        let mut values = Vec::new();
        loop {
            values.push(self.value()?);
            match self.bump() {
                Some(Token::Comma) => {}
                Some(Token::Close) => break,
                _ => {
                    self.next -= 1;
                    return self.error(format!("expected \",\" or \")\", found {}", self.found()));
                }
            }
        }
        if values.iter().all(String::is_empty) {
            self.next -= 1;
            return self.error("a set needs at least one value");
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Metadata {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matching_follows_kubernetes_semantics() {
        let prod_v2 = labels(&[("version", "v2"), ("env", "prod"), ("tier", "a")]);
        let dev_v1 = labels(&[("version", "v1"), ("env", "dev"), ("canary", "")]);
        let bare = labels(&[]);
        // (selector, matches prod_v2, matches dev_v1, matches bare)
        let table = [
            ("", true, true, true),
            ("version=v2", true, false, false),
            ("version==v2", true, false, false),
            ("version!=v2", false, true, true),
            ("env in (prod, staging)", true, false, false),
            ("env notin (prod)", false, true, true),
            ("canary", false, true, false),
            ("!canary", true, false, true),
            ("canary=", false, true, false),
            (
                "version=v2,env!=dev,tier in (a,b),!canary",
                true,
                false,
                false,
            ),
            ("  version = v2 ,  env  ", true, false, false),
            ("tier in (a,b)", true, false, false),
        ];
        for (input, a, b, c) in table {
            let selector = match Selector::parse(input) {
                Ok(s) => s,
                Err(e) => panic!("{input:?} did not parse: {e}"),
            };
            assert_eq!(selector.matches(&prod_v2), a, "{input:?} on prod_v2");
            assert_eq!(selector.matches(&dev_v1), b, "{input:?} on dev_v1");
            assert_eq!(selector.matches(&bare), c, "{input:?} on bare");
        }
    }

    #[test]
    fn malformed_selectors_say_where() {
        let table = [
            ("version=v2,", 11, "expected a key"),
            (",a", 0, "expected a key"),
            ("a b", 2, "expected an operator"),
            ("env in prod", 7, "expected \"(\""),
            ("env in (a,b", 11, "expected \",\" or \")\""),
            ("env in ()", 8, "at least one value"),
            ("a=b=c", 3, "expected \",\" or the end"),
            ("a>1", 1, "unexpected character '>'"),
            ("!", 1, "expected a key"),
            ("a=(b)", 2, "expected a value"),
            ("a=b/c", 2, "expected a value"),
            ("a==", 3, ""),
        ];
        for (input, position, reason) in table {
            match Selector::parse(input) {
                Ok(s) if reason.is_empty() => assert!(!s.is_empty()),
                Ok(s) => panic!("{input:?} parsed as {s:?}"),
                Err(e) => {
                    assert_eq!(e.position, position, "{input:?}: {e}");
                    assert!(e.reason.contains(reason), "{input:?}: {e}");
                }
            }
        }
    }
}
