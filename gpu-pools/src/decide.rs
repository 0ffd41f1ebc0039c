//! The decision, free of I/O: how many GPUs each pool should have, and which
//! grants, renewals and releases get there from the leases as they are.
//!
//! 1. **Desired**: `ceil(backlog / target_backlog_per_gpu)`, clamped to
//!    `[min_gpus, max_gpus]`.
//! 2. **Cooldown**: the effective desired count is the largest desired count
//!    seen within the last `cooldown` ([`Stabilizer`]): a rise acts at once, a
//!    fall only once demand has stayed lower for the whole cooldown.
//! 3. **Fair share** ([`fair_share`]) when the pools want more GPUs than
//!    exist: GPUs are dealt one at a time, first to pools below their
//!    `min_gpus`, then to the pool with the fewest GPUs dealt so far
//!    (max-min fairness); ties go to the pool already holding more (so a
//!    steady state does not churn), then to the larger backlog, then by name.
//!    No pool is dealt more than it wants.
//! 4. **Plan** ([`plan`]): expired leases and leases on unhealthy or vanished
//!    GPUs are released; a pool above its share gives back its newest leases;
//!    a pool below gets free healthy GPUs (the ones it held before first);
//!    the scaler's own leases are renewed once half their lifetime is gone.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::config::PoolConfig;
use crate::inventory::GpuInfo;
use crate::lease::{Lease, Slot, SlotState};

/// GPUs `backlog` calls for in `pool`, clamped to its bounds.
pub fn raw_desired(backlog: u64, pool: &PoolConfig) -> u32 {
    let need = backlog.div_ceil(pool.target_backlog_per_gpu.max(1));
    let clamped = need.clamp(u64::from(pool.min_gpus), u64::from(pool.max_gpus));
    u32::try_from(clamped).unwrap_or(pool.max_gpus)
}

/// The largest value observed within the last `cooldown` (a monotonic
/// queue, so each observation is O(1) amortised).
#[derive(Debug, Clone)]
pub struct Stabilizer {
    cooldown: Duration,
    // INVARIANT: values strictly decrease from front to back and times
    // increase, so the front is the maximum of the window.
    samples: VecDeque<(Instant, u32)>,
}

impl Stabilizer {
    /// An empty window of length `cooldown`.
    pub fn new(cooldown: Duration) -> Self {
        Self {
            cooldown,
            samples: VecDeque::new(),
        }
    }

    /// Records `value` at `now` and returns the window's maximum.
    pub fn observe(&mut self, now: Instant, value: u32) -> u32 {
        self.expire(now);
        while self.samples.back().is_some_and(|&(_, v)| v <= value) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, value));
        self.samples.front().map_or(value, |&(_, v)| v)
    }

    /// The window's maximum at `now` without a new value; `None` when empty.
    pub fn current(&mut self, now: Instant) -> Option<u32> {
        self.expire(now);
        self.samples.front().map(|&(_, v)| v)
    }

    fn expire(&mut self, now: Instant) {
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| t + self.cooldown <= now)
        {
            self.samples.pop_front();
        }
    }
}

/// One configured pool as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolInput {
    /// The pool.
    pub pool: String,
    /// Its `min_gpus`.
    pub min: u32,
    /// Its effective desired count (after the cooldown).
    pub desired: u32,
    /// Its backlog now (a fair-share tie-break).
    pub backlog: u64,
}

/// What one pool asks for in one decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolWant {
    /// The pool.
    pub pool: String,
    /// Its `min_gpus`.
    pub min: u32,
    /// Its effective desired count (after the cooldown).
    pub desired: u32,
    /// Live leases it holds now.
    pub holding: u32,
    /// Its backlog now.
    pub backlog: u64,
}

/// Deals `capacity` GPUs among the pools (see the module doc for the rule).
pub fn fair_share(capacity: u32, wants: &[PoolWant]) -> BTreeMap<String, u32> {
    let mut dealt: Vec<u32> = vec![0; wants.len()];
    for _ in 0..capacity {
        let next = wants
            .iter()
            .enumerate()
            .filter(|(i, w)| dealt[*i] < w.desired)
            .min_by_key(|(i, w)| {
                (
                    dealt[*i] >= w.min,
                    dealt[*i],
                    Reverse(w.holding),
                    Reverse(w.backlog),
                    w.pool.as_str(),
                )
            })
            .map(|(i, _)| i);
        match next {
            Some(i) => dealt[i] += 1,
            None => break,
        }
    }
    wants
        .iter()
        .zip(dealt)
        .map(|(w, n)| (w.pool.clone(), n))
        .collect()
}

