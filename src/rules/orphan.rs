//! orphan: a container with this instance's labels that nothing declares, or that
//! claims the workspace but not its identity (uid), is removed. It is never adopted
//! and never given a token (label spoofing, a wiped state database).

use super::*;

pub fn rule(facts: &Facts<'_>) -> Option<Verdict> {
    let containers = facts.observed.containers.as_ref()?;
    let uid = facts.observed.record.as_ref().map(|r| r.uid.as_str());
    let strays: Vec<&ContainerInfo> = containers.iter().filter(|c| uid.is_none() || c.uid() != uid).collect();
    if strays.is_empty() {
        return None;
    }
    let cause = match uid {
        None => {
            format!("{} container(s) carry this workspace's labels but the operator never provisioned it", strays.len())
        }
        Some(_) => format!("{} container(s) carry this workspace's name but not its uid", strays.len()),
    };
    let actions = strays.iter().map(|c| Action::RemoveContainer { id: c.id.clone() }).collect();
    Some(Verdict::new(cause, actions))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::*;
    use crate::model::container::labels;

    #[test]
    fn container_with_foreign_uid_is_removed_and_ours_kept() {
        let mut stray = container(1, ContainerState::Running).labelled(labels::UID, "ffffffff-0000");
        stray.id = "spoof".into();
        let obs = healthy().with_containers(vec![container(1, ContainerState::Running), stray]);
        let (s, des) = (settings(), desired());
        let d = rule(&facts(Some(&des), &obs, &s)).unwrap();
        assert_eq!(d.actions, vec![Action::RemoveContainer { id: "spoof".into() }]);
    }

    #[test]
    fn containers_without_any_record_are_orphans() {
        let mut obs = healthy();
        obs.record = None;
        let s = settings();
        let d = rule(&facts(None, &obs, &s)).unwrap();
        assert_eq!(d.actions.len(), 1);
    }

    #[test]
    fn our_own_container_is_not_an_orphan() {
        let (obs, s, des) = (healthy(), settings(), desired());
        assert_eq!(rule(&facts(Some(&des), &obs, &s)), None);
    }
}
