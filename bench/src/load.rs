//! Load generation and latency measurement: a publisher that drives events
//! into `mesh.ingress.planner.handoff` (closed loop at full speed, or open
//! loop at a fixed rate) and a receiver on `mesh.deliver.>` that records the
//! latency from publish (or, open loop, from the scheduled send time) to
//! delivery in an HdrHistogram.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use schemas::subjects;
use tokio::sync::Mutex;

/// Where latencies are measured from.
#[derive(Clone)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn new() -> Self {
        Self(Instant::now())
    }
    fn now_ns(&self) -> u64 {
        self.0.elapsed().as_nanos() as u64
    }
}

/// What a phase measured.
pub(crate) struct PhaseResult {
    pub events: u64,
    pub seconds: f64,
    pub latency_us: Histogram<u64>,
}

impl PhaseResult {
    pub(crate) fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }
}

/// Counts deliveries and records their latency.
pub(crate) struct Receiver {
    delivered: Arc<AtomicU64>,
    histogram: Arc<Mutex<Histogram<u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    pub(crate) async fn start(nats_url: &str, clock: Clock) -> anyhow::Result<Self> {
        let client = async_nats::ConnectOptions::new()
            .subscription_capacity(1 << 20)
            .connect(nats_url)
            .await
            .context("receiver connect")?;
        let mut sub = client.subscribe(subjects::DELIVER_ALL).await?;
        client.flush().await?;
        let delivered = Arc::new(AtomicU64::new(0));
        let histogram = Arc::new(Mutex::new(new_histogram()));
        let (d, h) = (delivered.clone(), histogram.clone());
        let task = tokio::spawn(async move {
            let _client = client;
            while let Some(msg) = sub.next().await {
                let now = clock.now_ns();
                if let Some(sent) = sent_ns(&msg.payload) {
                    let _ = h.lock().await.record(now.saturating_sub(sent) / 1000 + 1);
                }
                d.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Self {
            delivered,
            histogram,
            task,
        })
    }

    pub(crate) fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// Waits until `n` deliveries in total have arrived (or `timeout`).
    pub(crate) async fn wait_for(&self, n: u64, timeout: Duration) -> anyhow::Result<()> {
        let what = format!("{n} deliveries (have {})", self.delivered());
        testkit::eventually(timeout, &what, || async move {
            (self.delivered() >= n).then_some(())
        })
        .await
    }

    /// Takes the latencies recorded so far and starts a fresh histogram.
    pub(crate) async fn take_histogram(&self) -> Histogram<u64> {
        std::mem::replace(&mut *self.histogram.lock().await, new_histogram())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn new_histogram() -> Histogram<u64> {
    // INVARIANT: the bounds are valid (1 µs .. 10 min, 3 significant digits).
    #[expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

/// The send time embedded at the start of the data: `{"sent_ns":N,...`.
fn sent_ns(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(b"{\"sent_ns\":")?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// Publishes benchmark events.
pub(crate) struct Publisher {
    js: jetstream::Context,
    template: HeaderMap,
    size: usize,
    window: usize,
    clock: Clock,
    next_id: u64,
    run: String,
}

impl Publisher {
    pub(crate) async fn new(
        nats_url: &str,
        size: usize,
        window: usize,
        clock: Clock,
    ) -> anyhow::Result<Self> {
        let client = async_nats::connect(nats_url)
            .await
            .context("publisher connect")?;
        let mut js = jetstream::new(client);
        // With every write fsynced on a busy disk a full window of acks
        // takes longer than the client's default 5 s.
        js.set_timeout(crate::ACK_TIMEOUT);
        let template = handoff_headers();
        Ok(Self {
            js,
            template,
            size,
            window,
            clock,
            next_id: 0,
            run: uuid::Uuid::now_v7().simple().to_string(),
        })
    }

    fn payload(&self, sent_ns: u64) -> Bytes {
        let head = format!("{{\"sent_ns\":{sent_ns},\"pad\":\"");
        let pad = self.size.saturating_sub(head.len() + 2);
        let mut body = String::with_capacity(self.size);
        body.push_str(&head);
        body.extend(std::iter::repeat_n('x', pad));
        body.push_str("\"}");
        Bytes::from(body)
    }

    async fn send(&mut self, sent_ns: u64) -> anyhow::Result<jetstream::context::PublishAckFuture> {
        self.next_id += 1;
        let mut headers = self.template.clone();
        headers.insert("ce-id", format!("{}-{}", self.run, self.next_id));
        let publish = PublishMessage::build()
            .headers(headers)
            .payload(self.payload(sent_ns));
        Ok(self
            .js
            .send_publish(subjects::ingress("planner", "handoff"), publish)
            .await?)
    }

    /// Publishes `n` events as fast as the window of unacknowledged
    /// publishes allows.
    pub(crate) async fn closed_loop(&mut self, n: u64) -> anyhow::Result<()> {
        let mut pending = FuturesUnordered::new();
        for _ in 0..n {
            if pending.len() >= self.window
                && let Some(ack) = pending.next().await
            {
                ack?;
            }
            let now = self.clock.now_ns();
            pending.push(self.send(now).await?.into_future());
        }
        while let Some(ack) = pending.next().await {
            ack?;
        }
        Ok(())
    }

    /// Publishes at `rate` events/s for `duration`; each event carries its
    /// scheduled send time, so a stalled sender shows up as latency.
    pub(crate) async fn open_loop(&mut self, rate: f64, duration: Duration) -> anyhow::Result<u64> {
        let total = (rate * duration.as_secs_f64()) as u64;
        let start = self.clock.now_ns();
        let interval_ns = 1e9 / rate;
        let mut pending = FuturesUnordered::new();
        let mut sent = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while sent < total {
            tick.tick().await;
            let due = (((self.clock.now_ns() - start) as f64 / interval_ns) as u64 + 1).min(total);
            while sent < due {
                let scheduled = start + (sent as f64 * interval_ns) as u64;
                while pending.len() >= self.window {
                    if let Some(ack) = pending.next().await {
                        ack?;
                    }
                }
                pending.push(self.send(scheduled).await?.into_future());
                sent += 1;
            }
            while let Some(Some(ack)) = futures::FutureExt::now_or_never(pending.next()) {
                ack?;
            }
        }
        while let Some(ack) = pending.next().await {
            ack?;
        }
        Ok(sent)
    }
}

/// Runs a closed-loop phase of `n` events and waits for every delivery.
pub(crate) async fn closed_phase(
    publisher: &mut Publisher,
    receiver: &Receiver,
    n: u64,
) -> anyhow::Result<PhaseResult> {
    let base = receiver.delivered();
    let _ = receiver.take_histogram().await;
    let started = Instant::now();
    publisher.closed_loop(n).await?;
    receiver
        .wait_for(base + n, Duration::from_secs(300))
        .await?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(PhaseResult {
        events: n,
        seconds,
        latency_us: receiver.take_histogram().await,
    })
}

/// Runs an open-loop phase at `rate` for `duration` and waits for every delivery.
pub(crate) async fn open_phase(
    publisher: &mut Publisher,
    receiver: &Receiver,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<PhaseResult> {
    let base = receiver.delivered();
    let _ = receiver.take_histogram().await;
    let started = Instant::now();
    let n = publisher.open_loop(rate, duration).await?;
    receiver
        .wait_for(base + n, Duration::from_secs(300))
        .await?;
    Ok(PhaseResult {
        events: n,
        seconds: started.elapsed().as_secs_f64(),
        latency_us: receiver.take_histogram().await,
    })
}

use std::future::IntoFuture;

/// The eight `ce-*` headers of the benchmarks' handoff event, without its id
/// (the closed and open loops and the drain add `ce-id` per event).
pub(crate) fn handoff_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-source", "/agents/planner"),
        ("ce-type", "io.agentmesh.task.handoff"),
        ("ce-target", "coder"),
        ("ce-datacontenttype", "application/json"),
        ("ce-time", "2026-01-01T00:00:00Z"),
        ("ce-subject", "task"),
        (
            "ce-traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
    ] {
        headers.insert(k, v);
    }
    headers
}
