//! The workspace rules of `ARCHITECTURE.md`. From `cargo metadata`:
//! `schemas` depends on no crate of ours; a service never depends on another
//! service or on `meshctl`; `agents-sdk` never depends on a service, not
//! even for its tests; `testkit` never links a service; `audit-tables`
//! depends on `schemas` alone and `clickhouse-config` on nothing of ours;
//! `policy-engine` links `schemas` alone (no broker, no service), and
//! `meshctl` links no service (its tests may run one in-process).
//! A new edge that breaks a rule fails here, naming it.
//! From the sources: no crate but `schemas` spells a subject (`"mesh.…`) or
//! a mesh header (`"Mesh-…`) in its code; they come from `schemas`.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails"
)]

use std::collections::BTreeSet;
use std::process::Command;

const SERVICES: [&str; 3] = ["policy-worker", "audit-sink", "gpu-scaler"];

fn metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (package, dependency, kind) for every edge between workspace packages.
fn workspace_edges() -> Vec<(String, String, String)> {
    let metadata = metadata();
    let packages = metadata["packages"].as_array().unwrap();
    let ours: BTreeSet<&str> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    let mut edges = Vec::new();
    for package in packages {
        let name = package["name"].as_str().unwrap();
        for dep in package["dependencies"].as_array().unwrap() {
            let dep_name = dep["name"].as_str().unwrap();
            if ours.contains(dep_name) && dep_name != name {
                let kind = dep["kind"].as_str().unwrap_or("normal").to_owned();
                edges.push((name.to_owned(), dep_name.to_owned(), kind));
            }
        }
    }
    edges
}

/// Why `package` may not depend on `dependency` with a dependency of
/// `kind` (`normal`, `dev` or `build`), if it may not.
fn forbidden(package: &str, dependency: &str, kind: &str) -> Option<&'static str> {
    if package == "schemas" {
        return Some("`schemas` is the contract and depends on no crate of ours");
    }
    if SERVICES.contains(&package) && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some("a service never depends on another service or on `meshctl`");
    }
    if package == "clickhouse-config" {
        return Some(
            "`clickhouse-config` is shared by `meshctl` and `testkit` and depends on no crate of ours",
        );
    }
    if package == "audit-tables" && dependency != "schemas" {
        return Some(
            "`audit-tables` declares the tables for the sink and its readers: it depends on `schemas` alone",
        );
    }
    if package == "testkit" && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some(
            "`testkit` starts services by their binary's path, never links them: a crate testing with it would link the services",
        );
    }
    if package == "agents-sdk" && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some(
            "an agent links the contract, not the enforcer: agents-sdk never depends on a service, dev-dependencies included (tests that need one belong in `tests/`)",
        );
    }
    if package == "policy-engine" && kind != "dev" && dependency != "schemas" {
        return Some(
            "`policy-engine` decides without I/O: it depends on `schemas` alone (its tests may use `testkit`)",
        );
    }
    if package == "meshctl" && kind != "dev" && SERVICES.contains(&dependency) {
        return Some(
            "`meshctl` starts the services by binary path and links them only in its tests: what it shares with a service belongs in `policy-engine`, `gpu-pools`, `schemas` or `broker-config`",
        );
    }
    None
}

