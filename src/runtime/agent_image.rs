//! The `molecule-agent:local` image, built by the operator itself: no registry is
//! needed. build.rs compiles src/bin/molecule-agent.rs into a static binary, which
//! is embedded here and sent with a `FROM scratch` Dockerfile as an in-memory build
//! context. The image carries a hash of its inputs as a label, so an operator
//! with a different agent rebuilds a stale image instead of reusing it.

use std::collections::HashMap;
use std::sync::LazyLock;

use bollard::query_parameters::{BuildImageOptionsBuilder, RemoveImageOptions};
use bollard::{Docker, body_full};
use futures::TryStreamExt;
use sha2::{Digest, Sha256};

use super::docker_error::{api_error, status};
use super::{RuntimeError, RuntimeResult};
use crate::model::container::{AGENT_UID, CONFIGS_DIR};

pub const AGENT_IMAGE: &str = "molecule-agent:local";
/// Image label holding `agent_version()`.
pub const VERSION_LABEL: &str = "ai.molecule.agent-version";

/// The static agent binary build.rs produced.
pub static AGENT_BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/molecule-agent"));

/// `/configs` is in the image, owned by the agent, because Docker copies a mount
/// point's ownership onto a fresh volume: that is what makes the volume root the
/// agent's on a read-only root filesystem, where the archive API cannot chown it.
fn dockerfile_base() -> String {
    format!(
        "FROM scratch\n\
         COPY --chown={AGENT_UID}:{AGENT_UID} configs {CONFIGS_DIR}\n\
         COPY molecule-agent /molecule-agent\n\
         USER {AGENT_UID}:{AGENT_UID}\n\
         ENTRYPOINT [\"/molecule-agent\"]\n"
    )
}

/// sha256 (first 16 hex chars) of the Dockerfile and the binary: what the image is made of.
pub fn agent_version() -> &'static str {
    static VERSION: LazyLock<String> = LazyLock::new(|| {
        let mut hash = Sha256::new();
        hash.update(dockerfile_base().as_bytes());
        hash.update(AGENT_BINARY);
        hex::encode(hash.finalize())[..16].to_string()
    });
    &VERSION
}

/// Builds the image as `tag` (normally `AGENT_IMAGE`) unless it is present with the
/// current version label; true when it built.
pub async fn ensure_agent_image(docker: &Docker, tag: &str) -> RuntimeResult<bool> {
    let previous = match docker.inspect_image(tag).await {
        Ok(image) => {
            let labels = image.config.and_then(|c| c.labels).unwrap_or_default();
            if labels.get(VERSION_LABEL).map(String::as_str) == Some(agent_version()) {
                return Ok(false);
            }
            tracing::info!(image = tag, found = ?labels.get(VERSION_LABEL), want = agent_version(), "agent image is stale; rebuilding");
            image.id
        }
        Err(e) if status(&e) == Some(404) => None,
        Err(e) => return Err(api_error(format!("inspecting image {tag}"), e)),
    };
    build(docker, tag, previous).await?;
    Ok(true)
}

/// Builds (or rebuilds) the image from the embedded binary, tagged `tag`.
pub async fn build_agent_image(docker: &Docker, tag: &str) -> RuntimeResult<()> {
    let previous = docker.inspect_image(tag).await.ok().and_then(|image| image.id);
    build(docker, tag, previous).await
}

/// Builds `tag` from the embedded agent.
async fn build(docker: &Docker, tag: &str, previous: Option<String>) -> RuntimeResult<()> {
    let context =
        build_context().map_err(|e| RuntimeError::Api(format!("assembling the build context of {tag}: {e}")))?;
    let started = std::time::Instant::now();
    build_from_context(docker, tag, context, &HashMap::from([(VERSION_LABEL, agent_version())]), previous).await?;
    tracing::info!(image = tag, version = agent_version(), elapsed = ?started.elapsed(), "built the agent image");
    Ok(())
}

/// Builds `tag` from an in-memory build context (a tar holding `Dockerfile`), with
/// `labels`; then removes the image it replaced (left untagged by the build) unless a
/// container still uses it. `previous` is that image's id, if `tag` existed before.
/// The operator image (`operator_image`) is built the same way.
pub async fn build_from_context(
    docker: &Docker,
    tag: &str,
    context: Vec<u8>,
    labels: &HashMap<&str, &str>,
    previous: Option<String>,
) -> RuntimeResult<()> {
    let options =
        BuildImageOptionsBuilder::new().dockerfile("Dockerfile").t(tag).rm(true).forcerm(true).labels(labels).build();
    docker
        .build_image(options, None, Some(body_full(context.into())))
        .try_for_each(|_| async { Ok(()) })
        .await
        .map_err(|e| api_error(format!("building {tag}"), e))?;

    let current = docker.inspect_image(tag).await.ok().and_then(|image| image.id);
    if let Some(replaced) = previous.filter(|old| current.as_ref() != Some(old)) {
        // Fails (and is left alone) while a container still uses it.
        if let Err(e) = docker.remove_image(&replaced, None::<RemoveImageOptions>, None).await {
            tracing::debug!(image = %replaced, error = %e, "kept the replaced image");
        }
    }
    Ok(())
}

/// Dockerfile, the binary, and an empty `configs/` directory, as a tar.
fn build_context() -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, mode: u32, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_path(path)?;
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(data.len() as u64);
        h.set_cksum();
        tar.append(&h, data)
    };
    add("Dockerfile", tar::EntryType::Regular, 0o644, dockerfile_base().as_bytes())?;
    add("molecule-agent", tar::EntryType::Regular, 0o755, AGENT_BINARY)?;
    add("configs/", tar::EntryType::Directory, 0o755, &[])?;
    tar.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_agent_is_a_static_elf() {
        assert_eq!(&AGENT_BINARY[..4], b"\x7fELF");
        assert_eq!(agent_version().len(), 16);
    }

    #[test]
    fn context_holds_dockerfile_binary_and_configs_dir() {
        let context = build_context().unwrap();
        let mut archive = tar::Archive::new(context.as_slice());
        let names: Vec<String> =
            archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().display().to_string()).collect();
        assert_eq!(names, ["Dockerfile", "molecule-agent", "configs/"]);
        assert!(dockerfile_base().contains("FROM scratch"));
    }
}
