//! The mesh a test runs against: a nats-server of its own with the mesh's
//! streams and buckets applied (as `broker-config` does in production),
//! optionally a ClickHouse server with a database of the test's own, and
//! service binaries started against them; plus readers for what landed in
//! the streams (receipts, messages, header values).
//!
//! Services are started by their binary's path ([`Mesh::spawn`]), never
//! linked here: a crate that tests with `testkit` does not link the services.
//! A test crate that runs a service in-process wraps a [`Mesh`] in a harness
//! of its own (`Deref` to the mesh).

use std::process::Command;

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::StreamMessage, stream::Stream};
use bytes::Bytes;
use schemas::DecisionReceipt;

use crate::{ClickHouseServer, NatsServer, Service, WAIT, eventually};

/// A nats-server with the mesh's streams and buckets, a client on it, an
/// optional ClickHouse server, and the services started against them
/// (killed when the mesh drops).
pub struct Mesh {
    /// The broker.
    pub nats: NatsServer,
    /// A client of the broker (no credentials: the test server has none).
    pub client: async_nats::Client,
    /// JetStream on [`Mesh::client`].
    pub js: jetstream::Context,
    clickhouse: Option<(ClickHouseServer, String)>,
    services: Vec<Service>,
}

impl Mesh {
    /// A fresh nats-server with the streams and buckets applied.
    pub async fn start() -> anyhow::Result<Self> {
        let nats = NatsServer::start().await?;
        let client = nats.connect().await?;
        let js = jetstream::new(client.clone());
        broker_config::apply(&js, &broker_config::Options::default())
            .await
            .context("applying the mesh's streams and buckets")?;
        Ok(Self {
            nats,
            client,
            js,
            clickhouse: None,
            services: Vec::new(),
        })
    }

    /// [`Mesh::start`] and a ClickHouse server with a fresh database named
    /// after `database` ([`ClickHouseServer::unique_database`]).
    pub async fn with_clickhouse(database: &str) -> anyhow::Result<Self> {
        let mut mesh = Self::start().await?;
        let ch = ClickHouseServer::start().await?;
        let db = ch.unique_database(database);
        mesh.clickhouse = Some((ch, db));
        Ok(mesh)
    }

    /// The broker's URL.
    pub fn url(&self) -> String {
        self.nats.url()
    }

    /// The ClickHouse server; panics on a mesh started without one
    /// (a test's own mistake).
    pub fn ch(&self) -> &ClickHouseServer {
        &self.clickhouse_and_db().0
    }

    /// The ClickHouse server, to stop and start it again.
    pub fn ch_mut(&mut self) -> &mut ClickHouseServer {
        match &mut self.clickhouse {
            Some((ch, _)) => ch,
            None => panic!("this mesh was started without ClickHouse (Mesh::with_clickhouse)"),
        }
    }

    /// The test's database on [`Mesh::ch`].
    pub fn db(&self) -> &str {
        &self.clickhouse_and_db().1
    }

    fn clickhouse_and_db(&self) -> &(ClickHouseServer, String) {
        match &self.clickhouse {
            Some(ch) => ch,
            None => panic!("this mesh was started without ClickHouse (Mesh::with_clickhouse)"),
        }
    }

    /// Starts `command` (a service binary, by path) as a [`Service`] that
    /// lives as long as the mesh; returns its index for [`Mesh::service`].
    pub fn spawn(&mut self, command: &mut Command) -> anyhow::Result<usize> {
        self.services.push(Service::spawn(command)?);
        Ok(self.services.len() - 1)
    }

    /// A service started by [`Mesh::spawn`].
    pub fn service(&mut self, index: usize) -> Option<&mut Service> {
        self.services.get_mut(index)
    }

