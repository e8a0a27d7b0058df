//! One suite of behaviour tests for the `Store` trait, run against both stores: a
//! fresh SQLite file in a temporary directory, and a real PostgreSQL (a database
//! of its own per test; see tests/support/postgres.rs). Test names read
//! `sqlite::<case>` and `postgres::<case>`.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Duration, TimeZone, Utc};
use molecule::api::{
    Condition, ConditionStatus, ContainerStatus, OperatingMode, Phase, SourceRef, TokenStatus, WorkspaceStatus,
};
use molecule::model::{self, DecisionRecord, RevokeReason};
use molecule::store::{self, DynStore, ObjectWrite, StoreError, StoredObject, token};
use sqlx::{Connection, Row};

/// A store under test, and the way to look at its database behind its back.
struct Subject {
    store: DynStore,
    backend: Backend,
}

enum Backend {
    Sqlite { path: PathBuf, _dir: tempfile::TempDir },
    Postgres { db: support::postgres::TestDatabase },
}

impl Subject {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("state").join("state.db");
        let store = store::open(&format!("sqlite://{}", path.display())).await.expect("the SQLite store opens");
        Self { store, backend: Backend::Sqlite { path, _dir: dir } }
    }

    async fn postgres() -> Option<Self> {
        let db = support::postgres::fresh_database().await?;
        let store = store::open(&db.url).await.expect("the Postgres store connects");
        Some(Self { store, backend: Backend::Postgres { db } })
    }

    /// A second, independent store on the same database (as after a restart).
    async fn reopen(&self) -> DynStore {
        let url = match &self.backend {
            Backend::Sqlite { path, .. } => path.display().to_string(),
            Backend::Postgres { db } => db.url.clone(),
        };
        store::open(&url).await.expect("the store reopens")
    }

    /// Every row of `table`, each rendered as one string of all its columns.
    async fn raw_rows(&self, table: &str) -> Vec<String> {
        let sql = sqlx::AssertSqlSafe(format!("SELECT * FROM {table}"));
        match &self.backend {
            Backend::Sqlite { path, .. } => {
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
                let rows = sqlx::query(sql).fetch_all(&mut conn).await.unwrap();
                rows.iter()
                    .map(|row| {
                        (0..row.len())
                            .map(|i| match row.try_get::<Option<String>, _>(i) {
                                Ok(text) => text.unwrap_or_default(),
                                Err(_) => row.try_get::<Option<i64>, _>(i).unwrap().unwrap_or_default().to_string(),
                            })
                            .collect::<Vec<_>>()
                            .join(" | ")
                    })
                    .collect()
            }
            Backend::Postgres { db } => {
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                let sql = sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t"));
                sqlx::query_scalar(sql).fetch_all(&mut conn).await.unwrap()
            }
        }
    }

    /// Runs one statement directly on the database.
    async fn execute(&self, sql: &str) {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        match &self.backend {
            Backend::Sqlite { path, .. } => {
                let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
                let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
            Backend::Postgres { db } => {
                let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
                sqlx::query(sql).execute(&mut conn).await.unwrap();
            }
        }
    }
}

/// A fixed instant with microseconds (both databases keep exactly that).
fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 24, 10, 0, 0).unwrap() + Duration::microseconds(123_456)
}

fn mins(n: i64) -> Duration {
    Duration::minutes(n)
}

fn decision(n: i64) -> DecisionRecord {
    DecisionRecord {
        at: t0() + Duration::seconds(n),
        rule: format!("rule-{n}"),
        cause: format!("cause {n}"),
        actions: vec![format!("action {n}"), "revoked 1 token: container-missing".into()],
        outcome: "ok".into(),
    }
}

fn assert_unknown_workspace<T: std::fmt::Debug>(result: Result<T, StoreError>, uid: &str) {
    match result {
        Err(StoreError::Invalid(message)) => assert!(message.contains(uid), "{message}"),
        other => panic!("expected an unknown-workspace error, got {other:?}"),
    }
}

/// The cases: each a behaviour a user of the store sees.
mod cases {
    use super::*;

