//! The identities of the local stack, under `.agentmesh/auth/` (mode 0700):
//! `registry.json` (name, role and public nkey of the operator, each service
//! and each agent), one seed file per identity (`keys/<service>.nk`,
//! `agents/<id>.nk`, mode 0600), `clickhouse.json` (the passwords of the
//! local ClickHouse users) and `mcp-tokens.json` (the MCP gateway's bearer
//! tokens, as digests; each token itself in `agents/<id>.mcp-token`). From the registry `broker-config` renders the
//! nats-server config (`.agentmesh/nats/nats-server.conf`), which a running
//! server picks up on reload, without a restart (`stack::nats::reload`).

use std::path::PathBuf;

use anyhow::{Context, bail};
use broker_config::auth::{self, Principal, Role};
use broker_config::credentials::{self, read_seed_file, write_seed_file};
use serde::{Deserialize, Serialize};

use crate::procs::Home;

/// The services that get an identity, besides the agents.
const SERVICE_ROLES: [Role; 4] = [
    Role::Admin,
    Role::PolicyWorker,
    Role::AuditSink,
    Role::GpuScaler,
];

/// One identity in `registry.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Entry {
    /// Agent id or service name.
    pub name: String,
    /// `admin`, `policy-worker`, `audit-sink`, `gpu-scaler` or `agent`.
    pub role: String,
    /// The public nkey (`U…`).
    pub public_key: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Registry {
    /// Every identity, services first.
    principals: Vec<Entry>,
}

fn role_from(name: &str) -> Option<Role> {
    [
        Role::Admin,
        Role::PolicyWorker,
        Role::AuditSink,
        Role::GpuScaler,
        Role::Agent,
    ]
    .into_iter()
    .find(|r| r.as_str() == name)
}

/// The passwords of the local ClickHouse users `meshctl up` creates.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClickHouseSecrets {
    /// User `default`: DDL (the schema), used by `meshctl up`.
    pub admin: String,
    /// User `agentmesh_sink`: inserts the audit rows.
    pub sink: String,
    /// User `agentmesh_reader`: reads them (`meshctl trace`, `demo`, `status`).
    pub reader: String,
}

impl std::fmt::Debug for ClickHouseSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClickHouseSecrets(<redacted>)")
    }
}

/// The ClickHouse user the audit sink writes with.
pub(crate) const CLICKHOUSE_SINK_USER: &str = clickhouse_config::SINK_USER;
/// The ClickHouse user readers query with.
pub(crate) const CLICKHOUSE_READER_USER: &str = clickhouse_config::READER_USER;

/// `.agentmesh/auth/`.
#[derive(Debug, Clone)]
pub(crate) struct AuthState {
    dir: PathBuf,
}

impl AuthState {
    /// The auth state of `home`.
    pub(crate) fn new(home: &Home) -> Self {
        Self {
            dir: home.root().join("auth"),
        }
    }

    fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// Where the seed of `name` (of `role`) lives.
    pub(crate) fn seed_file(&self, role: Role, name: &str) -> PathBuf {
        match role {
            Role::Agent => self.dir.join("agents").join(format!("{name}.nk")),
            _ => self.dir.join("keys").join(format!("{name}.nk")),
        }
    }

    /// The MCP gateway's token file (`mcp-tokens.json`: digests only).
    pub(crate) fn mcp_tokens_path(&self) -> PathBuf {
        self.dir.join(broker_config::mcp_tokens::TOKEN_FILE)
    }

    /// Where agent `id`'s MCP bearer token is written for the operator.
    pub(crate) fn mcp_token_file(&self, id: &str) -> PathBuf {
        self.dir.join("agents").join(format!("{id}.mcp-token"))
    }

    /// The operator's seed file (what `meshctl` connects with).
    pub(crate) fn admin_seed_file(&self) -> PathBuf {
        self.seed_file(Role::Admin, auth::ADMIN)
    }

    /// The seed file of service `name` (`policy-worker`, …).
    pub(crate) fn service_seed_file(&self, name: &str) -> Option<PathBuf> {
        SERVICE_ROLES
            .into_iter()
            .map(|r| Principal::service(r, ""))
            .find(|p| p.name == name)
            .map(|p| self.seed_file(p.role, &p.name))
    }

