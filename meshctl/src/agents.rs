//! Identities of the local stack and `meshctl agents add|remove|list`.
//!
//! Everything lives under `.agentmesh/auth/` (mode 0700):
//! `registry.json` (name, role and public nkey of the operator, each service
//! and each agent), one seed file per identity (`keys/<service>.nk`,
//! `agents/<id>.nk`, mode 0600) and `clickhouse.json` (the passwords of the
//! local ClickHouse users). From the registry `broker-config` renders the
//! nats-server config (`.agentmesh/nats/nats-server.conf`), which a running
//! server picks up on reload, without a restart.
//!
//! Adding an agent also adds it to the policy directory's `entities.json`
//! (with its role and attributes, validated with the Cedar schema and the
//! policies before anything is written), and creates its durable delivery
//! consumer; removing it revokes the key, the entity, the consumer and the
//! card.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use broker_config::auth::{self, Principal, Role};
use broker_config::credentials::{self, read_seed_file, write_seed_file};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::procs::{self, Home};
use crate::servers::{self, Endpoints};

/// The services that get an identity, besides the agents.
const SERVICE_ROLES: [Role; 4] = [
    Role::Admin,
    Role::PolicyWorker,
    Role::AuditSink,
    Role::GpuScaler,
];

/// How long a reload may take to show (the server applies it asynchronously).
const RELOAD_WAIT: Duration = Duration::from_secs(20);

/// One identity in `registry.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
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
pub struct ClickHouseSecrets {
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
pub const CLICKHOUSE_SINK_USER: &str = "agentmesh_sink";
/// The ClickHouse user readers query with.
pub const CLICKHOUSE_READER_USER: &str = "agentmesh_reader";

/// `.agentmesh/auth/`.
#[derive(Debug, Clone)]
pub struct AuthState {
    dir: PathBuf,
}

impl AuthState {
    /// The auth state of `home`.
    pub fn new(home: &Home) -> Self {
        Self {
            dir: home.root().join("auth"),
        }
    }

    fn registry_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    /// Where the seed of `name` (of `role`) lives.
    pub fn seed_file(&self, role: Role, name: &str) -> PathBuf {
        match role {
            Role::Agent => self.dir.join("agents").join(format!("{name}.nk")),
            _ => self.dir.join("keys").join(format!("{name}.nk")),
        }
    }

    /// The operator's seed file (what `meshctl` connects with).
    pub fn admin_seed_file(&self) -> PathBuf {
        self.seed_file(Role::Admin, auth::ADMIN)
    }