    pub async fn first_sight_assigns_a_stable_uuid(s: &Subject) {
        let store = &s.store;
        let first = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        assert!(uuid::Uuid::parse_str(&first.uid).is_ok(), "uid {} is a uuid", first.uid);
        assert_eq!(first.key, "default/dev-lead");
        assert_eq!(first.incarnation, 0);
        assert_eq!(first.created_at, t0());
        assert_eq!(first.restart_count, 0);
        assert_eq!((first.status.as_ref(), first.mode_override, first.restart_requested_at), (None, None, None));

        let again = store.ensure_workspace("default/dev-lead", t0() + mins(5)).await.unwrap();
        assert_eq!(again, first, "a second sight changes nothing");
        assert_eq!(store.workspace("default/dev-lead").await.unwrap(), Some(first.clone()));
        assert_eq!(store.workspace_by_uid(&first.uid).await.unwrap(), Some(first.clone()));
        assert_eq!(store.workspace("default/nobody").await.unwrap(), None);
        assert_eq!(store.workspace_by_uid("no-such-uid").await.unwrap(), None);

        let other = store.ensure_workspace("default/pm", t0()).await.unwrap();
        assert_ne!(other.uid, first.uid);
        let keys: Vec<String> = store.list_workspaces().await.unwrap().into_iter().map(|w| w.key).collect();
        assert_eq!(keys, ["default/dev-lead", "default/pm"]);

        // Several reconcilers seeing a new name at once agree on one identity.
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let store = Arc::clone(store);
                tokio::spawn(async move { store.ensure_workspace("default/racer", t0()).await })
            })
            .collect();
        let mut uids = BTreeSet::new();
        for racer in racers {
            uids.insert(racer.await.unwrap().unwrap().uid);
        }
        assert_eq!(uids.len(), 1);
        assert_eq!(store.list_workspaces().await.unwrap().len(), 3);
    }

    pub async fn bump_incarnation_increments_atomically(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        assert_eq!(store.bump_incarnation(&ws.uid).await.unwrap(), 1);
        let bumps: Vec<_> = (0..20)
            .map(|_| {
                let (store, uid) = (Arc::clone(store), ws.uid.clone());
                tokio::spawn(async move { store.bump_incarnation(&uid).await })
            })
            .collect();
        let mut seen = BTreeSet::new();
        for bump in bumps {
            seen.insert(bump.await.unwrap().unwrap());
        }
        assert_eq!(seen, (2..=21).collect(), "every bump returned its own number");
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().incarnation, 21);
        assert_unknown_workspace(store.bump_incarnation("no-such-uid").await, "no-such-uid");
    }

    pub async fn issue_token_stores_only_the_hash(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let issued = store.issue_token(&ws.uid, 1, t0()).await.unwrap();
        let plaintext = issued.plaintext.clone();
        assert_eq!(plaintext.len(), 43);
        assert!(token::well_formed(&plaintext));
        assert_eq!(issued.row.token_hash, token::hash(&plaintext));
        assert_eq!(issued.row.token_hash.len(), 64);
        assert_eq!(issued.row.prefix, plaintext[..8]);
        assert_eq!((issued.row.incarnation, issued.row.created_at), (1, t0()));
        assert!(issued.row.is_live());
        assert!(!format!("{issued:?}").contains(&plaintext), "Debug never prints the token");

        assert_eq!(store.live_tokens(&ws.uid).await.unwrap(), vec![issued.row.clone()]);
        let rows = s.raw_rows("workspace_auth_tokens").await;
        assert_eq!(rows.len(), 1);
        assert!(rows[0].contains(&issued.row.token_hash));
        for row in rows.iter().chain(&s.raw_rows("workspaces").await) {
            assert!(!row.contains(&plaintext), "the plaintext is stored: {row}");
        }
        if let Backend::Sqlite { path, .. } = &s.backend {
            for file in [path.clone(), path.with_extension("db-wal")] {
                let bytes = std::fs::read(&file).unwrap_or_default();
                assert!(
                    !bytes.windows(plaintext.len()).any(|w| w == plaintext.as_bytes()),
                    "the plaintext is in {}",
                    file.display()
                );
            }
        }

        let second = store.issue_token(&ws.uid, 1, t0() + mins(1)).await.unwrap();
        assert_ne!(second.plaintext, plaintext);
        let live: Vec<String> = store.live_tokens(&ws.uid).await.unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(live, [issued.row.id.clone(), second.row.id.clone()], "oldest first");
        assert_unknown_workspace(store.issue_token("no-such-uid", 1, t0()).await, "no-such-uid");
    }

    pub async fn token_owner_resolves_live_tokens_only(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let incarnation = store.bump_incarnation(&ws.uid).await.unwrap();
        let issued = store.issue_token(&ws.uid, incarnation, t0()).await.unwrap();
        let hash = token::hash(&issued.plaintext);

        let owner = store.token_owner(&hash).await.unwrap().expect("a live token resolves");
        assert_eq!(owner.token_id, issued.row.id);
        assert_eq!(owner.workspace_uid, ws.uid);
        assert_eq!(owner.workspace_key, "default/dev-lead");
        assert_eq!((owner.token_incarnation, owner.current_incarnation), (1, 1));
        assert_eq!(store.token_owner(&token::hash("not-a-token")).await.unwrap(), None);

        // A reprovision bumps the incarnation: the old token now shows as superseded.
        store.bump_incarnation(&ws.uid).await.unwrap();
        let owner = store.token_owner(&hash).await.unwrap().unwrap();
        assert_eq!((owner.token_incarnation, owner.current_incarnation), (1, 2));
        assert_eq!(store.live_tokens(&ws.uid).await.unwrap()[0].last_used_at, None, "lookup does not touch");

        store.revoke_tokens(&ws.uid, RevokeReason::Superseded, None, t0()).await.unwrap();
        assert_eq!(store.token_owner(&hash).await.unwrap(), None, "a revoked token resolves to nobody");

        // A live token whose workspace record is gone resolves to nobody either.
        let orphan = store.issue_token(&ws.uid, 2, t0()).await.unwrap();
        s.execute(&format!("DELETE FROM workspaces WHERE uid = '{}'", ws.uid)).await;
        assert_eq!(store.token_owner(&token::hash(&orphan.plaintext)).await.unwrap(), None);
    }

    /// Many hashes in one query: the live ones come back with their hashes; unknown,
    /// revoked and repeated hashes add nothing.
    pub async fn token_owners_resolves_many_hashes_at_once(s: &Subject) {
        let store = &s.store;
        let a = store.ensure_workspace("default/a", t0()).await.unwrap();
        let b = store.ensure_workspace("default/b", t0()).await.unwrap();
        let ta = store.issue_token(&a.uid, 0, t0()).await.unwrap();
        let tb = store.issue_token(&b.uid, 0, t0()).await.unwrap();
        let gone = store.issue_token(&b.uid, 0, t0()).await.unwrap();
        store.revoke_token(&b.uid, &gone.row.id, RevokeReason::Superseded, t0()).await.unwrap();
        assert!(store.token_owners(&[]).await.unwrap().is_empty());

        let asked = [&ta, &tb, &gone, &ta].map(|t| t.row.token_hash.clone());
        let asked = [&asked[..], &[token::hash("not-a-token")]].concat();
        let mut found: Vec<(String, String, String)> = store
            .token_owners(&asked)
            .await
            .unwrap()
            .into_iter()
            .map(|(hash, owner)| (hash, owner.token_id, owner.workspace_key))
            .collect();
        found.sort();
        found.dedup();
        let mut expected = vec![
            (ta.row.token_hash.clone(), ta.row.id.clone(), "default/a".to_string()),
            (tb.row.token_hash.clone(), tb.row.id.clone(), "default/b".to_string()),
        ];
        expected.sort();
        assert_eq!(found, expected);
    }

    /// The registry answers concurrent lookups in batches (store::lookups): each
    /// caller still gets its own token's owner, and a token revoked before a lookup
    /// begins is refused by it.
    pub async fn concurrent_lookups_through_the_registry_store_get_their_own_answers(s: &Subject) {
        let registry = store::lookups::TokenLookups::new(s.store.clone());
        let mut tokens = Vec::new();
        for i in 0..20 {
            let ws = s.store.ensure_workspace(&format!("default/ws-{i}"), t0()).await.unwrap();
            tokens.push((ws.key.clone(), s.store.issue_token(&ws.uid, 0, t0()).await.unwrap()));
        }
        let revoked = &tokens[7].1;
        s.store
            .revoke_token(&revoked.row.workspace_uid, &revoked.row.id, RevokeReason::Superseded, t0())
            .await
            .unwrap();

        let lookups = (0..400).map(|n| {
            let registry = registry.clone();
            let (key, issued) = &tokens[n % tokens.len()];
            let (key, hash) = (
                key.clone(),
                if n % 11 == 0 { token::hash(&format!("unknown-{n}")) } else { issued.row.token_hash.clone() },
            );
            let expected = (n % 11 != 0 && n % tokens.len() != 7).then_some(key);
            tokio::spawn(async move {
                let owner = registry.token_owner(&hash).await.unwrap();
                assert_eq!(owner.map(|o| o.workspace_key), expected, "lookup {n}");
            })
        });
        for lookup in futures::future::join_all(lookups.collect::<Vec<_>>()).await {
            lookup.expect("every lookup got its own answer");
        }

        let (_, live) = &tokens[3];
        assert!(registry.token_owner(&live.row.token_hash).await.unwrap().is_some());
        s.store.revoke_token(&live.row.workspace_uid, &live.row.id, RevokeReason::Superseded, t0()).await.unwrap();
        assert_eq!(registry.token_owner(&live.row.token_hash).await.unwrap(), None, "refused once revoked");
    }

    /// Whether the status shows the agent online comes with the token, as the status
    /// last written says (unknown before any status), so a heartbeat needs one query.
    pub async fn token_owner_tells_whether_the_status_shows_the_agent_online(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let issued = store.issue_token(&ws.uid, 0, t0()).await.unwrap();
        let online = || async { store.token_owner(&issued.row.token_hash).await.unwrap().unwrap().agent_online };
        assert_eq!(online().await, None, "no status written yet");
        let condition = |status| Condition {
            type_: "AgentOnline".into(),
            status,
            reason: "r".into(),
            message: String::new(),
            last_transition_time: t0(),
            observed_generation: None,
        };
        let cases = [
            (Phase::Running, vec![condition(ConditionStatus::True)], true),
            (Phase::Running, vec![condition(ConditionStatus::False)], false),
            (Phase::Degraded, vec![condition(ConditionStatus::Unknown)], false),
            (Phase::Running, vec![], true),
            (Phase::Pending, vec![], false),
        ];
        for (phase, conditions, expected) in cases {
            let status = WorkspaceStatus { phase, conditions, ..Default::default() };
            assert_eq!(model::shows_agent_online(&status), expected, "{status:?}");
            store.save_status(&ws.uid, &status).await.unwrap();
            assert_eq!(online().await, Some(expected), "{status:?}");
        }
    }

    pub async fn revoke_tokens_spares_the_kept_token(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let other = store.ensure_workspace("default/pm", t0()).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(store.issue_token(&ws.uid, 1, t0() + mins(i)).await.unwrap().row.id);
        }
        let bystander = store.issue_token(&other.uid, 1, t0()).await.unwrap().row.id;

        let revoked = store.revoke_tokens(&ws.uid, RevokeReason::Rotated, Some(&ids[1]), t0() + mins(5)).await.unwrap();
        assert_eq!(revoked, 2);
        let live: Vec<String> = store.live_tokens(&ws.uid).await.unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(live, [ids[1].clone()]);
        assert_eq!(store.live_tokens(&other.uid).await.unwrap()[0].id, bystander, "other workspaces untouched");

        assert_eq!(store.revoke_tokens(&ws.uid, RevokeReason::Reprovision, None, t0() + mins(6)).await.unwrap(), 1);
        assert_eq!(store.revoke_tokens(&ws.uid, RevokeReason::Reprovision, None, t0() + mins(7)).await.unwrap(), 0);
        assert!(store.live_tokens(&ws.uid).await.unwrap().is_empty());
        let history = store.token_history(&ws.uid, 10).await.unwrap();
        let reasons: Vec<(&str, Option<&str>)> =
            history.iter().map(|t| (t.id.as_str(), t.revoke_reason.as_deref())).collect();
        assert_eq!(
            reasons,
            [
                (ids[2].as_str(), Some("rotated")),
                (ids[1].as_str(), Some("reprovision")),
                (ids[0].as_str(), Some("rotated")),
            ]
        );
        assert_eq!(history[1].revoked_at, Some(t0() + mins(6)));
    }

    pub async fn revoke_stale_tokens_revokes_only_rows_older_than_cutoff(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let unused_old = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        let used_recently = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        store.record_heartbeat(&used_recently.id, &ws.uid, t0() + mins(8)).await.unwrap();
        let fresh = store.issue_token(&ws.uid, 1, t0() + mins(10)).await.unwrap().row;
        let exactly_at_cutoff = store.issue_token(&ws.uid, 1, t0() + mins(5)).await.unwrap().row;

        let cutoff = t0() + mins(5);
        let revoked =
            store.revoke_stale_tokens(&ws.uid, cutoff, RevokeReason::ContainerMissing, t0() + mins(10)).await.unwrap();
        assert_eq!(revoked, 1);
        let live: BTreeSet<String> = store.live_tokens(&ws.uid).await.unwrap().into_iter().map(|t| t.id).collect();
        assert_eq!(live, BTreeSet::from([used_recently.id, fresh.id, exactly_at_cutoff.id]));
        let revoked_row = store.token_history(&ws.uid, 10).await.unwrap().into_iter().find(|t| t.id == unused_old.id);
        let revoked_row = revoked_row.unwrap();
        assert_eq!(revoked_row.revoke_reason.as_deref(), Some("container-missing"));
        assert_eq!(revoked_row.revoked_at, Some(t0() + mins(10)));

        // Revoked rows are never revoked again (their reason stays).
        let again = store.revoke_stale_tokens(&ws.uid, t0() + mins(60), RevokeReason::Deleted, t0() + mins(60));
        assert_eq!(again.await.unwrap(), 3);
        let history = store.token_history(&ws.uid, 10).await.unwrap();
        let first = history.iter().find(|t| t.id == unused_old.id).unwrap();
        assert_eq!(first.revoke_reason.as_deref(), Some("container-missing"));
    }

    pub async fn a_heartbeat_after_the_look_protects_the_token(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let row = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        // The rule looks at t0+6m with a 5m grace: the token (last activity t0) is stale.
        let now = t0() + mins(6);
        let cutoff = now - mins(5);
        assert!(store.live_tokens(&ws.uid).await.unwrap()[0].last_activity() < cutoff);
        // Before its UPDATE runs, the agent heartbeats.
        store.record_heartbeat(&row.id, &ws.uid, now).await.unwrap();
        let revoked = store.revoke_stale_tokens(&ws.uid, cutoff, RevokeReason::ContainerMissing, now).await.unwrap();
        assert_eq!(revoked, 0, "the heartbeat wins");
        assert_eq!(store.live_tokens(&ws.uid).await.unwrap().len(), 1);
    }

    pub async fn rotation_expiry_and_single_revocation(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let old = store.issue_token(&ws.uid, 1, t0()).await.unwrap();
        let new = store.issue_token(&ws.uid, 1, t0() + mins(1)).await.unwrap();
        assert_eq!(store.expire_token(&ws.uid, &old.row.id, t0() + mins(2)).await.unwrap(), 1);
        let owner = store.token_owner(&old.row.token_hash).await.unwrap().unwrap();
        assert_eq!(owner.expires_at, Some(t0() + mins(2)), "the registry sees when the overlap ends");
        let live = store.live_tokens(&ws.uid).await.unwrap();
        assert_eq!(live.iter().find(|t| t.id == old.row.id).unwrap().expires_at, Some(t0() + mins(2)));
        assert!(live.iter().find(|t| t.id == new.row.id).unwrap().expires_at.is_none());
        // Revoking one token by id leaves the other live; a second time is a no-op.
        assert_eq!(store.revoke_token(&ws.uid, &old.row.id, RevokeReason::Rotated, t0() + mins(3)).await.unwrap(), 1);
        assert_eq!(store.revoke_token(&ws.uid, &old.row.id, RevokeReason::Rotated, t0() + mins(3)).await.unwrap(), 0);
        assert_eq!(
            store.revoke_token("someone-else", &new.row.id, RevokeReason::Rotated, t0()).await.unwrap(),
            0,
            "scoped to the workspace"
        );
        let live = store.live_tokens(&ws.uid).await.unwrap();
        assert_eq!(live.len(), 1);
        assert_eq!(live[0].id, new.row.id);
        let history = store.token_history(&ws.uid, 10).await.unwrap();
        assert_eq!(history.iter().find(|t| t.id == old.row.id).unwrap().revoke_reason.as_deref(), Some("rotated"));
    }

    pub async fn secrets_are_versioned_scoped_and_deleted(s: &Subject) {
        let store = &s.store;
        let sealed =
            |c: &str| molecule::secrets::Sealed { key_id: "k1".into(), nonce: "n".into(), ciphertext: c.into() };
        assert_eq!(store.put_secret("global", "A", &sealed("c1"), t0()).await.unwrap(), 1);
        assert_eq!(
            store.put_secret("global", "A", &sealed("c2"), t0() + mins(1)).await.unwrap(),
            2,
            "a set bumps the version"
        );
        assert_eq!(
            store.put_secret("team:default/eng", "A", &sealed("c3"), t0()).await.unwrap(),
            1,
            "scopes are separate"
        );
        let global = store.secrets(&["global".to_string()]).await.unwrap();
        assert_eq!(global.len(), 1);
        assert_eq!((global[0].ciphertext.as_str(), global[0].version, global[0].updated_at), ("c2", 2, t0() + mins(1)));
        assert_eq!(store.secrets(&[]).await.unwrap().len(), 2, "no scopes means all");
        assert!(store.delete_secret("global", "A").await.unwrap());
        assert!(!store.delete_secret("global", "A").await.unwrap());
        assert_eq!(store.secrets(&[]).await.unwrap().len(), 1);
    }

    pub async fn revoke_reasons_are_recorded_and_readable(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let reasons = [
            RevokeReason::Reprovision,
            RevokeReason::ContainerMissing,
            RevokeReason::TokenFileMismatch,
            RevokeReason::Deleted,
            RevokeReason::Paused,
            RevokeReason::Stopped,
            RevokeReason::Rotated,
            RevokeReason::Superseded,
        ];
        for (i, reason) in reasons.iter().enumerate() {
            let at = t0() + mins(i as i64);
            store.issue_token(&ws.uid, 1, at).await.unwrap();
            assert_eq!(store.revoke_tokens(&ws.uid, *reason, None, at).await.unwrap(), 1);
        }
        let history = store.token_history(&ws.uid, 100).await.unwrap();
        let read: Vec<RevokeReason> =
            history.iter().rev().map(|t| RevokeReason::parse(t.revoke_reason.as_deref().unwrap()).unwrap()).collect();
        assert_eq!(read, reasons, "oldest last in the history, every reason kept");
        assert!(history.windows(2).all(|w| w[0].created_at > w[1].created_at), "newest first");
        assert_eq!(store.token_history(&ws.uid, 3).await.unwrap(), history[..3]);
        assert!(store.token_history("no-such-uid", 10).await.unwrap().is_empty());
    }

    pub async fn the_change_log_names_what_changed_but_heartbeats_and_status(s: &Subject) {
        let store = &s.store;
        let keys = |names: &[&str]| store::Changes {
            keys: names.iter().map(|n| format!("default/{n}")).collect(),
            secrets: false,
        };
        let a = store.ensure_workspace("default/a", t0()).await.unwrap();
        let b = store.ensure_workspace("default/b", t0()).await.unwrap();
        assert_eq!(store.take_changes().await.unwrap(), keys(&["a", "b"]), "new records");
        assert_eq!(store.take_changes().await.unwrap(), keys(&[]), "each change is taken once");

        let token = store.issue_token(&a.uid, 1, t0()).await.unwrap().row;
        assert_eq!(store.take_changes().await.unwrap(), keys(&["a"]), "a token issued");
        // What the operator writes on every heartbeat and every reconcile is not a change.
        store.record_heartbeat(&token.id, &a.uid, t0() + mins(1)).await.unwrap();
        let status = WorkspaceStatus { phase: Phase::Running, ..WorkspaceStatus::default() };
        store.save_status(&a.uid, &status).await.unwrap();
        store.reset_restarts(&b.uid).await.unwrap(); // already 0: the same value written
        assert_eq!(store.take_changes().await.unwrap(), keys(&[]), "heartbeats, statuses, same values");

        // Changes made behind the operator's back are logged like its own.
        s.execute(
            "UPDATE workspace_auth_tokens SET revoked_at = '2026-01-01T00:00:00.000000Z', revoke_reason = 'manual'",
        )
        .await;
        s.execute("UPDATE workspaces SET restart_count = 5 WHERE key = 'default/b'").await;
        assert_eq!(store.take_changes().await.unwrap(), keys(&["a", "b"]), "rows edited by hand");
        store.set_mode_override(&b.uid, Some(OperatingMode::Paused)).await.unwrap();
        store.bump_incarnation(&a.uid).await.unwrap();
        assert_eq!(store.take_changes().await.unwrap(), keys(&["a", "b"]));
        store.delete_workspace(&b.uid).await.unwrap();
        assert_eq!(store.take_changes().await.unwrap(), keys(&["b"]), "a forgotten record");

        let sealed = molecule::secrets::Sealed { key_id: "k1".into(), nonce: "n".into(), ciphertext: "c".into() };
        store.put_secret("global", "A", &sealed, t0()).await.unwrap();
        assert_eq!(store.take_changes().await.unwrap(), store::Changes { keys: BTreeSet::new(), secrets: true });
        store.delete_secret("global", "A").await.unwrap();
        assert!(store.take_changes().await.unwrap().secrets, "a secret deleted");
        assert!(s.raw_rows("workspace_changes").await.is_empty(), "taking the log empties it");
    }

    pub async fn the_sweep_reads_only_the_workspaces_it_names(s: &Subject) {
        let store = &s.store;
        let a = store.ensure_workspace("default/a", t0()).await.unwrap();
        let b = store.ensure_workspace("default/b", t0()).await.unwrap();
        let a1 = store.issue_token(&a.uid, 1, t0()).await.unwrap().row;
        let a2 = store.issue_token(&a.uid, 1, t0() + mins(1)).await.unwrap().row;
        let b1 = store.issue_token(&b.uid, 1, t0()).await.unwrap().row;
        let revoked = store.issue_token(&b.uid, 1, t0() + mins(2)).await.unwrap().row;
        store.revoke_token(&b.uid, &revoked.id, RevokeReason::Rotated, t0() + mins(3)).await.unwrap();

        let brief = |keys: Option<&[&str]>| {
            let keys: Option<Vec<String>> = keys.map(|k| k.iter().map(|k| k.to_string()).collect());
            async move {
                let rows = store.list_workspaces_brief(keys.as_deref()).await.unwrap();
                rows.into_iter().map(|(r, _)| r.key).collect::<Vec<_>>()
            }
        };
        assert_eq!(brief(None).await, ["default/a", "default/b"]);
        assert_eq!(brief(Some(&["default/b", "default/gone"])).await, ["default/b"]);
        assert!(brief(Some(&[])).await.is_empty());

        let ids = |rows: Vec<model::TokenRow>| rows.into_iter().map(|t| t.id).collect::<Vec<_>>();
        let mut all = vec![a1.id.clone(), a2.id.clone(), b1.id.clone()];
        all.sort_by_key(|id| if [&a1.id, &a2.id].contains(&id) { a.uid.clone() } else { b.uid.clone() });
        assert_eq!(ids(store.all_live_tokens(None).await.unwrap()), all, "live only, by workspace, oldest first");
        assert_eq!(ids(store.all_live_tokens(Some(std::slice::from_ref(&a.uid))).await.unwrap()), [a1.id, a2.id]);
        assert_eq!(ids(store.all_live_tokens(Some(&[b.uid.clone(), "nobody".into()])).await.unwrap()), [b1.id]);
    }

    pub async fn record_heartbeat_touches_token_and_workspace(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let row = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        let beat = t0() + mins(1);
        store.record_heartbeat(&row.id, &ws.uid, beat).await.unwrap();
        let token = store.live_tokens(&ws.uid).await.unwrap().remove(0);
        assert_eq!(token.last_used_at, Some(beat));
        assert_eq!(token.last_activity(), beat);
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().last_heartbeat_at, Some(beat));

        // A late, out-of-order heartbeat never moves activity back.
        store.record_heartbeat(&row.id, &ws.uid, t0() + Duration::seconds(30)).await.unwrap();
        assert_eq!(store.live_tokens(&ws.uid).await.unwrap()[0].last_used_at, Some(beat));
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().last_heartbeat_at, Some(beat));
    }

    /// Heartbeats are kept apart from the wide rows while a token is live; revoking it,
    /// by any path, keeps its last use and the workspace's last heartbeat as they were,
    /// and leaves only live tokens' rows in the heartbeat table.
    pub async fn revoking_keeps_the_last_heartbeat_and_drops_the_row(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let old = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        store.record_heartbeat(&old.id, &ws.uid, t0() + mins(2)).await.unwrap();
        assert_eq!(s.raw_rows("heartbeats").await.len(), 1);
        // A reprovision: the old token goes, the new one has not beaten yet.
        store.revoke_tokens(&ws.uid, RevokeReason::Reprovision, None, t0() + mins(3)).await.unwrap();
        let new = store.issue_token(&ws.uid, 2, t0() + mins(3)).await.unwrap().row;
        assert!(s.raw_rows("heartbeats").await.is_empty(), "only live tokens have rows");
        let revoked = store.token_history(&ws.uid, 10).await.unwrap().pop().unwrap();
        assert_eq!((revoked.id.as_str(), revoked.last_used_at), (old.id.as_str(), Some(t0() + mins(2))));
        let record = store.workspace_by_uid(&ws.uid).await.unwrap().unwrap();
        assert_eq!(record.last_heartbeat_at, Some(t0() + mins(2)), "the last heartbeat survives the revoke");
        assert_eq!(store.list_workspaces().await.unwrap()[0].last_heartbeat_at, Some(t0() + mins(2)));

        // The new token's beats move it on; an older one than the folded time does not
        // move the workspace back.
        store.record_heartbeat(&new.id, &ws.uid, t0() + mins(1)).await.unwrap();
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().last_heartbeat_at, Some(t0() + mins(2)));
        store.record_heartbeat(&new.id, &ws.uid, t0() + mins(4)).await.unwrap();
        let brief = store.list_workspaces_brief(None).await.unwrap();
        assert_eq!(brief[0].0.last_heartbeat_at, Some(t0() + mins(4)));
        // A revoked token's heartbeat leaves no trace; a stale revoke folds too.
        store.record_heartbeat(&old.id, &ws.uid, t0() + mins(9)).await.unwrap();
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().last_heartbeat_at, Some(t0() + mins(4)));
        let cutoff = t0() + mins(5);
        assert_eq!(
            store.revoke_stale_tokens(&ws.uid, cutoff, RevokeReason::ContainerMissing, cutoff).await.unwrap(),
            1
        );
        assert!(s.raw_rows("heartbeats").await.is_empty());
        let history = store.token_history(&ws.uid, 10).await.unwrap();
        assert_eq!(history[0].last_used_at, Some(t0() + mins(4)));
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().last_heartbeat_at, Some(t0() + mins(4)));
    }

    pub async fn agent_reports_are_written_whole_and_forgotten_with_the_workspace(s: &Subject) {
        use molecule::model::{AgentReport, DeliveryMode};
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        assert_eq!(store.agent_report(&ws.uid).await.unwrap(), None);
        let first = AgentReport {
            incarnation: 1,
            url: Some("http://localhost:8000".into()),
            agent_card: Some(serde_json::json!({"name": "dev-lead", "skills": []})),
            delivery_mode: Some(DeliveryMode::Push),
            error_rate: Some(0.75),
            current_task: Some("triage #42".into()),
            runtime_state: Some("wedged".into()),
            wedged_since: Some(t0()),
            ..Default::default()
        };
        let (record, none) = store.workspace_with_report("default/dev-lead").await.unwrap().unwrap();
        assert_eq!((record, none), (ws.clone(), None), "the record, with no report yet");
        store.save_agent_report(&ws.uid, &first).await.unwrap();
        assert_eq!(store.agent_report(&ws.uid).await.unwrap(), Some(first.clone()));
        // What a reconcile reads: the record and its report in one query.
        let (record, report) = store.workspace_with_report("default/dev-lead").await.unwrap().unwrap();
        assert_eq!((record.uid.as_str(), report), (ws.uid.as_str(), Some(first.clone())));
        assert_eq!(store.workspace_with_report("default/nobody").await.unwrap(), None);
        let second = AgentReport { incarnation: 2, error_rate: Some(0.0), ..Default::default() };
        store.save_agent_report(&ws.uid, &second).await.unwrap();
        assert_eq!(store.agent_report(&ws.uid).await.unwrap(), Some(second), "written whole");
        store.delete_workspace(&ws.uid).await.unwrap();
        assert_eq!(store.agent_report(&ws.uid).await.unwrap(), None);
        assert!(s.raw_rows("agent_reports").await.is_empty());
    }

    pub async fn decisions_are_kept_newest_first_and_trimmed(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let other = store.ensure_workspace("default/pm", t0()).await.unwrap();
        store.append_decision(&other.uid, &decision(100), 3).await.unwrap();
        for n in 1..=5 {
            store.append_decision(&ws.uid, &decision(n), 3).await.unwrap();
        }
        assert_eq!(store.decisions(&ws.uid, 10).await.unwrap(), [decision(5), decision(4), decision(3)]);
        assert_eq!(store.decisions(&ws.uid, 2).await.unwrap(), [decision(5), decision(4)]);
        assert_eq!(store.decisions(&other.uid, 10).await.unwrap(), [decision(100)], "trimming is per workspace");
        assert_eq!(s.raw_rows("decisions").await.len(), 4, "trimmed rows are deleted");
    }

    pub async fn the_fleets_recent_decisions_come_with_their_workspace_newest_first(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let other = store.ensure_workspace("team-a/pm", t0()).await.unwrap();
        store.append_decision(&ws.uid, &decision(1), 10).await.unwrap();
        store.append_decision(&other.uid, &decision(2), 10).await.unwrap();
        store.append_decision(&ws.uid, &decision(3), 10).await.unwrap();
        let key = |k: &str| k.to_string();
        assert_eq!(
            store.recent_decisions(10).await.unwrap(),
            [
                (key("default/dev-lead"), decision(3)),
                (key("team-a/pm"), decision(2)),
                (key("default/dev-lead"), decision(1))
            ]
        );
        assert_eq!(store.recent_decisions(1).await.unwrap(), [(key("default/dev-lead"), decision(3))]);
    }

    pub async fn delete_workspace_revokes_tokens_and_forgets_the_record(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let earlier = store.issue_token(&ws.uid, 1, t0()).await.unwrap().row;
        store.revoke_tokens(&ws.uid, RevokeReason::Reprovision, None, t0()).await.unwrap();
        let live = store.issue_token(&ws.uid, 2, t0() + mins(1)).await.unwrap();
        store.append_decision(&ws.uid, &decision(1), 10).await.unwrap();

        store.delete_workspace(&ws.uid).await.unwrap();
        assert_eq!(store.workspace("default/dev-lead").await.unwrap(), None);
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap(), None);
        assert!(store.list_workspaces().await.unwrap().is_empty());
        assert!(store.decisions(&ws.uid, 10).await.unwrap().is_empty());
        assert!(store.live_tokens(&ws.uid).await.unwrap().is_empty());
        assert_eq!(store.token_owner(&token::hash(&live.plaintext)).await.unwrap(), None);
        // The rows stay, revoked, for audit; an earlier revocation keeps its reason.
        let history = store.token_history(&ws.uid, 10).await.unwrap();
        let reasons: Vec<(&str, Option<&str>)> =
            history.iter().map(|t| (t.id.as_str(), t.revoke_reason.as_deref())).collect();
        assert_eq!(reasons, [(live.row.id.as_str(), Some("deleted")), (earlier.id.as_str(), Some("reprovision"))]);
        assert!(history[0].revoked_at.is_some());

        store.delete_workspace(&ws.uid).await.expect("deleting twice is fine (idempotent executor)");
        let reborn = store.ensure_workspace("default/dev-lead", t0() + mins(2)).await.unwrap();
        assert_ne!(reborn.uid, ws.uid, "a uid is never reused");
        assert_eq!(reborn.incarnation, 0);
    }

    pub async fn a_claim_gives_a_fresh_workspace_the_members_uid_once(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev", t0()).await.unwrap();
        store.append_decision(&ws.uid, &decision(1), 10).await.unwrap();
        let member = "11111111-2222-3333-4444-555555555555";
        let claim = model::Claim {
            pool: "default/agents".into(),
            container_id: "c0ffee".into(),
            spec_hash: "abcdef0123456789".into(),
            at: t0() + mins(1),
            pending: true,
        };
        let got = store.claim_member("default/dev", &ws.uid, member, &claim).await.unwrap().expect("claimed");
        assert_eq!((got.uid.as_str(), got.incarnation), (member, 1));
        assert_eq!(got.claim.as_ref(), Some(&claim));
        // Its files written, the claim is complete.
        store.complete_claim(member, &claim).await.unwrap();
        let done = store.workspace("default/dev").await.unwrap().unwrap().claim.unwrap();
        assert_eq!(done, model::Claim { pending: false, ..claim.clone() });
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap(), None, "the old uid is gone");
        assert_eq!(store.decisions(member, 10).await.unwrap().len(), 1, "the decision log moves with it");
        // Another workspace cannot take the same member, and a provisioned one takes none.
        let other = store.ensure_workspace("default/qa", t0()).await.unwrap();
        assert_eq!(store.claim_member("default/qa", &other.uid, member, &claim).await.unwrap(), None);
        store.bump_incarnation(&other.uid).await.unwrap();
        let m2 = "66666666-2222-3333-4444-555555555555";
        assert_eq!(store.claim_member("default/qa", &other.uid, m2, &claim).await.unwrap(), None);
        // A token for the claimed identity; the next provision clears the claim.
        store.issue_token(member, 1, t0() + mins(1)).await.unwrap();
        assert_eq!(store.bump_incarnation(member).await.unwrap(), 2);
        assert_eq!(store.workspace("default/dev").await.unwrap().unwrap().claim, None);
        store.complete_claim(member, &claim).await.unwrap();
        assert_eq!(store.workspace("default/dev").await.unwrap().unwrap().claim, None, "a cleared claim stays cleared");
    }

    pub async fn mode_override_and_restart_request_round_trip(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        for mode in [OperatingMode::Paused, OperatingMode::Stopped, OperatingMode::Running] {
            store.set_mode_override(&ws.uid, Some(mode)).await.unwrap();
            assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().mode_override, Some(mode));
        }
        store.set_mode_override(&ws.uid, None).await.unwrap();
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().mode_override, None);

        store.request_restart(&ws.uid, t0() + mins(3)).await.unwrap();
        assert_eq!(
            store.workspace("default/dev-lead").await.unwrap().unwrap().restart_requested_at,
            Some(t0() + mins(3))
        );

        store.record_restart(&ws.uid, "agent silent for 90s", t0() + mins(4)).await.unwrap();
        store.record_restart(&ws.uid, "agent silent for 95s", t0() + mins(6)).await.unwrap();
        let record = store.workspace_by_uid(&ws.uid).await.unwrap().unwrap();
        assert_eq!(record.restart_count, 2);
        assert_eq!(record.last_restart_at, Some(t0() + mins(6)));
        assert_eq!(record.last_restart_reason.as_deref(), Some("agent silent for 95s"));
        store.reset_restarts(&ws.uid).await.unwrap();
        let record = store.workspace_by_uid(&ws.uid).await.unwrap().unwrap();
        assert_eq!(record.restart_count, 0);
        assert_eq!(record.last_restart_reason.as_deref(), Some("agent silent for 95s"), "the last reason stays");

        assert_unknown_workspace(store.set_mode_override("no-such-uid", None).await, "no-such-uid");
        assert_unknown_workspace(store.request_restart("no-such-uid", t0()).await, "no-such-uid");
        assert_unknown_workspace(store.record_restart("no-such-uid", "x", t0()).await, "no-such-uid");
        assert_unknown_workspace(store.reset_restarts("no-such-uid").await, "no-such-uid");
    }

    pub async fn save_status_round_trips_the_whole_status(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let full = WorkspaceStatus {
            phase: Phase::Running,
            uid: Some(ws.uid.clone()),
            observed_generation: Some(3),
            incarnation: 7,
            container: Some(ContainerStatus {
                id: "c0ffee".into(),
                name: "ws-0123456789ab".into(),
                spec_hash: "abc123".into(),
                image: "molecule-agent:local".into(),
            }),
            pod: Some(molecule::api::PodStatus {
                name: "ws-0123456789ab".into(),
                node: Some("n1".into()),
                restarts: 2,
            }),
            token: Some(TokenStatus {
                prefix: "Ab3x9_Qe".into(),
                issued_at: t0(),
                last_used_at: Some(t0() + Duration::nanoseconds(1_500)),
            }),
            last_heartbeat_at: Some(t0() + mins(1)),
            restart_count: 1,
            last_restart_reason: Some("agent silent".into()),
            agent: Some(molecule::api::AgentStatus {
                current_task: Some("triage #42".into()),
                error_rate: Some(0.25),
                ..Default::default()
            }),
            source: Some(SourceRef { kind: "dir".into(), reference: "org/eng.yaml@1234".into() }),
            pending_hash: Some("def456".into()),
            applied_hash: Some("abc123".into()),
            conditions: vec![
                Condition::new("Ready", ConditionStatus::True, "Running", "the agent is online", t0()),
                Condition::new("SpecDrift", ConditionStatus::False, "UpToDate", "", t0()),
            ],
        };
        store.save_status(&ws.uid, &full).await.unwrap();
        assert_eq!(store.workspace_by_uid(&ws.uid).await.unwrap().unwrap().status, Some(full.clone()));

        // Written whole: fields absent from the new status are gone.
        let small = WorkspaceStatus { phase: Phase::Stopped, ..Default::default() };
        store.save_status(&ws.uid, &small).await.unwrap();
        assert_eq!(store.workspace("default/dev-lead").await.unwrap().unwrap().status, Some(small));
        assert_unknown_workspace(store.save_status("no-such-uid", &full).await, "no-such-uid");
    }

    pub async fn the_store_survives_reopen(s: &Subject) {
        let store = &s.store;
        let ws = store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        store.bump_incarnation(&ws.uid).await.unwrap();
        let issued = store.issue_token(&ws.uid, 1, t0()).await.unwrap();
        store.append_decision(&ws.uid, &decision(1), 10).await.unwrap();
        store.save_status(&ws.uid, &WorkspaceStatus { phase: Phase::Running, ..Default::default() }).await.unwrap();

        let reopened = s.reopen().await;
        reopened.ping().await.unwrap();
        assert_eq!(
            reopened.workspace("default/dev-lead").await.unwrap(),
            store.workspace("default/dev-lead").await.unwrap()
        );
        assert_eq!(reopened.workspace_by_uid(&ws.uid).await.unwrap().unwrap().incarnation, 1);
        assert_eq!(reopened.live_tokens(&ws.uid).await.unwrap(), vec![issued.row]);
        assert!(reopened.token_owner(&token::hash(&issued.plaintext)).await.unwrap().is_some());
        assert_eq!(reopened.decisions(&ws.uid, 10).await.unwrap(), [decision(1)]);
    }

    fn object(kind: &str, namespace: &str, name: &str, tier: i64) -> StoredObject {
        StoredObject {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
            uid: uuid::Uuid::new_v4().to_string(),
            resource_version: 0,
            generation: 1,
            creation_timestamp: "2026-01-02T03:04:05Z".into(),
            deletion_timestamp: None,
            body: serde_json::json!({"apiVersion": "molecule.ai/v1alpha1", "kind": kind,
                "metadata": {"name": name, "namespace": namespace}, "spec": {"tier": tier}}),
        }
    }

    fn written(w: ObjectWrite) -> StoredObject {
        match w {
            ObjectWrite::Written(o) => o,
            other => panic!("expected a write, got {other:?}"),
        }
    }

    pub async fn objects_take_one_global_increasing_resource_version(s: &Subject) {
        let store = &s.store;
        assert_eq!(store.object_revision().await.unwrap(), 0);
        let a = written(store.put_object(&object("Workspace", "default", "a", 1), None).await.unwrap());
        let t = written(store.put_object(&object("Team", "default", "eng", 1), None).await.unwrap());
        let b = written(store.put_object(&object("Workspace", "prod", "b", 2), None).await.unwrap());
        assert_eq!((a.resource_version, t.resource_version, b.resource_version), (1, 2, 3));
        assert_eq!(a.body["metadata"]["resourceVersion"], "1", "the body carries its resourceVersion");
        assert_eq!(store.get_object("Workspace", "default", "a").await.unwrap(), Some(a.clone()));
        assert_eq!(store.get_object("Team", "default", "a").await.unwrap(), None);

        let (all, rv) = store.list_objects("Workspace", None).await.unwrap();
        assert_eq!((all.iter().map(|o| o.name.as_str()).collect::<Vec<_>>(), rv), (vec!["a", "b"], 3));
        let (prod, _) = store.list_objects("Workspace", Some("prod")).await.unwrap();
        assert_eq!(prod, vec![b]);

        let mut changed = a.clone();
        changed.body["spec"]["tier"] = serde_json::json!(4);
        changed.generation = 2;
        let updated = written(store.put_object(&changed, Some(1)).await.unwrap());
        assert_eq!((updated.resource_version, updated.generation), (4, 2));
        assert_eq!(store.object_revision().await.unwrap(), 4);
    }

    pub async fn stale_or_duplicate_object_writes_conflict(s: &Subject) {
        let store = &s.store;
        let a = written(store.put_object(&object("Workspace", "default", "a", 1), None).await.unwrap());
        assert_eq!(
            store.put_object(&object("Workspace", "default", "a", 2), None).await.unwrap(),
            ObjectWrite::Conflict { current: Some(a.resource_version) },
            "a create of an existing name conflicts"
        );
        written(store.put_object(&a, Some(a.resource_version)).await.unwrap());
        assert_eq!(
            store.put_object(&a, Some(a.resource_version)).await.unwrap(),
            ObjectWrite::Conflict { current: Some(a.resource_version + 1) },
            "an update from a stale resourceVersion conflicts"
        );
        assert_eq!(
            store.put_object(&object("Workspace", "default", "ghost", 1), Some(7)).await.unwrap(),
            ObjectWrite::Conflict { current: None }
        );
        assert_eq!(store.object_revision().await.unwrap(), 2, "a refused write does not use up a revision");
    }

    pub async fn deleting_an_object_takes_a_revision_and_honours_preconditions(s: &Subject) {
        let store = &s.store;
        let a = written(store.put_object(&object("Workspace", "default", "a", 1), None).await.unwrap());
        assert_eq!(
            store.delete_object("Workspace", "default", "a", Some(99)).await.unwrap(),
            ObjectWrite::Conflict { current: Some(a.resource_version) }
        );
        let gone = written(store.delete_object("Workspace", "default", "a", Some(a.resource_version)).await.unwrap());
        assert_eq!((gone.resource_version, gone.uid.as_str()), (2, a.uid.as_str()));
        assert_eq!(store.get_object("Workspace", "default", "a").await.unwrap(), None);
        assert_eq!(
            store.delete_object("Workspace", "default", "a", None).await.unwrap(),
            ObjectWrite::Conflict { current: None }
        );
        let again = written(store.put_object(&object("Workspace", "default", "a", 1), None).await.unwrap());
        assert_eq!(again.resource_version, 3, "the revision never goes back, even after a delete");
    }

    pub async fn objects_survive_reopen(s: &Subject) {
        let mut deleting = object("Workspace", "default", "a", 1);
        deleting.deletion_timestamp = Some("2026-01-02T03:04:06Z".into());
        let a = written(s.store.put_object(&deleting, None).await.unwrap());
        let reopened = s.reopen().await;
        assert_eq!(reopened.get_object("Workspace", "default", "a").await.unwrap(), Some(a));
        assert_eq!(reopened.object_revision().await.unwrap(), 1);
    }
}

