//! What a policy set must guarantee: `properties.toml` in the policy
//! directory, the claims `meshctl policy prove` proves of the set with
//! Cedar's symbolic compiler (docs/policies.md). Parsing and checking them
//! against the schema and the registry is here, without a solver.
//!
//! ```toml
//! [[property]]
//! id = "nobody-runs-shell-exec"
//! description = "No agent can call shell.exec."
//! check = "never-allows"
//! scope = 'principal, action == Action::"io.agentmesh.tool.call", resource == Tool::"shell.exec"'
//! when = 'true'          # optional: a Cedar condition on the requests
//! ```
//!
//! `scope` and `when` are the head and condition of a Cedar policy: the
//! requests the property speaks of. A property naming an action, entity
//! type, attribute or registered entity that does not exist is refused with
//! its file and line, like a bad policy: a typo must not make a claim
//! vacuously true.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cedar_policy::{
    Entities, EntityUid, Policy, PolicyId, PolicySet, Schema, ValidationMode, Validator,
};
use miette::Diagnostic;
use serde::Deserialize;
use toml::Spanned;

use crate::policy::{LoadError, line_col};

/// The property file in a policy directory.
pub const PROPERTIES_FILE: &str = "properties.toml";

/// What a property claims of the policy set, over every request the schema
/// allows and every entity store that conforms to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// No policy raises an evaluation error (the worker denies on any
    /// error; Cedar would skip the policy).
    NeverErrors,
    /// The set allows none of the requests in `scope` / `when`.
    NeverAllows,
    /// The set allows every request in `scope` / `when`.
    AlwaysAllows,
}

impl Check {
    /// `never-errors`, `never-allows` or `always-allows`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NeverErrors => "never-errors",
            Self::NeverAllows => "never-allows",
            Self::AlwaysAllows => "always-allows",
        }
    }
}

/// One claim of `properties.toml`, checked against the schema.
#[derive(Debug, Clone)]
pub struct Property {
    /// Its name, unique in the file.
    pub id: String,
    /// What it means, in words.
    pub description: String,
    /// What is claimed.
    pub check: Check,
    /// The requests it speaks of, as one `permit` (`None` for
    /// `never-errors`, which speaks of every request).
    pub requests: Option<PolicySet>,
    /// Its line in the file.
    pub line: usize,
}

/// The file's shape.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    /// The claims, in order.
    #[serde(default)]
    property: Vec<Spanned<Entry>>,
}

/// One `[[property]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Unique name.
    id: Spanned<String>,
    /// In words.
    #[serde(default)]
    description: String,
    /// `never-errors`, `never-allows` or `always-allows`.
    check: Spanned<Check>,
    /// A Cedar policy head: `principal ..., action ..., resource ...`.
    scope: Option<Spanned<String>>,
    /// A Cedar condition (the body of `when { ... }`).
    when: Option<Spanned<String>>,
}

/// The properties of a policy directory, in file order.
#[derive(Debug, Clone, Default)]
pub struct Properties {
    /// The file they came from.
    pub path: PathBuf,
    /// The claims.
    pub properties: Vec<Property>,
}

impl Properties {
    /// Reads `properties.toml` of `dir`; `Ok(None)` when there is none.
    pub fn load(
        dir: &Path,
        schema: &Schema,
        entities: &Entities,
    ) -> Result<Option<Self>, LoadError> {
        let path = dir.join(PROPERTIES_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text, schema, entities).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LoadError::Read { path, source }),
        }
    }

    /// Parses and checks the text of a property file at `path`.
    pub fn parse(
        path: &Path,
        text: &str,
        schema: &Schema,
        entities: &Entities,
    ) -> Result<Self, LoadError> {
        let at = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            LoadError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: File = toml::from_str(text)
            .map_err(|e| at(e.span().map_or(0, |s| s.start), e.message().to_owned()))?;
        let actions: BTreeSet<EntityUid> = schema.actions().cloned().collect();
        let mut seen = BTreeSet::new();
        let mut properties = Vec::new();
        for entry in file.property {
            let start = entry.span().start;
            let entry = entry.into_inner();
            let id = entry.id.get_ref().clone();
            if id.is_empty() || !seen.insert(id.clone()) {
                let why = if id.is_empty() {
                    "a property's `id` is empty".to_owned()
                } else {
                    format!("property id `{id}` is used twice")
                };
                return Err(at(entry.id.span().start, why));
            }
            let check = *entry.check.get_ref();
            let requests = match (check, &entry.scope) {
                (Check::NeverErrors, None) => {
                    if let Some(when) = &entry.when {
                        return Err(at(
                            when.span().start,
                            format!(
                                "property `{id}`: `never-errors` speaks of every request and takes no `when`"
                            ),
                        ));
                    }
                    None
                }
                (Check::NeverErrors, Some(scope)) => {
                    return Err(at(
                        scope.span().start,
                        format!(
                            "property `{id}`: `never-errors` speaks of every request and takes no `scope`"
                        ),
                    ));
                }
                (_, None) => {
                    return Err(at(
                        entry.check.span().start,
                        format!(
                            "property `{id}`: `{}` needs a `scope` (e.g. `scope = 'principal, action == Action::\"io.agentmesh.tool.call\", resource'`)",
                            check.as_str()
                        ),
                    ));
                }
                (_, Some(scope)) => Some(requests(
                    text,
                    &id,
                    scope,
                    entry.when.as_ref(),
                    schema,
                    entities,
                    &actions,
                    &at,
                )?),
            };
            properties.push(Property {
                line: line_col(text, start).0,
                id,
                description: entry.description,
                check,
                requests,
            });
        }
        Ok(Self {
            path: path.to_owned(),
            properties,
        })
    }
}

