//! `docs/meshctl.md`, the reference of every meshctl command and flag,
//! generated from clap's definitions (`meshctl docs reference`), with the
//! conventions every command shares: the exit codes ([`Exit::ALL`]), the
//! duration syntax and the shape of each command's `-o json`. A test
//! (`meshctl/tests/it/reference.rs`) fails when the committed page differs.

use std::fmt::Write as _;

use clap::{Arg, Command};

use crate::exit::Exit;

/// The command that regenerates the page.
pub(crate) const REGENERATE: &str = "cargo run -q -p meshctl -- docs reference > docs/meshctl.md";

/// What `-o json` prints, per command: `(command path, shape)`.
pub(crate) const JSON_SHAPES: &[(&str, &str)] = &[
    (
        "status",
        "`{ok, components: [{name, state, detail}], streams: [{name, messages, consumers: [{name, pending, unacked}]}], agents: [{agent, deliveries: {pending, unacked}, calls: {pending, unacked} or null}], database, tables: [{table, rows (null: missing)}], durability: [{monitoring_url, server, version, sync (always, interval or unknown), sync_interval_secs}]}`; exit 1 unless `ok` (NATS with JetStream and ClickHouse answer)",
    ),
    (
        "agents list",
        "`[{agent, role, in_entities, public_key, seed_file}]` (`role`, `public_key`, `seed_file` null where there is none)",
    ),
    (
        "agents mcp-token",
        "`{agent, token, token_file, tokens_file}`: the new bearer token for the MCP gateway, the file it was written to, and the gateway's token file (digests only)",
    ),
    (
        "trace",
        "`{trace_id, steps: [{event_id, agent, type, target, subject, time_us, decision, reasons, errors, policy_hash, valid, cache, parent}]}`, oldest first; `parent` is the index of the step it follows, null for a root",
    ),
    (
        "pub",
        "the receipt, as on `mesh.decision.<agent>` ([contract.md](contract.md#decisions-and-receipts)): `{event_id, trace_id, decision, reasons, errors, policy_hash, decision_id, agent, type, decided_at, ingress_subject, ...}`; with `--no-wait`: `{event_id, trace_id, subject, stream, sequence}`",
    ),
    (
        "tail",
        "one object per line: `{feed, stream, sequence, subject, time, decision, trace_id, agent, event_id, type, target?, reason?}`, plus `receipt` (the whole receipt) for `receipts`, `headers` (the `Mesh-*` headers) and `data` (the event's data, JSON or a string) for `deliveries` and `dead`",
    ),
    (
        "policy check",
        "`{dir, policies, policy_hash, require_approval: [policy id], reads_detectors, reads_counters, properties}` (`properties`: how many claims `properties.toml` holds, 0 without one)",
    ),
    (
        "policy prove",
        "`{dir, policy_hash, policies, properties_file, solver: {path, version}, request_kinds, proved, failed, millis, properties: [{id, description, check, result, line, counterexample?}]}`; `result` is `proved` or `failed`, and a failed one has `counterexample: {principal, action, resource, context, entities, decision, reasons, errors}` (a request, its context and entity store as Cedar JSON, and Cedar's decision of it with the set: for `never-errors`, `reasons` names the policy that errs); exit 1 when one fails",
    ),
    (
        "policy diff",
        "`{old, new, old_hash, new_hash, added, removed, changed, prove?}` (policy ids); with `--prove`, `prove: {verdict, implies, allowed_only_by_new?, denied_only_by_new?, solver: {path, version}, request_kinds, millis}`: `verdict` is `equivalent`, `narrows`, `widens` or `changes`, `implies` whether every request NEW allows OLD allowed, and each example is a counterexample as in `policy prove` with NEW's decision; exit 1 when `implies` is false",
    ),
    (
        "policy replay",
        "`{source, since, until, policies, policy_hash, cards, events, without_recorded_decision, unchanged, changed, recorded_policy_hashes, transitions: [{recorded, candidate, events}], examples}` (`--json` is the older spelling); `cards` is `{bucket, agents, tools_with_input_schema, unreadable}`, the cards tool calls were checked against, or null with `--cards none`",
    ),
    (
        "approvals list",
        "`[{id, status, agent, request_subject, requested_at, expires_at, approver, comment, answered_at, receipt, decision_span?}]`, oldest first (`schemas::ApprovalState`; `decision_span` only where spans are exported)",
    ),
    (
        "approvals show",
        "the request as in `approvals list`, plus `data`: the parked event's data (JSON, a string, or null)",
    ),
    (
        "limits show",
        "`{agents: [{agent, per_minute, per_hour, per_day, tokens_day, cost_micros_day}], workflow: {trace_id, events, tool_calls, tokens, cost_micros} or null}`",
    ),
    (
        "cache status",
        "`{bucket, entries, bytes, max_bytes (null: unlimited), max_age_secs}`",
    ),
    (
        "signers list",
        "`[{public_key, name, status, added_at, retired_at?, revoked_at?}]` (`retired_at`, `revoked_at` only once it is retired or revoked)",
    ),
    (
        "audit verify",
        "`{ok, decisions, checkpoints, pending, compared, findings: [{kind: altered, deleted, missing, inserted or checkpoint, ...the finding's fields}]}`; exit 1 unless `ok`",
    ),
    (
        "audit repair",
        "`{ok, dry_run, compared, reinserted: {events, decisions} (rows re-inserted, or to re-insert on a dry run), still_missing, unrecoverable: [line]}`; exit 1 unless `ok`",
    ),
    (
        "gpus",
        "`{at, scalers: [scaler status], leases: [{gpu, pool, holder, granted_at, expires_at}], lapsed: [lease], declared: [gpu], local_pools: [{pool, backlog, backlog_error, desired, min_gpus, max_gpus, target_backlog_per_gpu}]}`",
    ),
];