    fn load(&self) -> anyhow::Result<Registry> {
        let path = self.registry_path();
        if !path.is_file() {
            return Ok(Registry::default());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading `{}`", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("`{}` is not valid", path.display()))
    }

    fn save(&self, registry: &Registry) -> anyhow::Result<()> {
        self.create_dir()?;
        let path = self.registry_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(registry)? + "\n")
            .with_context(|| format!("writing `{}`", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing `{}`", path.display()))
    }

    fn create_dir(&self) -> anyhow::Result<()> {
        use std::os::unix::fs::DirBuilderExt as _;
        if !self.dir.is_dir() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.dir)
                .with_context(|| format!("creating `{}`", self.dir.display()))?;
        }
        Ok(())
    }

    /// Makes sure `name` has a key whose seed file matches the registry
    /// (a new key when either is missing or they disagree). Returns whether
    /// a key was created.
    fn ensure(&self, registry: &mut Registry, role: Role, name: &str) -> anyhow::Result<bool> {
        let seed_file = self.seed_file(role, name);
        let on_disk = read_seed_file(&seed_file).ok().map(|(_, public)| public);
        let entry = registry.principals.iter().position(|e| e.name == name);
        if let (Some(public), Some(i)) = (&on_disk, entry)
            && registry.principals[i].public_key == *public
            && registry.principals[i].role == role.as_str()
        {
            return Ok(false);
        }
        self.new_key(registry, role, name)?;
        Ok(true)
    }

    /// Gives `name` a new key (seed file and registry), whatever it had.
    fn new_key(&self, registry: &mut Registry, role: Role, name: &str) -> anyhow::Result<()> {
        let seed_file = self.seed_file(role, name);
        let entry = registry.principals.iter().position(|e| e.name == name);
        let key = credentials::generate_user_key()?;
        write_seed_file(&seed_file, &key.seed)?;
        let new = Entry {
            name: name.to_owned(),
            role: role.as_str().to_owned(),
            public_key: key.public_key,
        };
        match entry {
            Some(i) => registry.principals[i] = new,
            None => registry.principals.push(new),
        }
        Ok(())
    }

    /// Replaces agent `id`'s key with a new one.
    pub(crate) fn rotate_agent(&self, id: &str) -> anyhow::Result<()> {
        let mut registry = self.load()?;
        if !registry
            .principals
            .iter()
            .any(|e| e.name == id && e.role == Role::Agent.as_str())
        {
            return Err(crate::exit::fail(
                crate::exit::Exit::NotFound,
                format!("no agent `{id}` is registered (`meshctl agents list` shows who is)"),
            ));
        }
        self.new_key(&mut registry, Role::Agent, id)?;
        self.save(&registry)
    }

    /// Creates the keys of the operator and the services that lack one;
    /// returns the names of those created.
    pub(crate) fn ensure_services(&self) -> anyhow::Result<Vec<String>> {
        let mut registry = self.load()?;
        let mut created = Vec::new();
        for role in SERVICE_ROLES {
            let name = Principal::service(role, "").name;
            if self.ensure(&mut registry, role, &name)? {
                created.push(name);
            }
        }
        self.save(&registry)?;
        Ok(created)
    }

    /// Creates agent `id`'s key if it has none; returns whether it did.
    pub(crate) fn ensure_agent(&self, id: &str) -> anyhow::Result<bool> {
        if !schemas::AgentId::is_valid(id) {
            bail!(
                "`{id}` is not a valid agent id: lowercase letters, digits, `_` and `-`, starting with a letter or digit, at most 63"
            );
        }
        if SERVICE_ROLES
            .iter()
            .any(|r| Principal::service(*r, "").name == id)
        {
            bail!("`{id}` is the name of a service; pick another agent id");
        }
        let mut registry = self.load()?;
        let created = self.ensure(&mut registry, Role::Agent, id)?;
        self.save(&registry)?;
        Ok(created)
    }

