//! Shared by the benchmarks (`benches/*.rs`, harness = false): arguments, a
//! throwaway PostgreSQL 15, latency statistics, the machine description and the
//! markdown each bench writes to `bench/results/`.
#![allow(dead_code)]

pub mod pg;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

/// Command-line arguments every bench takes (cargo bench adds `--bench`, ignored).
#[derive(Clone, Debug)]
pub struct Args {
    /// Smaller data and shorter runs: a check that the bench works, not the numbers.
    pub quick: bool,
    /// Where the markdown section goes.
    pub out: PathBuf,
    /// The command line that reproduces this run, for the report.
    pub command: String,
    /// Anything else (`--key value` pairs and flags), for the bench to read.
    pub rest: Vec<String>,
}

impl Args {
    pub fn parse(default_out: &str, script: &str) -> Self {
        let mut quick = false;
        let mut out = PathBuf::from(default_out);
        let mut rest = Vec::new();
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--bench" => {}
                "--quick" => quick = true,
                "--out" => out = PathBuf::from(it.next().expect("--out needs a path")),
                _ => rest.push(arg),
            }
        }
        let mut command = script.to_string();
        if quick {
            command.push_str(" --quick");
        }
        for r in &rest {
            command.push(' ');
            command.push_str(r);
        }
        Self { quick, out, command, rest }
    }

    /// The value after `--name`, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        let flag = format!("--{name}");
        self.rest.iter().position(|a| *a == flag).and_then(|i| self.rest.get(i + 1)).map(String::as_str)
    }

    pub fn flag(&self, name: &str) -> bool {
        let flag = format!("--{name}");
        self.rest.contains(&flag)
    }
}

/// p50/p99/max/mean of a set of latencies.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub n: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl Stats {
    pub fn of(samples: &mut [Duration]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        samples.sort_unstable();
        let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
        let total: Duration = samples.iter().sum();
        Self {
            n: samples.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: samples[samples.len() - 1],
            mean: total / samples.len() as u32,
        }
    }
}

/// Milliseconds with three decimals (microsecond resolution).
pub fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// The machine, as one markdown paragraph.
pub fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let debian = read("/etc/debian_version").trim().to_string();
    let load = read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!(
        "{cores} cores ({cpu}), {:.0} GiB RAM, Debian {debian}, Linux {kernel}, release build (cargo bench profile); \
         load average at the start {load} (the machine is shared with other builds)",
        mem_kib as f64 / 1024.0 / 1024.0
    )
}

/// Markdown being assembled.
#[derive(Default)]
pub struct Report(pub String);

impl Report {
    pub fn line(&mut self, s: impl AsRef<str>) {
        self.0.push_str(s.as_ref());
        self.0.push('\n');
    }

    pub fn table(&mut self, header: &[&str], rows: &[Vec<String>]) {
        let _ = writeln!(self.0, "| {} |", header.join(" | "));
        let _ = writeln!(self.0, "|{}", header.iter().map(|_| "---|").collect::<String>());
        for row in rows {
            let _ = writeln!(self.0, "| {} |", row.join(" | "));
        }
        self.0.push('\n');
    }

    pub fn code(&mut self, lang: &str, body: &str) {
        let _ = writeln!(self.0, "```{lang}\n{}\n```\n", body.trim_end());
    }

    pub fn write(&self, args: &Args) {
        if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).expect("create the results directory");
        }
        std::fs::write(&args.out, &self.0).expect("write the results");
        eprintln!("wrote {}", args.out.display());
    }
}

/// Where the bench keeps its SQLite files: a directory on the disk the state file
/// would live on in local mode (not tmpfs), removed when dropped.
pub fn scratch_dir(args: &Args, prefix: &str) -> tempfile::TempDir {
    let base = args.value("scratch").map(PathBuf::from).unwrap_or_else(|| {
        let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| "target".into());
        target.join("bench-scratch")
    });
    std::fs::create_dir_all(&base).expect("create the scratch directory");
    tempfile::Builder::new().prefix(prefix).tempdir_in(base).expect("a scratch directory")
}
