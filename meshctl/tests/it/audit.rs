//! `meshctl audit verify` and `meshctl signers` against a real policy
//! worker, audit sink (writing signed checkpoints), NATS and ClickHouse: a
//! clean audit verifies `ok`; an `ALTER TABLE … UPDATE` of one decision,
//! an `ALTER TABLE … DELETE` of one row and an `INSERT` of a fabricated
//! row are each found and named, with exit status 1 — also for decisions
//! the worker signed in a batch (a Merkle root and an inclusion proof each).

use crate::support;

use std::process::{Command, Output};

use agents_sdk::Agent;
use audit_sink::rows::{self, DecisionRow, Meta};
use schemas::{DecisionReceipt, subjects};
use support::services::{Services, workspace};
use testkit::{WAIT, eventually};

fn meshctl(services: &Services, args: &[&str]) -> std::io::Result<Output> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args).current_dir(workspace());
    for var in [
        "NATS_NKEY_SEED_FILE",
        "NATS_CREDS",
        "CLICKHOUSE_USER",
        "CLICKHOUSE_PASSWORD",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("NATS_URL", services.nats.url())
        .env("CLICKHOUSE_URL", services.ch().url())
        .env("AGENTMESH_AUDIT_DATABASE", services.db())
        .env("AGENTMESH_HOME", services.tmp.path().join("home"));
    cmd.output()
}

