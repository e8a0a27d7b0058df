//! Helpers shared by integration tests. A test file uses them with `mod support;`
//! (each test binary compiles its own copy, so unused helpers are not warnings).
#![allow(dead_code)]

pub mod docker;
pub mod kubeapi;
pub mod marionette;
pub mod mockapi;
pub mod operator;
pub mod postgres;
pub mod proxy;
pub mod registry;
pub mod webdriver;
