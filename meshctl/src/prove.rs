//! `meshctl policy prove` and `meshctl policy diff --prove`: proofs about a
//! policy set with Cedar's symbolic compiler (`cedar-policy-symcc`) and the
//! cvc5 SMT solver, over every request the schema allows and every entity
//! store that conforms to it (not only `entities.json`).
//!
//! The claims come from the directory's `properties.toml`
//! ([`policy_engine::Properties`]); each one is proved, or refuted with a
//! counterexample request that meshctl then decides again with Cedar's
//! authorizer, so a counterexample shown is one Cedar agrees with. A solver
//! that is missing, too old, crashes or runs past `--timeout` ends the
//! command with its own exit code and message, never with "proved".

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cedar_policy::{ActionConstraint, Authorizer, Decision, Policy, PolicySet, RequestEnv, Schema};
use cedar_policy_symcc::err::{Error as SymError, SolverError};
use cedar_policy_symcc::solver::LocalSolver;
use cedar_policy_symcc::{CedarSymCompiler, CompiledPolicy, CompiledPolicySet, Env};
use policy_engine::{Check, PROPERTIES_FILE, PolicyBundle, Properties};
use serde::Serialize;

use crate::exit::{Exit, fail};

/// The oldest cvc5 that `cedar-policy-symcc` works with.
const MIN_CVC5: (u32, u32) = (1, 3);

/// Which solver, and how long it may take.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SolverArgs {
    /// The cvc5 executable (1.3 or newer); `scripts/install-deps.sh` installs one.
    #[arg(long = "solver", env = "CVC5", default_value = "cvc5")]
    pub solver: PathBuf,
    /// How long the whole proof may take (e.g. `30s`, `5m`).
    #[arg(long, default_value = "2m", value_parser = crate::output::parse_duration)]
    pub timeout: Duration,
}

/// A request a check found, with how Cedar decides it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Counterexample {
    /// `Type::"id"` of the principal.
    principal: String,
    /// `Action::"..."`.
    action: String,
    /// `Type::"id"` of the resource.
    resource: String,
    /// The request's context, as Cedar's JSON.
    context: serde_json::Value,
    /// The entity store the request is decided with (Cedar's entities JSON).
    entities: serde_json::Value,
    /// Cedar's decision with the set checked: `allow` or `deny`.
    decision: &'static str,
    /// The policies that determined it (for `never-errors`: the one that errs).
    reasons: Vec<String>,
    /// Evaluation errors, as Cedar reports them.
    errors: Vec<String>,
}

impl Counterexample {
    fn of(env: &Env, set: &PolicySet) -> anyhow::Result<Self> {
        let response = Authorizer::new().is_authorized(&env.request, set, &env.entities);
        let uid =
            |u: Option<&cedar_policy::EntityUid>| u.map(ToString::to_string).unwrap_or_default();
        Ok(Self {
            principal: uid(env.request.principal()),
            action: uid(env.request.action()),
            resource: uid(env.request.resource()),
            context: match env.request.context() {
                Some(c) => c
                    .to_json_value()
                    .context("writing the counterexample's context")?,
                None => serde_json::Value::Null,
            },
            entities: sorted(
                env.entities
                    .to_json_value()
                    .context("writing the counterexample's entities")?,
            ),
            decision: match response.decision() {
                Decision::Allow => "allow",
                Decision::Deny => "deny",
            },
            reasons: response
                .diagnostics()
                .reason()
                .map(ToString::to_string)
                .collect(),
            errors: response
                .diagnostics()
                .errors()
                .map(ToString::to_string)
                .collect(),
        })
    }

