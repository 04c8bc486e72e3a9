//! Drift times on the command line and in reports: `0`, `60`, `1h`, `1d`, `1w`, `1mo`, `1y` (seconds by default).

use anyhow::{bail, Result};

/// Unit suffixes and their length in seconds; a month is 30 days and a year 365 days (docs/model.md §7).
const UNITS: [(&str, f64); 7] = [
    ("s", 1.0),
    ("min", 60.0),
    ("h", 3600.0),
    ("d", 86_400.0),
    ("w", 604_800.0),
    ("mo", 2_592_000.0),
    ("y", 31_536_000.0),
];

/// Parses one duration: a non-negative number with an optional unit suffix.
pub fn parse_duration(text: &str) -> Result<f64> {
    let t = text.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let Ok(v) = num.parse::<f64>() else {
        bail!("`{text}` is not a duration (examples: 0, 60, 1h, 1d, 1w, 1mo, 1y)");
    };
    let scale = if unit.is_empty() {
        1.0
    } else {
        match UNITS.iter().find(|(u, _)| *u == unit) {
            Some((_, s)) => *s,
            None => bail!("`{text}`: unknown time unit `{unit}` (use s, min, h, d, w, mo, y)"),
        }
    };
    let s = v * scale;
    if !s.is_finite() || s < 0.0 {
        bail!("`{text}`: a drift time must be finite and ≥ 0");
    }
    Ok(s)
}

/// Parses a comma-separated list of durations.
pub fn parse_durations(text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_duration)
        .collect()
}

/// Short human label of a time in seconds: `0 s`, `1 min`, `1 h`, `1 d`, `1 w`, `1 mo`, `1 y`, or seconds.
pub fn format_duration(s: f64) -> String {
    if s == 0.0 {
        return "0 s".into();
    }
    for (unit, len) in UNITS.iter().rev() {
        let v = s / len;
        if v >= 1.0 && (v - v.round()).abs() < 1e-9 {
            return format!("{} {unit}", v.round());
        }
    }
    format!("{s} s")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_round_trip_through_labels() {
        assert_eq!(
            parse_durations("0,60,1h,1d,1w,1mo,1y").unwrap(),
            crate::tile::DEFAULT_TIMES_S
        );
        assert_eq!(format_duration(3600.0), "1 h");
        assert_eq!(format_duration(2.0 * 86_400.0), "2 d");
        assert_eq!(format_duration(90.0), "90 s");
        assert_eq!(format_duration(31_536_000.0), "1 y");
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("1e400").is_err());
    }
}
