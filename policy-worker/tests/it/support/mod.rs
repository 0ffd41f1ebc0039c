//! Shared helpers for the policy-worker tests: the real `policy-worker`
//! binary run against `testkit`'s mesh (a real nats-server; readers for what
//! landed in each stream), and the events the tests publish.

#![allow(
    dead_code,
    unused_imports,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails; shared by several test binaries, each using a part of it"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

use schemas::{EventBuilder, EventBuilderV10};
use testkit::Service;

pub(crate) use testkit::{Mesh, WAIT, header};

/// A copy of the shipped `policies/` in a temp dir the test may edit.
pub(crate) fn policies_copy() -> tempfile::TempDir {
    testkit::policies_copy().unwrap()
}

/// The `policy-worker` binary, running against a test server.
pub(crate) struct WorkerProcess {
    service: Service,
}

impl WorkerProcess {
    pub(crate) async fn start(nats_url: &str, policies: &Path, extra: &[&str]) -> Self {
        let ready = tempfile::NamedTempFile::new().unwrap().into_temp_path();
        let ready_path: PathBuf = ready.to_path_buf();
        std::fs::remove_file(&ready_path).ok();
        let mut service = Service::spawn(
            Command::new(env!("CARGO_BIN_EXE_policy-worker"))
                .args(["--nats-url", nats_url, "--policies"])
                .arg(policies)
                .arg("--ready-file")
                .arg(&ready_path)
                .args(["--ack-wait-secs", "2"])
                .args(extra)
                .env("RUST_LOG", "info"),
        )
        .unwrap();
        let check = ready_path.clone();
        service
            .wait_until(WAIT, "the policy worker to become ready", || {
                let ready = check.exists();
                async move { ready.then_some(()) }
            })
            .await
            .unwrap_or_else(|e| panic!("policy-worker exited at start: {e}"));
        Self { service }
    }

    pub(crate) fn log_text(&self) -> String {
        self.service.log_text()
    }

    pub(crate) async fn wait_for_log(&self, needle: &str) {
        self.service
            .log()
            .wait_for(WAIT, needle)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// SIGKILL, as a crash.
    pub(crate) fn kill(&mut self) {
        self.service.kill();
    }

    pub(crate) fn signal(&mut self, signal: &str) {
        self.service.signal(signal).unwrap();
    }
}

pub(crate) fn event(id: &str, agent: &str, ty: &str) -> EventBuilderV10 {
    EventBuilderV10::new()
        .id(id)
        .source(format!("/agents/{agent}"))
        .ty(format!("io.agentmesh.{ty}"))
}

pub(crate) fn handoff(id: &str) -> schemas::Event {
    event(id, "planner", "task.handoff")
        .extension("target", "coder")
        .extension(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .data(
            "application/json",
            serde_json::json!({"task": "implement the parser"}),
        )
        .build()
        .unwrap()
}