/// Where a string value's content starts in the file: past its quotes, and
/// past the newline that opens a multi-line string.
fn content_start(text: &str, value: &Spanned<String>) -> usize {
    let start = value.span().start;
    let rest = text.get(start..).unwrap_or("");
    for quote in ["'''", "\"\"\""] {
        if let Some(after) = rest.strip_prefix(quote) {
            let skip = if after.starts_with("\r\n") {
                2
            } else if after.starts_with('\n') {
                1
            } else {
                0
            };
            return start + quote.len() + skip;
        }
    }
    start + 1
}

/// The `permit` a property's `scope` and `when` make, validated against the
/// schema, with every entity it names registered.
#[expect(
    clippy::too_many_arguments,
    reason = "one private step of `parse`, with its context"
)]
fn requests(
    text: &str,
    id: &str,
    scope: &Spanned<String>,
    when: Option<&Spanned<String>>,
    schema: &Schema,
    entities: &Entities,
    actions: &BTreeSet<EntityUid>,
    at: &dyn Fn(usize, String) -> LoadError,
) -> Result<PolicySet, LoadError> {
    // The policy is laid out so that an offset into it maps back to the
    // field it came from: `scope` right after the head's opening, `when`
    // right after the body's.
    const HEAD: &str = "permit (";
    const BODY: &str = ") when { ";
    let scope_text = scope.get_ref();
    let when_text = when.map_or("true", |w| w.get_ref().as_str());
    let source = format!("{HEAD}{scope_text}{BODY}{when_text} }};");
    let when_at = HEAD.len() + scope_text.len() + BODY.len();
    // An offset into `source` as an offset into the file.
    let locate = |offset: usize| -> usize {
        if offset >= when_at {
            match when {
                Some(w) => content_start(text, w) + (offset - when_at).min(when_text.len()),
                None => content_start(text, scope),
            }
        } else {
            content_start(text, scope) + offset.saturating_sub(HEAD.len()).min(scope_text.len())
        }
    };
    let label = |diag: &dyn Diagnostic| {
        diag.labels()
            .and_then(|mut labels| labels.next())
            .map_or(HEAD.len(), |l| l.offset())
    };
    let policy = Policy::parse(Some(PolicyId::new(id)), &source).map_err(|e| {
        at(
            locate(label(&e)),
            format!("property `{id}`: {}", first_line(&e.to_string())),
        )
    })?;
    let mut set = PolicySet::new();
    set.add(policy.clone())
        .map_err(|e| at(content_start(text, scope), format!("property `{id}`: {e}")))?;
    let validation = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if let Some(error) = validation.validation_errors().next() {
        let mut message = format!("property `{id}`: {error}");
        if let Some(help) = error.help() {
            message.push_str(&format!(" (help: {help})"));
        }
        return Err(at(locate(label(error)), message));
    }
    // A claim about no request at all would be proved and say nothing.
    if let Some(warning) = validation
        .validation_warnings()
        .find(|w| matches!(w, cedar_policy::ValidationWarning::ImpossiblePolicy(_)))
    {
        return Err(at(
            content_start(text, scope),
            format!(
                "property `{id}`: its `scope` and `when` match no request the schema allows ({warning})"
            ),
        ));
    }
    for uid in policy.entity_literals() {
        let known = if uid.type_name().basename() == "Action" {
            actions.contains(&uid)
        } else {
            entities.get(&uid).is_some()
        };
        if !known {
            let quoted = format!("\"{}\"", uid.id().unescaped());
            let offset = source.find(&quoted).map_or(HEAD.len(), |o| o);
            let fix = if uid.type_name().basename() == "Action" {
                "an action of schema.cedarschema"
            } else {
                "an entity of entities.json"
            };
            return Err(at(
                locate(offset),
                format!(
                    "property `{id}`: `{uid}` is not {fix} (a claim about it would prove nothing about the registered ones)"
                ),
            ));
        }
    }
    Ok(set)
}

