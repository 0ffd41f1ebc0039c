//! What can still be read from a message that is not a valid mesh event, so
//! the policy worker's receipt and the audit sink's row of one bad message
//! name the same id and the same trace.

use async_nats::HeaderMap;
use cloudevents::event::ExtensionValue;
use cloudevents::{AttributesReader, Event};

use crate::binding::{self, percent_decode_header};
use crate::mesh::ext;
use crate::traceparent::TraceParent;

/// The CloudEvents attributes of a message, as strings ('' when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RawAttributes {
    /// `id`.
    pub id: String,
    /// `type`.
    pub ty: String,
    /// `source`.
    pub source: String,
    /// `subject`.
    pub subject: String,
    /// `time`, as sent (RFC 3339 when the event decoded).
    pub time: String,
    /// The `traceparent` extension.
    pub traceparent: String,
    /// The `causationid` extension.
    pub causationid: String,
    /// The `causationsource` extension.
    pub causationsource: String,
    /// The `target` extension.
    pub target: String,
    /// `datacontenttype`.
    pub datacontenttype: String,
    /// `dataschema`.
    pub dataschema: String,
}

impl RawAttributes {
    /// The attributes of a decoded CloudEvent.
    pub fn from_event(event: &Event) -> Self {
        Self {
            id: event.id().to_owned(),
            ty: event.ty().to_owned(),
            source: event.source().to_string(),
            subject: event.subject().unwrap_or_default().to_owned(),
            time: event.time().map(|t| t.to_rfc3339()).unwrap_or_default(),
            traceparent: extension(event, ext::TRACEPARENT),
            causationid: extension(event, ext::CAUSATIONID),
            causationsource: extension(event, ext::CAUSATIONSOURCE),
            target: extension(event, ext::TARGET),
            datacontenttype: event.datacontenttype().unwrap_or_default().to_owned(),
            dataschema: event
                .dataschema()
                .map(|s| s.to_string())
                .unwrap_or_default(),
        }
    }

    /// The attributes of a message in either content mode, as far as they
    /// can be read: from the decoded event when it decodes as a CloudEvent;
    /// otherwise from the `ce-*` headers (binary mode) or the members of the
    /// JSON envelope (structured mode). The data of a binary-mode message is
    /// never read for attributes.
    pub fn read(headers: Option<&HeaderMap>, payload: &[u8]) -> Self {
        if let Ok((event, _)) = binding::decode(headers, payload) {
            return Self::from_event(&event);
        }
        Self::from_raw(headers, payload)
    }

    /// The attributes of a message that does not decode as a CloudEvent.
    pub fn from_raw(headers: Option<&HeaderMap>, payload: &[u8]) -> Self {
        let mut a = Self::default();
        if binding::is_structured(headers) {
            if let Ok(serde_json::Value::Object(map)) =
                serde_json::from_slice::<serde_json::Value>(payload)
            {
                for (name, value) in map {
                    let value = match value {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    a.set(&name, value);
                }
            }
        } else if let Some(headers) = headers {
            // Header names are case-sensitive in the map and its order differs
            // from process to process: where one attribute comes in several
            // spellings (`ce-id`, `CE-ID`), the first by name wins, so every
            // reader of the message picks the same value.
            let mut found: Vec<(String, &str, &str)> = headers
                .iter()
                .filter_map(|(name, values)| {
                    let name: &str = name.as_ref();
                    let attr = name
                        .get(..3)
                        .filter(|p| p.eq_ignore_ascii_case("ce-"))
                        .and_then(|_| name.get(3..))?;
                    let raw = values.first().map(|v| v.as_str()).unwrap_or_default();
                    Some((attr.to_ascii_lowercase(), name, raw))
                })
                .collect();
            found.sort_unstable();
            found.dedup_by(|later, first| later.0 == first.0);
            for (attr, name, raw) in found {
                let value = percent_decode_header(name, raw).unwrap_or_else(|_| raw.to_owned());
                a.set(&attr, value);
            }
        }
        a
    }

    fn set(&mut self, name: &str, value: String) {
        let field = match name {
            "id" => &mut self.id,
            "type" => &mut self.ty,
            "source" => &mut self.source,
            "subject" => &mut self.subject,
            "time" => &mut self.time,
            "traceparent" => &mut self.traceparent,
            "causationid" => &mut self.causationid,
            "causationsource" => &mut self.causationsource,
            "target" => &mut self.target,
            "datacontenttype" => &mut self.datacontenttype,
            "dataschema" => &mut self.dataschema,
            _ => return,
        };
        *field = value;
    }

    /// The trace the message belongs to, as the worker and the sink both
    /// record it: its `traceparent` when that parses, otherwise one derived
    /// from its id — or from `fallback_key` (the subject it arrived on) when
    /// it has none. The flag is true when derived.
    pub fn trace(&self, fallback_key: &str) -> (TraceParent, bool) {
        if let Ok(trace) = self.traceparent.parse::<TraceParent>() {
            return (trace, false);
        }
        let key = if self.id.is_empty() {
            fallback_key
        } else {
            &self.id
        };
        (TraceParent::derive(key), true)
    }
}

fn extension(event: &Event, name: &str) -> String {
    match event.extension(name) {
        Some(ExtensionValue::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, *v);
        }
        h
    }

