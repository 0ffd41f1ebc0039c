//! Cedar evaluation alone: `PolicyBundle::decide` on the shipped policies
//! plus 10, 100 and 1,000 generated ones. Criterion reports the mean; the
//! p50/p99 lines come from timing 20,000 single decisions, with the
//! worker's allocator (mimalloc).

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use policy_engine::{PolicyBundle, generated_policies};
use schemas::{EventBuilder, EventBuilderV10, Limits, MeshEvent, encode_binary};

/// The allocator the `policy-worker` binary runs with (its `main.rs`), so
/// the figures are those of the decisions the worker makes.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn bundle(extra: usize) -> (tempfile::TempDir, PolicyBundle) {
    let dir = testkit::policies_copy().unwrap();
    std::fs::write(
        dir.path().join("generated.cedar"),
        generated_policies(extra),
    )
    .unwrap();
    let bundle = PolicyBundle::load(dir.path()).unwrap();
    (dir, bundle)
}

fn events() -> Vec<(&'static str, MeshEvent)> {
    let handoff = EventBuilderV10::new()
        .id("e1")
        .source("/agents/planner")
        .ty("io.agentmesh.task.handoff")
        .extension("target", "coder")
        .data("application/json", serde_json::json!({"task": "x"}))
        .build()
        .unwrap();
    let tool = EventBuilderV10::new()
        .id("e2")
        .source("/agents/coder")
        .ty("io.agentmesh.tool.call")
        .subject("shell.exec")
        .build()
        .unwrap();
    [
        ("handoff (allow)", "mesh.ingress.planner.handoff", handoff),
        ("shell.exec (deny)", "mesh.ingress.coder.tool_call", tool),
    ]
    .into_iter()
    .map(|(name, subject, event)| {
        let (h, p) = encode_binary(&event);
        (
            name,
            MeshEvent::from_message(subject, Some(&h), &p, Limits::default()).unwrap(),
        )
    })
    .collect()
}

fn decide(c: &mut Criterion) {
    let events = events();
    let mut group = c.benchmark_group("cedar_decide");
    for extra in [10, 100, 1000] {
        let (_dir, bundle) = bundle(extra);
        for (name, event) in &events {
            let mut samples: Vec<u64> = (0..20_000)
                .map(|_| {
                    let t = Instant::now();
                    black_box(bundle.decide(black_box(event), "step"));
                    t.elapsed().as_nanos() as u64
                })
                .collect();
            samples.sort_unstable();
            let q = |p: f64| samples[((samples.len() as f64 - 1.0) * p) as usize] as f64 / 1000.0;
            println!(
                "cedar_decide {} policies, {name}: p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, p99.9 {:.1} µs",
                bundle.len(),
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999)
            );
            group.bench_with_input(BenchmarkId::new(*name, bundle.len()), event, |b, event| {
                b.iter(|| bundle.decide(black_box(event), "step"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