    /// Publishes to JetStream and waits for the stream's acknowledgement.
    pub async fn publish(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: impl Into<Bytes>,
    ) -> anyhow::Result<()> {
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload.into())
            .await?
            .await
            .with_context(|| format!("JetStream did not store the message on `{subject}`"))?;
        Ok(())
    }

    /// Publishes `event` in binary content mode.
    pub async fn publish_event(&self, subject: &str, event: &schemas::Event) -> anyhow::Result<()> {
        let (headers, payload) = schemas::encode_binary(event);
        self.publish(subject, headers, payload).await
    }

    /// Stream `name`.
    pub async fn stream(&self, name: &str) -> anyhow::Result<Stream> {
        self.js
            .get_stream(name)
            .await
            .with_context(|| format!("getting stream {name}"))
    }

    /// Every message stored in stream `name`, in order.
    pub async fn messages(&self, name: &str) -> anyhow::Result<Vec<StreamMessage>> {
        crate::stream_messages(&self.js, name).await
    }

    /// The messages of stream `name` on exactly `subject`.
    pub async fn messages_on(
        &self,
        name: &str,
        subject: &str,
    ) -> anyhow::Result<Vec<StreamMessage>> {
        crate::subject_messages(&self.js, name, subject).await
    }

    /// How many messages stream `name` holds.
    pub async fn count(&self, name: &str) -> anyhow::Result<u64> {
        Ok(self.stream(name).await?.info().await?.state.messages)
    }

    /// Waits (up to [`WAIT`]) until stream `name` holds at least `n`
    /// messages and returns them.
    pub async fn wait_messages(&self, name: &str, n: u64) -> anyhow::Result<Vec<StreamMessage>> {
        eventually(WAIT, &format!("{n} messages in {name}"), || async move {
            (self.count(name).await.ok()? >= n).then_some(())
        })
        .await?;
        self.messages(name).await
    }

    /// The message at `sequence` of stream `name`.
    pub async fn message_at(&self, name: &str, sequence: u64) -> anyhow::Result<StreamMessage> {
        self.stream(name)
            .await?
            .get_raw_message(sequence)
            .await
            .with_context(|| format!("reading message {sequence} of stream {name}"))
    }

    /// Every decision receipt in `MESH_DECISION`, in order.
    pub async fn receipts(&self) -> anyhow::Result<Vec<DecisionReceipt>> {
        receipts(&self.js).await
    }

    /// Waits (up to [`WAIT`]) for the receipt of `event_id` and returns it.
    pub async fn receipt(&self, event_id: &str) -> anyhow::Result<DecisionReceipt> {
        receipt(&self.js, event_id).await
    }

    /// Pending and unacknowledged counts of agent `id`'s delivery consumer.
    pub async fn backlog(&self, id: &str) -> anyhow::Result<(u64, usize)> {
        let stream = self.stream(schemas::subjects::STREAM_DELIVER).await?;
        let info = stream
            .consumer_info(schemas::subjects::agent_consumer(id))
            .await?;
        Ok((info.num_pending, info.num_ack_pending))
    }
}

/// Every decision receipt in `MESH_DECISION` readable by `js`, in order.
pub async fn receipts(js: &jetstream::Context) -> anyhow::Result<Vec<DecisionReceipt>> {
    crate::stream_messages(js, schemas::subjects::STREAM_DECISION)
        .await?
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).context("a receipt that does not parse"))
        .collect()
}

/// Waits (up to [`WAIT`]) until `MESH_DECISION` holds the receipt of
/// `event_id` and returns it.
pub async fn receipt(js: &jetstream::Context, event_id: &str) -> anyhow::Result<DecisionReceipt> {
    eventually(
        WAIT,
        &format!("the receipt of `{event_id}`"),
        || async move {
            crate::stream_messages(js, schemas::subjects::STREAM_DECISION)
                .await
                .ok()?
                .iter()
                .filter_map(|m| serde_json::from_slice::<DecisionReceipt>(&m.payload).ok())
                .find(|r| r.event_id == event_id)
        },
    )
    .await
}

/// What carries NATS headers: a header map, a stored message, a message.
pub trait Headers {
    /// The headers, if any.
    fn header_map(&self) -> Option<&HeaderMap>;
}

impl<T: Headers + ?Sized> Headers for &T {
    fn header_map(&self) -> Option<&HeaderMap> {
        (**self).header_map()
    }
}

impl Headers for HeaderMap {
    fn header_map(&self) -> Option<&HeaderMap> {
        Some(self)
    }
}

impl Headers for StreamMessage {
    fn header_map(&self) -> Option<&HeaderMap> {
        Some(&self.headers)
    }
}

impl Headers for async_nats::Message {
    fn header_map(&self) -> Option<&HeaderMap> {
        self.headers.as_ref()
    }
}

impl Headers for jetstream::Message {
    fn header_map(&self) -> Option<&HeaderMap> {
        self.message.headers.as_ref()
    }
}

/// The value of header `name` (exact case) on `of`, for assertions.
pub fn header(of: &impl Headers, name: &str) -> Option<String> {
    of.header_map()?.get(name).map(|v| v.as_str().to_owned())
}
