//! Loading, validating and evaluating a Cedar policy set.
//!
//! A policy directory holds `schema.cedarschema` (the Cedar schema),
//! `entities.json` (agents, roles, tools) and any number of `*.cedar` policy
//! files. Every policy is validated against the schema at load; the first
//! problem refuses the whole set with the file, line and column.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Entities, EntityId, EntityTypeName, EntityUid, Policy,
    PolicyId, PolicySet, PrincipalConstraint, Request, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use miette::Diagnostic;
use schemas::{EventType, MeshEvent};
use sha2::{Digest, Sha256};

use crate::guard::{GuardMeta, Guards};

/// The schema file in a policy directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The entities file in a policy directory.
pub const ENTITIES_FILE: &str = "entities.json";
/// The reason of the worker's own denial of an agent missing from the
/// entities (in a receipt's `reasons`, where policy ids go otherwise).
pub const UNREGISTERED_AGENT: &str = "unregistered-agent";

/// Why a policy directory was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read `{}`: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file is not valid (syntax, schema, entity or validation error).
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// The directory has no policy files.
    #[error("no `*.cedar` policy files in `{}`", .0.display())]
    NoPolicies(PathBuf),
}

/// A validated policy set with its schema and entities, ready to decide.
pub struct PolicyBundle {
    policies: PolicySet,
    index: PolicyIndex,
    shape: Shape,
    schema: Schema,
    entities: Entities,
    hash: String,
    authorizer: Authorizer,
    names: Names,
    guard: GuardMeta,
    cache: crate::cache::CacheRules,
}

impl fmt::Debug for PolicyBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyBundle")
            .field("hash", &self.hash)
            .field("policies", &self.policies.policies().count())
            .finish()
    }
}

/// Entity type names, parsed once.
struct Names {
    agent: EntityTypeName,
    tool: EntityTypeName,
    workflow: EntityTypeName,
    action: EntityTypeName,
}

impl Names {
    // INVARIANT: these literals are valid Cedar type names.
    #[expect(clippy::unwrap_used, reason = "a panic is how a test or bench fails")]
    fn new() -> Self {
        Self {
            agent: "Agent".parse().unwrap(),
            tool: "Tool".parse().unwrap(),
            workflow: "Workflow".parse().unwrap(),
            action: "Action".parse().unwrap(),
        }
    }
}

/// The result of evaluating one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the policies permit the event.
    pub allowed: bool,
    /// Ids of the determining policies.
    pub reasons: Vec<String>,
    /// Evaluation errors; any evaluation error denies the event.
    pub errors: Vec<String>,
}

/// `n` synthetic policies over the shipped schema, for benchmarks: each
/// names one principal and one action (a tenth of them forbids), the shape
/// large policy sets tend to have.
pub fn generated_policies(n: usize) -> String {
    let actions = [
        "message",
        "task.handoff",
        "tool.result",
        "output",
        "reasoning",
    ];
    let mut text = String::new();
    for i in 0..n {
        let action = actions[i % actions.len()];
        let effect = if i % 10 == 0 { "forbid" } else { "permit" };
        text.push_str(&format!(
            "@id(\"generated-{i}\")\n{effect} (principal == Agent::\"generated-agent-{i}\", action == Action::\"io.agentmesh.{action}\", resource in Role::\"member\")\nwhen {{ context.size < {} && context.step != \"never-{i}\" }};\n",
            1_000 + i
        ));
    }
    text
}

/// The policies that can apply to a request, by action and principal.
///
/// Cedar evaluates every policy of the set it is given, so decision time
/// grows with the number of policies. A policy whose scope names another
/// action (`action ==` it, or `action in` a group the schema does not put the
/// action in), or `principal ==` another agent, can never match, so it is
/// left out of that request's candidate set; what remains decides exactly as
/// the whole set would. Principal scopes that need the entities (`principal
/// in` / `is`) keep the policy in every candidate set of its actions.
struct PolicyIndex {
    by_action: HashMap<String, Partition>,
}

