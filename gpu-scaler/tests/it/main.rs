//! The gpu-scaler integration tests, one test binary: each former test
//! file is a module here (`cargo test -p gpu-scaler --test it <module>::`),
//! so the workspace links this crate's tests once.

mod common;
mod nvml;
mod ops;
mod scaler;
