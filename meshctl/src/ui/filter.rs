//! The filters of the list pages, parsed from the query string. Anything
//! malformed — an unknown parameter, an agent id that cannot exist, a
//! decision outside the four, a time that does not parse — is refused with
//! a message naming it (a 400 page), never passed on.

use chrono::{DateTime, Utc};

use super::PageError;

/// The `since` the list pages use when none is given.
pub(super) const DEFAULT_SINCE: &str = "24h";
/// Traces listed when no `limit` is given.
pub(super) const DEFAULT_LIMIT: u32 = 100;
/// The most traces one page lists.
const MAX_LIMIT: u32 = 1000;

/// Which decision a trace must contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DecisionFilter {
    /// At least one allowed step.
    Allow,
    /// At least one denied step.
    Deny,
    /// At least one invalid step.
    Invalid,
    /// At least one step without a receipt yet.
    Pending,
}

impl DecisionFilter {
    /// Every value, in the order the form offers them.
    pub(super) const ALL: [Self; 4] = [Self::Allow, Self::Deny, Self::Invalid, Self::Pending];

    /// The query-string value.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Invalid => "invalid",
            Self::Pending => "pending",
        }
    }
}

/// A time range `[from, to)` and how the user wrote it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Window {
    /// Start, inclusive.
    pub from: DateTime<Utc>,
    /// End, exclusive.
    pub to: DateTime<Utc>,
    /// `since` as given (or the default).
    pub since: String,
    /// `until` as given (`''` for none).
    pub until: String,
}

/// The trace list's filter.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct TraceFilter {
    /// Traces with a step of this agent.
    pub agent: Option<String>,
    /// Traces with a step of this decision.
    pub decision: Option<DecisionFilter>,
    /// The time range of their steps.
    pub window: Window,
    /// At most this many.
    pub limit: u32,
}

/// The denials page's filter.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DenialFilter {
    /// Denials of this agent.
    pub agent: Option<String>,
    /// The time range of the decisions.
    pub window: Window,
}

/// The query string's `key=value` pairs, decoded (`+` is a space); empty
/// values count as absent, as a form submits them.
fn pairs(query: &str) -> Result<Vec<(String, String)>, PageError> {
    let mut out = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8()
                .map(|c| c.trim().to_owned())
                .map_err(|_| PageError::BadRequest(format!("`{s}` is not UTF-8 once decoded")))
        };
        let (key, value) = (decode(key)?, decode(value)?);
        if !value.is_empty() {
            out.push((key, value));
        }
    }
    Ok(out)
}

fn agent(value: &str) -> Result<String, PageError> {
    if schemas::AgentId::is_valid(value) {
        Ok(value.to_owned())
    } else {
        Err(PageError::BadRequest(format!(
            "agent `{value}` is not an agent id: `[a-z0-9][a-z0-9_-]{{0,62}}`"
        )))
    }
}

fn decision(value: &str) -> Result<DecisionFilter, PageError> {
    DecisionFilter::ALL
        .into_iter()
        .find(|d| d.as_str() == value)
        .ok_or_else(|| {
            PageError::BadRequest(format!(
                "decision `{value}` is not one of allow, deny, invalid, pending"
            ))
        })
}

fn time(name: &str, value: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, PageError> {
    crate::policy::parse_time(value, now)
        .ok()
        .filter(|t| t.timestamp() >= 0)
        .ok_or_else(|| {
            PageError::BadRequest(format!(
                "{name} `{value}` is not a time: use an age like `30m`, `6h`, `2d`, RFC 3339, or `YYYY-MM-DD HH:MM:SS` (UTC)"
            ))
        })
}

fn window(
    since: Option<&str>,
    until: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Window, PageError> {
    let since = since.unwrap_or(DEFAULT_SINCE);
    let from = time("since", since, now)?;
    let to = match until {
        Some(u) => time("until", u, now)?,
        // Steps stamped a little ahead of this clock are still listed.
        None => now + chrono::Duration::days(1),
    };
    if from >= to {
        return Err(PageError::BadRequest(format!(
            "the range is empty: since `{since}` is not before until `{}`",
            until.unwrap_or("now")
        )));
    }
    Ok(Window {
        from,
        to,
        since: since.to_owned(),
        until: until.unwrap_or_default().to_owned(),
    })
}

fn unknown(key: &str, known: &str) -> PageError {
    PageError::BadRequest(format!("unknown filter `{key}`: use {known}"))
}

impl TraceFilter {
    /// Parses `agent`, `decision`, `since`, `until` and `limit`.
    pub(super) fn parse(query: &str, now: DateTime<Utc>) -> Result<Self, PageError> {
        let (mut agent_, mut decision_, mut since, mut until) = (None, None, None, None);
        let mut limit = DEFAULT_LIMIT;
        let pairs = pairs(query)?;
        for (key, value) in &pairs {
            match key.as_str() {
                "agent" => agent_ = Some(agent(value)?),
                "decision" => decision_ = Some(decision(value)?),
                "since" => since = Some(value.as_str()),
                "until" => until = Some(value.as_str()),
                "limit" => {
                    limit = value
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_LIMIT).contains(n))
                        .ok_or_else(|| {
                            PageError::BadRequest(format!(
                                "limit `{value}` is not a number from 1 to {MAX_LIMIT}"
                            ))
                        })?
                }
                other => return Err(unknown(other, "agent, decision, since, until, limit")),
            }
        }
        Ok(Self {
            agent: agent_,
            decision: decision_,
            window: window(since, until, now)?,
            limit,
        })
    }
}

impl DenialFilter {
    /// Parses `agent`, `since` and `until`.
    pub(super) fn parse(query: &str, now: DateTime<Utc>) -> Result<Self, PageError> {
        let (mut agent_, mut since, mut until) = (None, None, None);
        let pairs = pairs(query)?;
        for (key, value) in &pairs {
            match key.as_str() {
                "agent" => agent_ = Some(agent(value)?),
                "since" => since = Some(value.as_str()),
                "until" => until = Some(value.as_str()),
                other => return Err(unknown(other, "agent, since, until")),
            }
        }
        Ok(Self {
            agent: agent_,
            window: window(since, until, now)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn parses_a_form_submission() {
        let f = TraceFilter::parse("agent=coder&decision=deny&since=6h&until=&limit=20", now())
            .unwrap();
        assert_eq!(f.agent.as_deref(), Some("coder"));
        assert_eq!(f.decision, Some(DecisionFilter::Deny));
        assert_eq!(f.window.from.to_rfc3339(), "2026-03-01T06:00:00+00:00");
        assert_eq!(f.window.until, "");
        assert_eq!(f.limit, 20);
        let f = TraceFilter::parse("since=2026-03-01+10%3A00%3A00", now()).unwrap();
        assert_eq!(f.window.from.to_rfc3339(), "2026-03-01T10:00:00+00:00");
        assert_eq!(TraceFilter::parse("", now()).unwrap().window.since, "24h");
    }

    #[test]
    fn refuses_malformed_filters() {
        for query in [
            "decision=maybe",
            "agent=%3Cscript%3E",
            "since=yesterday",
            "since=99999999999999999d",
            "limit=0",
            "limit=-1",
            "color=red",
            "since=1h&until=2h",
            "agent=%FF",
        ] {
            let e = TraceFilter::parse(query, now());
            assert!(matches!(e, Err(PageError::BadRequest(_))), "{query}: {e:?}");
        }
        assert!(matches!(
            DenialFilter::parse("decision=deny", now()),
            Err(PageError::BadRequest(_))
        ));
    }
}
