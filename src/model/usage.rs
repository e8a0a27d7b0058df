//! What a workspace uses (CPU, memory), as the runtime reports it: an observation the
//! operator keeps in memory (never written to the store), sampled slowly off the
//! reconcile path (observe/usage.rs). This file is the pure part: the readings, how
//! two of them make a CPU rate, and how the runtimes' texts are read (cgroup v1 and v2
//! files, Docker's stats, Kubernetes quantities).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A workspace's usage, as `get -o wide`, `describe`, the page and `/metrics` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// CPU in cores (1.0 = one core busy), averaged over `windowSeconds`; null until
    /// two readings of the same container are apart (the first sample has no rate).
    #[serde(default)]
    pub cpu_cores: Option<f64>,
    /// Memory in use, in bytes (without the reclaimable page cache, as `docker stats`).
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// The span the CPU figure is averaged over.
    #[serde(default)]
    pub window_seconds: Option<f64>,
    /// When it was read.
    pub sampled_at: DateTime<Utc>,
}

/// CPU as a runtime reports it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Cpu {
    /// Nanoseconds of CPU time used since the container started (cgroups, Docker's
    /// stats): a rate needs two readings.
    Total(u64),
    /// Already a rate, in cores, over `window` seconds (Kubernetes' metrics API).
    Rate { cores: f64, window: Option<f64> },
}

/// One reading of one container.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    /// The runtime's container id (with Pods, the Pod's uid).
    pub container_id: String,
    pub cpu: Option<Cpu>,
    pub memory_bytes: Option<u64>,
    pub at: DateTime<Utc>,
}

/// The usage `now` shows, given the container's previous reading (None for the first).
/// A counter that went backwards (a restarted cgroup) gives no rate, not a negative one.
pub fn usage(previous: Option<&Reading>, now: &Reading) -> Usage {
    let (cpu_cores, window_seconds) = match now.cpu {
        Some(Cpu::Rate { cores, window }) => (Some(cores.max(0.0)), window),
        Some(Cpu::Total(total)) => match previous.and_then(|p| p.cpu.map(|c| (c, p.at))) {
            Some((Cpu::Total(before), at)) if total >= before => {
                let seconds = (now.at - at).num_microseconds().map_or(0.0, |us| us as f64 / 1e6);
                match seconds > 0.0 {
                    true => (Some((total - before) as f64 / 1e9 / seconds), Some(seconds)),
                    false => (None, None),
                }
            }
            _ => (None, None),
        },
        None => (None, None),
    };
    Usage { cpu_cores, memory_bytes: now.memory_bytes, window_seconds, sampled_at: now.at }
}

/// The value of `key` in a `key value` per line file (cgroup `cpu.stat`, `memory.stat`).
pub fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// A file holding one number (`memory.current`, `cpuacct.usage`); `max` is None.
pub fn single_value(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// cgroup v2: CPU time in ns from `cpu.stat` (`usage_usec`).
pub fn cpu_v2(cpu_stat: &str) -> Option<u64> {
    stat_value(cpu_stat, "usage_usec").map(|us| us.saturating_mul(1000))
}

/// Memory in use without the page cache that can be dropped, as `docker stats` counts
/// it: `current` (v2 `memory.current`, v1 `memory.usage_in_bytes`) less the inactive
/// file pages of `memory.stat` (v1 `total_inactive_file`, v2 `inactive_file`).
pub fn memory_in_use(current: u64, memory_stat: Option<&str>) -> u64 {
    let inactive = memory_stat
        .and_then(|s| stat_value(s, "total_inactive_file").or_else(|| stat_value(s, "inactive_file")))
        .unwrap_or(0);
    current.saturating_sub(inactive)
}

/// Where a container's cgroup is under the unified (v2) or a v1 controller's mount, from
/// the lines of `/proc/PID/cgroup`: `0::/system.slice/docker-ID.scope` (v2) or
/// `4:memory:/docker/ID` (v1, where a line names its controllers).
pub fn cgroup_path(proc_cgroup: &str, controller: Option<&str>) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let wanted = match controller {
            None => controllers.is_empty(),
            Some(c) => controllers.split(',').any(|x| x == c),
        };
        wanted.then(|| path.to_string())
    })
}

/// A Kubernetes quantity (`250m`, `1234567n`, `2`, `512Mi`, `1G`, `1e3`) as a number of
/// its unit (cores, bytes). None for what it cannot read.
pub fn quantity(text: &str) -> Option<f64> {
    super::quantity::parse(text).ok()
}

/// Seconds in a Kubernetes duration as metrics-server writes a window (`30s`, `1m0s`,
/// `15.5s`, `500ms`).
pub fn duration_seconds(text: &str) -> Option<f64> {
    let mut total = 0.0;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        let (number, tail) = rest.split_at(split);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        total += number
            * match unit {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return None,
            };
        rest = next;
    }
    Some(total)
}

/// Cores as people read them: `0.012`, `0.35`, `1.5`.
pub fn cores_text(cores: f64) -> String {
    match cores {
        c if c < 0.0005 => "0".into(),
        c if c < 0.1 => format!("{c:.3}"),
        c if c < 10.0 => format!("{c:.2}"),
        c => format!("{c:.1}"),
    }
}

