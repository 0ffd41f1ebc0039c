//! The tool-result cache (`docs/cache.md`): an approved `tool.call` of a
//! tool the operator declared cacheable (`cache.toml`) whose canonical
//! arguments match a fresh entry is answered by the worker with the cached
//! `tool.result`; the tool's agent never sees it.
//!
//! The seam with the per-event path is two questions, asked after the
//! decision and only for allowed events:
//! - [`ToolCache::lookup`]: "is there a fresh answer for this approved
//!   call?" — a hit (publish [`Hit::message`] instead of the delivery), or
//!   deliver as usual and say `miss` / `bypass` on the receipt;
//! - [`ToolCache::fill`]: "does this approved result answer a call the
//!   cache is waiting for?" — then it is stored.
//!
//! Everything lives in the JetStream KV bucket `mesh-tool-cache`, so
//! entries survive a worker restart and replicas share them:
//! - `r.<tool hash>.<key hash>`: a result ([`Entry`]);
//! - `p.<call hash>`: a call delivered on a miss, waiting for its result
//!   ([`Pending`]); only the result from the call's own `target`, to the
//!   caller, fills the entry;
//! - `f.<key hash>`: the call in flight for a key ([`Flight`]), created
//!   with compare-and-set: identical calls that arrive while it is out wait
//!   for its result instead of reaching the tool (single flight, across
//!   replicas).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::kv;
use base64::Engine as _;
use bytes::Bytes;
use schemas::{
    AttributesReader, DecisionReceipt, EventBuilder, EventBuilderV10, EventType, MeshEvent, ext,
    headers, subjects,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use policy_engine::{CacheRules, CacheScope as Scope, ToolRule};
use schemas::cache::{answer_id, tool_token};

/// How often a call waiting for another's result looks at the bucket (a
/// result decided by this worker wakes it at once).
const FOLLOW_POLL: Duration = Duration::from_millis(20);

/// How often the bucket's size is read for the metrics.
const SIZE_POLL: Duration = Duration::from_secs(5);

/// A cached result: the value of `r.<tool hash>.<key hash>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    /// The tool.
    pub(crate) tool: String,
    /// The agent that answered (the call's `target`).
    pub(crate) agent: String,
    /// The caller the entry belongs to (`caller` scope), or `None` (shared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) caller: Option<String>,
    /// The call that produced it, `<agent>/<event id>`.
    pub(crate) source: String,
    /// The id of the `tool.result` it was taken from.
    pub(crate) result_id: String,
    /// When it was stored (Unix milliseconds).
    pub(crate) stored_at_ms: i64,
    /// The result's `datacontenttype`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) content_type: Option<String>,
    /// The result's data, base64.
    pub(crate) data: String,
}

/// A call delivered on a miss: the value of `p.<call hash>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Pending {
    /// The key its result is stored under.
    pub(crate) key: String,
    /// The key hash (its flight is `f.<hash>`).
    pub(crate) hash: String,
    /// The tool.
    pub(crate) tool: String,
    /// The calling agent.
    pub(crate) caller: String,
    /// The agent that must answer (the call's `target`).
    pub(crate) agent: String,
    /// The call, `<agent>/<event id>`.
    pub(crate) call: String,
    /// The scope's caller, as in [`Entry::caller`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) scope_caller: Option<String>,
}

/// The call in flight for a key: the value of `f.<key hash>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Flight {
    /// The call, `<agent>/<event id>`.
    pub(crate) call: String,
    /// When it went out (Unix milliseconds).
    pub(crate) at_ms: i64,
}

/// A call's place in the bucket.
#[derive(Debug, Clone)]
struct Key {
    /// `r.<tool hash>.<key hash>`.
    result: String,
    /// The key hash.
    hash: String,
    /// The caller the entry belongs to, in `caller` scope.
    scope_caller: Option<String>,
}

fn sha_hex(text: &str, len: usize) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let mut hex = hex::encode(digest);
    hex.truncate(len);
    hex
}

