//! A service binary run by a test: started with its stderr read line by line
//! into memory (so a test can wait for a log line or print the log when it
//! fails), and killed when its handle drops.

use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, anyhow};

use crate::{eventually, until_ready};

/// The lines a process has written to stderr so far, shared with the thread
/// that reads them.
#[derive(Clone, Debug, Default)]
pub struct LogLines(Arc<Mutex<Vec<String>>>);

impl LogLines {
    /// Takes `child`'s piped stderr and collects its lines on a thread of
    /// their own until the pipe closes.
    pub fn capture(child: &mut Child) -> anyhow::Result<Self> {
        let stderr = child
            .stderr
            .take()
            .context("the child's stderr is not piped")?;
        let log = Self::default();
        let sink = log.clone();
        std::thread::spawn(move || {
            // Bytes, not `lines()`: a line that is not UTF-8 must not stop the
            // reading (the pipe would fill and block the process).
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while matches!(reader.read_until(b'\n', &mut line), Ok(n) if n > 0) {
                let text = String::from_utf8_lossy(&line);
                let text = text.trim_end_matches(['\n', '\r']).to_owned();
                sink.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(text);
                line.clear();
            }
        });
        Ok(log)
    }

    /// The lines read so far.
    pub fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The lines read so far, joined with `\n`.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .join("\n")
    }

    /// Whether a line read so far contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|l| l.contains(needle))
    }

    /// Waits until a line contains `needle`; the error carries the log.
    pub async fn wait_for(&self, timeout: Duration, needle: &str) -> anyhow::Result<()> {
        eventually(timeout, needle, || {
            let found = self.contains(needle);
            async move { found.then_some(()) }
        })
        .await
        .map_err(|e| anyhow!("{e}; log:\n{}", self.text()))
    }
}

/// A child process with its stdout discarded and its stderr in a
/// [`LogLines`]; killed (SIGKILL) and reaped on drop.
pub struct Service {
    child: Child,
    name: String,
    log: LogLines,
}

impl Service {
    /// Spawns `command` as configured, but with stdout discarded and stderr
    /// captured.
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let name = std::path::Path::new(command.get_program())
            .file_name()
            .unwrap_or(command.get_program())
            .to_string_lossy()
            .into_owned();
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{name}`"))?;
        let log = LogLines::capture(&mut child)?;
        Ok(Self { child, name, log })
    }

    /// Its stderr so far.
    pub fn log(&self) -> &LogLines {
        &self.log
    }

    /// Its stderr so far, one string.
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Polls `check` (as [`eventually`]) until it yields `Some`, failing with
    /// the log if the process exits first or `timeout` passes.
    pub async fn wait_until<T, F, Fut>(
        &mut self,
        timeout: Duration,
        what: &str,
        check: F,
    ) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Option<T>>,
    {
        let log = &self.log;
        until_ready(Some(&mut self.child), timeout, what, || log.text(), check)
            .await
            .with_context(|| format!("`{}`", self.name))
    }

    /// Waits until the process exits, for at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let child = &mut self.child;
        let what = format!("`{}` to exit", self.name);
        eventually(timeout, &what, || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await
    }

    /// Sends `signal` (a name as `kill -<signal>` takes it: `TERM`, `HUP`).
    pub fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait().context("waiting on the child")? {
            anyhow::bail!(
                "`{}` already exited with {status}; not sending SIG{signal}",
                self.name
            );
        }
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .context("running `kill`")?;
        anyhow::ensure!(
            status.success(),
            "`kill -{signal}` on `{}` failed: {status}",
            self.name
        );
        Ok(())
    }

    /// Kills it (SIGKILL), as a crash, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}
