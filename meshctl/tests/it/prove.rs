//! `meshctl policy prove` and `meshctl policy diff --prove` as a user runs
//! them: the shipped properties proved with the real cvc5 solver
//! (`scripts/install-deps.sh` installs it as `cvc5`), a broken property
//! refuted with a request Cedar decides the same way, a change proved to
//! narrow, widen or keep a set, and every way the solver can fail ending
//! with its own exit code and never with "proved".

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside `#[test]` fns panic to fail the test, too"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn shipped() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
}

fn meshctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env_remove("CVC5")
        .output()
        .expect("meshctl runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(out), stderr(out)))
}

/// A copy of the shipped policy directory, to change.
fn copy_of_shipped() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
        }
    }
    dir
}

/// The claim docs/guardrails.md adds about reviewers, which the shipped set
/// does not keep (every member may call low-risk tools).
const REVIEWERS_CLAIM: &str = r#"
[[property]]
id = "reviewers-never-call-tools"
description = "An agent in role reviewer never calls a tool, whatever other roles it has."
check = "never-allows"
scope = '''
principal in Role::"reviewer",
action == Action::"io.agentmesh.tool.call",
resource
'''
"#;

/// A copy of the shipped set in `parent/before` with the reviewers claim
/// added to its properties.
fn with_reviewer_claim(parent: &Path) -> PathBuf {
    let dir = parent.join("before");
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(shipped()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
    }
    let path = dir.join("properties.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{REVIEWERS_CLAIM}")).unwrap();
    dir
}

/// `parent/before` and `parent/after`: the same, plus the example guardrail
/// that keeps reviewers off tools (examples/policies/reviewers.cedar).
fn with_reviewer_guardrail(parent: &Path) -> (PathBuf, PathBuf) {
    let before = with_reviewer_claim(parent);
    let after = parent.join("after");
    std::fs::create_dir(&after).unwrap();
    for entry in std::fs::read_dir(&before).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, after.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        shipped().join("../examples/policies/reviewers.cedar"),
        after.join("reviewers.cedar"),
    )
    .unwrap();
    (before, after)
}

fn property<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["properties"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == id)
        .unwrap_or_else(|| panic!("no property `{id}` in {report:#}"))
}