    #[test]
    fn binary_headers_give_the_attributes_and_the_data_is_not_read() {
        let h = headers(&[
            ("ce-id", "e%201"),
            ("ce-type", "io.agentmesh.nope"),
            ("ce-traceparent", TP),
        ]);
        // No specversion: not a CloudEvent; the JSON data has an `id` of its own.
        let a = RawAttributes::read(Some(&h), br#"{"id":"from-data"}"#);
        assert_eq!(a.id, "e 1");
        assert_eq!(a.ty, "io.agentmesh.nope");
        let (trace, derived) = a.trace("mesh.ingress.x.y");
        assert_eq!(trace.to_string(), TP);
        assert!(!derived);

        let a = RawAttributes::read(None, br#"{"id":"from-data"}"#);
        assert_eq!(a, RawAttributes::default());
        let (trace, derived) = a.trace("mesh.ingress.x.y");
        assert_eq!(trace, TraceParent::derive("mesh.ingress.x.y"));
        assert!(derived);
    }

    #[test]
    fn one_attribute_in_two_spellings_reads_the_same_everywhere() {
        let h = headers(&[("ce-id", "lower"), ("CE-ID", "upper"), ("Ce-Id", "mixed")]);
        // `CE-ID` < `Ce-Id` < `ce-id` by bytes.
        assert_eq!(RawAttributes::read(Some(&h), b"").id, "upper");
        let h = headers(&[("Ce-Id", "mixed"), ("ce-id", "lower")]);
        assert_eq!(RawAttributes::read(Some(&h), b"").id, "mixed");
    }

    #[test]
    fn structured_envelopes_give_their_members() {
        let h = headers(&[("content-type", "application/cloudevents+json")]);
        let a = RawAttributes::read(
            Some(&h),
            br#"{"id":"s1","type":"t","traceparent":"garbage","target":7}"#,
        );
        assert_eq!(a.id, "s1");
        assert_eq!(a.target, "7");
        assert_eq!(a.traceparent, "garbage");
        // An unparsable traceparent: derived from the id, as for no traceparent.
        assert_eq!(a.trace("subject"), (TraceParent::derive("s1"), true));
    }

    #[test]
    fn decodable_events_give_their_attributes() {
        let h = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "d1"),
            ("ce-type", "io.agentmesh.unknown"),
            ("ce-source", "/agents/a"),
            ("ce-traceparent", TP),
        ]);
        let a = RawAttributes::read(Some(&h), b"{}");
        assert_eq!(a.id, "d1");
        assert_eq!(a.source, "/agents/a");
        assert_eq!(a.trace("subject").0.to_string(), TP);
    }
}
