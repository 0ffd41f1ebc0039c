//! Workflow labels: `flows.toml` in the policy directory, loaded, hashed
//! and hot-reloaded with the policies (docs/guardrails.md, "Workflow
//! labels").
//!
//! ```toml
//! [labels.private]
//! description = "Read data that must not leave the organisation."
//!
//! [labels.untrusted]
//! description = "Saw content from outside (a web page, an e-mail)."
//!
//! [tools."repo.read_secret"]   # a Tool entity of entities.json
//! labels = ["private"]
//!
//! [events."io.agentmesh.observation"]   # a catalogue type
//! labels = ["untrusted"]
//! ```
//!
//! A workflow (trace) picks up a tool's labels when a call of that tool is
//! allowed, and an event type's labels when an event of that type is
//! allowed: before the call (or event) is delivered, so before any result
//! of it exists. Cedar sees the labels a workflow holds as
//! `context.workflow.labels` and its allowed steps so far as
//! `context.workflow.steps` ([`FlowState`]).

use std::collections::{BTreeMap, BTreeSet};

use schemas::{EventType, MeshEvent};
use serde::Deserialize;
use toml::Spanned;

use crate::fields::Field;

/// The workflow label declaration file in a policy directory.
pub const FLOWS_FILE: &str = "flows.toml";

/// One declared label.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelDecl {
    /// What the label means (for operators; shown by `meshctl policy check`).
    #[serde(default)]
    description: String,
}

/// The labels a tool or event type adds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    labels: Vec<Spanned<String>>,
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    labels: BTreeMap<Spanned<String>, LabelDecl>,
    #[serde(default)]
    tools: BTreeMap<Spanned<String>, Rule>,
    #[serde(default)]
    events: BTreeMap<Spanned<String>, Rule>,
}

/// The workflow labels of a policy set (empty: no labels are kept).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowRules {
    /// Declared labels with their descriptions.
    labels: BTreeMap<String, String>,
    /// Labels by tool (added when a call of the tool is allowed).
    tools: BTreeMap<String, BTreeSet<String>>,
    /// Labels by event type (added when an event of the type is allowed).
    events: BTreeMap<&'static str, BTreeSet<String>>,
}

/// Why `flows.toml` was refused: a byte offset into it and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FlowsError {
    pub(crate) offset: usize,
    pub(crate) message: String,
}

fn valid_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
}

impl FlowRules {
    /// Parses the text of `flows.toml`; `is_tool` says whether a name is a
    /// `Tool` entity of the policy set.
    pub(crate) fn parse(text: &str, is_tool: impl Fn(&str) -> bool) -> Result<Self, FlowsError> {
        let file: File = toml::from_str(text).map_err(|e| FlowsError {
            offset: e.span().map_or(0, |s| s.start),
            message: e.message().to_owned(),
        })?;
        let at = |s: &Spanned<String>| s.span().start;
        let mut rules = Self::default();
        for (name, decl) in file.labels {
            if !valid_label(name.get_ref()) {
                return Err(FlowsError {
                    offset: at(&name),
                    message: format!(
                        "label `{}`: a label is 1 to 64 of a-z, 0-9, `_`, `-`, `.`",
                        name.get_ref()
                    ),
                });
            }
            rules.labels.insert(name.into_inner(), decl.description);
        }
        let declared = |labels: Vec<Spanned<String>>,
                        owner: &str|
         -> Result<BTreeSet<String>, FlowsError> {
            if labels.is_empty() {
                return Err(FlowsError {
                    offset: 0,
                    message: format!("{owner}: `labels` is empty (remove the entry instead)"),
                });
            }
            labels
                .into_iter()
                .map(|label| {
                    if rules.labels.contains_key(label.get_ref()) {
                        Ok(label.into_inner())
                    } else {
                        let known: Vec<&str> = rules.labels.keys().map(String::as_str).collect();
                        Err(FlowsError {
                            offset: at(&label),
                            message: format!(
                                "{owner}: unknown label `{}` (declare it under `[labels.{}]`; declared: {})",
                                label.get_ref(),
                                label.get_ref(),
                                if known.is_empty() { "none".to_owned() } else { known.join(", ") }
                            ),
                        })
                    }
                })
                .collect()
        };
        let mut tools = BTreeMap::new();
        for (tool, rule) in file.tools {
            if !is_tool(tool.get_ref()) {
                return Err(FlowsError {
                    offset: at(&tool),
                    message: format!(
                        "unknown tool `{}`: not a `Tool` entity of entities.json",
                        tool.get_ref()
                    ),
                });
            }
            let offset = at(&tool);
            let labels =
                declared(rule.labels, &format!("tool `{}`", tool.get_ref())).map_err(|e| {
                    FlowsError {
                        offset: if e.offset == 0 { offset } else { e.offset },
                        ..e
                    }
                })?;
            tools.insert(tool.into_inner(), labels);
        }
        let mut events = BTreeMap::new();
        for (ty, rule) in file.events {
            let event_type: EventType =
                ty.get_ref()
                    .parse()
                    .map_err(|e: schemas::UnknownEventType| FlowsError {
                        offset: at(&ty),
                        message: e.to_string(),
                    })?;
            let offset = at(&ty);
            let labels =
                declared(rule.labels, &format!("event type `{}`", ty.get_ref())).map_err(|e| {
                    FlowsError {
                        offset: if e.offset == 0 { offset } else { e.offset },
                        ..e
                    }
                })?;
            events.insert(event_type.as_str(), labels);
        }
        rules.tools = tools;
        rules.events = events;
        Ok(rules)
    }

