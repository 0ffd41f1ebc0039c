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
        // Built as Cedar values: parsing a JSON context costs tens of
        // microseconds per decision.
        let string = |s: &str| RestrictedExpression::new_string(s.to_owned());
        let mut context: Vec<(String, RestrictedExpression)> = vec![
            ("trace_id".into(), string(&event.trace.trace_id_hex())),
            ("step".into(), string(step)),
            ("mode".into(), string(event.mode.as_str())),
            (
                "size".into(),
                RestrictedExpression::new_long(event.size as i64),
            ),
            (
                "has_causation".into(),
                RestrictedExpression::new_bool(event.causation_id.is_some()),
            ),
        ];
        if let Some(target) = &event.target {
            context.push(("target".into(), string(target.as_str())));
        }
        if let Some(subject) = schemas::AttributesReader::subject(&event.event) {
            context.push(("subject".into(), string(subject)));
        }
        if let Some(ct) = schemas::AttributesReader::datacontenttype(&event.event) {
            context.push(("datacontenttype".into(), string(ct)));
        }
        self.guard.extend(&mut context, guards);
        let context = match Context::from_pairs(context) {
            Ok(c) => c,
            Err(e) => return deny(format!("context does not match the schema: {e}")),
        };
        let request = match Request::new(
            principal.clone(),
            action,
            resource,
            context,
            Some(&self.schema),
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
            reasons: response
                .diagnostics()
                .reason()
                .map(|id| id.to_string())
                .collect(),
            errors,
        }
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
}
