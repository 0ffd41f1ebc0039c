//! Who may do what on the broker: one NATS identity (an nkey user) per
//! agent and per service, and the per-role permission templates that are
//! rendered into the nats-server authorization config.
//!
//! # The shape of the rendered config
//!
//! Account `MESH` holds JetStream (every `MESH_*` stream and both KV
//! buckets), the operator (`meshctl`, full rights) and the policy worker.
//! Every other principal — each agent, the audit sink, the GPU scaler — gets
//! an account of its own that imports from `MESH` exactly the subjects its
//! role needs, and its user is further limited by publish/subscribe
//! permissions inside that account.
//!
//! Why accounts and not only user permissions: a NATS server sends its
//! answer to a request (a JetStream API call, a publish acknowledgement, a
//! pulled message) to whatever reply subject the requester named, without
//! checking the requester's publish permissions on it. In one shared account
//! an agent could name `mesh.deliver.<other>.x` as the reply of its own
//! request and the answer would be stored in `MESH_DELIVER`. Across an
//! account import the reply is rewritten into the requester's own account,
//! where no stream listens.
//!
//! Why agents may not create consumers: a consumer's configuration is the
//! request payload, which permissions cannot inspect, so a client allowed to
//! create one could make it a push consumer whose deliver subject is any
//! subject of `MESH`. Each agent's durable `agent-<id>` is therefore created
//! by the operator ([`crate::provision_agent`]) as a pull consumer; the agent
//! may only re-send the same create request for it (the server refuses to
//! turn a pull consumer into a push one or to change its deliver policy, and
//! the create subject pins the name and filter).
//!
//! Receipts are read the same way: the operator creates each agent's
//! `receipts-<id>` on `MESH_DECISION` as a pull consumer, and the agent may
//! re-send its create request (pinned to `mesh.decision.<id>`), read and
//! ack it. A core subscription would also see the receipts the stream
//! deduplicated, so receipts are read from the stream. The agent may not
//! delete it: a deleted consumer could be created again as a push one.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use schemas::{AgentId, subjects};
use serde_json::{Value, json};

/// The account that holds JetStream, the operator and the policy worker.
pub const MESH_ACCOUNT: &str = "MESH";
/// The identity of the operator (`meshctl`).
pub const ADMIN: &str = "meshctl";
/// The identity of the policy worker.
pub const POLICY_WORKER: &str = "policy-worker";
/// The identity of the audit sink.
pub const AUDIT_SINK: &str = "audit-sink";
/// The identity of the GPU scaler.
pub const GPU_SCALER: &str = "gpu-scaler";
/// The policy worker's durable consumer on `MESH_INGRESS`.
pub const POLICY_WORKER_CONSUMER: &str = "policy-worker";
/// The policy worker's durable consumer of approval answers on `MESH_APPROVALS`.
pub const POLICY_WORKER_APPROVALS_CONSUMER: &str = "policy-worker-approvals";
/// The audit sink's durable consumers: (stream, durable).
pub const AUDIT_SINK_CONSUMERS: [(&str, &str); 3] = [
    (subjects::STREAM_INGRESS, "audit-sink-events"),
    (subjects::STREAM_DECISION, "audit-sink-decisions"),
    (subjects::STREAM_GPU, "audit-sink-gpu"),
];
/// The subject on which the GPU scaler answers status requests.
pub const GPU_STATUS_SUBJECT: &str = subjects::GPU_STATUS;

/// The role of a principal: which permission template applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The operator: every subject of `MESH`, streams and consumers included.
    Admin,
    /// Decides ingress events; the only publisher of deliveries, receipts and dead letters.
    PolicyWorker,
    /// Reads what it audits (ingress, decisions, GPU leases) and nothing more.
    AuditSink,
    /// Publishes GPU lease events and is the only writer of `mesh-gpu-leases`.
    GpuScaler,
    /// An agent: its own ingress subjects, deliveries, receipts and card.
    Agent,
}

impl Role {
    /// The role's name as written in registries and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::PolicyWorker => "policy-worker",
            Role::AuditSink => "audit-sink",
            Role::GpuScaler => "gpu-scaler",
            Role::Agent => "agent",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One NATS identity: a name (agent id or service name), its role and the
/// public half of its nkey (`U…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The agent id, or the service name ([`ADMIN`], [`POLICY_WORKER`], …).
    pub name: String,
    /// Which template applies.
    pub role: Role,
    /// The user's public nkey.
    pub public_key: String,
}

impl Principal {
    /// Agent `id` with public key `public_key`.
    pub fn agent(id: impl Into<String>, public_key: impl Into<String>) -> Self {
        Self {
            name: id.into(),
            role: Role::Agent,
            public_key: public_key.into(),
        }
    }