/// The page.
pub(crate) fn markdown(root: &Command) -> String {
    let mut root = root.clone();
    root.build();
    let mut out = String::new();
    let _ = writeln!(out, "# meshctl reference\n");
    let _ = writeln!(
        out,
        "<!-- Generated from meshctl's clap definitions; do not edit. Regenerate: `{REGENERATE}` (`cargo test -p meshctl --test it reference::` fails when this page differs). -->\n"
    );
    if let Some(about) = root.get_about() {
        let _ = writeln!(out, "{}\n", one_line(&about.to_string()));
    }
    let _ = writeln!(
        out,
        "Every command below takes the [global options](#global-options). Conventions: [exit codes](#exit-codes), [durations](#durations), [`-o json`](#output--o-json).\n"
    );

    let _ = writeln!(out, "## Exit codes\n");
    let _ = writeln!(out, "| code | meaning |\n|---|---|");
    for exit in Exit::ALL {
        let _ = writeln!(out, "| {} | {} |", exit.code(), escape(exit.meaning()));
    }
    let _ = writeln!(
        out,
        "\nA failure prints one line on stderr, `meshctl: <what failed>: <the fix>`.\n"
    );
    let _ = writeln!(
        out,
        "When stdout is closed before meshctl has written everything (its reader stopped early, as in `meshctl policy check policies | head -1`), meshctl stops at once, prints nothing more (no error either) and exits {0}, as a program ended by SIGPIPE does. `up` and `down` finish first, so that no stack is left half started or half stopped: `up --detach` and `down` then exit {0}; a foreground `up` stops what it started, as on Ctrl-C, and exits {0}.\n",
        crate::output::STDOUT_CLOSED
    );

    let _ = writeln!(out, "## Durations\n");
    let _ = writeln!(
        out,
        "Every duration is a number and a unit, several added up: `250ms`, `30s`, `5m`, `2h`, `1h30m`, `2d`. A bare number is seconds, as the older `--…-secs` flags took (those names still work, hidden).\n"
    );

    let _ = writeln!(out, "## Output: `-o json`\n");
    let _ = writeln!(
        out,
        "The commands with `-o, --output <text|json>` print, with `-o json`, one JSON document on stdout (`tail`: one object per line); errors still go to stderr as one line, with the exit code above. The shapes:\n"
    );
    let _ = writeln!(out, "| command | `-o json` prints |\n|---|---|");
    for (path, shape) in JSON_SHAPES {
        let _ = writeln!(out, "| `meshctl {path}` | {} |", escape(shape));
    }
    let _ = writeln!(out);

    let _ = writeln!(out, "## Global options\n");
    let globals: Vec<&Arg> = root
        .get_arguments()
        .filter(|a| a.is_global_set() && !a.is_hide_set())
        .collect();
    args_table(&mut out, &globals);

    let _ = writeln!(out, "## Commands\n");
    for sub in root
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        command(&mut out, sub, &format!("meshctl {}", sub.get_name()));
    }
    out
}

