//! `docs/deployment.md` shows the audit tables as
//! `ReplicatedReplacingMergeTree` for a replicated ClickHouse; this keeps
//! that DDL identical to what the sink itself creates, engine aside.

use audit_sink::schema::{self, ServerFeatures};

/// The sink's statement for one table, made replicated the way the guide says.
fn replicated(statement: &str, table: &str) -> String {
    statement
        .replace(
            &format!("CREATE TABLE IF NOT EXISTS `agentmesh`.`{table}` ("),
            &format!("CREATE TABLE IF NOT EXISTS `agentmesh`.`{table}` ON CLUSTER '{{cluster}}' ("),
        )
        .replace(
            "ENGINE = ReplacingMergeTree()",
            &format!(
                "ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{{shard}}/agentmesh/{table}', '{{replica}}')"
            ),
        )
}

#[test]
fn the_replicated_tables_in_the_deployment_guide_match_the_sink_schema() {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/deployment.md"
    ))
    .unwrap();
    let ddl = schema::ddl("agentmesh", &ServerFeatures::from_version("24.8"), 0);
    for table in schema::TABLES {
        let statement = ddl
            .iter()
            .find(|s| s.contains(&format!("`agentmesh`.`{table}` (")))
            .unwrap();
        let expected = replicated(statement, table);
        assert!(
            guide.contains(&expected),
            "docs/deployment.md lacks the replicated `{table}` table as the sink defines it:\n{expected};"
        );
    }
}
