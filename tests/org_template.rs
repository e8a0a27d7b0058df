//! An org template in the original platform's format (examples/org-template: org.yaml
//! with `!include`, `files_dir`, prompts, `.env` and names that need mapping), brought
//! up by `up DIR` against the real Docker daemon: the workspaces, their parents, env
//! and `/configs`; a `requiredEnv` hold; bad includes refused alone; edits converge.

mod support;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::operator::*;

const UP: Duration = Duration::from_secs(120);
const CONVERGE: Duration = Duration::from_secs(60);

const NAMES: [&str; 3] = ["product-lead", "engineering-lead", "medo-builder"];

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Every regular file under /configs of a container: path -> (content, mode, uid).
fn configs(container: &str) -> BTreeMap<String, (String, u32, u64)> {
    let out = Command::new("docker").args(["cp", &format!("{container}:/configs"), "-"]).output().unwrap();
    assert!(out.status.success(), "docker cp: {}", String::from_utf8_lossy(&out.stderr));
    let mut files = BTreeMap::new();
    let mut archive = tar::Archive::new(&out.stdout[..]);
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().trim_start_matches("configs/").to_string();
        let (mode, uid) = (entry.header().mode().unwrap() & 0o7777, entry.header().uid().unwrap());
        let mut text = String::new();
        entry.read_to_string(&mut text).unwrap();
        files.insert(path, (text, mode, uid));
    }
    files
}

fn env_of(container: &str) -> BTreeMap<String, String> {
    let out = docker(&["inspect", "-f", "{{json .Config.Env}}", container]);
    let list: Vec<String> = serde_json::from_str(out.trim()).unwrap();
    list.into_iter().filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect()
}

fn cid(ws: &BTreeMap<String, Value>, name: &str) -> String {
    ws[name]["container"]["id"].as_str().unwrap().to_string()
}

fn condition<'a>(w: &'a Value, kind: &str) -> Option<&'a Value> {
    w["conditions"].as_array()?.iter().find(|c| c["type"] == kind)
}

