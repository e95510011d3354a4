//! Durations on the command line: `500ms`, `5s`, `2m`, `1h`, or combinations such as `1m30s`.

use std::time::Duration;

pub fn parse(input: &str) -> Result<Duration, String> {
    let usage = || format!("{input:?} is not a duration: use e.g. 500ms, 5s, 2m, 1h or 1m30s");
    let mut total = Duration::ZERO;
    let mut rest = input.trim();
    if rest.is_empty() {
        return Err(usage());
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(usage());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| usage())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            _ => return Err(usage()),
        };
        rest = &rest[unit_len..];
        total = total.saturating_add(part);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let table = [
            ("500ms", Some(Duration::from_millis(500))),
            ("5s", Some(Duration::from_secs(5))),
            ("2m", Some(Duration::from_secs(120))),
            ("1h", Some(Duration::from_secs(3600))),
            ("1m30s", Some(Duration::from_secs(90))),
            ("", None),
            ("5", None),
            ("s", None),
            ("5 s", None),
            ("-5s", None),
            ("5d", None),
        ];
        for (input, expected) in table {
            assert_eq!(parse(input).ok(), expected, "{input:?}");
        }
    }
}