    /// The service of `role` (its fixed name) with public key `public_key`.
    pub fn service(role: Role, public_key: impl Into<String>) -> Self {
        let name = match role {
            Role::Admin => ADMIN,
            Role::PolicyWorker => POLICY_WORKER,
            Role::AuditSink => AUDIT_SINK,
            Role::GpuScaler => GPU_SCALER,
            Role::Agent => "agent",
        };
        Self {
            name: name.to_owned(),
            role,
            public_key: public_key.into(),
        }
    }
}

/// What one principal is granted: its account, the imports that account
/// takes from `MESH`, and its user's permissions inside the account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Grants {
    /// The account the user lives in.
    pub account: String,
    /// Subjects the user may publish to (nothing else).
    pub publish: Vec<String>,
    /// Subjects the user may subscribe to (nothing else).
    pub subscribe: Vec<String>,
    /// Whether the user may answer requests it received (reply subjects).
    pub allow_responses: bool,
    /// Services the account imports from `MESH` (requests go to `MESH`,
    /// answers come back to this account).
    pub service_imports: Vec<String>,
    /// Streams the account imports from `MESH` (messages of `MESH` copied
    /// into this account).
    pub stream_imports: Vec<String>,
    /// Services this account offers to `MESH` (e.g. the scaler's status).
    pub service_exports: Vec<String>,
    /// Full rights (the operator): no permission lists, no imports.
    pub unrestricted: bool,
}

/// The JetStream API prefix every account imports from `MESH`.
const JS_API: &str = "$JS.API.>";

/// The grants of `principal`: the per-role templates, filled in, for a
/// mesh that keeps the originals of redacted deliveries (the default).
pub fn grants(principal: &Principal) -> Grants {
    grants_with(principal, crate::RedactedOriginal::Keep)
}

/// [`grants`] for a mesh whose policy worker does `redacted_original` with
/// the original of a redacted delivery: to drop it, the worker may delete
/// (erase) a message of `MESH_INGRESS`, which it may not otherwise.
pub fn grants_with(principal: &Principal, redacted_original: crate::RedactedOriginal) -> Grants {
    let mut g = role_grants(principal);
    if principal.role == Role::PolicyWorker && redacted_original == crate::RedactedOriginal::Drop {
        g.publish.push(format!(
            "$JS.API.STREAM.MSG.DELETE.{}",
            subjects::STREAM_INGRESS
        ));
    }
    g
}