    /// The seed file of service `name` (`policy-worker`, …).
    pub fn service_seed_file(&self, name: &str) -> Option<PathBuf> {
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
    pub fn rotate_agent(&self, id: &str) -> anyhow::Result<()> {
        let mut registry = self.load()?;
        if !registry
            .principals
            .iter()
            .any(|e| e.name == id && e.role == Role::Agent.as_str())
        {
            bail!("no agent `{id}` is registered (`meshctl agents list`)");
        }
        self.new_key(&mut registry, Role::Agent, id)?;
        self.save(&registry)
    }

    /// Creates the keys of the operator and the services that lack one;
    /// returns the names of those created.
    pub fn ensure_services(&self) -> anyhow::Result<Vec<String>> {
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
    pub fn ensure_agent(&self, id: &str) -> anyhow::Result<bool> {
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
    pub fn remove_agent(&self, id: &str) -> anyhow::Result<bool> {
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
    pub fn agents(&self) -> anyhow::Result<Vec<Entry>> {
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
    pub fn principals(&self) -> anyhow::Result<Vec<Principal>> {
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

    /// The nats-server config of the local stack.
    pub fn nats_config_path(home: &Home) -> PathBuf {
        home.root().join("nats").join("nats-server.conf")
    }

    /// Renders the nats-server config for the local server on `port` with
    /// every registered identity; returns its path.
    pub fn write_nats_config(&self, home: &Home, port: u16) -> anyhow::Result<PathBuf> {
        let store = home.root().join("nats");
        std::fs::create_dir_all(&store)
            .with_context(|| format!("creating `{}`", store.display()))?;
        let store = std::fs::canonicalize(&store)?;
        let text = auth::render_server_config(&auth::ServerConfig {
            host: "127.0.0.1".into(),
            port,
            store_dir: store.clone(),
            principals: Some(self.principals()?),
        })?;
        let path = Self::nats_config_path(home);
        credentials::write_private_file(&path, text.as_bytes())
            .with_context(|| format!("writing `{}`", path.display()))?;
        Ok(path)
    }

    fn clickhouse_path(&self) -> PathBuf {
        self.dir.join("clickhouse.json")
    }

    /// The local ClickHouse passwords, if `meshctl up` made them.
    pub fn clickhouse_secrets(&self) -> Option<ClickHouseSecrets> {
        let text = std::fs::read_to_string(self.clickhouse_path()).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The local ClickHouse passwords, made on first use (mode 0600).
    pub fn ensure_clickhouse_secrets(&self) -> anyhow::Result<ClickHouseSecrets> {
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

// ---------------------------------------------------------------------------
// entities.json

/// The agents in a policy directory's `entities.json`: (id, role attribute).
pub fn entity_agents(policies: &Path) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let entities = read_entities(policies)?;
    Ok(entities
        .iter()
        .filter(|e| e["uid"]["type"] == "Agent")
        .filter_map(|e| {
            let id = e["uid"]["id"].as_str()?.to_owned();
            let role = e["attrs"]["role"].as_str().map(str::to_owned);
            Some((id, role))
        })
        .collect())
}

fn entities_path(policies: &Path) -> PathBuf {
    policies.join(policy_worker::ENTITIES_FILE)
}

fn read_entities(policies: &Path) -> anyhow::Result<Vec<Value>> {
    let path = entities_path(policies);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading `{}`", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).with_context(|| format!("`{}` is not JSON", path.display()))?;
    match value {
        Value::Array(entities) => Ok(entities),
        _ => bail!("`{}` is not a JSON array of entities", path.display()),
    }
}

/// `entities` with agent `id` (role `role`, in roles `member` and `role`,
/// with `attrs`) added.
fn with_agent(
    mut entities: Vec<Value>,
    id: &str,
    role: &str,
    attrs: &BTreeMap<String, String>,
) -> anyhow::Result<Vec<Value>> {
    let is = |e: &Value, ty: &str, name: &str| e["uid"]["type"] == ty && e["uid"]["id"] == name;
    if entities.iter().any(|e| is(e, "Agent", id)) {
        bail!(
            "agent `{id}` is already in entities.json (remove it first: `meshctl agents remove {id}`)"
        );
    }
    let roles: Vec<&str> = entities
        .iter()
        .filter(|e| e["uid"]["type"] == "Role")
        .filter_map(|e| e["uid"]["id"].as_str())
        .collect();
    if !roles.contains(&role) {
        bail!(
            "--role `{role}` is not a role in entities.json (roles: {}); add the `Role` entity and the policies that use it first",
            roles.join(", ")
        );
    }
    let mut all_attrs = serde_json::Map::new();
    all_attrs.insert("role".into(), json!(role));
    for (k, v) in attrs {
        if k == "role" {
            bail!("--attr role=…: the role is set with --role");
        }
        all_attrs.insert(k.clone(), json!(v));
    }
    let mut parents = vec![json!({"type": "Role", "id": "member"})];
    if role != "member" {
        parents.push(json!({"type": "Role", "id": role}));
    }
    entities.push(json!({
        "uid": {"type": "Agent", "id": id},
        "attrs": all_attrs,
        "parents": parents,
    }));
    Ok(entities)
}

/// `entities` without agent `id`; `None` when it was not there.
fn without_agent(entities: Vec<Value>, id: &str) -> Option<Vec<Value>> {
    let before = entities.len();
    let rest: Vec<Value> = entities
        .into_iter()
        .filter(|e| !(e["uid"]["type"] == "Agent" && e["uid"]["id"] == id))
        .collect();
    (rest.len() != before).then_some(rest)
}

/// Checks `entities` with the directory's schema and policies, as the
/// policy worker would load them.
fn validate(policies: &Path, entities: &[Value]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(entities)? + "\n";
    let scratch = tempfile::tempdir().context("creating a scratch directory")?;
    for entry in
        std::fs::read_dir(policies).with_context(|| format!("reading `{}`", policies.display()))?
    {
        let path = entry?.path();
        let keep = path.extension().is_some_and(|e| e == "cedar")
            || path
                .file_name()
                .is_some_and(|n| n == policy_worker::SCHEMA_FILE);
        if keep && let Some(name) = path.file_name() {
            std::fs::copy(&path, scratch.path().join(name))?;
        }
    }
    std::fs::write(scratch.path().join(policy_worker::ENTITIES_FILE), &text)?;
    if let Err(e) = policy_worker::PolicyBundle::load(scratch.path()) {
        // Name the real file, not the scratch copy.
        let message = e.to_string().replace(
            &scratch.path().display().to_string(),
            &policies.display().to_string(),
        );
        bail!(
            "the new entities do not validate, nothing was changed: {message} (every attribute the schema's `Agent` requires must be given with --attr; the shipped schema requires `team`)"
        );
    }
    Ok(())
}

/// The elements of a JSON array's text: the byte ranges of each element
/// (trimmed), and the position of the closing `]`. `None` when `text` is not
/// one array.
fn array_elements(text: &str) -> Option<(Vec<(usize, usize)>, usize)> {
    let open = text.find(|c: char| !c.is_whitespace())?;
    if text.as_bytes()[open] != b'[' {
        return None;
    }
    let mut elements = Vec::new();
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut current: Option<(usize, usize)> = None;
    for (i, c) in text.char_indices().skip_while(|&(i, _)| i < open) {
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            if let Some(e) = current.as_mut() {
                e.1 = i + c.len_utf8();
            }
            continue;
        }
        match c {
            '[' | '{' => depth += 1,
            ']' | '}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    elements.extend(current.take());
                    return Some((elements, i));
                }
            }
            ',' if depth == 1 => {
                elements.push(current.take()?);
                continue;
            }
            _ => {}
        }
        if depth == 1 && c == '[' {
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        if !c.is_whitespace() && depth >= 1 {
            let end = i + c.len_utf8();
            match current.as_mut() {
                Some(e) => e.1 = end,
                None => current = Some((i, end)),
            }
        }
    }
    None
}

/// `text` (an entities file as its author wrote it) edited in place to hold
/// `entities`, when they differ from it by one entity appended or removed:
/// an added entity is one new line after the last, a removed one leaves
/// everything else byte for byte. `None` when no such edit gives them.
fn edited_entities(text: &str, entities: &[Value]) -> Option<String> {
    let (spans, close) = array_elements(text)?;
    let edited = if entities.len() == spans.len() + 1 {
        let added = serde_json::to_string(entities.last()?).ok()?;
        match spans.last() {
            Some(&(start, end)) => {
                let line_start = text[..start].rfind('\n').map_or(0, |n| n + 1);
                let indent = &text[line_start..start];
                let indent = if indent.trim().is_empty() {
                    indent
                } else {
                    "  "
                };
                format!("{},\n{indent}{added}{}", &text[..end], &text[end..])
            }
            None => format!("{}\n  {added}\n{}", &text[..close], &text[close..]),
        }
    } else if entities.len() + 1 == spans.len() {
        let kept: Vec<Value> = spans
            .iter()
            .map(|&(a, b)| serde_json::from_str(&text[a..b]).ok())
            .collect::<Option<_>>()?;
        let gone = (0..kept.len()).find(|&i| {
            let mut rest = kept.clone();
            rest.remove(i);
            rest == entities
        })?;
        let (start, end) = spans[gone];
        if gone > 0 {
            format!("{}{}", &text[..spans[gone - 1].1], &text[end..])
        } else if let Some(&(next, _)) = spans.get(1) {
            format!("{}{}", &text[..start], &text[next..])
        } else {
            let line_start = text[..start].rfind('\n').unwrap_or(start);
            format!("{}{}", &text[..line_start], &text[end..])
        }
    } else {
        return None;
    };
    // Only an edit that reads back as exactly `entities` is kept.
    let back: Vec<Value> = serde_json::from_str(&edited).ok()?;
    (back == entities).then_some(edited)
}

/// Replaces `entities.json` atomically (the policy worker reloads it),
/// keeping the file as its author formatted it where the change is one
/// entity added or removed.
fn write_entities(policies: &Path, entities: &[Value]) -> anyhow::Result<()> {
    let path = entities_path(policies);
    let text = std::fs::read_to_string(&path)
        .ok()
        .and_then(|original| edited_entities(&original, entities))
        .map_or_else(
            || serde_json::to_string_pretty(entities).map(|t| t + "\n"),
            Ok,
        )?;
    let tmp = policies.join(".entities.json.meshctl-tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing `{}`", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing `{}`", path.display()))
}

// ---------------------------------------------------------------------------
// the running server

/// What happened to the running nats-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// `meshctl up` started it: its config was rewritten and reloaded.
    Reloaded,
    /// No server of `meshctl up` runs; the next `up` uses the new config.
    NotRunning,
}

/// Rewrites the local server's config and reloads it until `ready` holds
/// (nats-server 2.9 wires the imports of an account that a reload creates
/// only on the next reload, so one SIGHUP is not always enough).
pub async fn reload_nats<F, Fut>(
    home: &Home,
    endpoints: &Endpoints,
    state: &AuthState,
    mut ready: F,
) -> anyhow::Result<Applied>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let Some(recorded) = procs::read_pid(home, "nats-server").filter(procs::is_running) else {
        return Ok(Applied::NotRunning);
    };
    let port = servers::loopback_port(&endpoints.nats_url, 4222).with_context(|| {
        format!(
            "NATS_URL `{}` is not this machine, but `meshctl up` started a nats-server here",
            endpoints.nats_url
        )
    })?;
    state.write_nats_config(home, port)?;
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        let pid = rustix::process::Pid::from_raw(recorded.pid)
            .context("the recorded nats-server pid is invalid")?;
        rustix::process::kill_process(pid, rustix::process::Signal::HUP)
            .context("sending SIGHUP to nats-server")?;
        let round = Instant::now() + Duration::from_secs(2);
        while Instant::now() < round {
            if ready().await {
                return Ok(Applied::Reloaded);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if Instant::now() >= deadline {
            bail!(
                "nats-server did not take the new config within {RELOAD_WAIT:?}; see {}",
                home.log_file("nats-server").display()
            );
        }
    }
}

/// Whether `seed` connects and its JetStream requests are answered.
pub async fn can_reach_jetstream(url: &str, seed: &str) -> bool {
    let connect = async_nats::ConnectOptions::new()
        .nkey(seed.to_owned())
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(1)
        .connect(url);
    let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), connect).await else {
        return false;
    };
    let subject = format!(
        "$JS.API.STREAM.INFO.KV_{}",
        schemas::subjects::BUCKET_AGENTS
    );
    let request = client.request(subject, "".into());
    matches!(
        tokio::time::timeout(Duration::from_secs(2), request).await,
        Ok(Ok(_))
    )
}

/// Whether `seed` is refused by the server at `url`.
pub async fn is_refused(url: &str, seed: &str) -> bool {
    let connect = async_nats::ConnectOptions::new()
        .nkey(seed.to_owned())
        .connection_timeout(Duration::from_secs(2))
        .max_reconnects(1)
        .connect(url);
    matches!(
        tokio::time::timeout(Duration::from_secs(3), connect).await,
        Ok(Err(_))
    )
}

// ---------------------------------------------------------------------------
// the commands

/// `meshctl agents add`.
pub async fn add(
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
    println!(
        "agent `{id}` registered: role `{role}`, key in {}",
        seed_file.display()
    );

    let (seed, _) = read_seed_file(&seed_file)?;
    let url = endpoints.nats_url.clone();
    match reload_nats(home, endpoints, &state, || can_reach_jetstream(&url, &seed)).await? {
        Applied::Reloaded => {
            println!("nats-server reloaded: `{id}` may connect");
            let js = async_nats::jetstream::new(endpoints.connect_nats().await?);
            match broker_config::provision_agent(&js, id).await {
                Ok(_) => println!("durable consumer `{}` ready", auth::agent_consumer(id)),
                Err(e) => println!(
                    "durable consumer `{}` not created yet ({e}); `meshctl up` creates it",
                    auth::agent_consumer(id)
                ),
            }
        }
        Applied::NotRunning => {
            println!("no nats-server of `meshctl up` runs: the next `meshctl up` lets `{id}` in")
        }
    }
    println!(
        "connect it with the seed file, e.g. agents_sdk::Agent::builder(\"{id}\").nkey(seed), or NATS_NKEY_SEED_FILE={}",
        seed_file.display()
    );
    Ok(())
}

/// `meshctl agents rotate`: a new key for agent `id`; the old one is
/// refused (and its connections closed) once the server reloaded. The
/// agent's entity, durable consumer and card stay.
pub async fn rotate(home: &Home, endpoints: &Endpoints, id: &str) -> anyhow::Result<()> {
    let state = AuthState::new(home);
    let seed_file = state.seed_file(Role::Agent, id);
    let old = read_seed_file(&seed_file).ok().map(|(seed, _)| seed);
    state.rotate_agent(id)?;
    let (seed, _) = read_seed_file(&seed_file)?;
    println!("agent `{id}`: new key in {}", seed_file.display());
    let url = endpoints.nats_url.clone();
    let switched = || {
        let (url, seed, old) = (url.clone(), seed.clone(), old.clone());
        async move {
            let old_refused = match &old {
                Some(old) => is_refused(&url, old).await,
                None => true,
            };
            old_refused && can_reach_jetstream(&url, &seed).await
        }
    };
    match reload_nats(home, endpoints, &state, switched).await? {
        Applied::Reloaded => println!(
            "nats-server reloaded: the old key is refused and its connections closed; restart `{id}` with the new seed"
        ),
        Applied::NotRunning => {
            println!("no nats-server of `meshctl up` runs: the next `meshctl up` uses the new key")
        }
    }
    Ok(())
}

/// `meshctl agents remove`.
pub async fn remove(
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
    if !registered && !in_entities {
        bail!("no agent `{id}` is registered (`meshctl agents list`)");
    }
    println!(
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
                Some(seed) => is_refused(&url, &seed).await,
                None => true,
            }
        }
    };
    match reload_nats(home, endpoints, &state, refused).await? {
        Applied::Reloaded => {
            println!("nats-server reloaded: `{id}`'s key is refused and its connections closed");
            let js = async_nats::jetstream::new(endpoints.connect_nats().await?);
            if broker_config::remove_agent(&js, id).await.unwrap_or(false) {
                println!("durable consumer `{}` deleted", auth::agent_consumer(id));
            }
            if let Ok(kv) = js.get_key_value(schemas::subjects::BUCKET_AGENTS).await
                && matches!(kv.get(id).await, Ok(Some(_)))
                && kv.delete(id).await.is_ok()
            {
                println!("card of `{id}` deleted from `mesh-agents`");
            }
        }
        Applied::NotRunning => {
            println!(
                "no nats-server of `meshctl up` runs: the next `meshctl up` no longer has `{id}`"
            )
        }
    }
    Ok(())
}

/// `meshctl agents list`.
pub fn list(home: &Home, policies: &Path) -> anyhow::Result<()> {
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
    if ids.is_empty() {
        println!("No agents: `meshctl agents add <id> --role <role>` registers one.");
        return Ok(());
    }
    println!("{:<20} {:<14} {:<10} key", "agent", "role", "entities");
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
        println!("{id:<20} {role:<14} {in_entities:<10} {key}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> Vec<Value> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        read_entities(&dir).unwrap()
    }

    #[test]
    fn adding_an_agent_adds_member_and_role_parents() {
        let attrs = BTreeMap::from([("team".to_owned(), "data".to_owned())]);
        let entities = with_agent(shipped(), "analyst", "worker", &attrs).unwrap();
        let added = entities.last().unwrap();
        assert_eq!(added["uid"], json!({"type": "Agent", "id": "analyst"}));
        assert_eq!(added["attrs"], json!({"role": "worker", "team": "data"}));
        assert_eq!(
            added["parents"],
            json!([{"type": "Role", "id": "member"}, {"type": "Role", "id": "worker"}])
        );
        assert!(with_agent(shipped(), "coder", "worker", &attrs).is_err());
        let err = with_agent(shipped(), "x", "wizard", &attrs).unwrap_err();
        assert!(err.to_string().contains("roles: member"), "{err}");
        let back = without_agent(entities, "analyst").unwrap();
        assert_eq!(back, shipped());
        assert!(without_agent(back, "analyst").is_none());
    }

    #[test]
    fn adding_then_removing_an_agent_keeps_the_file_as_written() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let original = std::fs::read_to_string(dir.join(policy_worker::ENTITIES_FILE)).unwrap();
        let attrs = BTreeMap::from([("team".to_owned(), "data".to_owned())]);
        let added = with_agent(shipped(), "analyst", "worker", &attrs).unwrap();
        let text = edited_entities(&original, &added).unwrap();
        // One new line, in the file's indentation; everything else as it was.
        let new_lines: Vec<&str> = text
            .lines()
            .filter(|l| !original.lines().any(|o| o == *l))
            .collect();
        assert_eq!(new_lines.len(), 2, "{new_lines:?}");
        assert!(new_lines[0].ends_with("},"), "{new_lines:?}");
        assert!(
            new_lines[1].starts_with("  {")
                && new_lines[1].contains("\"uid\":{\"type\":\"Agent\",\"id\":\"analyst\"}"),
            "{new_lines:?}"
        );
        assert_eq!(serde_json::from_str::<Vec<Value>>(&text).unwrap(), added);
        let removed = without_agent(added, "analyst").unwrap();
        assert_eq!(edited_entities(&text, &removed).unwrap(), original);

        // Any layout, strings with brackets and commas included.
        let odd = "[\t{\"uid\": {\"type\": \"Role\", \"id\": \"a,]}\\\"\"}},\n\n {\"uid\":{\"type\":\"Agent\",\"id\":\"x\"}}]";
        let parsed: Vec<Value> = serde_json::from_str(odd).unwrap();
        let without_x = without_agent(parsed.clone(), "x").unwrap();
        let text = edited_entities(odd, &without_x).unwrap();
        assert_eq!(
            text,
            "[\t{\"uid\": {\"type\": \"Role\", \"id\": \"a,]}\\\"\"}}]"
        );
        let without_first: Vec<Value> = parsed[1..].to_vec();
        assert_eq!(
            edited_entities(odd, &without_first).unwrap(),
            "[\t{\"uid\":{\"type\":\"Agent\",\"id\":\"x\"}}]"
        );
        let only: Vec<Value> = serde_json::from_str("[{\"a\":1}]").unwrap();
        assert_eq!(edited_entities("[{\"a\":1}]\n", &[]).unwrap(), "[]\n");
        assert_eq!(
            serde_json::from_str::<Vec<Value>>(&edited_entities("[]\n", &only).unwrap()).unwrap(),
            only
        );
        // Not an array, or more than one change: no edit (written anew).
        assert!(edited_entities("{}", &only).is_none());
        assert!(edited_entities("[]", &[json!(1), json!(2)]).is_none());
    }

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
