//! A `tool.call`'s arguments checked against the input schema its tool's
//! agent lists in its card (`mesh-agents`, `tools[].inputSchema`): the
//! card's schemas compiled once ([`CardSchemas::compile`]), then each
//! call's data checked against its tool's ([`CardSchemas::check`]), which
//! names the first violations.
//!
//! Only what the card says is checked: a tool the card does not list, or
//! lists without `inputSchema`, takes any data. A schema that does not
//! compile fails every call of its tool (the card is broken, and the
//! error says so) rather than letting anything through. Nothing is fetched:
//! a `$ref` outside the schema does not resolve and so does not compile.

use std::collections::HashMap;

use schemas::{Data, MeshEvent};
use serde_json::Value;

/// The reason (`reasons`) of a receipt whose call broke its tool's schema.
pub const INPUT_SCHEMA: &str = "input-schema";

/// At most this many violations are named per call.
pub const MAX_VIOLATIONS: usize = 5;

/// Longest message kept per violation, in bytes (the rest is cut, with `…`).
const MAX_MESSAGE: usize = 300;

/// The compiled input schemas of one agent card, by tool name.
#[derive(Debug, Default)]
pub struct CardSchemas {
    tools: HashMap<String, Compiled>,
}

#[derive(Debug)]
enum Compiled {
    Valid(Box<jsonschema::Validator>),
    /// The schema does not compile: why.
    Broken(String),
}

/// Why a card's JSON could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("the agent card is not a JSON object with a `tools` array: {0}")]
pub struct CardError(String);

impl CardSchemas {
    /// Compiles the input schemas of a card (the JSON stored in
    /// `mesh-agents`). Tools without `inputSchema` are left out: they take
    /// any data.
    pub fn compile(card: &[u8]) -> Result<Self, CardError> {
        let card: Value = serde_json::from_slice(card).map_err(|e| CardError(e.to_string()))?;
        let tools = match card.get("tools") {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Array(tools)) => tools,
            Some(_) => return Err(CardError("`tools` is not an array".to_owned())),
        };
        let mut compiled = HashMap::new();
        for tool in tools {
            let (Some(name), Some(schema)) = (
                tool.get("name").and_then(Value::as_str),
                tool.get("inputSchema"),
            ) else {
                continue;
            };
            let entry = match jsonschema::validator_for(schema) {
                Ok(validator) => Compiled::Valid(Box::new(validator)),
                Err(e) => Compiled::Broken(cut(&e.to_string())),
            };
            compiled.insert(name.to_owned(), entry);
        }
        Ok(Self { tools: compiled })
    }

    /// Whether the card gives `tool` an input schema.
    pub fn has_schema(&self, tool: &str) -> bool {
        self.tools.contains_key(tool)
    }

    /// How many of the card's tools have an input schema.
    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Whether no tool of the card has an input schema.
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// Checks `arguments` (`None`: the call carried no data, checked as
    /// JSON `null`) against `tool`'s schema: `Err` with the first
    /// [`MAX_VIOLATIONS`] violations, each naming where in the arguments
    /// (a JSON pointer) and what is wrong. The arguments' values are not
    /// repeated in the messages.
    pub fn check(&self, tool: &str, arguments: Option<&Value>) -> Result<(), Vec<String>> {
        let Some(compiled) = self.tools.get(tool) else {
            return Ok(());
        };
        let validator = match compiled {
            Compiled::Valid(validator) => validator,
            Compiled::Broken(why) => {
                return Err(vec![format!(
                    "the input schema of `{tool}` in its agent's card does not compile ({why}); the agent must register a card with a valid JSON Schema"
                )]);
            }
        };
        let null = Value::Null;
        let arguments = arguments.unwrap_or(&null);
        let violations: Vec<String> = validator
            .iter_errors(arguments)
            .take(MAX_VIOLATIONS)
            .map(|e| {
                let at = e.instance_path().as_str();
                let at = if at.is_empty() { "/" } else { at };
                cut(&format!(
                    "arguments of `{tool}` at `{at}`: {} (input schema)",
                    e.masked()
                ))
            })
            .collect();
        if violations.is_empty() {
            Ok(())
        } else {
            Err(violations)
        }
    }

    /// Checks a `tool.call` event's arguments against its tool's schema:
    /// the data's `arguments` member when the data is an object that has
    /// one (the SDKs' `{"tool", "arguments"}`), else the whole data (a
    /// caller that sends the arguments bare), as the SDKs hand them to the
    /// tool's handler. Data that is not JSON breaks any schema.
    pub fn check_event(&self, event: &MeshEvent) -> Result<(), Vec<String>> {
        let Some(tool) = event.tool() else {
            return Ok(());
        };
        if !self.has_schema(tool) {
            return Ok(());
        }
        let parsed;
        let data = match event.event.data() {
            None => None,
            Some(Data::Json(value)) => Some(value),
            Some(Data::Binary(bytes)) => {
                parsed = parse(tool, bytes)?;
                parsed.as_ref()
            }
            Some(Data::String(text)) => {
                parsed = parse(tool, text.as_bytes())?;
                parsed.as_ref()
            }
        };
        self.check(tool, data.map(arguments))
    }
}

