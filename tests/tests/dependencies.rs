//! The dependency rules of `ARCHITECTURE.md`, read from `cargo metadata`:
//! `schemas` depends on no crate of ours; a service never depends on another
//! service or on `meshctl`; `agents-sdk` never depends on a service, not
//! even for its tests. A new edge that breaks a rule fails here, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::process::Command;

const SERVICES: [&str; 3] = ["policy-worker", "audit-sink", "gpu-scaler"];

/// (package, dependency, kind) for every edge between workspace packages.
fn workspace_edges() -> Vec<(String, String, String)> {
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
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
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

/// Why `package` may not depend on `dependency`, if it may not.
fn forbidden(package: &str, dependency: &str) -> Option<&'static str> {
    if package == "schemas" {
        return Some("`schemas` is the contract and depends on no crate of ours");
    }
    if SERVICES.contains(&package) && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some("a service never depends on another service or on `meshctl`");
    }
    if package == "agents-sdk" && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some(
            "an agent links the contract, not the enforcer: agents-sdk never depends on a service, dev-dependencies included (tests that need one belong in `tests/`)",
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
            forbidden(package, dependency)
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
    assert!(forbidden("schemas", "testkit").is_some());
    assert!(forbidden("policy-worker", "audit-sink").is_some());
    assert!(forbidden("audit-sink", "meshctl").is_some());
    assert!(forbidden("agents-sdk", "policy-worker").is_some());
    assert!(forbidden("meshctl", "policy-worker").is_none());
    assert!(forbidden("policy-worker", "telemetry").is_none());
    assert!(forbidden("e2e", "policy-worker").is_none());
}
