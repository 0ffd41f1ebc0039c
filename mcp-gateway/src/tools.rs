//! Which tools an MCP caller sees, decided without I/O: the tools of the
//! cards in `mesh-agents`, each served by the first card (by agent id) that
//! names it, kept when the active policy set allows this caller's
//! `tool.call` of it — the same Cedar request the worker evaluates for a call
//! with empty arguments (`Agent::"<caller>"`, `Action::"io.agentmesh.tool.call"`,
//! `Tool::"<name>"`). A policy that looks at the arguments may still deny a
//! listed tool at call time; the worker's decision is the one that counts.

use std::collections::BTreeMap;
use std::sync::Arc;

use agents_sdk::AgentCard;
use policy_engine::PolicyBundle;
use schemas::{ContentMode, EventBuilder as _, EventBuilderV10, EventType, MeshEvent};
use serde_json::Value;

/// One tool as the mesh offers it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Offered {
    /// The agent that serves it.
    pub provider: String,
    /// Its name, description and input schema, from the card.
    pub spec: agents_sdk::ToolSpec,
}

/// Every tool of `cards`, each with its provider: the first card by agent id
/// that names it.
pub(crate) fn offered<'a>(cards: impl IntoIterator<Item = &'a AgentCard>) -> Vec<Offered> {
    let mut cards: Vec<&AgentCard> = cards.into_iter().collect();
    cards.sort_by(|a, b| a.id.cmp(&b.id));
    let mut by_name: BTreeMap<&str, Offered> = BTreeMap::new();
    for card in cards {
        for spec in &card.tools {
            by_name
                .entry(spec.name.as_str())
                .or_insert_with(|| Offered {
                    provider: card.id.clone(),
                    spec: spec.clone(),
                });
        }
    }
    by_name.into_values().collect()
}

/// Whether `policies` let `caller` call `tool` on `provider` (with empty
/// arguments). Anything that keeps the request from forming denies.
pub(crate) fn allowed(policies: &PolicyBundle, caller: &str, tool: &str, provider: &str) -> bool {
    let built = EventBuilderV10::new()
        .id("mcp-gateway-tools-list")
        .source(format!("/agents/{caller}"))
        .ty(EventType::ToolCall.as_str())
        .subject(tool)
        .extension(schemas::ext::TARGET, provider)
        .data("application/json", Value::Object(Default::default()))
        .build();
    let Ok(event) = built else {
        return false;
    };
    match MeshEvent::validate(caller, event, ContentMode::Binary, 2) {
        Ok(event) => policies.decide(&event, "tool_call").allowed,
        Err(_) => false,
    }
}

/// The tools `caller` may call, as MCP tools.
pub(crate) fn visible(
    offered: &[Offered],
    policies: &PolicyBundle,
    caller: &str,
) -> Vec<rmcp::model::Tool> {
    offered
        .iter()
        .filter(|o| allowed(policies, caller, &o.spec.name, &o.provider))
        .map(mcp_tool)
        .collect()
}

/// A card's tool as an MCP tool: name, description and input schema (a
/// schema that is not a JSON object becomes "any object").
pub(crate) fn mcp_tool(offered: &Offered) -> rmcp::model::Tool {
    let schema = match &offered.spec.input_schema {
        Value::Object(o) => o.clone(),
        _ => {
            let mut o = serde_json::Map::new();
            o.insert("type".into(), Value::String("object".into()));
            o
        }
    };
    let description = if offered.spec.description.is_empty() {
        format!(
            "`{}`, served by mesh agent `{}`",
            offered.spec.name, offered.provider
        )
    } else {
        offered.spec.description.clone()
    };
    rmcp::model::Tool::new(offered.spec.name.clone(), description, Arc::new(schema))
}

#[cfg(test)]
mod tests {
    use agents_sdk::ToolSpec;
    use serde_json::json;

    use super::*;

    fn shipped() -> PolicyBundle {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        PolicyBundle::load(&dir).unwrap()
    }

    #[test]
    fn each_tool_is_offered_once_by_the_first_agent_that_names_it() {
        let b = AgentCard::new("b").tool(ToolSpec::new("code.search").description("b's"));
        let a = AgentCard::new("a")
            .tool(ToolSpec::new("code.search").description("a's"))
            .tool(ToolSpec::new("tests.run"));
        let offered = offered([&b, &a]);
        let names: Vec<(&str, &str)> = offered
            .iter()
            .map(|o| (o.spec.name.as_str(), o.provider.as_str()))
            .collect();
        assert_eq!(names, [("code.search", "a"), ("tests.run", "a")]);
        assert_eq!(offered[0].spec.description, "a's");
    }

    #[test]
    fn a_caller_sees_what_the_shipped_policies_let_it_call() {
        let policies = shipped();
        let card = AgentCard::new("tools")
            .tool(
                ToolSpec::new("code.search")
                    .description("Search the code")
                    .input_schema(json!({"type": "object", "required": ["query"]})),
            )
            .tool(ToolSpec::new("repo.write"))
            .tool(ToolSpec::new("shell.exec"));
        let offered = offered([&card]);
        let names = |caller: &str| -> Vec<String> {
            visible(&offered, &policies, caller)
                .into_iter()
                .map(|t| t.name.to_string())
                .collect()
        };
        // Low risk for every member; medium for workers; shell.exec never;
        // an unregistered agent nothing.
        assert_eq!(names("planner"), ["code.search"]);
        assert_eq!(names("coder"), ["code.search", "repo.write"]);
        assert!(names("stranger").is_empty());
        let tool = &visible(&offered, &policies, "planner")[0];
        assert_eq!(tool.description.as_deref(), Some("Search the code"));
        assert_eq!(tool.input_schema["required"], json!(["query"]));
    }

    #[test]
    fn a_tool_without_a_description_or_object_schema_still_lists() {
        let o = Offered {
            provider: "tools".into(),
            spec: ToolSpec::new("x").input_schema(json!(true)),
        };
        let tool = mcp_tool(&o);
        assert_eq!(tool.input_schema["type"], "object");
        assert!(
            tool.description
                .unwrap()
                .contains("served by mesh agent `tools`")
        );
    }
}
