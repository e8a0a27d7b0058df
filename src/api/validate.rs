//! Pure validation: names (Kubernetes DNS-1123 labels) and the checks that need the
//! whole declared set (parents exist and form no cycle, referenced teams exist).
//! Every message names the problem and what to write instead.

use std::collections::{BTreeMap, BTreeSet};

use super::ObjectKey;

/// Kubernetes' limit for a DNS-1123 label.
pub const MAX_NAME_LEN: usize = 63;

/// Checks a name against Kubernetes' DNS-1123 label rules: lowercase letters, digits
/// and '-', starting and ending with a letter or digit, at most 63 characters.
/// The message suggests a valid spelling when there is one.
pub fn dns1123_label(name: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("it is empty".to_string())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!("it is {} characters long; use at most {MAX_NAME_LEN}", name.len()))
    } else if name.chars().any(|c| c.is_ascii_uppercase()) {
        Some("it has uppercase letters; use lowercase".to_string())
    } else if let Some(bad) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        Some(format!("it contains {bad:?}; use only lowercase letters, digits and '-'"))
    } else if name.starts_with('-') || name.ends_with('-') {
        Some("it must start and end with a letter or digit".to_string())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => {
            let hint = suggest_label(name).map(|s| format!(" (e.g. `{s}`)")).unwrap_or_default();
            Err(format!("`{name}` is not a valid name: {p}{hint}"))
        }
    }
}

/// Checks a DNS-1123 subdomain (what Secret names are): dot-separated labels, at most
/// 253 characters.
pub fn dns_subdomain(name: &str) -> Result<(), String> {
    if name.len() > 253 {
        return Err(format!("`{name}` is not a valid name: it is {} characters long; use at most 253", name.len()));
    }
    name.split('.').try_for_each(|label| {
        dns1123_label(label).map_err(|_| {
            format!("`{name}` is not a valid name: use lowercase letters, digits, '-' and '.', starting and ending with a letter or digit")
        })
    })
}

/// A DNS-1123 label close to `name`, if one can be made from it.
fn suggest_label(name: &str) -> Option<String> {
    let mapped: String = name
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' })
        .collect();
    let mut s: String = mapped.trim_matches('-').chars().take(MAX_NAME_LEN).collect();
    while s.ends_with('-') {
        s.pop();
    }
    (!s.is_empty() && s != name).then_some(s)
}

/// The Workspace name a Team's inline member gets: `<team>-<member>`, which must
/// itself be a valid name.
pub fn member_name(team: &str, member: &str) -> Result<String, String> {
    let name = format!("{team}-{member}");
    if member.is_empty() {
        return Err(format!("team {team}: an inline member has an empty `name`; give it a short name like `dev`"));
    }
    dns1123_label(&name)
        .map(|()| name.clone())
        .map_err(|e| format!("team {team} member `{member}`: the generated workspace name {e}"))
}

/// What the set-level checks need to know about one declared workspace.
#[derive(Clone, Debug)]
pub struct Declared<'a> {
    pub key: &'a ObjectKey,
    /// `spec.parent` after team defaults are applied.
    pub parent: Option<&'a str>,
    /// `spec.team` after team defaults are applied.
    pub team: Option<&'a str>,
}

