//! TODO
pub mod metrics;
