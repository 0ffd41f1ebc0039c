//! The payload detectors alone: `Detector::scan_payload` on JSON payloads
//! of 1, 16 and 256 KiB — clean prose, prose with PII and secrets in it,
//! JSON with escapes (decoded before scanning) and non-UTF-8 bytes.
//! Criterion reports time and throughput; the `ns/KiB` lines come from
//! timing repeated scans of each payload. A second group prices the whole
//! guardrail context in a decision: `PolicyBundle::decide` on the shipped
//! set against the same set with the `detectors`/`rate`/`budget` records
//! taken out of the schema (and `payload.cedar`, which reads them).

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use policy_engine::{Detector, PolicyBundle};
use schemas::{EventBuilder, EventBuilderV10, Limits, MeshEvent, encode_binary};

const PROSE: &str = "The coder searched the repository for the signup handler, ran the \
    tests and found two failures in the validation module; the reviewer asked for clearer \
    messages and a test for empty passwords. Build 20240115 passed on the second run. ";

/// A JSON object of about `kib` KiB whose text fields hold `filler`.
fn payload(kib: usize, filler: &str, sprinkle: &str) -> Vec<u8> {
    let mut text = String::new();
    let mut i = 0;
    while text.len() < kib * 1024 {
        text.push_str(filler);
        i += 1;
        if !sprinkle.is_empty() && i % 4 == 1 {
            text.push_str(sprinkle);
        }
    }
    serde_json::to_vec(&serde_json::json!({"task": "review", "notes": text, "step": 7})).unwrap()
}

fn cases() -> Vec<(&'static str, usize, Vec<u8>)> {
    let mut out = Vec::new();
    for kib in [1, 16, 256] {
        out.push(("clean json", kib, payload(kib, PROSE, "")));
        out.push((
            "json with pii and secrets",
            kib,
            payload(
                kib,
                PROSE,
                " mail alice@example.com, card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE. ",
            ),
        ));
        out.push((
            "json with escapes",
            kib,
            payload(kib, "line one\n\tline \"two\" \u{00e9}t\u{00e9} ", ""),
        ));
        let bytes: Vec<u8> = (0..kib * 1024).map(|i| (i * 131 % 251) as u8).collect();
        out.push(("binary", kib, bytes));
    }
    out
}

fn detect(c: &mut Criterion) {
    let detector = Detector::new().unwrap();
    let mut group = c.benchmark_group("detect");
    for (name, kib, data) in cases() {
        let rounds = (4096 / kib).max(20);
        let t = Instant::now();
        for _ in 0..rounds {
            black_box(detector.scan_payload(black_box(&data)));
        }
        let per = t.elapsed().as_nanos() as f64 / rounds as f64;
        let kib_actual = data.len() as f64 / 1024.0;
        println!(
            "detect {name}, {kib_actual:.0} KiB: {:.1} µs per payload, {:.0} ns/KiB ({:.0} MiB/s), findings {:?}",
            per / 1000.0,
            per / kib_actual,
            kib_actual / 1024.0 / (per / 1e9),
            detector.scan_payload(&data).names()
        );
        group.throughput(Throughput::Bytes(data.len() as u64));
        group.bench_with_input(BenchmarkId::new(name, kib), &data, |b, data| {
            b.iter(|| detector.scan_payload(black_box(data)))
        });
    }
    group.finish();
}

/// The shipped policies; `plain` drops the guardrail records and the
/// policies that read them.
fn bundle(plain: bool) -> (tempfile::TempDir, PolicyBundle) {
    let dir = testkit::policies_copy().unwrap();
    if plain {
        std::fs::remove_file(dir.path().join("payload.cedar")).unwrap();
        let schema = dir.path().join("schema.cedarschema");
        let text: String = std::fs::read_to_string(&schema)
            .unwrap()
            .lines()
            .filter(|l| {
                ![
                    "  detectors: Detectors,",
                    "  rate: Rate,",
                    "  budget: Budget,",
                ]
                .contains(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&schema, text).unwrap();
    }
    let bundle = PolicyBundle::load(dir.path()).unwrap();
    (dir, bundle)
}

fn context(c: &mut Criterion) {
    let event = EventBuilderV10::new()
        .id("e1")
        .source("/agents/planner")
        .ty("io.agentmesh.task.handoff")
        .extension("target", "coder")
        .data(
            "application/json",
            serde_json::json!({"task": "Validate email and password length in signup.rs", "acceptance": "tests pass"}),
        )
        .build()
        .unwrap();
    let (h, p) = encode_binary(&event);
    let event = MeshEvent::from_message(
        "mesh.ingress.planner.handoff",
        Some(&h),
        &p,
        Limits::default(),
    )
    .unwrap();
    let mut group = c.benchmark_group("decide_with_guardrails");
    for (name, plain) in [
        ("shipped, guardrail context", false),
        ("without guardrail records", true),
    ] {
        let (_dir, bundle) = bundle(plain);
        assert!(bundle.decide(&event, "handoff").allowed);
        let mut samples: Vec<u64> = (0..20_000)
            .map(|_| {
                let t = Instant::now();
                black_box(bundle.decide(black_box(&event), "handoff"));
                t.elapsed().as_nanos() as u64
            })
            .collect();
        samples.sort_unstable();
        let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
        println!(
            "decide {name} ({} policies): p50 {:.1} µs, p99 {:.1} µs",
            bundle.len(),
            q(0.5),
            q(0.99)
        );
        group.bench_function(name, |b| {
            b.iter(|| bundle.decide(black_box(&event), "handoff"))
        });
    }
    group.finish();
}

criterion_group!(benches, detect, context);
criterion_main!(benches);
