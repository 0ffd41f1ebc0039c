//! `docs/deployment.md` shows the audit tables as
//! `ReplicatedReplacingMergeTree` for a replicated ClickHouse; this keeps
//! that DDL identical to what the sink itself creates with
//! `--clickhouse-replicated` (the same template), `ON CLUSTER` aside.

use audit_sink::schema::{self, Engine, ServerFeatures};

#[test]
fn the_replicated_tables_in_the_deployment_guide_match_the_sink_schema() {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/deployment.md"
    ))
    .unwrap();
    let features = ServerFeatures::from_version("24.8");
    let engine = Engine::Replicated {
        on_cluster: Some("{cluster}".into()),
    };
    let ddl = schema::ddl_with("agentmesh", &features, 0, &engine);
    assert_eq!(ddl.len(), 1 + schema::TABLES.len());
    for statement in &ddl {
        assert!(
            guide.contains(&format!("{statement};")),
            "docs/deployment.md lacks the replicated DDL as the sink renders it:\n{statement};"
        );
    }
    // What the sink runs on each replica is the same, without ON CLUSTER.
    let sink = schema::ddl_with(
        "agentmesh",
        &features,
        0,
        &Engine::Replicated { on_cluster: None },
    );
    for (doc, own) in ddl.iter().zip(&sink) {
        assert_eq!(doc.replace(" ON CLUSTER '{cluster}'", ""), *own);
    }
}
