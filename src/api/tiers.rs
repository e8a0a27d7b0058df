//! Tiers: resources and isolation by number. From the original platform, except
//! that no tier grants privileges (see `Security`) and T1 gets real caps.

pub const DEFAULT_TIER: u8 = 2;
const MIB: i64 = 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierLimits {
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    /// T1: read-only root filesystem with a small tmpfs on /tmp.
    pub read_only_root: bool,
    pub tmp_tmpfs_bytes: Option<i64>,
}

pub fn limits(tier: u8) -> Option<TierLimits> {
    let (mem_mib, cpu_milli, ro) = match tier {
        1 => (256, 500, true),
        2 => (512, 1000, false),
        3 => (2048, 2000, false),
        4 => (4096, 4000, false),
        _ => return None,
    };
    Some(TierLimits {
        memory_bytes: mem_mib * MIB,
        nano_cpus: cpu_milli * 1_000_000,
        read_only_root: ro,
        tmp_tmpfs_bytes: ro.then_some(64 * MIB),
    })
}

/// Parses a memory quantity: plain bytes, or with a Ki/Mi/Gi (binary) or K/M/G (decimal) suffix.
pub fn parse_memory(value: &str) -> Result<i64, String> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("resources.memory: {value:?} is not a quantity; write it like 512Mi or 2Gi"))?;
    let mult: f64 = match unit {
        "" => 1.0,
        "k" | "K" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("resources.memory: unknown unit {unit:?} in {value:?}; use Ki, Mi, Gi, K, M or G")),
    };
    let bytes = (n * mult) as i64;
    if bytes < 6 * MIB {
        return Err(format!("resources.memory: {value:?} is below Docker's minimum of 6Mi"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiers_match_the_design() {
        let t1 = limits(1).unwrap();
        assert_eq!((t1.memory_bytes, t1.nano_cpus, t1.read_only_root), (256 * MIB, 500_000_000, true));
        assert_eq!(t1.tmp_tmpfs_bytes, Some(64 * MIB));
        assert_eq!(limits(2).unwrap().memory_bytes, 512 * MIB);
        assert_eq!(limits(4).unwrap().nano_cpus, 4_000_000_000);
        assert!(limits(0).is_none() && limits(5).is_none());
    }

    #[test]
    fn memory_quantities() {
        assert_eq!(parse_memory("512Mi").unwrap(), 512 * MIB);
        assert_eq!(parse_memory("1G").unwrap(), 1_000_000_000);
        assert!(parse_memory("12Xi").unwrap_err().contains("unknown unit"));
        assert!(parse_memory("1Ki").is_err());
    }
}
