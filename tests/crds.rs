//! crds/ is the committed output of `molecule-operator crds`; they must not drift.

#[test]
fn committed_crds_match_the_rust_types() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/crds/molecule.ai.yaml")).unwrap();
    assert!(
        committed == molecule::api::crds_yaml(),
        "crds/molecule.ai.yaml is stale: run `cargo run -- crds > crds/molecule.ai.yaml` and commit it"
    );
}
