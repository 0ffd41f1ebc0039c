//! The worker's decision signing key (`docs/contract.md`, "Signed
//! decisions"): each decision is signed once, and the same signature goes
//! into the receipt and onto the delivery or dead letter.
//!
//! Signing goes through one signer task (`docs/security.md`, "Batch
//! signatures"): each event's task sends its decision's signed bytes and
//! waits; the signer takes whatever is queued, up to the configured batch
//! size, and signs it at once — a decision that waited alone gets its own
//! signature (`Mesh-Signature`), two or more a Merkle root signed once and
//! an inclusion proof each (`Mesh-Batch-*`). Woken by the first decision,
//! the signer yields once so the events already runnable reach their
//! signing point too, and signs whatever is queued then (the default: under
//! load decisions queue while a batch is being signed, so batches fill by
//! themselves). With a collection window (`--sign-window-us` above 0) it
//! keeps collecting until the window since that first decision is over or
//! the batch is full, and signs what it has: no decision waits longer than
//! the window (plus the timer's granularity, about a millisecond) for
//! others, and under a steady trickle of events the Ed25519 signature is
//! still shared. `agentmesh.worker.sign.batch` shows the sizes.
//! Everything else here runs at start.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use schemas::DecisionReceipt;
use schemas::signing::{Seal, SignFailed, SignedFields, SignerRecord, SignerStatus, SigningKey};
use tokio::sync::{mpsc, oneshot};

/// One decision's signed bytes and where its seal goes.
type Request = (Vec<u8>, oneshot::Sender<Result<Seal, SignFailed>>);

/// Signs decisions with this replica's key.
#[derive(Debug, Clone)]
pub(crate) struct Sealer {
    key: Arc<SigningKey>,
    /// The signer task's queue; `None` signs on the caller's task (a batch
    /// size of 1).
    queue: Option<mpsc::Sender<Request>>,
    metrics: telemetry::WorkerMetrics,
}

impl Sealer {
    /// The configured key, or — without one — a fresh key for this run,
    /// which the worker then tries to add to `mesh-signers` itself. Only a
    /// broker without authorization lets it (a development stack); with
    /// authorization recipients refuse its deliveries until the operator
    /// adds the key (`meshctl signers add`). With `batch` above 1 the
    /// signer task starts, collecting decisions for up to `window`.
    pub(crate) async fn start(
        key: Option<Arc<SigningKey>>,
        js: &jetstream::Context,
        batch: usize,
        window: Duration,
        metrics: telemetry::WorkerMetrics,
    ) -> Self {
        let key = match key {
            Some(key) => {
                tracing::info!(
                    signer = key.public_key(),
                    batch,
                    window_us = window.as_micros() as u64,
                    "Signing decisions."
                );
                key
            }
            None => {
                let key = Arc::new(SigningKey::generate());
                register_self(js, &key).await;
                key
            }
        };
        Self::new(key, batch, window, metrics)
    }

    /// Signs with `key`, up to `batch` decisions at once, collected for up
    /// to `window` after the first.
    pub(crate) fn new(
        key: Arc<SigningKey>,
        batch: usize,
        window: Duration,
        metrics: telemetry::WorkerMetrics,
    ) -> Self {
        let queue = (batch > 1).then(|| {
            let (queue, requests) = mpsc::channel(batch * 4);
            tokio::spawn(signer(
                key.clone(),
                requests,
                batch,
                window,
                metrics.clone(),
            ));
            queue
        });
        Self {
            key,
            queue,
            metrics,
        }
    }

    /// The public key.
    pub(crate) fn public_key(&self) -> &str {
        self.key.public_key()
    }

    /// The seal of one decision's signed bytes: alone, or in whatever batch
    /// the signer task is about to sign.
    async fn sign(&self, bytes: Vec<u8>) -> Result<Seal, SignFailed> {
        let Some(queue) = &self.queue else {
            self.metrics.signed(1);
            return Ok(Seal::Single {
                signature: self.key.try_sign(&bytes)?,
            });
        };
        let (reply, sealed) = oneshot::channel();
        queue
            .send((bytes, reply))
            .await
            .map_err(|_| SignFailed("the signer task is gone".into()))?;
        sealed
            .await
            .map_err(|_| SignFailed("the signer task dropped the decision".into()))?
    }

