//! One MCP server the bridge runs or reaches: started (a child process
//! speaking stdio) or connected (a Streamable HTTP URL) with `rmcp`, its
//! tools listed, and calls made with a deadline. A server that went away
//! (a crashed process, a closed session) is started or connected again on
//! the next call. A server's `notifications/tools/list_changed` (and a
//! server started again) wakes the [`Notify`] given with
//! [`Server::with_tools_changed`], so the bridge lists its tools again.

use std::sync::Arc;
use std::time::Duration;

use agents_sdk::ToolError;
use rmcp::model::{CallToolRequestParams, CallToolResult, JsonObject, Tool};
use rmcp::service::{NotificationContext, RoleClient, RunningService, ServiceError};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ClientHandler, ServiceExt};
use serde_json::{Value, json};
use tokio::sync::{Mutex, Notify};

/// Where an MCP server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A command line, run with `sh -c 'exec <command>'`, speaking MCP on
    /// its stdin and stdout (its stderr is the bridge's).
    Stdio(String),
    /// A Streamable HTTP endpoint (`http://host:port/mcp`).
    Http(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Stdio(command) => write!(f, "stdio `{command}`"),
            Self::Http(url) => write!(f, "`{url}`"),
        }
    }
}

/// Why an MCP server could not be started, reached or listed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The command could not be started.
    #[error(
        "cannot start the MCP server {endpoint}: {source} (is the command installed and on PATH?)"
    )]
    Spawn {
        /// The server.
        endpoint: Endpoint,
        /// Why.
        source: std::io::Error,
    },
    /// The MCP handshake (`initialize`) failed.
    #[error(
        "the MCP server {endpoint} did not complete the MCP handshake: {reason} (is it an MCP server, and for HTTP the full endpoint URL, e.g. `http://127.0.0.1:8000/mcp`?)"
    )]
    Handshake {
        /// The server.
        endpoint: Endpoint,
        /// What went wrong.
        reason: String,
    },
    /// `tools/list` failed.
    #[error("the MCP server {endpoint} did not list its tools: {source}")]
    List {
        /// The server.
        endpoint: Endpoint,
        /// Why.
        source: Box<ServiceError>,
    },
    /// `https://` needs TLS, which this build leaves out.
    #[error(
        "the MCP server `{0}` is HTTPS, which mcp-bridge does not speak: reach it over plain HTTP on a trusted network (e.g. through a local TLS-terminating proxy), or run it over stdio"
    )]
    Https(String),
    /// Neither `http://` nor `https://`.
    #[error("`{0}` is not an HTTP URL (expected `http://host:port/path`)")]
    NotHttp(String),
    /// The server did not answer in time.
    #[error("the MCP server {endpoint} did not answer within {after:?}")]
    TimedOut {
        /// The server.
        endpoint: Endpoint,
        /// The deadline.
        after: Duration,
    },
}

type Client = RunningService<RoleClient, Notices>;

/// The bridge's side of one connection: a server's
/// `notifications/tools/list_changed` wakes `changed`.
struct Notices {
    endpoint: Endpoint,
    changed: Arc<Notify>,
}

impl ClientHandler for Notices {
    fn on_tool_list_changed(
        &self,
        _context: NotificationContext<RoleClient>,
    ) -> impl Future<Output = ()> + Send + '_ {
        tracing::info!(server = %self.endpoint, "The MCP server's tools changed.");
        self.changed.notify_one();
        std::future::ready(())
    }
}

/// One MCP server and its current connection.
pub struct Server {
    endpoint: Endpoint,
    timeout: Duration,
    start_timeout: Duration,
    client: Mutex<Option<Arc<Client>>>,
    changed: Arc<Notify>,
}

impl Server {
    /// A server at `endpoint`: starting it (or connecting, with the MCP
    /// handshake) may take up to `start_timeout`, every request after that
    /// up to `timeout`.
    pub fn new(
        endpoint: Endpoint,
        timeout: Duration,
        start_timeout: Duration,
    ) -> Result<Self, ServerError> {
        if let Endpoint::Http(url) = &endpoint {
            if url.starts_with("https://") {
                return Err(ServerError::Https(url.clone()));
            }
            if !url.starts_with("http://") {
                return Err(ServerError::NotHttp(url.clone()));
            }
        }
        Ok(Self {
            endpoint,
            timeout,
            start_timeout,
            client: Mutex::new(None),
            changed: Arc::new(Notify::new()),
        })
    }

