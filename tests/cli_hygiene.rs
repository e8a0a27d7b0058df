//! The command line does not quietly do something else, or show what it should not:
//! - `--database-url` with an unknown scheme is an error naming the accepted forms,
//!   for every command that takes one, and creates nothing;
//! - a database URL shown in an error has its password hidden;
//! - `secret set --value` warns that the value is in the process list, and `--help`
//!   points at standard input and `--from-file`.
//!
//! No Docker or Postgres needed: every case fails before either would be reached.

mod support;

use std::process::{Command, Output};

use support::operator::{BIN, free_port};

fn run(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(BIN).args(args).current_dir(dir).env_remove("MOLECULE_DATABASE_URL").output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The files in `dir`, recursively, relative to it.
fn files(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            }
            out.push(e.path().strip_prefix(dir).unwrap().display().to_string());
        }
    }
    out.sort();
    out
}

#[test]
fn an_unknown_database_url_scheme_is_an_error_naming_the_accepted_forms_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("org")).unwrap();
    let typo = "postgress://molecule:hunter2@127.0.0.1:5432/molecule";
    let state = dir.path().join("state").display().to_string();
    for args in [
        vec!["migrate", "--database-url", typo],
        vec!["up", "org", "--state", &state, "--database-url", typo],
        vec!["apply", "-f", "org", "--database-url", typo],
    ] {
        let before = files(dir.path());
        let out = run(dir.path(), &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
        assert!(
            err.contains("unknown scheme \"postgress\"")
                && err.contains("postgres://")
                && err.contains("sqlite://PATH"),
            "{args:?}: {err}"
        );
        assert!(!err.contains("hunter2"), "{args:?} showed the password: {err}");
        let made: Vec<_> = files(dir.path()).into_iter().filter(|f| !before.contains(f) && f != "state").collect();
        assert!(made.is_empty(), "{args:?} created {made:?}");
    }
}

#[test]
fn sqlite_urls_and_plain_paths_are_migrated_and_named() {
    let dir = tempfile::tempdir().unwrap();
    for (url, file) in [("sqlite://a.db", "a.db"), ("b.db", "b.db")] {
        let out = run(dir.path(), &["migrate", "--database-url", url]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("migrations applied to {file}"));
        assert!(dir.path().join(file).is_file());
    }
}

#[test]
fn a_database_url_in_an_error_has_its_password_hidden() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("org")).unwrap();
    // Nothing listens there: opening the store fails, and says where it tried.
    let url = format!("postgres://molecule:hunter2@127.0.0.1:{}/molecule", free_port());
    let state = dir.path().join("state").display().to_string();
    for args in [vec!["migrate", "--database-url", &url], vec!["up", "org", "--state", &state, "--database-url", &url]]
    {
        let out = run(dir.path(), &args);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains("postgres://molecule:***@127.0.0.1:"), "{args:?}: {err}");
        assert!(!err.contains("hunter2"), "{args:?} showed the password: {err}");
    }
}

#[test]
fn a_secret_on_the_command_line_is_warned_against_and_help_prefers_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let server = format!("http://127.0.0.1:{}", free_port());
    let state = dir.path().display().to_string();
    let out = run(dir.path(), &["secret", "set", "API_KEY", "--value", "sk-1", "--server", &server, "--state", &state]);
    assert!(!out.status.success(), "no operator runs there");
    let err = stderr(&out);
    assert!(err.contains("warning: --value puts the secret in the process list"), "{err}");
    assert!(!err.contains("sk-1"), "{err}");

    let help = run(dir.path(), &["secret", "set", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("read from standard input") && help.contains("--from-file FILE"), "{help}");
    assert!(help.contains("Avoid: the value on the command line is visible"), "{help}");
}
