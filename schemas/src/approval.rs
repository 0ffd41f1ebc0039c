//! Human approval on the wire: the state of an approval request (the value
//! of its key in the KV bucket `mesh-approvals`) and the answers on
//! `mesh.approval.answer.<source>.<approval id>`. See `docs/contract.md`
//! and `docs/guardrails.md` (human approval) for how the policy worker uses
//! them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::receipt::ApprovalStatus;
use crate::{Approval, Decision, DecisionReceipt};

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// An approval request and where it stands: the value of its key in
/// `mesh-approvals`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalState {
    /// The approval id (also the key).
    pub id: String,
    /// `pending` until answered or expired.
    pub status: ApprovalStatus,
    /// The publishing agent.
    pub agent: String,
    /// Where the parked event is stored in `MESH_APPROVALS`.
    pub request_subject: String,
    /// When the event was parked (RFC 3339, UTC).
    pub requested_at: String,
    /// When an unanswered request turns into a denial (RFC 3339, UTC).
    pub expires_at: String,
    /// Who answered ('' while pending or when it expired).
    #[serde(default)]
    pub approver: String,
    /// The approver's comment, or why it expired.
    #[serde(default)]
    pub comment: String,
    /// When it was answered or expired.
    #[serde(default)]
    pub answered_at: String,
    /// The receipt the event gets once answered (decision filled in then).
    pub receipt: DecisionReceipt,
    /// The W3C `traceparent` of the worker's `policy.decision` span for the
    /// event ('' when spans are not exported): the `policy.approval` span of
    /// the release is its child, in the event's trace.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub decision_span: String,
}

impl ApprovalState {
    /// When the request expires (`None` if the stored time is unreadable).
    pub fn expires(&self) -> Option<DateTime<Utc>> {
        parse_time(&self.expires_at)
    }

    /// The state after `answer`, given at `now`. An answer after the
    /// deadline expires the request whatever it asked.
    pub fn answered(&self, answer: &Answer, now: DateTime<Utc>) -> ApprovalState {
        let late = self.expires().is_none_or(|deadline| now >= deadline);
        let mut next = self.clone();
        next.answered_at = rfc3339(now);
        match answer.action {
            AnswerAction::Expire => {
                next.status = ApprovalStatus::Expired;
                next.comment = answer.comment.clone();
            }
            _ if late => {
                next.status = ApprovalStatus::Expired;
                next.comment = format!(
                    "{} by `{}` came after the deadline {}",
                    answer.action.as_str(),
                    answer.approver,
                    self.expires_at
                );
            }
            AnswerAction::Approve | AnswerAction::Reject => {
                next.status = if answer.action == AnswerAction::Approve {
                    ApprovalStatus::Approved
                } else {
                    ApprovalStatus::Rejected
                };
                next.approver = answer.approver.clone();
                next.comment = answer.comment.clone();
            }
        }
        next
    }

    /// The one receipt of the event, once the request is answered or expired.
    pub fn final_receipt(&self) -> DecisionReceipt {
        let mut receipt = self.receipt.clone();
        receipt.decision = if self.status == ApprovalStatus::Approved {
            Decision::Allow
        } else {
            Decision::Deny
        };
        receipt.decided_at = self.answered_at.clone();
        receipt.approval = Some(Approval {
            id: self.id.clone(),
            status: self.status,
            approver: self.approver.clone(),
            comment: self.comment.clone(),
            requested_at: self.requested_at.clone(),
            answered_at: self.answered_at.clone(),
        });
        receipt
    }

    /// Why a rejected or expired event was denied: the `Mesh-Reason` of its
    /// dead letter.
    pub fn denial_reason(&self) -> String {
        let mut reason = match self.status {
            ApprovalStatus::Rejected => format!("approval rejected by `{}`", self.approver),
            _ => "approval expired".to_owned(),
        };
        if !self.comment.is_empty() {
            reason.push_str(": ");
            reason.push_str(&self.comment);
        }
        reason
    }
}

/// What an answer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnswerAction {
    /// Release the event (`allow`).
    Approve,
    /// Deny it.
    Reject,
    /// Deny it because nobody answered in time (sent by the worker).
    Expire,
}