/// The per-role templates, filled in.
fn role_grants(principal: &Principal) -> Grants {
    let name = principal.name.as_str();
    let info = |stream: &str| format!("$JS.API.STREAM.INFO.{stream}");
    let kv_agents = format!("KV_{}", subjects::BUCKET_AGENTS);
    let kv_leases = format!("KV_{}", subjects::BUCKET_GPU_LEASES);
    let kv_signers = format!("KV_{}", subjects::BUCKET_SIGNERS);
    match principal.role {
        Role::Admin => Grants {
            account: MESH_ACCOUNT.to_owned(),
            unrestricted: true,
            ..Grants::default()
        },
        Role::PolicyWorker => {
            let stream = subjects::STREAM_INGRESS;
            let consumer = POLICY_WORKER_CONSUMER;
            let approvals = subjects::STREAM_APPROVALS;
            let answers = POLICY_WORKER_APPROVALS_CONSUMER;
            let kv_limits = format!("KV_{}", subjects::BUCKET_LIMITS);
            let kv_approvals = format!("KV_{}", subjects::BUCKET_APPROVALS);
            let kv_cache = format!("KV_{}", subjects::BUCKET_TOOL_CACHE);
            let kv_flows = format!("KV_{}", subjects::BUCKET_FLOWS);
            Grants {
                account: MESH_ACCOUNT.to_owned(),
                publish: vec![
                    // What only the worker may write.
                    subjects::DELIVER_ALL.into(),
                    subjects::CALL_ALL.into(),
                    subjects::DECISION_ALL.into(),
                    subjects::DEAD_ALL.into(),
                    // `broker_config::apply` at start: reads every stream
                    // (creating or changing one is the operator's job).
                    "$JS.API.STREAM.INFO.*".into(),
                    // Its own durable on MESH_INGRESS.
                    format!("$JS.API.CONSUMER.INFO.{stream}.{consumer}"),
                    format!("$JS.API.CONSUMER.CREATE.{stream}.{consumer}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                    format!("$JS.ACK.{stream}.{consumer}.>"),
                    // Guardrails (docs/guardrails.md): events parked for
                    // approval and the worker's own `expire` answers; the
                    // parked event read back when it is answered.
                    subjects::APPROVAL_ALL.into(),
                    format!("$JS.API.STREAM.MSG.GET.{approvals}"),
                    // Its own durable of approval answers.
                    format!("$JS.API.CONSUMER.INFO.{approvals}.{answers}"),
                    format!("$JS.API.CONSUMER.CREATE.{approvals}.{answers}"),
                    format!("$JS.API.CONSUMER.CREATE.{approvals}.{answers}.>"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{approvals}.{answers}"),
                    format!("$JS.ACK.{approvals}.{answers}.>"),
                    // Rate and budget counters, approval state: written with
                    // compare-and-set, read (and tailed) with direct gets.
                    format!("$KV.{}.>", subjects::BUCKET_LIMITS),
                    format!("$KV.{}.>", subjects::BUCKET_APPROVALS),
                    format!("$JS.API.DIRECT.GET.{kv_limits}"),
                    format!("$JS.API.DIRECT.GET.{kv_limits}.>"),
                    format!("$JS.API.DIRECT.GET.{kv_approvals}"),
                    format!("$JS.API.DIRECT.GET.{kv_approvals}.>"),
                    // The tool-result cache (docs/cache.md): only the worker
                    // reads and writes it; agents have no grant on it.
                    format!("$KV.{}.>", subjects::BUCKET_TOOL_CACHE),
                    format!("$JS.API.DIRECT.GET.{kv_cache}"),
                    format!("$JS.API.DIRECT.GET.{kv_cache}.>"),
                    // Workflow labels (docs/guardrails.md): read before each
                    // decision, written with compare-and-set.
                    format!("$KV.{}.>", subjects::BUCKET_FLOWS),
                    format!("$JS.API.DIRECT.GET.{kv_flows}"),
                    format!("$JS.API.DIRECT.GET.{kv_flows}.>"),
                    // Agent cards, read for their tools' input schemas
                    // (a call's arguments are checked against them).
                    format!("$JS.API.DIRECT.GET.{kv_agents}"),
                    format!("$JS.API.DIRECT.GET.{kv_agents}.>"),
                ],
                subscribe: vec!["_INBOX.>".into()],
                ..Grants::default()
            }
        }
        Role::AuditSink => {
            let mut publish = vec!["$JS.API.STREAM.INFO.*".to_owned()];
            let mut service_imports = vec![JS_API.to_owned()];
            for (stream, durable) in AUDIT_SINK_CONSUMERS {
                publish.push(format!("$JS.API.CONSUMER.INFO.{stream}.{durable}"));
                publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}"));
                publish.push(format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"));
                publish.push(format!("$JS.ACK.{stream}.{durable}.>"));
                service_imports.push(format!("$JS.ACK.{stream}.{durable}.>"));
            }
            // Audit checkpoints (docs/contract.md, "Signed decisions"): its
            // durable `audit-chain` on MESH_DECISION, the checkpoints it
            // publishes on MESH_AUDIT (signed: a checkpoint under another
            // signer's subject does not verify), and its previous
            // checkpoint read back at start.
            let (decision, chain) = (subjects::STREAM_DECISION, subjects::DURABLE_AUDIT_CHAIN);
            publish.extend([
                format!("$JS.API.CONSUMER.INFO.{decision}.{chain}"),
                format!("$JS.API.CONSUMER.CREATE.{decision}.{chain}"),
                format!("$JS.API.CONSUMER.MSG.NEXT.{decision}.{chain}"),
                format!("$JS.ACK.{decision}.{chain}.>"),
                subjects::AUDIT_CHECKPOINTS.to_owned(),
                format!("$JS.API.STREAM.MSG.GET.{}", subjects::STREAM_AUDIT),
            ]);
            service_imports.push(format!("$JS.ACK.{decision}.{chain}.>"));
            // `--redacted-original drop`: the worker's progress on
            // MESH_INGRESS, and whether it erased a message there.
            publish.extend([
                format!(
                    "$JS.API.CONSUMER.INFO.{}.{POLICY_WORKER_CONSUMER}",
                    subjects::STREAM_INGRESS
                ),
                format!("$JS.API.STREAM.MSG.GET.{}", subjects::STREAM_INGRESS),
            ]);
            service_imports.push(subjects::AUDIT_CHECKPOINTS.to_owned());
            Grants {
                account: "AUDIT".to_owned(),
                publish,
                subscribe: vec!["_INBOX.>".into()],
                service_imports,
                ..Grants::default()
            }
        }
        Role::GpuScaler => Grants {
            account: "GPU_SCALER".to_owned(),
            publish: vec![
                // Lease events and the lease bucket: the scaler alone writes them.
                subjects::GPU_LEASE_ALL.into(),
                format!("$KV.{}.>", subjects::BUCKET_GPU_LEASES),
                "$JS.API.STREAM.INFO.*".into(),
                // Queue depth: the consumers of the streams its pools watch.
                "$JS.API.CONSUMER.LIST.*".into(),
                "$JS.API.CONSUMER.NAMES.*".into(),
                "$JS.API.CONSUMER.INFO.*.*".into(),
                format!("$JS.API.DIRECT.GET.{kv_leases}.>"),
                format!("$JS.API.STREAM.MSG.GET.{kv_leases}"),
            ],
            subscribe: vec!["_INBOX.>".into(), GPU_STATUS_SUBJECT.into()],
            allow_responses: true,
            service_imports: vec![
                JS_API.into(),
                subjects::GPU_LEASE_ALL.into(),
                format!("$KV.{}.>", subjects::BUCKET_GPU_LEASES),
            ],
            service_exports: vec![GPU_STATUS_SUBJECT.into()],
            ..Grants::default()
        },
        Role::Agent => {
            let deliver = subjects::STREAM_DELIVER;
            let calls = subjects::STREAM_CALL;
            let durable = agent_consumer(name);
            let decision = subjects::STREAM_DECISION;
            let receipts = receipts_consumer(name);
            Grants {
                account: agent_account(name),
                publish: vec![
                    // Its own events, and nobody else's.
                    subjects::ingress_of(name),
                    // Its own card (put and delete), and nobody else's.
                    format!("$KV.{}.{name}", subjects::BUCKET_AGENTS),
                    // The SDK's start-up check (which stream holds a
                    // subject: names only) and the card directory (whose
                    // stream information lists the cards' keys). Not the
                    // MESH_* streams' information: with a subjects filter
                    // it tells who exchanged how many messages.
                    "$JS.API.STREAM.NAMES".into(),
                    info(&kv_agents),
                    // Cards are public: read any, by key or by sequence
                    // (the directory's list and watch).
                    format!("$JS.API.DIRECT.GET.{kv_agents}"),
                    format!("$JS.API.DIRECT.GET.{kv_agents}.>"),
                    // The trusted decision signers: read only (the
                    // operator alone writes them).
                    info(&kv_signers),
                    format!("$JS.API.DIRECT.GET.{kv_signers}"),
                    format!("$JS.API.DIRECT.GET.{kv_signers}.>"),
                    // Its own durable, created by the operator: the create
                    // subject pins name and filter, so re-sending the
                    // create can only touch this consumer.
                    format!(
                        "$JS.API.CONSUMER.CREATE.{deliver}.{durable}.{}",
                        agent_filter(name)
                    ),
                    format!("$JS.API.CONSUMER.INFO.{deliver}.{durable}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{deliver}.{durable}"),
                    format!("$JS.ACK.{deliver}.{durable}.>"),
                    // Its receipts consumer, likewise: create (pinned to
                    // its own decision subject), info, next, ack. No
                    // delete: it could then be created as a push consumer.
                    format!(
                        "$JS.API.CONSUMER.CREATE.{decision}.{receipts}.{}",
                        subjects::decision(name)
                    ),
                    format!("$JS.API.CONSUMER.INFO.{decision}.{receipts}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{decision}.{receipts}"),
                    format!("$JS.ACK.{decision}.{receipts}.>"),
                    // Its durable of tool calls on MESH_CALL (same name,
                    // other stream), pinned the same way.
                    format!(
                        "$JS.API.CONSUMER.CREATE.{calls}.{durable}.{}",
                        agent_calls_filter(name)
                    ),
                    format!("$JS.API.CONSUMER.INFO.{calls}.{durable}"),
                    format!("$JS.API.CONSUMER.MSG.NEXT.{calls}.{durable}"),
                    format!("$JS.ACK.{calls}.{durable}.>"),
                ],
                subscribe: vec![
                    // Replies to its own requests (its account's inboxes are its own).
                    "_INBOX.>".into(),
                    // Its receipts and deliveries as they are published.
                    subjects::decision(name),
                    agent_filter(name),
                    // Card changes.
                    format!("$KV.{}.>", subjects::BUCKET_AGENTS),
                    // Signer changes (a revocation applies at once).
                    format!("$KV.{}.>", subjects::BUCKET_SIGNERS),
                ],
                service_imports: vec![
                    JS_API.into(),
                    subjects::ingress_of(name),
                    format!("$KV.{}.{name}", subjects::BUCKET_AGENTS),
                    format!("$JS.ACK.{deliver}.{durable}.>"),
                    format!("$JS.ACK.{decision}.{receipts}.>"),
                    format!("$JS.ACK.{calls}.{durable}.>"),
                ],
                stream_imports: vec![
                    subjects::decision(name),
                    agent_filter(name),
                    format!("$KV.{}.>", subjects::BUCKET_AGENTS),
                    format!("$KV.{}.>", subjects::BUCKET_SIGNERS),
                ],
                ..Grants::default()
            }
        }
    }
}

/// The account of agent `id`.
pub fn agent_account(id: &str) -> String {
    format!("AGENT_{id}")
}

/// The durable consumer agent `id` reads its deliveries from (`agent-<id>`,
/// the name the agents SDK uses).
pub fn agent_consumer(id: &str) -> String {
    subjects::agent_consumer(id)
}

/// The durable consumer agent `id` reads its receipts from on
/// `MESH_DECISION` (`receipts-<id>`, filtered to `mesh.decision.<id>`).
pub fn receipts_consumer(id: &str) -> String {
    format!("receipts-{id}")
}

/// The filter of agent `id`'s durable: `mesh.deliver.<id>.>`.
pub fn agent_filter(id: &str) -> String {
    subjects::deliveries_to(id)
}

/// The filter of agent `id`'s durable of tool calls on `MESH_CALL`:
/// `mesh.call.<id>.>`.
pub fn agent_calls_filter(id: &str) -> String {
    subjects::calls_to(id)
}

/// Why a set of principals cannot be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// An agent id is not a valid agent id.
    #[error("`{0}` is not a valid agent id (lowercase letters, digits, `_` and `-`, at most 63)")]
    InvalidAgentId(String),
    /// A public key is not a NATS user public key.
    #[error("the key of `{name}` is not a NATS user public key (`U…`): `{key}`")]
    InvalidKey {
        /// The principal.
        name: String,
        /// The key given.
        key: String,
    },
    /// Two principals share a name.
    #[error("`{0}` is registered twice")]
    DuplicateName(String),
    /// Two principals share a key.
    #[error("`{first}` and `{second}` have the same key")]
    DuplicateKey {
        /// The first holder.
        first: String,
        /// The second holder.
        second: String,
    },
    /// A service role appears twice, or a service name is used by an agent.
    #[error("more than one `{0}` identity")]
    DuplicateService(Role),
    /// There is no operator identity, so nobody could manage streams.
    #[error("no `admin` identity: the operator (`meshctl`) needs one to manage streams")]
    NoAdmin,
}

/// Checks names, keys and uniqueness.
pub fn validate(principals: &[Principal]) -> Result<(), AuthError> {
    let mut names = BTreeSet::new();
    let mut services = BTreeSet::new();
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for p in principals {
        if p.role == Role::Agent && !AgentId::is_valid(&p.name) {
            return Err(AuthError::InvalidAgentId(p.name.clone()));
        }
        if p.role != Role::Agent && !services.insert(p.role) {
            return Err(AuthError::DuplicateService(p.role));
        }
        let valid_key =
            p.public_key.starts_with('U') && nkeys::KeyPair::from_public_key(&p.public_key).is_ok();
        if !valid_key {
            return Err(AuthError::InvalidKey {
                name: p.name.clone(),
                key: p.public_key.clone(),
            });
        }
        // Agents and services live in one name space (agent accounts are
        // prefixed, but logs and registries show bare names).
        if !names.insert(p.name.as_str()) {
            return Err(AuthError::DuplicateName(p.name.clone()));
        }
        if let Some((first, _)) = keys.iter().find(|(_, k)| *k == p.public_key) {
            return Err(AuthError::DuplicateKey {
                first: (*first).to_owned(),
                second: p.name.clone(),
            });
        }
        keys.push((&p.name, &p.public_key));
    }
    if !services.contains(&Role::Admin) {
        return Err(AuthError::NoAdmin);
    }
    Ok(())
}

/// The `accounts { … }` block for these principals (JSON syntax, which
/// nats-server's config format accepts).
pub fn render_accounts(principals: &[Principal]) -> Result<Value, AuthError> {
    render_accounts_with(principals, crate::RedactedOriginal::Keep)
}

/// [`render_accounts`] with the grants of [`grants_with`].
pub fn render_accounts_with(
    principals: &[Principal],
    redacted_original: crate::RedactedOriginal,
) -> Result<Value, AuthError> {
    validate(principals)?;
    let mut mesh_users = Vec::new();
    let mut mesh_exports = vec![json!({"service": JS_API, "response_type": "stream"})];
    let mut mesh_imports = Vec::new();
    let mut accounts = serde_json::Map::new();
    // Stable output: services first, then agents by id.
    let mut sorted: Vec<&Principal> = principals.iter().collect();
    sorted.sort_by(|a, b| (a.role, &a.name).cmp(&(b.role, &b.name)));
    for p in sorted {
        let g = grants_with(p, redacted_original);
        let user = user_entry(p, &g);
        if g.account == MESH_ACCOUNT {
            mesh_users.push(user);
            continue;
        }
        let mut imports = Vec::new();
        for subject in &g.service_imports {
            imports.push(json!({"service": {"account": MESH_ACCOUNT, "subject": subject}}));
            if subject != JS_API {
                mesh_exports.push(json!({"service": subject, "accounts": [g.account]}));
            }
        }
        for subject in &g.stream_imports {
            imports.push(json!({"stream": {"account": MESH_ACCOUNT, "subject": subject}}));
            mesh_exports.push(json!({"stream": subject, "accounts": [g.account]}));
        }
        let mut exports = Vec::new();
        for subject in &g.service_exports {
            exports.push(json!({"service": subject, "accounts": [MESH_ACCOUNT]}));
            mesh_imports.push(json!({"service": {"account": g.account, "subject": subject}}));
        }
        let mut account = serde_json::Map::new();
        account.insert("users".into(), json!([user]));
        account.insert("imports".into(), Value::Array(imports));
        if !exports.is_empty() {
            account.insert("exports".into(), Value::Array(exports));
        }
        accounts.insert(g.account.clone(), Value::Object(account));
    }
    let mut mesh = serde_json::Map::new();
    mesh.insert("jetstream".into(), json!("enabled"));
    mesh.insert("users".into(), Value::Array(mesh_users));
    mesh.insert("exports".into(), Value::Array(mesh_exports));
    if !mesh_imports.is_empty() {
        mesh.insert("imports".into(), Value::Array(mesh_imports));
    }
    let mut all = serde_json::Map::new();
    all.insert(MESH_ACCOUNT.into(), Value::Object(mesh));
    all.extend(accounts);
    Ok(Value::Object(all))
}

fn user_entry(p: &Principal, g: &Grants) -> Value {
    if g.unrestricted {
        return json!({"nkey": p.public_key});
    }
    let mut permissions = json!({
        "publish": {"allow": g.publish},
        "subscribe": {"allow": g.subscribe},
    });
    if g.allow_responses {
        permissions["allow_responses"] = json!(true);
    }
    json!({"nkey": p.public_key, "permissions": permissions})
}

/// Settings of a nats-server config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Interface to listen on, e.g. `127.0.0.1`.
    pub host: String,
    /// Client port.
    pub port: u16,
    /// JetStream store directory.
    pub store_dir: PathBuf,
    /// The identities; `None` runs without authorization (everything in
    /// the global account, anyone may connect).
    pub principals: Option<Vec<Principal>>,
    /// This server as one node of a cluster; `None` for a single server.
    pub cluster: Option<ClusterNode>,
    /// The monitoring port (`/varz`, `/healthz`, `/jsz`), if any.
    pub http_port: Option<u16>,
    /// Whether JetStream fsyncs every write before acknowledging it.
    pub durability: crate::server::Durability,
    /// What the policy worker does with the original of a redacted
    /// delivery (to drop it, it may erase it from `MESH_INGRESS`).
    pub redacted_original: crate::RedactedOriginal,
}

