//! `molecule-operator image` builds a `FROM scratch` image from a static binary, and a
//! container of it runs. A release static build of the operator takes minutes, so the
//! test packages a small static binary this build already has, the embedded agent
//! (which answers `--version` too): what is checked is the command, the context and
//! that a static binary runs in a scratch image. `image` refuses a dynamic binary.

mod support;

use std::process::Command;

use molecule::runtime::agent_image::AGENT_BINARY;
use support::docker::TestDocker;

const OPERATOR: &str = env!("CARGO_BIN_EXE_molecule-operator");

#[tokio::test]
async fn image_packages_a_static_binary_that_answers_in_a_scratch_container() {
    let Some(d) = TestDocker::connect("operator-image").await else { return };
    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("static-binary");
    std::fs::write(&binary, AGENT_BINARY).unwrap();
    let tag = format!("molecule-operator-test:{}", d.instance);
    d.track_image(&tag);

    let out = Command::new(OPERATOR).args(["image", "--tag", &tag, "--binary"]).arg(&binary).output().unwrap();
    assert!(out.status.success(), "image failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("built {tag}")));

    let run = Command::new("docker").args(["run", "--rm", &tag, "--version"]).output().unwrap();
    assert!(run.status.success(), "docker run failed: {}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(String::from_utf8_lossy(&run.stdout).trim(), format!("molecule-agent {}", env!("CARGO_PKG_VERSION")));

    let user = Command::new("docker").args(["image", "inspect", "-f", "{{.Config.User}}", &tag]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&user.stdout).trim(), "65532:65532", "non-root, as deploy/ runs it");
}

#[test]
fn image_refuses_a_dynamically_linked_binary_and_says_how_to_build_a_static_one() {
    // The operator of this test build is linked dynamically.
    let out = Command::new(OPERATOR)
        .args(["image", "--tag", "molecule-operator-test:never", "--binary", OPERATOR])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dynamically linked") && err.contains("+crt-static"), "{err}");
}

#[test]
fn help_says_where_the_binary_comes_from() {
    let out = Command::new(OPERATOR).args(["image", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--binary") && help.contains("source tree") && help.contains("crt-static"), "{help}");
}