/// Declares every case once per store.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let subject = super::Subject::sqlite().await;
                    super::cases::$case(&subject).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(subject) = super::Subject::postgres().await else { return };
                    super::cases::$case(&subject).await;
                }
            )*
        }
    };
}

conformance!(
    first_sight_assigns_a_stable_uuid,
    bump_incarnation_increments_atomically,
    issue_token_stores_only_the_hash,
    token_owner_resolves_live_tokens_only,
    token_owner_tells_whether_the_status_shows_the_agent_online,
    token_owners_resolves_many_hashes_at_once,
    concurrent_lookups_through_the_registry_store_get_their_own_answers,
    revoke_tokens_spares_the_kept_token,
    revoke_stale_tokens_revokes_only_rows_older_than_cutoff,
    a_heartbeat_after_the_look_protects_the_token,
    rotation_expiry_and_single_revocation,
    secrets_are_versioned_scoped_and_deleted,
    revoke_reasons_are_recorded_and_readable,
    record_heartbeat_touches_token_and_workspace,
    revoking_keeps_the_last_heartbeat_and_drops_the_row,
    the_change_log_names_what_changed_but_heartbeats_and_status,
    the_sweep_reads_only_the_workspaces_it_names,
    decisions_are_kept_newest_first_and_trimmed,
    the_fleets_recent_decisions_come_with_their_workspace_newest_first,
    agent_reports_are_written_whole_and_forgotten_with_the_workspace,
    delete_workspace_revokes_tokens_and_forgets_the_record,
    a_claim_gives_a_fresh_workspace_the_members_uid_once,
    mode_override_and_restart_request_round_trip,
    save_status_round_trips_the_whole_status,
    the_store_survives_reopen,
    objects_take_one_global_increasing_resource_version,
    stale_or_duplicate_object_writes_conflict,
    deleting_an_object_takes_a_revision_and_honours_preconditions,
    objects_survive_reopen,
);