#[test]
fn the_shipped_properties_are_proved() {
    let dir = shipped();
    let out = meshctl(&["policy", "prove", &dir.to_string_lossy(), "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report = json(&out);
    crate::support::json_shapes::check("policy prove", &report);
    for id in [
        "never-errors",
        "nobody-runs-shell-exec",
        "nobody-calls-high-risk-tools",
        "no-secrets-leave",
        "members-record-clean-steps",
    ] {
        let p = property(&report, id);
        assert_eq!(p["result"], "proved", "{p:#}");
        assert!(p.get("counterexample").is_none(), "{p:#}");
        assert!(p["line"].as_u64().unwrap() > 0);
    }
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["proved"],
        report["properties"].as_array().unwrap().len()
    );
    assert_eq!(
        report["policy_hash"],
        policy_engine::PolicyBundle::load(&dir).unwrap().hash()
    );
    let version = report["solver"]["version"].as_str().unwrap();
    let minor: u32 = version.split('.').nth(1).unwrap().parse().unwrap();
    assert!(version.starts_with("1.") && minor >= 3, "{version}");
    assert!(report["request_kinds"].as_u64().unwrap() >= 10);

    let text = meshctl(&["policy", "prove", &dir.to_string_lossy()]);
    assert_eq!(text.status.code(), Some(0), "{}", stderr(&text));
    let text = stdout(&text);
    assert!(text.contains("proved  nobody-runs-shell-exec"), "{text}");
    assert!(text.contains("5 proved, 0 failed"), "{text}");
}

#[test]
fn a_property_the_set_breaks_is_refuted_with_a_request_cedar_allows() {
    let parent = tempfile::tempdir().unwrap();
    let dir = with_reviewer_claim(parent.path());
    let out = meshctl(&["policy", "prove", &dir.to_string_lossy(), "-o", "json"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report = json(&out);
    crate::support::json_shapes::check("policy prove", &report);
    assert_eq!(report["failed"], 1, "{report:#}");
    assert_eq!(
        property(&report, "nobody-runs-shell-exec")["result"],
        "proved"
    );
    let broken = property(&report, "reviewers-never-call-tools");
    assert_eq!(broken["result"], "failed");
    let cex = &broken["counterexample"];
    assert_eq!(cex["action"], "Action::\"io.agentmesh.tool.call\"");
    assert_eq!(cex["decision"], "allow");
    assert!(
        cex["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "members-call-low-risk-tools" || r == "workers-call-medium-risk-tools"),
        "{cex:#}"
    );
    // The principal of the request is a reviewer in the entities it comes with.
    let principal = cex["principal"].as_str().unwrap();
    let entities = cex["entities"].as_array().unwrap();
    let agent = entities
        .iter()
        .find(|e| {
            format!(
                "{}::\"{}\"",
                e["uid"]["type"].as_str().unwrap(),
                e["uid"]["id"].as_str().unwrap()
            ) == principal
        })
        .unwrap_or_else(|| panic!("{principal} is not among {entities:#?}"));
    assert!(
        agent["parents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "Role" && p["id"] == "reviewer"),
        "{agent:#}"
    );

    let text = meshctl(&["policy", "prove", &dir.to_string_lossy()]);
    assert_eq!(text.status.code(), Some(1));
    let text = stdout(&text);
    assert!(
        text.contains("failed  reviewers-never-call-tools"),
        "{text}"
    );
    assert!(text.contains("counterexample (never-allows):"), "{text}");
    assert!(text.contains("io.agentmesh.tool.call"), "{text}");
    assert!(text.contains("5 proved, 1 failed"), "{text}");
}

#[test]
fn a_policy_that_can_err_fails_never_errors_and_names_the_policy() {
    let dir = copy_of_shipped();
    std::fs::write(
        dir.path().join("budget.cedar"),
        "@id(\"overflowing-budget\")\nforbid (principal, action, resource)\nwhen { context.budget.tokens + context.budget.tokens_used > 1000000 };\n",
    )
    .unwrap();
    let out = meshctl(&[
        "policy",
        "prove",
        &dir.path().to_string_lossy(),
        "-o",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let report = json(&out);
    let p = property(&report, "never-errors");
    assert_eq!(p["result"], "failed", "{p:#}");
    assert_eq!(
        p["counterexample"]["reasons"],
        serde_json::json!(["overflowing-budget"])
    );
}

#[test]
fn diff_prove_tells_narrowing_from_widening_and_equivalence() {
    let parent = tempfile::tempdir().unwrap();
    let (old, new) = with_reviewer_guardrail(parent.path());
    let (old, new) = (
        old.to_string_lossy().into_owned(),
        new.to_string_lossy().into_owned(),
    );
    let shipped_set = shipped().to_string_lossy().into_owned();

    let narrows = meshctl(&["policy", "diff", "--prove", &old, &new, "-o", "json"]);
    assert_eq!(
        narrows.status.code(),
        Some(0),
        "{}{}",
        stdout(&narrows),
        stderr(&narrows)
    );
    let report = json(&narrows);
    crate::support::json_shapes::check("policy diff", &report);
    assert_eq!(
        report["added"],
        serde_json::json!(["forbid-reviewers-calling-tools"])
    );
    assert_eq!(report["prove"]["verdict"], "narrows", "{report:#}");
    assert_eq!(report["prove"]["implies"], true);
    let denied = &report["prove"]["denied_only_by_new"];
    assert_eq!(denied["decision"], "deny");
    assert!(
        denied["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "forbid-reviewers-calling-tools"),
        "{denied:#}"
    );

    let widens = meshctl(&["policy", "diff", "--prove", &new, &old, "-o", "json"]);
    assert_eq!(widens.status.code(), Some(1), "{}", stderr(&widens));
    let report = json(&widens);
    assert_eq!(
        report["removed"],
        serde_json::json!(["forbid-reviewers-calling-tools"])
    );
    assert_eq!(report["prove"]["verdict"], "widens");
    assert_eq!(report["prove"]["implies"], false);
    let allowed = &report["prove"]["allowed_only_by_new"];
    assert_eq!(allowed["decision"], "allow");
    assert_eq!(allowed["action"], "Action::\"io.agentmesh.tool.call\"");
    let text = stdout(&meshctl(&["policy", "diff", "--prove", &new, &old]));
    assert!(text.contains("NEW widens OLD"), "{text}");
    assert!(
        text.contains("a request NEW allows and OLD denied:"),
        "{text}"
    );

    // The same decisions written differently: changed, and proved equivalent.
    let same = copy_of_shipped();
    let path = same.path().join("guardrails.cedar");
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "resource == Tool::\"shell.exec\"\n);",
        "resource\n) when { resource == Tool::\"shell.exec\" };",
    );
    std::fs::write(&path, text).unwrap();
    let out = meshctl(&[
        "policy",
        "diff",
        "--prove",
        &shipped_set,
        &same.path().to_string_lossy(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let report = json(&out);
    assert_eq!(report["changed"], serde_json::json!(["forbid-shell-exec"]));
    assert_eq!(report["prove"]["verdict"], "equivalent", "{report:#}");

    // Without --prove: the lists alone, and no solver is needed.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args([
            "policy",
            "diff",
            &old,
            &new,
            "--solver",
            "/nonexistent/cvc5",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("added    forbid-reviewers-calling-tools"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn a_bad_property_file_is_refused_with_file_and_line() {
    let dir = copy_of_shipped();
    let path = dir.path().join("properties.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let cases = [
        (
            "id = \"never-errors\"",
            "id = \"never-errors\"\nseverity = \"high\"",
            "severity",
        ),
        ("Tool::\"shell.exec\"", "Tool::\"shel.exec\"", "shel.exec"),
        (
            "io.agentmesh.tool.call",
            "io.agentmesh.tool.cal",
            "tool.cal",
        ),
        (
            "context.detectors.secret",
            "context.detectors.secrets",
            "secrets",
        ),
    ];
    for (from, to, named) in cases {
        let changed = text.replacen(from, to, 1);
        let line = changed
            .lines()
            .position(|l| l.contains(to.lines().last().unwrap()))
            .unwrap()
            + 1;
        std::fs::write(&path, &changed).unwrap();
        let out = meshctl(&["policy", "prove", &dir.path().to_string_lossy()]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(7), "{named}: {err}");
        assert!(
            err.contains(&format!("properties.toml:{line}:")) && err.contains(named),
            "{named} (line {line}): {err}"
        );
        assert!(!stdout(&out).contains("proved"), "{}", stdout(&out));
        // `policy check` refuses it the same way.
        let check = meshctl(&["policy", "check", &dir.path().to_string_lossy()]);
        assert_eq!(check.status.code(), Some(7), "{named}");
        assert!(
            stderr(&check).contains(&format!("properties.toml:{line}:")),
            "{}",
            stderr(&check)
        );
    }
}

/// A fake solver: a shell script that says it is cvc5 `version` and then
/// runs `then` on the query.
fn fake_solver(dir: &Path, version: &str, then: &str) -> PathBuf {
    let path = dir.join("cvc5");
    std::fs::write(
        &path,
        format!("#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'This is cvc5 version {version} [fake]'; exit 0; fi\n{then}\n"),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn prove_with(solver: &Path, more: &[&str]) -> Output {
    let dir = shipped();
    let mut args = vec![
        "policy".to_owned(),
        "prove".to_owned(),
        dir.to_string_lossy().into_owned(),
        "--solver".to_owned(),
        solver.to_string_lossy().into_owned(),
    ];
    args.extend(more.iter().map(|s| (*s).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    meshctl(&args)
}

#[test]
fn a_missing_solver_exits_not_found_with_the_fix() {
    let out = prove_with(Path::new("/nonexistent/cvc5"), &[]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("`/nonexistent/cvc5` was not found") && err.contains("install-deps.sh"),
        "{err}"
    );
    assert!(stdout(&out).is_empty(), "{}", stdout(&out));
    // CVC5 names it too.
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["policy", "prove", &shipped().to_string_lossy()])
        .env("CVC5", "/nonexistent/cvc5-from-env")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(5));
    assert!(stderr(&out).contains("cvc5-from-env"), "{}", stderr(&out));
}

#[test]
fn an_old_cvc5_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let solver = fake_solver(tmp.path(), "1.0.3", "exit 0");
    let out = prove_with(&solver, &[]);
    assert_eq!(out.status.code(), Some(7), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("cvc5 1.0.3") && err.contains("1.3 or newer"),
        "{err}"
    );
    assert!(!stdout(&out).contains("proved"));
}

#[test]
fn a_solver_that_crashes_exits_failed_and_proves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let solver = fake_solver(tmp.path(), "1.4.2", "head -c 100 >/dev/null; kill -SEGV $$");
    let out = prove_with(&solver, &[]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains("nothing was proved"), "{err}");
    assert!(!stdout(&out).contains("proved"), "{}", stdout(&out));
}

#[test]
fn a_solver_that_answers_nonsense_exits_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let solver = fake_solver(
        tmp.path(),
        "1.4.2",
        "while read -r line; do case \"$line\" in *check-sat*) echo maybe;; esac; done",
    );
    let out = prove_with(&solver, &[]);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stderr(&out).contains("maybe"), "{}", stderr(&out));
    assert!(!stdout(&out).contains("proved"));
}

#[test]
fn a_solver_that_hangs_times_out_and_is_killed() {
    let tmp = tempfile::tempdir().unwrap();
    let pid_file = tmp.path().join("pid");
    let solver = fake_solver(
        tmp.path(),
        "1.4.2",
        &format!("echo $$ > {}; exec sleep 600", pid_file.display()),
    );
    let started = std::time::Instant::now();
    let out = prove_with(&solver, &["--timeout", "2s"]);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("did not finish within 2s") && err.contains("nothing was proved"),
        "{err}"
    );
    assert!(!stdout(&out).contains("proved"));
    assert!(started.elapsed() < std::time::Duration::from_secs(60));
    // The solver process went with meshctl: it was sent SIGKILL, which takes
    // effect once the kernel next runs it (a moment on a busy machine).
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .is_ok_and(|stat| !stat.contains(") Z "))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !alive(),
        "solver {} still runs 20 s after meshctl ended",
        pid.trim()
    );
}

/// The lines of the ```` ``` ```` block of docs/guardrails.md that starts
/// with `$ command`, without that line.
fn sample(command: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(shipped().join("../docs/guardrails.md")).unwrap();
    let start = doc
        .find(&format!("```\n$ {command}\n"))
        .unwrap_or_else(|| panic!("docs/guardrails.md shows `{command}`"));
    let block = &doc[start + 4..];
    let block = &block[..block.find("```").unwrap()];
    block.lines().skip(1).map(str::to_owned).collect()
}

/// What varies between runs and sets: timings, the policy count and hash,
/// the solver's version, the directory.
fn normalized(line: &str, dir: &str, shown_as: &str) -> String {
    let line = line.replace(dir, shown_as);
    let re = regex::Regex::new(
        r"policy hash [0-9a-f]{16}|\([0-9a-f]{16}\)|\d+ policies|cvc5 \d+\.\d+\.\d+|\(\d+\.\d s\)",
    )
    .unwrap();
    re.replace_all(&line, "<varies>").into_owned()
}

fn compare(command: &str, out: &Output, dir: &str, shown_as: &str, skip: &str) {
    let want: Vec<String> = sample(command)
        .iter()
        .filter(|l| !l.starts_with(skip))
        .map(|l| normalized(l, shown_as, shown_as))
        .collect();
    let got: Vec<String> = stdout(out)
        .lines()
        .filter(|l| !l.starts_with(skip))
        .map(|l| normalized(l, dir, shown_as))
        .collect();
    assert_eq!(
        got, want,
        "docs/guardrails.md's `{command}` differs from what it prints"
    );
}

#[test]
fn the_worked_examples_in_guardrails_md_are_what_meshctl_prints() {
    let root = shipped().join("..");
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["policy", "prove", "policies"])
        .current_dir(&root)
        .env_remove("CVC5")
        .output()
        .unwrap();
    compare(
        "meshctl policy prove policies",
        &out,
        "policies",
        "policies",
        "\u{0}",
    );

    // The counterexample's details (its context, the entities) are the
    // solver's choice; the rest is compared.
    let parent = tempfile::tempdir().unwrap();
    let (before, after) = with_reviewer_guardrail(parent.path());
    let dir = parent.path().to_string_lossy().into_owned();
    let out = meshctl(&["policy", "prove", &before.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(1));
    compare(
        "meshctl policy prove /tmp/before",
        &out,
        &dir,
        "/tmp",
        "            ",
    );
    let out = meshctl(&["policy", "prove", &after.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    compare(
        "meshctl policy prove /tmp/after",
        &out,
        &dir,
        "/tmp",
        "\u{0}",
    );
    let out = meshctl(&[
        "policy",
        "diff",
        "--prove",
        &before.to_string_lossy(),
        &after.to_string_lossy(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    compare(
        "meshctl policy diff --prove /tmp/before /tmp/after",
        &out,
        &dir,
        "/tmp",
        "    ",
    );

    // The refusal shown: the shipped file with the typo.
    let typo = copy_of_shipped();
    let path = typo.path().join("properties.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replacen("Tool::\"shell.exec\"", "Tool::\"shel.exec\"", 1),
    )
    .unwrap();
    let dir = typo.path().to_string_lossy().into_owned();
    let out = meshctl(&["policy", "prove", &dir]);
    let want = sample("meshctl policy prove /tmp/typo").join("\n");
    assert_eq!(stderr(&out).trim().replace(&dir, "/tmp/typo"), want);
}

/// The claim docs/guardrails.md adds for the exfiltration guard.
const NO_EXFILTRATION: &str = r#"
[[property]]
id = "no-exfiltration"
description = "A workflow holding private data and untrusted content calls no external tool."
check = "never-allows"
scope = 'principal, action == Action::"io.agentmesh.tool.call", resource'
when = '''
resource has external && resource.external &&
context.workflow.labels.containsAll(["private", "untrusted"])
'''
"#;

#[test]
fn the_exfiltration_guard_is_proved_and_its_absence_refuted() {
    let dir = copy_of_shipped();
    let path = dir.path().join("properties.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{text}{NO_EXFILTRATION}")).unwrap();
    let doc = std::fs::read_to_string(shipped().join("../docs/guardrails.md")).unwrap();
    assert!(
        doc.contains(NO_EXFILTRATION.trim()),
        "docs/guardrails.md shows the claim as tested"
    );

    // The shipped set alone lets such a workflow call `http.post`.
    let out = meshctl(&[
        "policy",
        "prove",
        &dir.path().to_string_lossy(),
        "-o",
        "json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let report = json(&out);
    let p = property(&report, "no-exfiltration");
    assert_eq!(p["result"], "failed", "{p:#}");
    let labels = &p["counterexample"]["context"]["workflow"]["labels"];
    assert!(
        ["private", "untrusted"]
            .iter()
            .all(|l| labels.as_array().unwrap().iter().any(|x| x == l)),
        "{labels}"
    );
    assert_eq!(p["counterexample"]["decision"], "allow");

    // With examples/policies/exfiltration.cedar it holds.
    std::fs::copy(
        shipped().join("../examples/policies/exfiltration.cedar"),
        dir.path().join("exfiltration.cedar"),
    )
    .unwrap();
    let out = meshctl(&[
        "policy",
        "prove",
        &dir.path().to_string_lossy(),
        "-o",
        "json",
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(property(&json(&out), "no-exfiltration")["result"], "proved");
}
