//! Redaction as a verdict: a permit annotated `@redact("pii secret.jwt")`
//! makes its allow an "allow, redacted" — the worker delivers a copy of the
//! event whose detector spans of those classes or kinds are replaced with
//! `[REDACTED:<kind>]` (docs/guardrails.md, "Redaction").
//!
//! JSON data is parsed and each string (and key, and number) is redacted
//! on its own, so the copy stays JSON; any other data is redacted as text
//! (or bytes). A structured-mode message has its `data` member redacted
//! (or the bytes of `data_base64`) redacted and the envelope re-serialised.
//! A payload that cannot be redacted is an error, which the worker treats
//! as a denial (fail closed).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::detect::{Detector, KINDS};

/// The classes `@redact` may name besides single kinds.
const CLASSES: [&str; 3] = ["pii", "secret", "injection"];

/// The classes and kinds of an `@redact` value (space- or comma-separated).
pub(crate) fn parse_classes(value: &str) -> Result<Vec<String>, String> {
    let items: Vec<&str> = value
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .collect();
    if items.is_empty() {
        return Err(
            "`@redact(\"\")` names nothing: name classes (`pii`, `secret`, `injection`) or kinds (`pii.email`)".into(),
        );
    }
    items
        .into_iter()
        .map(|item| {
            if CLASSES.contains(&item) || KINDS.contains(&item) {
                Ok(item.to_owned())
            } else {
                Err(format!(
                    "`@redact`: unknown class or kind `{item}` (classes: {}; kinds: docs/guardrails.md)",
                    CLASSES.join(", ")
                ))
            }
        })
        .collect()
}

/// Whether `classes` (from `@redact`) covers the finding `kind`.
pub fn covers(classes: &[String], kind: &str) -> bool {
    classes.iter().any(|c| {
        kind == c
            || kind
                .strip_prefix(c.as_str())
                .is_some_and(|rest| rest.starts_with('.'))
    })
}

/// The replacement of a span of `kind`.
pub fn replacement(kind: &str) -> String {
    format!("[REDACTED:{kind}]")
}

/// A redacted copy and what was replaced in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redacted {
    /// The message payload to deliver.
    pub payload: Vec<u8>,
    /// The kinds replaced, sorted (empty: nothing matched; the payload is
    /// the original).
    pub kinds: BTreeSet<&'static str>,
}

/// Why a payload could not be redacted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot redact the event: {0}")]
pub struct RedactError(String);