/// The candidates for one action.
struct Partition {
    /// Policies whose principal scope is not `==` one agent.
    generic: PolicySet,
    /// For each agent named by `principal ==`: `generic` plus those policies.
    by_principal: HashMap<String, PolicySet>,
}

impl PolicyIndex {
    fn build(policies: &PolicySet, schema: &Schema, names: &Names) -> Self {
        let actions: Vec<&str> = EventType::ALL.iter().map(|t| t.as_str()).collect();
        // Each catalogue action with the groups the schema puts it in
        // (`action "a" in ["g"]`), directly or through other groups: `action
        // in G` matches the action when G is the action or one of these.
        // `None` where the schema does not say (then `action in` any group
        // keeps the policy).
        let hierarchy = schema.action_entities().ok();
        let lineage: Vec<(&str, EntityUid, Option<HashSet<EntityUid>>)> = actions
            .iter()
            .map(|action| {
                let uid =
                    EntityUid::from_type_name_and_id(names.action.clone(), EntityId::new(*action));
                let groups = hierarchy
                    .as_ref()
                    .and_then(|h| h.ancestors(&uid))
                    .map(|groups| groups.cloned().collect());
                (*action, uid, groups)
            })
            .collect();
        let mut generic: HashMap<&str, Vec<Policy>> = HashMap::new();
        let mut specific: HashMap<&str, HashMap<String, Vec<Policy>>> = HashMap::new();
        for policy in policies.policies() {
            let scope = policy.action_constraint();
            // The catalogue actions this policy's scope can match.
            let applies = lineage.iter().filter(|(_, uid, groups)| match &scope {
                ActionConstraint::Any => true,
                ActionConstraint::Eq(scope) => scope == uid,
                ActionConstraint::In(scopes) => scopes
                    .iter()
                    .any(|scope| scope == uid || groups.as_ref().is_none_or(|g| g.contains(scope))),
            });
            let principal = match policy.principal_constraint() {
                PrincipalConstraint::Eq(uid) if uid.type_name() == &names.agent => {
                    Some(uid.id().unescaped().to_owned())
                }
                _ => None,
            };
            for &(action, _, _) in applies {
                match &principal {
                    Some(agent) => specific
                        .entry(action)
                        .or_default()
                        .entry(agent.clone())
                        .or_default()
                        .push(policy.clone()),
                    None => generic.entry(action).or_default().push(policy.clone()),
                }
            }
        }
        let set = |list: &[Policy]| {
            let mut set = PolicySet::new();
            for policy in list {
                // INVARIANT: ids are unique in the source set, so in every subset.
                let _ = set.add(policy.clone());
            }
            set
        };
        let by_action = actions
            .iter()
            .map(|action| {
                let generic_list = generic.get(action).map(Vec::as_slice).unwrap_or_default();
                let by_principal = specific
                    .get(action)
                    .map(|agents| {
                        agents
                            .iter()
                            .map(|(agent, own)| {
                                let mut list = generic_list.to_vec();
                                list.extend(own.iter().cloned());
                                (agent.clone(), set(&list))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                (
                    (*action).to_owned(),
                    Partition {
                        generic: set(generic_list),
                        by_principal,
                    },
                )
            })
            .collect();
        Self { by_action }
    }

    /// The candidate set for `action` by `agent`; `None` for an action the
    /// index does not know (then the whole set is used).
    fn candidates(&self, action: &str, agent: &str) -> Option<&PolicySet> {
        let partition = self.by_action.get(action)?;
        Some(
            partition
                .by_principal
                .get(agent)
                .unwrap_or(&partition.generic),
        )
    }
}

/// The context attributes the worker may send; the optional ones are
/// `OPTIONAL` in this order (bit 0, 1, 2 of a combination).
const OPTIONAL: [&str; 3] = ["target", "subject", "datacontenttype"];

/// What the schema fixes about the requests the worker forms, and what the
/// policies read of their context, found once at load.
///
/// A request is checked against the schema by looking up its action here
/// rather than by Cedar's per-request validation: the worker builds every
/// context itself with fixed types, so the schema's verdict depends only on
/// the action, the resource type and which optional attributes are present.
/// Those verdicts are computed at load; a request the schema would refuse
/// takes the full check (and its error) and is denied.
struct Shape {
    /// Per catalogue action the schema declares with `Agent` as a principal.
    actions: HashMap<&'static str, ActionShape>,
    /// The context attributes some policy reads.
    reads: Reads,
}

/// One action's part of the schema.
struct ActionShape {
    /// The resource types it applies to.
    resources: Vec<EntityTypeName>,
    /// For each combination of `OPTIONAL` attributes present: whether the
    /// schema accepts the context the worker builds.
    context_ok: [bool; 8],
}

/// Which context attributes the loaded policies read.
#[derive(Debug, Default)]
struct Reads {
    /// A policy reads `context` as a whole (not only `context.<attr>`).
    whole: bool,
    names: HashSet<String>,
}

impl Reads {
    fn of(policies: &PolicySet) -> Self {
        let mut reads = Self::default();
        for policy in policies.policies() {
            match policy.to_json() {
                Ok(json) => reads.visit(&json),
                // Cannot tell what it reads: build everything.
                Err(_) => reads.whole = true,
            }
        }
        reads
    }

    /// Collects `context.<attr>` and `context has <attr>` from a policy's
    /// JSON form; any other use of `context` reads all of it.
    fn visit(&mut self, node: &serde_json::Value) {
        use serde_json::Value;
        let is_context = |v: &Value| v.get("Var").and_then(Value::as_str) == Some("context");
        match node {
            Value::Object(map) => {
                if is_context(node) {
                    self.whole = true;
                    return;
                }
                for (key, value) in map {
                    if (key == "." || key == "has")
                        && let (Some(left), Some(attr)) =
                            (value.get("left"), value.get("attr").and_then(Value::as_str))
                        && is_context(left)
                    {
                        self.names.insert(attr.to_owned());
                        continue;
                    }
                    self.visit(value);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| self.visit(v)),
            _ => {}
        }
    }

    fn wants(&self, name: &str) -> bool {
        self.whole || self.names.contains(name)
    }
}

/// The values of one request's context, before they become Cedar values.
struct Attrs<'a> {
    trace_id: String,
    step: &'a str,
    mode: &'a str,
    size: usize,
    has_causation: bool,
    optional: [Option<&'a str>; 3],
}

impl Attrs<'_> {
    /// Which `OPTIONAL` attributes are present, as bits.
    fn combination(&self) -> usize {
        self.optional
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_some())
            .map(|(i, _)| 1 << i)
            .sum()
    }

    /// The context pairs `wanted` asks for, guardrail records included.
    fn pairs(
        self,
        guard: &GuardMeta,
        guards: &Guards,
        wanted: impl Fn(&str) -> bool,
    ) -> Vec<(String, RestrictedExpression)> {
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let mut context = Vec::with_capacity(11);
        if wanted("trace_id") {
            context.push((
                "trace_id".into(),
                RestrictedExpression::new_string(self.trace_id),
            ));
        }
        if wanted("step") {
            context.push(("step".into(), string(self.step)));
        }
        if wanted("mode") {
            context.push(("mode".into(), string(self.mode)));
        }
        if wanted("size") {
            context.push((
                "size".into(),
                RestrictedExpression::new_long(i64::try_from(self.size).unwrap_or(i64::MAX)),
            ));
        }
        if wanted("has_causation") {
            context.push((
                "has_causation".into(),
                RestrictedExpression::new_bool(self.has_causation),
            ));
        }
        for (name, value) in OPTIONAL.iter().zip(self.optional) {
            if let Some(value) = value
                && wanted(name)
            {
                context.push(((*name).into(), string(value)));
            }
        }
        guard.extend(&mut context, guards, wanted);
        context
    }
}

impl Shape {
    fn build(schema: &Schema, policies: &PolicySet, guard: &GuardMeta, names: &Names) -> Self {
        let mut actions = HashMap::new();
        for ty in EventType::ALL {
            let action = ty.as_str();
            let uid = EntityUid::from_type_name_and_id(names.action.clone(), EntityId::new(action));
            let (Some(principals), Some(resources)) = (
                schema.principals_for_action(&uid),
                schema.resources_for_action(&uid),
            ) else {
                continue;
            };
            if !principals.into_iter().any(|p| p == &names.agent) {
                continue;
            }
            let resources: Vec<EntityTypeName> = resources.cloned().collect();
            let Some(resource) = resources.first() else {
                continue;
            };
            // The schema's verdict on each combination of optional
            // attributes, for a context with every attribute the worker
            // may send (values of the types it always sends).
            let mut context_ok = [false; 8];
            for (combination, ok) in context_ok.iter_mut().enumerate() {
                let present = |i: usize| (combination & (1 << i) != 0).then_some("x");
                let attrs = Attrs {
                    trace_id: "0".repeat(32),
                    step: "step",
                    mode: "binary",
                    size: 1,
                    has_causation: false,
                    optional: [present(0), present(1), present(2)],
                };
                let guards = Guards::default();
                let sample = Context::from_pairs(attrs.pairs(guard, &guards, |_| true));
                *ok = sample.is_ok_and(|context| {
                    Request::new(
                        EntityUid::from_type_name_and_id(
                            names.agent.clone(),
                            EntityId::new("sample"),
                        ),
                        uid.clone(),
                        EntityUid::from_type_name_and_id(resource.clone(), EntityId::new("sample")),
                        context,
                        Some(schema),
                    )
                    .is_ok()
                });
            }
            actions.insert(
                action,
                ActionShape {
                    resources,
                    context_ok,
                },
            );
        }
        Self {
            actions,
            reads: Reads::of(policies),
        }
    }

    /// Whether the schema accepts a request for `action` on a `resource`
    /// with this combination of optional context attributes.
    fn accepts(&self, action: &str, resource: &EntityTypeName, combination: usize) -> bool {
        self.actions.get(action).is_some_and(|shape| {
            shape.resources.contains(resource) && shape.context_ok[combination & 7]
        })
    }
}

/// 1-based line and column of a byte offset in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Turns a miette diagnostic into a `LoadError::Invalid` pointing into `text`.
fn invalid(path: &Path, text: &str, diag: &dyn Diagnostic, fallback: String) -> LoadError {
    let offset = diag
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset());
    let (line, column) = offset.map_or((1, 1), |o| line_col(text, o));
    let mut message = fallback;
    if let Some(help) = diag.help() {
        message.push_str(&format!(" (help: {help})"));
    }
    LoadError::Invalid {
        path: path.to_owned(),
        line,
        column,
        message,
    }
}

fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|source| LoadError::Read {
        path: path.to_owned(),
        source,
    })
}

