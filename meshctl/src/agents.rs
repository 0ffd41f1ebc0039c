//! `meshctl agents add|remove|rotate|list`: an agent's key in the identity
//! store (`identity.rs`), its entity in the policy directory's
//! `entities.json` (`entities.rs`), its durable consumers, and the reload of
//! the local nats-server so the key works at once.
//!
//! Adding an agent also adds it to `entities.json` (with its role and
//! attributes, validated with the Cedar schema and the policies before
//! anything is written), and creates its durable delivery consumer; removing
//! it revokes the key, the entity, the consumer and the card.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::bail;
use broker_config::auth::{self, Role};
use broker_config::credentials::read_seed_file;
use broker_config::mcp_tokens;

use crate::entities::{
    entity_agents, read_entities, validate, with_agent, without_agent, write_entities,
};
use crate::exit::{Exit, fail};
use crate::identity::AuthState;
use crate::procs::Home;
use crate::servers::Endpoints;
use crate::stack::nats::{self as nats_server, Applied};

/// `meshctl agents add`.
pub(crate) async fn add(
    home: &Home,
    endpoints: &Endpoints,
    policies: &Path,
    id: &str,
    role: &str,
    attrs: &[String],
) -> anyhow::Result<()> {
    let mut parsed = BTreeMap::new();
    for attr in attrs {
        let Some((k, v)) = attr.split_once('=') else {
            bail!("--attr `{attr}`: write it as KEY=VALUE, e.g. --attr team=platform");
        };
        parsed.insert(k.trim().to_owned(), v.to_owned());
    }
    let state = AuthState::new(home);
    if state.agents()?.iter().any(|e| e.name == id) {
        bail!(
            "agent `{id}` is already registered (`meshctl agents list`); remove it first to give it a new key"
        );
    }
    // Everything that can fail on bad input, before anything is written.
    let entities = with_agent(read_entities(policies)?, id, role, &parsed)?;
    validate(policies, &entities)?;
    state.ensure_services()?;
    state.ensure_agent(id)?;
    write_entities(policies, &entities)?;
    let seed_file = state.seed_file(Role::Agent, id);
    outln!(
        "agent `{id}` registered: role `{role}`, key in {}",
        seed_file.display()
    );

    let (seed, _) = read_seed_file(&seed_file)?;
    let url = endpoints.nats_url.clone();
    match nats_server::reload(home, endpoints, &state, || {
        nats_server::can_reach_jetstream(&url, &seed)
    })
    .await?
    {
        Applied::Reloaded => {
            outln!("nats-server reloaded: `{id}` may connect");
            let js = async_nats::jetstream::new(endpoints.connect_nats().await?);
            match broker_config::provision_agent(&js, id).await {
                Ok(_) => outln!("durable consumer `{}` ready", auth::agent_consumer(id)),
                Err(e) => outln!(
                    "durable consumer `{}` not created yet ({e}); `meshctl up` creates it",
                    auth::agent_consumer(id)
                ),
            }
        }
        Applied::NotRunning => {
            outln!("no nats-server of `meshctl up` runs: the next `meshctl up` lets `{id}` in")
        }
    }
    for line in run_lines(id, &seed_file, &endpoints.nats_url) {
        outln!("{line}");
    }
    Ok(())
}

/// The lines `agents add` ends with: how to run agent `id` with its key
/// (`AGENTMESH_NKEY_FILE`, read by agents-sdk and the Python SDK; the
/// Python SDK's `nkey_seed_file=`), and one step to try it.
fn run_lines(id: &str, seed_file: &Path, nats_url: &str) -> [String; 4] {
    let seed = seed_file.display();
    [
        format!("run `{id}` with its key:"),
        format!(
            "  export AGENTMESH_NKEY_FILE={seed}    # agents-sdk (Rust) and the Python SDK connect with it"
        ),
        format!(
            "  await Agent(\"{id}\").connect(\"{nats_url}\", nkey_seed_file=\"{seed}\")    # Python, explicitly"
        ),
        format!(
            "  meshctl pub --agent {id} --type reasoning --data '{{\"text\":\"hello\"}}'    # one step, and its receipt"
        ),
    ]
}

