//! who may talk to whom: the original platform's `CanCommunicate`. A caller may
//! discover (and message) a target when they are the same workspace, siblings (the
//! same parent), both roots, parent and child, or when one is an ancestor of the
//! other's parent. Walks up the tree stop after [`MAX_DEPTH`] steps, so a cycle in
//! declared parents cannot hang the check.
//!
//! Workspaces are named by key (`namespace/name`); a parent is declared by name in the
//! same namespace. One difference from the original, which had one flat org:
//! workspaces of different namespaces never see each other.

/// Steps walked up the parent chain at most.
pub const MAX_DEPTH: usize = 32;

/// Whether `caller` may talk to `target`; `parent_of` gives a workspace's parent key.
pub fn can_communicate(caller: &str, target: &str, parent_of: &dyn Fn(&str) -> Option<String>) -> bool {
    if caller == target {
        return true;
    }
    if namespace(caller) != namespace(target) {
        return false;
    }
    let (pc, pt) = (parent_of(caller), parent_of(target));
    match (&pc, &pt) {
        (None, None) => return true,
        (Some(a), Some(b)) if a == b => return true,
        _ => {}
    }
    if pc.as_deref() == Some(target) || pt.as_deref() == Some(caller) {
        return true;
    }
    let ancestor = |of: &Option<String>, who: &str| of.as_deref().is_some_and(|p| is_ancestor(who, p, parent_of));
    ancestor(&pt, caller) || ancestor(&pc, target)
}

/// Whether `who` is `of` or one of its ancestors, within [`MAX_DEPTH`] steps up.
fn is_ancestor(who: &str, of: &str, parent_of: &dyn Fn(&str) -> Option<String>) -> bool {
    let mut at = of.to_string();
    for _ in 0..MAX_DEPTH {
        if at == who {
            return true;
        }
        match parent_of(&at) {
            Some(p) => at = p,
            None => return false,
        }
    }
    false
}

fn namespace(key: &str) -> &str {
    key.split_once('/').map(|(ns, _)| ns).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// ceo → {pm, cto}; pm → {dev, qa}; dev → {intern}; and a root `solo`.
    fn org() -> HashMap<String, String> {
        [("pm", "ceo"), ("cto", "ceo"), ("dev", "pm"), ("qa", "pm"), ("intern", "dev")]
            .into_iter()
            .map(|(c, p)| (format!("o/{c}"), format!("o/{p}")))
            .collect()
    }

    fn can(tree: &HashMap<String, String>, a: &str, b: &str) -> bool {
        can_communicate(&format!("o/{a}"), &format!("o/{b}"), &|k| tree.get(k).cloned())
    }

    #[test]
    fn same_siblings_roots_and_parent_child() {
        let t = org();
        assert!(can(&t, "dev", "dev"));
        assert!(can(&t, "dev", "qa") && can(&t, "pm", "cto"));
        assert!(can(&t, "ceo", "solo"));
        assert!(can(&t, "pm", "dev") && can(&t, "dev", "pm"));
    }

    #[test]
    fn an_ancestor_of_the_others_parent() {
        let t = org();
        assert!(can(&t, "ceo", "dev"), "ceo is the parent of dev's parent");
        assert!(can(&t, "dev", "ceo"));
        assert!(can(&t, "ceo", "intern") && can(&t, "pm", "intern"));
    }

    #[test]
    fn strangers_may_not() {
        let t = org();
        assert!(!can(&t, "dev", "cto"), "an uncle is not reachable");
        assert!(!can(&t, "intern", "qa"));
        assert!(!can(&t, "solo", "dev"));
        assert!(!can_communicate("o/ceo", "p/other", &|_| None), "another namespace");
    }

    #[test]
    fn walks_stop_after_32_steps_and_survive_cycles() {
        // w0 ← w1 ← ... ← w40: w0 is 39 steps above w40's parent.
        let chain: HashMap<String, String> = (1..=40).map(|i| (format!("o/w{i}"), format!("o/w{}", i - 1))).collect();
        assert!(can(&chain, "w9", "w40"), "30 steps up from w39");
        assert!(!can(&chain, "w0", "w40"), "beyond 32 steps");
        let cycle: HashMap<String, String> = [("a", "b"), ("b", "c"), ("c", "a"), ("x", "y")]
            .iter()
            .map(|(c, p)| (format!("o/{c}"), format!("o/{p}")))
            .collect();
        assert!(!can(&cycle, "x", "a"));
    }
}
