//! The operator's domain types: what the rules decide on, the registry answers
//! with, the CLI prints and the stores keep. A leaf module: no IO, and nothing of
//! the crate but `crate::api`, so every layer can import it without a cycle (as
//! linkerd's `policy-controller/core`). One file per concept.

pub mod agent_report;
pub mod container;
pub mod decision;
pub mod heartbeat;
pub mod quantity;
pub mod secret;
pub mod token;
pub mod usage;
pub mod workspace;

pub use agent_report::{AgentReport, DeliveryMode};
pub use decision::DecisionRecord;
pub use heartbeat::Heartbeat;
pub use secret::SecretRow;
pub use token::{IssuedToken, RevokeReason, TokenOwner, TokenRow};
pub use workspace::{Claim, LifecycleState, SuspendCause, Suspension, WorkspaceRecord, shows_agent_online};

#[cfg(test)]
mod tests {
    /// The module stays a leaf: outside tests and comments, its files name nothing of
    /// the crate but `crate::api`, and no IO (the stores, the runtime and the server import it,
    /// never the other way round).
    #[test]
    fn the_model_names_nothing_of_the_crate_but_the_api_and_does_no_io() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/model");
        let mut read = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            // The code outside tests, without comments (which may name other modules).
            let code: String = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .filter(|line| !line.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for (at, _) in code.match_indices("crate::") {
                let named = &code[at..code.len().min(at + 40)];
                assert!(named.starts_with("crate::api"), "{} names {named}", path.display());
            }
            for io in ["super::super", "sqlx", "tokio", "bollard", "std::fs", "std::net", "std::process"] {
                assert!(!code.contains(io), "{} uses {io}", path.display());
            }
            read += 1;
        }
        assert!(read >= 6, "read only {read} files in {}", dir.display());
    }
}