/// `meshctl agents mcp-token`: a new bearer token for the MCP clients of
/// agent `id` (replacing any old one). The MCP gateway reads only the
/// token's SHA-256 (`mcp-tokens.json`); the token itself is printed and
/// written next to the agent's seed (`agents/<id>.mcp-token`, mode 0600) for
/// the operator to hand to the client.
pub(crate) fn mcp_token(home: &Home, id: &str, json: bool) -> anyhow::Result<()> {
    let state = AuthState::new(home);
    if !state.agents()?.iter().any(|e| e.name == id) {
        return Err(fail(
            Exit::NotFound,
            format!("no agent `{id}` is registered: `meshctl agents add {id} --role <role>` first"),
        ));
    }
    let token = mcp_tokens::new_token();
    let token_file = state.mcp_token_file(id);
    broker_config::credentials::write_private_file(&token_file, format!("{token}\n").as_bytes())
        .map_err(|e| anyhow::anyhow!("`{}`: {e}", token_file.display()))?;
    let tokens_path = state.mcp_tokens_path();
    let mut tokens = mcp_tokens::TokenFile::read(&tokens_path)?;
    tokens.set(id, &token);
    tokens.write(&tokens_path)?;
    if json {
        return crate::output::print_json(&serde_json::json!({
            "agent": id,
            "token": token,
            "token_file": token_file.display().to_string(),
            "tokens_file": tokens_path.display().to_string(),
        }));
    }
    outln!(
        "MCP token of `{id}` written to {} (any older token of `{id}` is refused from now on)",
        token_file.display()
    );
    outln!("point an MCP client at the gateway with it (docs/mcp.md):");
    outln!("  url: http://127.0.0.1:8790/mcp");
    outln!(
        "  header: Authorization: Bearer $(cat {})",
        token_file.display()
    );
    Ok(())
}

/// `meshctl agents rotate`: a new key for agent `id`; the old one is
/// refused (and its connections closed) once the server reloaded. The
/// agent's entity, durable consumer and card stay.
pub(crate) async fn rotate(home: &Home, endpoints: &Endpoints, id: &str) -> anyhow::Result<()> {
    let state = AuthState::new(home);
    let seed_file = state.seed_file(Role::Agent, id);
    let old = read_seed_file(&seed_file).ok().map(|(seed, _)| seed);
    state.rotate_agent(id)?;
    let (seed, _) = read_seed_file(&seed_file)?;
    outln!("agent `{id}`: new key in {}", seed_file.display());
    let url = endpoints.nats_url.clone();
    let switched = || {
        let (url, seed, old) = (url.clone(), seed.clone(), old.clone());
        async move {
            let old_refused = match &old {
                Some(old) => nats_server::is_refused(&url, old).await,
                None => true,
            };
            old_refused && nats_server::can_reach_jetstream(&url, &seed).await
        }
    };
    match nats_server::reload(home, endpoints, &state, switched).await? {
        Applied::Reloaded => outln!(
            "nats-server reloaded: the old key is refused and its connections closed; restart `{id}` with the new seed"
        ),
        Applied::NotRunning => {
            outln!("no nats-server of `meshctl up` runs: the next `meshctl up` uses the new key")
        }
    }
    Ok(())
}