    /// The lines of the text report, indented by `pad`.
    fn lines(&self, pad: &str) -> Vec<String> {
        let mut lines = vec![format!(
            "{pad}request: {} {} {} → {}{}",
            self.principal,
            self.action,
            self.resource,
            self.decision,
            if self.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", self.reasons.join(", "))
            }
        )];
        lines.push(format!("{pad}context: {}", self.context));
        // The request's own principal and resource; the rest (roles,
        // actions, other tools) is in `-o json`.
        let entities = self.entities.as_array().map_or(&[][..], Vec::as_slice);
        let named = |e: &&serde_json::Value| {
            let uid = format!(
                "{}::{}",
                e["uid"]["type"].as_str().unwrap_or_default(),
                serde_json::Value::from(e["uid"]["id"].as_str().unwrap_or_default())
            );
            uid == self.principal || uid == self.resource
        };
        let shown: Vec<&serde_json::Value> = entities.iter().filter(named).collect();
        for entity in &shown {
            lines.push(format!("{pad}entity: {entity}"));
        }
        if entities.len() > shown.len() {
            lines.push(format!(
                "{pad}({} more entities in the store: -o json lists them)",
                entities.len() - shown.len()
            ));
        }
        for error in &self.errors {
            lines.push(format!("{pad}error: {error}"));
        }
        lines
    }
}

/// Cedar's entities JSON in a stable order (by type, then id).
fn sorted(mut entities: serde_json::Value) -> serde_json::Value {
    if let Some(list) = entities.as_array_mut() {
        list.sort_by_key(|e| (e["uid"]["type"].to_string(), e["uid"]["id"].to_string()));
    }
    entities
}

/// The solver's name and version, as it says.
#[derive(Debug, Clone, Serialize)]
struct SolverInfo {
    path: String,
    version: String,
}

/// A running proof: the solver, its path for messages, and every request
/// kind (principal type, action, resource type) of the schema.
struct Prover {
    compiler: CedarSymCompiler<LocalSolver>,
    solver: PathBuf,
    schema: Schema,
    envs: Vec<RequestEnv>,
}

/// Runs `--version` of the solver and checks it is cvc5 1.3 or newer.
async fn solver_version(solver: &Path) -> anyhow::Result<String> {
    let shown = solver.display();
    let run = tokio::process::Command::new(solver)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = match tokio::time::timeout(Duration::from_secs(30), run).await {
        Err(_) => {
            return Err(fail(
                Exit::TimedOut,
                format!("the SMT solver `{shown} --version` did not answer within 30 s"),
            ));
        }
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(fail(
                Exit::NotFound,
                format!(
                    "the SMT solver `{shown}` was not found: install cvc5 1.3 or newer (`scripts/install-deps.sh` installs one as /usr/local/bin/cvc5) or name it with --solver / CVC5"
                ),
            ));
        }
        Ok(Err(e)) => {
            return Err(fail(
                Exit::Failed,
                format!("the SMT solver `{shown}` could not be started: {e}"),
            ));
        }
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&stdout);
    match version {
        Some((v, major, minor)) if out.status.success() && (major, minor) >= MIN_CVC5 => Ok(v),
        Some((v, _, _)) if out.status.success() => Err(fail(
            Exit::Failed,
            format!(
                "the SMT solver `{shown}` is cvc5 {v}; the symbolic compiler needs cvc5 {}.{} or newer (Debian's `cvc5` package is older: `scripts/install-deps.sh` installs a current one)",
                MIN_CVC5.0, MIN_CVC5.1
            ),
        )),
        _ => Err(fail(
            Exit::Failed,
            format!(
                "`{shown} --version` did not say it is cvc5 ({}): {}{}",
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        )),
    }
}

/// `1.4.2` from `This is cvc5 version 1.4.2 [...]`, with its major and minor.
fn parse_version(text: &str) -> Option<(String, u32, u32)> {
    let rest = text.split("cvc5 version ").nth(1)?;
    let version: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((version.trim_end_matches('.').to_owned(), major, minor))
}

impl Prover {
    async fn start(args: &SolverArgs, schema: &Schema) -> anyhow::Result<(Self, SolverInfo)> {
        let version = solver_version(&args.solver).await?;
        let mut command = tokio::process::Command::new(&args.solver);
        command.args(["--lang", "smt"]).kill_on_drop(true);
        let local = LocalSolver::from_command(&mut command).map_err(|e| {
            fail(
                Exit::Failed,
                format!("starting the SMT solver `{}`: {e}", args.solver.display()),
            )
        })?;
        let compiler = CedarSymCompiler::new(local)
            .map_err(|e| fail(Exit::Failed, format!("starting the symbolic compiler: {e}")))?;
        Ok((
            Self {
                compiler,
                solver: args.solver.clone(),
                schema: schema.clone(),
                envs: schema.request_envs().collect(),
            },
            SolverInfo {
                path: args.solver.display().to_string(),
                version,
            },
        ))
    }

