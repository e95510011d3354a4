//! How the operator's commands print: aligned tables for people, JSON for machines, and times
//! in RFC 3339 (UTC) without a date-time dependency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Writes one line to stdout. Unlike `println!`, a closed pipe (`signpost watch | head -1`) is
/// an error the caller returns, not a panic; `main` ends quietly on it.
pub fn line(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

/// Prints rows under a header, each column as wide as its widest cell. A row's note, if any,
/// goes on the line under it, indented: text too long for a column (a failing check's output)
/// that would otherwise widen every row.
pub fn table_with_notes(
    header: &[&str],
    rows: &[Vec<String>],
    notes: &[Option<String>],
) -> std::io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let render = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    line(&render(header.to_vec()))?;
    for (i, row) in rows.iter().enumerate() {
        line(&render(row.iter().map(String::as_str).collect()))?;
        if let Some(Some(note)) = notes.get(i) {
            line(&format!("  {note}"))?;
        }
    }
    Ok(())
}

/// `2026-11-27T18:40:01Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rest / 3600, rest % 3600 / 60, rest % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// `45s`, `12m`, `3h`, `2d`.
pub fn age(since: Option<SystemTime>) -> String {
    let Some(since) = since else {
        return "-".into();
    };
    let d = SystemTime::now()
        .duration_since(since)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    match d {
        0..=59 => format!("{d}s"),
        60..=3599 => format!("{}m", d / 60),
        3600..=86_399 => format!("{}h", d / 3600),
        _ => format!("{}d", d / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        let at = |secs| rfc3339(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_795_804_801), "2026-11-27T18:40:01Z");
    }

    #[test]
    fn ages_are_short() {
        let ago = |secs| age(Some(SystemTime::now() - Duration::from_secs(secs)));
        assert_eq!(ago(5), "5s");
        assert_eq!(ago(125), "2m");
        assert_eq!(ago(7_300), "2h");
        assert_eq!(ago(200_000), "2d");
        assert_eq!(age(None), "-");
    }
}
