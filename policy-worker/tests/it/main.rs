//! The policy-worker integration tests, one test binary: each former test
//! file is a module here (`cargo test -p policy-worker --test it <module>::`),
//! so the workspace links this crate's tests once.

mod cache;
mod flows;
mod guardrails;
mod interop;
mod ops;
mod resilience;
mod signing;
mod support;
mod worker;
