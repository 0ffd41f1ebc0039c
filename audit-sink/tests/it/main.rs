//! The audit-sink integration tests, one test binary: each former test
//! file is a module here (`cargo test -p audit-sink --test it <module>::`),
//! so the workspace links this crate's tests once.

mod common;
mod current_clickhouse;
mod deployment_docs;
mod guardrails;
mod integrity;
mod ops;
mod queries;
mod resilience;
mod sink;
