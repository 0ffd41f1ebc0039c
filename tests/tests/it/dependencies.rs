//! The workspace rules of `ARCHITECTURE.md`. From `cargo metadata`:
//! `schemas` depends on no crate of ours; a service never depends on another
//! service or on `meshctl`; `agents-sdk` never depends on a service, not
//! even for its tests, nor does `mcp-bridge`; `testkit` never links a service; `audit-tables`
//! depends on `schemas` alone and `clickhouse-config` on nothing of ours;
//! `policy-engine` links `schemas` alone (no broker, no service), and
//! `meshctl` links no service (its tests may run one in-process).
//! A new edge that breaks a rule fails here, naming it.
//! From the sources: no crate but `schemas` spells a subject (`"mesh.…`) or
//! a mesh header (`"Mesh-…`) in its code; they come from `schemas`.
//! And `ARCHITECTURE.md`'s crate table stays true: one row per crate, its
//! kind (library, binary) as `cargo metadata` lists its targets, and every
//! module under its `src/` named in the row.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a panic is how a test or bench fails"
)]

use std::collections::BTreeSet;
use std::process::Command;

const SERVICES: [&str; 4] = ["policy-worker", "audit-sink", "gpu-scaler", "mcp-gateway"];

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
    if package == "mcp-bridge" && (SERVICES.contains(&dependency) || dependency == "meshctl") {
        return Some(
            "`mcp-bridge` is an agent: it links the SDK, never a service or `meshctl` (tests that run the worker with it belong in `tests/`)",
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

/// What the service skeleton writes once, with the one file allowed to
/// spell it: the HTTP serve loop, and SIGINT/SIGTERM handling (SIGHUP, the
/// worker's policy reload, is not shutdown).
const WRITTEN_ONCE: [(&str, &str, &str); 4] = [
    (
        "serve_connection(",
        "telemetry/src/http.rs",
        "an HTTP serve loop: use `telemetry::http::serve`",
    ),
    (
        "SignalKind::terminate()",
        "telemetry/src/signal.rs",
        "SIGTERM: use `telemetry::signal` or `shutdown_on_signal`",
    ),
    (
        "SignalKind::interrupt()",
        "telemetry/src/signal.rs",
        "SIGINT: use `telemetry::signal` or `shutdown_on_signal`",
    ),
    (
        "signal::ctrl_c()",
        "telemetry/src/signal.rs",
        "Ctrl-C: use `telemetry::signal` or `shutdown_on_signal`",
    ),
];

/// `(line number, reason)` for each thing of [`WRITTEN_ONCE`] that `source`
/// (the file `path`) spells in code outside the file allowed to, before its
/// unit tests; comments (doc examples) do not count.
fn written_again(path: &str, source: &str) -> Vec<(usize, &'static str)> {
    source
        .lines()
        .enumerate()
        .take_while(|(_, line)| !line.starts_with("#[cfg(test)]"))
        .flat_map(|(n, line)| {
            let code = line.split("//").next().unwrap_or_default();
            WRITTEN_ONCE
                .iter()
                .filter(move |(needle, home, _)| code.contains(needle) && !path.ends_with(home))
                .map(move |(_, _, reason)| (n + 1, *reason))
        })
        .collect()
}

#[test]
fn the_serve_loop_and_the_shutdown_signals_are_written_once() {
    // The scan finds what it looks for, and only outside its home.
    let sample = "/// tokio::signal::ctrl_c().await\nlet c = conn.serve_connection(io, svc);\n#[cfg(test)]\nlet s = signal::ctrl_c();";
    assert_eq!(written_again("meshctl/src/ui/mod.rs", sample).len(), 1);
    assert!(written_again("telemetry/src/http.rs", sample).is_empty());

    let metadata = metadata();
    let mut findings = Vec::new();
    for package in metadata["packages"].as_array().unwrap() {
        let manifest = std::path::Path::new(package["manifest_path"].as_str().unwrap());
        let mut files = Vec::new();
        rust_files(&manifest.parent().unwrap().join("src"), &mut files);
        for file in files {
            let path = file.display().to_string();
            let source = std::fs::read_to_string(&file).unwrap();
            for (line, reason) in written_again(&path, &source) {
                findings.push(format!("{path}:{line}: {reason}"));
            }
        }
    }
    assert!(
        findings.is_empty(),
        "written again outside the service skeleton (`telemetry`):\n{}",
        findings.join("\n")
    );
}

/// The crate table of `ARCHITECTURE.md`: `(package, kind, owns)` per row
/// naming a crate (`sdk/python` is not one).
fn architecture_table() -> Vec<(String, String, String)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ARCHITECTURE.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let section = text
        .split("## Crates")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("ARCHITECTURE.md has a `## Crates` section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter(|l| !l.contains("(not a crate)"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            assert_eq!(cells.len(), 3, "a crate row has three cells: {line}");
            // `tests` (package `e2e`): the package's name is the last one named.
            let name = cells[0].rsplit('`').nth(1).unwrap().to_owned();
            (name, cells[1].trim().to_owned(), cells[2].to_owned())
        })
        .collect()
}

