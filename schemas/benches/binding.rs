//! The NATS binding's cost per event: decode + validate an ingress message,
//! and encode an event, in binary and structured mode (512 B of JSON data).

#![expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use schemas::{EventBuilder, EventBuilderV10, Limits, MeshEvent, encode_binary, encode_structured};

fn event() -> schemas::Event {
    EventBuilderV10::new()
        .id("0190d1c2-7a4b-7c3d-9e8f-0123456789ab")
        .source("/agents/planner")
        .ty("io.agentmesh.task.handoff")
        .subject("implement the parser — “fast”")
        .time("2026-11-27T00:00:00Z")
        .extension("target", "coder")
        .extension(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .extension("causationid", "0190d1c2-7a4b-7c3d-9e8f-0123456789aa")
        .data(
            "application/json",
            serde_json::json!({"task": "x".repeat(480)}),
        )
        .build()
        .unwrap()
}

fn binding(c: &mut Criterion) {
    let event = event();
    let (bh, bp) = encode_binary(&event);
    let (sh, sp) = encode_structured(&event);
    let subject = "mesh.ingress.planner.handoff";
    c.bench_function("binary decode+validate", |b| {
        b.iter(|| {
            MeshEvent::from_message(
                subject,
                Some(black_box(&bh)),
                black_box(&bp),
                Limits::default(),
            )
            .unwrap()
        })
    });
    c.bench_function("binary encode", |b| {
        b.iter(|| encode_binary(black_box(&event)))
    });
    c.bench_function("structured decode+validate", |b| {
        b.iter(|| {
            MeshEvent::from_message(
                subject,
                Some(black_box(&sh)),
                black_box(&sp),
                Limits::default(),
            )
            .unwrap()
        })
    });
    c.bench_function("structured encode", |b| {
        b.iter(|| encode_structured(black_box(&event)))
    });
}

criterion_group!(benches, binding);
criterion_main!(benches);
