//! The user docs (README.md and docs/*.md) cannot drift from the code.
//!
//! - Blocks between `<!-- generated:NAME -->` and `<!-- /generated:NAME -->`
//!   are rendered here from the code (streams, buckets and consumers from
//!   `broker-config`, headers from `schemas::headers`); a block that differs
//!   fails with the command that rewrites it ([`REGENERATE`]).
//! - Flag tables marked `<!-- flags:SERVICE ... -->` are compared with the
//!   services' clap definitions: every flag documented exists with the env
//!   variable and default named, and every flag of a service is documented.
//! - Every stream (`MESH_*`), bucket (`mesh-*`) and header (`Mesh-*`) a doc
//!   names exists, every relative link and anchor resolves, and the
//!   the contract's receipt sample is a receipt.
//! - `docs/quickstart.md`, then every other block marked
//!   ```` ```sh runnable ```` in the docs, run as written against one real
//!   stack (`the_quickstart_runs_as_written`): in a scratch checkout whose
//!   `target/release` holds the binaries this test was built with, the
//!   stack's default ports swapped for free ones. A ```` ```text output ````
//!   block after a command is compared with what it printed on stdout,
//!   without process ids, trace and event ids, keys, times and versions;
//!   ```` ```sh runnable retry ```` runs again until it succeeds and prints
//!   its sample (what it reads may lag: the audit's rows), ```` ```sh
//!   runnable background ```` keeps running until the end, and a code block
//!   after `<!-- file:NAME -->` is written to NAME first. `<trace-id>` is
//!   the last trace id a command printed (`meshctl trace <id>`). With
//!   `AGENTMESH_REGENERATE_DOCS=1` what the commands print replaces the
//!   samples that no longer match.

#![expect(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers outside `#[test]` fns panic to fail the test, too"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::CommandFactory;

/// The command that rewrites every generated block from the code.
const REGENERATE: &str = "AGENTMESH_REGENERATE_DOCS=1 cargo test -p meshctl --test it docs::";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// README.md and every page of docs/, as (path relative to the workspace, text).
fn user_docs() -> Vec<(String, String)> {
    let root = workspace();
    let mut names = vec!["README.md".to_owned()];
    let mut pages: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.ends_with(".md").then(|| format!("docs/{name}"))
        })
        .collect();
    pages.sort();
    names.extend(pages);
    names
        .into_iter()
        .map(|name| {
            let text = std::fs::read_to_string(root.join(&name)).unwrap();
            (name, text)
        })
        .collect()
}

fn regenerate() -> bool {
    std::env::var("AGENTMESH_REGENERATE_DOCS").is_ok_and(|v| v == "1")
}

/// `text` with the block `name` replaced by `body`; `None` when `text` has
/// no such block.
fn fill(text: &str, name: &str, body: &str) -> Option<String> {
    let open = format!("<!-- generated:{name} -->\n");
    let close = format!("<!-- /generated:{name} -->");
    let start = text.find(&open)? + open.len();
    let end = start + text[start..].find(&close)?;
    Some(format!("{}{body}{}", &text[..start], &text[end..]))
}

/// A duration as the docs say it.
fn kept(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0 => "for good".to_owned(),
        86_400 => "1 day".to_owned(),
        s if s % 86_400 == 0 => format!("{} days", s / 86_400),
        s if s % 3_600 == 0 => format!("{} h", s / 3_600),
        s => format!("{s} s"),
    }
}

/// `text` for a markdown table cell: `<` and `>` outside code spans
/// escaped, so `agent.<agent>` is not taken for an HTML tag.
fn cell(text: &str) -> String {
    text.split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                part.to_owned()
            } else {
                part.replace('<', "&lt;").replace('>', "&gt;")
            }
        })
        .collect::<Vec<_>>()
        .join("`")
}

fn streams_block() -> String {
    let mut out =
        "| stream | subjects | kept | max consumers | what |\n|---|---|---|---|---|\n".to_owned();
    for s in broker_config::streams(&broker_config::Options::default()) {
        let _ = writeln!(
            out,
            "| `{}` | `{}` | {} | {} | {} |",
            s.name,
            s.subjects.join("`, `"),
            kept(s.max_age),
            thousands(s.max_consumers),
            cell(&s.description.unwrap_or_default())
        );
    }
    out
}

