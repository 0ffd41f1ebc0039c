//! What the examples share: where the broker is and which key each agent
//! connects with, so that every example runs against the stack `meshctl up`
//! starts (authorization on) as well as against `meshctl up --insecure`.
//!
//! - `--nats-url URL`, else `NATS_URL`, else `nats://127.0.0.1:4222`;
//! - `--nkey-file PATH`: the agent's nkey seed (or credentials) file, for an
//!   example that runs one agent; without the flag the SDK itself reads
//!   `AGENTMESH_NKEY_FILE`;
//! - `--nkey-dir DIR` (or `AGENTMESH_NKEY_DIR`): each agent connects with
//!   `DIR/<id>.nk`, for an example that runs several (`meshctl up` writes
//!   them to `.agentmesh/auth/agents/`).
//!
//! Every other argument is left to the example.

use std::path::PathBuf;

use agents_sdk::{AgentBuilder, NKEY_FILE_ENV, agent_key_path};
use anyhow::{Context, bail};

/// The options every example takes, and the rest of its arguments.
pub(crate) struct Options {
    url: String,
    nkey_file: Option<PathBuf>,
    nkey_dir: Option<PathBuf>,
    /// The example's own arguments, in order.
    pub(crate) args: Vec<String>,
}

impl Options {
    /// Reads the command line and the environment for an example that runs
    /// `agents`.
    pub(crate) fn parse(agents: &[&str]) -> anyhow::Result<Self> {
        let mut options = Options {
            url: std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            nkey_file: None,
            nkey_dir: std::env::var_os("AGENTMESH_NKEY_DIR").map(PathBuf::from),
            args: Vec::new(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => {
                    (flag.to_owned(), Some(value.to_owned()))
                }
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .with_context(|| format!("`{name}` needs a value"))
            };
            match flag.as_str() {
                "--nats-url" => options.url = value("--nats-url")?,
                "--nkey-file" => options.nkey_file = Some(value("--nkey-file")?.into()),
                "--nkey-dir" => options.nkey_dir = Some(value("--nkey-dir")?.into()),
                _ => options.args.push(arg),
            }
        }
        if let [_, _, ..] = agents {
            let from_env = std::env::var_os(NKEY_FILE_ENV).filter(|v| !v.is_empty());
            if options.nkey_dir.is_none() && (options.nkey_file.is_some() || from_env.is_some()) {
                bail!(
                    "this example runs the agents {}, each with its own key: pass `--nkey-dir \
                     .agentmesh/auth/agents` (each agent's `<id>.nk`) instead of one key file",
                    agents.join(", ")
                );
            }
        }
        if let Some(dir) = &options.nkey_dir {
            for agent in agents {
                let path = dir.join(format!("{agent}.nk"));
                if !path.is_file() {
                    bail!(
                        "no key for agent `{agent}`: `{}` does not exist (`meshctl up` writes \
                         `{}`; `meshctl agents add {agent}` registers a new agent)",
                        path.display(),
                        agent_key_path(agent)
                    );
                }
            }
        }
        Ok(options)
    }

    /// The broker's URL (or the comma-separated URLs of a cluster's nodes).
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// `builder` for agent `id` with its key: `--nkey-file`, else
    /// `<--nkey-dir>/<id>.nk`, else none (the SDK reads
    /// `AGENTMESH_NKEY_FILE`).
    pub(crate) fn keyed(&self, builder: AgentBuilder, id: &str) -> AgentBuilder {
        match (&self.nkey_file, &self.nkey_dir) {
            (Some(file), _) => builder.nkey_file(file),
            (None, Some(dir)) => builder.nkey_file(dir.join(format!("{id}.nk"))),
            (None, None) => builder,
        }
    }
}