    /// A failure of the symbolic compiler or the solver, with its exit code.
    fn failed(&self, what: &str, e: SymError) -> anyhow::Error {
        let solver = self.solver.display();
        match e {
            SymError::SolverError(SolverError::Io(io)) => fail(
                Exit::Failed,
                format!(
                    "{what}: the SMT solver `{solver}` stopped answering ({io}): it crashed or was killed; nothing was proved"
                ),
            ),
            SymError::SolverError(e) => fail(
                Exit::Failed,
                format!("{what}: the SMT solver `{solver}` failed ({e}); nothing was proved"),
            ),
            SymError::SolverUnknown => fail(
                Exit::Failed,
                format!(
                    "{what}: the SMT solver `{solver}` answered `unknown` (it gave up); nothing was proved"
                ),
            ),
            other => fail(Exit::Failed, format!("{what}: {other}")),
        }
    }

    fn compile_set(
        &self,
        set: &PolicySet,
        env: &RequestEnv,
        what: &str,
    ) -> anyhow::Result<CompiledPolicySet> {
        CompiledPolicySet::compile(set, env, &self.schema).map_err(|e| {
            fail(
                Exit::Failed,
                format!("{what}: compiling for {}: {e}", describe(env)),
            )
        })
    }

    /// A policy that errs on some request, if one does.
    async fn never_errors(&mut self, set: &PolicySet) -> anyhow::Result<Option<Counterexample>> {
        let envs = self.envs.clone();
        for env in &envs {
            for policy in set.policies() {
                if !may_apply(policy, env) {
                    continue;
                }
                let compiled = CompiledPolicy::compile(policy, env, &self.schema).map_err(|e| {
                    fail(
                        Exit::Failed,
                        format!(
                            "policy `{}`: compiling for {}: {e}",
                            policy.id(),
                            describe(env)
                        ),
                    )
                })?;
                let found = self
                    .compiler
                    .check_never_errors_with_counterexample_opt(&compiled)
                    .await
                    .map_err(|e| self.failed(&format!("policy `{}`", policy.id()), e))?;
                if let Some(env) = found {
                    let mut single = PolicySet::new();
                    single.add(policy.clone())?;
                    let cex = Counterexample::of(&env, &single)?;
                    if cex.errors.is_empty() {
                        return Err(unreproduced("never-errors"));
                    }
                    let mut cex = Counterexample::of(&env, set)?;
                    cex.reasons = vec![policy.id().to_string()];
                    return Ok(Some(cex));
                }
            }
        }
        Ok(None)
    }

    /// A request of `requests` that `set` allows (`never-allows`), or that
    /// it denies (`always-allows`), if one exists.
    async fn scoped(
        &mut self,
        check: Check,
        set: &PolicySet,
        requests: &PolicySet,
        id: &str,
    ) -> anyhow::Result<Option<Counterexample>> {
        let envs = self.envs.clone();
        for env in &envs {
            if !requests.policies().any(|p| may_apply(p, env)) {
                continue;
            }
            let what = format!("property `{id}`");
            let compiled = self.compile_set(set, env, &what)?;
            let scope = self.compile_set(requests, env, &what)?;
            let found = match check {
                Check::NeverAllows => {
                    self.compiler
                        .check_disjoint_with_counterexample_opt(&compiled, &scope)
                        .await
                }
                _ => {
                    self.compiler
                        .check_implies_with_counterexample_opt(&scope, &compiled)
                        .await
                }
            }
            .map_err(|e| self.failed(&what, e))?;
            if let Some(env) = found {
                let cex = Counterexample::of(&env, set)?;
                let in_scope = Authorizer::new()
                    .is_authorized(&env.request, requests, &env.entities)
                    .decision()
                    == Decision::Allow;
                let want = if check == Check::NeverAllows {
                    "allow"
                } else {
                    "deny"
                };
                if !in_scope || cex.decision != want {
                    return Err(unreproduced(id));
                }
                return Ok(Some(cex));
            }
        }
        Ok(None)
    }

