//! Tests of the code's shape, read from the sources: no function on the
//! per-event path is longer than [`MAX_LINES`], and no module of the worker
//! or of `policy-engine` imports one that imports it back (directly or
//! around a circle).

use std::path::{Path, PathBuf};

use testkit::shape::{circle, module_graph};

/// The most lines a function on the per-event path may span, its
/// signature and closing brace included.
const MAX_LINES: usize = 60;

/// The modules an ingress event (or an approval answer) goes through.
const PER_EVENT: [&str; 7] = [
    "worker.rs",
    "plan.rs",
    "publish.rs",
    "guard.rs",
    "flows.rs",
    "approval.rs",
    "cache/mod.rs",
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `source` up to its test module.
fn code(source: &str) -> &str {
    source
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or(source)
}

/// The line, with string and character literals and comments blanked, so
/// that only the code's own braces count.
fn braces(line: &str) -> (usize, usize) {
    let (mut open, mut close) = (0, 0);
    let mut chars = line.chars().peekable();
    let mut in_str = false;
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_str => {
                chars.next();
            }
            '"' => in_str = !in_str,
            '/' if !in_str && chars.peek() == Some(&'/') => break,
            '\'' if !in_str => {
                // A char literal such as '{' (a lifetime has no closing quote soon).
                let rest: String = chars.clone().take(3).collect();
                if rest.chars().nth(1) == Some('\'') {
                    chars.next();
                    chars.next();
                }
            }
            '{' if !in_str => open += 1,
            '}' if !in_str => close += 1,
            _ => {}
        }
    }
    (open, close)
}

/// Every function of `source` (up to its tests) with the lines it spans.
fn functions(source: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code(source).lines().collect();
    let mut found = Vec::new();
    for (start, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let Some(at) = trimmed.find("fn ") else {
            continue;
        };
        let head = trimmed.get(..at).unwrap_or_default();
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "pub(crate)" | "pub(super)" | "async" | "const"));
        if !is_fn || trimmed.starts_with("//") {
            continue;
        }
        let name: String = trimmed
            .get(at + 3..)
            .unwrap_or_default()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let mut depth = 0usize;
        let mut opened = false;
        for (end, body) in lines.iter().enumerate().skip(start) {
            let (open, close) = braces(body);
            if !opened && open == 0 && body.trim_end().ends_with(';') {
                break; // a declaration without a body
            }
            opened |= open > 0;
            depth = (depth + open).saturating_sub(close);
            if opened && depth == 0 {
                found.push((name.clone(), end - start + 1));
                break;
            }
        }
    }
    found
}

#[test]
fn no_function_on_the_per_event_path_is_longer_than_sixty_lines() {
    let mut long = Vec::new();
    let mut counted = 0;
    for file in PER_EVENT {
        let source = std::fs::read_to_string(src().join(file)).unwrap();
        for (name, lines) in functions(&source) {
            counted += 1;
            if lines > MAX_LINES {
                long.push(format!("{file}: `{name}` spans {lines} lines"));
            }
        }
    }
    assert!(counted > 40, "only {counted} functions found");
    assert!(
        long.is_empty(),
        "functions on the per-event path over {MAX_LINES} lines (split them into stages):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_length_check_counts_bodies_not_braces_in_strings() {
    let source = "fn short() {\n    let s = \"{{ not a brace\";\n}\n\nasync fn long(\n    a: u8,\n) -> u8 {\n    if a > 0 {\n        a\n    } else {\n        '{' as u8\n    }\n}\n// fn commented() {}\n";
    assert_eq!(
        functions(source),
        [("short".to_owned(), 3), ("long".to_owned(), 9)]
    );
}

#[test]
fn no_module_of_the_worker_or_the_engine_imports_its_importer() {
    for dir in [src(), src().join("../../policy-engine/src")] {
        let (graph, _root_paths) = module_graph(&dir).unwrap();
        assert!(graph.len() > 5, "{}: {graph:?}", dir.display());
        let around = circle(&graph).unwrap_or_default();
        assert!(
            around.is_empty(),
            "an import circle in {}: {} (move what both need into a module of its own)",
            dir.display(),
            around.join(" -> ")
        );
    }
}
