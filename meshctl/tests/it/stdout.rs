//! meshctl writing into a pipe whose reader has gone (`meshctl … | head
//! -1`): it stops quietly, no panic and no message, with status 141 (as a
//! program ended by SIGPIPE), whichever way it prints: lines, one whole
//! page, `-o json`, a table, clap's completions; and a closed stderr is
//! no panic either.

use std::io::{BufRead, BufReader};
use std::process::{Command, ExitStatus, Stdio};

use testkit::workspace;

/// Commands that print without a server, each printing another way.
const COMMANDS: &[&[&str]] = &[
    // Lines, one `outln!` each.
    &["policy", "check", "policies"],
    // One JSON document.
    &["policy", "check", "policies", "-o", "json"],
    // One page in one write.
    &["docs", "reference"],
    // clap_complete writing into meshctl's stdout.
    &["completions", "bash"],
    // A table (no agents yet: its one line).
    &["agents", "list", "--policies", "policies"],
];

/// The status `docs/meshctl.md` gives a closed stdout.
const STDOUT_CLOSED: i32 = 141;

fn meshctl(args: &[&str], home: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.args(args)
        .current_dir(workspace())
        .env("AGENTMESH_HOME", home)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn check(args: &[&str], status: ExitStatus, stderr: &[u8], allowed: &[i32]) {
    let stderr = String::from_utf8_lossy(stderr);
    assert!(
        stderr.is_empty(),
        "`meshctl {}` wrote on stderr: {stderr}",
        args.join(" ")
    );
    assert!(
        status.code().is_some_and(|code| allowed.contains(&code)),
        "`meshctl {}` ended with {status}, not {allowed:?} (101 is a panic)",
        args.join(" ")
    );
}

/// The reader is gone before meshctl writes a byte: its first write fails,
/// every time.
#[test]
fn a_closed_stdout_ends_meshctl_quietly_with_141() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    for args in COMMANDS {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let child = meshctl(args, home.path()).stdout(writer).spawn()?;
        let out = child.wait_with_output()?;
        check(args, out.status, &out.stderr, &[STDOUT_CLOSED]);
    }
    Ok(())
}

/// As `| head -1`: the reader takes the first line and goes. Whether
/// meshctl had written the rest by then (status 0) or not (141), it ends
/// quietly.
#[test]
fn a_reader_that_stops_after_one_line_ends_meshctl_quietly() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    for args in COMMANDS {
        let mut child = meshctl(args, home.path()).stdout(Stdio::piped()).spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first)?;
        assert!(
            !first.is_empty(),
            "`meshctl {}` printed nothing",
            args.join(" ")
        );
        let out = child.wait_with_output()?;
        check(args, out.status, &out.stderr, &[0, STDOUT_CLOSED]);
    }
    Ok(())
}

/// A failure's one line goes to a stderr whose reader is gone: meshctl
/// still ends with the failure's status, not a panic's.
#[test]
fn a_closed_stderr_keeps_the_failures_status() -> anyhow::Result<()> {
    let home = tempfile::tempdir()?;
    let args = ["policy", "check", "/nonexistent-policy-dir"];
    let open = meshctl(&args, home.path()).output()?;
    assert!(
        String::from_utf8_lossy(&open.stderr).starts_with("meshctl: "),
        "{open:?}"
    );
    let (reader, writer) = std::io::pipe()?;
    drop(reader);
    let closed = meshctl(&args, home.path())
        .stdout(Stdio::null())
        .stderr(writer)
        .status()?;
    assert_eq!(closed.code(), open.status.code(), "101 is a panic");
    assert_ne!(closed.code(), Some(0));
    Ok(())
}