/// The first line of a multi-line parser message.
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> (Schema, Entities) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let schema_text = std::fs::read_to_string(dir.join("schema.cedarschema")).unwrap();
        let schema = Schema::from_cedarschema_str(&schema_text).unwrap().0;
        let entities_text = std::fs::read_to_string(dir.join("entities.json")).unwrap();
        let entities = Entities::from_json_str(&entities_text, Some(&schema)).unwrap();
        (schema, entities)
    }

    fn parse(text: &str) -> Result<Properties, String> {
        let (schema, entities) = shipped();
        Properties::parse(Path::new("p.toml"), text, &schema, &entities).map_err(|e| e.to_string())
    }

    #[test]
    fn the_shipped_file_parses() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let (schema, entities) = shipped();
        let props = Properties::load(&dir, &schema, &entities).unwrap().unwrap();
        let ids: Vec<&str> = props.properties.iter().map(|p| p.id.as_str()).collect();
        assert!(ids.contains(&"never-errors"), "{ids:?}");
        assert!(props.properties.iter().all(|p| p.line > 0));
    }

    #[test]
    fn a_property_of_each_check_parses_with_its_line() {
        let props = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-errors\"\n\n[[property]]\nid = \"b\"\ndescription = \"x\"\ncheck = \"never-allows\"\nscope = '''\nprincipal in Role::\"reviewer\",\naction == Action::\"io.agentmesh.tool.call\",\nresource\n'''\nwhen = 'context.detectors.pii'\n",
        )
        .unwrap();
        assert_eq!(props.properties.len(), 2);
        assert_eq!(props.properties[0].check, Check::NeverErrors);
        assert!(props.properties[0].requests.is_none());
        assert_eq!(props.properties[1].check, Check::NeverAllows);
        assert_eq!(props.properties[1].line, 5);
        assert!(props.properties[1].requests.is_some());
    }

    #[test]
    fn an_unknown_field_is_refused_with_its_line() {
        let e =
            parse("[[property]]\nid = \"a\"\ncheck = \"never-errors\"\nscop = 'x'\n").unwrap_err();
        assert!(e.starts_with("p.toml:4:"), "{e}");
        assert!(e.contains("scop"), "{e}");
    }

    #[test]
    fn an_unknown_check_is_refused_with_its_line() {
        let e = parse("[[property]]\nid = \"a\"\ncheck = \"always-denies\"\n").unwrap_err();
        assert!(e.starts_with("p.toml:3:"), "{e}");
    }

    #[test]
    fn an_unknown_action_is_refused_with_its_line() {
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-allows\"\nscope = '''\nprincipal,\naction == Action::\"io.agentmesh.tool.cal\",\nresource\n'''\n",
        )
        .unwrap_err();
        assert!(e.starts_with("p.toml:6:"), "{e}");
        assert!(e.contains("tool.cal"), "{e}");
    }

    #[test]
    fn an_unknown_attribute_is_refused_with_its_line() {
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-allows\"\nscope = 'principal, action, resource'\nwhen = '''\nprincipal.rank == \"x\"\n'''\n",
        )
        .unwrap_err();
        assert!(e.starts_with("p.toml:6:"), "{e}");
        assert!(e.contains("rank"), "{e}");
    }

    #[test]
    fn an_unregistered_entity_is_refused_with_its_line() {
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-allows\"\nscope = '''\nprincipal,\naction == Action::\"io.agentmesh.tool.call\",\nresource == Tool::\"shel.exec\"\n'''\n",
        )
        .unwrap_err();
        assert!(e.starts_with("p.toml:7:"), "{e}");
        assert!(
            e.contains("shel.exec") && e.contains("entities.json"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_entity_type_is_refused() {
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-allows\"\nscope = 'principal in Team::\"x\", action, resource'\n",
        )
        .unwrap_err();
        assert!(e.starts_with("p.toml:4:"), "{e}");
        assert!(e.contains("Team"), "{e}");
    }

    #[test]
    fn a_scope_that_matches_no_request_is_refused() {
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-allows\"\nscope = 'principal, action == Action::\"io.agentmesh.tool.call\", resource is Agent'\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("p.toml:4:") && e.contains("match no request"),
            "{e}"
        );
    }

    #[test]
    fn a_scope_is_needed_exactly_where_requests_are_spoken_of() {
        let e = parse("[[property]]\nid = \"a\"\ncheck = \"never-allows\"\n").unwrap_err();
        assert!(e.contains("needs a `scope`"), "{e}");
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-errors\"\nscope = 'principal, action, resource'\n",
        )
        .unwrap_err();
        assert!(e.contains("takes no `scope`"), "{e}");
        let e = parse(
            "[[property]]\nid = \"a\"\ncheck = \"never-errors\"\n[[property]]\nid = \"a\"\ncheck = \"never-errors\"\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("p.toml:5:") && e.contains("used twice"),
            "{e}"
        );
    }
}