/// One node of a nats-server cluster with JetStream (every node names the
/// same cluster and routes to the others; stream replicas live on
/// different nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterNode {
    /// This node's server name, unique in the cluster (the name a stream's
    /// leader is reported by).
    pub server_name: String,
    /// The cluster's name, the same on every node.
    pub cluster_name: String,
    /// The port this node's routes listen on (on `host`).
    pub route_port: u16,
    /// The other nodes' route URLs (`nats-route://host:port`).
    pub routes: Vec<String>,
}

/// The whole nats-server config file for `config`.
pub fn render_server_config(config: &ServerConfig) -> Result<String, AuthError> {
    let mut out = String::from(
        "# nats-server config written by agentmesh (broker-config); rewritten on every change.\n\
         # Reload after editing: nats-server --signal reload=<pid> (or SIGHUP).\n",
    );
    let listen = json!(format!("{}:{}", config.host, config.port));
    let store = json!(config.store_dir.display().to_string());
    let _ = writeln!(out, "listen: {listen}");
    match config.durability.sync_interval() {
        Some(sync) => {
            let _ = writeln!(
                out,
                "jetstream: {{store_dir: {store}, sync_interval: {sync}}}"
            );
        }
        None => {
            let _ = writeln!(out, "jetstream: {{store_dir: {store}}}");
        }
    }
    if let Some(http) = config.http_port {
        let _ = writeln!(out, "http: {}", json!(format!("{}:{http}", config.host)));
    }
    if let Some(node) = &config.cluster {
        let _ = writeln!(out, "server_name: {}", json!(node.server_name));
        let _ = writeln!(
            out,
            "cluster: {{name: {}, listen: {}, routes: {}}}",
            json!(node.cluster_name),
            json!(format!("{}:{}", config.host, node.route_port)),
            json!(node.routes)
        );
    }
    if let Some(principals) = &config.principals {
        let accounts = render_accounts_with(principals, config.redacted_original)?;
        let text = serde_json::to_string_pretty(&accounts).unwrap_or_default();
        let _ = writeln!(out, "accounts: {text}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        nkeys::KeyPair::new_user().public_key()
    }

    fn principals() -> Vec<Principal> {
        vec![
            Principal::service(Role::Admin, key()),
            Principal::service(Role::PolicyWorker, key()),
            Principal::service(Role::AuditSink, key()),
            Principal::service(Role::GpuScaler, key()),
            Principal::agent("planner", key()),
            Principal::agent("coder", key()),
        ]
    }

    #[test]
    fn agent_template_names_only_its_own_subjects() {
        let g = grants(&Principal::agent("coder", key()));
        assert_eq!(g.account, "AGENT_coder");
        for subject in g.publish.iter().chain(&g.subscribe) {
            let foreign = [
                "planner",
                "mesh.deliver.>",
                "mesh.call.>",
                "mesh.decision.>",
                "STREAM.CREATE",
            ]
            .iter()
            .any(|f| subject.contains(f));
            assert!(!foreign, "{subject}");
        }
        assert!(g.publish.contains(&"mesh.ingress.coder.>".to_owned()));
        assert!(g.publish.contains(
            &"$JS.API.CONSUMER.CREATE.MESH_DELIVER.agent-coder.mesh.deliver.coder.>".to_owned()
        ));
        assert!(g.publish.contains(
            &"$JS.API.CONSUMER.CREATE.MESH_CALL.agent-coder.mesh.call.coder.>".to_owned()
        ));
        assert!(
            g.publish
                .contains(&"$JS.ACK.MESH_CALL.agent-coder.>".to_owned())
        );
        assert!(
            !g.publish
                .iter()
                .any(|s| s.contains("DELETE") || s.contains("PURGE"))
        );
        assert!(!g.publish.iter().any(|s| {
            ["mesh.deliver", "mesh.call", "mesh.decision"]
                .iter()
                .any(|w| s.starts_with(w))
        }));
    }

    #[test]
    fn an_agent_reads_its_receipts_through_one_pinned_consumer() {
        let g = grants(&Principal::agent("planner", key()));
        let on_decisions: Vec<&str> = g
            .publish
            .iter()
            .filter(|s| s.contains("MESH_DECISION"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            on_decisions,
            [
                "$JS.API.CONSUMER.CREATE.MESH_DECISION.receipts-planner.mesh.decision.planner",
                "$JS.API.CONSUMER.INFO.MESH_DECISION.receipts-planner",
                "$JS.API.CONSUMER.MSG.NEXT.MESH_DECISION.receipts-planner",
                "$JS.ACK.MESH_DECISION.receipts-planner.>",
            ]
        );
        assert!(
            g.service_imports
                .contains(&"$JS.ACK.MESH_DECISION.receipts-planner.>".to_owned())
        );
        // Every consumer subject names one stream and one of its own two
        // consumers: no wildcard before the filter or the ack's tail.
        let own = [agent_consumer("planner"), receipts_consumer("planner")];
        for subject in g
            .publish
            .iter()
            .filter(|s| s.starts_with("$JS.API.CONSUMER.") || s.starts_with("$JS.ACK."))
        {
            let rest = [
                "$JS.ACK.",
                "$JS.API.CONSUMER.MSG.NEXT.",
                "$JS.API.CONSUMER.",
            ]
            .iter()
            .find_map(|p| subject.strip_prefix(p))
            .unwrap();
            let mut tokens = rest.split('.');
            if subject.starts_with("$JS.API.CONSUMER.") && !subject.contains(".MSG.NEXT.") {
                tokens.next(); // CREATE, INFO
            }
            let (stream, consumer) = (tokens.next().unwrap(), tokens.next().unwrap());
            assert!(!stream.contains(['*', '>']), "{subject}");
            assert!(own.iter().any(|c| c == consumer), "{subject}");
        }
        // The services' consumers are not an agent's.
        for subject in g.publish.iter().chain(&g.service_imports) {
            assert!(
                !subject.contains(AUDIT_SINK) && !subject.contains(POLICY_WORKER),
                "{subject}"
            );
        }
        // The ack service is exported to this agent's account alone.
        let accounts = render_accounts(&principals()).unwrap();
        let exports = accounts["MESH"]["exports"].as_array().unwrap();
        let receipt_acks: Vec<&Value> = exports
            .iter()
            .filter(|e| {
                e["service"]
                    .as_str()
                    .is_some_and(|s| s.contains("receipts-"))
            })
            .collect();
        assert_eq!(
            receipt_acks,
            [
                &json!({"service": "$JS.ACK.MESH_DECISION.receipts-coder.>", "accounts": ["AGENT_coder"]}),
                &json!({"service": "$JS.ACK.MESH_DECISION.receipts-planner.>", "accounts": ["AGENT_planner"]}),
            ]
        );
    }

    #[test]
    fn only_the_worker_publishes_deliveries_receipts_and_dead_letters() {
        for p in principals() {
            let g = grants(&p);
            let writes_worker_subjects = g.publish.iter().any(|s| {
                ["mesh.deliver", "mesh.call", "mesh.decision", "mesh.dead"]
                    .iter()
                    .any(|w| s.starts_with(w))
            });
            assert_eq!(
                writes_worker_subjects,
                p.role == Role::PolicyWorker,
                "{}",
                p.name
            );
            let writes_leases = g.publish.iter().any(|s| s.contains("mesh-gpu-leases.>"));
            assert_eq!(writes_leases, p.role == Role::GpuScaler, "{}", p.name);
            let touches_cache = g
                .publish
                .iter()
                .chain(&g.subscribe)
                .chain(&g.service_imports)
                .chain(&g.stream_imports)
                .any(|s| s.contains("mesh-tool-cache"));
            assert_eq!(touches_cache, p.role == Role::PolicyWorker, "{}", p.name);
        }
    }

    #[test]
    fn renders_accounts_with_private_exports() {
        let text = render_server_config(&ServerConfig {
            host: "127.0.0.1".into(),
            port: 4222,
            store_dir: "/tmp/js".into(),
            principals: Some(principals()),
            cluster: None,
            http_port: None,
            durability: crate::server::Durability::Always,
            redacted_original: crate::RedactedOriginal::Keep,
        })
        .unwrap();
        assert!(text.contains("listen: \"127.0.0.1:4222\""), "{text}");
        assert!(
            text.contains("jetstream: {store_dir: \"/tmp/js\", sync_interval: always}"),
            "{text}"
        );
        assert!(!text.contains("http:"), "{text}");
        assert!(!text.contains("cluster"), "{text}");
        let accounts = render_accounts(&principals()).unwrap();
        let exports = accounts["MESH"]["exports"].as_array().unwrap();
        assert!(
            exports
                .contains(&json!({"service": "mesh.ingress.coder.>", "accounts": ["AGENT_coder"]}))
        );
        assert!(
            exports
                .contains(&json!({"stream": "mesh.deliver.coder.>", "accounts": ["AGENT_coder"]}))
        );
        assert_eq!(accounts["MESH"]["users"].as_array().unwrap().len(), 2);
        assert!(accounts["AGENT_planner"]["users"][0]["permissions"].is_object());
        assert_eq!(
            accounts["MESH"]["imports"][0]["service"]["subject"],
            json!(GPU_STATUS_SUBJECT)
        );
    }

    #[test]
    fn renders_a_cluster_node() {
        let text = render_server_config(&ServerConfig {
            host: "127.0.0.1".into(),
            port: 4223,
            store_dir: "/tmp/js2".into(),
            principals: None,
            cluster: Some(ClusterNode {
                server_name: "nats-2".into(),
                cluster_name: "agentmesh".into(),
                route_port: 6223,
                routes: vec![
                    "nats-route://127.0.0.1:6222".into(),
                    "nats-route://127.0.0.1:6224".into(),
                ],
            }),
            http_port: Some(8223),
            durability: crate::server::Durability::Interval,
            redacted_original: crate::RedactedOriginal::Keep,
        })
        .unwrap();
        assert!(
            text.lines()
                .any(|l| l == "jetstream: {store_dir: \"/tmp/js2\"}"),
            "{text}"
        );
        for line in [
            "server_name: \"nats-2\"",
            "http: \"127.0.0.1:8223\"",
            "cluster: {name: \"agentmesh\", listen: \"127.0.0.1:6223\", routes: [\"nats-route://127.0.0.1:6222\",\"nats-route://127.0.0.1:6224\"]}",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn refuses_bad_sets() {
        let mut bad = principals();
        bad.push(Principal::agent("Bad Id", key()));
        assert!(matches!(validate(&bad), Err(AuthError::InvalidAgentId(_))));
        let mut dup = principals();
        dup.push(Principal::agent("coder", key()));
        assert!(matches!(validate(&dup), Err(AuthError::DuplicateName(_))));
        let mut same_key = principals();
        let k = same_key[4].public_key.clone();
        same_key.push(Principal::agent("reviewer", k));
        assert!(matches!(
            validate(&same_key),
            Err(AuthError::DuplicateKey { .. })
        ));
        let mut seed_as_key = principals();
        seed_as_key.push(Principal::agent("reviewer", "SUAB"));
        assert!(matches!(
            validate(&seed_as_key),
            Err(AuthError::InvalidKey { .. })
        ));
        assert_eq!(validate(&principals()[1..]), Err(AuthError::NoAdmin));
    }
}
