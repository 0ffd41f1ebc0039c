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
    use testkit::shape::{circle, module_graph};

    #[test]
    fn modules_depend_downward_only() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let (graph, root_paths) = module_graph(&src).unwrap();
        assert!(graph.len() > 10, "only {} modules found", graph.len());
        assert!(
            root_paths.is_empty(),
            "name the module a name is defined in: {root_paths:?}"
        );
        assert_eq!(
            circle(&graph),
            None,
            "modules of agents-sdk import each other in a circle: {graph:?}"
        );
        // The shared state is below everything that works on it.
        for module in ["workflow", "call", "tools", "a2a", "delivery"] {
            assert!(graph[module].contains("inner"), "{module} uses `inner`");
        }
    }
}