    /// A request `wider` allows and `narrower` denies, if one exists.
    async fn allowed_only_by(
        &mut self,
        wider: &PolicySet,
        narrower: &PolicySet,
        what: &str,
    ) -> anyhow::Result<Option<(Counterexample, Counterexample)>> {
        let envs = self.envs.clone();
        for env in &envs {
            let a = self.compile_set(wider, env, what)?;
            let b = self.compile_set(narrower, env, what)?;
            let found = self
                .compiler
                .check_implies_with_counterexample_opt(&a, &b)
                .await
                .map_err(|e| self.failed(what, e))?;
            if let Some(env) = found {
                let by_wider = Counterexample::of(&env, wider)?;
                let by_narrower = Counterexample::of(&env, narrower)?;
                if by_wider.decision != "allow" || by_narrower.decision != "deny" {
                    return Err(unreproduced(what));
                }
                return Ok(Some((by_wider, by_narrower)));
            }
        }
        Ok(None)
    }
}

/// Whether `policy` can match requests of `env` at all: a policy naming
/// another action (`action ==`) cannot; anything else is left to the
/// compiler.
fn may_apply(policy: &Policy, env: &RequestEnv) -> bool {
    match policy.action_constraint() {
        ActionConstraint::Eq(action) => &action == env.action(),
        ActionConstraint::Any | ActionConstraint::In(_) => true,
    }
}

fn describe(env: &RequestEnv) -> String {
    format!(
        "principal {}, action {}, resource {}",
        env.principal(),
        env.action(),
        env.resource()
    )
}

fn unreproduced(what: &str) -> anyhow::Error {
    fail(
        Exit::Failed,
        format!(
            "{what}: the solver's counterexample does not reproduce with Cedar's authorizer: the solver is not answering correctly; nothing was proved or refuted"
        ),
    )
}

/// One property's outcome.
#[derive(Debug, Serialize)]
struct PropertyResult {
    id: String,
    description: String,
    check: &'static str,
    /// `proved` or `failed`.
    result: &'static str,
    /// Its line in `properties.toml`.
    line: usize,
    /// A request that refutes it (`failed` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    counterexample: Option<Counterexample>,
}

/// The JSON document of `meshctl policy prove -o json`.
#[derive(Debug, Serialize)]
struct ProveReport {
    dir: String,
    policy_hash: String,
    policies: usize,
    properties_file: String,
    solver: SolverInfo,
    request_kinds: usize,
    proved: usize,
    failed: usize,
    millis: u128,
    properties: Vec<PropertyResult>,
}

