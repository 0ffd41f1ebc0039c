//! compose.yaml and compose.cluster.yaml against the files around them:
//! every variable they read is documented, the Dockerfile build arguments
//! they pass default to what the Dockerfile itself defaults to, and the
//! NATS configs they mount fsync every write as the stack's own
//! nats-server does. `scripts/compose-check.sh` runs the files for real.

#![expect(clippy::expect_used, reason = "a panic is how a test or bench fails")]

use std::collections::BTreeMap;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

const COMPOSE_FILES: [&str; 2] = ["compose.yaml", "compose.cluster.yaml"];

/// Each `${NAME:-default}` / `${NAME}` of `text`: name → default.
fn variables(text: &str) -> BTreeMap<String, Option<String>> {
    let mut found = BTreeMap::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let after = &rest[start + 2..];
        let end = after.find('}').expect("an unclosed ${");
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((name, default)) => (name, Some(default.to_owned())),
            None => (inner, None),
        };
        found.insert(name.to_owned(), default);
        rest = &after[end..];
    }
    found
}

#[test]
fn every_variable_the_compose_files_read_is_documented() {
    let docs = read("README.md")
        + &read("docs/deployment.md")
        + &read("docs/operations.md")
        + &read("docs/audit.md");
    for file in COMPOSE_FILES {
        let text = read(file);
        // `$${…}` is the container's own shell variable, not compose's.
        let text = text.replace("$${", "");
        let vars = variables(&text);
        assert!(vars.contains_key("NATS_IMAGE"), "{file}: {vars:?}");
        for name in vars.keys() {
            assert!(
                docs.contains(&format!("`{name}`")) || docs.contains(&format!("{name}=")),
                "{file} reads ${{{name}}}, which the README and docs/ (deployment, operations, audit) do not name"
            );
        }
    }
}

#[test]
fn the_build_arguments_default_to_the_dockerfiles_own() {
    let dockerfile = read("Dockerfile");
    let arg = |name: &str| -> String {
        let line = dockerfile
            .lines()
            .find(|l| l.starts_with(&format!("ARG {name}=")))
            .unwrap_or_else(|| panic!("Dockerfile: no `ARG {name}=`"));
        line.split_once('=').unwrap().1.to_owned()
    };
    let rust = arg("RUST_VERSION");
    let expected = [
        (
            "AGENTMESH_BUILD_IMAGE",
            arg("BUILD_IMAGE").replace("${RUST_VERSION}", &rust),
        ),
        ("AGENTMESH_RUNTIME_IMAGE", arg("RUNTIME_IMAGE")),
        ("AGENTMESH_BINARIES", arg("BINARIES")),
    ];
    for file in COMPOSE_FILES {
        let vars = variables(&read(file));
        for (name, default) in &expected {
            assert_eq!(
                vars.get(*name).cloned().flatten().as_deref(),
                Some(default.as_str()),
                "{file}: ${{{name}}}'s default is not the Dockerfile's"
            );
        }
        for arg in ["BUILD_IMAGE:", "RUNTIME_IMAGE:", "BINARIES:"] {
            assert!(read(file).contains(arg), "{file} passes no {arg}");
        }
    }
}

#[test]
fn the_nats_configs_fsync_every_write() {
    for file in [
        "broker-config/nats-server.conf",
        "broker-config/nats-cluster.conf",
    ] {
        let text = read(file);
        let jetstream = text
            .split_once("jetstream {")
            .and_then(|(_, rest)| rest.split_once('}'))
            .map(|(block, _)| block)
            .unwrap_or_else(|| panic!("{file}: no jetstream block"));
        assert!(
            jetstream
                .lines()
                .any(|l| l.trim() == "sync_interval: always"),
            "{file}: jetstream {{ sync_interval: always }} missing"
        );
    }
}
