//! One stream into one table: a durable pull consumer feeding a batched
//! `Inserter`, with acks held until the insert holding a message succeeded.
//!
//! While ClickHouse is unreachable or failing, the open batch (bounded by the
//! inserter's row and byte limits) is kept, nothing more is pulled, held
//! messages get progress acks so JetStream does not hand them out again, and
//! the insert is retried with exponential backoff. Once it succeeds the batch
//! is acked. If the sink dies meanwhile, the unacked messages are redelivered
//! to the next run; the rows that made it twice collapse (ReplacingMergeTree).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, message::Acker};
use clickhouse::{Client, RowOwned, RowWrite, inserter::Inserter};
use futures::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rows::{self, Meta};
use crate::{Error, schema};

/// Batching and retry settings shared by the three tables.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub database: String,
    pub clickhouse_url: String,
    pub retention_days: u32,
    pub batch_rows: u64,
    pub batch_bytes: u64,
    pub batch_period: Duration,
    pub insert_timeout: Duration,
    pub ack_wait: Duration,
    pub retry_max: Duration,
    pub shutdown_grace: Duration,
    pub metrics: telemetry::SinkMetrics,
}

/// What differs between the three tables.
pub(crate) trait Table: Send + Sync + 'static {
    /// The row type.
    type Row: RowOwned + RowWrite + serde::Serialize + Send + Sync;
    /// The table name.
    const TABLE: &'static str;
    /// The stream read.
    const STREAM: &'static str;
    /// The durable consumer's name.
    const DURABLE: &'static str;
    /// Builds the row for one message; never fails.
    fn row(subject: &str, headers: Option<&HeaderMap>, payload: &[u8], meta: &Meta) -> Self::Row;
    /// The trace context the row's message carried, linked from the batch span.
    fn traceparent(_row: &Self::Row) -> Option<schemas::TraceParent> {
        None
    }
}

/// `events` from `MESH_INGRESS`.
pub(crate) struct Events;
impl Table for Events {
    type Row = rows::EventRow;
    const TABLE: &'static str = schema::EVENTS;
    const STREAM: &'static str = schemas::subjects::STREAM_INGRESS;
    const DURABLE: &'static str = "audit-sink-events";
    fn row(subject: &str, headers: Option<&HeaderMap>, payload: &[u8], meta: &Meta) -> Self::Row {
        rows::event_row(subject, headers, payload, meta)
    }
    fn traceparent(row: &Self::Row) -> Option<schemas::TraceParent> {
        row.traceparent.parse().ok()
    }
}

/// `decisions` from `MESH_DECISION`.
pub(crate) struct Decisions;
impl Table for Decisions {
    type Row = rows::DecisionRow;
    const TABLE: &'static str = schema::DECISIONS;
    const STREAM: &'static str = schemas::subjects::STREAM_DECISION;
    const DURABLE: &'static str = "audit-sink-decisions";
    fn row(subject: &str, _headers: Option<&HeaderMap>, payload: &[u8], meta: &Meta) -> Self::Row {
        rows::decision_row(subject, payload, meta)
    }
}

/// `gpu_leases` from `MESH_GPU`.
pub(crate) struct GpuLeases;
impl Table for GpuLeases {
    type Row = rows::GpuLeaseRow;
    const TABLE: &'static str = schema::GPU_LEASES;
    const STREAM: &'static str = schemas::subjects::STREAM_GPU;
    const DURABLE: &'static str = "audit-sink-gpu";
    fn row(subject: &str, headers: Option<&HeaderMap>, payload: &[u8], meta: &Meta) -> Self::Row {
        rows::gpu_lease_row(subject, headers, payload, meta)
    }
}