/// The agent whose card's input schemas govern `event`'s arguments: a
/// `tool.call`'s target (the agent serving the tool). `None` for any other
/// event and for a call without a target: nothing is checked.
pub fn card_agent(event: &MeshEvent) -> Option<&str> {
    event.tool()?;
    event.target.as_ref().map(|target| target.as_str())
}

/// The compiled cards of many agents, by agent id: a snapshot of
/// `mesh-agents`, with which [`crate::Replayer`] checks tool calls as the
/// worker does (the worker keeps its own, following the bucket).
#[derive(Debug, Default)]
pub struct AgentCards {
    cards: HashMap<String, CardSchemas>,
    unreadable: usize,
}

impl AgentCards {
    /// No cards: every call passes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `agent`'s card (the JSON stored under its key in
    /// `mesh-agents`). A card that does not parse checks nothing, as in
    /// the worker: `Err` says why, and it is counted
    /// ([`AgentCards::unreadable`]).
    pub fn insert(&mut self, agent: &str, card: &[u8]) -> Result<(), CardError> {
        match CardSchemas::compile(card) {
            Ok(schemas) => {
                self.cards.insert(agent.to_owned(), schemas);
                Ok(())
            }
            Err(e) => {
                self.cards.remove(agent);
                self.unreadable += 1;
                Err(e)
            }
        }
    }

    /// How many cards were read (those that parse).
    pub fn len(&self) -> usize {
        self.cards.len()
    }

    /// Whether no card was read.
    pub fn is_empty(&self) -> bool {
        self.cards.is_empty()
    }

    /// How many tools, over every card, have an input schema.
    pub fn tools_with_schema(&self) -> usize {
        self.cards.values().map(CardSchemas::len).sum()
    }

    /// How many cards did not parse (and so check nothing).
    pub fn unreadable(&self) -> usize {
        self.unreadable
    }

    /// Checks a `tool.call`'s arguments against the input schema its
    /// target's card ([`card_agent`]) gives the tool, as the worker does:
    /// `Err` with the first violations. Anything else, and a call whose
    /// target has no card here, passes.
    pub fn check(&self, event: &MeshEvent) -> Result<(), Vec<String>> {
        match card_agent(event).and_then(|agent| self.cards.get(agent)) {
            Some(schemas) => schemas.check_event(event),
            None => Ok(()),
        }
    }
}

/// The arguments in a tool call's data: its `arguments` member when it is an
/// object with one, else the whole data.
pub(crate) fn arguments(data: &Value) -> &Value {
    match data {
        Value::Object(map) => map.get("arguments").unwrap_or(data),
        _ => data,
    }
}

/// Data bytes as JSON (`None` when empty).
fn parse(tool: &str, bytes: &[u8]) -> Result<Option<Value>, Vec<String>> {
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        vec![cut(&format!(
            "arguments of `{tool}` are not JSON ({e}), but its agent's card gives it an input schema"
        ))]
    })
}