/// Why a lease is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReleaseReason {
    /// Its pool's demand stayed lower for the cooldown.
    Demand,
    /// Another pool below its fair share needs the GPU.
    FairShare,
    /// It was not renewed in time (its holder stopped).
    Expired,
    /// The GPU is unhealthy.
    Unhealthy,
    /// The GPU is gone from the holder's inventory.
    Gone,
    /// Its pool is no longer configured.
    PoolRemoved,
}

impl ReleaseReason {
    /// The kebab-case name used in events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Demand => "demand",
            Self::FairShare => "fair-share",
            Self::Expired => "expired",
            Self::Unhealthy => "unhealthy",
            Self::Gone => "gone",
            Self::PoolRemoved => "pool-removed",
        }
    }
}

/// One step of a plan, each a conditional write on one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Delete the lease if the key is still at `revision`.
    Release {
        /// The lease as read.
        lease: Lease,
        /// The revision it was read at.
        revision: u64,
        /// Why.
        reason: ReleaseReason,
    },
    /// Lease `gpu` to `pool`: at the free slot's `revision` (0 for a key never
    /// written), or `None` for a key released earlier in the same plan.
    Grant {
        /// The GPU uuid.
        gpu: String,
        /// The pool.
        pool: String,
        /// The expected revision.
        revision: Option<u64>,
    },
    /// Extend one of this scaler's leases.
    Renew {
        /// The lease as read.
        lease: Lease,
        /// The revision it was read at.
        revision: u64,
    },
}

/// One pool's part of a decision, for status and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolDecision {
    /// The pool.
    pub pool: String,
    /// Backlog read this round (`None` when it could not be read).
    pub backlog: Option<u64>,
    /// Desired from this round's backlog alone.
    pub raw_desired: u32,
    /// Desired after the cooldown.
    pub desired: u32,
    /// GPUs dealt to it by the fair-share rule.
    pub target: u32,
    /// Live leases before the plan.
    pub holding: u32,
}

/// Everything [`plan`] needs.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Wall-clock now (lease times are wall-clock, shared between hosts).
    pub now: DateTime<Utc>,
    /// This scaler's instance name.
    pub me: &'a str,
    /// Lease lifetime.
    pub ttl: Duration,
    /// The inventory now.
    pub gpus: &'a [GpuInfo],
    /// The bucket now.
    pub slots: &'a BTreeMap<String, Slot>,
    /// Every configured pool.
    pub pools: &'a [PoolInput],
}

/// The plan for one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Releases first, then grants, then renewals.
    pub actions: Vec<Action>,
    /// The share dealt to each pool.
    pub targets: BTreeMap<String, u32>,
    /// Live leases each pool held before the plan.
    pub holding: BTreeMap<String, u32>,
}

fn kept_count(kept: &BTreeMap<String, Vec<(Lease, u64)>>, pool: &str) -> u32 {
    kept.get(pool).map_or(0, |v| v.len() as u32)
}

struct FreeGpu {
    gpu: String,
    revision: Option<u64>,
    previous_pool: Option<String>,
}