/// What only one of the stores has.
mod sqlite_only {
    use super::*;

    #[tokio::test]
    async fn the_state_file_is_created_private_in_wal_mode() {
        let subject = Subject::sqlite().await;
        let Backend::Sqlite { path, .. } = &subject.backend else { unreachable!() };
        let ws = subject.store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        subject.store.issue_token(&ws.uid, 1, t0()).await.unwrap();
        assert!(path.parent().unwrap().is_dir(), "the parent directory is created");
        for file in [path.clone(), path.with_extension("db-wal"), path.with_extension("db-shm")] {
            let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", file.display());
        }
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        let journal: String = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut conn).await.unwrap();
        assert_eq!(journal, "wal");
    }

    /// The stale-token UPDATE finds a workspace's live rows through the partial index.
    #[tokio::test]
    async fn the_stale_token_update_uses_an_index() {
        let subject = Subject::sqlite().await;
        let Backend::Sqlite { path, .. } = &subject.backend else { unreachable!() };
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
        let mut conn = sqlx::SqliteConnection::connect_with(&options).await.unwrap();
        let sql = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", store::sql::REVOKE_STALE_TOKENS));
        let plan: Vec<String> = sqlx::query(sql)
            .bind("uid")
            .bind("2026-11-24T10:00:00.000000Z")
            .bind("2026-11-24T10:00:00.000000Z")
            .bind("container-missing")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX workspace_auth_tokens_live_idx"), "{plan}");

        // The rule's look, too: not the history index (which reads every revoked row).
        let sql = sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {}", store::sqlite::statements().live_tokens));
        let plan: Vec<String> = sqlx::query(sql)
            .bind("uid")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<String, _>("detail"))
            .collect();
        let plan = plan.join("\n");
        assert!(plan.contains("USING INDEX workspace_auth_tokens_live_idx"), "{plan}");
    }

    #[tokio::test]
    async fn an_existing_state_file_is_made_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        store::sqlite::SqliteStore::open(&path).await.unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    #[tokio::test]
    async fn an_unwritable_state_directory_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"").unwrap();
        let error = store::open(&blocker.join("state.db").display().to_string()).await.err().unwrap();
        let message = error.to_string();
        assert!(message.contains("cannot create the state directory") && message.contains("not-a-dir"), "{message}");
    }
}

