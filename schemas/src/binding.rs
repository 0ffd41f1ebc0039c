//! The CloudEvents NATS protocol binding, both content modes.
//!
//! Binary mode: every attribute is a `ce-<name>` header whose value is
//! percent-encoded as the binding specifies (space, `"`, `%` and everything
//! outside printable ASCII); the payload is `data`. Structured mode: header
//! `Content-Type: application/cloudevents+json` and the JSON event format as
//! payload. The receiver tells them apart by that `Content-Type`.

use std::borrow::Cow;

use async_nats::HeaderMap;
use bytes::Bytes;
use cloudevents::event::{SpecVersion, UriReference};
use cloudevents::{AttributesReader, Data, Event, EventBuilder, EventBuilderV10};

/// The `Content-Type` of a structured-mode event.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";

/// How an event was (or is to be) carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentMode {
    /// Attributes in `ce-*` headers, data as the payload.
    Binary,
    /// The JSON event format as the payload.
    Structured,
}

impl ContentMode {
    /// `binary` or `structured`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Binary => "binary",
            Self::Structured => "structured",
        }
    }
}

/// Why a NATS message is not a CloudEvent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BindingError {
    /// No `ce-specversion` header and no structured `Content-Type`.
    #[error(
        "not a CloudEvent: no `ce-specversion` header (binary mode) and no `Content-Type: application/cloudevents+json` (structured mode)"
    )]
    NotACloudEvent,
    /// A specversion other than 1.0.
    #[error("unsupported specversion `{0}`: agentmesh accepts `1.0`")]
    UnsupportedSpecVersion(String),
    /// A required attribute is absent.
    #[error("required attribute `{0}` is missing")]
    MissingAttribute(&'static str),
    /// A header value that does not decode.
    #[error("header `{name}` is malformed: {reason}")]
    MalformedHeader {
        /// The header name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The same `ce-*` header given twice.
    #[error("header `{0}` appears more than once")]
    DuplicateHeader(String),
    /// An attribute value the CloudEvents type system rejects.
    #[error("attribute is invalid: {0}")]
    InvalidAttribute(String),
    /// A structured-mode payload that is not the JSON event format.
    #[error("structured payload is not a CloudEvents JSON event: {0}")]
    Structured(String),
}

/// Percent-encodes a header value as the NATS binding specifies: space,
/// double-quote, percent and every byte outside U+0021..U+007E become `%XY`
/// (upper-case hex) of the UTF-8 bytes.
pub fn percent_encode_header(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[(b >> 4) as usize] as char);
            out.push(HEX[(b & 0xf) as usize] as char);
        }
    }
    out
}

/// Decodes a header value as the NATS binding specifies: first undo an
/// RFC 7230 quoted string (with backslash escapes), then one round of
/// percent-decoding (either hex case). Byte sequences that are not valid
/// UTF-8 (overlong encodings included) are rejected.
pub fn percent_decode_header(name: &str, value: &str) -> Result<String, BindingError> {
    let malformed = |reason: &str| BindingError::MalformedHeader {
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let trimmed = trim_ows(value);
    let unquoted;
    let value = if trimmed.len() >= 2 && trimmed.starts_with('"') && trimmed.ends_with('"') {
        let inner = &trimmed[1..trimmed.len() - 1];
        let mut s = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => s.push(
                    chars
                        .next()
                        .ok_or_else(|| malformed("quoted string ends in a lone backslash"))?,
                ),
                '"' => return Err(malformed("unescaped double-quote inside a quoted string")),
                c => s.push(c),
            }
        }
        unquoted = s;
        unquoted.as_str()
    } else {
        trimmed
    };
    if !value.contains('%') {
        return Ok(value.to_owned());
    }
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| malformed("`%` is not followed by two hex digits"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| malformed("percent-decoded bytes are not valid UTF-8"))
}

