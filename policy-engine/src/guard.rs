//! The guardrails around a Cedar decision: what they add to the context
//! (`context.detectors`, `context.rate`, `context.budget`), which of it a
//! policy set needs, and which permits make an event wait for a human
//! (`@approval("required")`).
//!
//! A policy set gets the attributes its schema declares (checked once at
//! load with Cedar's validator, so an older schema without them keeps
//! working), and the worker only does the work its policies read: payload
//! scanning when a policy reads `detectors`, KV counters when one reads
//! `rate` or `budget`; otherwise the attributes are zeros.

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use cedar_policy::{Effect, PolicySet, Schema, ValidationMode, Validator};

use crate::detect::Findings;
use crate::fields::Field;
use crate::flows::FlowState;
use crate::limits::Tallies;

/// The annotation that makes a permit wait for a human: `@approval("required")`.
pub const APPROVAL_ANNOTATION: &str = "approval";

/// The annotation that makes a permit's allow a redacted one:
/// `@redact("pii secret.jwt")` names detector classes (`pii`, `secret`,
/// `injection`) or kinds (`pii.email`) whose spans are replaced in the
/// delivered copy.
pub const REDACT_ANNOTATION: &str = "redact";

/// What a policy set's schema declares and its policies read, found at load.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardMeta {
    provides_detectors: bool,
    provides_rate: bool,
    provides_budget: bool,
    reads_detectors: bool,
    reads_counters: bool,
    provides_workflow: bool,
    reads_workflow: bool,
    /// A policy reads an attribute named `steps` (`context.workflow.steps`).
    reads_steps: bool,
    /// `flows.toml` declares labels (set by the bundle after loading it).
    pub(crate) keeps_labels: bool,
    approval_policies: BTreeSet<String>,
    /// Permits annotated `@redact(…)`, with the classes or kinds they name.
    redact_policies: BTreeMap<String, Vec<String>>,
}

/// Probe policies: each validates only when the schema declares the whole
/// record for every action.
const PROBE_DETECTORS: &str = r#"permit (principal, action, resource) when {
  context.detectors.pii && context.detectors.secret && context.detectors.injection &&
  context.detectors.findings.contains("") && context.detectors.data_bytes >= 0 };"#;
const PROBE_RATE: &str = r#"permit (principal, action, resource) when {
  context.rate.per_minute >= 0 && context.rate.per_hour >= 0 && context.rate.per_day >= 0 };"#;
const PROBE_WORKFLOW: &str = r#"permit (principal, action, resource) when {
  context.workflow.labels.contains("") && context.workflow.steps >= 0 };"#;
const PROBE_BUDGET: &str = r#"permit (principal, action, resource) when {
  context.budget.tokens >= 0 && context.budget.cost_micros >= 0 &&
  context.budget.tokens_used >= 0 && context.budget.cost_used_micros >= 0 &&
  context.budget.workflow_events >= 0 && context.budget.workflow_tool_calls >= 0 &&
  context.budget.workflow_tokens >= 0 && context.budget.workflow_cost_micros >= 0 };"#;

fn schema_has(schema: &Schema, probe: &str) -> bool {
    let Ok(set) = PolicySet::from_str(probe) else {
        return false;
    };
    Validator::new(schema.clone())
        .validate(&set, ValidationMode::Strict)
        .validation_passed()
}

