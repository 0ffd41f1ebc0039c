//! The e2e integration tests, one test binary: each former test
//! file is a module here (`cargo test -p e2e --test it <module>::`),
//! so the workspace links this crate's tests once. `traces_across_agents`
//! is a binary of its own: it installs the process-wide tracing
//! subscriber.

mod break_in;
mod cluster_faults;
mod compose_files;
mod damaged_store;
mod dependencies;
mod fastmcp_bridged;
mod guardrails_with_credentials;
mod mcp_gateway;
mod mcp_support;
mod python_sdk;
mod python_support;
mod receipts_from_the_stream;
mod replicated_clickhouse;
mod sdk_discovery;
mod sdk_mesh;
mod sdk_pressure;
mod sdk_steps;
mod sdk_support;
mod sdk_tool_schemas;
mod sdk_with_credentials;
mod signed_deliveries;
mod tool_cache_with_credentials;