impl PolicyBundle {
    /// Loads and validates the policy directory `dir`.
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let schema_path = dir.join(SCHEMA_FILE);
        let schema_text = read(&schema_path)?;
        let schema = match Schema::from_cedarschema_str(&schema_text) {
            Ok((schema, _warnings)) => schema,
            Err(e) => return Err(invalid(&schema_path, &schema_text, &e, e.to_string())),
        };

        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| LoadError::Read {
                path: dir.to_owned(),
                source,
            })?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(LoadError::NoPolicies(dir.to_owned()));
        }

        let mut hasher = Sha256::new();
        hasher.update(schema_text.as_bytes());
        let mut policies = PolicySet::new();
        // Which file and text each policy came from, to locate validation errors.
        let mut origin: BTreeMap<String, (PathBuf, usize)> = BTreeMap::new();
        let mut texts: Vec<(PathBuf, String)> = Vec::new();
        for path in &files {
            let text = read(path)?;
            hasher.update(
                path.file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hasher.update(text.as_bytes());
            let set =
                PolicySet::from_str(&text).map_err(|e| invalid(path, &text, &e, e.to_string()))?;
            let stem = path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("policies");
            for (n, policy) in set.policies().enumerate() {
                // Policies are named by their `@id` annotation when they have
                // one (that name appears in receipts), else `<file>.<n>`.
                let id = policy
                    .annotation("id")
                    .map(str::to_owned)
                    .unwrap_or_else(|| format!("{stem}.{n}"));
                let renamed: Policy = policy.new_id(PolicyId::new(&id));
                if origin.contains_key(&id) {
                    let (first, _) = &origin[&id];
                    return Err(LoadError::Invalid {
                        path: path.clone(),
                        line: 1,
                        column: 1,
                        message: format!(
                            "policy id `{id}` is used twice (first in `{}`)",
                            first.display()
                        ),
                    });
                }
                policies.add(renamed).map_err(|e| LoadError::Invalid {
                    path: path.clone(),
                    line: 1,
                    column: 1,
                    message: e.to_string(),
                })?;
                origin.insert(id, (path.clone(), texts.len()));
            }
            texts.push((path.clone(), text));
        }

        let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
        if let Some(error) = validation.validation_errors().next() {
            let id = error.policy_id().to_string();
            let (path, text) = origin
                .get(&id)
                .map(|(p, i)| (p.clone(), texts[*i].1.as_str()))
                .unwrap_or_else(|| (dir.to_owned(), ""));
            return Err(invalid(
                &path,
                text,
                error,
                format!("policy `{id}`: {error}"),
            ));
        }

        let guard = GuardMeta::of(&schema, &policies).map_err(|(id, message)| {
            let path = origin
                .get(&id)
                .map_or_else(|| dir.to_owned(), |(p, _)| p.clone());
            LoadError::Invalid {
                path,
                line: 1,
                column: 1,
                message: format!("policy `{id}`: {message}"),
            }
        })?;

        let entities_path = dir.join(ENTITIES_FILE);
        let entities_text = read(&entities_path)?;
        hasher.update(entities_text.as_bytes());
        let entities = Entities::from_json_str(&entities_text, Some(&schema))
            .map_err(|e| invalid(&entities_path, &entities_text, &e, e.to_string()))?;

        // Cacheable tools (docs/cache.md), reloaded with the policies. The
        // file is optional; when present it counts in the hash, so a change
        // to it alone is a reload.
        let cache_path = dir.join(crate::cache::CACHE_FILE);
        let cache = match std::fs::read_to_string(&cache_path) {
            Ok(text) => {
                hasher.update(crate::cache::CACHE_FILE.as_bytes());
                hasher.update(text.as_bytes());
                crate::cache::CacheRules::parse(&text).map_err(|e| {
                    let (line, column) = line_col(&text, e.offset);
                    LoadError::Invalid {
                        path: cache_path.clone(),
                        line,
                        column,
                        message: e.message,
                    }
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::cache::CacheRules::default()
            }
            Err(source) => {
                return Err(LoadError::Read {
                    path: cache_path,
                    source,
                });
            }
        };

        let digest = hasher.finalize();
        let names = Names::new();
        Ok(Self {
            cache,
            index: PolicyIndex::build(&policies, &schema, &names),
            shape: Shape::build(&schema, &policies, &guard, &names),
            policies,
            schema,
            entities,
            hash: hex::encode(&digest[..8]),
            authorizer: Authorizer::new(),
            names,
            guard,
        })
    }

    /// What the schema declares and the policies read of the guardrail
    /// context, and which permits require an approval.
    pub fn guard(&self) -> &GuardMeta {
        &self.guard
    }

    /// The tools whose results the mesh may cache (`cache.toml`; empty
    /// when the directory has none).
    pub fn cache(&self) -> &crate::cache::CacheRules {
        &self.cache
    }

    /// The hash of the schema, policy files and entities, and `cache.toml`
    /// when there is one (16 hex characters).
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// How many policies the set has.
    pub fn len(&self) -> usize {
        self.policies.policies().count()
    }

    /// Whether the set has no policies (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Evaluates one validated event with its payload scanned when a policy
    /// reads `context.detectors`, and rate and budget counters at zero (the
    /// worker counts; see [`PolicyBundle::decide_with`]).
    pub fn decide(&self, event: &MeshEvent, step: &str) -> Verdict {
        let mut guards = Guards::default();
        if self.guard.reads_detectors() {
            guards.findings = crate::detect::Detector::shared().scan_event(event);
        }
        self.decide_with(event, step, &guards)
    }

    /// Evaluates one validated event with the given guardrail attributes.
    /// Any failure to form the request denies (fail closed) and is reported
    /// in `errors`.
    pub fn decide_with(&self, event: &MeshEvent, step: &str, guards: &Guards) -> Verdict {
        let deny = |error: String| Verdict {
            allowed: false,
            reasons: Vec::new(),
            errors: vec![error],
        };
        let principal = EntityUid::from_type_name_and_id(
            self.names.agent.clone(),
            EntityId::new(event.agent.as_str()),
        );
        // Registration is the worker's rule, not the policies': an agent
        // missing from the entities is denied before Cedar runs, whatever
        // the loaded policies permit.
        if self.entities.get(&principal).is_none() {
            return Verdict {
                allowed: false,
                reasons: vec![UNREGISTERED_AGENT.to_owned()],
                errors: vec![format!(
                    "agent `{}` is not registered in {ENTITIES_FILE}: add it (`meshctl agents add {} --role <role>`)",
                    event.agent, event.agent
                )],
            };
        }
        let action = EntityUid::from_type_name_and_id(
            self.names.action.clone(),
            EntityId::new(event.event_type.as_str()),
        );
        let resource = match (event.event_type, event.tool(), &event.target) {
            (EventType::ToolCall, Some(tool), _) => {
                EntityUid::from_type_name_and_id(self.names.tool.clone(), EntityId::new(tool))
            }
            (_, _, Some(target)) => EntityUid::from_type_name_and_id(
                self.names.agent.clone(),
                EntityId::new(target.as_str()),
            ),
            _ => EntityUid::from_type_name_and_id(
                self.names.workflow.clone(),
                EntityId::new(event.trace.trace_id_hex()),
            ),
        };
        let attrs = Attrs {
            trace_id: event.trace.trace_id_hex(),
            step,
            mode: event.mode.as_str(),
            size: event.size,
            has_causation: event.causation_id.is_some(),
            optional: [
                event.target.as_ref().map(|t| t.as_str()),
                schemas::AttributesReader::subject(&event.event),
                schemas::AttributesReader::datacontenttype(&event.event),
            ],
        };
        // The schema was checked against this kind of request at load, so
        // Cedar need not validate it again; the context holds only what
        // the policies read (built as Cedar values: parsing JSON costs tens
        // of microseconds). A request the schema refuses is formed in full
        // and validated, for the error, and denied.
        let checked = self.shape.accepts(
            event.event_type.as_str(),
            resource.type_name(),
            attrs.combination(),
        );
        let context = if checked {
            attrs.pairs(&self.guard, guards, |name| self.shape.reads.wants(name))
        } else {
            attrs.pairs(&self.guard, guards, |_| true)
        };
        let context = match Context::from_pairs(context) {
            Ok(c) => c,
            Err(e) => return deny(format!("context does not match the schema: {e}")),
        };
        let request = match Request::new(
            principal,
            action,
            resource,
            context,
            (!checked).then_some(&self.schema),
        ) {
            Ok(r) => r,
            Err(e) => return deny(format!("request does not match the schema: {e}")),
        };
        let candidates = self
            .index
            .candidates(event.event_type.as_str(), event.agent.as_str())
            .unwrap_or(&self.policies);
        let response = self
            .authorizer
            .is_authorized(&request, candidates, &self.entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        // Cedar skips a policy whose evaluation errors; a skipped `forbid`
        // could let a `permit` through, so any error denies (fail closed).
        let allowed = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
        Verdict {
            allowed,
            reasons: response.diagnostics().reason().map(reason).collect(),
            errors,
        }
    }
}

/// A policy id as a reason: Cedar's `Display` of it (control characters,
/// quotes and the like escaped, so it is safe in a header), without the
/// formatting machinery when nothing needs escaping — formatting every
/// reason char by char was ~8 % of a denied decision.
fn reason(id: &cedar_policy::PolicyId) -> String {
    let raw: &str = id.as_ref();
    if raw.chars().all(|c| c.escape_debug().len() == 1) {
        raw.to_owned()
    } else {
        id.to_string()
    }
}

#[cfg(test)]
mod tests {
    use schemas::{EventBuilder, EventBuilderV10, Limits, MeshEvent, encode_binary};

    use super::*;

    fn event(ty: &str) -> MeshEvent {
        let event = EventBuilderV10::new()
            .id("e1")
            .source("/agents/coder")
            .ty(ty)
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        MeshEvent::from_message("mesh.ingress.coder.step", Some(&h), &p, Limits::default()).unwrap()
    }

    fn bundle_with(schema: &str, policies: &str) -> (tempfile::TempDir, PolicyBundle) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SCHEMA_FILE), schema).unwrap();
        std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
        std::fs::write(
            dir.path().join(ENTITIES_FILE),
            r#"[{ "uid": { "type": "Agent", "id": "coder" }, "attrs": {}, "parents": [] }]"#,
        )
        .unwrap();
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        (dir, bundle)
    }

    const SMALL_SCHEMA: &str = r#"
        entity Agent;
        entity Workflow;
        entity Tool;
        type Ctx = {
          trace_id: String, step: String, mode: String, size: Long,
          has_causation: Bool, target?: String, datacontenttype?: String,
        };
        action "io.agentmesh.output"
          appliesTo { principal: Agent, resource: [Agent, Workflow], context: Ctx };
        action "io.agentmesh.tool.call"
          appliesTo { principal: Agent, resource: Tool, context: Ctx };
    "#;

    fn with_subject(ty: &str, subject: &str) -> MeshEvent {
        let event = EventBuilderV10::new()
            .id("e1")
            .source("/agents/coder")
            .ty(ty)
            .subject(subject)
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        MeshEvent::from_message("mesh.ingress.coder.step", Some(&h), &p, Limits::default()).unwrap()
    }

    #[test]
    fn what_the_schema_refuses_is_denied_with_its_error_without_per_request_validation() {
        let (_dir, bundle) = bundle_with(
            SMALL_SCHEMA,
            r#"@id("all") permit (principal, action, resource);"#,
        );
        // Accepted shapes decide as before.
        let verdict = bundle.decide(&event("io.agentmesh.output"), "step");
        assert!(verdict.allowed && verdict.errors.is_empty(), "{verdict:?}");
        // The schema has no `subject` in the context: an event with one is
        // refused by the schema, so denied, with the schema's error.
        let verdict = bundle.decide(&with_subject("io.agentmesh.tool.call", "x"), "step");
        assert!(!verdict.allowed, "{verdict:?}");
        assert!(
            verdict
                .errors
                .iter()
                .any(|e| e.contains("does not match the schema")),
            "{verdict:?}"
        );
        // An action the schema does not declare is denied the same way.
        let verdict = bundle.decide(&event("io.agentmesh.prompt"), "step");
        assert!(!verdict.allowed, "{verdict:?}");
        assert!(
            verdict
                .errors
                .iter()
                .any(|e| e.contains("does not match the schema")),
            "{verdict:?}"
        );
    }

    #[test]
    fn the_context_holds_what_the_policies_read() {
        // Strict validation makes a policy test an optional attribute
        // before reading it, so leaving out what no policy reads, and an
        // optional attribute the event lacks, changes no decision.
        let (_dir, bundle) = bundle_with(
            SMALL_SCHEMA,
            r#"
            @id("size") permit (principal, action, resource) when { context.size > 0 };
            @id("target") forbid (principal, action, resource)
              when { context has target && context.target == "coder" };
            "#,
        );
        let reads = &bundle.shape.reads;
        assert!(!reads.whole);
        let mut names: Vec<&str> = reads.names.iter().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, vec!["size", "target"]);
        let verdict = bundle.decide(&event("io.agentmesh.output"), "step");
        assert!(verdict.allowed && verdict.errors.is_empty(), "{verdict:?}");
    }

    #[test]
    fn a_policy_reading_the_whole_context_gets_all_of_it() {
        let (_dir, bundle) = bundle_with(
            SMALL_SCHEMA,
            r#"
            @id("all") permit (principal, action, resource);
            @id("whole") forbid (principal, action, resource)
              when { { "c": context }.c.size > 100000 };
            "#,
        );
        assert!(bundle.shape.reads.whole);
        let verdict = bundle.decide(&event("io.agentmesh.output"), "step");
        assert!(verdict.allowed && verdict.errors.is_empty(), "{verdict:?}");
    }

    #[test]
    fn action_in_a_group_applies_to_the_actions_the_schema_puts_in_it() {
        // `observation` is in `output` (a catalogue action), `reasoning` in
        // `steps`, and `steps` in `output`.
        let schema = r#"
            entity Agent;
            entity Workflow;
            type Ctx = {
              trace_id: String, step: String, mode: String, size: Long,
              has_causation: Bool, target?: String, subject?: String,
              datacontenttype?: String,
            };
            action "steps" in ["io.agentmesh.output"];
            action "io.agentmesh.output", "io.agentmesh.prompt"
              appliesTo { principal: Agent, resource: [Agent, Workflow], context: Ctx };
            action "io.agentmesh.observation" in ["io.agentmesh.output"]
              appliesTo { principal: Agent, resource: [Agent, Workflow], context: Ctx };
            action "io.agentmesh.reasoning" in ["steps"]
              appliesTo { principal: Agent, resource: [Agent, Workflow], context: Ctx };
        "#;
        let policies = r#"
            @id("all") permit (principal, action, resource);
            @id("no-output") forbid (principal, action in Action::"io.agentmesh.output", resource);
            @id("no-steps") forbid (principal == Agent::"coder", action in [Action::"steps"], resource);
        "#;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SCHEMA_FILE), schema).unwrap();
        std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
        std::fs::write(
            dir.path().join(ENTITIES_FILE),
            r#"[{ "uid": { "type": "Agent", "id": "coder" }, "attrs": {}, "parents": [] }]"#,
        )
        .unwrap();
        let bundle = PolicyBundle::load(dir.path()).unwrap();

        for (ty, reasons) in [
            ("io.agentmesh.output", vec!["no-output"]),
            ("io.agentmesh.observation", vec!["no-output"]),
            ("io.agentmesh.reasoning", vec!["no-output", "no-steps"]),
        ] {
            let verdict = bundle.decide(&event(ty), "step");
            assert!(!verdict.allowed, "{ty}: {verdict:?}");
            let mut got = verdict.reasons.clone();
            got.sort();
            assert_eq!(got, reasons, "{ty}");
            assert!(verdict.errors.is_empty(), "{ty}: {verdict:?}");
        }
        let verdict = bundle.decide(&event("io.agentmesh.prompt"), "step");
        assert!(verdict.allowed && verdict.errors.is_empty(), "{verdict:?}");
        assert_eq!(verdict.reasons, vec!["all"]);

        // The index stays exact: neither forbid is a candidate for `prompt`.
        let ids = |action: &str| {
            let mut ids: Vec<String> = bundle
                .index
                .candidates(action, "coder")
                .unwrap()
                .policies()
                .map(|p| p.id().to_string())
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(ids("io.agentmesh.prompt"), vec!["all"]);
        assert_eq!(ids("io.agentmesh.observation"), vec!["all", "no-output"]);
        assert_eq!(
            ids("io.agentmesh.reasoning"),
            vec!["all", "no-output", "no-steps"]
        );
    }

    #[test]
    fn a_reason_is_the_policy_id_as_cedar_displays_it() {
        for id in [
            "forbid-shell-exec",
            "policy0",
            "quote\"d",
            "line\nbreak",
            "tab\there",
            "ünïcode",
        ] {
            let id = cedar_policy::PolicyId::new(id);
            assert_eq!(reason(&id), id.to_string());
        }
        assert_eq!(reason(&cedar_policy::PolicyId::new("a\nb")), "a\\nb");
    }
}
