//! Shared helpers for the policy-worker tests: a real nats-server, the real
//! `policy-worker` binary, and readers for what landed in each stream.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails; shared by several test binaries, each using a part of it"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use bytes::Bytes;
use schemas::{DecisionReceipt, EventBuilder, EventBuilderV10, encode_binary};
use testkit::{NatsServer, Service, eventually};

pub(crate) const WAIT: Duration = Duration::from_secs(30);

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

pub(crate) struct Mesh {
    pub nats: NatsServer,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Mesh {
    /// A fresh server with the streams applied.
    pub(crate) async fn start() -> Self {
        let nats = NatsServer::start().await.unwrap();
        let client = nats.connect().await.unwrap();
        let js = jetstream::new(client.clone());
        broker_config::apply(&js, &broker_config::Options::default())
            .await
            .unwrap();
        Self { nats, client, js }
    }

    pub(crate) async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) {
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    pub(crate) async fn publish_event(&self, subject: &str, event: &schemas::Event) {
        let (headers, payload) = encode_binary(event);
        self.publish(subject, headers, payload).await;
    }

    pub(crate) async fn stream(&self, name: &str) -> Stream {
        self.js.get_stream(name).await.unwrap()
    }

    /// Every message stored in `stream`, in order.
    pub(crate) async fn messages(
        &self,
        name: &str,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        testkit::stream_messages(&self.js, name).await.unwrap()
    }

    pub(crate) async fn count(&self, name: &str) -> u64 {
        self.stream(name).await.info().await.unwrap().state.messages
    }

    /// Waits until `stream` holds at least `n` messages and returns them.
    pub(crate) async fn wait_messages(
        &self,
        name: &str,
        n: u64,
    ) -> Vec<async_nats::jetstream::message::StreamMessage> {
        eventually(WAIT, &format!("{n} messages in {name}"), || async move {
            (self.count(name).await >= n).then_some(())
        })
        .await
        .unwrap();
        self.messages(name).await
    }

    /// Waits for the receipt of `event_id` and returns it.
    pub(crate) async fn receipt(&self, event_id: &str) -> DecisionReceipt {
        eventually(
            WAIT,
            &format!("the receipt of `{event_id}`"),
            || async move {
                self.receipts()
                    .await
                    .into_iter()
                    .find(|r| r.event_id == event_id)
            },
        )
        .await
        .unwrap()
    }

    pub(crate) async fn receipts(&self) -> Vec<DecisionReceipt> {
        self.messages(schemas::subjects::STREAM_DECISION)
            .await
            .iter()
            .map(|m| serde_json::from_slice(&m.payload).unwrap())
            .collect()
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

/// Header values of `name` (exact case), for assertions.
pub(crate) fn header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.as_str().to_owned())
}
