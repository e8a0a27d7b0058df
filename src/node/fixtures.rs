//! YAML fixtures for the pure parts (`src/node/fixtures/*.<what>.yaml`): each file
//! has `in` (what the function reads) and `out` (what it must produce), so a
//! change shows as a readable diff. `UPDATE_FIXTURES=1` rewrites every `out` (the
//! comments and `in` are kept): review the diff before committing it.

use std::path::Path;

use serde_json::Value;

/// Runs `compute` on the `in` of every `*.<what>.yaml` fixture and compares with its `out`.
pub fn check(what: &str, compute: impl Fn(&Value) -> Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/node/fixtures");
    let suffix = format!(".{what}.yaml");
    let mut seen = 0;
    let mut entries: Vec<_> =
        std::fs::read_dir(&dir).expect("the fixtures directory").flatten().map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap_or_default().to_string_lossy().to_string();
        if !name.ends_with(&suffix) {
            continue;
        }
        seen += 1;
        let text = std::fs::read_to_string(&path).expect("a readable fixture");
        let fixture: Value = serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let got = compute(&fixture["in"]);
        let rendered = serde_saphyr::to_string(&got).expect("YAML");
        if std::env::var("UPDATE_FIXTURES").is_ok() {
            let head = text.split("\nout:").next().unwrap_or(&text).trim_end();
            let body: String = rendered.lines().map(|l| format!("  {l}\n")).collect();
            std::fs::write(&path, format!("{head}\nout:\n{body}")).expect("the fixture is written");
            continue;
        }
        assert!(
            fixture["out"] == got,
            "{name}: the result differs from the fixture (UPDATE_FIXTURES=1 rewrites it)\n--- fixture\n{}\n--- computed\n{rendered}",
            serde_saphyr::to_string(&fixture["out"]).unwrap_or_default(),
        );
    }
    assert!(seen >= 2, "the {what} fixtures are found in {}", dir.display());
}
