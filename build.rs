//! Compiles the std-only agent (src/bin/molecule-agent.rs) into a static binary in
//! OUT_DIR, so the operator can embed it and build the `FROM scratch` agent image
//! itself (src/runtime/agent_image.rs). Plain rustc, no cargo: the agent has no deps.

use std::path::PathBuf;
use std::process::Command;
use std::{env, fs};

const AGENT_SRC: &str = "src/bin/molecule-agent.rs";
const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    println!("cargo:rerun-if-changed={AGENT_SRC}");
    println!("cargo:rerun-if-changed=build.rs");
    // The migrations are embedded by `sqlx::migrate!`: a new file must rebuild the crate.
    println!("cargo:rerun-if-changed=migrations");

    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"));
    let out = out_dir.join("molecule-agent");
    let output = Command::new(&rustc)
        .args(["--edition", "2024", "--crate-type", "bin", "--crate-name", "molecule_agent"])
        .args(["-C", "opt-level=s", "-C", "target-feature=+crt-static", "-C", "panic=abort", "-C", "strip=symbols"])
        .args(["--target", AGENT_TARGET])
        .arg("-o")
        .arg(&out)
        .arg(AGENT_SRC)
        .output();
    let output = match output {
        Ok(o) => o,
        Err(e) => fail(&format!("cannot run {rustc}: {e}")),
    };
    if !output.status.success() {
        fail(&format!(
            "{rustc} failed ({}):\n{}\nThe agent is built as a static binary for {AGENT_TARGET}: the target's std \
             (`rustup target add {AGENT_TARGET}`) and glibc's static libraries (libc6-dev) must be installed.",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    match fs::metadata(&out) {
        Ok(m) if m.len() > 0 => {}
        _ => fail(&format!("{rustc} reported success but wrote no {}", out.display())),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("error: building the molecule-agent binary for the agent image: {message}");
    std::process::exit(1);
}