    /// Signs the final `receipt` of the event whose message payload is
    /// `payload` (sets `data_sha256`, `signer`, and `signature` or the
    /// `batch_*` fields).
    pub(crate) async fn seal(
        &self,
        receipt: &mut DecisionReceipt,
        payload: &[u8],
    ) -> Result<(), SignFailed> {
        receipt.data_sha256 = schemas::signing::sha256_hex(payload);
        self.seal_digest(receipt).await
    }

    /// Signs a receipt whose `data_sha256` is already set (an approval's
    /// outcome, decided after the payload was stored).
    pub(crate) async fn seal_digest(
        &self,
        receipt: &mut DecisionReceipt,
    ) -> Result<(), SignFailed> {
        receipt.signer = self.key.public_key().to_owned();
        receipt.signature.clear();
        receipt.batch_root.clear();
        receipt.batch_proof.clear();
        receipt.batch_signature.clear();
        let seal = self.sign(SignedFields::of_receipt(receipt).bytes()).await?;
        seal.write(receipt);
        Ok(())
    }
}

/// The signer task: waits for a decision, lets the tasks already runnable
/// run, collects what comes within `window` of the first (up to `batch` in
/// all) and signs them together.
async fn signer(
    key: Arc<SigningKey>,
    mut requests: mpsc::Receiver<Request>,
    batch: usize,
    window: Duration,
    metrics: telemetry::WorkerMetrics,
) {
    let mut waiting = Vec::with_capacity(batch);
    while requests.recv_many(&mut waiting, batch).await > 0 {
        let deadline = tokio::time::Instant::now() + window;
        // The first decision's task woke this one, which the runtime runs
        // next on the same thread: signing now would sign that decision
        // alone while the other events in flight are a step behind. One
        // yield lets them reach their signing point first.
        if waiting.len() < batch {
            tokio::task::yield_now().await;
            while waiting.len() < batch {
                match requests.try_recv() {
                    Ok(request) => waiting.push(request),
                    Err(_) => break,
                }
            }
        }
        // Then the window: decisions arriving until it closes share the
        // signature; a full batch closes it early. Bounded, so a lone
        // decision waits the window and no longer.
        while waiting.len() < batch && !window.is_zero() {
            let room = batch - waiting.len();
            match tokio::time::timeout_at(deadline, requests.recv_many(&mut waiting, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        metrics.signed(waiting.len());
        let (bytes, replies): (Vec<Vec<u8>>, Vec<_>) = waiting.drain(..).unzip();
        match key.seal_batch(&bytes) {
            Ok(seals) => {
                for (reply, seal) in replies.into_iter().zip(seals) {
                    let _ = reply.send(Ok(seal));
                }
            }
            Err(error) => {
                tracing::error!(%error, decisions = replies.len(), "Signing failed; these decisions are not published.");
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

async fn register_self(js: &jetstream::Context, key: &SigningKey) {
    let record = SignerRecord {
        public_key: key.public_key().to_owned(),
        name: "policy-worker (unconfigured, this run only)".into(),
        status: SignerStatus::Active,
        added_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        retired_at: String::new(),
        revoked_at: String::new(),
    };
    let registered = async {
        let kv = js.get_key_value(schemas::subjects::BUCKET_SIGNERS).await?;
        // INVARIANT: a record of strings always serialises.
        let value = serde_json::to_vec(&record)?;
        kv.put(key.public_key(), value.into()).await?;
        Ok::<_, async_nats::Error>(())
    };
    match registered.await {
        Ok(()) => tracing::warn!(
            signer = key.public_key(),
            "No signing key configured: signing with a key for this run only, added to `mesh-signers` (the broker lets anyone write it: development only)."
        ),
        Err(error) => tracing::warn!(
            signer = key.public_key(),
            %error,
            "No signing key configured and `mesh-signers` not writable: recipients refuse this worker's deliveries until the operator adds the key (`meshctl signers add`)."
        ),
    }
}

impl Sealer {
    /// Signs a cached answer (`Mesh-Cache: hit`) over its own attributes
    /// and payload, with the call's decision id, policy hash, trace id and
    /// time from the sealed `receipt`, and stamps it.
    pub(crate) async fn seal_answer(
        &self,
        receipt: &DecisionReceipt,
        h: &mut HeaderMap,
        payload: &[u8],
    ) -> Result<(), SignFailed> {
        use schemas::AttributesReader as _;
        let Ok((event, _)) = schemas::decode(Some(&*h), payload) else {
            return Ok(());
        };
        let agent = event
            .source()
            .to_string()
            .strip_prefix("/agents/")
            .unwrap_or_default()
            .to_owned();
        let target = event
            .extension(schemas::ext::TARGET)
            .map(|v| v.to_string())
            .unwrap_or_default();
        let digest = schemas::signing::sha256_hex(payload);
        let fields = SignedFields {
            decision_id: &receipt.decision_id,
            agent: &agent,
            event_id: event.id(),
            event_type: event.ty(),
            target: &target,
            subject: event.subject().unwrap_or(""),
            decision: schemas::Decision::Allow.as_str(),
            policy_hash: &receipt.policy_hash,
            trace_id: &receipt.trace_id,
            data_sha256: &digest,
            decided_at: &receipt.decided_at,
        };
        let seal = self.sign(fields.bytes()).await?;
        h.insert(
            schemas::headers::DECISION,
            schemas::Decision::Allow.as_str(),
        );
        h.insert(schemas::headers::DECIDED_AT, receipt.decided_at.as_str());
        h.insert(schemas::headers::SIGNER, self.public_key());
        seal.stamp(h);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::signing::{SignerRecord, Signers};

    fn receipt(i: usize) -> DecisionReceipt {
        DecisionReceipt {
            event_id: format!("e-{i}"),
            decision_id: format!("d-{i}"),
            agent: "planner".into(),
            decided_at: "2026-01-02T03:04:05.000006Z".into(),
            ..Default::default()
        }
    }

    /// The count and sum of `agentmesh.worker.sign.batch`.
    fn signatures(metrics: &telemetry::Metrics) -> (u64, u64) {
        let text = metrics.prometheus_text();
        let value = |name: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().last())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in\n{text}")) as u64
        };
        (
            value("agentmesh_worker_sign_batch_count"),
            value("agentmesh_worker_sign_batch_sum"),
        )
    }

    /// One runtime thread, as on a busy host: each decision's task wakes
    /// the signer into the slot the runtime runs next, so without its yield
    /// every decision would be signed alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn concurrent_decisions_share_batches_and_all_verify() {
        let key = Arc::new(SigningKey::generate());
        let signers = signers_of(&key);
        let metrics = telemetry::Metrics::local("test");
        let sealer = new_sealer(&key, 64, Duration::ZERO, &metrics);
        let tasks = seal_at_once(&sealer, 500);
        let mut batched = 0;
        for task in tasks {
            let r = task.await.unwrap().unwrap();
            assert_eq!(signers.verify_receipt(&r), Ok(()), "{r:?}");
            if !r.batch_signature.is_empty() {
                batched += 1;
                let size: u64 = r.batch_proof.split('.').nth(1).unwrap().parse().unwrap();
                assert!((2..=64).contains(&size), "{}", r.batch_proof);
            }
        }
        let (signatures, decisions) = signatures(&metrics);
        assert_eq!(decisions, 500, "every decision is counted in one signature");
        assert!(
            signatures <= 50 && batched > 450,
            "500 decisions runnable at once took {signatures} signatures ({batched} in batches)"
        );

        // A batch size of 1 signs each alone, on the caller's task.
        let alone = new_sealer(&key, 1, Duration::from_secs(60), &metrics);
        let mut r = receipt(0);
        alone.seal(&mut r, b"{}").await.unwrap();
        assert!(!r.signature.is_empty() && r.batch_signature.is_empty());
        assert_eq!(signers.verify_receipt(&r), Ok(()));
    }

    fn new_sealer(
        key: &Arc<SigningKey>,
        batch: usize,
        window: Duration,
        metrics: &telemetry::Metrics,
    ) -> Sealer {
        Sealer::new(
            key.clone(),
            batch,
            window,
            telemetry::WorkerMetrics::new(metrics),
        )
    }

    /// `n` decisions sealed at once, each on its own task.
    fn seal_at_once(
        sealer: &Sealer,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<DecisionReceipt, SignFailed>>> {
        (0..n)
            .map(|i| {
                let sealer = sealer.clone();
                tokio::spawn(async move {
                    let mut r = receipt(i);
                    sealer.seal(&mut r, b"{}").await.map(|()| r)
                })
            })
            .collect()
    }

    fn signers_of(key: &SigningKey) -> Signers {
        Signers::new([SignerRecord {
            public_key: key.public_key().to_owned(),
            name: "w".into(),
            status: SignerStatus::Active,
            added_at: String::new(),
            retired_at: String::new(),
            revoked_at: String::new(),
        }])
    }

    /// Decisions trickling in about one per millisecond, as at 1,000
    /// events/s with nothing else in flight: with a 20 ms window they share
    /// signatures (each alone without one), every one verifies, and none
    /// waits for ever.
    #[tokio::test]
    async fn a_window_fills_batches_from_a_trickle_and_bounds_the_wait() {
        let key = Arc::new(SigningKey::generate());
        let signers = signers_of(&key);
        let metrics = telemetry::Metrics::local("test");
        let window = Duration::from_millis(20);
        let sealer = new_sealer(&key, 256, window, &metrics);
        let trickle = std::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let sealer = sealer.clone();
            tasks.push(tokio::spawn(async move {
                let asked = std::time::Instant::now();
                let mut r = receipt(i);
                sealer
                    .seal(&mut r, b"{}")
                    .await
                    .map(|()| (r, asked.elapsed()))
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for task in tasks {
            let (r, waited) = task.await.unwrap().unwrap();
            assert_eq!(signers.verify_receipt(&r), Ok(()), "{r:?}");
            // Generous for a busy machine; a decision left waiting for a
            // full batch would wait for ever.
            assert!(
                waited < window + Duration::from_secs(2),
                "a decision waited {waited:?} with a {window:?} window"
            );
        }
        let took = trickle.elapsed();
        let (signatures, decisions) = signatures(&metrics);
        assert_eq!(decisions, 200);
        // One signature per window the trickle lasted (sleeps of 1 ms last
        // 1–2 ms, longer on a busy machine: 10–20 decisions a window), and
        // at least two decisions a signature in any case.
        let windows = (took.as_secs_f64() / window.as_secs_f64()).ceil() as u64;
        assert!(
            signatures <= windows + 5 && signatures < 100,
            "200 decisions over {took:?}, about one a millisecond, took {signatures} signatures with a {window:?} window"
        );
    }

    /// A lone decision is signed once the window is over (no hang waiting
    /// for company), on its own; a full batch does not wait for the window.
    #[tokio::test]
    async fn a_lone_decision_is_signed_after_the_window_and_a_full_batch_at_once() {
        let key = Arc::new(SigningKey::generate());
        let signers = signers_of(&key);
        let metrics = telemetry::Metrics::local("test");
        let window = Duration::from_millis(50);
        let sealer = new_sealer(&key, 8, window, &metrics);
        let asked = std::time::Instant::now();
        let mut r = receipt(0);
        sealer.seal(&mut r, b"{}").await.unwrap();
        let waited = asked.elapsed();
        assert!(
            waited >= window && waited < window + Duration::from_secs(2),
            "a lone decision waited {waited:?} with a {window:?} window"
        );
        assert!(
            !r.signature.is_empty() && r.batch_signature.is_empty(),
            "{r:?}"
        );
        assert_eq!(signers.verify_receipt(&r), Ok(()));

        // Eight at once fill the batch: signed without waiting an hour.
        let long = new_sealer(&key, 8, Duration::from_secs(3600), &metrics);
        let tasks = seal_at_once(&long, 8);
        let all = async {
            for task in tasks {
                let r = task.await.unwrap().unwrap();
                assert_eq!(signers.verify_receipt(&r), Ok(()), "{r:?}");
                assert_eq!(
                    r.batch_proof.split('.').nth(1),
                    Some("8"),
                    "{}",
                    r.batch_proof
                );
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("a full batch waited for its window");
    }
}