/// `value` without the spaces and tabs around it (RFC 7230 OWS), by bytes:
/// both are ASCII, so the cuts fall on character boundaries.
fn trim_ows(value: &str) -> &str {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let bytes = value.as_bytes();
    let start = bytes.iter().position(|b| !ows(b)).unwrap_or(bytes.len());
    let end = bytes.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    value.get(start..end).unwrap_or_default()
}

pub(crate) fn is_structured(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| {
        h.iter().any(|(name, values)| {
            let name: &str = name.as_ref();
            name.eq_ignore_ascii_case("content-type")
                && values.iter().any(|v| {
                    v.as_str()
                        .get(..23)
                        .is_some_and(|p| p.eq_ignore_ascii_case("application/cloudevents"))
                })
        })
    })
}

/// Decodes a NATS message (headers and payload) into a CloudEvent, in
/// whichever mode it was sent.
pub fn decode(
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<(Event, ContentMode), BindingError> {
    if is_structured(headers) {
        return decode_structured(payload).map(|e| (e, ContentMode::Structured));
    }
    let headers = headers.ok_or(BindingError::NotACloudEvent)?;
    decode_binary(headers, payload).map(|e| (e, ContentMode::Binary))
}

fn decode_structured(payload: &[u8]) -> Result<Event, BindingError> {
    // Look at specversion first so a 0.3 event gets the precise error rather
    // than whatever the 0.3 schema would say about its other fields.
    #[derive(serde::Deserialize)]
    struct Version {
        specversion: Option<serde_json::Value>,
    }
    let version: Version =
        serde_json::from_slice(payload).map_err(|e| BindingError::Structured(e.to_string()))?;
    match version.specversion {
        None => return Err(BindingError::MissingAttribute("specversion")),
        Some(serde_json::Value::String(v)) if v == "1.0" => {}
        Some(other) => {
            let v = other
                .as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| other.to_string());
            return Err(BindingError::UnsupportedSpecVersion(v));
        }
    }
    let event: Event =
        serde_json::from_slice(payload).map_err(|e| BindingError::Structured(e.to_string()))?;
    if event.specversion() != SpecVersion::V10 {
        return Err(BindingError::UnsupportedSpecVersion(
            event.specversion().to_string(),
        ));
    }
    Ok(event)
}

fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `name` in ASCII lowercase, borrowed when it is already.
fn lowercase(name: &str) -> Cow<'_, str> {
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

fn decode_binary(headers: &HeaderMap, payload: &[u8]) -> Result<Event, BindingError> {
    let mut specversion = None;
    let mut builder = EventBuilderV10::new();
    let (mut id, mut source, mut ty) = (None, None, None);
    let (mut datacontenttype, mut dataschema) = (None, None);
    // Attribute names as lowercase, borrowed from the header name when it
    // is lowercase already (as agents send them): no copy per header.
    let mut seen: Vec<Cow<'_, str>> = Vec::with_capacity(12);
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        let Some(prefix) = name.get(..3) else {
            continue;
        };
        if !prefix.eq_ignore_ascii_case("ce-") {
            continue;
        }
        let attr = lowercase(&name[3..]);
        if values.len() != 1 || seen.contains(&attr) {
            return Err(BindingError::DuplicateHeader(format!("ce-{attr}")));
        }
        let raw = values.first().map(|v| v.as_str()).unwrap_or_default();
        let value = percent_decode_header(name, raw)?;
        match attr.as_ref() {
            "specversion" => specversion = Some(value),
            "id" => id = Some(value),
            "source" => source = Some(value),
            "type" => ty = Some(value),
            "datacontenttype" => datacontenttype = Some(value),
            "dataschema" => dataschema = Some(value),
            "subject" => builder = builder.subject(value),
            "time" => builder = builder.time(value),
            "data" | "data_base64" => {
                return Err(BindingError::MalformedHeader {
                    name: name.to_owned(),
                    reason: "data travels as the payload in binary mode, not as a header".into(),
                });
            }
            ext if is_extension_name(ext) => builder = builder.extension(ext, value),
            _ => {
                return Err(BindingError::MalformedHeader {
                    name: name.to_owned(),
                    reason: "attribute names are lowercase letters and digits only".into(),
                });
            }
        }
        seen.push(attr);
    }
    match specversion.as_deref() {
        None => return Err(BindingError::NotACloudEvent),
        Some("1.0") => {}
        Some(other) => return Err(BindingError::UnsupportedSpecVersion(other.to_owned())),
    }
    builder = builder
        .id(id.ok_or(BindingError::MissingAttribute("id"))?)
        .source(source.ok_or(BindingError::MissingAttribute("source"))?)
        .ty(ty.ok_or(BindingError::MissingAttribute("type"))?);
    if !payload.is_empty() || datacontenttype.is_some() {
        let ct = datacontenttype.unwrap_or_else(|| "application/octet-stream".to_owned());
        let data = Data::Binary(payload.to_vec());
        builder = match dataschema {
            Some(schema) => builder.data_with_schema(ct, schema, data),
            None => builder.data(ct, data),
        };
    } else if let Some(schema) = dataschema {
        // A schema with neither data nor content type still has to be a URI.
        builder =
            builder.data_with_schema("application/octet-stream", schema, Data::Binary(Vec::new()));
    }
    builder
        .build()
        .map_err(|e| BindingError::InvalidAttribute(e.to_string()))
}