/// `n` with a comma every three digits: `100,000`.
fn thousands(n: i32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) && c.is_ascii_digit() {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The mesh's headers with their doc comments, read from the source of
/// `schemas::headers` (every `pub const` there but `PREFIX`).
fn headers() -> Vec<(String, String)> {
    let source = std::fs::read_to_string(workspace().join("schemas/src/receipt.rs")).unwrap();
    let module = source
        .split_once("pub mod headers {")
        .and_then(|(_, m)| m.split("\n}\n").next())
        .expect("schemas/src/receipt.rs has `pub mod headers`");
    let mut found = Vec::new();
    let mut doc = Vec::new();
    for line in module.lines() {
        let line = line.trim();
        if let Some(comment) = line.strip_prefix("///") {
            doc.push(comment.trim().to_owned());
        } else if let Some(rest) = line.strip_prefix("pub const ") {
            let value = rest.split('"').nth(1).unwrap_or_default().to_owned();
            if !rest.starts_with("PREFIX") {
                found.push((value, doc.join(" ")));
            }
            doc.clear();
        } else {
            doc.clear();
        }
    }
    assert!(found.len() > 10, "no headers read from schemas::headers");
    found
}

/// The bucket names as one paragraph of code spans.
fn buckets_list_block() -> String {
    wrapped(
        broker_config::buckets(&broker_config::Options::default())
            .into_iter()
            .map(|b| format!("`{}`", b.name.trim_start_matches("KV_")))
            .collect(),
    )
}

/// The event types of the catalogue as one paragraph of code spans.
fn types_block() -> String {
    wrapped(
        schemas::EventType::ALL
            .iter()
            .map(|t| format!("`{}`", t.as_str()))
            .collect(),
    )
}

/// The header names as one paragraph of code spans.
fn headers_list_block() -> String {
    wrapped(
        headers()
            .into_iter()
            .map(|(h, _)| format!("`{h}`"))
            .collect(),
    )
}

/// `names` as a paragraph: comma-separated, wrapped at 76 columns.
fn wrapped(names: Vec<String>) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for (i, name) in names.iter().enumerate() {
        let word = if i + 1 < names.len() {
            format!("{name},")
        } else {
            format!("{name}.")
        };
        if !line.is_empty() && line.len() + 1 + word.len() > 76 {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

fn consumers_block() -> String {
    use schemas::subjects;
    let id = "<id>";
    let mut all = broker_config::service_consumer_configs();
    all.push((
        subjects::STREAM_DELIVER,
        broker_config::agent_consumer_config(id),
    ));
    all.push((
        subjects::STREAM_CALL,
        broker_config::agent_calls_consumer_config(id),
    ));
    all.push((
        subjects::STREAM_DECISION,
        broker_config::receipts_consumer_config(id),
    ));
    let mut out = "| stream | durable | filter | what |\n|---|---|---|---|\n".to_owned();
    for (stream, c) in all {
        let filter = if c.filter_subject.is_empty() {
            "every message".to_owned()
        } else {
            format!("`{}`", c.filter_subject)
        };
        let _ = writeln!(
            out,
            "| `{stream}` | `{}` | {filter} | {} |",
            c.durable_name.unwrap_or_default(),
            cell(&c.description.unwrap_or_default())
        );
    }
    out
}

fn generated_blocks() -> Vec<(&'static str, String)> {
    vec![
        ("streams", streams_block()),
        ("buckets-list", buckets_list_block()),
        ("headers-list", headers_list_block()),
        ("types", types_block()),
        ("consumers", consumers_block()),
    ]
}

#[test]
fn generated_blocks_match_the_code() {
    let mut stale = Vec::new();
    let mut seen = BTreeSet::new();
    for (name, text) in user_docs() {
        let mut new = text.clone();
        for (block, body) in generated_blocks() {
            if let Some(filled) = fill(&new, block, body.as_str()) {
                seen.insert(block);
                new = filled;
            }
        }
        if new != text {
            if regenerate() {
                std::fs::write(workspace().join(&name), &new).unwrap();
            } else {
                stale.push(name);
            }
        }
    }
    assert!(
        stale.is_empty(),
        "generated blocks in {} differ from the code: regenerate them with `{REGENERATE}`",
        stale.join(", ")
    );
    for (block, _) in generated_blocks() {
        assert!(
            seen.contains(block),
            "no doc has the block `<!-- generated:{block} -->`: README.md or docs/contract.md shows it"
        );
    }
}

/// The README is a landing page (what agentmesh is, the two commands, the
/// quickstart, the contract in short, links): long material lives in
/// `docs/`.
#[test]
fn the_readme_is_a_landing_page() {
    let readme = std::fs::read_to_string(workspace().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines: keep it under 300 and move the long parts into docs/"
    );
    // The two commands, as `.ci/run` and a newcomer run them, and the
    // quickstart, near the top.
    let top: String = readme.lines().take(20).collect::<Vec<_>>().join("\n");
    for wanted in [
        "./scripts/demo.sh ",
        "./scripts/test.sh ",
        "(docs/quickstart.md)",
    ] {
        assert!(
            top.contains(wanted),
            "README.md's first 20 lines lack `{wanted}`"
        );
    }
    let ci = std::fs::read_to_string(workspace().join(".ci/run")).unwrap();
    assert!(ci.contains("./scripts/test.sh"), "{ci}");
    // Every page of docs/ is linked from its documentation table.
    for (doc, _) in user_docs() {
        if doc.starts_with("docs/") {
            assert!(
                readme.contains(&format!("]({doc})")),
                "README.md does not link {doc}"
            );
        }
    }
}

/// Each word of `text` that starts with `prefix` at a word boundary (not
/// after a letter, digit, `_`, `-`, `.` or `/`), extended by `more`.
fn words(text: &str, prefix: &str, more: impl Fn(char) -> bool) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in text.match_indices(prefix) {
        let before = text[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || "_-./".contains(c)) {
            continue;
        }
        let word: String = text[at..]
            .chars()
            .take_while(|&c| c == '-' || c == '_' || more(c) || c == '*')
            .collect();
        found.insert(word);
    }
    found
}

#[test]
fn every_stream_bucket_and_header_the_docs_name_exists() {
    let options = broker_config::Options::default();
    let streams: BTreeSet<String> = broker_config::streams(&options)
        .into_iter()
        .map(|s| s.name)
        .collect();
    let buckets: BTreeSet<String> = broker_config::buckets(&options)
        .into_iter()
        .map(|b| b.name.trim_start_matches("KV_").to_owned())
        .collect();
    let headers: BTreeSet<String> = headers().into_iter().map(|(h, _)| h).collect();
    let contract = std::fs::read_to_string(workspace().join("docs/contract.md")).unwrap();
    // Names that look like ours and are something else.
    let others = ["mesh-bench", "mesh-healthcheck"];
    let mut unknown = Vec::new();
    for (doc, text) in user_docs() {
        for word in words(&text, "MESH_", |c| c.is_ascii_uppercase()) {
            let word = word.trim_end_matches(['_', '-']);
            let known = if let Some(prefix) = word.strip_suffix('*') {
                streams.iter().any(|s| s.starts_with(prefix))
            } else {
                streams.contains(word)
            };
            if !known {
                unknown.push(format!("{doc}: stream `{word}`"));
            }
        }
        for word in words(&text, "mesh-", |c| {
            c.is_ascii_lowercase() || c.is_ascii_digit()
        }) {
            let word = word.trim_end_matches(['_', '-']);
            let known = if let Some(prefix) = word.strip_suffix('*') {
                buckets.iter().any(|b| b.starts_with(prefix))
            } else {
                buckets.contains(word) || others.contains(&word)
            };
            if !known {
                unknown.push(format!("{doc}: bucket `{word}`"));
            }
        }
        for word in words(&text, "Mesh-", |c| c.is_ascii_alphabetic()) {
            let word = word.trim_end_matches(['_', '-']);
            let known = if let Some(prefix) = word.strip_suffix('*') {
                headers.iter().any(|h| h.starts_with(prefix))
            } else {
                headers.contains(word) || word == "Mesh"
            };
            if !known {
                unknown.push(format!("{doc}: header `{word}`"));
            }
        }
    }
    // The contract's bucket table has a row for every bucket.
    let kv = contract
        .split_once("## KV buckets")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .unwrap_or_default();
    for bucket in &buckets {
        if !kv.contains(&format!("| `{bucket}` |")) {
            unknown.push(format!(
                "docs/contract.md: \"KV buckets\" has no row for `{bucket}`"
            ));
        }
    }
    // The contract's header table has a row for every header.
    let section = contract
        .split_once("## Headers the mesh adds")
        .and_then(|(_, rest)| rest.split("\n## ").next())
        .unwrap_or_default();
    for header in &headers {
        if !section.contains(&format!("`{header}`")) {
            unknown.push(format!(
                "docs/contract.md: \"Headers the mesh adds\" has no row for `{header}`"
            ));
        }
    }
    assert!(
        unknown.is_empty(),
        "the docs name streams, buckets or headers the code does not have (streams: {streams:?}; buckets: {buckets:?}; headers: {headers:?}):\n{}",
        unknown.join("\n")
    );
}

/// GitHub's anchor of a heading.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The anchors of a markdown file: its headings outside code blocks.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            found.insert(slug(line.trim_start_matches('#')));
        }
    }
    found
}