mod postgres_only {
    use super::*;

    /// The stale-token rule's two statements (its look, `live_tokens`, and its write,
    /// `revoke_stale_tokens`) and the heartbeat flush are served by indexes on a table
    /// with thousands of revoked and live rows. (No statement sweeps all workspaces by
    /// last activity: the heartbeat-path migration dropped the index for that.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stale_token_query_uses_an_index() {
        let Some(subject) = Subject::postgres().await else {
            return;
        };
        let Backend::Postgres { db } = &subject.backend else { unreachable!() };
        let ws = subject.store.ensure_workspace("default/dev-lead", t0()).await.unwrap();
        let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
        sqlx::query(
            "INSERT INTO workspace_auth_tokens (id, workspace_uid, token_hash, prefix, incarnation, created_at, \
                                               last_used_at, revoked_at, revoke_reason) \
             SELECT 'tok-' || i, 'ws-' || (i % 500), md5(i::text) || md5((i + 1)::text), 'prefix00', 1, \
                    $1 - i * interval '1 second', NULL, \
                    CASE WHEN i % 10 = 0 THEN NULL ELSE $1 END, CASE WHEN i % 10 = 0 THEN NULL ELSE 'rotated' END \
             FROM generate_series(1, 20000) AS i",
        )
        .bind(t0())
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE workspace_auth_tokens").execute(&mut conn).await.unwrap();

