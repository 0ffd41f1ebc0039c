//! One attribute value of a guardrail record (`context.detectors`,
//! `context.rate`, `context.budget`): what the detectors and the counters
//! produce, and what the policy bundle turns into Cedar values. Kept apart
//! so that the detectors and counters need not know about Cedar requests.

use cedar_policy::RestrictedExpression;

/// One attribute value of a guardrail record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Field {
    Bool(bool),
    Long(i64),
    Strings(Vec<String>),
}

impl Field {
    /// A count as a Cedar `Long` (saturating).
    pub(crate) fn count(n: u64) -> Self {
        Self::Long(i64::try_from(n).unwrap_or(i64::MAX))
    }

    /// The Cedar value. Built directly rather than parsed from JSON: that
    /// parse costs tens of microseconds per decision.
    pub(crate) fn expression(self) -> RestrictedExpression {
        match self {
            Self::Bool(b) => RestrictedExpression::new_bool(b),
            Self::Long(n) => RestrictedExpression::new_long(n),
            Self::Strings(items) => RestrictedExpression::new_set(
                items.into_iter().map(RestrictedExpression::new_string),
            ),
        }
    }

    /// The JSON form (for logs and tests).
    pub(crate) fn json(&self) -> serde_json::Value {
        match self {
            Self::Bool(b) => (*b).into(),
            Self::Long(n) => (*n).into(),
            Self::Strings(items) => items.clone().into(),
        }
    }
}

/// A record's JSON form.
pub(crate) fn record_json(fields: &[(&'static str, Field)]) -> serde_json::Value {
    serde_json::Value::Object(
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.json()))
            .collect(),
    )
}
