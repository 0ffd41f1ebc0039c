//! Agent cards in `mesh-agents` on a real nats-server: registered on
//! connect, listed, found by skill and tool, watched.

// Test helpers outside `#[test]` fns panic to fail the test, too.

use crate::sdk_support as support;

use agents_sdk::{Agent, AgentCard, CardChange, Directory, Skill, ToolCall, ToolSpec};
use futures::StreamExt;
use serde_json::json;
use support::*;

fn coder() -> agents_sdk::AgentBuilder {
    Agent::builder("coder")
        .name("Coder")
        .description("Writes and searches code")
        .version("2.1.0")
        .skill(
            Skill::new("rust", "Rust programming")
                .tag("code")
                .example("add a test"),
        )
        .tool(
            ToolSpec::new("code.search")
                .description("Search the repository")
                .input_schema(json!({
                    "type": "object",
                    "properties": {"query": {"type": "string"}},
                    "required": ["query"]
                })),
            |_call: ToolCall| async move { Ok(json!([])) },
        )
}

#[tokio::test]
async fn cards_are_discoverable_by_skill_and_tool() {
    let mesh = Mesh::start().await;
    let _coder = mesh.agent(coder()).await;
    let _reviewer = mesh
        .agent(
            Agent::builder("reviewer")
                .description("Reviews changes")
                .skill(
                    Skill::new("review", "Code review")
                        .tag("code")
                        .tag("quality"),
                ),
        )
        .await;
    let planner = mesh.agent(Agent::builder("planner")).await;
    let directory = planner.directory();

    let ids = |cards: Vec<AgentCard>| cards.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(directory.find_by_skill("code").await.unwrap()),
        ["coder", "reviewer"]
    );
    assert_eq!(
        ids(directory.find_by_skill("review").await.unwrap()),
        ["reviewer"]
    );
    assert_eq!(
        ids(directory.find_by_skill("rust").await.unwrap()),
        ["coder"]
    );
    assert!(directory.find_by_skill("cooking").await.unwrap().is_empty());
    assert_eq!(
        ids(directory.find_by_tool("code.search").await.unwrap()),
        ["coder"]
    );
    assert_eq!(
        ids(directory.list().await.unwrap()),
        ["coder", "planner", "reviewer"]
    );

    // The card as stored: A2A fields and the tool's input schema.
    let card = directory.get("coder").await.unwrap().unwrap();
    assert_eq!(card.name, "Coder");
    assert_eq!(card.version, "2.1.0");
    assert_eq!(card.skills[0].examples, ["add a test"]);
    assert_eq!(card.tools[0].input_schema["required"], json!(["query"]));
    let raw = mesh
        .js
        .get_key_value("mesh-agents")
        .await
        .unwrap()
        .get("coder")
        .await
        .unwrap()
        .unwrap();
    let raw: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    assert_eq!(
        raw["tools"][0]["inputSchema"]["properties"]["query"]["type"],
        "string"
    );
    assert_eq!(raw["skills"][0]["tags"], json!(["code"]));
    assert_eq!(directory.get("nobody").await.unwrap(), None);

    // A standalone directory (no agent) sees the same.
    let standalone = Directory::open(&mesh.js).await.unwrap();
    assert_eq!(
        ids(standalone.find_by_skill("quality").await.unwrap()),
        ["reviewer"]
    );
}

#[tokio::test]
async fn watch_sees_current_cards_then_changes() {
    let mesh = Mesh::start().await;
    let _coder = mesh.agent(coder()).await;
    let directory = Directory::open(&mesh.js).await.unwrap();
    let mut watch = directory.watch().await.unwrap();

    let first = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&first, CardChange::Registered(card) if card.id == "coder"),
        "{first:?}"
    );

    let _reviewer = mesh
        .agent(Agent::builder("reviewer").skill(Skill::new("review", "Code review")))
        .await;
    let next = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        matches!(&next, CardChange::Registered(card) if card.has_skill("review")),
        "{next:?}"
    );

    directory.remove("reviewer").await.unwrap();
    let gone = tokio::time::timeout(WAIT, watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(gone, CardChange::Removed("reviewer".into()));
    assert!(directory.get("reviewer").await.unwrap().is_none());
}

#[tokio::test]
async fn card_registration_can_be_turned_off() {
    let mesh = Mesh::start().await;
    let agent = mesh.agent(coder().register_card(false)).await;
    assert!(agent.directory().get("coder").await.unwrap().is_none());
    // The card is still what the agent would publish.
    assert!(agent.card().serves("code.search"));
}