/// `meshctl policy prove DIR`: `Ok(false)` when a property fails.
pub(crate) async fn prove(dir: &Path, args: &SolverArgs, json: bool) -> anyhow::Result<bool> {
    let bundle = PolicyBundle::load(dir)
        .with_context(|| format!("policies in `{}` refused", dir.display()))?;
    let properties = Properties::load(dir, bundle.schema(), bundle.entities())
        .with_context(|| format!("properties in `{}` refused", dir.display()))?
        .ok_or_else(|| {
            fail(
                Exit::NotFound,
                format!(
                    "no `{PROPERTIES_FILE}` in `{}`: nothing to prove (docs/policies.md shows the format)",
                    dir.display()
                ),
            )
        })?;
    let started = Instant::now();
    let run = async {
        let (mut prover, solver) = Prover::start(args, bundle.schema()).await?;
        let mut results = Vec::new();
        for property in &properties.properties {
            let cex = match (&property.requests, property.check) {
                (None, _) | (_, Check::NeverErrors) => {
                    prover.never_errors(bundle.policies()).await?
                }
                (Some(requests), check) => {
                    prover
                        .scoped(check, bundle.policies(), requests, &property.id)
                        .await?
                }
            };
            results.push(PropertyResult {
                id: property.id.clone(),
                description: property.description.clone(),
                check: property.check.as_str(),
                result: if cex.is_some() { "failed" } else { "proved" },
                line: property.line,
                counterexample: cex,
            });
        }
        anyhow::Ok((solver, prover.envs.len(), results))
    };
    let (solver, request_kinds, results) = within(args, run).await?;
    let failed = results
        .iter()
        .filter(|r| r.counterexample.is_some())
        .count();
    let report = ProveReport {
        dir: dir.display().to_string(),
        policy_hash: bundle.hash().to_owned(),
        policies: bundle.len(),
        properties_file: properties.path.display().to_string(),
        solver,
        request_kinds,
        proved: results.len() - failed,
        failed,
        millis: started.elapsed().as_millis(),
        properties: results,
    };
    if json {
        crate::output::print_json(&report)?;
    } else {
        outln!(
            "{}: {} policies, policy hash {}; {} properties over {} request kinds, with cvc5 {}",
            report.dir,
            report.policies,
            report.policy_hash,
            report.properties.len(),
            report.request_kinds,
            report.solver.version
        );
        let width = report
            .properties
            .iter()
            .map(|r| r.id.len())
            .max()
            .unwrap_or(0);
        for r in &report.properties {
            outln!("  {:<6}  {:<width$}  {}", r.result, r.id, r.description);
            if let Some(cex) = &r.counterexample {
                outln!("          counterexample ({}):", r.check);
                for line in cex.lines("            ") {
                    outln!("{line}");
                }
            }
        }
        outln!(
            "{} proved, {} failed ({:.1} s)",
            report.proved,
            report.failed,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(report.failed == 0)
}

/// Runs `run` within `--timeout`; past it the solver is killed (its
/// process is dropped with `run`).
async fn within<T>(
    args: &SolverArgs,
    run: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(args.timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(fail(
            Exit::TimedOut,
            format!(
                "the SMT solver `{}` did not finish within {} (--timeout); nothing was proved",
                args.solver.display(),
                crate::output::format_duration(args.timeout)
            ),
        )),
    }
}

/// What `diff --prove` found.
#[derive(Debug, Serialize)]
struct Proof {
    /// `equivalent`, `narrows` (NEW allows only what OLD allowed),
    /// `widens` (NEW allows a request OLD denied, and denies none OLD
    /// allowed) or `changes` (both).
    verdict: &'static str,
    /// Whether every request NEW allows, OLD allowed.
    implies: bool,
    /// A request NEW allows and OLD denied (with NEW's decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_only_by_new: Option<Counterexample>,
    /// A request OLD allowed and NEW denies (with NEW's decision).
    #[serde(skip_serializing_if = "Option::is_none")]
    denied_only_by_new: Option<Counterexample>,
    solver: SolverInfo,
    request_kinds: usize,
    millis: u128,
}

/// The JSON document of `meshctl policy diff -o json`.
#[derive(Debug, Serialize)]
struct DiffReport {
    old: String,
    new: String,
    old_hash: String,
    new_hash: String,
    added: Vec<String>,
    removed: Vec<String>,
    changed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prove: Option<Proof>,
}

/// `meshctl policy diff OLD NEW [--prove]`: `Ok(false)` when the proof
/// finds a request NEW allows and OLD denied.
pub(crate) async fn diff(
    old: &Path,
    new: &Path,
    prove: bool,
    args: &SolverArgs,
    json: bool,
) -> anyhow::Result<bool> {
    let load = |dir: &Path| {
        PolicyBundle::load(dir).with_context(|| format!("policies in `{}` refused", dir.display()))
    };
    let (old_bundle, new_bundle) = (load(old)?, load(new)?);
    let text = |set: &PolicySet| -> std::collections::BTreeMap<String, String> {
        set.policies()
            .map(|p| (p.id().to_string(), p.to_string()))
            .collect()
    };
    let (a, b) = (text(old_bundle.policies()), text(new_bundle.policies()));
    let added: Vec<String> = b.keys().filter(|k| !a.contains_key(*k)).cloned().collect();
    let removed: Vec<String> = a.keys().filter(|k| !b.contains_key(*k)).cloned().collect();
    let changed: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k).is_some_and(|w| w != *v))
        .map(|(k, _)| k.clone())
        .collect();
    let proof = if prove {
        let started = Instant::now();
        // Both sets are compiled with NEW's schema: OLD's policies must
        // type-check against it (a schema that only grew is fine).
        let schema = new_bundle.schema();
        let (old_set, new_set) = (old_bundle.policies(), new_bundle.policies());
        let run = async {
            let (mut prover, solver) = Prover::start(args, schema).await?;
            let widened = prover
                .allowed_only_by(new_set, old_set, "NEW implies OLD")
                .await?;
            let narrowed = prover
                .allowed_only_by(old_set, new_set, "OLD implies NEW")
                .await?;
            anyhow::Ok((solver, prover.envs.len(), widened, narrowed))
        };
        let (solver, request_kinds, widened, narrowed) = within(args, run).await?;
        let verdict = match (&widened, &narrowed) {
            (None, None) => "equivalent",
            (None, Some(_)) => "narrows",
            (Some(_), None) => "widens",
            (Some(_), Some(_)) => "changes",
        };
        Some(Proof {
            verdict,
            implies: widened.is_none(),
            allowed_only_by_new: widened.map(|(by_new, _)| by_new),
            denied_only_by_new: narrowed.map(|(_, by_new)| by_new),
            solver,
            request_kinds,
            millis: started.elapsed().as_millis(),
        })
    } else {
        None
    };
    let report = DiffReport {
        old: old.display().to_string(),
        new: new.display().to_string(),
        old_hash: old_bundle.hash().to_owned(),
        new_hash: new_bundle.hash().to_owned(),
        added,
        removed,
        changed,
        prove: proof,
    };
    let ok = report.prove.as_ref().is_none_or(|p| p.implies);
    if json {
        crate::output::print_json(&report)?;
        return Ok(ok);
    }
    outln!(
        "{} ({}) → {} ({})",
        report.old,
        report.old_hash,
        report.new,
        report.new_hash
    );
    for (label, ids) in [
        ("added", &report.added),
        ("removed", &report.removed),
        ("changed", &report.changed),
    ] {
        if !ids.is_empty() {
            outln!("  {label:<8} {}", ids.join(", "));
        }
    }
    if report.added.is_empty() && report.removed.is_empty() && report.changed.is_empty() {
        outln!("  no policy added, removed or changed");
    }
    if let Some(p) = &report.prove {
        let says = match p.verdict {
            "equivalent" => "NEW is equivalent to OLD: it allows exactly the requests OLD allows",
            "narrows" => {
                "NEW narrows OLD: every request NEW allows, OLD allowed; some OLD allowed, NEW denies"
            }
            "widens" => {
                "NEW widens OLD: it allows a request OLD denied (and denies none OLD allowed)"
            }
            _ => {
                "NEW changes OLD both ways: it allows a request OLD denied, and denies one OLD allowed"
            }
        };
        outln!(
            "proved with cvc5 {} over {} request kinds: {says}",
            p.solver.version,
            p.request_kinds
        );
        if let Some(cex) = &p.allowed_only_by_new {
            outln!("  a request NEW allows and OLD denied:");
            for line in cex.lines("    ") {
                outln!("{line}");
            }
        }
        if let Some(cex) = &p.denied_only_by_new {
            outln!("  a request OLD allowed and NEW denies:");
            for line in cex.lines("    ") {
                outln!("{line}");
            }
        }
    }
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_what_cvc5_prints() {
        assert_eq!(
            parse_version("This is cvc5 version 1.4.2-modified [SMT-LIB front end]\n"),
            Some(("1.4.2".to_owned(), 1, 4))
        );
        assert_eq!(
            parse_version(
                "This is cvc5 version 1.0.3 [git tag 1.0.3 branch HEAD]\ncompiled with GCC"
            ),
            Some(("1.0.3".to_owned(), 1, 0))
        );
        assert_eq!(parse_version("z3 version 4.8"), None);
        assert!((1, 0) < MIN_CVC5 && (1, 4) >= MIN_CVC5 && (2, 0) >= MIN_CVC5);
    }

    #[test]
    fn a_policy_for_another_action_cannot_apply() {
        let schema = Schema::from_cedarschema_str(
            "entity A; action \"x\", \"y\" appliesTo { principal: A, resource: A };",
        )
        .unwrap()
        .0;
        let policy: Policy = "permit (principal, action == Action::\"x\", resource);"
            .parse()
            .unwrap();
        let any: Policy = "permit (principal, action, resource);".parse().unwrap();
        let envs: Vec<RequestEnv> = schema.request_envs().collect();
        assert_eq!(envs.len(), 2);
        let applies: Vec<bool> = envs.iter().map(|e| may_apply(&policy, e)).collect();
        assert_eq!(applies.iter().filter(|a| **a).count(), 1);
        assert!(envs.iter().all(|e| may_apply(&any, e)));
    }
}
