//! `docs/meshctl.md` is what clap's definitions produce (`meshctl docs
//! reference`), byte for byte; `meshctl completions <shell>` prints a
//! script for each shell.

#![expect(clippy::unwrap_used, reason = "a panic is how a test fails")]

use std::process::Command;

const REGENERATE: &str = "cargo run -q -p meshctl -- docs reference > docs/meshctl.md";

fn meshctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env_remove("NATS_URL")
        .env_remove("CLICKHOUSE_URL")
        .output()
        .unwrap()
}

#[test]
fn the_committed_reference_is_what_clap_produces() {
    let out = meshctl(&["docs", "reference"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let generated = String::from_utf8(out.stdout).unwrap();
    // This crate's own checkout (meshctl/..), whatever testkit was built from.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/meshctl.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if generated != committed {
        let first = generated
            .lines()
            .zip(committed.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| generated.lines().count().min(committed.lines().count()));
        panic!(
            "docs/meshctl.md differs from meshctl's clap definitions (first at line {}: generated `{}`, committed `{}`); regenerate it with `{REGENERATE}`",
            first + 1,
            generated.lines().nth(first).unwrap_or("<end>"),
            committed.lines().nth(first).unwrap_or("<end>"),
        );
    }
    // Every command and every subcommand has its section.
    for section in [
        "### `meshctl up`",
        "### `meshctl pub`",
        "### `meshctl tail`",
        "### `meshctl agents add`",
        "### `meshctl audit verify`",
        "### `meshctl completions`",
        "## Exit codes",
    ] {
        assert!(generated.contains(section), "missing {section}");
    }
    assert!(
        !generated.contains("### `meshctl docs"),
        "the hidden generator is not documented"
    );
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _meshctl"),
        ("zsh", "#compdef meshctl"),
        ("fish", "complete -c meshctl"),
    ] {
        let out = meshctl(&["completions", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {script}");
        assert!(script.contains("tail"), "{shell}: no `tail` in the script");
    }
    let bad = meshctl(&["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: bash"));
}