fn command(out: &mut String, cmd: &Command, path: &str) {
    let _ = writeln!(out, "### `{path}`\n");
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        let _ = writeln!(out, "{}\n", one_line(&about.to_string()));
    }
    let usage = cmd
        .clone()
        .render_usage()
        .to_string()
        .replace("Usage: ", "");
    let _ = writeln!(out, "```text\n{}\n```\n", usage.trim());
    let own: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_global_set() && !a.is_hide_set())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .collect();
    if !own.is_empty() {
        args_table(out, &own);
    }
    let subs: Vec<&Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    if !subs.is_empty() {
        let names: Vec<String> = subs
            .iter()
            .map(|s| {
                format!(
                    "[`{}`](#{})",
                    s.get_name(),
                    anchor(&format!("{path} {}", s.get_name()))
                )
            })
            .collect();
        let _ = writeln!(out, "Subcommands: {}.\n", names.join(", "));
    }
    for sub in subs {
        command(out, sub, &format!("{path} {}", sub.get_name()));
    }
}

fn args_table(out: &mut String, args: &[&Arg]) {
    let _ = writeln!(
        out,
        "| argument | meaning | default | env |\n|---|---|---|---|"
    );
    for arg in args {
        let name = arg_name(arg);
        let mut help = arg
            .get_help()
            .map(|h| one_line(&h.to_string()))
            .unwrap_or_default();
        let values: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|v| !v.is_hide_set())
            .map(|v| format!("`{}`", v.get_name()))
            .collect();
        if !values.is_empty() && arg.get_action().takes_values() {
            if !help.is_empty() && !help.ends_with('.') {
                help.push('.');
            }
            let _ = write!(help, " One of: {}.", values.join(", "));
        }
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let default = if default.is_empty() || !arg.get_action().takes_values() {
            String::new()
        } else if default.iter().all(String::is_empty) {
            "(empty)".to_owned()
        } else {
            format!("`{}`", default.join(","))
        };
        let env = arg
            .get_env()
            .map(|e| format!("`{}`", e.to_string_lossy()))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            escape(&name),
            escape(&help),
            escape(&default),
            env
        );
    }
    let _ = writeln!(out);
}

/// `-o, --output <FORMAT>`, `<ID>`, `--detach`.
fn arg_name(arg: &Arg) -> String {
    let value = arg
        .get_value_names()
        .and_then(|v| v.first())
        .map(|v| v.to_string())
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    let takes = arg.get_action().takes_values();
    let repeat = matches!(arg.get_action(), clap::ArgAction::Append);
    match (arg.get_short(), arg.get_long()) {
        (None, None) => {
            let name = format!("<{value}>");
            if repeat {
                format!("`{name}...`")
            } else {
                format!("`{name}`")
            }
        }
        (short, Some(long)) => {
            let mut name = match short {
                Some(s) => format!("-{s}, --{long}"),
                None => format!("--{long}"),
            };
            if takes {
                let _ = write!(name, " <{value}>");
            }
            if repeat {
                name.push_str(" (repeatable)");
            }
            format!("`{name}`")
        }
        (Some(s), None) => format!("`-{s}`"),
    }
}

/// A GitHub heading anchor of `text`.
fn anchor(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn escape(text: &str) -> String {
    text.replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command paths (`agents list`) that take `-o`.
    fn with_output(cmd: &Command, path: &str, out: &mut Vec<String>) {
        if cmd.get_arguments().any(|a| a.get_id() == "output") {
            out.push(path.trim().to_owned());
        }
        for sub in cmd.get_subcommands() {
            with_output(sub, &format!("{path} {}", sub.get_name()), out);
        }
    }

    #[test]
    fn every_command_with_output_documents_its_json() {
        let mut paths = Vec::new();
        with_output(
            &<crate::Cli as clap::CommandFactory>::command(),
            "",
            &mut paths,
        );
        let mut documented: Vec<String> =
            JSON_SHAPES.iter().map(|(p, _)| (*p).to_owned()).collect();
        paths.sort();
        documented.sort();
        assert_eq!(paths, documented);
    }

    #[test]
    fn anchors_follow_github() {
        assert_eq!(anchor("meshctl agents add"), "meshctl-agents-add");
        assert_eq!(anchor("Output: `-o json`"), "output--o-json");
    }
}
