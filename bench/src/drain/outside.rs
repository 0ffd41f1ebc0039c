//! `mesh-bench drain --method outside`: the drain timed from outside the
//! targets, as issue 34 measured it.
//!
//! One nats-server per durability setting serves the whole sitting: every
//! target of every run drains on it, one after another. For each drain the
//! streams are emptied and their consumers removed, the target is started
//! (and, for `mesh`, the audit sink), then stopped with SIGSTOP once its
//! consumers exist; `--events` handoffs are preloaded into `MESH_INGRESS`
//! while it is stopped, and it is resumed with SIGCONT (for `worker`, only
//! the worker: no sink runs). The drain is timed from JetStream's own
//! timestamps: from the first to the last message stored in
//! `MESH_DELIVER`. The end-to-end target (`mesh`: worker and sink
//! resumed together) is timed from the resume until every decision row is
//! queryable in ClickHouse (`count()` of the decisions table reaches
//! `--events`), polled every 20 ms.
//!
//! CPU per event is counted from the resume until the bench saw the last
//! delivery stored (for `mesh`, the last row queryable).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream;
use broker_config::server::Durability;
use schemas::subjects;

use super::{Bench, Broker, Drain, Kind, consumers, cpu, drained, messages, preload, reset};
use crate::{Service, procstat};

/// Sends `signal` (`STOP`, `CONT`) to `pid`.
fn signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running `kill`")?;
    if !status.success() {
        bail!("`kill -{name} {pid}` failed: {status}");
    }
    Ok(())
}

/// The first and the last message stored in `stream`, seconds apart by
/// JetStream's timestamps.
async fn first_to_last(js: &jetstream::Context, stream: &str) -> anyhow::Result<f64> {
    let stream = js.get_stream(stream).await?;
    let state = stream.get_info().await?.state;
    let first = stream.get_raw_message(state.first_sequence).await?.time;
    let last = stream.get_raw_message(state.last_sequence).await?.time;
    Ok((last - first).as_seconds_f64())
}

/// Rows in `database.decisions` (duplicates included: queryable is enough).
async fn decision_rows(ch: &testkit::ClickHouseServer, database: &str) -> u64 {
    ch.query_text(&format!("SELECT count() FROM {database}.decisions"))
        .await
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0)
}

impl Bench {
    /// One drain of `kind` on `broker`, by the outside method.
    pub(super) async fn outside(
        &self,
        broker: &Broker,
        run: usize,
        kind: Kind,
        durability: Durability,
    ) -> anyhow::Result<Drain> {
        let js = &broker.js;
        let url = broker.nats.url();
        let n = self.args.events;
        reset(js).await?;
        let left = consumers(js).await?;
        if !left.is_empty() {
            bail!("consumers left over from an earlier target: {left:?}");
        }
        let tag = format!("o{run}{}", uuid::Uuid::now_v7().simple());
        let database = format!("bench_{tag}");
        let sink = match kind {
            Kind::Mesh => Some(self.sink(&database, &url).await?),
            _ => None,
        };
        let target = self.target(kind, &url).await?;
        let stopped: Vec<u32> = std::iter::once(target.pid())
            .chain(sink.as_ref().map(Service::pid))
            .collect();
        for &pid in &stopped {
            signal(pid, "STOP")?;
        }
        preload(js, &tag, n, self.args.size, self.args.workflows).await?;
        let stored = messages(js, subjects::STREAM_INGRESS).await?;
        if stored != n {
            bail!("preloaded {stored} events instead of {n}");
        }
        let nats_pid = broker.nats.pid();
        let ch = self.clickhouse.as_ref();
        let ch_pid = ch.and_then(testkit::ClickHouseServer::pid);
        let sink_pid = sink.as_ref().map(Service::pid);
        let sys_before = procstat::cpu_split(target.pid()).map_or(0.0, |(_, s)| s);
        let before = (
            cpu(Some(target.pid())),
            cpu(nats_pid),
            cpu(sink_pid),
            cpu(ch_pid),
        );
        let resumed = Instant::now();
        for &pid in &stopped {
            signal(pid, "CONT")?;
        }
        let deadline = resumed + Duration::from_secs(600);
        let mut delivered_at = None;
        let seconds = loop {
            if delivered_at.is_none() && messages(js, subjects::STREAM_DELIVER).await? >= n {
                delivered_at = Some(resumed.elapsed().as_secs_f64());
            }
            if let Some(at) = delivered_at {
                match (kind, ch) {
                    (Kind::Mesh, Some(ch)) => {
                        if decision_rows(ch, &database).await >= n {
                            break resumed.elapsed().as_secs_f64();
                        }
                    }
                    (Kind::Mesh, None) => bail!("the mesh target needs ClickHouse"),
                    _ => break at,
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not drain {n} events within 600 s", kind.label());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let per_event = |after: f64, before: f64| (after - before) * 1e6 / n as f64;
        let target_cpu_us = per_event(cpu(Some(target.pid())), before.0);
        let target_sys_us = per_event(
            procstat::cpu_split(target.pid()).map_or(0.0, |(_, s)| s),
            sys_before,
        );
        let nats_cpu_us = per_event(cpu(nats_pid), before.1);
        let sink_cpu_us = per_event(cpu(sink_pid), before.2);
        let clickhouse_cpu_us = if kind == Kind::Mesh {
            per_event(cpu(ch_pid), before.3)
        } else {
            0.0
        };
        let first_to_last = first_to_last(js, subjects::STREAM_DELIVER).await?;
        let result = Drain {
            kind,
            durability,
            // The mesh: resume → every decision row queryable; the others:
            // first → last delivery stored.
            seconds: if kind == Kind::Mesh {
                seconds
            } else {
                first_to_last
            },
            target_seconds: first_to_last,
            target_cpu_us,
            target_sys_us,
            nats_cpu_us,
            sink_cpu_us,
            clickhouse_cpu_us,
            rss_mib: procstat::peak_rss(target.pid()).unwrap_or(0) as f64 / 1048576.0,
            nats_rss_mib: nats_pid.and_then(procstat::peak_rss).unwrap_or(0) as f64 / 1048576.0,
        };
        // Every event delivered and receipted once (and, for the mesh,
        // every row in ClickHouse once through FINAL) before the figure
        // counts. The last delivery can be stored before the last receipts
        // (each stream stores on its own), so first wait, untimed, until
        // the target acked everything: it acks an event only once both its
        // copies are stored. The sink acks a row only once it is inserted.
        testkit::eventually(
            Duration::from_secs(600),
            "the target to ack every event",
            || async {
                drained(js, subjects::STREAM_INGRESS, kind.consumer())
                    .await
                    .then_some(())
            },
        )
        .await?;
        if kind == Kind::Mesh {
            testkit::eventually(
                Duration::from_secs(600),
                "the audit sink to catch up",
                || async {
                    (drained(js, subjects::STREAM_INGRESS, "audit-sink-events").await
                        && drained(js, subjects::STREAM_DECISION, "audit-sink-decisions").await)
                        .then_some(())
                },
            )
            .await?;
        }
        self.check(js, kind, n, &database).await?;
        drop(target);
        drop(sink);
        if let Some(ch) = ch
            && kind == Kind::Mesh
        {
            let _ = ch
                .query_text(&format!("DROP DATABASE IF EXISTS {database}"))
                .await;
        }
        Ok(result)
    }
}
