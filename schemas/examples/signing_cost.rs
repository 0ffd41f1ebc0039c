//! CPU cost of signed decisions per event: sealing a receipt (SHA-256 of a
//! 512-byte payload, the signed bytes, one Ed25519 signature) and verifying
//! a delivery's signature as a recipient does. Then the same signed in
//! batches of 16, 64 and 256 (leaf hashes, the Merkle tree, every proof
//! encoded, one Ed25519 signature per batch) and verified as a recipient
//! with the cache of verified roots does (each proof decoded and folded,
//! one Ed25519 verification per batch). Prints µs per event;
//! `docs/performance.md` quotes it.
//!
//! `cargo run --release -p schemas --example signing_cost`

use std::time::Instant;

use schemas::signing::{
    SignedFields, SignerRecord, SignerStatus, Signers, SigningKey, VerifiedRoots,
};
use schemas::{Decision, DecisionReceipt};

fn cpu_now() -> std::time::Duration {
    // Process CPU time (user + system) from /proc/self/stat, in clock ticks.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    std::time::Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn main() {
    const N: u32 = 50_000;
    let key = SigningKey::generate();
    let payload = vec![b'x'; 512];
    let receipt = DecisionReceipt {
        event_id: "0190c2a0-8f5e-7c3a-9b1d-2e4f6a8b0c1d".into(),
        trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
        decision: Decision::Allow,
        policy_hash: "b47752a7c0d0e810".into(),
        decision_id: "0190c2a0-8f5e-7c3a-9b1d-2e4f6a8b0c1e".into(),
        agent: "planner".into(),
        event_type: "io.agentmesh.task.handoff".into(),
        target: Some("coder".into()),
        decided_at: "2026-12-02T00:00:00.000001Z".into(),
        ..Default::default()
    };
    let mut sealed = receipt.clone();
    let (wall, cpu) = (Instant::now(), cpu_now());
    for _ in 0..N {
        sealed = receipt.clone();
        key.seal(&mut sealed, std::hint::black_box(&payload));
    }
    let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / f64::from(N);
    println!(
        "sign (SHA-256 of 512 B + signed bytes + Ed25519): {:.1} µs/event wall, {:.1} µs/event CPU",
        per(wall.elapsed()),
        per(cpu_now() - cpu)
    );
    let signers = Signers::new([SignerRecord {
        public_key: key.public_key().to_owned(),
        name: "bench".into(),
        status: SignerStatus::Active,
        added_at: String::new(),
        retired_at: String::new(),
        revoked_at: String::new(),
    }]);
    let (wall, cpu) = (Instant::now(), cpu_now());
    for _ in 0..N {
        let r = std::hint::black_box(&sealed);
        assert!(signers.verify_receipt(r).is_ok());
    }
    println!(
        "verify (signed bytes + Ed25519 verification): {:.1} µs/event wall, {:.1} µs/event CPU",
        per(wall.elapsed()),
        per(cpu_now() - cpu)
    );
    let (wall, cpu) = (Instant::now(), cpu_now());
    for _ in 0..N {
        std::hint::black_box(schemas::signing::sha256_hex(std::hint::black_box(&payload)));
    }
    println!(
        "of which SHA-256 of the 512 B payload: {:.1} µs/event wall, {:.1} µs/event CPU",
        per(wall.elapsed()),
        per(cpu_now() - cpu)
    );

    // Batches: what the worker's signer task does per batch, and what a
    // recipient with the root cache does per delivery.
    for size in [16usize, 64, 256] {
        let batches = (N as usize).div_ceil(size);
        let events = u32::try_from(batches * size).unwrap_or(N);
        let per = |d: std::time::Duration| d.as_secs_f64() * 1e6 / f64::from(events);
        let receipts: Vec<DecisionReceipt> = (0..size)
            .map(|i| {
                let mut r = receipt.clone();
                r.event_id = format!("{}-{i}", receipt.event_id);
                r.signer = key.public_key().to_owned();
                r
            })
            .collect();
        let mut sealed = receipts.clone();
        let (wall, cpu) = (Instant::now(), cpu_now());
        for _ in 0..batches {
            sealed = receipts.clone();
            let bytes: Vec<Vec<u8>> = sealed
                .iter_mut()
                .map(|r| {
                    r.data_sha256 = schemas::signing::sha256_hex(std::hint::black_box(&payload));
                    SignedFields::of_receipt(r).bytes()
                })
                .collect();
            let seals = key.seal_batch(&bytes).unwrap_or_default();
            for (r, seal) in sealed.iter_mut().zip(seals) {
                seal.write(r);
            }
        }
        println!(
            "sign in batches of {size} (SHA-256 of 512 B + signed bytes + leaf + tree + proof, one Ed25519 per batch): {:.1} µs/event wall, {:.1} µs/event CPU",
            per(wall.elapsed()),
            per(cpu_now() - cpu)
        );
        let (wall, cpu) = (Instant::now(), cpu_now());
        for _ in 0..batches {
            // A fresh cache per batch: one Ed25519 verification per batch.
            let roots = VerifiedRoots::default();
            for r in &sealed {
                let r = std::hint::black_box(r);
                assert!(signers.verify_receipt_cached(r, Some(&roots)).is_ok());
            }
        }
        println!(
            "verify batches of {size} with the root cache (signed bytes + leaf + proof, one Ed25519 per batch): {:.1} µs/event wall, {:.1} µs/event CPU",
            per(wall.elapsed()),
            per(cpu_now() - cpu)
        );
    }
}