/// Checks that need the whole set: each parent exists in the same namespace and
/// parent links form no cycle; each referenced team is declared. Returns the
/// problems per workspace (workspaces without problems are absent).
pub fn set_errors(workspaces: &[Declared<'_>], teams: &BTreeSet<ObjectKey>) -> BTreeMap<ObjectKey, Vec<String>> {
    let mut errors: BTreeMap<ObjectKey, Vec<String>> = BTreeMap::new();
    let parents: BTreeMap<&ObjectKey, Option<&str>> = workspaces.iter().map(|w| (w.key, w.parent)).collect();

    for w in workspaces {
        if let Some(team) = w.team
            && !teams.contains(&ObjectKey::new(&w.key.namespace, team))
        {
            errors.entry(w.key.clone()).or_default().push(format!(
                "spec.team: team {team} is not declared in namespace {}; declare a Team named {team} or remove spec.team",
                w.key.namespace
            ));
        }
        if let Some(parent) = w.parent
            && !parents.contains_key(&ObjectKey::new(&w.key.namespace, parent))
        {
            errors.entry(w.key.clone()).or_default().push(format!(
                "spec.parent: workspace {parent} is not declared in namespace {}; name an existing workspace or remove spec.parent",
                w.key.namespace
            ));
        }
    }

    // Follow each workspace's parent chain; a chain that comes back to where it
    // started is a cycle, reported on every member as seen from that member.
    for w in workspaces {
        let mut path = vec![w.key.name.as_str()];
        let mut seen = BTreeSet::from([w.key.name.as_str()]);
        let mut current = w.parent;
        while let Some(parent) = current {
            let parent_key = ObjectKey::new(&w.key.namespace, parent);
            let Some((&known, &next)) = parents.get_key_value(&parent_key) else { break };
            path.push(known.name.as_str());
            if known == w.key {
                errors.entry(w.key.clone()).or_default().push(format!(
                    "spec.parent: parent cycle: {}; break it by removing one parent link",
                    path.join(" -> ")
                ));
                break;
            }
            if !seen.insert(known.name.as_str()) {
                break; // a cycle further up that does not include `w`: reported on its members
            }
            current = next;
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_names_are_dns_subdomains() {
        for ok in ["openai", "team.keys", "a-1.b-2"] {
            assert_eq!(dns_subdomain(ok), Ok(()), "{ok}");
        }
        for bad in ["", "Keys", "a..b", ".a", "a_b", &"a".repeat(254)] {
            assert!(dns_subdomain(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dns1123_accepts_valid_and_explains_invalid() {
        for ok in ["a", "dev-lead", "pm", "a1", "1a", &"x".repeat(63)] {
            assert_eq!(dns1123_label(ok), Ok(()), "{ok}");
        }
        let e = dns1123_label("Dev_Lead").unwrap_err();
        assert!(e.contains("uppercase") && e.contains("`dev-lead`"), "{e}");
        let e = dns1123_label("dev_lead").unwrap_err();
        assert!(e.contains("'_'") && e.contains("`dev-lead`"), "{e}");
        let e = dns1123_label("-dev").unwrap_err();
        assert!(e.contains("start and end"), "{e}");
        let e = dns1123_label(&"x".repeat(64)).unwrap_err();
        assert!(e.contains("64 characters") && e.contains("63"), "{e}");
        assert!(dns1123_label("").unwrap_err().contains("empty"));
    }

    #[test]
    fn member_names_are_team_dash_member_and_must_be_valid() {
        assert_eq!(member_name("eng", "dev").unwrap(), "eng-dev");
        let e = member_name("eng", "Dev").unwrap_err();
        assert!(e.contains("team eng member `Dev`") && e.contains("`eng-Dev`"), "{e}");
        let e = member_name(&"t".repeat(40), &"m".repeat(30)).unwrap_err();
        assert!(e.contains("71 characters"), "{e}");
    }

    fn k(name: &str) -> ObjectKey {
        ObjectKey::new("default", name)
    }

    #[test]
    fn missing_parent_and_team_are_reported() {
        let (a, b) = (k("a"), k("b"));
        let ws = [
            Declared { key: &a, parent: Some("nobody"), team: Some("ghosts") },
            Declared { key: &b, parent: Some("a"), team: Some("eng") },
        ];
        let teams = BTreeSet::from([k("eng")]);
        let errs = set_errors(&ws, &teams);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let a_errs = &errs[&a];
        assert!(a_errs.iter().any(|e| e.contains("team ghosts is not declared")), "{a_errs:?}");
        assert!(a_errs.iter().any(|e| e.contains("workspace nobody is not declared")), "{a_errs:?}");
    }

    #[test]
    fn parent_in_another_namespace_does_not_count() {
        let (a, b) = (ObjectKey::new("ns1", "a"), ObjectKey::new("ns2", "b"));
        let ws = [Declared { key: &a, parent: None, team: None }, Declared { key: &b, parent: Some("a"), team: None }];
        assert!(set_errors(&ws, &BTreeSet::new())[&b][0].contains("not declared in namespace ns2"));
    }

    #[test]
    fn cycles_are_reported_on_each_member_with_the_path() {
        let (a, b, c, d, s) = (k("a"), k("b"), k("c"), k("d"), k("s"));
        let ws = [
            Declared { key: &a, parent: Some("b"), team: None },
            Declared { key: &b, parent: Some("a"), team: None },
            Declared { key: &c, parent: Some("a"), team: None }, // leads into the cycle, not in it
            Declared { key: &d, parent: None, team: None },
            Declared { key: &s, parent: Some("s"), team: None },
        ];
        let errs = set_errors(&ws, &BTreeSet::new());
        assert!(errs[&a][0].contains("parent cycle: a -> b -> a"), "{errs:?}");
        assert!(errs[&b][0].contains("parent cycle: b -> a -> b"), "{errs:?}");
        assert!(errs[&s][0].contains("parent cycle: s -> s"), "{errs:?}");
        assert!(!errs.contains_key(&c) && !errs.contains_key(&d), "{errs:?}");
    }
}