/// Decides one round.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let now = input.now;
    let inventory: BTreeMap<&str, &GpuInfo> =
        input.gpus.iter().map(|g| (g.uuid.as_str(), g)).collect();
    let configured = |pool: &str| input.pools.iter().any(|p| p.pool == pool);

    let mut releases = Vec::new();
    // Live leases on this scaler's healthy GPUs, by pool: (lease, revision).
    let mut kept: BTreeMap<String, Vec<(Lease, u64)>> = BTreeMap::new();
    // Live leases on GPUs outside this inventory, by pool: not ours to move.
    let mut foreign: BTreeMap<String, u32> = BTreeMap::new();
    let mut free: Vec<FreeGpu> = Vec::new();
    let mut slotted = std::collections::BTreeSet::new();

    for slot in input.slots.values() {
        slotted.insert(slot.gpu.as_str());
        let gpu = inventory.get(slot.gpu.as_str());
        let usable = gpu.is_some_and(|g| g.healthy);
        match &slot.state {
            SlotState::Unreadable(_) => {}
            SlotState::Free => {
                if usable {
                    free.push(FreeGpu {
                        gpu: slot.gpu.clone(),
                        revision: Some(slot.revision),
                        previous_pool: None,
                    });
                }
            }
            SlotState::Leased(lease) => {
                let reason = if !lease.is_live(now) {
                    Some(ReleaseReason::Expired)
                } else if gpu.is_some_and(|g| !g.healthy) {
                    Some(ReleaseReason::Unhealthy)
                } else if gpu.is_none() && lease.holder == input.me {
                    Some(ReleaseReason::Gone)
                } else if gpu.is_none() {
                    if configured(&lease.pool) {
                        *foreign.entry(lease.pool.clone()).or_default() += 1;
                    }
                    None
                } else if !configured(&lease.pool) {
                    Some(ReleaseReason::PoolRemoved)
                } else {
                    kept.entry(lease.pool.clone())
                        .or_default()
                        .push((lease.clone(), slot.revision));
                    None
                };
                if let Some(reason) = reason {
                    releases.push(Action::Release {
                        lease: lease.clone(),
                        revision: slot.revision,
                        reason,
                    });
                    if usable {
                        free.push(FreeGpu {
                            gpu: slot.gpu.clone(),
                            revision: None,
                            previous_pool: Some(lease.pool.clone()),
                        });
                    }
                }
            }
        }
    }
    for gpu in input.gpus {
        if gpu.healthy && !slotted.contains(gpu.uuid.as_str()) {
            free.push(FreeGpu {
                gpu: gpu.uuid.clone(),
                revision: Some(0),
                previous_pool: None,
            });
        }
    }

    let foreign_count = |pool: &str| foreign.get(pool).copied().unwrap_or(0);
    let ours: u32 = kept.values().map(|v| v.len() as u32).sum::<u32>() + free.len() as u32;
    let capacity = ours + foreign.values().sum::<u32>();
    let wants: Vec<PoolWant> = input
        .pools
        .iter()
        .map(|p| PoolWant {
            pool: p.pool.clone(),
            min: p.min,
            desired: p.desired,
            holding: kept_count(&kept, &p.pool) + foreign_count(&p.pool),
            backlog: p.backlog,
        })
        .collect();
    let targets = fair_share(capacity, &wants);

    let mut grants = Vec::new();
    let mut renewals = Vec::new();
    // Give back first, so a pool above its share frees GPUs for one below.
    for want in &wants {
        let target_here = targets[&want.pool].saturating_sub(foreign_count(&want.pool));
        let Some(leases) = kept.get_mut(&want.pool) else {
            continue;
        };
        let excess = (leases.len() as u32).saturating_sub(target_here) as usize;
        if excess == 0 {
            continue;
        }
        // Newest first, so long-running work keeps its GPU.
        leases.sort_by(|(a, _), (b, _)| (b.granted_at, &b.gpu).cmp(&(a.granted_at, &a.gpu)));
        let reason = if want.desired < want.holding {
            ReleaseReason::Demand
        } else {
            ReleaseReason::FairShare
        };
        for (lease, revision) in leases.drain(..excess) {
            free.push(FreeGpu {
                gpu: lease.gpu.clone(),
                revision: None,
                previous_pool: Some(lease.pool.clone()),
            });
            releases.push(Action::Release {
                lease,
                revision,
                reason,
            });
        }
    }
    // Then fill: the pool furthest below its share first.
    let mut deficits: Vec<(String, u32)> = wants
        .iter()
        .map(|w| {
            let target_here = targets[&w.pool].saturating_sub(foreign_count(&w.pool));
            (
                w.pool.clone(),
                target_here.saturating_sub(kept_count(&kept, &w.pool)),
            )
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    deficits.sort_by_key(|(pool, d)| (Reverse(*d), pool.clone()));
    free.sort_by_key(|f| {
        (
            inventory
                .get(f.gpu.as_str())
                .and_then(|g| g.index)
                .unwrap_or(u32::MAX),
            f.gpu.clone(),
        )
    });
    for (pool, deficit) in deficits {
        for _ in 0..deficit {
            let pick = free
                .iter()
                .position(|f| f.previous_pool.as_deref() == Some(pool.as_str()))
                .or_else(|| (!free.is_empty()).then_some(0));
            let Some(i) = pick else { break };
            let gpu = free.remove(i);
            grants.push(Action::Grant {
                gpu: gpu.gpu,
                pool: pool.clone(),
                revision: gpu.revision,
            });
        }
    }
    for (lease, revision) in kept.values().flatten() {
        let remaining = (lease.expires_at - now).to_std().unwrap_or_default();
        if lease.holder == input.me && remaining <= input.ttl / 2 {
            renewals.push(Action::Renew {
                lease: lease.clone(),
                revision: *revision,
            });
        }
    }

    let holding = wants.iter().map(|w| (w.pool.clone(), w.holding)).collect();
    let mut actions = releases;
    actions.extend(grants);
    actions.extend(renewals);
    Plan {
        actions,
        targets,
        holding,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(target: u64, min: u32, max: u32) -> PoolConfig {
        PoolConfig {
            stream: "MESH_DELIVER".into(),
            consumers: vec!["c".into()],
            subjects: vec![],
            target_backlog_per_gpu: target,
            min_gpus: min,
            max_gpus: max,
            cooldown: Duration::from_secs(60),
        }
    }

    #[test]
    fn desired_from_backlog() {
        let p = pool(10, 0, 4);
        assert_eq!(raw_desired(0, &p), 0);
        assert_eq!(raw_desired(1, &p), 1);
        assert_eq!(raw_desired(10, &p), 1);
        assert_eq!(raw_desired(11, &p), 2);
        assert_eq!(raw_desired(1000, &p), 4);
        assert_eq!(raw_desired(0, &pool(10, 2, 4)), 2);
    }

    #[test]
    fn stabilizer_scales_up_at_once_and_down_after_cooldown() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut st = Stabilizer::new(Duration::from_secs(10));
        assert_eq!(st.observe(t0, 1), 1);
        assert_eq!(st.observe(t0 + s, 4), 4);
        assert_eq!(st.observe(t0 + 2 * s, 0), 4);
        assert_eq!(st.observe(t0 + 5 * s, 2), 4);
        assert_eq!(st.observe(t0 + 10 * s, 0), 4);
        // Ten seconds after the last 4, the highest left is the 2.
        assert_eq!(st.observe(t0 + 11 * s, 0), 2);
        assert_eq!(st.observe(t0 + 15 * s, 0), 0);
        // A rise acts at once.
        assert_eq!(st.observe(t0 + 16 * s, 3), 3);
        // Zero cooldown follows demand exactly.
        let mut z = Stabilizer::new(Duration::ZERO);
        assert_eq!(z.observe(t0, 3), 3);
        assert_eq!(z.observe(t0 + s, 0), 0);
        assert_eq!(z.current(t0 + 2 * s), None);
    }

    fn pi(pool: &str, min: u32, desired: u32, backlog: u64) -> PoolInput {
        PoolInput {
            pool: pool.into(),
            min,
            desired,
            backlog,
        }
    }

    fn want(pool: &str, min: u32, desired: u32, holding: u32, backlog: u64) -> PoolWant {
        PoolWant {
            pool: pool.into(),
            min,
            desired,
            holding,
            backlog,
        }
    }

    #[test]
    fn fair_share_rule() {
        let share = |cap, w: &[PoolWant]| fair_share(cap, w).into_values().collect::<Vec<_>>();
        // Enough for everyone: each gets what it wants.
        assert_eq!(
            share(8, &[want("a", 0, 3, 0, 30), want("b", 0, 2, 0, 20)]),
            vec![3, 2]
        );
        // Scarce: equal split, the remainder to the one already holding more.
        assert_eq!(
            share(3, &[want("a", 0, 4, 1, 40), want("b", 0, 4, 2, 40)]),
            vec![1, 2]
        );
        // Scarce, nobody holding: the larger backlog gets the odd GPU.
        assert_eq!(
            share(3, &[want("a", 0, 4, 0, 35), want("b", 0, 4, 0, 40)]),
            vec![1, 2]
        );
        // A small demand is met in full; the rest goes to the big one.
        assert_eq!(
            share(4, &[want("a", 0, 1, 0, 5), want("b", 0, 8, 0, 80)]),
            vec![1, 3]
        );
        // Minimums come first.
        assert_eq!(
            share(2, &[want("a", 2, 2, 0, 0), want("b", 0, 8, 2, 80)]),
            vec![2, 0]
        );
        // Nothing wanted, nothing dealt.
        assert_eq!(share(4, &[want("a", 0, 0, 0, 0)]), vec![0]);
    }

    fn gpu(uuid: &str, index: u32, healthy: bool) -> GpuInfo {
        GpuInfo {
            uuid: uuid.into(),
            index: Some(index),
            name: "t".into(),
            memory_total_mib: 0,
            memory_used_mib: None,
            utilization_percent: None,
            healthy,
            problem: None,
        }
    }

    fn leased(
        gpu: &str,
        pool: &str,
        holder: &str,
        granted: DateTime<Utc>,
        ttl_s: i64,
        rev: u64,
    ) -> (String, Slot) {
        (
            gpu.into(),
            Slot {
                gpu: gpu.into(),
                revision: rev,
                state: SlotState::Leased(Lease {
                    pool: pool.into(),
                    gpu: gpu.into(),
                    holder: holder.into(),
                    granted_at: granted,
                    expires_at: granted + chrono::Duration::seconds(ttl_s),
                }),
            },
        )
    }

    fn summary(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::Release { lease, reason, .. } => {
                    format!("release {} {} {}", lease.gpu, lease.pool, reason.as_str())
                }
                Action::Grant {
                    gpu,
                    pool,
                    revision,
                } => format!("grant {gpu} {pool} {revision:?}"),
                Action::Renew { lease, .. } => format!("renew {}", lease.gpu),
            })
            .collect()
    }

    #[test]
    fn plan_grants_free_gpus_in_index_order() {
        let now = Utc::now();
        let gpus = [gpu("g1", 1, true), gpu("g0", 0, true), gpu("g2", 2, true)];
        let slots = BTreeMap::from([(
            "g1".to_owned(),
            Slot {
                gpu: "g1".into(),
                revision: 7,
                state: SlotState::Free,
            },
        )]);
        let pools = [pi("coder", 0, 2, 20)];
        let p = plan(&PlanInput {
            now,
            me: "a",
            ttl: Duration::from_secs(10),
            gpus: &gpus,
            slots: &slots,
            pools: &pools,
        });
        assert_eq!(
            summary(&p),
            ["grant g0 coder Some(0)", "grant g1 coder Some(7)"]
        );
        assert_eq!(p.targets["coder"], 2);
    }

    #[test]
    fn plan_releases_expired_unhealthy_gone_and_renews_own() {
        let now = Utc::now();
        let old = now - chrono::Duration::seconds(8);
        let gpus = [
            gpu("g0", 0, true),
            gpu("g1", 1, false),
            gpu("g2", 2, true),
            gpu("g3", 3, true),
        ];
        let slots = BTreeMap::from([
            leased("g0", "coder", "dead", old, 5, 1),   // expired
            leased("g1", "coder", "a", now, 10, 2),     // unhealthy
            leased("g2", "coder", "a", old, 10, 3),     // ours, 2 s left: renew
            leased("g9", "coder", "a", now, 10, 4),     // ours, vanished
            leased("g8", "coder", "other", now, 10, 5), // another host's
        ]);
        let pools = [pi("coder", 0, 3, 30)];
        let p = plan(&PlanInput {
            now,
            me: "a",
            ttl: Duration::from_secs(10),
            gpus: &gpus,
            slots: &slots,
            pools: &pools,
        });
        assert_eq!(
            summary(&p),
            [
                "release g0 coder expired",
                "release g1 coder unhealthy",
                "release g9 coder gone",
                // 3 wanted: g8 (foreign) and g2 count, so one more: the GPU
                // the pool just lost to expiry.
                "grant g0 coder None",
                "renew g2",
            ]
        );
    }

    #[test]
    fn plan_releases_newest_on_lower_demand_and_preempts_for_fairness() {
        let now = Utc::now();
        let t = |s: i64| now - chrono::Duration::seconds(s);
        let gpus = [
            gpu("g0", 0, true),
            gpu("g1", 1, true),
            gpu("g2", 2, true),
            gpu("g3", 3, true),
        ];
        let slots = BTreeMap::from([
            leased("g0", "a", "me", t(4), 10, 1),
            leased("g1", "a", "me", t(3), 10, 2),
            leased("g2", "a", "me", t(2), 10, 3),
            leased("g3", "a", "me", t(1), 10, 4),
        ]);
        let input = |pools| PlanInput {
            now,
            me: "me",
            ttl: Duration::from_secs(10),
            gpus: &gpus,
            slots: &slots,
            pools,
        };
        let lower = [pi("a", 0, 2, 20)];
        assert_eq!(
            summary(&plan(&input(&lower))),
            ["release g3 a demand", "release g2 a demand"]
        );
        let contested = [pi("a", 0, 4, 40), pi("b", 0, 2, 20)];
        assert_eq!(
            summary(&plan(&input(&contested))),
            [
                "release g3 a fair-share",
                "release g2 a fair-share",
                "grant g2 b None",
                "grant g3 b None"
            ]
        );
    }

    #[test]
    fn plan_leaves_unreadable_and_others_live_leases() {
        let now = Utc::now();
        let gpus = [gpu("g0", 0, true), gpu("g1", 1, true)];
        let slots = BTreeMap::from([
            (
                "g0".to_owned(),
                Slot {
                    gpu: "g0".into(),
                    revision: 1,
                    state: SlotState::Unreadable("junk".into()),
                },
            ),
            leased("g1", "coder", "other", now, 10, 2),
        ]);
        let pools = [pi("coder", 0, 2, 20)];
        let p = plan(&PlanInput {
            now,
            me: "a",
            ttl: Duration::from_secs(10),
            gpus: &gpus,
            slots: &slots,
            pools: &pools,
        });
        assert!(p.actions.is_empty(), "{:?}", summary(&p));
        assert_eq!(p.holding["coder"], 1);
    }
}
