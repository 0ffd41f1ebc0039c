//! meshctl's exit codes, defined once: what each means (the table of
//! `docs/meshctl.md` is generated from [`Exit::ALL`]), the typed failure a
//! command returns to pick one ([`fail`]), and the classification of every
//! other error (an unreachable server, refused credentials) at the top of
//! `main`, with the one line that names the fix.

use std::fmt;
use std::process::ExitCode;

/// How meshctl ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// It did what was asked.
    Ok,
    /// It ran and found problems: a check failed, a component is down, an
    /// event was denied or invalid.
    Findings,
    /// The command line is wrong: an unknown flag, a bad value.
    Usage,
    /// NATS or ClickHouse did not answer.
    Unreachable,
    /// NATS or ClickHouse refused the credentials, or a permission.
    Refused,
    /// What was named does not exist: an agent, a trace, a stream, a file.
    NotFound,
    /// What it waited for did not come in time (a receipt, a server).
    TimedOut,
    /// Any other failure.
    Failed,
}

impl Exit {
    /// Every exit code, in order.
    pub(crate) const ALL: [Exit; 8] = [
        Exit::Ok,
        Exit::Findings,
        Exit::Usage,
        Exit::Unreachable,
        Exit::Refused,
        Exit::NotFound,
        Exit::TimedOut,
        Exit::Failed,
    ];

    /// The process exit status.
    pub(crate) fn code(self) -> u8 {
        match self {
            Exit::Ok => 0,
            Exit::Findings => 1,
            Exit::Usage => 2,
            Exit::Unreachable => 3,
            Exit::Refused => 4,
            Exit::NotFound => 5,
            Exit::TimedOut => 6,
            Exit::Failed => 7,
        }
    }

    /// What the code means, for the reference page.
    pub(crate) fn meaning(self) -> &'static str {
        match self {
            Exit::Ok => "done",
            Exit::Findings => {
                "ran and found problems: a failed check or verification, a component down, an event denied or invalid"
            }
            Exit::Usage => {
                "wrong command line: an unknown flag or subcommand, a value that does not parse"
            }
            Exit::Unreachable => {
                "NATS or ClickHouse did not answer (start the stack: `meshctl up`)"
            }
            Exit::Refused => "NATS or ClickHouse refused the credentials or a permission",
            Exit::NotFound => {
                "what was named does not exist: an agent, a trace, a stream, a file, the SMT solver"
            }
            Exit::TimedOut => {
                "what meshctl waited for did not come in time (a receipt, a server, a proof)"
            }
            Exit::Failed => "any other failure (e.g. an SMT solver that crashed or is too old)",
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit.code())
    }
}

/// A failure with its exit code; the message is the one line meshctl
/// prints, so it names the fix.
#[derive(Debug)]
pub(crate) struct Fail {
    /// The exit code.
    pub exit: Exit,
    message: String,
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Fail {}

/// A failure that exits with `exit`.
pub(crate) fn fail(exit: Exit, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Fail {
        exit,
        message: message.into(),
    })
}

/// The exit code of `error`: its [`Fail`]'s, else from what failed
/// underneath (a connection refused, credentials refused), else
/// [`Exit::Failed`].
pub(crate) fn classify(error: &anyhow::Error) -> Exit {
    for cause in error.chain() {
        if let Some(f) = cause.downcast_ref::<Fail>() {
            return f.exit;
        }
        if let Some(e) = cause.downcast_ref::<async_nats::ConnectError>() {
            return match e.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => Exit::Refused,
                async_nats::ConnectErrorKind::TimedOut
                | async_nats::ConnectErrorKind::Io
                | async_nats::ConnectErrorKind::Dns
                | async_nats::ConnectErrorKind::MaxReconnects => Exit::Unreachable,
                _ => Exit::Failed,
            };
        }
        if let Some(e) = cause.downcast_ref::<clickhouse::error::Error>() {
            match e {
                clickhouse::error::Error::Network(_) => return Exit::Unreachable,
                clickhouse::error::Error::BadResponse(text)
                    if text.contains("AUTHENTICATION_FAILED")
                        || text.contains("ACCESS_DENIED")
                        || text.contains("Authentication failed") =>
                {
                    return Exit::Refused;
                }
                _ => {}
            }
        }
        if let Some(e) = cause.downcast_ref::<std::io::Error>() {
            match e.kind() {
                std::io::ErrorKind::ConnectionRefused => return Exit::Unreachable,
                std::io::ErrorKind::NotFound => return Exit::NotFound,
                std::io::ErrorKind::PermissionDenied => return Exit::Refused,
                _ => {}
            }
        }
    }
    Exit::Failed
}