/// The modules of a crate: each file and folder under `src/` but the crate
/// roots and `src/bin/`.
fn modules(src: &std::path::Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let name = p.file_name()?.to_str()?.to_owned();
            match name.strip_suffix(".rs") {
                Some("lib" | "main") => None,
                Some(module) => Some(module.to_owned()),
                None if p.is_dir() && name != "bin" => Some(name),
                None => None,
            }
        })
        .collect();
    found.sort();
    found
}

#[test]
fn the_architecture_table_names_every_crate_its_kind_and_every_module() {
    let metadata = metadata();
    let table = architecture_table();
    let mut problems = Vec::new();
    let mut packages = BTreeSet::new();
    for package in metadata["packages"].as_array().unwrap() {
        let name = package["name"].as_str().unwrap();
        packages.insert(name.to_owned());
        let Some((_, kind, owns)) = table.iter().find(|(n, _, _)| n == name) else {
            problems.push(format!("crate `{name}` has no row in the table"));
            continue;
        };
        let targets = package["targets"].as_array().unwrap();
        let has = |k: &str| {
            targets
                .iter()
                .any(|t| t["kind"].as_array().unwrap().iter().any(|x| x == k))
        };
        let (lib, bin) = (has("lib"), has("bin"));
        if lib != kind.contains("library") || bin != kind.contains("binary") {
            problems.push(format!(
                "crate `{name}` is listed as `{kind}`, but it has {} library and {} binary",
                if lib { "a" } else { "no" },
                if bin { "a" } else { "no" }
            ));
        }
        let manifest = std::path::Path::new(package["manifest_path"].as_str().unwrap());
        for module in modules(&manifest.parent().unwrap().join("src")) {
            let named = [
                format!("`{module}`"),
                format!("`{module}/"),
                format!("`{module}::"),
            ]
            .iter()
            .any(|form| owns.contains(form.as_str()));
            if !named {
                problems.push(format!(
                    "module `{module}` of `{name}` is not named in its row (as `{module}`)"
                ));
            }
        }
    }
    for (name, _, _) in &table {
        if !packages.contains(name) {
            problems.push(format!(
                "the table lists `{name}`, which is not a workspace crate"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md's crate table disagrees with the workspace:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_table_check_reads_rows_and_modules() {
    let table = architecture_table();
    assert!(
        table
            .iter()
            .any(|(n, k, _)| n == "e2e" && k.contains("tests")),
        "the `tests` row is the package `e2e`: {table:?}"
    );
    assert!(table.iter().all(|(n, _, _)| n != "sdk/python"));
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy-engine/src");
    let found = modules(&src);
    assert!(found.contains(&"cache".to_owned()) && found.contains(&"fields".to_owned()));
    assert!(!found.contains(&"lib".to_owned()));
}
