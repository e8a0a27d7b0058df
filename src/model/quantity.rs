//! Kubernetes resource quantities (`500m`, `1.5`, `256Mi`, `1G`, `1e3`): parsed for
//! validation (the embedded API refuses what a real API server refuses), for the local
//! node (limits become Docker's memory bytes and nano-CPUs) and for usage readings
//! (metrics.k8s.io). Values are kept as f64 of the base unit; callers round up, as
//! Kubernetes does for milli-values. Pure: the model layer, used by kubeapi and node.

/// A quantity's value in its base unit (bytes, cores), or why it is not one.
pub fn parse(text: &str) -> Result<f64, String> {
    let invalid =
        || format!("{text:?} is not a quantity: use a number with an optional suffix (e.g. 500m, 2, 256Mi, 1G)");
    let s = text.trim();
    let number_end = s
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '+' || *c == '-'))))
        .map_or(s.len(), |(i, _)| i);
    let (number, suffix) = s.split_at(number_end);
    if number.is_empty() || number == "+" || number == "-" || number.matches('.').count() > 1 {
        return Err(invalid());
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        exponent if exponent.starts_with(['e', 'E']) => {
            let power: i32 = exponent[1..].parse().map_err(|_| invalid())?;
            10f64.powi(power)
        }
        _ => return Err(invalid()),
    };
    let out = value * multiplier;
    if out.is_finite() { Ok(out) } else { Err(invalid()) }
}

/// Bytes, rounded up (memory, storage).
pub fn bytes(text: &str) -> Result<i64, String> {
    parse(text).map(|v| v.ceil() as i64)
}

/// Thousandths of a core, rounded up (CPU).
pub fn millis(text: &str) -> Result<i64, String> {
    parse(text).map(|v| (v * 1000.0 - 1e-9).ceil() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_like_kubernetes() {
        assert_eq!(millis("500m"), Ok(500));
        assert_eq!(millis("1"), Ok(1000));
        assert_eq!(millis("1.5"), Ok(1500));
        assert_eq!(millis("0.1"), Ok(100));
        assert_eq!(millis("1m"), Ok(1));
        assert_eq!(bytes("256Mi"), Ok(256 << 20));
        assert_eq!(bytes("1G"), Ok(1_000_000_000));
        assert_eq!(bytes("1e3"), Ok(1000));
        assert_eq!(bytes("64Ki"), Ok(65536));
        assert_eq!(bytes("1.5Gi"), Ok(1536 << 20));
        for bad in ["", "Mi", "1MB", "abc", "1..2", "--1", "1e"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