/// Creates (or finds) the table's durable consumer.
pub(crate) async fn consumer<T: Table>(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Error> {
    let err = |source: async_nats::Error| Error::Consumer {
        durable: T::DURABLE,
        source,
    };
    let stream = js.get_stream(T::STREAM).await.map_err(|e| err(e.into()))?;
    let config = pull::Config {
        durable_name: Some(T::DURABLE.to_owned()),
        description: Some(format!("audit sink: every message into `{}`", T::TABLE)),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: settings.ack_wait,
        // Never give up on a message: it must reach ClickHouse.
        max_deliver: -1,
        // The server-side bound on what this consumer holds unacked: a full
        // batch plus one pull's worth in flight.
        max_ack_pending: i64::try_from(settings.batch_rows.saturating_mul(2)).unwrap_or(i64::MAX),
        ..Default::default()
    };
    match stream.create_consumer(config).await {
        Ok(consumer) => Ok(consumer),
        Err(create) => {
            // An existing consumer whose settings differ (an older version,
            // another ack wait) is still the right cursor: keep it.
            let consumer = stream
                .get_consumer::<pull::Config>(T::DURABLE)
                .await
                .map_err(|_| err(create.into()))?;
            tracing::warn!(
                durable = T::DURABLE,
                "Existing consumer kept with its own settings."
            );
            Ok(consumer)
        }
    }
}

/// The open batch: rows written to the current insert, kept to replay it,
/// and the acks to send once it is committed.
struct Writer<R: RowOwned + RowWrite + serde::Serialize> {
    client: Client,
    ddl_client: Client,
    table: &'static str,
    settings: Settings,
    inserter: Option<Inserter<R>>,
    rows: Vec<R>,
    acks: Vec<Acker>,
    metrics: telemetry::TableMetrics,
    /// The open batch's `audit.batch` span and how many links it has.
    span: Option<(tracing::Span, usize)>,
}

impl<R: RowOwned + RowWrite + serde::Serialize + Send + Sync> Writer<R> {
    fn new(client: Client, ddl_client: Client, table: &'static str, settings: Settings) -> Self {
        Self {
            metrics: settings.metrics.table(table),
            span: None,
            client,
            ddl_client,
            table,
            settings,
            inserter: None,
            rows: Vec::new(),
            acks: Vec::new(),
        }
    }

    fn inserter(&mut self) -> &mut Inserter<R> {
        let (client, table, s) = (&self.client, self.table, &self.settings);
        self.inserter.get_or_insert_with(|| {
            client
                .inserter::<R>(table)
                .with_max_rows(s.batch_rows)
                .with_max_bytes(s.batch_bytes)
                .with_period(Some(s.batch_period))
                .with_timeouts(Some(s.insert_timeout), Some(s.insert_timeout))
        })
    }

    /// Time until the period flush is due.
    fn time_left(&mut self) -> Duration {
        self.inserter()
            .time_left()
            .unwrap_or(self.settings.batch_period)
    }

    /// Adds one message's row; commits when a limit is reached. `Err` means
    /// the insert failed and [`Writer::recover`] must run.
    async fn push(
        &mut self,
        row: R,
        ack: Acker,
        trace: Option<schemas::TraceParent>,
    ) -> Result<(), clickhouse::error::Error> {
        self.metrics.received();
        let table = self.table;
        let (span, links) = self
            .span
            .get_or_insert_with(|| (telemetry::spans::sink_batch(table), 0));
        if let Some(tp) = trace
            && *links < telemetry::spans::MAX_LINKS
        {
            telemetry::spans::link(span, &tp);
            *links += 1;
        }
        let written = self.inserter().write(&row).await;
        // Kept before anything can fail, so a replay includes it.
        self.rows.push(row);
        self.acks.push(ack);
        if let Err(e) = written {
            self.inserter = None;
            return Err(e);
        }
        self.commit(false).await
    }

    /// Commits when a limit (rows, bytes, period) is reached, or now when `force`.
    async fn commit(&mut self, force: bool) -> Result<(), clickhouse::error::Error> {
        let inserter = self.inserter();
        let result = if force {
            inserter.force_commit().await
        } else {
            inserter.commit().await
        };
        match result {
            Ok(q) if q.rows > 0 => {
                tracing::debug!(
                    table = self.table,
                    rows = q.rows,
                    bytes = q.bytes,
                    "Batch inserted."
                );
                self.metrics.inserted(q.rows);
                if let Some((span, _)) = self.span.take() {
                    // Dropped here: the span ends once the batch is in.
                    span.record("rows", q.rows);
                }
                self.acknowledge().await;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(e) => {
                // A failed inserter cannot be used again; the rows it had are
                // still in `self.rows`.
                self.inserter = None;
                Err(e)
            }
        }
    }

    async fn acknowledge(&mut self) {
        self.rows.clear();
        for ack in self.acks.drain(..) {
            if let Err(e) = ack.ack().await {
                // Not fatal: JetStream redelivers it and the row collapses.
                tracing::warn!(table = self.table, error = %e, "Ack failed; the message will come again.");
            }
        }
    }

    async fn replay(&mut self) -> Result<(), clickhouse::error::Error> {
        let rows = std::mem::take(&mut self.rows);
        let mut result = Ok(());
        for row in &rows {
            if let Err(e) = self.inserter().write(row).await {
                self.inserter = None;
                result = Err(e);
                break;
            }
        }
        self.rows = rows;
        result?;
        self.commit(true).await
    }

    /// Retries the open batch until it is inserted or `until` says stop.
    /// Returns whether the batch is in.
    async fn recover(
        &mut self,
        first: clickhouse::error::Error,
        until: &CancellationToken,
        deadline: Option<Instant>,
    ) -> bool {
        let mut error = first;
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 1u32;
        let progress_every = (self.settings.ack_wait / 3).max(Duration::from_millis(200));
        let mut next_progress = Instant::now();
        loop {
            self.metrics.insert_failed();
            if let Some((span, _)) = &self.span {
                span.record("insert_errors", attempt);
            }
            tracing::warn!(
                table = self.table,
                clickhouse = %self.settings.clickhouse_url,
                rows_held = self.rows.len(),
                attempt,
                retry_in = ?backoff,
                error = %error,
                "Waiting for ClickHouse: insert failed; holding the batch unacked and pulling nothing more."
            );
            let wake = Instant::now() + backoff;
            loop {
                if Instant::now() >= next_progress {
                    for ack in &self.acks {
                        // Keeps JetStream from handing these to another run meanwhile.
                        let _ = ack.ack_with(AckKind::Progress).await;
                    }
                    next_progress = Instant::now() + progress_every;
                }
                let until_wake = wake.min(next_progress);
                let until_wake = deadline.map_or(until_wake, |d| until_wake.min(d));
                tokio::select! {
                    _ = until.cancelled() => return false,
                    _ = tokio::time::sleep_until(until_wake) => {}
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return false;
                }
                if Instant::now() >= wake {
                    break;
                }
            }
            let result = match self.replay().await {
                Ok(()) => Ok(()),
                // The server may have come back empty (or someone dropped the
                // table): create what is missing, then replay once more. Only
                // after a failed replay, so a working insert needs no schema
                // queries (nor `MODIFY TTL`) before it.
                Err(e) => match schema::ensure(
                    &self.ddl_client,
                    &self.settings.database,
                    self.settings.retention_days,
                )
                .await
                {
                    Ok(_) => self.replay().await,
                    Err(_) => Err(e),
                },
            };
            match result {
                Ok(()) => {
                    tracing::info!(
                        table = self.table,
                        attempt,
                        "ClickHouse is back; held batch inserted and acked."
                    );
                    return true;
                }
                Err(e) => error = e,
            }
            attempt += 1;
            backoff = (backoff * 2).min(self.settings.retry_max);
        }
    }

    /// Commits what is open, retrying until the grace period ends.
    async fn finish(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let deadline = Instant::now() + self.settings.shutdown_grace;
        // After a failed insert (shutdown came while `recover` waited) no
        // inserter is open and the rows are only in `self.rows`: a fresh
        // inserter would commit nothing, so they are replayed.
        let first = if self.inserter.is_some() {
            self.commit(true).await
        } else {
            self.replay().await
        };
        if let Err(e) = first {
            let never = CancellationToken::new();
            if !self.recover(e, &never, Some(deadline)).await {
                tracing::warn!(
                    table = self.table,
                    rows = self.rows.len(),
                    "Shutting down with a batch not inserted: left unacked, JetStream redelivers it to the next run."
                );
            }
        }
    }
}

/// Runs one table's pipeline until `shutdown`.
pub(crate) async fn run<T: Table>(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    client: Client,
    ddl_client: Client,
    settings: Settings,
    shutdown: CancellationToken,
) {
    let mut writer = Writer::<T::Row>::new(client, ddl_client, T::TABLE, settings.clone());
    let mut messages = None;
    let mut reopen_backoff = Duration::from_millis(100);
    loop {
        if messages.is_none() {
            let pull = consumer
                .stream()
                .max_messages_per_batch(
                    usize::try_from(settings.batch_rows.clamp(1, 1000)).unwrap_or(1000),
                )
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await;
            match pull {
                Ok(stream) => {
                    messages = Some(stream);
                    reopen_backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    tracing::warn!(durable = T::DURABLE, error = %e, retry_in = ?reopen_backoff, "Cannot pull from JetStream; retrying.");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(reopen_backoff) => {}
                    }
                    reopen_backoff = (reopen_backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
        }
        let Some(stream) = messages.as_mut() else {
            continue;
        };
        let tick = writer.time_left();
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(tick) => writer.commit(false).await,
            next = stream.next() => match next {
                Some(Ok(message)) => {
                    let meta = match message.info() {
                        Ok(info) => Meta {
                            stream: T::STREAM.to_owned(),
                            stream_seq: info.stream_sequence,
                            received_us: i64::try_from(info.published.unix_timestamp_nanos() / 1000).unwrap_or(0),
                        },
                        Err(_) => Meta { stream: T::STREAM.to_owned(), stream_seq: 0, received_us: 0 },
                    };
                    let (message, acker) = message.split();
                    let row = T::row(message.subject.as_str(), message.headers.as_ref(), &message.payload, &meta);
                    let trace = T::traceparent(&row);
                    writer.push(row, acker, trace).await
                }
                Some(Err(e)) => {
                    tracing::warn!(durable = T::DURABLE, error = %e, "Pull interrupted; reopening.");
                    messages = None;
                    Ok(())
                }
                None => {
                    messages = None;
                    Ok(())
                }
            },
        };
        if let Err(e) = outcome
            && !writer.recover(e, &shutdown, None).await
        {
            break;
        }
    }
    writer.finish().await;
}