    /// Forgets agent `id`: removes it from the registry and deletes its
    /// seed. Returns whether it was registered.
    pub(crate) fn remove_agent(&self, id: &str) -> anyhow::Result<bool> {
        let mut registry = self.load()?;
        let before = registry.principals.len();
        registry
            .principals
            .retain(|e| !(e.name == id && e.role == Role::Agent.as_str()));
        let removed = registry.principals.len() != before;
        self.save(&registry)?;
        let seed = self.seed_file(Role::Agent, id);
        if seed.exists() {
            std::fs::remove_file(&seed)
                .with_context(|| format!("deleting `{}`", seed.display()))?;
        }
        Ok(removed)
    }

    /// The registered agents, by id.
    pub(crate) fn agents(&self) -> anyhow::Result<Vec<Entry>> {
        let mut agents: Vec<Entry> = self
            .load()?
            .principals
            .into_iter()
            .filter(|e| e.role == Role::Agent.as_str())
            .collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(agents)
    }

    /// Every identity, as `broker-config` renders them.
    pub(crate) fn principals(&self) -> anyhow::Result<Vec<Principal>> {
        let path = self.registry_path();
        self.load()?
            .principals
            .into_iter()
            .map(|e| {
                let role = role_from(&e.role).with_context(|| {
                    format!(
                        "`{}`: unknown role `{}` for `{}`",
                        path.display(),
                        e.role,
                        e.name
                    )
                })?;
                Ok(Principal {
                    name: e.name,
                    role,
                    public_key: e.public_key,
                })
            })
            .collect()
    }

    /// The nats-server config of the local stack (its first node's).
    pub(crate) fn nats_config_path(home: &Home) -> PathBuf {
        crate::servers::node_store(home, 0).join("nats-server.conf")
    }

    /// Renders the nats-server config of each of the `nodes` local nodes
    /// (the first on `port`) with every registered identity; returns their
    /// paths.
    pub(crate) fn write_nats_config(
        &self,
        home: &Home,
        port: u16,
        nodes: usize,
    ) -> anyhow::Result<Vec<PathBuf>> {
        crate::servers::write_node_configs(home, port, nodes, Some(self.principals()?))
    }

    fn clickhouse_path(&self) -> PathBuf {
        self.dir.join("clickhouse.json")
    }

    /// The local ClickHouse passwords, if `meshctl up` made them.
    pub(crate) fn clickhouse_secrets(&self) -> Option<ClickHouseSecrets> {
        let text = std::fs::read_to_string(self.clickhouse_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The local ClickHouse passwords, made on first use (mode 0600).
    pub(crate) fn ensure_clickhouse_secrets(&self) -> anyhow::Result<ClickHouseSecrets> {
        if let Some(secrets) = self.clickhouse_secrets() {
            return Ok(secrets);
        }
        let password = || {
            format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            )
        };
        let secrets = ClickHouseSecrets {
            admin: password(),
            sink: password(),
            reader: password(),
        };
        self.create_dir()?;
        let path = self.clickhouse_path();
        credentials::write_private_file(&path, serde_json::to_string_pretty(&secrets)?.as_bytes())
            .with_context(|| format!("writing `{}`", path.display()))?;
        Ok(secrets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_keeps_keys_and_seeds_in_step() {
        let tmp = tempfile::tempdir().unwrap();
        let home = Home::new(tmp.path());
        let state = AuthState::new(&home);
        assert_eq!(state.ensure_services().unwrap().len(), 4);
        assert!(state.ensure_services().unwrap().is_empty());
        assert!(state.ensure_agent("coder").unwrap());
        assert!(!state.ensure_agent("coder").unwrap());
        assert!(state.ensure_agent("Bad").is_err());
        assert!(state.ensure_agent("meshctl").is_err());
        // A lost seed gets a new key.
        let seed = state.seed_file(Role::Agent, "coder");
        let before = state.agents().unwrap()[0].public_key.clone();
        std::fs::remove_file(&seed).unwrap();
        assert!(state.ensure_agent("coder").unwrap());
        assert_ne!(state.agents().unwrap()[0].public_key, before);
        let principals = state.principals().unwrap();
        assert_eq!(principals.len(), 5);
        broker_config::auth::validate(&principals).unwrap();
        assert!(state.remove_agent("coder").unwrap());
        assert!(!seed.exists());
        assert!(!state.remove_agent("coder").unwrap());
    }
}