impl Detector {
    /// `text` with the spans of `classes` replaced, and the kinds replaced.
    /// Overlapping spans are merged and named by the first.
    pub fn redact_bytes(
        &self,
        text: &[u8],
        classes: &[String],
        kinds: &mut BTreeSet<&'static str>,
    ) -> Option<Vec<u8>> {
        let spans: Vec<_> = self
            .spans(text)
            .into_iter()
            .filter(|(_, kind)| covers(classes, kind))
            .collect();
        if spans.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len());
        let mut at = 0;
        for (range, kind) in spans {
            if range.end <= at {
                continue;
            }
            if range.start >= at {
                out.extend_from_slice(&text[at..range.start]);
                out.extend_from_slice(replacement(kind).as_bytes());
                kinds.insert(kind);
            }
            // An overlapping span extends the one already replaced.
            at = range.end;
        }
        out.extend_from_slice(&text[at..]);
        Some(out)
    }

    fn redact_string(
        &self,
        text: &str,
        classes: &[String],
        kinds: &mut BTreeSet<&'static str>,
    ) -> Option<String> {
        self.redact_bytes(text.as_bytes(), classes, kinds)
            // Spans are ASCII-only matches, so cutting there keeps UTF-8.
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Redacts every string, key and number of `value` in place.
    pub fn redact_json(
        &self,
        value: &mut Value,
        classes: &[String],
        kinds: &mut BTreeSet<&'static str>,
    ) {
        match value {
            Value::String(s) => {
                if let Some(r) = self.redact_string(s, classes, kinds) {
                    *s = r;
                }
            }
            Value::Number(n) => {
                if let Some(r) = self.redact_string(&n.to_string(), classes, kinds) {
                    *value = Value::String(r);
                }
            }
            Value::Array(items) => items
                .iter_mut()
                .for_each(|v| self.redact_json(v, classes, kinds)),
            Value::Object(map) => {
                let old = std::mem::take(map);
                for (key, mut v) in old {
                    self.redact_json(&mut v, classes, kinds);
                    let key = self.redact_string(&key, classes, kinds).unwrap_or(key);
                    map.insert(key, v);
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }

    /// Redacts an event's data as carried in a binary-mode payload: JSON
    /// (when it parses as JSON) value by value, else as text or bytes.
    pub fn redact_data(&self, data: &[u8], classes: &[String]) -> Redacted {
        let mut kinds = BTreeSet::new();
        let json = matches!(
            data.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[' | b'"')
        );
        if json && let Ok(mut value) = serde_json::from_slice::<Value>(data) {
            self.redact_json(&mut value, classes, &mut kinds);
            if !kinds.is_empty() {
                // INVARIANT: a parsed JSON value serialises.
                let payload = serde_json::to_vec(&value).unwrap_or_else(|_| data.to_vec());
                return Redacted { payload, kinds };
            }
            return Redacted {
                payload: data.to_vec(),
                kinds,
            };
        }
        let payload = self
            .redact_bytes(data, classes, &mut kinds)
            .unwrap_or_else(|| data.to_vec());
        Redacted { payload, kinds }
    }

    /// Redacts a mesh message's payload: the data itself in binary mode,
    /// the envelope's `data` member in structured mode.
    pub fn redact_message(
        &self,
        payload: &[u8],
        structured: bool,
        classes: &[String],
    ) -> Result<Redacted, RedactError> {
        if !structured {
            return Ok(self.redact_data(payload, classes));
        }
        let mut envelope: Value = serde_json::from_slice(payload)
            .map_err(|e| RedactError(format!("the structured envelope is not JSON: {e}")))?;
        let Some(map) = envelope.as_object_mut() else {
            return Err(RedactError(
                "the structured envelope is not an object".into(),
            ));
        };
        if let Some(encoded) = map.get("data_base64") {
            use base64::Engine as _;
            let engine = base64::engine::general_purpose::STANDARD;
            let bytes = encoded
                .as_str()
                .and_then(|e| engine.decode(e).ok())
                .ok_or_else(|| RedactError("`data_base64` is not standard base64".into()))?;
            let mut kinds = BTreeSet::new();
            let Some(redacted) = self.redact_bytes(&bytes, classes, &mut kinds) else {
                return Ok(Redacted {
                    payload: payload.to_vec(),
                    kinds,
                });
            };
            map.insert("data_base64".into(), Value::String(engine.encode(redacted)));
            let payload = serde_json::to_vec(&envelope)
                .map_err(|e| RedactError(format!("the redacted envelope: {e}")))?;
            return Ok(Redacted { payload, kinds });
        }
        let mut kinds = BTreeSet::new();
        if let Some(data) = map.get_mut("data") {
            self.redact_json(data, classes, &mut kinds);
        }
        if kinds.is_empty() {
            return Ok(Redacted {
                payload: payload.to_vec(),
                kinds,
            });
        }
        let payload = serde_json::to_vec(&envelope)
            .map_err(|e| RedactError(format!("the redacted envelope: {e}")))?;
        Ok(Redacted { payload, kinds })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classes(s: &str) -> Vec<String> {
        parse_classes(s).unwrap()
    }

    #[test]
    fn classes_and_kinds_are_checked() {
        assert_eq!(classes("pii, secret.jwt"), vec!["pii", "secret.jwt"]);
        assert!(parse_classes("").unwrap_err().contains("names nothing"));
        assert!(
            parse_classes("pii.emails")
                .unwrap_err()
                .contains("unknown class or kind `pii.emails`")
        );
        assert!(covers(&classes("pii"), "pii.email"));
        assert!(covers(&classes("pii.email"), "pii.email"));
        assert!(!covers(&classes("pii.email"), "pii.phone"));
        assert!(!covers(&classes("secret"), "pii.email"));
    }

    #[test]
    fn plain_text_spans_are_replaced() {
        let d = Detector::shared();
        let text = b"Mail alice@example.com or call +44 20 7946 0958; key AKIAIOSFODNN7EXAMPLE.";
        let r = d.redact_data(text, &classes("pii"));
        assert_eq!(
            String::from_utf8(r.payload).unwrap(),
            "Mail [REDACTED:pii.email] or call [REDACTED:pii.phone]; key AKIAIOSFODNN7EXAMPLE."
        );
        assert_eq!(
            r.kinds.into_iter().collect::<Vec<_>>(),
            vec!["pii.email", "pii.phone"]
        );
        let r = d.redact_data(text, &classes("secret pii.email"));
        assert_eq!(
            String::from_utf8(r.payload).unwrap(),
            "Mail [REDACTED:pii.email] or call +44 20 7946 0958; key [REDACTED:secret.aws_access_key]."
        );
        let clean = d.redact_data(b"nothing here", &classes("pii secret"));
        assert_eq!(clean.payload, b"nothing here");
        assert!(clean.kinds.is_empty());
    }

    #[test]
    fn json_stays_json_and_keeps_its_structure() {
        let d = Detector::shared();
        let data = serde_json::json!({
            "to": "bob@example.com",
            "body": "card 4111 1111 1111 1111, thanks",
            "n": 4111111111111111u64,
            "nested": [{"cc": "alice@example.org"}, 7],
            "ok": true
        });
        let r = d.redact_data(&serde_json::to_vec(&data).unwrap(), &classes("pii"));
        let out: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(
            out,
            serde_json::json!({
                "to": "[REDACTED:pii.email]",
                "body": "card [REDACTED:pii.credit_card], thanks",
                "n": "[REDACTED:pii.credit_card]",
                "nested": [{"cc": "[REDACTED:pii.email]"}, 7],
                "ok": true
            })
        );
        // Escapes cannot hide an address from redaction.
        let escaped = br#"{"to": "carol\u0040example.com"}"#;
        let r = d.redact_data(escaped, &classes("pii.email"));
        assert_eq!(r.payload, br#"{"to":"[REDACTED:pii.email]"}"#);
    }

    #[test]
    fn structured_envelopes_have_their_data_redacted() {
        let d = Detector::shared();
        let envelope = serde_json::json!({
            "specversion": "1.0", "id": "e1", "source": "/agents/coder",
            "type": "io.agentmesh.message", "datacontenttype": "application/json",
            "data": {"note": "reach me at dave@example.com"}
        });
        let r = d
            .redact_message(
                &serde_json::to_vec(&envelope).unwrap(),
                true,
                &classes("pii"),
            )
            .unwrap();
        let out: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(out["data"]["note"], "reach me at [REDACTED:pii.email]");
        assert_eq!(out["id"], "e1");
        let text = serde_json::json!({"specversion": "1.0", "data": "dave@example.com"});
        let r = d
            .redact_message(&serde_json::to_vec(&text).unwrap(), true, &classes("pii"))
            .unwrap();
        let out: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(out["data"], "[REDACTED:pii.email]");
        assert!(
            d.redact_message(b"not json", true, &classes("pii"))
                .is_err()
        );
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let binary = serde_json::json!({"specversion": "1.0", "data_base64": b64.encode("to eve@example.com")});
        let r = d
            .redact_message(&serde_json::to_vec(&binary).unwrap(), true, &classes("pii"))
            .unwrap();
        let out: Value = serde_json::from_slice(&r.payload).unwrap();
        let decoded = b64.decode(out["data_base64"].as_str().unwrap()).unwrap();
        assert_eq!(decoded, b"to [REDACTED:pii.email]");
    }
}
