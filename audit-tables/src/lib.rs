//! The audit tables, declared once: their names, columns and DDL
//! ([`schema`]), the row types the audit sink inserts and readers fetch
//! ([`rows`]), and the SQL shipped for auditors with the types its results
//! are read into ([`queries`]). A test checks that each table's DDL and row
//! type name the same columns (`schema::columns_agree`).
//!
//! The audit sink writes the tables; `meshctl` (trace, replay, audit, ui)
//! reads them — both through this crate, so neither re-declares a column and
//! `meshctl` does not link the sink for them. The contract's description of
//! the tables is `docs/contract.md`.

pub mod queries;
pub mod rows;
pub mod schema;

/// Default ClickHouse HTTP endpoint.
pub const DEFAULT_CLICKHOUSE_URL: &str = "http://127.0.0.1:8123";
/// Default ClickHouse user.
pub const DEFAULT_CLICKHOUSE_USER: &str = "default";
