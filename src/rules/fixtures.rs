//! Test fixtures for rules.