    /// Wakes `changed` when the server says its tools changed
    /// (`notifications/tools/list_changed`) and when it went away (a
    /// server started again may list other tools).
    #[must_use]
    pub fn with_tools_changed(mut self, changed: Arc<Notify>) -> Self {
        self.changed = changed;
        self
    }

    /// Where it is.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    async fn start(&self) -> Result<Client, ServerError> {
        let handshake = |reason: String| ServerError::Handshake {
            endpoint: self.endpoint.clone(),
            reason,
        };
        let notices = Notices {
            endpoint: self.endpoint.clone(),
            changed: self.changed.clone(),
        };
        let started = match &self.endpoint {
            Endpoint::Stdio(command) => {
                let mut cmd = tokio::process::Command::new("sh");
                cmd.arg("-c").arg(format!("exec {command}"));
                let transport =
                    TokioChildProcess::new(cmd).map_err(|source| ServerError::Spawn {
                        endpoint: self.endpoint.clone(),
                        source,
                    })?;
                tokio::time::timeout(self.start_timeout, notices.serve(transport)).await
            }
            Endpoint::Http(url) => {
                let transport = StreamableHttpClientTransport::from_uri(url.as_str());
                tokio::time::timeout(self.start_timeout, notices.serve(transport)).await
            }
        };
        match started {
            Ok(Ok(client)) => {
                tracing::info!(server = %self.endpoint, "MCP server connected.");
                Ok(client)
            }
            Ok(Err(e)) => Err(handshake(e.to_string())),
            Err(_) => Err(ServerError::TimedOut {
                endpoint: self.endpoint.clone(),
                after: self.start_timeout,
            }),
        }
    }

    /// The current connection, started again when there is none or it
    /// closed.
    async fn client(&self) -> Result<Arc<Client>, ServerError> {
        let mut slot = self.client.lock().await;
        if let Some(client) = slot.as_ref()
            && !client.is_closed()
        {
            return Ok(client.clone());
        }
        if slot.take().is_some() {
            tracing::warn!(server = %self.endpoint, "The MCP server's connection closed; starting it again.");
            self.changed.notify_one();
        }
        let client = Arc::new(self.start().await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Drops `client` as the current connection (when it still is): the
    /// next request starts or connects the server again.
    async fn forget(&self, client: &Arc<Client>) {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_some_and(|c| Arc::ptr_eq(c, client)) {
            slot.take();
            self.changed.notify_one();
        }
    }

    /// Its tools (`tools/list`, every page).
    pub async fn tools(&self) -> Result<Vec<Tool>, ServerError> {
        let client = self.client().await?;
        match tokio::time::timeout(self.timeout, client.list_all_tools()).await {
            Ok(Ok(tools)) => Ok(tools),
            Ok(Err(source)) => Err(ServerError::List {
                endpoint: self.endpoint.clone(),
                source: Box::new(source),
            }),
            Err(_) => Err(ServerError::TimedOut {
                endpoint: self.endpoint.clone(),
                after: self.timeout,
            }),
        }
    }

    /// Calls `tool` with `arguments` (a mesh tool call's data): its result
    /// as a mesh tool result ([`result_value`]), or a tool error that says
    /// what went wrong: the tool's own error, the server's refusal, no
    /// answer in time, or the server gone.
    pub async fn call(&self, tool: &str, arguments: &Value) -> Result<Value, ToolError> {
        let arguments = arguments_object(tool, arguments)?;
        let client = self
            .client()
            .await
            .map_err(|e| ToolError::new(format!("`{tool}` was not called: {e}")))?;
        let mut params = CallToolRequestParams::new(tool.to_owned());
        params.arguments = arguments;
        match tokio::time::timeout(self.timeout, client.call_tool(params)).await {
            Ok(Ok(result)) => result_value(&self.endpoint, tool, result),
            Ok(Err(ServiceError::McpError(error))) => Err(ToolError::new(format!(
                "the MCP server {} refused the call of `{tool}`: {} (JSON-RPC error {})",
                self.endpoint, error.message, error.code.0
            ))),
            Ok(Err(error)) => {
                let gone = client.is_closed()
                    || matches!(
                        error,
                        ServiceError::TransportClosed | ServiceError::TransportSend(_)
                    );
                if gone {
                    self.forget(&client).await;
                    Err(ToolError::new(format!(
                        "the MCP server {} went away during the call of `{tool}` ({error}); it is started again for the next call",
                        self.endpoint
                    )))
                } else {
                    Err(ToolError::new(format!(
                        "the call of `{tool}` on the MCP server {} failed: {error}",
                        self.endpoint
                    )))
                }
            }
            Err(_) => {
                tracing::warn!(server = %self.endpoint, tool, timeout = ?self.timeout, "An MCP tool call timed out.");
                Err(ToolError::new(format!(
                    "the MCP server {} did not answer the call of `{tool}` within {:?} (mcp-bridge --call-timeout-secs)",
                    self.endpoint, self.timeout
                )))
            }
        }
    }

    /// Closes the connection (a child process is stopped).
    pub async fn close(&self) {
        let client = self.client.lock().await.take();
        if let Some(client) = client
            && let Ok(mut client) = Arc::try_unwrap(client)
        {
            let _ = client.close().await;
        }
    }
}

/// A mesh tool call's data as MCP `arguments`: an object, or none for
/// `null`.
fn arguments_object(tool: &str, arguments: &Value) -> Result<Option<JsonObject>, ToolError> {
    match arguments {
        Value::Null => Ok(None),
        Value::Object(map) => Ok(Some(map.clone())),
        other => Err(ToolError::new(format!(
            "the arguments of the MCP tool `{tool}` must be a JSON object, not {}",
            match other {
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                Value::String(_) => "a string",
                _ => "an array",
            }
        ))),
    }
}

/// An MCP tool result as the mesh tool result: `isError` becomes a tool
/// error carrying the result's text; otherwise the structured content when
/// there is one, else the text (the text blocks joined by newlines), else
/// `{"content": [...]}` with the MCP content blocks (images, resources).
pub fn result_value(
    endpoint: &Endpoint,
    tool: &str,
    result: CallToolResult,
) -> Result<Value, ToolError> {
    let texts: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    let text = texts.join("\n");
    if result.is_error == Some(true) {
        let why = if text.is_empty() {
            "no message".to_owned()
        } else {
            text
        };
        return Err(ToolError::new(format!(
            "`{tool}` failed on the MCP server {endpoint}: {why}"
        )));
    }
    if let Some(structured) = result.structured_content {
        return Ok(structured);
    }
    if !result.content.is_empty() && texts.len() == result.content.len() {
        return Ok(Value::String(text));
    }
    Ok(json!({"content": result.content}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmcp::model::ContentBlock;

    fn endpoint() -> Endpoint {
        Endpoint::Stdio("server".into())
    }

    #[test]
    fn structured_content_then_text_then_blocks() {
        let mut r = CallToolResult::success(vec![ContentBlock::text("5")]);
        r.structured_content = Some(json!({"result": 5}));
        assert_eq!(
            result_value(&endpoint(), "add", r).unwrap(),
            json!({"result": 5})
        );
        let r = CallToolResult::success(vec![ContentBlock::text("a"), ContentBlock::text("b")]);
        assert_eq!(result_value(&endpoint(), "t", r).unwrap(), json!("a\nb"));
        let r = CallToolResult::success(vec![ContentBlock::image("aGk=", "image/png")]);
        let v = result_value(&endpoint(), "t", r).unwrap();
        assert_eq!(v["content"][0]["type"], "image");
        assert_eq!(v["content"][0]["mimeType"], "image/png");
    }

    #[test]
    fn an_error_result_is_a_tool_error_with_its_text() {
        let r = CallToolResult::error(vec![ContentBlock::text("division by zero")]);
        let e = result_value(&endpoint(), "div", r).unwrap_err();
        assert_eq!(
            e.message(),
            "`div` failed on the MCP server stdio `server`: division by zero"
        );
    }

    #[test]
    fn arguments_are_an_object_or_nothing() {
        assert_eq!(arguments_object("t", &Value::Null).unwrap(), None);
        assert_eq!(
            arguments_object("t", &json!({"a": 1})).unwrap().unwrap()["a"],
            1
        );
        let e = arguments_object("t", &json!("x")).unwrap_err();
        assert!(e.message().contains("not a string"), "{e}");
    }

    #[test]
    fn https_and_other_schemes_are_refused_with_what_to_do() {
        let timeout = Duration::from_secs(1);
        let e = Server::new(Endpoint::Http("https://x/mcp".into()), timeout, timeout)
            .err()
            .unwrap();
        assert!(e.to_string().contains("plain HTTP"), "{e}");
        let e = Server::new(Endpoint::Http("ftp://x".into()), timeout, timeout)
            .err()
            .unwrap();
        assert!(e.to_string().contains("not an HTTP URL"), "{e}");
    }
}
