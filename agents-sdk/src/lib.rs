//! Write an agentmesh agent in twenty lines.
//!
//! An [`Agent`] is a NATS connection under an agent id. It publishes the
//! steps of a [`Workflow`] (prompt, reasoning, action, observation, memory
//! update, output, handoffs, messages, tool calls) as CloudEvents on
//! `mesh.ingress.<agent>.<step>`, with `source`, `traceparent` and
//! `causationid` set; the policy worker decides on each and routes the
//! approved ones. It receives what the mesh routes to it from its own
//! durable consumer ([`Agent::deliveries`]), serves tools registered on its
//! [`AgentBuilder`], and describes itself with an [`AgentCard`] in the
//! `mesh-agents` bucket, where others find it ([`Directory`]).
//!
//! Everything here is the raw contract of `docs/contract.md` underneath: agents
//! written with any NATS client interoperate with agents written with this.
//!
//! A tool-serving agent (`coder` and `code.search` are registered in the
//! shipped example policies; see `docs/sdk.md` for your own):
//!
//! ```no_run
//! use agents_sdk::{Agent, ToolCall, ToolSpec};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let agent = Agent::builder("coder")
//!         .description("Searches the README")
//!         .tool(
//!             ToolSpec::new("code.search")
//!                 .input_schema(json!({"type": "object", "properties": {"query": {"type": "string"}}})),
//!             |call: ToolCall| async move {
//!                 let query: String = call.arg("query")?;
//!                 let text = std::fs::read_to_string("README.md")?;
//!                 let lines: Vec<&str> = text.lines().filter(|l| l.contains(&query)).collect();
//!                 Ok(json!({ "matches": lines }))
//!             },
//!         )
//!         .connect("nats://127.0.0.1:4222")
//!         .await?;
//!     agent.serve(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//!     Ok(())
//! }
//! ```
//!
//! And its caller:
//!
//! ```no_run
//! use agents_sdk::Agent;
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let agent = Agent::connect("planner", "nats://127.0.0.1:4222").await?;
//!     let wf = agent.workflow();
//!     wf.prompt("Where does the README talk about NATS?").await?;
//!     let found = wf.call_tool("code.search", json!({"query": "NATS"})).await?;
//!     wf.output(found.to_string()).await?;
//!     println!("meshctl trace {}", wf.trace_id());
//!     Ok(())
//! }
//! ```

pub mod a2a;
mod agent;
mod call;
mod card;
mod delivery;
mod error;
mod feed;
mod inbox;
mod inner;
mod metrics;
mod otel;
pub mod payload;
mod received;
mod tools;
mod trust;
mod workflow;

pub use a2a::{A2aReply, A2aRequest};
pub use agent::{AgentBuilder, consumer_name};
pub use call::{DecisionWait, Request, ToolCallRequest};
pub use card::{
    AgentCard, AgentInterface, Capabilities, CardChange, CardWatch, Directory, Skill, ToolSpec,
};
pub use delivery::{Deliveries, Delivery, Failed};
pub use error::{
    BoxError, CallError, CallErrorKind, ConnectError, ConnectErrorKind, DecisionError,
    DecisionErrorKind, DeliveryError, DeliveryErrorKind, DirectoryError, DirectoryErrorKind, Error,
    NKEY_FILE_ENV, PublishError, PublishErrorKind, ToolError, agent_key_path,
};
pub use inner::{
    Agent, BoxFuture, DEFAULT_ACK_WAIT, DEFAULT_CALL_TIMEOUT, DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PREFETCH, Published,
};
pub use metrics::{AgentMetrics, Pending};
pub use received::Received;
pub use tools::ToolCall;
pub use workflow::{Step, Workflow, step_token};

pub use schemas::{AgentId, Decision, DecisionReceipt, EventType, TraceParent};

/// The guide `docs/sdk.md` ("Write an agent"), compiled with the doctests so
/// its code keeps working.
#[cfg(doctest)]
#[doc = include_str!("../../docs/sdk.md")]
pub struct WriteAnAgent;

/// The modules of this crate depend downward only (`inner`'s module doc
/// gives the order): a module names another as `crate::<module>`, and the
/// graph of those names has no cycle.
#[cfg(test)]
mod layering {
    use std::collections::{BTreeMap, BTreeSet};