/// `text` cut to [`MAX_MESSAGE`] bytes on a character boundary.
fn cut(text: &str) -> String {
    if text.len() <= MAX_MESSAGE {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn card(tools: Value) -> CardSchemas {
        CardSchemas::compile(&serde_json::to_vec(&json!({"name": "a", "tools": tools})).unwrap())
            .unwrap()
    }

    fn repo() -> CardSchemas {
        card(json!([
            {"name": "repo.read", "inputSchema": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "lines": {"type": "integer", "minimum": 1}},
                "required": ["path"],
                "additionalProperties": false
            }},
            {"name": "free"}
        ]))
    }

    #[test]
    fn good_arguments_pass() {
        let schemas = repo();
        assert_eq!(schemas.len(), 1);
        assert!(
            schemas
                .check("repo.read", Some(&json!({"path": "a.rs", "lines": 3})))
                .is_ok()
        );
    }

    #[test]
    fn violations_name_where_and_what_without_the_value() {
        let schemas = repo();
        let secret = "s3cr3t-value";
        let errors = schemas
            .check("repo.read", Some(&json!({"lines": secret})))
            .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let all = errors.join("\n");
        assert!(all.contains("`/lines`"), "{all}");
        assert!(
            all.contains("\"path\""),
            "names the missing property: {all}"
        );
        assert!(all.contains("integer"), "{all}");
        assert!(!all.contains(secret), "the value is not repeated: {all}");
        let none = schemas.check("repo.read", None).unwrap_err();
        assert!(none[0].contains("at `/`"), "{none:?}");
    }

    #[test]
    fn at_most_the_first_violations() {
        let properties: serde_json::Map<String, Value> = (0..20)
            .map(|i| (format!("p{i}"), json!({"type": "string"})))
            .collect();
        let schemas = card(
            json!([{"name": "t", "inputSchema": {"type": "object", "properties": properties}}]),
        );
        let arguments: serde_json::Map<String, Value> =
            (0..20).map(|i| (format!("p{i}"), json!(i))).collect();
        let errors = schemas
            .check("t", Some(&Value::Object(arguments)))
            .unwrap_err();
        assert_eq!(errors.len(), MAX_VIOLATIONS);
    }

    #[test]
    fn tools_without_a_schema_take_anything() {
        let schemas = repo();
        assert!(!schemas.has_schema("free"));
        assert!(schemas.check("free", Some(&json!("anything"))).is_ok());
        assert!(schemas.check("unlisted", Some(&json!(1))).is_ok());
        let bare = CardSchemas::compile(br#"{"name": "a"}"#).unwrap();
        assert!(bare.is_empty());
        assert!(CardSchemas::compile(b"not json").is_err());
        assert!(CardSchemas::compile(br#"{"tools": 3}"#).is_err());
    }

    #[test]
    fn a_broken_schema_fails_its_calls_and_says_so() {
        let schemas = card(json!([
            {"name": "t", "inputSchema": {"type": "no-such-type"}},
            {"name": "remote", "inputSchema": {"$ref": "https://example.com/schema.json"}}
        ]));
        let errors = schemas.check("t", Some(&json!({}))).unwrap_err();
        assert!(errors[0].contains("does not compile"), "{errors:?}");
        let errors = schemas.check("remote", Some(&json!({}))).unwrap_err();
        assert!(
            errors[0].contains("does not compile"),
            "nothing is fetched: {errors:?}"
        );
    }

    #[test]
    fn the_arguments_are_the_sdk_member_or_the_whole_data() {
        let sdk = json!({"tool": "t", "arguments": {"path": "a"}});
        assert_eq!(arguments(&sdk), &json!({"path": "a"}));
        let bare = json!({"path": "b"});
        assert_eq!(arguments(&bare), &bare);
        assert_eq!(arguments(&json!("x")), &json!("x"));
    }

    #[test]
    fn long_messages_are_cut() {
        let long = "é".repeat(400);
        let cut = cut(&long);
        assert!(cut.len() <= MAX_MESSAGE + "…".len());
        assert!(cut.ends_with('…'));
    }
}
