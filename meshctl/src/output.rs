//! What every read command shares: `-o text|json` (the JSON shapes are
//! documented in `docs/meshctl.md`), the one duration syntax of meshctl
//! (`30s`, `5m`, `2h`, `1h30m`, `250ms`), and stdout itself: everything
//! meshctl prints goes through [`write_out`] (the `out!` and `outln!`
//! macros) or [`stdout`], which end meshctl quietly when the reader of a
//! pipe has gone (`meshctl … | head -1`) instead of panicking as `println!`
//! does; the commands that start or stop processes finish first
//! ([`finish_despite_closed_stdout`]). Stderr goes through [`write_err`]
//! (`errln!`), which never panics either.

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::Serialize;

/// How a read command prints what it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub(crate) enum Format {
    /// Lines for a person to read.
    #[default]
    Text,
    /// JSON for a script: one document, or one object per line for what follows live (`tail`).
    Json,
}

/// The `-o` / `--output` flag of a read command.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub(crate) struct OutputArg {
    /// Output format: `text` for people, `json` for scripts (shape: docs/meshctl.md).
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Format::Text)]
    pub output: Format,
}

impl OutputArg {
    /// Whether JSON was asked for.
    pub(crate) fn json(self) -> bool {
        self.output == Format::Json
    }
}

/// Prints `value` as one JSON document (pretty) on stdout.
pub(crate) fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints `value` as one line of JSON on stdout.
pub(crate) fn print_json_line(value: &impl Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string(value)?);
    Ok(())
}

/// meshctl's exit status when its stdout was closed before it wrote
/// everything (the reader of a pipe stopped early: `meshctl … | head -1`):
/// 128 + SIGPIPE, what a shell reports for a program that signal ended.
pub(crate) const STDOUT_CLOSED: u8 = 141;

/// Set by [`finish_despite_closed_stdout`].
static FINISH: AtomicBool = AtomicBool::new(false);
/// Whether stdout was found closed while [`FINISH`] was set.
static CLOSED: AtomicBool = AtomicBool::new(false);

/// For a command that starts or stops processes (`up`, `down`): a closed
/// stdout no longer ends meshctl at once, half way through (a stack half
/// started, or half stopped, or a foreground `up` gone with its services
/// left running). What would have been printed is dropped, the command
/// finishes (a foreground `up` then stops what it started), and meshctl
/// ends with [`STDOUT_CLOSED`] ([`stdout_closed`]).
pub(crate) fn finish_despite_closed_stdout() {
    FINISH.store(true, Ordering::Relaxed);
}

/// Whether stdout was found closed under [`finish_despite_closed_stdout`].
pub(crate) fn stdout_closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Writes `args` on stdout: what `out!` and `outln!` expand to.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    if stdout_closed() {
        return;
    }
    let written = io::stdout().write_fmt(args);
    if let Err(e) = written {
        let _ = stdout_failed(e);
    }
}

/// Writes `args` on stderr: what `errln!` expands to. A failed write is
/// dropped: stderr is where meshctl would report it.
pub(crate) fn write_err(args: std::fmt::Arguments<'_>) {
    let _ = io::stderr().write_fmt(args);
}

/// Stdout as a [`Write`] (for what writes into one: serde_json, clap's
/// completions, a report), with [`write_out`]'s handling of a closed pipe.
pub(crate) fn stdout() -> Stdout {
    Stdout
}

/// See [`stdout`].
pub(crate) struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if stdout_closed() {
            return Ok(buf.len());
        }
        match io::stdout().write(buf) {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => {
                stdout_failed(e).map(|()| buf.len())
            }
            result => result,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        if stdout_closed() {
            return Ok(());
        }
        match io::stdout().flush() {
            Err(e) if e.kind() != io::ErrorKind::Interrupted => stdout_failed(e),
            result => result,
        }
    }
}

/// Ends meshctl after a write to stdout failed: silently with
/// [`STDOUT_CLOSED`] when the reader has gone (nobody is left to read a
/// message, and a script sees the status), else (a full disk under
/// `> file`) with one line on stderr and [`crate::exit::Exit::Failed`].
/// Either way at once, as the default action of SIGPIPE would: what was
/// to be printed has nowhere to go. Under [`finish_despite_closed_stdout`]
/// a closed pipe is only noted (`Ok`), and the rest of the output dropped.
fn stdout_failed(error: io::Error) -> io::Result<()> {
    if error.kind() == io::ErrorKind::BrokenPipe {
        if FINISH.load(Ordering::Relaxed) {
            CLOSED.store(true, Ordering::Relaxed);
            return Ok(());
        }
        std::process::exit(i32::from(STDOUT_CLOSED));
    }
    let _ = writeln!(io::stderr(), "meshctl: writing to stdout: {error}");
    std::process::exit(i32::from(crate::exit::Exit::Failed.code()));
}

/// Parses a duration: a number and a unit (`ms`, `s`, `m`, `h`, `d`),
/// several added up (`1h30m`); a bare number is seconds, as the old
/// `--…-secs` flags took.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("`{text}` is not a duration ({e}): write e.g. `30s`, `5m`, `2h`, `1h30m`, `250ms`")
    })
}

/// A duration as meshctl writes it (`1m 30s`).
pub(crate) fn format_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_syntax_for_every_duration() {
        let cases = [
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("1h30m", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
            ("60", Duration::from_secs(60)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        let err = parse_duration("soon").unwrap_err();
        assert!(
            err.contains("`soon` is not a duration") && err.contains("`5m`"),
            "{err}"
        );
        assert_eq!(format_duration(Duration::from_secs(90)), "1m 30s");
    }
}
