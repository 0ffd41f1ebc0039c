//! One stream into one table: a durable pull consumer feeding batched
//! inserts, with acks held until the insert holding a message succeeded.
//! Inserts are pipelined: while one batch's insert ends on its own task, the
//! next batch is pulled and streamed to ClickHouse (at most one batch
//! commits at a time; the consumer's `max_ack_pending` of two batches lets
//! the next one come meanwhile). Acks go out without waiting for an answer.
//!
//! While ClickHouse is unreachable or failing, the open batch (bounded by the
//! batch's row and byte limits) is kept, nothing more is pulled, held
//! messages get progress acks so JetStream does not hand them out again, and
//! the insert is retried with exponential backoff. Once it succeeds the batch
//! is acked. If the sink dies meanwhile, the unacked messages are redelivered
//! to the next run; the rows that made it twice collapse (ReplacingMergeTree).
//!
//! A batch the server refuses because of its data (a server exception that
//! retrying cannot fix, see [`refusal`]) is tried once more on its own and
//! then bisected: the halves are inserted on their own until each refused
//! row stands alone; those rows go
//! to the `rejected` table with the server's error and their message, the
//! rest into the table, and then the whole batch is acked. So one bad row
//! never stops the rows after it. Should the server fail otherwise on the
//! way (down, timeout), the batch is held and retried as above; the rows
//! that made it meanwhile collapse with their retry.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind, consumer::pull, message::Acker};
use clickhouse::{Client, RowOwned, RowWrite, insert::Insert};
use futures::StreamExt;
use telemetry::BatchCut;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::rows::{self, Meta, Origin};
use crate::{Error, schema};

/// One ClickHouse server the sink may write to: a replica of the shard
/// when there are several.
#[derive(Clone)]
pub(crate) struct Endpoint {
    /// Its HTTP URL, for the logs.
    pub url: String,
    /// A client with the audit database as default.
    pub client: Client,
    /// A client without a default database, for the schema.
    pub ddl: Client,
}

