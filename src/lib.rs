//! molecule-operator: keeps AI-agent workspace containers and their auth tokens
//! matching what users declare. See DESIGN.md for the architecture.

pub mod api;
pub mod cli;
pub mod cluster;
pub mod compact;
pub mod config;
pub mod execute;
pub mod health;
pub mod kubeapi;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod observe;
pub mod operator;
pub mod reconcile;
pub mod registry;
pub mod rules;
pub mod runtime;
pub mod secrets;
pub mod source;
pub mod status;
pub mod store;
pub mod telemetry;
pub mod trigger;
