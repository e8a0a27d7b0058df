//! The operator's own image, `molecule-operator:<version>` (`molecule-operator image`),
//! built as the agent image is: a static binary in a `FROM scratch` image, sent to
//! Docker as an in-memory build context, no registry and no base image.
//!
//! Which binary: `--binary PATH`; else the running executable when it is static (a
//! release built with the recipe below packages itself); else, run from the source
//! tree, cargo builds one with that recipe (a few minutes the first time). A binary
//! that needs a dynamic loader is refused: `FROM scratch` has none, and the container
//! would fail with a bare "no such file or directory".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bollard::Docker;

use super::agent_image::build_from_context;
use super::{RuntimeError, RuntimeResult};

/// The uid and gid the operator runs as in its image (deploy/'s runAsUser).
pub const OPERATOR_UID: u32 = 65532;
/// Image label holding the operator's version.
pub const VERSION_LABEL: &str = "ai.molecule.operator-version";
/// The target of the static build.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// `molecule-operator:<version>`, the tag deploy/deployment.yaml names.
pub fn default_tag() -> String {
    format!("molecule-operator:{}", env!("CARGO_PKG_VERSION"))
}

/// The cargo command of the static build, as `--help` and errors show it.
pub fn static_build_recipe() -> String {
    format!(
        "RUSTFLAGS='-C target-feature=+crt-static' CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release \
         --target {STATIC_TARGET} --bin molecule-operator"
    )
}

fn dockerfile() -> String {
    format!(
        "FROM scratch\n\
         COPY molecule-operator /molecule-operator\n\
         USER {OPERATOR_UID}:{OPERATOR_UID}\n\
         ENTRYPOINT [\"/molecule-operator\"]\n"
    )
}

/// Whether `bytes` are an ELF executable that runs without a dynamic loader: an
/// x86-64 ELF with no `PT_INTERP` program header (static, or static-pie). Err says
/// what it is instead.
pub fn check_static(bytes: &[u8]) -> Result<(), String> {
    const PT_INTERP: u32 = 3;
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |at: usize| bytes.get(at..at + 4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let u64_at = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    if bytes.get(..4) != Some(b"\x7fELF") {
        return Err("not an ELF executable".into());
    }
    // 64-bit, little-endian, x86-64.
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) || u16_at(18) != Some(62) {
        return Err("not an x86-64 ELF executable".into());
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return Err("a truncated ELF header".into());
    };
    for i in 0..usize::from(phnum) {
        let at = usize::try_from(phoff).unwrap_or(usize::MAX).saturating_add(i * usize::from(phentsize));
        match u32_at(at) {
            Some(PT_INTERP) => {
                return Err(
                    "dynamically linked: it needs a loader and shared libraries, which FROM scratch has not".into()
                );
            }
            Some(_) => {}
            None => return Err("a truncated ELF program header table".into()),
        }
    }
    Ok(())
}

/// Dockerfile and the binary, as a tar.
pub fn build_context(binary: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let dockerfile = dockerfile();
    for (path, mode, data) in [("Dockerfile", 0o644, dockerfile.as_bytes()), ("molecule-operator", 0o755, binary)] {
        let mut h = tar::Header::new_gnu();
        h.set_path(path)?;
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append(&h, data)?;
    }
    tar.into_inner()
}

/// The static binary to package: `explicit`, else the running executable if static,
/// else one cargo builds in `source_tree` (when it is this project's). Says which.
pub fn find_binary(explicit: Option<&Path>, source_tree: &Path) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Ok(exe) = std::env::current_exe()
        && std::fs::read(&exe).is_ok_and(|b| check_static(&b).is_ok())
    {
        return Ok(exe);
    }
    let manifest = source_tree.join("Cargo.toml");
    let ours = std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("name = \"molecule-operator\""));
    if !ours {
        return Err(format!(
            "this molecule-operator binary is dynamically linked and {} is not its source tree: pass --binary PATH \
             (a static build: {}), or run `image` from the source tree",
            source_tree.display(),
            static_build_recipe()
        ));
    }
    eprintln!("building a static molecule-operator: {}", static_build_recipe());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(source_tree)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        // The release profile keeps line tables: 226 MB, against 52 MB without them.
        .env("CARGO_PROFILE_RELEASE_STRIP", "debuginfo")
        .args(["build", "--release", "--target", STATIC_TARGET, "--bin", "molecule-operator"])
        .status()
        .map_err(|e| format!("cannot run cargo in {}: {e}", source_tree.display()))?;
    if !status.success() {
        return Err(format!("the static build failed ({status}): {}", static_build_recipe()));
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| source_tree.join("target"), PathBuf::from);
    Ok(target.join(STATIC_TARGET).join("release").join("molecule-operator"))
}

/// The binary at `path`, if it can run in a FROM scratch image; else why not.
pub fn read_static(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_static(&bytes).map_err(|why| {
        format!(
            "{} cannot run in a FROM scratch image: {why}; build a static one: {}",
            path.display(),
            static_build_recipe()
        )
    })?;
    Ok(bytes)
}

/// Builds `tag` from a static binary (see [`read_static`]).
pub async fn build(docker: &Docker, tag: &str, binary: &[u8]) -> RuntimeResult<()> {
    let context =
        build_context(binary).map_err(|e| RuntimeError::Api(format!("assembling the build context of {tag}: {e}")))?;
    let previous = docker.inspect_image(tag).await.ok().and_then(|image| image.id);
    let labels = HashMap::from([(VERSION_LABEL, env!("CARGO_PKG_VERSION"))]);
    build_from_context(docker, tag, context, &labels, previous).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::agent_image::AGENT_BINARY;

    #[test]
    fn the_static_agent_passes_and_a_dynamic_executable_is_named_as_such() {
        assert_eq!(check_static(AGENT_BINARY), Ok(()));
        // The test binary itself is linked dynamically (a plain cargo build).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(check_static(&me).unwrap_err().contains("dynamically linked"));
        assert_eq!(check_static(b"#!/bin/sh\n").unwrap_err(), "not an ELF executable");
        assert!(check_static(&AGENT_BINARY[..40]).is_err(), "truncated");
    }

    #[test]
    fn the_context_is_a_scratch_dockerfile_and_the_binary() {
        let context = build_context(b"\x7fELFbinary").unwrap();
        let mut archive = tar::Archive::new(context.as_slice());
        let mut files = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
            files.push((entry.path().unwrap().display().to_string(), entry.header().mode().unwrap(), text));
        }
        assert_eq!(files[0].0, "Dockerfile");
        assert!(files[0].2.starts_with("FROM scratch\n") && files[0].2.contains("USER 65532:65532"));
        assert_eq!(
            (files[1].0.as_str(), files[1].1, files[1].2.as_str()),
            ("molecule-operator", 0o755, "\x7fELFbinary")
        );
        assert_eq!(default_tag(), format!("molecule-operator:{}", env!("CARGO_PKG_VERSION")));
    }
}