fn stdout(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One row of `decisions` as the audit holds it.
async fn row(services: &Services, event_id: &str) -> anyhow::Result<Option<DecisionRow>> {
    Ok(services
        .ch()
        .client()
        .with_database(services.db())
        .query("SELECT ?fields FROM decisions FINAL WHERE event_id = ?")
        .bind(event_id)
        .fetch_optional::<DecisionRow>()
        .await?)
}

#[tokio::test]
async fn audit_verify_names_altered_deleted_and_inserted_rows() -> anyhow::Result<()> {
    // A backlog of 64 steps the worker decides together: signed in batches.
    const BACKLOG: usize = 64;
    let (services, backlog_trace, backlog) =
        Services::start_on_backlog("audit_verify", BACKLOG).await?;
    let planner = Agent::connect("planner", services.nats.url()).await?;
    // Four workflows of two steps each: one kept clean, one per tampering.
    let mut traces = Vec::new();
    for n in 0..4 {
        let wf = planner.workflow();
        let first = wf.reasoning(format!("workflow {n}, step 1")).await?;
        wf.reasoning(format!("workflow {n}, step 2")).await?;
        traces.push((wf.trace_id().to_string(), first.id));
    }

    // Clean: every row verified against the checkpoints.
    let total = 8 + BACKLOG;
    let clean = eventually(WAIT, "a clean audit of every decision", || async {
        let out = meshctl(&services, &["audit", "verify"]).ok()?;
        let text = stdout(&out);
        (out.status.success()
            && text.contains(&format!("ok: {total} decisions verified"))
            && text.contains("(0 newer"))
        .then_some(text)
    })
    .await?;
    assert!(
        clean.starts_with(&format!("ok: {total} decisions verified against")),
        "{clean}"
    );

    let ch = services.ch().client().with_database(services.db());
    // The backlog was signed in batches: rows with a root and a proof.
    let batched: Vec<String> = ch
        .query(
            "SELECT event_id FROM decisions FINAL WHERE batch_signature != '' AND signature = '' ORDER BY stream_seq",
        )
        .fetch_all::<String>()
        .await?
        .into_iter()
        .filter(|id| backlog.contains(id))
        .collect();
    assert!(
        batched.len() > 1,
        "{} of {BACKLOG} backlog decisions signed in a batch",
        batched.len()
    );
    // 0. An edit of a decision signed in a batch.
    let batch_altered = &batched[batched.len() / 2];
    ch.query("ALTER TABLE decisions UPDATE decision = 'deny' WHERE event_id = ?")
        .bind(batch_altered.as_str())
        .execute()
        .await?;
    // 1. An edit: a decision rewritten in place.
    let (_, altered) = &traces[1];
    ch.query("ALTER TABLE decisions UPDATE decision = 'deny' WHERE event_id = ?")
        .bind(altered.as_str())
        .execute()
        .await?;
    // 2. A deletion.
    let (_, deleted) = &traces[2];
    ch.query("ALTER TABLE decisions DELETE WHERE event_id = ?")
        .bind(deleted.as_str())
        .execute()
        .await?;
    // 3. An insertion: a self-consistent row for an event that never was,
    //    claiming the stream sequence of a real one.
    let (trace4, real) = &traces[3];
    let original = row(&services, real)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no row for {real}"))?;
    let mut receipt: DecisionReceipt = serde_json::from_str(&original.receipt)?;
    receipt.event_id = "fabricated-1".into();
    receipt.decision_id = "fabricated-decision".into();
    let fabricated = rows::decision_row(
        &subjects::decision("planner"),
        &serde_json::to_vec(&receipt)?,
        &Meta {
            stream: subjects::STREAM_DECISION.into(),
            stream_seq: original.stream_seq,
            received_us: i64::try_from(original.received_us)?,
        },
    );
    let mut insert = ch.insert::<DecisionRow>("decisions").await?;
    insert.write(&fabricated).await?;
    insert.end().await?;
    // ClickHouse 18.16 runs ALTER … UPDATE/DELETE as mutations, later.
    eventually(WAIT, "the mutations to apply", || async {
        let edited = row(&services, altered).await.ok()??;
        let batch_edited = row(&services, batch_altered).await.ok()??;
        let gone = row(&services, deleted).await.ok()?.is_none();
        (edited.decision == "deny" && batch_edited.decision == "deny" && gone).then_some(())
    })
    .await?;

    let verify = |args: &[&str]| -> std::io::Result<Output> {
        let mut all = vec!["audit", "verify"];
        all.extend_from_slice(args);
        meshctl(&services, &all)
    };
    let out = verify(&["--trace", &traces[0].0])?;
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("ok: 2 decisions verified"),
        "{}",
        stdout(&out)
    );

    let out = verify(&["--trace", &backlog_trace])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with(&format!("FAILED: 1 findings in {BACKLOG} decisions"))
            && stdout(&out).contains(&format!("first: altered: decision planner/{batch_altered}")),
        "{}",
        stdout(&out)
    );

    let out = verify(&["--trace", &traces[1].0])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("first: altered: decision planner/{altered}"))
            && stdout(&out).contains("`decision` is \"deny\", its receipt says \"allow\""),
        "{}",
        stdout(&out)
    );

    let out = verify(&["--trace", &traces[2].0])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("first: deleted: decision planner/{deleted}")),
        "{}",
        stdout(&out)
    );

    let out = verify(&["--trace", trace4])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("first: inserted: decision planner/fabricated-1")
            && stdout(&out).contains(&format!("the checkpoint has planner/{real}")),
        "{}",
        stdout(&out)
    );

    // The whole audit: all four, first by stream sequence.
    let out = verify(&[])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("FAILED: 4 findings"),
        "{}",
        stdout(&out)
    );
    // Nothing decided after a day from now.
    let out = verify(&["--since", "2999-01-01T00:00:00Z"])?;
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).starts_with("ok: 0 decisions"),
        "{}",
        stdout(&out)
    );

    // The signers, as `meshctl signers list` shows them; the sink's key
    // revoked, its checkpoints are no longer trusted.
    let out = meshctl(&services, &["signers", "list"])?;
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&services.sink_signer),
        "{}",
        stdout(&out)
    );
    let out = meshctl(&services, &["signers", "revoke", &services.sink_signer])?;
    assert!(out.status.success(), "{}", stdout(&out));
    let out = verify(&["--trace", &traces[0].0])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("signer `{}` is revoked", services.sink_signer)),
        "{}",
        stdout(&out)
    );
    services.stop().await
}