impl AnswerAction {
    /// `approve`, `reject` or `expire`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Reject => "reject",
            Self::Expire => "expire",
        }
    }
}

/// An answer to an approval request, as JSON on
/// `mesh.approval.answer.<source>.<approval id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// The approval id.
    pub id: String,
    /// What to do.
    pub action: AnswerAction,
    /// Who answers (recorded in the receipt and the audit).
    #[serde(default)]
    pub approver: String,
    /// Why, optional.
    #[serde(default)]
    pub comment: String,
    /// When it was sent (RFC 3339).
    #[serde(default)]
    pub at: String,
}

impl Answer {
    /// The answer's `Nats-Msg-Id`: `<action>-<approval id>`, so the same
    /// action twice within the duplicate window is stored once.
    pub fn message_id(&self) -> String {
        format!("{}-{}", self.action.as_str(), self.id)
    }
}

/// The approval id of an event: 32 hex digits of SHA-256 over its agent and
/// id (an event is identified by both), so a redelivered event parks under
/// the same id and two agents' events with one id park apart.
pub fn approval_id(agent: &str, event_id: &str) -> String {
    let digest = Sha256::digest(format!("approval\n{agent}\n{event_id}").as_bytes());
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789abcdef0123456789abcdef";

    fn state(expires_in: i64) -> ApprovalState {
        let now = Utc::now();
        ApprovalState {
            id: ID.into(),
            status: ApprovalStatus::Pending,
            agent: "coder".into(),
            request_subject: crate::subjects::approval_request("coder", ID),
            requested_at: rfc3339(now),
            expires_at: rfc3339(now + chrono::Duration::seconds(expires_in)),
            approver: String::new(),
            comment: String::new(),
            answered_at: String::new(),
            decision_span: String::new(),
            receipt: DecisionReceipt {
                event_id: "e1".into(),
                decision: Decision::Allow,
                reasons: vec!["deploys-need-approval".into()],
                ..Default::default()
            },
        }
    }

    fn answer(action: AnswerAction) -> Answer {
        Answer {
            id: ID.into(),
            action,
            approver: "alice".into(),
            comment: "ok".into(),
            at: String::new(),
        }
    }

    #[test]
    fn answers_settle_the_receipt() {
        let approved = state(60).answered(&answer(AnswerAction::Approve), Utc::now());
        let receipt = approved.final_receipt();
        assert_eq!(receipt.decision, Decision::Allow);
        let approval = receipt.approval.unwrap();
        assert_eq!(
            (approval.status, approval.approver.as_str()),
            (ApprovalStatus::Approved, "alice")
        );
        assert_eq!(receipt.reasons, vec!["deploys-need-approval"]);

        let rejected = state(60).answered(&answer(AnswerAction::Reject), Utc::now());
        assert_eq!(rejected.final_receipt().decision, Decision::Deny);
        assert_eq!(rejected.denial_reason(), "approval rejected by `alice`: ok");
    }

    #[test]
    fn late_answers_expire() {
        let late = state(-1).answered(&answer(AnswerAction::Approve), Utc::now());
        assert_eq!(late.status, ApprovalStatus::Expired);
        assert_eq!(late.approver, "");
        assert!(
            late.comment.contains("after the deadline"),
            "{}",
            late.comment
        );
        assert_eq!(late.final_receipt().decision, Decision::Deny);
    }

    #[test]
    fn wire_shapes() {
        assert_eq!(
            serde_json::to_value(answer(AnswerAction::Expire)).unwrap()["action"],
            "expire"
        );
        let parsed: Answer =
            serde_json::from_str(&format!(r#"{{"id":"{ID}","action":"approve"}}"#)).unwrap();
        assert_eq!(
            (parsed.action, parsed.approver.as_str()),
            (AnswerAction::Approve, "")
        );
        let pending = state(60);
        let back: ApprovalState =
            serde_json::from_slice(&serde_json::to_vec(&pending).unwrap()).unwrap();
        assert_eq!(back, pending);
        assert!(pending.expires().is_some());
    }
}
