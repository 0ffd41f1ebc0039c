//! Environment variables a service was given by mistake.
//!
//! Every setting of a service also reads an environment variable (its
//! `clap` argument's `env`). A misspelt one (`AGENTMESH_WORKER_BACTH`)
//! would otherwise be ignored without a word and the default used, which in
//! a container shows only much later. [`check_env`] stops the service at
//! the start instead, naming the variable and the one it resembles.
//!
//! What counts as a mistake, so that a shell's or an orchestrator's other
//! variables never stop a service:
//! - a name under one of the service's own prefixes (`AGENTMESH_WORKER_`
//!   for the policy worker, `AGENTMESH_AUDIT_` for the audit sink,
//!   `GPU_SCALER_` for the GPU scaler) that it does not read;
//! - any other name within two edits of a name it reads (`NATS_ULR`,
//!   `AGENTMESH_HTTP_PROT`), unless that name is itself one it reads.

use std::fmt;

/// An environment variable the service does not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEnv {
    /// The variable's name.
    pub name: String,
    /// The variable the service reads that it most resembles.
    pub nearest: Option<String>,
    /// The service.
    pub service: String,
}

impl fmt::Display for UnknownEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown environment variable `{}`: {} does not read it",
            self.name, self.service
        )?;
        if let Some(nearest) = &self.nearest {
            write!(f, " (did you mean `{nearest}`?)")?;
        }
        write!(
            f,
            "; fix or unset it (`{} --help` lists every variable it reads)",
            self.service
        )
    }
}

impl std::error::Error for UnknownEnv {}

/// Checks this process's environment against the variables `command`
/// reads; see the module documentation for what is refused.
///
/// # Errors
/// The first variable that is a mistake, with the nearest one it reads.
pub fn check_env(command: &clap::Command, own_prefixes: &[&str]) -> Result<(), UnknownEnv> {
    let names = std::env::vars_os().filter_map(|(name, _)| name.into_string().ok());
    check_names(command, own_prefixes, names)
}

/// [`check_env`] on the given variable names instead of the environment.
///
/// # Errors
/// As [`check_env`].
pub fn check_names(
    command: &clap::Command,
    own_prefixes: &[&str],
    names: impl IntoIterator<Item = String>,
) -> Result<(), UnknownEnv> {
    let known: Vec<String> = command
        .get_arguments()
        .filter_map(|arg| arg.get_env())
        .filter_map(|env| env.to_str())
        .map(str::to_owned)
        .collect();
    let mut names: Vec<String> = names.into_iter().collect();
    names.sort();
    for name in names {
        if known.contains(&name) {
            continue;
        }
        let nearest = known
            .iter()
            .map(|k| (distance(k, &name), k))
            .min()
            .map(|(d, k)| (d, k.clone()));
        let own = own_prefixes.iter().any(|p| name.starts_with(p));
        let close = nearest.as_ref().is_some_and(|(d, _)| *d <= 2);
        if own || close {
            return Err(UnknownEnv {
                name,
                nearest: nearest.filter(|(d, _)| *d <= 4).map(|(_, k)| k),
                service: command.get_name().to_owned(),
            });
        }
    }
    Ok(())
}

/// Levenshtein distance between two names (ASCII in practice).
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = if ca == *cb {
                previous
            } else {
                1 + previous.min(row[j]).min(current)
            };
            previous = current;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use clap::{Arg, Command};

    use super::*;

    fn worker() -> Command {
        Command::new("policy-worker")
            .arg(Arg::new("nats-url").long("nats-url").env("NATS_URL"))
            .arg(
                Arg::new("batch")
                    .long("batch")
                    .env("AGENTMESH_WORKER_BATCH"),
            )
            .arg(
                Arg::new("port")
                    .long("http-port")
                    .env("AGENTMESH_HTTP_PORT"),
            )
    }

    fn check(names: &[&str]) -> Result<(), UnknownEnv> {
        check_names(
            &worker(),
            &["AGENTMESH_WORKER_"],
            names.iter().map(|n| (*n).to_owned()),
        )
    }

    #[test]
    fn names_the_service_reads_and_unrelated_ones_pass() {
        check(&[
            "NATS_URL",
            "AGENTMESH_WORKER_BATCH",
            "AGENTMESH_HTTP_PORT",
            "PATH",
            "HOME",
            "HOSTNAME",
            // Other components' settings.
            "AGENTMESH_HOME",
            "AGENTMESH_UI_PORT",
            "AGENTMESH_AUDIT_DATABASE",
            "AGENTMESH_READY_FILE",
            "NATS_CREDS",
            "NATS_USER",
        ])
        .unwrap();
    }

    #[test]
    fn a_misspelt_name_is_refused_with_the_one_it_resembles() {
        let error = check(&["PATH", "AGENTMESH_WORKER_BACTH"]).unwrap_err();
        assert_eq!(error.name, "AGENTMESH_WORKER_BACTH");
        assert_eq!(error.nearest.as_deref(), Some("AGENTMESH_WORKER_BATCH"));
        assert_eq!(
            error.to_string(),
            "unknown environment variable `AGENTMESH_WORKER_BACTH`: policy-worker does not read it \
             (did you mean `AGENTMESH_WORKER_BATCH`?); fix or unset it (`policy-worker --help` \
             lists every variable it reads)"
        );
        let error = check(&["NATS_ULR"]).unwrap_err();
        assert_eq!(error.nearest.as_deref(), Some("NATS_URL"));
        let error = check(&["AGENTMESH_HTTP_PROT"]).unwrap_err();
        assert_eq!(error.nearest.as_deref(), Some("AGENTMESH_HTTP_PORT"));
    }

    #[test]
    fn any_unknown_name_under_the_services_own_prefix_is_refused() {
        let error = check(&["AGENTMESH_WORKER_THREADS"]).unwrap_err();
        assert_eq!(error.name, "AGENTMESH_WORKER_THREADS");
        assert!(error.nearest.is_none(), "{error:?}");
        assert!(!error.to_string().contains("did you mean"), "{error}");
    }

    #[test]
    fn edit_distance() {
        assert_eq!(distance("NATS_URL", "NATS_URL"), 0);
        assert_eq!(distance("NATS_URL", "NATS_ULR"), 2);
        assert_eq!(distance("BATCH", "BACTH"), 2);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("kitten", "sitting"), 3);
    }
}