/// The targets of `[text](target)` links outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut found = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (at, _) in line.match_indices("](") {
            let rest = &line[at + 2..];
            if let Some(end) = rest.find(')') {
                found.push(rest[..end].to_owned());
            }
        }
    }
    found
}

#[test]
fn every_link_and_anchor_resolves() {
    let root = workspace();
    let mut broken = Vec::new();
    for (doc, text) in user_docs() {
        let dir = root.join(&doc).parent().unwrap().to_path_buf();
        for link in links(&text) {
            if link.starts_with("http://") || link.starts_with("https://") {
                continue;
            }
            let (path, anchor) = link.split_once('#').unwrap_or((link.as_str(), ""));
            let target = if path.is_empty() {
                root.join(&doc)
            } else {
                dir.join(path)
            };
            if !target.exists() {
                broken.push(format!("{doc}: `{link}`: no such file"));
                continue;
            }
            if !anchor.is_empty() && target.extension().is_some_and(|e| e == "md") {
                let page = std::fs::read_to_string(&target).unwrap();
                if !anchors(&page).contains(anchor) {
                    broken.push(format!("{doc}: `{link}`: no heading with that anchor"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_contract_receipt_is_a_receipt() {
    let contract = std::fs::read_to_string(workspace().join("docs/contract.md")).unwrap();
    let sample = contract
        .split_once("<!-- receipt-sample -->\n```json\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(json, _)| json)
        .expect("docs/contract.md has `<!-- receipt-sample -->` before a json block");
    let value: serde_json::Value = serde_json::from_str(sample).unwrap();
    let receipt: schemas::DecisionReceipt = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("the contract's receipt is no DecisionReceipt: {e}"));
    let again = serde_json::to_value(&receipt).unwrap();
    let keys = |v: &serde_json::Value| -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(
        keys(&value),
        keys(&again),
        "the contract's receipt has fields a DecisionReceipt does not write back"
    );
    for signed in ["data_sha256", "signer"] {
        assert!(
            keys(&value).contains(signed),
            "the contract's receipt lacks `{signed}`, which every worker writes"
        );
    }
}

/// One flag of a service: (long flag, env, default).
type Flag = (String, Option<String>, Option<String>);

/// The flags of each service, by name.
fn service_flags() -> BTreeMap<&'static str, Vec<Flag>> {
    let read = |cmd: clap::Command| {
        cmd.get_arguments()
            .filter_map(|a| {
                let long = a.get_long()?;
                if long == "help" || long == "version" {
                    return None;
                }
                let env = a.get_env().map(|e| e.to_string_lossy().into_owned());
                let default = a
                    .get_default_values()
                    .first()
                    .map(|d| d.to_string_lossy().into_owned());
                Some((format!("--{long}"), env, default))
            })
            .collect::<Vec<_>>()
    };
    BTreeMap::from([
        ("policy-worker", read(policy_worker::Config::command())),
        ("audit-sink", read(audit_sink::Config::command())),
        ("gpu-scaler", read(gpu_scaler::Config::command())),
        ("mcp-gateway", read(mcp_gateway::Config::command())),
    ])
}

/// The cells of each row of the table that follows `marker` in `text`.
fn table_after(text: &str, at: usize) -> Vec<Vec<String>> {
    text[at..]
        .lines()
        .skip(1)
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|row| {
            row.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The `` `--flag` `` or `` `ENV` `` names in a cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_flag_tables_match_the_services() {
    let flags = service_flags();
    let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (doc, text) in user_docs() {
        for (at, _) in text.match_indices("<!-- flags:") {
            let names: Vec<&str> = text[at + "<!-- flags:".len()..]
                .split_once(" -->")
                .map(|(n, _)| n.split_whitespace().collect())
                .unwrap_or_default();
            for row in table_after(&text, at) {
                let longs: Vec<String> = ticked(&row[0])
                    .into_iter()
                    .filter(|f| f.starts_with("--"))
                    .collect();
                let envs = row.get(1).map(|c| ticked(c)).unwrap_or_default();
                for name in &names {
                    let Some(service) = flags.get(name) else {
                        wrong.push(format!("{doc}: no service `{name}`"));
                        continue;
                    };
                    for (i, long) in longs.iter().enumerate() {
                        let Some((_, env, default)) = service.iter().find(|(l, _, _)| l == long)
                        else {
                            wrong.push(format!("{doc}: `{name}` has no flag `{long}`"));
                            continue;
                        };
                        documented
                            .entry((*name).to_owned())
                            .or_default()
                            .insert(long.clone());
                        if env.as_ref() != envs.get(i) {
                            wrong.push(format!(
                                "{doc}: `{name} {long}` reads env {env:?}, the doc says {:?}",
                                envs.get(i)
                            ));
                        }
                        let cell = row.get(2).map(String::as_str).unwrap_or_default();
                        let doc_default = ticked(cell);
                        if longs.len() == 1
                            && doc_default.len() == 1
                            && cell.starts_with('`')
                            && default.as_deref() != Some(doc_default[0].as_str())
                        {
                            wrong.push(format!(
                                "{doc}: `{name} {long}` defaults to {default:?}, the doc says `{}`",
                                doc_default[0]
                            ));
                        }
                    }
                }
            }
        }
    }
    for (name, all) in &flags {
        for (long, _, _) in all {
            if !documented.get(*name).is_some_and(|d| d.contains(long)) {
                wrong.push(format!(
                    "`{name} {long}` is in no flag table marked `<!-- flags:{name} -->`"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "flag tables:\n{}", wrong.join("\n"));
}

/// One step of a doc that the runner takes in order.
#[derive(Debug)]
enum Step {
    /// ```` ```sh runnable ````: run it, wait for it to succeed; with
    /// `retry` (```` ```sh runnable retry ````), run it again until it
    /// succeeds and prints its sample (what it reads may lag, e.g. the
    /// audit's rows) or the wait runs out. The sample is the
    /// ```` ```text output ```` block right after it, if any.
    Run {
        script: String,
        retry: bool,
        /// The exit code it must end with: 0, or `N` of ```` ```sh
        /// runnable exit=N ```` (e.g. `meshctl pub` of a denied event: 1).
        exit: i32,
        output: Option<String>,
    },
    /// ```` ```sh runnable background ````: start it, stop it at the end.
    Background(String),
    /// A code block after `<!-- file:NAME -->`: written to NAME first.
    File(String, String),
}

/// The runnable steps of a markdown text, in order.
fn steps(text: &str) -> Vec<Step> {
    let mut found = Vec::new();
    let mut lines = text.lines();
    let mut file = None;
    while let Some(line) = lines.next() {
        if let Some(name) = line
            .strip_prefix("<!-- file:")
            .and_then(|l| l.strip_suffix(" -->"))
        {
            file = Some(name.to_owned());
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut body = String::new();
        for line in lines.by_ref() {
            if line.starts_with("```") {
                break;
            }
            body.push_str(line);
            body.push('\n');
        }
        let info: Vec<&str> = info.split_whitespace().collect();
        match (file.take(), info.as_slice()) {
            (Some(name), _) => found.push(Step::File(name, body)),
            (None, ["sh", "runnable", "background"]) => found.push(Step::Background(body)),
            (None, ["sh", "runnable", options @ ..]) => {
                let mut retry = false;
                let mut exit = 0;
                for option in options {
                    match option.strip_prefix("exit=") {
                        Some(code) => exit = code.parse().expect("exit=N takes a number"),
                        None if *option == "retry" => retry = true,
                        None => panic!("unknown option `{option}` of a runnable block"),
                    }
                }
                found.push(Step::Run {
                    script: body,
                    retry,
                    exit,
                    output: None,
                })
            }
            (None, ["text", "output"]) => match found.last_mut() {
                Some(Step::Run { output, .. }) if output.is_none() => *output = Some(body),
                _ => panic!("a `text output` block that follows no runnable block:\n{body}"),
            },
            _ => {}
        }
    }
    found
}

/// The same text with what varies from run to run replaced by a
/// placeholder: process ids, trace and event ids, keys, times, versions.
fn normalized(text: &str) -> String {
    let rules = [
        (r"pid \d+", "pid <pid>"),
        (
            r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            "<uuid>",
        ),
        (r"\b[0-9a-f]{16,64}\b", "<hex>"),
        (r"\b[NU][A-Z2-7]{55}\b", "<key>"),
        (r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z?", "<time>"),
        (r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)?", "<time>"),
        (r"ClickHouse \d+(\.\d+)*", "ClickHouse <version>"),
        (r#""eval_micros":\d+"#, r#""eval_micros":<n>"#),
        (r"policy set [0-9a-f]+", "policy set <hash>"),
        (
            r#""(signature|batch_proof|batch_signature)":"[^"]*""#,
            r#""$1":"<signature>""#,
        ),
    ];
    // The policies that determined a decision come in no fixed order.
    let policies = regex::Regex::new(r"by ([a-z0-9-]+(, [a-z0-9-]+)+)").unwrap();
    let mut text = policies
        .replace_all(text, |c: &regex::Captures<'_>| {
            let mut ids: Vec<&str> = c[1].split(", ").collect();
            ids.sort_unstable();
            format!("by {}", ids.join(", "))
        })
        .into_owned();
    for (pattern, with) in rules {
        let re = regex::Regex::new(pattern).unwrap();
        text = re.replace_all(&text, with).into_owned();
    }
    text.lines()
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join("\n")
        .trim()
        .to_owned()
}

/// Whether `actual` is `expected`, line by line after [`normalized`]; a
/// line `…` in `expected` stands for any number of lines.
fn matches_sample(expected: &str, actual: &str) -> bool {
    fn go(expected: &[&str], actual: &[&str]) -> bool {
        match expected.split_first() {
            None => actual.is_empty(),
            Some((&"…", rest)) => (0..=actual.len()).any(|skip| go(rest, &actual[skip..])),
            Some((line, rest)) => actual
                .split_first()
                .is_some_and(|(first, more)| first == line && go(rest, more)),
        }
    }
    let expected = normalized(expected);
    let actual = normalized(actual);
    go(
        &expected.lines().collect::<Vec<_>>(),
        &actual.lines().collect::<Vec<_>>(),
    )
}

#[test]
fn the_sample_matcher_takes_what_varies_and_nothing_else() {
    let sample = "nats-server        started  nats://127.0.0.1:4222 (pid 18774)\n…\ntrace 4bf92f3577b34da6a3ce929d0e0e4736 at 2026-12-07T12:00:00.123Z\n";
    let run = "nats-server        started  nats://127.0.0.1:4222 (pid 1)\nextra\nlines\ntrace 0af7651916cd43dd8448eb211c80319c at 2026-12-08T01:02:03.4Z\n";
    assert!(matches_sample(sample, run));
    assert!(!matches_sample(sample, &run.replace("started", "running")));
    assert!(!matches_sample("a\nb", "a\nb\nc"));
    assert!(matches_sample("a\n…", "a\nb\nc"));
}

/// What the runner gives a doc's commands: a scratch directory laid out as
/// a checkout (`target/release` holding the binaries this test was built
/// with, a copy of `policies/`, the rest linked), and the stack's ports.
struct Scratch {
    dir: tempfile::TempDir,
    nats_port: u16,
    http_port: u16,
    tcp_port: u16,
    ui_port: u16,
}

impl Scratch {
    fn new() -> anyhow::Result<Self> {
        let bin = Path::new(env!("CARGO_BIN_EXE_meshctl"))
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut missing = Vec::new();
        for name in [
            "policy-worker",
            "audit-sink",
            "gpu-scaler",
            "mcp-gateway",
            "examples/hello_agent",
        ] {
            if !bin.join(name).is_file() {
                missing.push(name);
            }
        }
        anyhow::ensure!(
            missing.is_empty(),
            "{} not built beside meshctl in `{}`: run `cargo build --workspace --bins` and `cargo build -p agents-sdk --example hello_agent` (`scripts/test.sh` builds both before `cargo test`)",
            missing.join(", "),
            bin.display()
        );
        let dir = tempfile::tempdir()?;
        let release = dir.path().join("target/release");
        std::fs::create_dir_all(release.join("examples"))?;
        for name in [
            "meshctl",
            "policy-worker",
            "audit-sink",
            "gpu-scaler",
            "mcp-gateway",
            "examples/hello_agent",
        ] {
            std::os::unix::fs::symlink(bin.join(name), release.join(name))?;
        }
        let root = workspace();
        for linked in [
            "sdk",
            "agents-sdk",
            "examples",
            "gpu-scaler",
            "audit-tables",
        ] {
            std::os::unix::fs::symlink(root.join(linked), dir.path().join(linked))?;
        }
        std::fs::create_dir(dir.path().join("policies"))?;
        for entry in std::fs::read_dir(root.join("policies"))? {
            let path = entry?.path();
            if let (true, Some(name)) = (path.is_file(), path.file_name()) {
                std::fs::copy(&path, dir.path().join("policies").join(name))?;
            }
        }
        Ok(Self {
            dir,
            nats_port: testkit::free_port()?,
            http_port: testkit::free_port()?,
            tcp_port: testkit::free_port()?,
            ui_port: testkit::free_port()?,
        })
    }

    /// A doc's text with the stack's default ports swapped for this one's.
    fn ported(&self, text: &str) -> String {
        text.replace("4222", &self.nats_port.to_string())
            .replace("8123", &self.http_port.to_string())
            .replace("8080", &self.ui_port.to_string())
    }

    /// What a command printed, with this stack's ports put back to the defaults.
    fn unported(&self, text: &str) -> String {
        text.replace(&self.nats_port.to_string(), "4222")
            .replace(&self.http_port.to_string(), "8123")
            .replace(&self.ui_port.to_string(), "8080")
            .replace(
                &format!("native port {}", self.tcp_port),
                "native port 9000",
            )
            .replace(
                &format!("127.0.0.1:{}", u32::from(self.nats_port) + 4000),
                "127.0.0.1:8222",
            )
            .replace(&format!("{}/", self.dir.path().display()), "")
    }

    fn command(&self, script: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("bash");
        cmd.arg("-c")
            .arg(format!("set -euo pipefail\n{script}"))
            .current_dir(self.dir.path())
            .env("NATS_URL", format!("nats://127.0.0.1:{}", self.nats_port))
            .env(
                "CLICKHOUSE_URL",
                format!("http://127.0.0.1:{}", self.http_port),
            )
            .env("AGENTMESH_CLICKHOUSE_TCP_PORT", self.tcp_port.to_string())
            .env("PYTHONPATH", workspace().join("sdk/python"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        for var in [
            "AGENTMESH_HOME",
            "AGENTMESH_POLICIES",
            "AGENTMESH_NKEY_FILE",
            "NATS_NKEY_SEED_FILE",
            "NATS_CREDS",
            "CLICKHOUSE_USER",
            "CLICKHOUSE_PASSWORD",
            "AGENTMESH_AUDIT_DATABASE",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }
}

/// Runs the steps of `doc` in order on `scratch`'s stack; the first failure
/// as an error naming the block. Returns how many blocks ran.
async fn run_steps(
    doc: &str,
    text: &str,
    scratch: &Scratch,
    background: &mut Vec<tokio::process::Child>,
) -> anyhow::Result<usize> {
    let trace_re = regex::Regex::new(r"meshctl trace ([0-9a-f]{32})").unwrap();
    let mut trace_id: Option<String> = None;
    let mut samples = Vec::new();
    let mut ran = 0;
    for step in steps(text) {
        match step {
            Step::File(name, body) => {
                std::fs::write(scratch.dir.path().join(&name), scratch.ported(&body))?;
            }
            Step::Background(script) => {
                // Its output goes to a file: a pipe nobody drains would block it.
                let log = std::fs::File::create(
                    scratch
                        .dir
                        .path()
                        .join(format!("background-{}.log", background.len())),
                )?;
                let child = scratch
                    .command(&scratch.ported(&script))
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()?;
                background.push(child);
                ran += 1;
            }
            Step::Run {
                script,
                retry,
                exit,
                output,
            } => {
                let mut script = scratch.ported(&script);
                if script.contains("<trace-id>") {
                    let id = trace_id.as_deref().ok_or_else(|| {
                        anyhow::anyhow!("{doc}: `<trace-id>` before any command printed one")
                    })?;
                    script = script.replace("<trace-id>", id);
                }
                let script = script.as_str();
                let output = output.as_deref();
                let last = std::sync::Mutex::new(String::new());
                let last = &last;
                let result = testkit::eventually(
                    if retry { testkit::WAIT } else { Duration::ZERO },
                    &format!("{doc}: `{}` to succeed and print its sample", script.trim()),
                    || {
                        let mut cmd = scratch.command(script);
                        async move {
                            let out = match cmd.output().await {
                                Ok(out) => out,
                                Err(e) => return Some(Err(anyhow::anyhow!("cannot run bash: {e}"))),
                            };
                            let text = scratch.unported(&String::from_utf8_lossy(&out.stdout));
                            let stderr = String::from_utf8_lossy(&out.stderr);
                            *last.lock().unwrap() = format!("({}) {text}\nstderr:\n{stderr}", out.status);
                            let exited = out.status.code() == Some(exit);
                            // Regenerating, what it prints becomes the sample.
                            let good = exited
                                && (regenerate()
                                    || output.is_none_or(|expected| matches_sample(expected, &text)));
                            if good {
                                Some(Ok(text))
                            } else if retry {
                                None
                            } else if !exited {
                                Some(Err(anyhow::anyhow!(
                                    "{doc}: the block\n{script}ended with {}, not exit code {exit}:\n{text}\nstderr:\n{stderr}",
                                    out.status
                                )))
                            } else {
                                Some(Err(anyhow::anyhow!(
                                    "{doc}: the output shown after\n{script}is not what it printed (compared without pids, ids, keys, times and versions).\nShown:\n{}\nPrinted:\n{text}",
                                    output.unwrap_or_default()
                                )))
                            }
                        }
                    },
                )
                .await;
                let out = match result {
                    Ok(inner) => inner?,
                    Err(timeout) => anyhow::bail!(
                        "{timeout}\nShown:\n{}\nLast printed:\n{}",
                        output.unwrap_or_default(),
                        last.lock().unwrap()
                    ),
                };
                if let Some(expected) = output.filter(|e| !matches_sample(e, &out)) {
                    let trimmed: Vec<&str> = out.lines().map(str::trim_end).collect();
                    samples.push((expected.to_owned(), format!("{}\n", trimmed.join("\n"))));
                }
                if let Some(id) = trace_re.captures_iter(&out).last() {
                    trace_id = Some(id[1].to_owned());
                }
                ran += 1;
            }
        }
    }
    if !samples.is_empty() {
        let path = workspace().join(doc);
        let mut text = std::fs::read_to_string(&path)?;
        for (old, new) in samples {
            text = text.replacen(
                &format!("```text output\n{old}```"),
                &format!("```text output\n{new}```"),
                1,
            );
        }
        std::fs::write(path, text)?;
    }
    Ok(ran)
}

/// `docs/quickstart.md` first, then every other doc's runnable blocks, on
/// one stack; `meshctl down` at the end whatever happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quickstart_runs_as_written() -> anyhow::Result<()> {
    let scratch = Scratch::new()?;
    let mut docs = user_docs();
    docs.sort_by_key(|(name, _)| name != "docs/quickstart.md");
    let mut background = Vec::new();
    let run = async {
        let mut ran = BTreeMap::new();
        for (doc, text) in &docs {
            let n = run_steps(doc, text, &scratch, &mut background).await?;
            if n > 0 {
                ran.insert(doc.clone(), n);
            }
        }
        anyhow::Ok(ran)
    };
    let ran = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(run)).await;
    for mut child in background {
        if let Some(pid) = child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", "--", &format!("-{pid}")])
                .status();
        }
        let _ = child.wait().await;
    }
    let down = scratch
        .command("target/release/meshctl down")
        .output()
        .await?;
    let ran = match ran {
        Ok(result) => result?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    println!("ran {ran:?}");
    assert!(
        ran.get("docs/quickstart.md").is_some_and(|&n| n >= 10),
        "the quickstart has no runnable blocks: {ran:?}"
    );
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stdout)
    );
    Ok(())
}

/// Each workspace package by name, with its directory.
fn packages() -> BTreeMap<String, PathBuf> {
    let root = workspace();
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(&root).unwrap() {
        let dir = entry.unwrap().path();
        let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
            continue;
        };
        let name = manifest
            .lines()
            .skip_while(|l| l.trim() != "[package]")
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned());
        if let Some(name) = name {
            found.insert(name, dir);
        }
    }
    found
}

#[test]
fn every_path_and_cargo_target_the_docs_name_exists() {
    let root = workspace();
    let packages = packages();
    assert!(packages.contains_key("meshctl"), "{packages:?}");
    let mut missing = Vec::new();
    for (doc, text) in user_docs() {
        // Paths in code spans whose first part is at the repository's
        // root: `policies/mesh.cedar`, `audit-tables/sql/`.
        for (i, span) in text.split('`').enumerate() {
            if i % 2 == 0
                || !span.contains('/')
                || span.contains(['<', '*', '{', '$', ':'])
                || span.contains(char::is_whitespace)
                || span.starts_with('/')
            {
                continue;
            }
            let path = span.trim_start_matches("./");
            let first = path.split('/').next().unwrap_or_default();
            // `target/` (build output) and `.agentmesh/` (what `meshctl up`
            // and the install script write) are made at run time: a fresh
            // clone has neither, or only part of them.
            if first.is_empty()
                || [".", "..", "target", ".agentmesh"].contains(&first)
                || !root.join(first).exists()
            {
                continue;
            }
            if !root.join(path).exists() {
                missing.push(format!("{doc}: `{span}`: no such path in the repository"));
            }
        }
        // `cargo … -p NAME [--example|--test|--bench X]`.
        for line in text.lines().filter(|l| l.contains("cargo ")) {
            let words: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || c == '`')
                .filter(|w| !w.is_empty())
                .collect();
            let mut package = None;
            for pair in words.windows(2) {
                let (flag, value) = (pair[0], pair[1]);
                match flag {
                    "-p" | "--package" => {
                        package = packages.get(value);
                        if package.is_none() {
                            missing.push(format!("{doc}: `cargo … -p {value}`: no such package"));
                        }
                    }
                    "--example" | "--test" | "--bench" => {
                        let Some(dir) = package else { continue };
                        let sub = match flag {
                            "--example" => "examples",
                            "--test" => "tests",
                            _ => "benches",
                        };
                        let file = dir.join(sub).join(format!("{value}.rs"));
                        let main = dir.join(sub).join(value).join("main.rs");
                        if !file.is_file() && !main.is_file() {
                            missing.push(format!(
                                "{doc}: `{flag} {value}`: no such target in `{}`",
                                dir.display()
                            ));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "the docs name paths or cargo targets that do not exist:\n{}",
        missing.join("\n")
    );
}

/// `meshctl <words…> --help`'s output, when meshctl takes those words as a
/// command.
fn meshctl_help(words: &[&str]) -> Option<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(words)
        .arg("--help")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn every_meshctl_flag_the_docs_use_exists() {
    let mut helps: BTreeMap<Vec<String>, Option<String>> = BTreeMap::new();
    let mut wrong = Vec::new();
    let mut checked = 0;
    for (doc, text) in user_docs() {
        if doc == "docs/meshctl.md" {
            continue; // generated from the same clap definitions
        }
        // Each code span, and each line of a code block, on its own.
        for line in text.lines().flat_map(|l| l.split('`')) {
            let tokens: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || c == '(' || c == ')')
                .filter(|t| !t.is_empty())
                .collect();
            let Some(at) = tokens.iter().enumerate().position(|(i, t)| {
                (*t == "meshctl" || t.ends_with("/meshctl"))
                    && (i == 0 || !["-p", "--package", "--bin"].contains(&tokens[i - 1]))
            }) else {
                continue;
            };
            let rest = &tokens[at + 1..];
            let words: Vec<&str> = rest
                .iter()
                .take(2)
                .take_while(|t| {
                    t.chars().all(|c| c.is_ascii_lowercase() || c == '-') && !t.starts_with('-')
                })
                .copied()
                .collect();
            let flags: Vec<&str> = rest
                .iter()
                .take_while(|t| !["|", "&&", ";", "#", "||"].contains(t))
                .filter(|t| t.starts_with("--") && t.len() > 2)
                .map(|t| t.split('=').next().unwrap_or(t))
                .map(|t| t.trim_end_matches([',', '.', ';', ':']))
                .collect();
            if flags.is_empty() {
                continue;
            }
            // The longest run of words meshctl takes as a command.
            let help = (0..=words.len()).rev().find_map(|n| {
                let key: Vec<String> = words[..n].iter().map(|w| w.to_string()).collect();
                helps
                    .entry(key)
                    .or_insert_with(|| meshctl_help(&words[..n]))
                    .clone()
            });
            let Some(help) = help else { continue };
            for flag in flags {
                checked += 1;
                if !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")) {
                    wrong.push(format!(
                        "{doc}: `{}`: meshctl has no `{flag}` there",
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        checked > 10,
        "only {checked} meshctl flags found in the docs"
    );
    assert!(
        wrong.is_empty(),
        "the docs use meshctl flags that do not exist (`meshctl <command> --help` lists them):\n{}",
        wrong.join("\n")
    );
}