/// Bytes as people read them, in powers of 1024: `812Ki`, `3.4Mi`, `1.2Gi`.
pub fn bytes_text(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["Ki", "Mi", "Gi", "Ti", "Pi"];
    if bytes < 1024 {
        return format!("{bytes}B");
    }
    let mut value = bytes as f64;
    let mut unit = "";
    for u in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = u;
    }
    match value {
        v if v < 10.0 => format!("{v:.1}{unit}"),
        v => format!("{v:.0}{unit}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_millis_opt(1_800_000_000_000 + ms).unwrap()
    }

    fn total(ns: u64, ms: i64) -> Reading {
        Reading { container_id: "c".into(), cpu: Some(Cpu::Total(ns)), memory_bytes: Some(7), at: at(ms) }
    }

    #[test]
    fn cpu_is_the_counter_s_growth_over_the_time_between_two_readings() {
        let first = usage(None, &total(5_000_000_000, 0));
        assert_eq!((first.cpu_cores, first.memory_bytes), (None, Some(7)), "one reading has no rate");
        let u = usage(Some(&total(5_000_000_000, 0)), &total(6_000_000_000, 4_000));
        assert_eq!(u.cpu_cores, Some(0.25));
        assert_eq!(u.window_seconds, Some(4.0));
        let back = usage(Some(&total(6_000_000_000, 0)), &total(1_000, 1_000));
        assert_eq!(back.cpu_cores, None, "a counter that restarted gives no rate");
        let same_time = usage(Some(&total(1, 0)), &total(2, 0));
        assert_eq!(same_time.cpu_cores, None);
    }

    #[test]
    fn a_rate_is_taken_as_it_is() {
        let r = Reading {
            container_id: "c".into(),
            cpu: Some(Cpu::Rate { cores: 0.5, window: Some(30.0) }),
            memory_bytes: None,
            at: at(0),
        };
        let u = usage(None, &r);
        assert_eq!((u.cpu_cores, u.window_seconds, u.memory_bytes), (Some(0.5), Some(30.0), None));
    }

    #[test]
    fn cgroup_v2_files() {
        let cpu_stat = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(cpu_v2(cpu_stat), Some(123_456_000));
        assert_eq!(cpu_v2("user_usec 1\n"), None);
        let memory_stat = "anon 1000\nfile 4096\nactive_file 1024\ninactive_file 3072\n";
        assert_eq!(memory_in_use(single_value("10000\n").unwrap(), Some(memory_stat)), 6928);
        assert_eq!(single_value("max\n"), None);
    }

    #[test]
    fn cgroup_v1_files() {
        assert_eq!(single_value("987654321\n"), Some(987_654_321));
        let memory_stat = "cache 8192\nrss 4096\ninactive_file 100\ntotal_cache 8192\ntotal_inactive_file 4096\n";
        // v1 has both; `total_` covers the cgroup's children too, as `docker stats` reads.
        assert_eq!(memory_in_use(12288, Some(memory_stat)), 8192);
        assert_eq!(memory_in_use(100, Some("inactive_file 200\n")), 0, "never below zero");
        assert_eq!(memory_in_use(100, None), 100);
    }

    #[test]
    fn where_a_process_s_cgroup_is() {
        let v2 = "0::/system.slice/docker-abc.scope\n";
        assert_eq!(cgroup_path(v2, None).as_deref(), Some("/system.slice/docker-abc.scope"));
        assert_eq!(cgroup_path(v2, Some("memory")), None);
        let v1 = "9:name=systemd:/docker/abc\n4:memory:/docker/abc\n2:cpu,cpuacct:/docker/abc\n0::/\n";
        assert_eq!(cgroup_path(v1, Some("memory")).as_deref(), Some("/docker/abc"));
        assert_eq!(cgroup_path(v1, Some("cpuacct")).as_deref(), Some("/docker/abc"));
        assert_eq!(cgroup_path(v1, None).as_deref(), Some("/"));
    }

    #[test]
    fn kubernetes_quantities_and_windows() {
        assert_eq!(quantity("250m"), Some(0.25));
        assert!((quantity("1234567n").unwrap() - 0.001234567).abs() < 1e-12);
        assert_eq!(quantity("2"), Some(2.0));
        assert_eq!(quantity("512Mi"), Some(536_870_912.0));
        assert_eq!(quantity("1524Ki"), Some(1_560_576.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("1e3"), Some(1000.0));
        assert_eq!(quantity("12Qi"), None);
        assert_eq!(quantity(""), None);
        assert_eq!(duration_seconds("30s"), Some(30.0));
        assert_eq!(duration_seconds("1m0s"), Some(60.0));
        assert_eq!(duration_seconds("15.5s"), Some(15.5));
        assert_eq!(duration_seconds("500ms"), Some(0.5));
        assert_eq!(duration_seconds("soon"), None);
    }

    #[test]
    fn for_people() {
        assert_eq!(cores_text(0.0001), "0");
        assert_eq!(cores_text(0.0123), "0.012");
        assert_eq!(cores_text(0.35), "0.35");
        assert_eq!(cores_text(12.34), "12.3");
        assert_eq!(bytes_text(512), "512B");
        assert_eq!(bytes_text(812 * 1024), "812Ki");
        assert_eq!(bytes_text(3_565_158), "3.4Mi");
        assert_eq!(bytes_text(1_288_490_189), "1.2Gi");
    }
}