    type Graph = BTreeMap<String, BTreeSet<String>>;

    /// The modules `source` names as `crate::<module>` before its unit
    /// tests (a top-level `#[cfg(test)]`), comments left out; an error for a
    /// `crate::<Name>` that does not go through a module.
    fn named(source: &str, modules: &BTreeSet<String>) -> Result<BTreeSet<String>, String> {
        let mut found = BTreeSet::new();
        for line in source
            .lines()
            .take_while(|l| !l.starts_with("#[cfg(test)]"))
        {
            let code = line.split("//").next().unwrap_or_default();
            for (at, _) in code.match_indices("crate::") {
                let rest = &code[at + "crate::".len()..];
                let names: Vec<&str> = match rest.strip_prefix('{') {
                    Some(list) => list
                        .split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .map(|n| n.trim().split("::").next().unwrap_or_default())
                        .collect(),
                    None => vec![
                        rest.split(|c: char| !c.is_alphanumeric() && c != '_')
                            .next()
                            .unwrap_or_default(),
                    ],
                };
                for name in names.into_iter().filter(|n| !n.is_empty()) {
                    if !modules.contains(name) {
                        return Err(format!(
                            "`crate::{name}` in `{}`: name the module it is defined in",
                            line.trim()
                        ));
                    }
                    found.insert(name.to_owned());
                }
            }
        }
        Ok(found)
    }

    /// A cycle of `graph`, as the modules along it, if there is one.
    fn cycle(graph: &Graph) -> Option<Vec<String>> {
        fn visit(
            node: &str,
            graph: &Graph,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(start) = path.iter().position(|n| n == node) {
                let mut found = path[start..].to_vec();
                found.push(node.to_owned());
                return Some(found);
            }
            if done.contains(node) {
                return None;
            }
            path.push(node.to_owned());
            for next in graph.get(node).into_iter().flatten() {
                if let Some(found) = visit(next, graph, path, done) {
                    return Some(found);
                }
            }
            path.pop();
            done.insert(node.to_owned());
            None
        }
        let mut done = BTreeSet::new();
        graph
            .keys()
            .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
    }

    #[test]
    fn modules_depend_downward_only() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            let stem = path.file_stem().unwrap().to_str().unwrap().to_owned();
            if path.extension().is_some_and(|e| e == "rs") && stem != "lib" {
                files.insert(stem, std::fs::read_to_string(&path).unwrap());
            }
        }
        assert!(files.len() > 10, "only {} modules found", files.len());
        let modules: BTreeSet<String> = files.keys().cloned().collect();
        let mut graph = Graph::new();
        for (module, source) in &files {
            let mut uses = named(source, &modules).unwrap_or_else(|e| panic!("{module}: {e}"));
            uses.remove(module);
            graph.insert(module.clone(), uses);
        }
        assert_eq!(
            cycle(&graph),
            None,
            "modules of agents-sdk import each other in a circle: {graph:?}"
        );
        // The shared state is below everything that works on it.
        for module in ["workflow", "call", "tools", "a2a", "delivery"] {
            assert!(graph[module].contains("inner"), "{module} uses `inner`");
        }
    }

    #[test]
    fn the_check_finds_circles_and_root_paths() {
        let modules: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let named_by = |source: &str| named(source, &modules);
        assert_eq!(
            named_by("use crate::a::X;\n// crate::c\nfn f() { crate::b::g() }\n#[cfg(test)]\nuse crate::c;")
                .unwrap(),
            ["a", "b"].map(String::from).into()
        );
        assert_eq!(
            named_by("use crate::{a::X, b};").unwrap(),
            ["a", "b"].map(String::from).into()
        );
        assert!(named_by("fn f() -> crate::X {}").is_err());
        let mut graph = Graph::new();
        graph.insert("a".into(), ["b".to_owned()].into());
        graph.insert("b".into(), ["c".to_owned()].into());
        graph.insert("c".into(), BTreeSet::new());
        assert_eq!(cycle(&graph), None);
        graph.insert("c".into(), ["a".to_owned()].into());
        assert_eq!(
            cycle(&graph),
            Some(["a", "b", "c", "a"].map(String::from).to_vec())
        );
    }
}