impl GuardMeta {
    /// Reads `schema` and `policies`. `Err((policy id, message))` when an
    /// `@approval` annotation is misused.
    pub(crate) fn of(schema: &Schema, policies: &PolicySet) -> Result<Self, (String, String)> {
        let mut meta = Self {
            provides_detectors: schema_has(schema, PROBE_DETECTORS),
            provides_rate: schema_has(schema, PROBE_RATE),
            provides_budget: schema_has(schema, PROBE_BUDGET),
            provides_workflow: schema_has(schema, PROBE_WORKFLOW),
            ..Self::default()
        };
        for policy in policies.policies() {
            let id = policy.id().to_string();
            // The JSON form names every attribute a policy reads as `"attr":"<name>"`.
            let json = policy.to_json().map(|j| j.to_string()).unwrap_or_default();
            meta.reads_detectors |= json.contains(r#""attr":"detectors""#);
            meta.reads_counters |=
                json.contains(r#""attr":"rate""#) || json.contains(r#""attr":"budget""#);
            meta.reads_workflow |= json.contains(r#""attr":"workflow""#);
            meta.reads_steps |= json.contains(r#""attr":"steps""#);
            if let Some(value) = policy.annotation(REDACT_ANNOTATION) {
                if policy.effect() != Effect::Permit {
                    return Err((
                        id,
                        "`@redact` only applies to a `permit` (a forbid delivers nothing)".into(),
                    ));
                }
                let classes = crate::redact::parse_classes(value).map_err(|e| (id.clone(), e))?;
                meta.redact_policies.insert(id.clone(), classes);
            }
            if let Some(value) = policy.annotation(APPROVAL_ANNOTATION) {
                if value != "required" {
                    return Err((
                        id,
                        format!("`@approval(\"{value}\")`: the only value is `\"required\"`"),
                    ));
                }
                if policy.effect() != Effect::Permit {
                    return Err((
                        id,
                        "`@approval` only applies to a `permit` (a forbid cannot be approved)"
                            .into(),
                    ));
                }
                meta.approval_policies.insert(id);
            }
        }
        Ok(meta)
    }

    /// Whether a policy reads `context.detectors` (the payload is scanned).
    pub fn reads_detectors(&self) -> bool {
        self.reads_detectors && self.provides_detectors
    }

    /// Whether a policy reads `context.rate` or `context.budget` (the
    /// counters are kept).
    pub fn reads_counters(&self) -> bool {
        self.reads_counters && (self.provides_rate || self.provides_budget)
    }

    /// Whether a policy reads `context.workflow` (the workflow's label
    /// record is read from KV).
    pub fn reads_workflow(&self) -> bool {
        self.reads_workflow && self.provides_workflow
    }

    /// Whether a policy reads `context.workflow.steps`: the worker then
    /// writes the workflow's record on every allowed step (to count it),
    /// else only when a step adds a label.
    pub fn counts_steps(&self) -> bool {
        self.reads_steps && self.reads_workflow()
    }

    /// Whether the worker reads (and keeps) the workflow's label record:
    /// `flows.toml` declares labels or a policy reads `context.workflow`.
    pub fn reads_flow(&self) -> bool {
        self.keeps_labels || self.reads_workflow()
    }

    /// What an allow with these determining policies redacts: the classes
    /// and kinds the `@redact` permits among them name (empty: nothing).
    pub fn redaction(&self, reasons: &[String]) -> Vec<String> {
        let mut classes: BTreeSet<&str> = BTreeSet::new();
        for reason in reasons {
            if let Some(named) = self.redact_policies.get(reason) {
                classes.extend(named.iter().map(String::as_str));
            }
        }
        classes.into_iter().map(str::to_owned).collect()
    }

    /// Whether some permit is annotated `@redact` (its allows need the
    /// payload scanned).
    pub fn redacts(&self) -> bool {
        !self.redact_policies.is_empty()
    }

    /// Whether an allow with these determining policies waits for a human:
    /// any of them is annotated `@approval("required")`.
    pub fn requires_approval(&self, reasons: &[String]) -> bool {
        reasons.iter().any(|r| self.approval_policies.contains(r))
    }

    /// The ids of the permits annotated `@approval("required")`.
    pub fn approval_policies(&self) -> impl Iterator<Item = &str> {
        self.approval_policies.iter().map(String::as_str)
    }

    /// The guardrail records the schema declares and `wanted` asks for,
    /// with their fields: `(attribute, fields)`. The policy bundle keeps of
    /// the fields what its policies read.
    pub(crate) fn records(
        &self,
        guards: &Guards,
        wanted: impl Fn(&str) -> bool,
    ) -> Vec<(&'static str, Vec<(&'static str, Field)>)> {
        let mut records = Vec::new();
        if self.provides_detectors && wanted("detectors") {
            records.push(("detectors", guards.findings.fields()));
        }
        if self.provides_rate && wanted("rate") {
            records.push(("rate", guards.tallies.rate_fields()));
        }
        if self.provides_budget && wanted("budget") {
            records.push(("budget", guards.tallies.budget_fields()));
        }
        if self.provides_workflow && wanted("workflow") {
            records.push(("workflow", guards.flow.fields()));
        }
        records
    }
}

/// The guard attributes of one event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guards {
    /// What the detectors found (empty when no policy reads them).
    pub findings: Findings,
    /// The rate and budget counters (zeros when no policy reads them).
    pub tallies: Tallies,
    /// The workflow's labels and steps (empty when no labels are kept).
    pub flow: FlowState,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use schemas::{EventBuilder, EventBuilderV10, Limits, MeshEvent, encode_binary};

    use crate::policy::{LoadError, PolicyBundle};

    fn shipped_copy(skip: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        for entry in std::fs::read_dir(shipped).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if path.is_file() && !skip.contains(&name.as_str()) {
                std::fs::copy(&path, dir.path().join(name)).unwrap();
            }
        }
        dir
    }

    fn tool_call(tool: &str, data: serde_json::Value) -> MeshEvent {
        tool_call_to(tool, None, data)
    }

    /// A tool call of `tool` from the coder, with `data`, sent to
    /// `target` (the `target` extension) when given.
    pub(crate) fn tool_call_to(
        tool: &str,
        target: Option<&str>,
        data: serde_json::Value,
    ) -> MeshEvent {
        let mut builder = EventBuilderV10::new()
            .id("e1")
            .source("/agents/coder")
            .ty("io.agentmesh.tool.call")
            .subject(tool)
            .data("application/json", data);
        if let Some(target) = target {
            builder = builder.extension("target", target);
        }
        let event = builder.build().unwrap();
        let (h, p) = encode_binary(&event);
        MeshEvent::from_message(
            "mesh.ingress.coder.tool_call",
            Some(&h),
            &p,
            Limits::default(),
        )
        .unwrap()
    }

    #[test]
    fn shipped_set_reads_detectors_and_gates_deploys() {
        let dir = shipped_copy(&[]);
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        let meta = bundle.guard();
        assert!(meta.reads_detectors());
        assert!(!meta.reads_counters(), "limits are an example, not loaded");
        assert_eq!(
            meta.approval_policies().collect::<Vec<_>>(),
            vec!["deploys-need-approval"]
        );
        let pii = tool_call("web.search", serde_json::json!({"q": "bob@example.com"}));
        let verdict = bundle.decide(&pii, "tool_call");
        assert!(!verdict.allowed);
        assert_eq!(verdict.reasons, vec!["forbid-pii-to-external-tools"]);
        let deploy = tool_call("deploy.prod", serde_json::json!({"v": 1}));
        let verdict = bundle.decide(&deploy, "tool_call");
        assert!(verdict.allowed && meta.requires_approval(&verdict.reasons));
    }

    #[test]
    fn example_limits_load_with_the_shipped_set() {
        let dir = shipped_copy(&[]);
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/limits.cedar");
        std::fs::copy(example, dir.path().join("limits.cedar")).unwrap();
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        assert!(bundle.guard().reads_counters());
        assert_eq!(bundle.len(), 17);
    }

    #[test]
    fn cache_toml_is_loaded_hashed_and_checked_with_the_policies() {
        let dir = shipped_copy(&[]);
        let before = PolicyBundle::load(dir.path()).unwrap();
        assert!(
            before.cache().is_empty(),
            "nothing is cached unless declared"
        );
        let path = dir.path().join("cache.toml");
        std::fs::write(&path, "[tools.\"code.search\"]\nttl_secs = 60\n").unwrap();
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        assert_ne!(
            bundle.hash(),
            before.hash(),
            "a change to cache.toml is a reload"
        );
        assert_eq!(bundle.cache().rule("code.search").unwrap().ttl_secs, 60);
        std::fs::write(&path, "\n[tools.\"code.search\"]\nttl_secs = 0\n").unwrap();
        match PolicyBundle::load(dir.path()) {
            Err(LoadError::Invalid {
                path,
                line,
                message,
                ..
            }) => {
                assert!(path.ends_with("cache.toml"), "{path:?}");
                assert_eq!(line, 2, "{message}");
                assert!(message.contains("`ttl_secs` is 0"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn approval_annotation_is_checked_at_load() {
        for (text, expected) in [
            (
                "@id(\"x\")\n@approval(\"maybe\")\npermit (principal, action, resource);\n",
                "the only value is",
            ),
            (
                "@id(\"x\")\n@approval(\"required\")\nforbid (principal, action, resource);\n",
                "only applies to a `permit`",
            ),
        ] {
            let dir = shipped_copy(&[]);
            std::fs::write(dir.path().join("bad.cedar"), text).unwrap();
            match PolicyBundle::load(dir.path()) {
                Err(LoadError::Invalid { path, message, .. }) => {
                    assert!(path.ends_with("bad.cedar"), "{path:?}");
                    assert!(message.contains(expected), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_schema_without_the_guardrail_records_keeps_working() {
        // A policy directory from before the guardrails: the context has no
        // `detectors`, `rate` or `budget`, and no policy reads them.
        let dir = shipped_copy(&["payload.cedar"]);
        let schema_path = dir.path().join("schema.cedarschema");
        let schema = std::fs::read_to_string(&schema_path).unwrap();
        let old: String = schema
            .lines()
            .filter(|l| {
                ![
                    "  detectors: Detectors,",
                    "  rate: Rate,",
                    "  budget: Budget,",
                ]
                .contains(l)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(schema.lines().count() - old.lines().count(), 3);
        std::fs::write(&schema_path, old).unwrap();
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        assert!(!bundle.guard().reads_detectors());
        let verdict = bundle.decide(
            &tool_call("code.search", serde_json::json!({})),
            "tool_call",
        );
        assert!(verdict.allowed, "{verdict:?}");
        assert!(verdict.errors.is_empty(), "{verdict:?}");
    }

    fn with_examples(files: &[&str]) -> tempfile::TempDir {
        let dir = shipped_copy(&[]);
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies");
        for file in files {
            std::fs::copy(examples.join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    fn labelled(labels: &[&str], steps: u64) -> crate::Guards {
        crate::Guards {
            flow: crate::FlowState {
                labels: labels.iter().map(|l| (*l).to_owned()).collect(),
                steps,
                lost: false,
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_exfiltration_example_forbids_external_calls_once_private_and_untrusted() {
        let dir = with_examples(&["flows.toml", "exfiltration.cedar"]);
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        assert!(bundle.guard().reads_workflow() && bundle.guard().reads_flow());
        let flows = bundle.flows();
        let read = tool_call("repo.read_secret", serde_json::json!({"path": "prod.env"}));
        let fetch = tool_call(
            "web.fetch",
            serde_json::json!({"url": "https://example.org"}),
        );
        let post = tool_call(
            "http.post",
            serde_json::json!({"url": "https://example.org"}),
        );
        assert_eq!(
            flows.adds(&read).into_iter().collect::<Vec<_>>(),
            vec!["private"]
        );
        assert_eq!(
            flows.adds(&fetch).into_iter().collect::<Vec<_>>(),
            vec!["untrusted"]
        );
        assert!(flows.adds(&post).is_empty());
        let decide =
            |guards: &crate::Guards| crate::evaluate(&bundle, &post, "tool_call", guards, None);
        let denied = decide(&labelled(&["private", "untrusted"], 2));
        assert!(!denied.verdict.allowed, "{denied:?}");
        assert_eq!(
            denied.verdict.reasons,
            vec!["no-exfiltration-after-untrusted-input"]
        );
        for labels in [&["untrusted"][..], &["private"], &[]] {
            let allowed = decide(&labelled(labels, 2));
            assert!(allowed.verdict.allowed, "{labels:?}: {allowed:?}");
        }
        // A lost record holds every declared label: flow-guarded actions
        // fail closed, others go on.
        let lost = crate::Guards {
            flow: flows.lost(),
            ..Default::default()
        };
        assert!(!decide(&lost).verdict.allowed);
        let search = tool_call("code.search", serde_json::json!({}));
        assert!(
            crate::evaluate(&bundle, &search, "tool_call", &lost, None)
                .verdict
                .allowed
        );
        // The shipped set alone keeps no labels and reads no workflow.
        let plain = PolicyBundle::load(shipped_copy(&[]).path()).unwrap();
        assert!(!plain.guard().reads_flow());
    }

    #[test]
    fn flows_toml_is_hashed_and_refused_with_file_and_line() {
        let dir = with_examples(&["exfiltration.cedar"]);
        let without = PolicyBundle::load(dir.path()).unwrap();
        assert!(without.flows().is_empty());
        assert!(
            without.guard().reads_flow(),
            "the policy reads context.workflow"
        );
        let path = dir.path().join("flows.toml");
        std::fs::write(
            &path,
            "[labels.private]\n[tools.\"repo.read_secret\"]\nlabels = [\"private\"]\n",
        )
        .unwrap();
        let with = PolicyBundle::load(dir.path()).unwrap();
        assert_ne!(
            with.hash(),
            without.hash(),
            "a change to flows.toml is a reload"
        );
        for (text, line, expected) in [
            (
                "[labels.private]\n[tools.\"no.such.tool\"]\nlabels = [\"private\"]\n",
                2,
                "unknown tool `no.such.tool`",
            ),
            (
                "[labels.private]\n\n[tools.\"web.fetch\"]\nlabels = [\"untrusted\"]\n",
                4,
                "unknown label `untrusted`",
            ),
            ("[labels.private]\nwhen = 1\n", 2, "unknown field `when`"),
        ] {
            std::fs::write(&path, text).unwrap();
            match PolicyBundle::load(dir.path()) {
                Err(LoadError::Invalid {
                    path,
                    line: at,
                    message,
                    ..
                }) => {
                    assert!(path.ends_with("flows.toml"), "{path:?}");
                    assert_eq!(at, line, "{message}");
                    assert!(message.contains(expected), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_redact_permit_makes_a_redacted_allow() {
        let dir = with_examples(&["redact.cedar"]);
        let bundle = PolicyBundle::load(dir.path()).unwrap();
        assert!(bundle.guard().redacts());
        let message = |to: &str, data: serde_json::Value| {
            let event = EventBuilderV10::new()
                .id("e1")
                .source("/agents/coder")
                .ty("io.agentmesh.message")
                .extension("target", to)
                .data("application/json", data)
                .build()
                .unwrap();
            let (h, p) = encode_binary(&event);
            MeshEvent::from_message(
                "mesh.ingress.coder.message",
                Some(&h),
                &p,
                Limits::default(),
            )
            .unwrap()
        };
        let guards = |event: &MeshEvent| crate::Guards {
            findings: crate::Detector::shared().scan_event(event),
            ..Default::default()
        };
        let pii = message(
            "reviewer",
            serde_json::json!({"text": "mail bob@example.com"}),
        );
        let e = crate::evaluate(&bundle, &pii, "message", &guards(&pii), None);
        assert!(e.verdict.allowed, "{e:?}");
        assert_eq!(e.redact, vec!["pii"]);
        let clean = message("reviewer", serde_json::json!({"text": "looks good"}));
        let e = crate::evaluate(&bundle, &clean, "message", &guards(&clean), None);
        assert!(e.verdict.allowed && e.redact.is_empty(), "{e:?}");
        let to_planner = message(
            "planner",
            serde_json::json!({"text": "mail bob@example.com"}),
        );
        let e = crate::evaluate(&bundle, &to_planner, "message", &guards(&to_planner), None);
        assert!(e.verdict.allowed && e.redact.is_empty(), "{e:?}");
        for (text, expected) in [
            (
                "@id(\"x\")\n@redact(\"pii\")\nforbid (principal, action, resource);\n",
                "only applies to a `permit`",
            ),
            (
                "@id(\"x\")\n@redact(\"pii.mail\")\npermit (principal, action, resource);\n",
                "unknown class or kind `pii.mail`",
            ),
        ] {
            std::fs::write(dir.path().join("bad.cedar"), text).unwrap();
            match PolicyBundle::load(dir.path()) {
                Err(LoadError::Invalid { path, message, .. }) => {
                    assert!(path.ends_with("bad.cedar"), "{path:?}");
                    assert!(message.contains(expected), "{message}");
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
