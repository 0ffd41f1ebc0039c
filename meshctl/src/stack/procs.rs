//! The processes `meshctl up` starts: where their files live under
//! `.agentmesh/`, how they are spawned (own process group, output to a log
//! file, a pid file that `meshctl down` reads), and how they are found,
//! checked and stopped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The state directory, `.agentmesh/` by default.
#[derive(Debug, Clone)]
pub(crate) struct Home {
    root: PathBuf,
}

impl Home {
    /// The state directory at `root` (created on demand).
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory itself.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    /// Pid and ready files.
    pub(crate) fn run_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// Log files, one per process.
    pub(crate) fn log_dir(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// `<name>.pid`.
    pub(crate) fn pid_file(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.pid"))
    }

    /// `<name>.ready`, created by a service once it is ready.
    pub(crate) fn ready_file(&self, name: &str) -> PathBuf {
        self.run_dir().join(format!("{name}.ready"))
    }

    /// `<name>.log`.
    pub(crate) fn log_file(&self, name: &str) -> PathBuf {
        self.log_dir().join(format!("{name}.log"))
    }

    /// Creates the directories.
    pub(crate) fn create(&self) -> anyhow::Result<()> {
        for dir in [self.run_dir(), self.log_dir()] {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("creating `{}`", dir.display()))?;
        }
        Ok(())
    }
}

/// A process `meshctl up` started, as its pid file records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Recorded {
    /// The process id.
    pub pid: i32,
    /// The executable it was started from (canonical path).
    pub exe: PathBuf,
}

/// Reads `<name>.pid`; `None` when there is none or it is unreadable.
pub(crate) fn read_pid(home: &Home, name: &str) -> Option<Recorded> {
    let text = std::fs::read_to_string(home.pid_file(name)).ok()?;
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let exe = PathBuf::from(lines.next().unwrap_or_default().trim());
    Some(Recorded { pid, exe })
}

/// Whether the recorded process still runs (and is still that program,
/// not a recycled pid). Zombies count as gone.
pub(crate) fn is_running(recorded: &Recorded) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{}", recorded.pid));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    if matches!(state, Some('Z') | Some('X') | None) {
        return false;
    }
    match std::fs::read_link(proc_dir.join("exe")) {
        Ok(exe) => {
            // A binary rebuilt while it runs shows as `<path> (deleted)`.
            let exe = exe
                .to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned();
            recorded.exe.as_os_str().is_empty() || Path::new(&exe) == recorded.exe
        }
        // Not ours to inspect (another user): trust the pid.
        Err(_) => true,
    }
}

/// Starts `program` in its own process group (so a Ctrl-C in the terminal
/// does not reach it and `meshctl` decides the order of shutdown), with its
/// output appended to `<name>.log`, and records it in `<name>.pid`.
pub(crate) fn spawn(
    home: &Home,
    name: &str,
    program: &Path,
    args: &[String],
) -> anyhow::Result<Child> {
    spawn_with_env(home, name, program, args, &[])
}

/// [`spawn`] with environment changes: `Some` sets a variable, `None`
/// removes it (credentials go here rather than on the command line, where
/// every user of the machine can read them).
pub(crate) fn spawn_with_env(
    home: &Home,
    name: &str,
    program: &Path,
    args: &[String],
    env: &[(&str, Option<String>)],
) -> anyhow::Result<Child> {
    use std::os::unix::process::CommandExt;
    home.create()?;
    let log_path = home.log_file(name);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening `{}`", log_path.display()))?;
    let err_log = log.try_clone().context("duplicating the log file handle")?;
    let mut command = Command::new(program);
    for (key, value) in env {
        match value {
            Some(value) => command.env(key, value),
            None => command.env_remove(key),
        };
    }
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err_log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting `{}`", program.display()))?;
    let exe = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_owned());
    std::fs::write(
        home.pid_file(name),
        format!("{}\n{}\n", child.id(), exe.display()),
    )
    .with_context(|| format!("writing `{}`", home.pid_file(name).display()))?;
    Ok(child)
}

/// The last `max` bytes of a process's log, for error messages.
pub(crate) fn log_tail(home: &Home, name: &str, max: usize) -> String {
    let text = std::fs::read_to_string(home.log_file(name)).unwrap_or_default();
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].trim_end().to_owned()
}

fn signal(pid: i32, sig: rustix::process::Signal) -> bool {
    rustix::process::Pid::from_raw(pid)
        .map(|p| rustix::process::kill_process(p, sig).is_ok())
        .unwrap_or(false)
}

/// What [`stop`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// It exited after SIGTERM.
    Gracefully,
    /// It had to be killed after the grace period.
    Killed,
    /// It was not running (stale pid file).
    NotRunning,
}

/// Stops the process recorded as `name`: SIGTERM, then SIGKILL after
/// `grace`; removes the pid file.
pub(crate) fn stop(home: &Home, name: &str, grace: Duration) -> anyhow::Result<Option<Stopped>> {
    let Some(recorded) = read_pid(home, name) else {
        return Ok(None);
    };
    let outcome = if !is_running(&recorded) {
        Stopped::NotRunning
    } else {
        signal(recorded.pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + grace;
        while is_running(&recorded) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if is_running(&recorded) {
            signal(recorded.pid, rustix::process::Signal::KILL);
            let deadline = Instant::now() + Duration::from_secs(5);
            while is_running(&recorded) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if is_running(&recorded) {
                bail!("`{name}` (pid {}) did not exit after SIGKILL", recorded.pid);
            }
            Stopped::Killed
        } else {
            Stopped::Gracefully
        }
    };
    let _ = std::fs::remove_file(home.pid_file(name));
    let _ = std::fs::remove_file(home.ready_file(name));
    Ok(Some(outcome))
}

/// Finds a service binary: next to `meshctl`'s own executable first, then on
/// `PATH`.
pub(crate) fn find_service(name: &str) -> Option<PathBuf> {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.is_file());
    beside.or_else(|| find_on_path(name))
}

/// `name` on `PATH`, or in `/usr/sbin` and `/usr/local/sbin` (where Debian
/// puts servers) when `PATH` lacks them.
pub(crate) fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The nats-server the stack runs ([`broker_config::server::find_nats_server`]),
/// or an error that says how to install the default one.
pub(crate) fn find_nats_server() -> anyhow::Result<broker_config::server::NatsBinary> {
    broker_config::server::find_nats_server().map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}, or set `NATS_URL` to a running server",
            broker_config::server::INSTALL_HINT
        )
    })
}

/// A server binary: `env_override` when set, else from `PATH`, else an
/// error naming the Debian package to install.
pub(crate) fn find_server(
    name: &str,
    env_override: &str,
    package: &str,
    url_var: &str,
) -> anyhow::Result<PathBuf> {
    let install = format!("install it (`sudo apt-get install {package}`)");
    if let Ok(path) = std::env::var(env_override)
        && !path.is_empty()
    {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "`{env_override}` is `{}`, which is not a file: {install}, point `{env_override}` at `{name}`, or set `{url_var}` to a running server",
                path.display()
            );
        }
        return Ok(path);
    }
    find_on_path(name).with_context(|| {
        format!("`{name}` is not installed: {install}, set `{env_override}` to its path, or set `{url_var}` to a running server")
    })
}