fn data_bytes(data: Option<&Data>) -> Bytes {
    match data {
        None => Bytes::new(),
        Some(Data::Binary(b)) => Bytes::copy_from_slice(b),
        Some(Data::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(Data::Json(v)) => Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
    }
}

/// Encodes an event in binary mode: `ce-*` headers and `data` as payload.
pub fn encode_binary(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in event.iter() {
        headers.insert(
            format!("ce-{name}").as_str(),
            percent_encode_header(&value.to_string()),
        );
    }
    (headers, data_bytes(event.data()))
}

/// Encodes an event in structured mode: the JSON event format as payload.
pub fn encode_structured(event: &Event) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
    // INVARIANT: serialising an `Event` cannot fail: every field is a string,
    // a number, a bool or a `serde_json::Value`.
    let body = serde_json::to_vec(event).unwrap_or_default();
    (headers, Bytes::from(body))
}

/// The event's `source` as a string (a URI-reference).
pub(crate) fn source_str(event: &Event) -> &str {
    let source: &UriReference = event.source();
    source.as_str()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Event {
        EventBuilderV10::new()
            .id("01J0000000000000000000000")
            .source("/agents/planner")
            .ty("io.agentmesh.task.handoff")
            .subject("héllo wörld \"quoted\" 100%")
            .time("2026-01-02T03:04:05Z")
            .extension("target", "coder")
            .extension(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .data("application/json", json!({"task": "write tests"}))
            .build()
            .unwrap()
    }

    #[test]
    fn spec_example_encoding() {
        assert_eq!(
            percent_encode_header("Euro \u{20AC} \u{1F600}"),
            "Euro%20%E2%82%AC%20%F0%9F%98%80"
        );
        assert_eq!(percent_encode_header("a\"b%c"), "a%22b%25c");
        assert_eq!(percent_encode_header("/agents/x~!"), "/agents/x~!");
    }

    #[test]
    fn decoding_rules() {
        assert_eq!(
            percent_decode_header("h", "Euro%20%e2%82%ac%20%F0%9F%98%80").unwrap(),
            "Euro \u{20AC} \u{1F600}"
        );
        // Unnecessary encoding is accepted.
        assert_eq!(percent_decode_header("h", "%61bc").unwrap(), "abc");
        // Quoted strings from older senders, with backslash escapes.
        assert_eq!(
            percent_decode_header("h", r#""a b \"c\"""#).unwrap(),
            r#"a b "c""#
        );
        // Overlong encoding of U+0020 is rejected.
        assert!(percent_decode_header("h", "%C0%A0").is_err());
        // Lone continuation byte and truncated escapes are rejected.
        assert!(percent_decode_header("h", "%80").is_err());
        assert!(percent_decode_header("h", "abc%2").is_err());
        assert!(percent_decode_header("h", "abc%zz").is_err());
    }

    #[test]
    fn binary_round_trip() {
        let event = sample();
        let (headers, payload) = encode_binary(&event);
        assert_eq!(headers.get("ce-specversion").unwrap().as_str(), "1.0");
        assert_eq!(
            headers.get("ce-subject").unwrap().as_str(),
            "h%C3%A9llo%20w%C3%B6rld%20%22quoted%22%20100%25"
        );
        for (_, values) in headers.iter() {
            for v in values {
                assert!(
                    v.as_str().bytes().all(|b| (0x21..=0x7e).contains(&b)),
                    "{v}"
                );
            }
        }
        let (decoded, mode) = decode(Some(&headers), &payload).unwrap();
        assert_eq!(mode, ContentMode::Binary);
        assert_eq!(decoded.id(), event.id());
        assert_eq!(decoded.subject(), event.subject());
        assert_eq!(decoded.time(), event.time());
        assert_eq!(decoded.extension("target"), event.extension("target"));
        assert_eq!(
            decoded.data(),
            Some(&Data::Binary(br#"{"task":"write tests"}"#.to_vec()))
        );
    }

    #[test]
    fn structured_round_trip() {
        let event = sample();
        let (headers, payload) = encode_structured(&event);
        let (decoded, mode) = decode(Some(&headers), &payload).unwrap();
        assert_eq!(mode, ContentMode::Structured);
        assert_eq!(decoded, event);
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let mut headers = HeaderMap::new();
        headers.insert("CE-SpecVersion", "1.0");
        headers.insert("Ce-Id", "1");
        headers.insert("ce-SOURCE", "/agents/a");
        headers.insert("ce-type", "io.agentmesh.prompt");
        let (event, _) = decode(Some(&headers), b"").unwrap();
        assert_eq!(event.id(), "1");
        assert_eq!(source_str(&event), "/agents/a");
    }

    #[test]
    fn structured_detected_case_insensitively() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            "Application/CloudEvents+JSON; charset=utf-8",
        );
        let body =
            br#"{"specversion":"1.0","id":"1","source":"/agents/a","type":"io.agentmesh.prompt"}"#;
        let (_, mode) = decode(Some(&headers), body).unwrap();
        assert_eq!(mode, ContentMode::Structured);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(decode(None, b"{}"), Err(BindingError::NotACloudEvent));

        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", "0.3");
        assert!(
            matches!(decode(Some(&headers), b""), Err(BindingError::UnsupportedSpecVersion(v)) if v == "0.3")
        );

        let mut headers = HeaderMap::new();
        headers.insert("ce-specversion", "1.0");
        headers.insert("ce-source", "/agents/a");
        headers.insert("ce-type", "t");
        assert_eq!(
            decode(Some(&headers), b""),
            Err(BindingError::MissingAttribute("id"))
        );

        headers.insert("ce-id", "%C0%A0");
        assert!(matches!(
            decode(Some(&headers), b""),
            Err(BindingError::MalformedHeader { .. })
        ));

        headers.insert("ce-id", "1");
        headers.insert("ce-time", "yesterday");
        assert!(matches!(
            decode(Some(&headers), b""),
            Err(BindingError::InvalidAttribute(_))
        ));

        let mut structured = HeaderMap::new();
        structured.insert("Content-Type", STRUCTURED_CONTENT_TYPE);
        assert!(matches!(
            decode(Some(&structured), b"not json"),
            Err(BindingError::Structured(_))
        ));
        assert!(matches!(
            decode(
                Some(&structured),
                br#"{"specversion":"0.3","id":"1","source":"/a","type":"t"}"#
            ),
            Err(BindingError::UnsupportedSpecVersion(_))
        ));
        assert!(matches!(
            decode(
                Some(&structured),
                br#"{"specversion":"1.0","source":"/a","type":"t"}"#
            ),
            Err(BindingError::Structured(_))
        ));
    }
}