#[test]
fn an_original_org_template_runs_unchanged() {
    if !docker_available() {
        return;
    }
    let mut op = Op::new("org-template");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/org-template"), op.dir.path());
    op.start();
    let ws = op.wait_online(&NAMES, UP);

    // The nesting is the hierarchy; the display names are kept.
    let api = |name: &str| -> Value {
        let out = op.cli(&["describe", "workspace", name, "-o", "json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let builder_env = env_of(&cid(&ws, "medo-builder"));
    assert_eq!(builder_env["PARENT_ID"], "engineering-lead");
    assert_eq!(env_of(&cid(&ws, "engineering-lead"))["PARENT_ID"], "product-lead");
    assert!(!env_of(&cid(&ws, "product-lead")).contains_key("PARENT_ID"));
    let described = serde_json::to_string(&api("medo-builder")).unwrap();
    assert!(described.contains("MeDo Builder"), "display name kept: {described}");

    // runtime, tier, model and role: spec and env, with the defaults applied.
    assert_eq!(builder_env["MODEL"], "sonnet", "claude-code from defaults, its default model");
    assert_eq!(builder_env["TIER"], "2");
    assert_eq!(builder_env["MOLECULE_AGENT_ROLE"], "Builds and releases the MeDo app.");
    assert_eq!(env_of(&cid(&ws, "engineering-lead"))["MODEL"], "anthropic:claude-sonnet-4");
    // .env files: the root's, then files_dir's, as secrets in the env.
    assert_eq!(builder_env["ANTHROPIC_API_KEY"], "demo-key-replace-me");
    assert_eq!(builder_env["BUILD_CHANNEL"], "beta");
    assert_eq!(env_of(&cid(&ws, "product-lead"))["BUILD_CHANNEL"], "stable");

    // /configs holds files_dir, the prompts and config.yaml, owned by the agent.
    let files = configs(&cid(&ws, "medo-builder"));
    for path in [".auth_token", "config.yaml", "idle.md", "skills/build/SKILL.md", "system-prompt.md"] {
        assert!(files.contains_key(path), "{path} in /configs: {:?}", files.keys().collect::<Vec<_>>());
    }
    assert!(!files.contains_key(".env") && !files.contains_key("builder/.env"), "secrets stay out of /configs");
    assert_eq!(files["system-prompt.md"].0, "You build the MeDo app on the beta channel.\n", "${{VAR}} from secrets");
    assert_eq!(files["skills/build/SKILL.md"].0, "# Build\nRun the build, then the tests; report what failed.\n");
    assert_eq!((files["config.yaml"].1, files["config.yaml"].2), (0o600, 65534));
    let config: Value = serde_saphyr::from_str(&files["config.yaml"].0).unwrap();
    assert_eq!(config["name"], "MeDo Builder");
    assert_eq!(config["runtime"], "claude-code");
    assert_eq!(config["idle_prompt"], "Anything to build? Check the release board.\n");
    assert_eq!(config["idle_interval_seconds"], 300);
    assert_eq!(config["initial_prompt"], "Read /configs/system-prompt.md, then introduce yourself to your parent.\n");
    assert_eq!(config["skills"][0], "build", "files_dir's config.yaml is the base");
    let lead = configs(&cid(&ws, "product-lead"));
    assert_eq!(
        lead["system-prompt.md"].0,
        "You lead product for MeDo. Keep the roadmap short and the teams unblocked.\n"
    );
    let log = op.logs();
    assert!(
        log.contains("not acted on by this operator: canvas, plugins, schedules"),
        "fields not acted on are listed once"
    );

    // A prompt edited: the workspace follows (updatePolicy Immediate), the others stay.
    let before: BTreeMap<&str, String> = NAMES.iter().map(|n| (*n, cid(&ws, n))).collect();
    let idle = op.dir.path().join("builder/idle.md");
    std::fs::write(&idle, "Check the release board again.\n").unwrap();
    let ws = op.wait("medo-builder recreated with the new prompt", CONVERGE, |ws| {
        ws.get("medo-builder").is_some_and(|w| online(w) && w["container"]["id"] != before["medo-builder"].as_str())
    });
    let files = configs(&cid(&ws, "medo-builder"));
    assert!(files["config.yaml"].0.contains("Check the release board again."));
    assert_eq!(cid(&ws, "product-lead"), before["product-lead"], "an unrelated workspace kept its container");

    // A node that needs a variable nobody set is held, naming it; the rest runs on.
    let eng = op.dir.path().join("teams/engineering.yaml");
    let text = std::fs::read_to_string(&eng).unwrap();
    let with_qa = text.replace(
        "children:\n",
        "children:\n  - name: QA Crew\n    required_env: [{any_of: [DEPLOY_KEY, DEPLOY_TOKEN]}]\n",
    );
    std::fs::write(&eng, &with_qa).unwrap();
    let ws = op.wait("qa-crew held", CONVERGE, |ws| {
        ws.get("qa-crew").and_then(|w| condition(w, "SecretsReady")).is_some_and(|c| c["status"] == "False")
    });
    let held = condition(&ws["qa-crew"], "SecretsReady").unwrap()["message"].as_str().unwrap().to_string();
    assert!(held.contains("DEPLOY_KEY or DEPLOY_TOKEN"), "{held}");
    assert!(ws["qa-crew"]["container"]["id"].is_null(), "held: no container");
    let root_env = op.dir.path().join(".env");
    let mut dotenv = std::fs::read_to_string(&root_env).unwrap();
    dotenv.push_str("DEPLOY_TOKEN=t0k\n");
    std::fs::write(&root_env, dotenv).unwrap();
    op.wait_online(&["qa-crew"], CONVERGE);

    // An include that escapes the root, a cycle and a nameless node: each refused
    // alone, naming the file and the node; everything else keeps running.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("evil.yaml"), "name: Evil\n").unwrap();
    let escape = format!("{}/evil.yaml", outside.path().display());
    std::fs::write(op.dir.path().join("teams/loop.yaml"), "name: Loop\nchildren:\n  - !include loop.yaml\n").unwrap();
    let broken = with_qa.replace(
        "children:\n",
        &format!(
            "children:\n  - !include ../{}\n  - !include loop.yaml\n  - role: nameless\n",
            "../".repeat(10) + escape.trim_start_matches('/')
        ),
    );
    std::fs::write(&eng, broken).unwrap();
    op.wait("errors logged", CONVERGE, |_| {
        let log = op.logs();
        log.contains("escapes the template root")
            && log.contains("the node has no name")
            && log.contains("teams/loop.yaml: `!include loop.yaml` is a cycle")
    });
    // Loop itself is fine (only what it includes under it is refused).
    let mut names: Vec<&str> = NAMES.to_vec();
    names.push("qa-crew");
    names.push("loop");
    let ws = op.wait_online(&names, CONVERGE);
    assert!(!ws.contains_key("evil"), "nothing from outside the root");
    assert_eq!(env_of(&cid(&ws, "loop"))["PARENT_ID"], "engineering-lead");

    // A typo (a file that no longer parses) keeps what was declared.
    let ids: BTreeMap<&str, String> = names.iter().map(|n| (*n, cid(&ws, n))).collect();
    std::fs::write(&eng, "name: Engineering Lead\nchildren: [\n").unwrap();
    op.wait("the parse error logged", CONVERGE, |_| op.logs().contains("keeping the"));
    let ws = op.wait_online(&names, CONVERGE);
    for n in &names {
        assert_eq!(cid(&ws, n), ids[n], "{n} kept its container through the typo");
    }

    // A node removed from the template removes its workspace.
    std::fs::write(
        &eng,
        with_qa.replace("  - name: QA Crew\n    required_env: [{any_of: [DEPLOY_KEY, DEPLOY_TOKEN]}]\n", ""),
    )
    .unwrap();
    op.wait("qa-crew removed", CONVERGE, |ws| !ws.contains_key("qa-crew"));
    op.wait("loop removed", CONVERGE, |ws| !ws.contains_key("loop"));
    wait_until("their containers gone", CONVERGE, || op.containers().len() == NAMES.len());
}

#[test]
fn convert_prints_the_equivalent_manifests() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/org-template");
    let out = Command::new(BIN).arg("convert").arg(&dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(!text.contains("demo-key-replace-me"), "secret values are never printed");
    assert!(text.contains("# secrets from .env (not printed): ANTHROPIC_API_KEY, BUILD_CHANNEL"));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    let kinds: Vec<(String, String)> = docs
        .iter()
        .map(|d| (d["kind"].as_str().unwrap().to_string(), d["metadata"]["name"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("Team".into(), "medo-studio".into()),
            ("Workspace".into(), "product-lead".into()),
            ("Workspace".into(), "engineering-lead".into()),
            ("Workspace".into(), "medo-builder".into()),
        ]
    );
    let builder = &docs[3];
    assert_eq!(builder["metadata"]["annotations"]["molecule.ai/display-name"], "MeDo Builder");
    assert_eq!(builder["spec"]["parent"], "engineering-lead");
    assert_eq!(builder["spec"]["team"], "medo-studio");
    assert!(builder["spec"]["configFiles"]["skills/build/SKILL.md"].is_string());

    // What it prints is what `apply`/`up` read as manifests: the same objects.
    let plain = tempfile::tempdir().unwrap();
    std::fs::write(plain.path().join("org.yaml.txt"), "").unwrap();
    std::fs::write(plain.path().join("all.yaml"), &text).unwrap();
    let reparsed = molecule::source::dir::DirSource::new(plain.path()).scan();
    assert!(reparsed.errors.is_empty(), "{:?}", reparsed.errors);
    assert_eq!(reparsed.objects.len(), 4);

    let missing = Command::new(BIN).arg("convert").arg(plain.path()).output().unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("holds no org.yaml"));
}

/// The directory source reads an org template beside plain manifests; a part of the
/// template that stops being readable keeps what was declared under it.
#[test]
fn a_template_beside_manifests_and_a_broken_include_keeping_its_subtree() {
    use molecule::source::{SourceObject, dir::DirSource};
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("solo.yaml"),
        "apiVersion: molecule.ai/v1alpha1\nkind: Workspace\nmetadata: {name: solo}\nspec: {}\n",
    )
    .unwrap();
    let org = dir.path().join("org");
    std::fs::create_dir_all(org.join("teams")).unwrap();
    std::fs::write(
        org.join("org.yaml"),
        "workspaces:\n  - name: Lead\n    children:\n      - !include teams/dev.yaml\n  - name: Ops\n",
    )
    .unwrap();
    std::fs::write(org.join("teams/dev.yaml"), "name: Dev Team\nchildren:\n  - {name: Dev One}\n").unwrap();
    let names = |objects: &[SourceObject]| -> Vec<String> {
        let mut n: Vec<String> = objects
            .iter()
            .map(|o| match o {
                SourceObject::Workspace { object, .. } => object.metadata.name.clone().unwrap(),
                SourceObject::Team { object, .. } => format!("team:{}", object.metadata.name.clone().unwrap()),
                SourceObject::WarmPool { object, .. } => format!("pool:{}", object.metadata.name.clone().unwrap()),
                SourceObject::Invalid { key, .. } => format!("invalid:{}", key.name),
            })
            .collect();
        n.sort();
        n
    };
    let mut source = DirSource::new(dir.path());
    let snap = source.scan();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    assert_eq!(
        names(&snap.objects),
        vec!["dev-one", "dev-team", "lead", "ops", "solo"],
        "teams/dev.yaml is an include, not a manifest"
    );

    std::fs::remove_file(org.join("teams/dev.yaml")).unwrap();
    let snap = source.scan();
    assert_eq!(
        names(&snap.objects),
        vec!["dev-one", "dev-team", "lead", "ops", "solo"],
        "kept while the include is missing"
    );
    assert_eq!(snap.errors.len(), 1, "{:?}", snap.errors);
    let error = &snap.errors[0];
    assert!(
        error.contains(
            "org.yaml: workspaces[0].children[0] (under \"Lead\"): org.yaml: `!include teams/dev.yaml`: no such file"
        ),
        "{error}"
    );
    assert!(error.ends_with("(keeping the 2 objects it declared there before until it is fixed)"), "{error}");

    std::fs::write(org.join("org.yaml"), "workspaces:\n  - name: Lead\n").unwrap();
    let snap = source.scan();
    assert!(snap.errors.is_empty(), "{:?}", snap.errors);
    assert_eq!(names(&snap.objects), vec!["lead", "solo"], "nodes removed from the template are gone");
}

/// `apply -f DIR` writes the template's objects into Postgres, but never its `.env`
/// values (it says so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_writes_the_template_into_postgres_without_its_secrets() {
    use sqlx::{Connection, Row};
    let Some(db) = support::postgres::fresh_database().await else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/org-template");
    let out =
        Command::new(BIN).arg("apply").arg("-f").arg(&dir).env("MOLECULE_DATABASE_URL", &db.url).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for line in ["team.molecule.ai/medo-studio applied", "workspace.molecule.ai/medo-builder applied"] {
        assert!(stdout.contains(line), "{line} in {stdout}");
    }
    assert!(stdout.contains(
        "note: workspace medo-builder: its .env values (ANTHROPIC_API_KEY, BUILD_CHANNEL) are not written to the database"
    ));
    let mut c = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let count = |q: &'static str| sqlx::query(q);
    let rows: i64 =
        count("SELECT count(*) FROM desired_objects WHERE kind = 'Workspace'").fetch_one(&mut c).await.unwrap().get(0);
    assert_eq!(rows, 3);
    let leaked: i64 = count("SELECT count(*) FROM desired_objects WHERE spec::text LIKE '%demo-key%'")
        .fetch_one(&mut c)
        .await
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0, "no .env value in the database");
}