fn call_token(call: &str) -> String {
    format!("p.{}", sha_hex(&format!("call\n{call}"), 32))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Key {
    /// The key of `call` for `tool` served by `agent`; `None` when its data
    /// is not JSON (the call bypasses the cache).
    fn of(tool: &str, agent: &str, rule: &ToolRule, call: &MeshEvent) -> Option<Self> {
        let data = call.data_bytes();
        let args: serde_json::Value = if data.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&data).ok()?
        };
        let scope_caller = match rule.scope {
            Scope::Caller => Some(call.agent.to_string()),
            Scope::Shared => None,
        };
        let hash = sha_hex(
            &format!(
                "agentmesh tool cache v1\n{tool}\n{agent}\n{}\n{}",
                scope_caller.as_deref().unwrap_or("*"),
                policy_engine::canonical(&args)
            ),
            48,
        );
        Some(Self {
            result: format!("r.{}.{hash}", tool_token(tool)),
            hash,
            scope_caller,
        })
    }

    fn flight(&self) -> String {
        format!("f.{}", self.hash)
    }
}

/// A fresh entry found for an approved call.
#[derive(Debug, Clone)]
pub(crate) struct Hit {
    entry: Entry,
}

impl Hit {
    /// The call that first produced the entry, `<agent>/<event id>`.
    pub(crate) fn source(&self) -> &str {
        &self.entry.source
    }

    /// The cached `tool.result` for `call`, as the worker publishes it:
    /// subject `mesh.deliver.<caller>.<tool agent>`, binary-mode headers
    /// with `Mesh-Cache: hit`, and the cached data byte for byte. Its id is
    /// derived from the call (a redelivered call gets the same answer id),
    /// `causationid` is the call's id and its trace is the call's.
    pub(crate) fn message(
        &self,
        call: &MeshEvent,
        receipt: &DecisionReceipt,
    ) -> (String, HeaderMap, Bytes) {
        let caller = call.agent.as_str();
        let id = answer_id(caller, call.id());
        let data = base64::engine::general_purpose::STANDARD
            .decode(&self.entry.data)
            .unwrap_or_default();
        let mut builder = EventBuilderV10::new()
            .id(id)
            .source(format!("/agents/{}", self.entry.agent))
            .ty(EventType::ToolResult.as_str())
            .subject(self.entry.tool.clone())
            .time(chrono::Utc::now())
            .extension(ext::TRACEPARENT, call.trace.child().to_string())
            .extension(ext::CAUSATIONID, call.id().to_owned())
            .extension(ext::CAUSATIONSOURCE, format!("/agents/{caller}"))
            .extension(ext::TARGET, caller.to_owned());
        if let Some(state) = call.event.extension(ext::TRACESTATE).map(|v| v.to_string()) {
            builder = builder.extension(ext::TRACESTATE, state);
        }
        builder = builder.data(
            self.entry
                .content_type
                .clone()
                .unwrap_or_else(|| "application/json".to_owned()),
            data,
        );
        // INVARIANT: id, source and type are set, so the build cannot fail;
        // were it to, the answer is an empty event the SDK ignores.
        let event = builder.build().unwrap_or_default();
        let (mut h, payload) = schemas::encode_binary(&event);
        h.insert(headers::CACHE, "hit");
        h.insert(headers::CACHE_SOURCE, self.entry.source.as_str());
        h.insert(headers::DECISION_ID, receipt.decision_id.as_str());
        h.insert(headers::POLICY_HASH, receipt.policy_hash.as_str());
        h.insert(headers::TRACE_ID, receipt.trace_id.as_str());
        (subjects::deliver(caller, &self.entry.agent), h, payload)
    }
}

/// What the cache says about an approved event.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// Not a call of a cacheable tool: route it as usual, the receipt has
    /// no `cache`.
    NotCacheable,
    /// Deliver the call to the tool; the receipt says `miss` or `bypass`.
    Deliver(schemas::CacheStatus),
    /// Answer the call from the cache.
    Hit(Hit),
}

/// The worker's tool-result cache.
pub(crate) struct ToolCache {
    kv: kv::Store,
    /// How long an identical call waits for the one in flight.
    flight_wait: Duration,
    /// Calls waiting for another's result at once (each holds a place of
    /// the worker's in-flight window; the rest go to the tool).
    followers: Arc<Semaphore>,
    /// Woken whenever this worker finishes a flight.
    landed: Notify,
    metrics: telemetry::CacheMetrics,
}

impl ToolCache {
    pub(crate) fn new(
        kv: kv::Store,
        flight_wait: Duration,
        max_followers: usize,
        metrics: telemetry::CacheMetrics,
    ) -> Self {
        Self {
            kv,
            flight_wait,
            followers: Arc::new(Semaphore::new(max_followers.max(1))),
            landed: Notify::new(),
            metrics,
        }
    }

