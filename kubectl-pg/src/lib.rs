//! `kubectl pg`: the kubectl plugin of postgres-operator. Every command reads or writes through the
//! Kubernetes API only (as kubectl does), through the contract in `api::contract`: it never talks
//! to PostgreSQL itself, except `psql`, which runs the user's psql against a Service or a pod.
//!
//! Decide, then act: `view`, `render`, `switchover::choose_target`, `fence::FenceList` and the
//! argument checks in `cli` are pure and unit-tested; `commands` talks to the API server.

pub mod cli;
pub mod commands;
pub mod connect;
pub mod error;
pub mod fence;
pub mod lsn;
pub mod psql;
pub mod render;
pub mod restart;
pub mod switchover;
pub mod view;

pub use error::Error;
