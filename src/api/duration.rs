//! Durations in specs are human strings (`5m`, `60s`, `1h 30m`), parsed with humantime.

use std::time::Duration;

/// Parses a spec duration, naming the field in the error so a user knows what to fix.
pub fn parse(field: &str, value: &str) -> Result<Duration, String> {
    humantime::parse_duration(value.trim())
        .map_err(|e| format!("{field}: {value:?} is not a duration ({e}); write it like 30s, 5m or 1h"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms_and_names_the_field_on_error() {
        assert_eq!(parse("x", "5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("x", "60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("x", "1h 30m").unwrap(), Duration::from_secs(5400));
        let err = parse("tokenPolicy.staleGrace", "five minutes").unwrap_err();
        assert!(err.contains("tokenPolicy.staleGrace"), "{err}");
    }
}