    /// Whether no label is declared (then the worker keeps no labels).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The declared labels with their descriptions.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> {
        self.labels.iter().map(|(l, d)| (l.as_str(), d.as_str()))
    }

    /// The labels a tool adds.
    pub fn tool(&self, tool: &str) -> Option<&BTreeSet<String>> {
        self.tools.get(tool)
    }

    /// The labels an event type adds.
    pub fn event_type(&self, ty: EventType) -> Option<&BTreeSet<String>> {
        self.events.get(ty.as_str())
    }

    /// The labels `event` adds to its workflow when it is allowed: its
    /// type's, and a tool call's tool's.
    pub fn adds(&self, event: &MeshEvent) -> BTreeSet<String> {
        let mut labels = BTreeSet::new();
        if let Some(of_type) = self.events.get(event.event_type.as_str()) {
            labels.extend(of_type.iter().cloned());
        }
        if let Some(of_tool) = event.tool().and_then(|t| self.tools.get(t)) {
            labels.extend(of_tool.iter().cloned());
        }
        labels
    }

    /// What a decision sees when the workflow's label record was lost (the
    /// KV entry purged or deleted): every declared label, so that a policy
    /// that forbids on labels fails closed.
    pub fn lost(&self) -> FlowState {
        FlowState {
            labels: self.labels.keys().cloned().collect(),
            steps: 0,
            lost: true,
        }
    }
}

/// What a decision knows of its workflow: `context.workflow`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlowState {
    /// The labels the workflow holds before this event.
    pub labels: BTreeSet<String>,
    /// The workflow's allowed steps before this event.
    pub steps: u64,
    /// Whether the record was lost (then `labels` is every declared
    /// label: fail closed).
    pub lost: bool,
}

impl FlowState {
    /// The `context.workflow` record.
    pub(crate) fn fields(&self) -> Vec<(&'static str, Field)> {
        vec![
            (
                "labels",
                Field::Strings(self.labels.iter().cloned().collect()),
            ),
            ("steps", Field::count(self.steps)),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"
[labels.private]
description = "Read data that must not leave."

[labels.untrusted]

[tools."repo.read_secret"]
labels = ["private"]

[tools."web.fetch"]
labels = ["untrusted"]

[events."io.agentmesh.observation"]
labels = ["untrusted"]
"#;

    fn tools(name: &str) -> bool {
        ["repo.read_secret", "web.fetch", "http.post"].contains(&name)
    }

    fn line_of(text: &str, offset: usize) -> usize {
        text[..offset].matches('\n').count() + 1
    }

    #[test]
    fn labels_by_tool_and_event_type() {
        let rules = FlowRules::parse(TEXT, tools).unwrap();
        assert_eq!(
            rules.labels().collect::<Vec<_>>(),
            vec![
                ("private", "Read data that must not leave."),
                ("untrusted", "")
            ]
        );
        assert_eq!(
            rules.tool("repo.read_secret").unwrap(),
            &BTreeSet::from(["private".to_owned()])
        );
        assert_eq!(rules.tool("http.post"), None);
        assert_eq!(
            rules.event_type(EventType::Observation).unwrap(),
            &BTreeSet::from(["untrusted".to_owned()])
        );
        let lost = rules.lost();
        assert!(lost.lost);
        assert_eq!(lost.labels.len(), 2);
        assert!(FlowRules::parse("", tools).unwrap().is_empty());
    }

    #[test]
    fn mistakes_are_refused_with_their_line() {
        for (text, line, expected) in [
            (
                "[labels.private]\n\n[tools.\"repo.read_secret\"]\nlabels = [\"secret\"]\n",
                4,
                "unknown label `secret`",
            ),
            (
                "[labels.private]\n[tools.\"nope.tool\"]\nlabels = [\"private\"]\n",
                2,
                "unknown tool `nope.tool`",
            ),
            (
                "[labels.private]\n[events.\"io.agentmesh.bogus\"]\nlabels = [\"private\"]\n",
                2,
                "not in the catalogue",
            ),
            (
                "[labels.private]\ncolour = \"red\"\n",
                2,
                "unknown field `colour`",
            ),
            ("[labels.Private]\n", 1, "a label is 1 to 64"),
            (
                "[labels.private]\n[tools.\"web.fetch\"]\nlabels = []\n",
                2,
                "`labels` is empty",
            ),
            ("[label.private]\n", 1, "unknown field `label`"),
        ] {
            let error = FlowRules::parse(text, tools).unwrap_err();
            assert!(error.message.contains(expected), "{text}: {error:?}");
            assert_eq!(line_of(text, error.offset), line, "{text}: {error:?}");
        }
    }
}