#[test]
fn no_crate_depends_on_what_the_architecture_forbids() {
    let edges = workspace_edges();
    assert!(
        edges
            .iter()
            .any(|(p, d, _)| p == "policy-worker" && d == "schemas"),
        "the metadata lists the workspace's edges: {edges:?}"
    );
    let broken: Vec<String> = edges
        .iter()
        .filter_map(|(package, dependency, kind)| {
            forbidden(package, dependency, kind)
                .map(|why| format!("{package} -> {dependency} ({kind}): {why}"))
        })
        .collect();
    assert!(
        broken.is_empty(),
        "forbidden dependencies:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_rules_catch_the_edges_they_name() {
    assert!(forbidden("schemas", "testkit", "normal").is_some());
    assert!(forbidden("policy-worker", "audit-sink", "normal").is_some());
    assert!(forbidden("audit-sink", "meshctl", "normal").is_some());
    assert!(forbidden("agents-sdk", "policy-worker", "normal").is_some());
    assert!(forbidden("meshctl", "policy-worker", "normal").is_some());
    assert!(forbidden("meshctl", "gpu-scaler", "normal").is_some());
    assert!(forbidden("meshctl", "gpu-pools", "normal").is_none());
    assert!(forbidden("meshctl", "policy-worker", "dev").is_none());
    assert!(forbidden("meshctl", "policy-engine", "normal").is_none());
    assert!(forbidden("policy-engine", "broker-config", "normal").is_some());
    assert!(forbidden("policy-engine", "schemas", "normal").is_none());
    assert!(forbidden("policy-engine", "testkit", "dev").is_none());
    assert!(forbidden("policy-worker", "policy-engine", "normal").is_none());
    assert!(forbidden("policy-worker", "telemetry", "normal").is_none());
    assert!(forbidden("e2e", "policy-worker", "normal").is_none());
    assert!(forbidden("clickhouse-config", "schemas", "normal").is_some());
    assert!(forbidden("audit-tables", "audit-sink", "normal").is_some());
    assert!(forbidden("audit-tables", "schemas", "normal").is_none());
    assert!(forbidden("testkit", "policy-worker", "normal").is_some());
    assert!(forbidden("testkit", "broker-config", "normal").is_none());
    assert!(forbidden("meshctl", "clickhouse-config", "normal").is_none());
    assert!(forbidden("audit-sink", "audit-tables", "normal").is_none());
}

/// What a crate's code may not spell, with the reason: the contract's names
/// live in `schemas` alone.
const CONTRACT_LITERALS: [(&str, &str); 2] = [
    ("\"mesh.", "a subject or filter: use `schemas::subjects`"),
    ("\"Mesh-", "a mesh header: use `schemas::headers`"),
];

/// `(line number, line, reason)` for each contract literal in `source` before
/// its unit tests (a `#[cfg(test)]` item at the top level): tests may spell
/// the wire form out to check it.
fn contract_literals(source: &str) -> Vec<(usize, String, &'static str)> {
    source
        .lines()
        .enumerate()
        .take_while(|(_, line)| !line.starts_with("#[cfg(test)]"))
        .flat_map(|(n, line)| {
            CONTRACT_LITERALS
                .iter()
                .filter(|(literal, _)| line.contains(literal))
                .map(move |(_, reason)| (n + 1, line.trim().to_owned(), *reason))
        })
        .collect()
}

fn rust_files(dir: &std::path::Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn no_crate_but_schemas_spells_a_subject_or_mesh_header() {
    let metadata = metadata();
    let mut findings = Vec::new();
    let mut checked = 0;
    for package in metadata["packages"].as_array().unwrap() {
        if package["name"] == "schemas" {
            continue;
        }
        let manifest = std::path::Path::new(package["manifest_path"].as_str().unwrap());
        let src = manifest.parent().unwrap().join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            checked += 1;
            let source = std::fs::read_to_string(&file).unwrap();
            for (line, text, reason) in contract_literals(&source) {
                findings.push(format!("{}:{line}: {text}  ({reason})", file.display()));
            }
        }
    }
    assert!(checked > 50, "only {checked} source files found");
    assert!(
        findings.is_empty(),
        "contract names spelled outside `schemas`:\n{}",
        findings.join("\n")
    );
}

#[test]
fn the_literal_scan_finds_code_and_skips_unit_tests() {
    let source = "fn f() -> String {\n    format!(\"mesh.deliver.{id}.>\")\n}\nconst H: &str = \"Mesh-Decision\";\n#[cfg(test)]\nmod tests {\n    const S: &str = \"mesh.ingress.a.b\";\n}\n";
    let found = contract_literals(source);
    let lines: Vec<usize> = found.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(lines, [2, 4], "{found:?}");
}
