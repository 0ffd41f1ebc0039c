//! W3C Trace Context `traceparent`: `00-<trace-id>-<parent-id>-<flags>`.

use std::fmt;
use std::str::FromStr;

/// A parsed `traceparent` header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The 16-byte trace id: the workflow.
    pub trace_id: [u8; 16],
    /// The 8-byte id of the parent span.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// The error for a malformed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("traceparent `{value}` is invalid: {reason}")]
pub struct InvalidTraceParent {
    /// The value that was given.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl TraceParent {
    /// Mints a new trace with random ids, sampled.
    pub fn mint() -> Self {
        let trace = uuid::Uuid::new_v4();
        let span = uuid::Uuid::new_v4();
        let mut parent_id = [0u8; 8];
        parent_id.copy_from_slice(&span.as_bytes()[..8]);
        Self {
            trace_id: *trace.as_bytes(),
            parent_id,
            flags: 1,
        }
    }

    /// The trace an event without `traceparent` belongs to, derived from its
    /// id alone so every service (and every redelivery) computes the same one.
    pub fn derive(event_id: &str) -> Self {
        let trace = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, event_id.as_bytes());
        let span = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, event_id.as_bytes());
        let mut parent_id = [0u8; 8];
        parent_id.copy_from_slice(&span.as_bytes()[..8]);
        Self {
            trace_id: *trace.as_bytes(),
            parent_id,
            flags: 1,
        }
    }

    /// A new span in the same trace, with `self` as its parent.
    pub fn child(&self) -> Self {
        let span = uuid::Uuid::new_v4();
        let mut parent_id = [0u8; 8];
        parent_id.copy_from_slice(&span.as_bytes()[..8]);
        Self { parent_id, ..*self }
    }

    /// The trace id as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The parent id as 16 lowercase hex characters.
    pub fn parent_id_hex(&self) -> String {
        hex(&self.parent_id)
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

impl FromStr for TraceParent {
    type Err = InvalidTraceParent;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let err = |reason| InvalidTraceParent {
            value: value.to_owned(),
            reason,
        };
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(parent), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(err("expected `version-traceid-parentid-flags`"));
        };
        let version: [u8; 1] =
            parse_hex(version).ok_or_else(|| err("version is not 2 lowercase hex digits"))?;
        if version[0] == 0xff {
            return Err(err("version `ff` is forbidden"));
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version[0] == 0 && parts.next().is_some() {
            return Err(err("version 00 has exactly four fields"));
        }
        let trace_id: [u8; 16] =
            parse_hex(trace).ok_or_else(|| err("trace id is not 32 lowercase hex digits"))?;
        let parent_id: [u8; 8] =
            parse_hex(parent).ok_or_else(|| err("parent id is not 16 lowercase hex digits"))?;
        let flags: [u8; 1] =
            parse_hex(flags).ok_or_else(|| err("flags are not 2 lowercase hex digits"))?;
        if trace_id == [0; 16] {
            return Err(err("trace id is all zeros"));
        }
        if parent_id == [0; 8] {
            return Err(err("parent id is all zeros"));
        }
        Ok(Self {
            trace_id,
            parent_id,
            flags: flags[0],
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.parent_id),
            self.flags
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_spec_example() {
        let s = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let tp: TraceParent = s.parse().unwrap();
        assert_eq!(tp.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.parent_id_hex(), "00f067aa0ba902b7");
        assert_eq!(tp.flags, 1);
        assert_eq!(tp.to_string(), s);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn derive_is_stable() {
        assert_eq!(TraceParent::derive("e1"), TraceParent::derive("e1"));
        assert_ne!(
            TraceParent::derive("e1").trace_id,
            TraceParent::derive("e2").trace_id
        );
    }

    #[test]
    fn mint_and_child_share_trace() {
        let tp = TraceParent::mint();
        let child = tp.child();
        assert_eq!(tp.trace_id, child.trace_id);
        assert_ne!(tp.parent_id, child.parent_id);
        assert_eq!(tp.to_string().parse::<TraceParent>().unwrap(), tp);
    }
}
