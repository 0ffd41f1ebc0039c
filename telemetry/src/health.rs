//! Liveness and readiness: `/healthz` answers while the process serves
//! requests; `/readyz` only while every named check passes (NATS connected,
//! ClickHouse reachable, policies loaded, consumers running, ...).

use std::fmt::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

type ProbeFn = dyn Fn() -> bool + Send + Sync;

enum Probe {
    Flag(Arc<AtomicBool>),
    Fn(Box<ProbeFn>),
}

impl Probe {
    fn passes(&self) -> bool {
        match self {
            Probe::Flag(flag) => flag.load(Ordering::Relaxed),
            Probe::Fn(f) => f(),
        }
    }
}

/// The readiness checks of one service; cheap to clone.
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<RwLock<Vec<(&'static str, Probe)>>>,
}

impl fmt::Debug for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (ready, report) = self.report();
        f.debug_struct("Health")
            .field("ready", &ready)
            .field("report", &report)
            .finish()
    }
}

/// A readiness check the service sets itself (see [`Health::flag`]).
#[derive(Debug, Clone)]
pub struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// Marks the check as passing (`true`) or failing.
    pub fn set(&self, ok: bool) {
        self.0.store(ok, Ordering::Relaxed);
    }

    /// Whether the check passes now.
    pub fn get(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

impl Health {
    /// A check named `name` that the service flips itself, starting at `initial`.
    pub fn flag(&self, name: &'static str, initial: bool) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(initial));
        self.push(name, Probe::Flag(flag.clone()));
        ReadyFlag(flag)
    }

    /// A check named `name` evaluated on each `/readyz` request; it must be
    /// cheap and must not block (read a state, do not call a server).
    pub fn probe(&self, name: &'static str, probe: impl Fn() -> bool + Send + Sync + 'static) {
        self.push(name, Probe::Fn(Box::new(probe)));
    }

    fn push(&self, name: &'static str, probe: Probe) {
        if let Ok(mut checks) = self.checks.write() {
            checks.retain(|(n, _)| *n != name);
            checks.push((name, probe));
        }
    }

    /// Ready when at least one check is registered and all pass.
    pub fn is_ready(&self) -> bool {
        self.report().0
    }

    /// Readiness and one `name: ok|failing` line per check.
    pub fn report(&self) -> (bool, String) {
        let Ok(checks) = self.checks.read() else {
            return (false, "checks unavailable\n".into());
        };
        let mut ready = !checks.is_empty();
        let mut text = String::new();
        if checks.is_empty() {
            text.push_str("starting\n");
        }
        for (name, probe) in checks.iter() {
            let ok = probe.passes();
            ready &= ok;
            let _ = writeln!(text, "{name}: {}", if ok { "ok" } else { "failing" });
        }
        (ready, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let health = Health::default();
        assert!(!health.is_ready(), "no checks yet: still starting");
        let nats = health.flag("nats", true);
        let started = health.flag("consumer", false);
        health.probe("policies", || true);
        let (ready, report) = health.report();
        assert!(!ready);
        assert_eq!(report, "nats: ok\nconsumer: failing\npolicies: ok\n");
        started.set(true);
        assert!(health.is_ready());
        nats.set(false);
        assert!(!health.is_ready());
        // Registering a name again replaces the check.
        health.flag("nats", true);
        assert!(health.is_ready());
    }
}