/// The line meshctl prints for `error`: its message, and for an
/// unreachable server or refused credentials, the fix.
pub(crate) fn line(error: &anyhow::Error, exit: Exit) -> String {
    let message = chain_text(error);
    let explicit = error.chain().any(|c| c.downcast_ref::<Fail>().is_some());
    let message = message.replace('\n', " ");
    let from_a_server = error.chain().any(|c| {
        c.downcast_ref::<async_nats::ConnectError>().is_some()
            || c.downcast_ref::<clickhouse::error::Error>().is_some()
    });
    if explicit || (exit == Exit::Refused && !from_a_server) {
        return message;
    }
    match exit {
        Exit::Unreachable => format!(
            "{message}: nothing answers there; start the stack (`meshctl up`) or point --nats-url / --clickhouse-url at it"
        ),
        Exit::Refused => format!(
            "{message}: the server refused meshctl's credentials; pass the right key (--nats-nkey-seed-file, --nats-creds, --clickhouse-user/--clickhouse-password) or use the stack's own (`meshctl up` writes them under .agentmesh/auth)"
        ),
        _ => message,
    }
}

/// `error` and its causes joined by `: `, as `{error:#}` writes them, but
/// without a cause that its wrapper already printed: async-nats and hyper
/// end their message with their source's (`IO error: Connection refused`
/// over `Connection refused`), which would otherwise show twice.
fn chain_text(error: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if previous.ends_with(&text) {
            continue;
        }
        parts.push(text.clone());
        previous = text;
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        let codes: Vec<u8> = Exit::ALL.iter().map(|e| e.code()).collect();
        assert_eq!(codes, (0..8).collect::<Vec<u8>>());
        assert!(Exit::ALL.iter().all(|e| !e.meaning().is_empty()));
    }

    #[test]
    fn a_typed_failure_keeps_its_code_under_context() {
        let e = fail(Exit::NotFound, "no agent `x`").context("publishing");
        assert_eq!(classify(&e), Exit::NotFound);
        assert_eq!(line(&e, Exit::NotFound), "publishing: no agent `x`");
    }

    #[test]
    fn a_file_permission_is_not_blamed_on_credentials() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let e = anyhow::Error::new(io).context("reading `x.nk`");
        assert_eq!(classify(&e), Exit::Refused);
        assert_eq!(line(&e, Exit::Refused), "reading `x.nk`: permission denied");
    }

    /// A cause that its wrapper already quotes is said once.
    #[test]
    fn a_cause_is_not_repeated() {
        #[derive(Debug)]
        struct Wrapper(std::io::Error);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "IO error: {}", self.0)
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = anyhow::Error::new(Wrapper(io)).context("connecting to NATS at nats://127.0.0.1:1");
        assert_eq!(classify(&e), Exit::Unreachable);
        let line = line(&e, Exit::Unreachable);
        assert!(
            line.starts_with(
                "connecting to NATS at nats://127.0.0.1:1: IO error: connection refused: nothing answers there"
            ),
            "{line}"
        );
    }

    #[test]
    fn a_refused_connection_is_unreachable_with_the_fix() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let e = anyhow::Error::new(io).context("connecting to NATS at nats://127.0.0.1:1");
        assert_eq!(classify(&e), Exit::Unreachable);
        let line = line(&e, Exit::Unreachable);
        assert!(line.contains("meshctl up"), "{line}");
        assert!(!line.contains('\n'));
    }
}
