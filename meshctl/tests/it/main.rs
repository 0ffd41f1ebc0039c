//! The meshctl integration tests, one test binary: each former test
//! file is a module here (`cargo test -p meshctl --test it <module>::`),
//! so the workspace links this crate's tests once.

mod audit;
mod docs;
mod guardrails;
mod meshctl;
mod power_loss;
mod prove;
mod pub_tail;
mod reference;
mod replicas;
mod stdout;
mod support;
mod ui;