    /// Reads the bucket's size into the metrics every few seconds.
    pub(crate) fn watch_size(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((entries, bytes)) =
                    broker_config::admin::tool_cache_size(&this.kv.stream).await
                {
                    this.metrics.size(entries, bytes);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(SIZE_POLL) => {}
                }
            }
        });
    }

    /// Is there a fresh answer for this approved call? Called only for an
    /// allowed event that will be routed; a failure of the bucket is a
    /// `bypass` (the call goes to the tool).
    pub(crate) async fn lookup(&self, rules: &CacheRules, call: &MeshEvent) -> Lookup {
        let (Some(tool), Some(agent)) = (call.tool(), call.target.as_ref()) else {
            return Lookup::NotCacheable;
        };
        let Some(rule) = rules.rule(tool) else {
            return Lookup::NotCacheable;
        };
        let Some(key) = Key::of(tool, agent.as_str(), rule, call) else {
            tracing::debug!(
                tool,
                event_id = call.id(),
                "Arguments are not JSON; the call bypasses the cache."
            );
            self.metrics.bypass();
            return Lookup::Deliver(schemas::CacheStatus::Bypass);
        };
        match self.resolve(tool, agent.as_str(), rule, &key, call).await {
            Ok(Lookup::Hit(hit)) => {
                self.metrics.hit();
                Lookup::Hit(hit)
            }
            Ok(other) => {
                self.metrics.miss();
                other
            }
            Err(error) => {
                tracing::warn!(tool, event_id = call.id(), %error, "Tool cache unreadable; the call bypasses it.");
                self.metrics.bypass();
                Lookup::Deliver(schemas::CacheStatus::Bypass)
            }
        }
    }

    /// The fresh entry under `key`, if any.
    async fn fresh(&self, key: &Key, rule: &ToolRule) -> Result<Option<Entry>, async_nats::Error> {
        let Some(value) = self.kv.get(&key.result).await? else {
            return Ok(None);
        };
        let Ok(entry) = serde_json::from_slice::<Entry>(&value) else {
            return Ok(None);
        };
        // The TTL in force now decides, so shortening it takes effect at once.
        let ttl = i64::try_from(rule.ttl().as_millis()).unwrap_or(i64::MAX);
        Ok((now_ms() < entry.stored_at_ms.saturating_add(ttl)).then_some(entry))
    }

    async fn resolve(
        &self,
        tool: &str,
        agent: &str,
        rule: &ToolRule,
        key: &Key,
        call: &MeshEvent,
    ) -> Result<Lookup, async_nats::Error> {
        let me = subjects::event_key(call.agent.as_str(), call.id());
        let deadline = Instant::now() + self.flight_wait;
        let mut following = None;
        loop {
            let landed = self.landed.notified();
            if let Some(entry) = self.fresh(key, rule).await? {
                return Ok(Lookup::Hit(Hit { entry }));
            }
            // `None`: the flight landed between the create and the read.
            let Some(lead) = self.claim(key, &me).await? else {
                continue;
            };
            if lead && let Some(entry) = self.fresh(key, rule).await? {
                // The flight before landed between the look and the create.
                let _ = self.kv.delete(key.flight()).await;
                return Ok(Lookup::Hit(Hit { entry }));
            }
            if lead || Instant::now() >= deadline {
                self.expect(tool, agent, key, call, &me).await?;
                return Ok(Lookup::Deliver(schemas::CacheStatus::Miss));
            }
            if following.is_none() {
                match self.followers.clone().try_acquire_owned() {
                    Ok(permit) => following = Some(permit),
                    Err(_) => {
                        self.expect(tool, agent, key, call, &me).await?;
                        return Ok(Lookup::Deliver(schemas::CacheStatus::Miss));
                    }
                }
            }
            let wait = FOLLOW_POLL.min(deadline.saturating_duration_since(Instant::now()));
            tokio::select! {
                () = landed => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Tries to lead the flight of `key` as the call `me`: `Some(true)` when
    /// it leads (it created the flight, or leads it already, redelivered,
    /// or took over a stale one), `Some(false)` when another call leads,
    /// `None` when the flight landed meanwhile (look again).
    async fn claim(&self, key: &Key, me: &str) -> Result<Option<bool>, async_nats::Error> {
        let flight = serde_json::to_vec(&Flight {
            call: me.to_owned(),
            at_ms: now_ms(),
        })?;
        match self.kv.create(key.flight(), flight.clone().into()).await {
            Ok(_) => return Ok(Some(true)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(e.into()),
        }
        let Some(current) = self
            .kv
            .entry(key.flight())
            .await?
            .filter(|current| current.operation == kv::Operation::Put)
        else {
            return Ok(None);
        };
        let out = serde_json::from_slice::<Flight>(&current.value).ok();
        let stale = out
            .as_ref()
            .is_none_or(|f| f.at_ms.saturating_add(self.flight_wait.as_millis() as i64) < now_ms());
        Ok(Some(if out.is_some_and(|f| f.call == me) {
            // This call, redelivered: it still leads.
            true
        } else if stale {
            // Its result never came: take the flight over.
            self.kv
                .update(key.flight(), flight.into(), current.revision)
                .await
                .is_ok()
        } else {
            false
        }))
    }

    /// Records that `call` goes to the tool and its result fills `key`.
    async fn expect(
        &self,
        tool: &str,
        agent: &str,
        key: &Key,
        call: &MeshEvent,
        me: &str,
    ) -> Result<(), async_nats::Error> {
        let pending = Pending {
            key: key.result.clone(),
            hash: key.hash.clone(),
            tool: tool.to_owned(),
            caller: call.agent.to_string(),
            agent: agent.to_owned(),
            call: me.to_owned(),
            scope_caller: key.scope_caller.clone(),
        };
        self.kv
            .put(call_token(me), serde_json::to_vec(&pending)?.into())
            .await?;
        Ok(())
    }

    /// Does this approved `tool.result` answer a call the cache waits for?
    /// Then its data is stored (when the tool is still cacheable and the
    /// result is a success) and the call's flight ends. Returns the
    /// producing call when the result was stored. A failure is logged: the
    /// result is delivered all the same.
    pub(crate) async fn fill(
        &self,
        rules: &CacheRules,
        result: &MeshEvent,
        storable: bool,
    ) -> Option<String> {
        if result.event_type != EventType::ToolResult {
            return None;
        }
        let call_id = result.causation_id.as_deref()?;
        let caller = result
            .causation_agent
            .clone()
            .or_else(|| result.target.as_ref().map(|t| t.to_string()))?;
        let call = subjects::event_key(&caller, call_id);
        match self.try_fill(rules, result, &call, storable).await {
            Ok(stored) => stored,
            Err(error) => {
                tracing::warn!(%call, result_id = result.id(), %error, "Storing a tool result in the cache failed; delivered uncached.");
                None
            }
        }
    }

    async fn try_fill(
        &self,
        rules: &CacheRules,
        result: &MeshEvent,
        call: &str,
        storable: bool,
    ) -> Result<Option<String>, async_nats::Error> {
        let token = call_token(call);
        let Some(value) = self.kv.get(&token).await? else {
            return Ok(None);
        };
        let Ok(pending) = serde_json::from_slice::<Pending>(&value) else {
            return Ok(None);
        };
        // Only the agent the call went to, answering the caller, about the
        // tool that was called: nobody else can put an answer in the cache.
        let subject = AttributesReader::subject(&result.event);
        if result.agent.as_str() != pending.agent
            || result.target.as_ref().map(|t| t.as_str()) != Some(pending.caller.as_str())
            || subject.is_some_and(|s| s != pending.tool)
        {
            tracing::debug!(%call, result_id = result.id(), from = %result.agent, "A result for a cached call from another agent or tool; not stored.");
            return Ok(None);
        }
        let mut stored = None;
        if storable && rules.rule(&pending.tool).is_some() && succeeded(result) {
            let entry = Entry {
                tool: pending.tool.clone(),
                agent: pending.agent.clone(),
                caller: pending.scope_caller.clone(),
                source: pending.call.clone(),
                result_id: result.id().to_owned(),
                stored_at_ms: now_ms(),
                content_type: AttributesReader::datacontenttype(&result.event).map(str::to_owned),
                data: base64::engine::general_purpose::STANDARD.encode(result.data_bytes()),
            };
            self.kv
                .put(&pending.key, serde_json::to_vec(&entry)?.into())
                .await?;
            self.metrics.stored();
            tracing::debug!(tool = %pending.tool, call = %pending.call, result_id = result.id(), "Tool result cached.");
            stored = Some(pending.call.clone());
        }
        // The flight is over, stored or not: waiting calls take the entry,
        // or one of them goes to the tool next.
        let flight = format!("f.{}", pending.hash);
        if let Some(current) = self.kv.entry(&flight).await?
            && current.operation == kv::Operation::Put
            && serde_json::from_slice::<Flight>(&current.value)
                .is_ok_and(|f| f.call == pending.call)
        {
            let _ = self
                .kv
                .delete_expect_revision(&flight, Some(current.revision))
                .await;
        }
        self.kv.delete(&token).await?;
        self.landed.notify_waiters();
        Ok(stored)
    }
}

/// Whether a result may be cached: JSON data `{"ok": true, ...}` (the
/// agents-sdk `ToolResult` shape). Errors, and anything else, are not.
fn succeeded(result: &MeshEvent) -> bool {
    serde_json::from_slice::<serde_json::Value>(&result.data_bytes())
        .ok()
        .and_then(|v| v.get("ok").and_then(serde_json::Value::as_bool))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::cache::purge_filter;
    use schemas::{Limits, encode_binary};

    fn call(agent: &str, data: serde_json::Value) -> MeshEvent {
        let event = EventBuilderV10::new()
            .id("c1")
            .source(format!("/agents/{agent}"))
            .ty("io.agentmesh.tool.call")
            .subject("code.search")
            .extension("target", "coder")
            .data("application/json", data)
            .build()
            .unwrap();
        let (h, p) = encode_binary(&event);
        MeshEvent::from_message(
            &format!("mesh.ingress.{agent}.tool_call"),
            Some(&h),
            &p,
            Limits::default(),
        )
        .unwrap()
    }

    fn rule(scope: Scope) -> ToolRule {
        ToolRule {
            ttl_secs: 60,
            scope,
        }
    }

    #[test]
    fn keys_follow_canonical_arguments_and_scope() {
        let a =
            serde_json::json!({"tool": "code.search", "arguments": {"query": "q", "path": "src/"}});
        let b: serde_json::Value = serde_json::from_str(
            r#"{"arguments":{"path":"src/","query":"q"},"tool":"code.search"}"#,
        )
        .unwrap();
        let key = |agent, data, scope| {
            Key::of("code.search", "coder", &rule(scope), &call(agent, data))
                .unwrap()
                .result
        };
        assert_eq!(
            key("planner", a.clone(), Scope::Shared),
            key("planner", b.clone(), Scope::Shared)
        );
        assert_eq!(
            key("planner", a.clone(), Scope::Shared),
            key("reviewer", a.clone(), Scope::Shared)
        );
        assert_ne!(
            key("planner", a.clone(), Scope::Caller),
            key("reviewer", a.clone(), Scope::Caller)
        );
        assert_ne!(
            key("planner", a.clone(), Scope::Shared),
            key(
                "planner",
                serde_json::json!({"arguments": {"query": "r"}}),
                Scope::Shared
            )
        );
        let k = key("planner", a, Scope::Shared);
        assert!(
            k.starts_with(&format!("r.{}.", tool_token("code.search"))),
            "{k}"
        );
        assert!(
            purge_filter(Some("code.search"))
                .ends_with(&format!(".r.{}.*", tool_token("code.search")))
        );
    }

    #[test]
    fn only_successes_are_cacheable() {
        let result = |data: serde_json::Value| {
            let event = EventBuilderV10::new()
                .id("r1")
                .source("/agents/coder")
                .ty("io.agentmesh.tool.result")
                .data("application/json", data)
                .build()
                .unwrap();
            let (h, p) = encode_binary(&event);
            MeshEvent::from_message(
                "mesh.ingress.coder.tool_result",
                Some(&h),
                &p,
                Limits::default(),
            )
            .unwrap()
        };
        assert!(succeeded(&result(
            serde_json::json!({"ok": true, "result": 1})
        )));
        assert!(!succeeded(&result(
            serde_json::json!({"ok": false, "error": "x"})
        )));
        assert!(!succeeded(&result(serde_json::json!({"result": 1}))));
        assert!(!succeeded(&result(serde_json::json!("ok"))));
    }
}