/// Polls `meshctl audit verify` until it reports `n` decisions `ok`, none
/// newer than the last checkpoint.
async fn verified(services: &Services, n: usize) -> anyhow::Result<String> {
    eventually(WAIT, &format!("a clean audit of {n} decisions"), || async {
        let out = meshctl(services, &["audit", "verify"]).ok()?;
        let text = stdout(&out);
        (out.status.success()
            && text.starts_with(&format!("ok: {n} decisions verified"))
            && text.contains("(0 newer"))
        .then_some(text)
    })
    .await
}

/// Two policy-worker replicas and two audit-sink replicas, each with its
/// own key: a handover (the first pair stops, the second takes over the
/// shared durables) and then both pairs at once. Every decision verifies
/// against the chains of both checkpoint signers, receipts signed by both
/// workers included, and a row deleted afterwards is still found.
#[tokio::test]
async fn audit_verify_spans_worker_and_sink_replicas() -> anyhow::Result<()> {
    let mut services = Services::start("audit_replicas").await?;
    let planner = Agent::connect("planner", services.nats.url()).await?;
    let steps = |phase: &'static str, n: usize| {
        let planner = planner.clone();
        async move {
            let mut ids = Vec::new();
            for i in 0..n {
                let wf = planner.workflow();
                ids.push(wf.reasoning(format!("{phase} {i}")).await?.id);
            }
            anyhow::Ok(ids)
        }
    };
    // 1. The first worker and sink alone.
    steps("first pair", 5).await?;
    verified(&services, 5).await?;

    // 2. A handover: the second pair starts, the first stops.
    let worker_b = services.worker_replica("worker-b").await?;
    let sink_b = services.sink_replica("sink-b").await?;
    let (worker_a, sink_a) = services.take_first_pair()?;
    let (signer_worker_a, signer_sink_a) = (worker_a.signer.clone(), sink_a.signer.clone());
    worker_a.stop().await?;
    sink_a.stop().await?;
    let second = steps("second pair", 5).await?;
    verified(&services, 10).await?;

    // 3. Both pairs at once: the first pair back, sharing the durables.
    let worker_a = services.worker_replica("worker-a2").await?;
    let sink_a = services.sink_replica("sink-a2").await?;
    steps("both pairs", 20).await?;
    verified(&services, 30).await?;

    // Receipts of both first-phase and second-phase workers, checkpoints of
    // both first-phase and second-phase sinks.
    let ch = services.ch().client().with_database(services.db());
    let signers = testkit::clickhouse::query_text(
        &ch,
        "SELECT DISTINCT visitParamExtractString(receipt, 'signer') FROM decisions ORDER BY 1",
    )
    .await?;
    for signer in [&signer_worker_a, &worker_b.signer] {
        assert!(signers.contains(signer.as_str()), "{signers}");
    }
    let js = async_nats::jetstream::new(services.nats.connect().await?);
    let audit = js.get_stream(subjects::STREAM_AUDIT).await?;
    for signer in [&signer_sink_a, &sink_b.signer] {
        audit
            .get_last_raw_message_by_subject(&subjects::audit_checkpoint(signer))
            .await
            .map_err(|e| anyhow::anyhow!("no checkpoint by sink {signer}: {e}"))?;
    }

    // A row of the handover phase deleted: found and named.
    ch.query("ALTER TABLE decisions DELETE WHERE event_id = ?")
        .bind(second[2].as_str())
        .execute()
        .await?;
    eventually(WAIT, "the deletion to apply", || async {
        row(&services, &second[2])
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    let out = meshctl(&services, &["audit", "verify"])?;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("first: deleted: decision planner/{}", second[2])),
        "{}",
        stdout(&out)
    );

    for replica in [worker_a, worker_b] {
        replica.stop().await?;
    }
    for replica in [sink_a, sink_b] {
        replica.stop().await?;
    }
    services.stop().await
}