        let plan = |sql: &'static str| {
            let sql = sqlx::AssertSqlSafe(format!("EXPLAIN {sql}"));
            sqlx::query_scalar::<_, String>(sql)
        };
        let lines = |rows: Vec<String>| rows.join("\n");

        let update = plan(store::sql::REVOKE_STALE_TOKENS)
            .bind(&ws.uid)
            .bind(t0())
            .bind(t0())
            .bind("container-missing")
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let update = lines(update);
        eprintln!("revoke_stale_tokens:\n{update}");
        assert!(update.contains("workspace_auth_tokens_live_idx") && !update.contains("Seq Scan"), "{update}");

        let look =
            lines(plan(&store::postgres::statements().live_tokens).bind("ws-7").fetch_all(&mut conn).await.unwrap());
        eprintln!("live_tokens:\n{look}");
        assert!(look.contains("workspace_auth_tokens_live_idx") && !look.contains("Seq Scan"), "{look}");

        let ids: Vec<String> = (1..=50).map(|i| format!("tok-{}", i * 10)).collect();
        let uids: Vec<String> = (1..=50).map(|i| format!("ws-{}", (i * 10) % 500)).collect();
        let times = vec![t0(); 50];
        let flush = plan(&store::postgres::statements().record_heartbeats)
            .bind(&ids)
            .bind(&uids)
            .bind(&times)
            .fetch_all(&mut conn)
            .await
            .unwrap();
        let flush = lines(flush);
        eprintln!("record_heartbeats:\n{flush}");
        assert!(
            flush.contains("heartbeats_pkey") && !flush.contains("Seq Scan on workspace_auth_tokens"),
            "each heartbeat finds its token by an index and its row by the primary key: {flush}"
        );
    }

    /// "Database down" is a prompt, clear error, not a hang.
    #[tokio::test]
    async fn an_unreachable_database_is_a_prompt_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let started = std::time::Instant::now();
        let error = store::open(&format!("postgres://postgres@127.0.0.1:{port}/molecule")).await.err().unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(7), "took {:?}", started.elapsed());
        let message = error.to_string();
        assert!(message.contains("unreachable") && message.contains(&format!("127.0.0.1:{port}")), "{message}");
        assert_eq!(error.metric_label(), "store_database");
    }
}