/// `meshctl agents remove`.
pub(crate) async fn remove(
    home: &Home,
    endpoints: &Endpoints,
    policies: &Path,
    id: &str,
) -> anyhow::Result<()> {
    let state = AuthState::new(home);
    let seed = read_seed_file(&state.seed_file(Role::Agent, id))
        .ok()
        .map(|(seed, _)| seed);
    let entities = read_entities(policies)?;
    let in_entities = match without_agent(entities, id) {
        Some(rest) => {
            validate(policies, &rest)?;
            write_entities(policies, &rest)?;
            true
        }
        None => false,
    };
    let registered = state.remove_agent(id)?;
    // Its MCP token goes with it.
    let tokens_path = state.mcp_tokens_path();
    let mut tokens = mcp_tokens::TokenFile::read(&tokens_path)?;
    if tokens.remove(id) {
        tokens.write(&tokens_path)?;
        outln!("MCP token of `{id}` revoked");
    }
    let _ = std::fs::remove_file(state.mcp_token_file(id));
    if !registered && !in_entities {
        return Err(fail(
            Exit::NotFound,
            format!("no agent `{id}` is registered (`meshctl agents list` shows who is)"),
        ));
    }
    outln!(
        "agent `{id}` removed from {}",
        match (registered, in_entities) {
            (true, true) => "the registry and entities.json",
            (true, false) => "the registry",
            _ => "entities.json",
        }
    );
    let url = endpoints.nats_url.clone();
    let refused = || {
        let seed = seed.clone();
        let url = url.clone();
        async move {
            match seed {
                Some(seed) => nats_server::is_refused(&url, &seed).await,
                None => true,
            }
        }
    };
    match nats_server::reload(home, endpoints, &state, refused).await? {
        Applied::Reloaded => {
            outln!("nats-server reloaded: `{id}`'s key is refused and its connections closed");
            let js = async_nats::jetstream::new(endpoints.connect_nats().await?);
            if broker_config::remove_agent(&js, id).await.unwrap_or(false) {
                outln!("durable consumer `{}` deleted", auth::agent_consumer(id));
            }
            if let Ok(kv) = js.get_key_value(schemas::subjects::BUCKET_AGENTS).await
                && matches!(kv.get(id).await, Ok(Some(_)))
                && kv.delete(id).await.is_ok()
            {
                outln!("card of `{id}` deleted from `mesh-agents`");
            }
        }
        Applied::NotRunning => {
            outln!(
                "no nats-server of `meshctl up` runs: the next `meshctl up` no longer has `{id}`"
            )
        }
    }
    Ok(())
}

/// `meshctl agents list`.
pub(crate) fn list(home: &Home, policies: &Path, json: bool) -> anyhow::Result<()> {
    let state = AuthState::new(home);
    let registered = state.agents()?;
    let entities = entity_agents(policies).unwrap_or_default();
    let mut ids: Vec<&str> = registered.iter().map(|e| e.name.as_str()).collect();
    for (id, _) in &entities {
        if !ids.contains(&id.as_str()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    if json {
        let rows: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| {
                let role = entities
                    .iter()
                    .find(|(e, _)| e == id)
                    .and_then(|(_, r)| r.clone());
                let key = registered.iter().find(|e| e.name == *id);
                serde_json::json!({
                    "agent": id,
                    "role": role,
                    "in_entities": entities.iter().any(|(e, _)| e == id),
                    "public_key": key.map(|e| e.public_key.clone()),
                    "seed_file": key.map(|_| state.seed_file(Role::Agent, id).display().to_string()),
                })
            })
            .collect();
        return crate::output::print_json(&rows);
    }
    if ids.is_empty() {
        outln!("No agents: `meshctl agents add <id> --role <role>` registers one.");
        return Ok(());
    }
    outln!("{:<20} {:<14} {:<10} key", "agent", "role", "entities");
    for id in ids {
        let role = entities
            .iter()
            .find(|(e, _)| e == id)
            .and_then(|(_, r)| r.clone())
            .unwrap_or_else(|| "-".into());
        let in_entities = if entities.iter().any(|(e, _)| e == id) {
            "yes"
        } else {
            "no (denied)"
        };
        let key = match registered.iter().find(|e| e.name == id) {
            Some(e) => format!(
                "{}…  {}",
                &e.public_key[..12.min(e.public_key.len())],
                state.seed_file(Role::Agent, id).display()
            ),
            None => "none (no broker access; `meshctl up` creates one)".into(),
        };
        outln!("{id:<20} {role:<14} {in_entities:<10} {key}");
    }
    Ok(())
}