/// Batching and retry settings shared by the three tables.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub database: String,
    pub engine: schema::Engine,
    pub retention_days: u32,
    pub batch_rows: u64,
    pub batch_bytes: u64,
    pub batch_period: Duration,
    /// Flush once no message came for this long (zero: never for this reason).
    pub batch_idle: Duration,
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
    /// Takes the message's data out of its row (`--redacted-original drop`).
    fn drop_data(_row: &mut Self::Row) {}
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
    fn drop_data(row: &mut Self::Row) {
        row.drop_data();
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

/// ClickHouse error codes of a failed insert that are no fault of the rows
/// (the server, its resources, its configuration or the schema being
/// created or changed): the batch is held and retried, never bisected.
const RETRY_CODES: &[u32] = &[
    3,    // UNEXPECTED_END_OF_FILE: the body was cut
    8,    // THERE_IS_NO_COLUMN
    10,   // NOT_FOUND_COLUMN_IN_BLOCK
    16,   // NO_SUCH_COLUMN_IN_TABLE: a column still to be added
    32,   // ATTEMPT_TO_READ_AFTER_EOF: the body was cut
    33,   // CANNOT_READ_ALL_DATA: the body was cut, or the table's types differ
    47,   // UNKNOWN_IDENTIFIER
    60,   // UNKNOWN_TABLE: the schema is being created
    81,   // UNKNOWN_DATABASE: likewise
    159,  // TIMEOUT_EXCEEDED
    160,  // TOO_SLOW
    164,  // READONLY
    173,  // CANNOT_ALLOCATE_MEMORY
    192,  // UNKNOWN_USER
    193,  // WRONG_PASSWORD
    194,  // REQUIRED_PASSWORD
    195,  // IP_ADDRESS_NOT_ALLOWED
    201,  // QUOTA_EXPIRED
    202,  // TOO_MANY_SIMULTANEOUS_QUERIES
    203,  // NO_FREE_CONNECTION
    209,  // SOCKET_TIMEOUT
    210,  // NETWORK_ERROR
    225,  // NO_ZOOKEEPER
    236,  // ABORTED
    241,  // MEMORY_LIMIT_EXCEEDED
    242,  // TABLE_IS_READ_ONLY
    243,  // NOT_ENOUGH_SPACE
    252,  // TOO_MANY_PARTS (but see `refusal`: too many partitions in one block)
    285,  // TOO_FEW_LIVE_REPLICAS
    286,  // UNSATISFIED_QUORUM_FOR_PREVIOUS_WRITE
    319,  // UNKNOWN_STATUS_OF_INSERT
    394,  // QUERY_WAS_CANCELLED
    425,  // SYSTEM_ERROR
    439,  // CANNOT_SCHEDULE_TASK
    497,  // ACCESS_DENIED
    516,  // AUTHENTICATION_FAILED
    999,  // KEEPER_EXCEPTION
    1000, // POCO_EXCEPTION
];

/// Whether a failed insert is ClickHouse refusing the data: a server
/// exception (`Code: N`) that is not in [`RETRY_CODES`]. Transport errors,
/// timeouts and answers without an exception code are not: retrying may fix
/// them. Too many partitions in one insert block is a refusal (smaller
/// inserts fix it) although it shares its code with too many parts.
pub(crate) fn refusal(error: &clickhouse::error::Error) -> bool {
    let clickhouse::error::Error::BadResponse(text) = error else {
        return false;
    };
    let Some(code) = exception_code(text) else {
        return false;
    };
    text.contains("Too many partitions for single INSERT block") || !RETRY_CODES.contains(&code)
}

/// What the server said, for `rejected.error`: the exception text of a
/// refusal, else the client's description.
fn server_error(error: &clickhouse::error::Error) -> String {
    match error {
        clickhouse::error::Error::BadResponse(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The `N` of a server exception text that starts `Code: N`.
fn exception_code(text: &str) -> Option<u32> {
    let digits = text.trim_start().strip_prefix("Code:")?.trim_start();
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The open batch: rows written to the current insert, kept to replay it,
/// the messages they came from, and the acks to send once it is committed.
///
/// Commits are pipelined: once a batch is full (or its period is up) its
/// insert is ended on a task of its own and the next batch is pulled and
/// streamed to ClickHouse meanwhile. At most one batch is committing; it is
/// acked when its insert succeeded. Should it fail, its rows (and the
/// acks) go back in front of the open batch, whose insert is dropped
/// (aborted, so nothing of it is stored), and the whole is retried as one.
struct Writer<R: RowOwned + RowWrite + serde::Serialize> {
    /// The servers to write to (replicas of one shard), at least one.
    endpoints: Vec<Endpoint>,
    /// The one written to now: the next takes over when an insert fails.
    current: usize,
    table: &'static str,
    settings: Settings,
    insert: Option<Insert<R>>,
    /// When the open batch got its first row.
    opened: Option<Instant>,
    /// When the open batch got its latest row.
    latest: Option<Instant>,
    /// Bytes of the messages in the open batch (the rows are about as big).
    bytes: u64,
    rows: Vec<R>,
    origins: Vec<Origin>,
    acks: Vec<Acker>,
    metrics: telemetry::TableMetrics,
    /// The open batch's `audit.batch` span and how many links it has.
    span: Option<(tracing::Span, usize)>,
    /// The batch whose insert is being ended.
    committing: Option<Committing<R>>,
}

/// A batch whose insert is ending on its own task.
struct Committing<R> {
    done: tokio::task::JoinHandle<Result<(), clickhouse::error::Error>>,
    /// What `done` returned, once it did (a finished handle is not polled again).
    result: Option<Result<Result<(), clickhouse::error::Error>, tokio::task::JoinError>>,
    rows: Vec<R>,
    origins: Vec<Origin>,
    acks: Vec<Acker>,
    span: Option<(tracing::Span, usize)>,
}

impl<R: RowOwned + RowWrite + serde::Serialize + Send + Sync> Writer<R> {
    fn new(endpoints: Vec<Endpoint>, table: &'static str, settings: Settings) -> Self {
        Self {
            metrics: settings.metrics.table(table),
            span: None,
            endpoints,
            current: 0,
            table,
            settings,
            insert: None,
            opened: None,
            latest: None,
            bytes: 0,
            rows: Vec::new(),
            origins: Vec::new(),
            acks: Vec::new(),
            committing: None,
        }
    }

    /// The server written to now.
    fn endpoint(&self) -> &Endpoint {
        &self.endpoints[self.current % self.endpoints.len()]
    }

    /// The open insert, started when the batch gets its first row.
    async fn insert(&mut self) -> Result<&mut Insert<R>, clickhouse::error::Error> {
        if self.insert.is_none() {
            let timeout = Some(self.settings.insert_timeout);
            let insert = self
                .endpoint()
                .client
                .insert::<R>(self.table)
                .await?
                .with_timeouts(timeout, timeout);
            self.insert = Some(insert);
        }
        self.insert
            .as_mut()
            .ok_or_else(|| clickhouse::error::Error::Custom("no insert open".into()))
    }

    /// Time from `now` until the open batch is due by the clock: its period
    /// is up, or no message came for the idle time. One clock reading for
    /// both: this runs for every message.
    fn time_left(&self, now: Instant) -> Duration {
        match (self.opened, self.latest) {
            (Some(opened), Some(latest)) => flush_in(
                now.saturating_duration_since(opened),
                now.saturating_duration_since(latest),
                self.settings.batch_period,
                self.settings.batch_idle,
            ),
            _ => self.settings.batch_period,
        }
    }

    /// Whether a batch is committing.
    fn is_committing(&self) -> bool {
        self.committing.is_some()
    }

    /// Resolves once the committing batch's insert ended (at once when
    /// none is committing). Cancel-safe: what it learnt is kept for
    /// [`Writer::settle`].
    async fn committed(&mut self) {
        if let Some(batch) = &mut self.committing
            && batch.result.is_none()
        {
            batch.result = Some((&mut batch.done).await);
        }
    }

    /// Adds one message's row; commits when a limit is reached. `Err` means
    /// an insert failed and [`Writer::recover`] must run.
    async fn push(
        &mut self,
        row: R,
        origin: Origin,
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
        let written = match self.insert().await {
            Ok(insert) => insert.write(&row).await,
            Err(e) => Err(e),
        };
        // Kept before anything can fail, so a replay includes it.
        let now = Instant::now();
        self.opened.get_or_insert(now);
        self.latest = Some(now);
        self.bytes += origin.payload.len() as u64
            + origin
                .headers
                .as_ref()
                .map_or(0, |h| schemas::message_size(Some(h), &[]) as u64);
        self.rows.push(row);
        self.origins.push(origin);
        self.acks.push(ack);
        if let Err(e) = written {
            self.insert = None;
            // The batch committing meanwhile is settled first, so that a
            // retry always has every unacked row in `rows`.
            self.settle().await?;
            return Err(e);
        }
        self.commit(false).await
    }

    /// The limit the open batch reached, if any (rows, bytes, period, idle).
    fn due(&self) -> Option<BatchCut> {
        if self.rows.is_empty() {
            return None;
        }
        if self.rows.len() as u64 >= self.settings.batch_rows {
            return Some(BatchCut::Rows);
        }
        if self.bytes >= self.settings.batch_bytes {
            return Some(BatchCut::Bytes);
        }
        let now = Instant::now();
        if !self.time_left(now).is_zero() {
            return None;
        }
        let open_for = self
            .opened
            .map(|opened| now.saturating_duration_since(opened));
        if open_for.is_some_and(|d| d >= self.settings.batch_period) {
            Some(BatchCut::Period)
        } else {
            Some(BatchCut::Idle)
        }
    }

    /// Ends the open batch's insert when a limit is reached (now when
    /// `force`, and then waits until it is in): the previous batch must be in
    /// first, then this one commits on its own task while the next is
    /// pulled.
    async fn commit(&mut self, force: bool) -> Result<(), clickhouse::error::Error> {
        let why = match self.due() {
            Some(why) => why,
            None if force => BatchCut::Forced,
            None => return Ok(()),
        };
        self.settle().await?;
        if !self.rows.is_empty() {
            if self.insert.is_none() {
                // Rows without an open insert (a failed one): write them again.
                self.write_all().await?;
            }
            let Some(insert) = self.insert.take() else {
                return Ok(());
            };
            self.opened = None;
            self.bytes = 0;
            self.metrics.batch_cut(why);
            self.committing = Some(Committing {
                done: tokio::spawn(insert.end()),
                result: None,
                rows: std::mem::take(&mut self.rows),
                origins: std::mem::take(&mut self.origins),
                acks: std::mem::take(&mut self.acks),
                span: self.span.take(),
            });
        }
        if force { self.settle().await } else { Ok(()) }
    }

    /// Waits for the committing batch: acks it once inserted; on failure
    /// puts its rows back in front of the open batch (whose insert is
    /// dropped, so nothing of it is stored) and returns the error.
    async fn settle(&mut self) -> Result<(), clickhouse::error::Error> {
        let Some(mut batch) = self.committing.take() else {
            return Ok(());
        };
        let joined = match batch.result.take() {
            Some(joined) => joined,
            None => (&mut batch.done).await,
        };
        let result = match joined {
            Ok(result) => result,
            Err(e) => Err(clickhouse::error::Error::Custom(format!(
                "insert task failed: {e}"
            ))),
        };
        match result {
            Ok(()) => {
                let rows = batch.rows.len() as u64;
                tracing::debug!(table = self.table, rows, "Batch inserted.");
                self.metrics.inserted(rows);
                if let Some((span, _)) = batch.span.take() {
                    // Dropped here: the span ends once the batch is in.
                    span.record("rows", rows);
                }
                acknowledge(self.table, batch.acks).await;
                Ok(())
            }
            Err(e) => {
                self.insert = None;
                self.opened = None;
                batch.rows.append(&mut self.rows);
                batch.origins.append(&mut self.origins);
                batch.acks.append(&mut self.acks);
                self.rows = batch.rows;
                self.origins = batch.origins;
                self.acks = batch.acks;
                if self.span.is_none() {
                    self.span = batch.span;
                }
                Err(e)
            }
        }
    }

    /// Acks the open batch (every row of it is stored).
    async fn acknowledge(&mut self) {
        self.rows.clear();
        self.origins.clear();
        self.opened = None;
        self.bytes = 0;
        acknowledge(self.table, std::mem::take(&mut self.acks)).await;
    }

    /// Writes every held row to a fresh insert and commits it, waiting.
    async fn replay(&mut self) -> Result<(), clickhouse::error::Error> {
        self.settle().await?;
        self.write_all().await?;
        self.commit(true).await
    }

    /// Writes every held row to a fresh insert.
    async fn write_all(&mut self) -> Result<(), clickhouse::error::Error> {
        self.insert = None;
        let rows = std::mem::take(&mut self.rows);
        let mut result = Ok(());
        for row in &rows {
            let written = match self.insert().await {
                Ok(insert) => insert.write(row).await,
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                self.insert = None;
                result = Err(e);
                break;
            }
        }
        self.rows = rows;
        result
    }

    /// Retries the open batch until it is inserted or `until` says stop.
    /// With several servers, each retry goes to the next one (the whole
    /// held batch, as one insert), and the wait between retries comes only
    /// once every server failed in turn; the server that took the batch
    /// stays the one written to. Returns whether the batch is in.
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
        // Where this round of servers started.
        let mut round_start = self.current;
        loop {
            if refusal(&error) {
                match self.isolate().await {
                    Ok(()) => return true,
                    Err(e) => error = e,
                }
            }
            self.metrics.insert_failed();
            if let Some((span, _)) = &self.span {
                span.record("insert_errors", attempt);
            }
            let failed = self.endpoint().url.clone();
            self.current = (self.current + 1) % self.endpoints.len();
            // Every server failed since the round started: wait, then start
            // another round (one server: every retry waits).
            let wait = self.current == round_start;
            if wait {
                tracing::warn!(
                    table = self.table,
                    clickhouse = %failed,
                    rows_held = self.rows.len(),
                    attempt,
                    retry_in = ?backoff,
                    error = %error,
                    "Waiting for ClickHouse: insert failed; holding the batch unacked and pulling nothing more."
                );
            } else {
                tracing::warn!(
                    table = self.table,
                    clickhouse = %failed,
                    next = %self.endpoint().url,
                    rows_held = self.rows.len(),
                    attempt,
                    error = %error,
                    "Insert failed; failing over: the held batch goes to the next ClickHouse replica."
                );
            }
            let wake = if wait {
                Instant::now() + backoff
            } else {
                Instant::now()
            };
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
            if wait {
                round_start = self.current;
                backoff = (backoff * 2).min(self.settings.retry_max);
            }
            let result = match self.replay().await {
                Ok(()) => Ok(()),
                // The server may have come back empty (or someone dropped the
                // table): create what is missing, then replay once more. Only
                // after a failed replay, so a working insert needs no schema
                // queries (nor `MODIFY TTL`) before it.
                Err(e) => match schema::ensure_with(
                    &self.endpoint().ddl,
                    &self.settings.database,
                    self.settings.retention_days,
                    &self.settings.engine,
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
                        clickhouse = %self.endpoint().url,
                        attempt,
                        "ClickHouse is back; held batch inserted and acked."
                    );
                    return true;
                }
                Err(e) => error = e,
            }
            attempt += 1;
        }
    }

    /// Inserts the open batch that the server refused as a whole: tries it
    /// once more, then bisects it until every refused row stands alone,
    /// inserting the rest; writes the
    /// refused rows to `rejected` with their error; then acks the batch.
    /// `Err` (nothing acked) when an insert fails otherwise than by a
    /// refusal, or the quarantine insert fails.
    async fn isolate(&mut self) -> Result<(), clickhouse::error::Error> {
        self.insert = None;
        let mut refused: Vec<(usize, String)> = Vec::new();
        let mut inserted = 0u64;
        // Ranges still to insert, the next one last. The whole batch is
        // tried once more on its own first: a refusal that does not come
        // again was no refusal of these rows.
        let mut todo: Vec<std::ops::Range<usize>> = Vec::new();
        todo.push(0..self.rows.len());
        let progress_every = (self.settings.ack_wait / 3).max(Duration::from_millis(200));
        let mut next_progress = Instant::now() + progress_every;
        while let Some(range) = todo.pop() {
            if Instant::now() >= next_progress {
                // Many refused rows take many inserts: keep the batch ours.
                for ack in &self.acks {
                    let _ = ack.ack_with(AckKind::Progress).await;
                }
                next_progress = Instant::now() + progress_every;
            }
            let error = match insert(
                &self.endpoint().client,
                self.table,
                self.settings.insert_timeout,
                &self.rows[range.clone()],
            )
            .await
            {
                Ok(()) => {
                    inserted += range.len() as u64;
                    continue;
                }
                Err(e) if refusal(&e) => server_error(&e),
                Err(e) => return Err(e),
            };
            if range.len() <= 1 {
                refused.extend(range.map(|i| (i, error.clone())));
            } else {
                let mid = range.start + range.len() / 2;
                todo.push(mid..range.end);
                todo.push(range.start..mid);
            }
        }
        quarantine(
            &self.endpoint().client,
            self.table,
            self.settings.insert_timeout,
            &self.rows,
            &self.origins,
            &refused,
        )
        .await?;
        // INVARIANT: every row of the batch is now in its table or in
        // `rejected`; only now is anything acked.
        self.metrics.inserted(inserted);
        self.metrics.quarantined(refused.len() as u64);
        if let Some((span, _)) = self.span.take() {
            span.record("rows", inserted);
        }
        tracing::info!(
            table = self.table,
            inserted,
            quarantined = refused.len(),
            "Refused batch inserted apart from the rows refused again; acked."
        );
        self.acknowledge().await;
        Ok(())
    }

    /// Commits what is open, retrying until the grace period ends.
    async fn finish(&mut self) {
        if self.rows.is_empty() && self.committing.is_none() {
            return;
        }
        let deadline = Instant::now() + self.settings.shutdown_grace;
        // After a failed insert (shutdown came while `recover` waited) no
        // insert is open and the rows are only in `self.rows`: they are
        // replayed.
        let first = if self.insert.is_some() || self.rows.is_empty() {
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

/// Time until a batch open for `open_for`, whose latest message came
/// `quiet_for` ago, is due by the clock: when its `period` is up, or once
/// the stream was quiet for `idle` (zero: never for that reason). The idle
/// flush makes rows queryable soon after traffic pauses; under steady
/// traffic messages keep coming and the period and size limits alone cut
/// the batches, so ClickHouse sees no more inserts for it.
fn flush_in(open_for: Duration, quiet_for: Duration, period: Duration, idle: Duration) -> Duration {
    let by_period = period.saturating_sub(open_for);
    if idle.is_zero() {
        by_period
    } else {
        by_period.min(idle.saturating_sub(quiet_for))
    }
}

/// Acks the messages of a batch that is stored.
async fn acknowledge(table: &'static str, acks: Vec<Acker>) {
    for ack in acks {
        // Sent without waiting for an answer (no double ack): one message
        // each on the connection, not one round trip.
        if let Err(e) = ack.ack().await {
            // Not fatal: JetStream redelivers it and the row collapses.
            tracing::warn!(table, error = %e, "Ack failed; the message will come again.");
        }
    }
}

/// Inserts `rows` into `table` on their own.
async fn insert<R: RowOwned + RowWrite>(
    client: &Client,
    table: &str,
    timeout: Duration,
    rows: &[R],
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client
        .insert::<R>(table)
        .await?
        .with_timeouts(Some(timeout), Some(timeout));
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}

/// Writes the refused rows of a batch of `table` (index in `rows` and
/// `origins`, the server's error) to `rejected`, then logs each.
async fn quarantine<R: serde::Serialize>(
    client: &Client,
    table: &str,
    timeout: Duration,
    rows: &[R],
    origins: &[Origin],
    refused: &[(usize, String)],
) -> Result<(), clickhouse::error::Error> {
    if refused.is_empty() {
        return Ok(());
    }
    let now_us = chrono::Utc::now().timestamp_micros();
    let mut insert = client
        .insert::<rows::RejectedRow>(schema::REJECTED)
        .await?
        .with_timeouts(Some(timeout), Some(timeout));
    for (i, error) in refused {
        if let (Some(row), Some(origin)) = (rows.get(*i), origins.get(*i)) {
            insert
                .write(&rows::rejected_row(table, row, error, origin, now_us))
                .await?;
        }
    }
    insert.end().await?;
    for (i, error) in refused {
        if let Some(origin) = origins.get(*i) {
            tracing::warn!(
                table,
                stream = %origin.meta.stream,
                stream_seq = origin.meta.stream_seq,
                subject = %origin.subject,
                error = %error,
                "Row refused by ClickHouse: quarantined in `rejected`, the rows after it go on."
            );
        }
    }
    Ok(())
}

/// Runs one table's pipeline until `shutdown`. With a `gate` (the
/// `events` table under `--redacted-original drop`), each message waits for
/// the policy worker's decision, and the row of one it erased has no data.
pub(crate) async fn run<T: Table>(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    endpoints: Vec<Endpoint>,
    settings: Settings,
    mut gate: Option<crate::originals::Gate>,
    shutdown: CancellationToken,
) {
    let mut writer = Writer::<T::Row>::new(endpoints, T::TABLE, settings.clone());
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
        let tick = writer.time_left(Instant::now());
        let committing = writer.is_committing();
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // The committing batch is acked as soon as it is in.
            _ = writer.committed(), if committing => writer.settle().await,
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
                    let mut dropped = false;
                    if let Some(gate) = gate.as_mut() {
                        // What is open goes in before a wait for the worker.
                        if !gate.decided(meta.stream_seq)
                            && let Err(e) = writer.commit(true).await
                        {
                            // This message stays unacked: it comes again.
                            if !writer.recover(e, &shutdown, None).await {
                                break;
                            }
                            continue;
                        }
                        match gate.erased(meta.stream_seq, &acker, &shutdown).await {
                            Some(erased) => dropped = erased,
                            None => break,
                        }
                    }
                    let mut row = T::row(message.subject.as_str(), message.headers.as_ref(), &message.payload, &meta);
                    let trace = T::traceparent(&row);
                    let payload = if dropped {
                        T::drop_data(&mut row);
                        Default::default()
                    } else {
                        message.payload
                    };
                    let origin = Origin {
                        subject: message.subject.to_string(),
                        headers: message.headers,
                        payload,
                        meta,
                    };
                    writer.push(row, origin, acker, trace).await
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

#[cfg(test)]
mod tests {
    use super::*;
    use clickhouse::error::Error;

    #[test]
    fn a_batch_is_due_when_its_period_is_up_or_the_stream_went_quiet() {
        let ms = Duration::from_millis;
        let (period, idle) = (ms(1000), ms(200));
        // Messages still coming: the period decides.
        assert_eq!(flush_in(ms(100), ms(0), period, idle), ms(200));
        assert_eq!(flush_in(ms(900), ms(10), period, idle), ms(100));
        assert_eq!(flush_in(ms(1000), ms(0), period, idle), ms(0));
        // Quiet for a while: due once the idle time has passed.
        assert_eq!(flush_in(ms(300), ms(150), period, idle), ms(50));
        assert_eq!(flush_in(ms(300), ms(200), period, idle), ms(0));
        assert_eq!(flush_in(ms(50), ms(250), period, idle), ms(0));
        // Without an idle time only the period counts.
        assert_eq!(flush_in(ms(300), ms(300), period, ms(0)), ms(700));
        assert_eq!(flush_in(ms(1200), ms(300), period, ms(0)), ms(0));
    }

    #[test]
    fn refusals_are_server_exceptions_about_the_data() {
        let bad = |text: &str| Error::BadResponse(text.to_owned());
        // ClickHouse 18.16 and current servers word it differently.
        assert!(refusal(&bad(
            "Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception"
        )));
        assert!(refusal(&bad(
            "Code: 469. DB::Exception: Constraint `c` for table a.b is violated. (VIOLATED_CONSTRAINT) (version 24.8.4.13)"
        )));
        assert!(refusal(&bad(
            "Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 100). (TOO_MANY_PARTS)"
        )));
        // Not the rows' fault: held and retried.
        assert!(!refusal(&bad(
            "Code: 60, e.displayText() = DB::Exception: Table a.events doesn't exist., e.what() = DB::Exception"
        )));
        assert!(!refusal(&bad(
            "Code: 252. DB::Exception: Too many parts (300). Merges are processing significantly slower than inserts. (TOO_MANY_PARTS)"
        )));
        assert!(!refusal(&bad(
            "Code: 241. DB::Exception: Memory limit (total) exceeded"
        )));
        assert!(!refusal(&bad("502 Bad Gateway")));
        assert!(!refusal(&Error::TimedOut));
        assert!(!refusal(&Error::Network("connection refused".into())));
        assert_eq!(exception_code(" Code: 395, e.displayText()"), Some(395));
        assert_eq!(exception_code("Code:"), None);
    }
}
