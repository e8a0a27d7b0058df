//! `molecule-operator open`: asks the operator for a one-time login
//! (`POST /api/v1/logins`, registry/login.rs) and opens the fleet page with it in the
//! browser: the commands in `$BROWSER` (`:`-separated; `%s` in one stands for the URL,
//! else the URL is its last argument), then `xdg-open` (`open` on macOS). With
//! `--no-browser`, or when none of them opens it, the URL is printed instead.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a launcher may take to say it failed; one still running then is taken to
/// be the browser itself, which stays open.
const LAUNCH_WAIT: Duration = Duration::from_secs(3);

/// The commands tried, in order, each as its words, `%s` for the URL.
pub fn launchers(browser_env: Option<&str>) -> Vec<Vec<String>> {
    let mut out: Vec<Vec<String>> = browser_env
        .unwrap_or_default()
        .split(':')
        .map(|c| c.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|words| !words.is_empty())
        .collect();
    let system = if cfg!(target_os = "macos") { "open" } else { "xdg-open" };
    out.push(vec![system.to_string()]);
    out
}

/// The command line of `launcher` for `url`.
fn command_line(launcher: &[String], url: &str) -> Vec<String> {
    let mut words: Vec<String> = launcher.iter().map(|w| w.replace("%s", url)).collect();
    if !launcher.iter().any(|w| w.contains("%s")) {
        words.push(url.to_string());
    }
    words
}

/// Opens `url` with the first launcher that works; returns its program name, or why none did.
pub fn open(url: &str, launchers: &[Vec<String>]) -> Result<String, String> {
    let mut failures = Vec::new();
    for launcher in launchers {
        let words = command_line(launcher, url);
        let Some((program, args)) = words.split_first() else { continue };
        let child =
            Command::new(program).args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn();
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{}: {e}", launcher[0]));
                continue;
            }
        };
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(launcher[0].clone()),
                Ok(Some(status)) => {
                    failures.push(format!("{}: {status}", launcher[0]));
                    break;
                }
                Ok(None) if t0.elapsed() >= LAUNCH_WAIT => return Ok(launcher[0].clone()),
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => {
                    failures.push(format!("{}: {e}", launcher[0]));
                    break;
                }
            }
        }
    }
    Err(failures.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_env_comes_first_then_the_system_opener() {
        let l = launchers(Some("firefox --new-tab:chromium %s"));
        assert_eq!(l[0], ["firefox", "--new-tab"]);
        assert_eq!(l[1], ["chromium", "%s"]);
        assert_eq!(l.len(), 3);
        assert_eq!(launchers(None).len(), 1);
        assert_eq!(launchers(Some("")).len(), 1);
        assert_eq!(command_line(&l[0], "http://x/login?code=a"), ["firefox", "--new-tab", "http://x/login?code=a"]);
        assert_eq!(command_line(&l[1], "http://x/"), ["chromium", "http://x/"]);
    }

    #[test]
    fn a_failing_or_missing_launcher_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let seen = dir.path().join("seen");
        let script = dir.path().join("browser");
        std::fs::write(&script, format!("#!/bin/sh\necho \"$1\" > '{}'\n", seen.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let launchers = vec![
            vec!["/nonexistent/browser".to_string()],
            vec!["false".to_string()],
            vec![script.display().to_string()],
        ];
        let used = open("http://127.0.0.1:1/login?code=x", &launchers).unwrap();
        assert_eq!(used, script.display().to_string());
        assert_eq!(std::fs::read_to_string(&seen).unwrap().trim(), "http://127.0.0.1:1/login?code=x");
        let e = open("u", &launchers[..2]).unwrap_err();
        assert!(e.contains("/nonexistent/browser") && e.contains("false"), "{e}");
    }
}
