//! The scaler's config file: the pools and what their demand is, the GPUs to
//! use where NVML is absent, and the timing knobs.
//!
//! TOML (or JSON for a `.json` file), every table with
//! `deny_unknown_fields`, so a typo is an error that names the field instead
//! of a silently ignored setting. [`ConfigFile::validate`] checks what serde
//! cannot and says how to fix it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default time between two demand reads.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Default time demand must stay lower before a pool gives GPUs back.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(60);
/// Default lifetime of a lease that is not renewed.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(15);
/// Default stream whose consumers carry a pool's backlog.
pub const DEFAULT_STREAM: &str = "MESH_DELIVER";

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config `{path}`: {source}")]
    Read {
        /// The path given.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not valid TOML/JSON or has unknown or mistyped fields.
    #[error("config `{path}`: {message}")]
    Parse {
        /// The path given.
        path: String,
        /// The parser's message, naming the field.
        message: String,
    },
    /// The values are well-formed but do not make sense together.
    #[error("config: {0}")]
    Invalid(String),
}

/// Where the GPUs come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventoryMode {
    /// NVML when it loads and sees at least one GPU, else the declared GPUs.
    #[default]
    Auto,
    /// NVML only; the scaler refuses to start without it.
    Nvml,
    /// Only the GPUs declared in the config (hosts without NVML, tests).
    Declared,
}

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Time between two demand reads, e.g. `"250ms"`.
    #[serde(default = "default_poll_interval", with = "duration_str")]
    pub poll_interval: Duration,
    /// Lifetime of a lease; the holder renews it while the pool needs it.
    #[serde(default = "default_lease_ttl", with = "duration_str")]
    pub lease_ttl: Duration,
    /// `auto` (default), `nvml` or `declared`.
    #[serde(default)]
    pub inventory: InventoryMode,
    /// GPUs to use when NVML is absent (or `inventory = "declared"`).
    #[serde(default, rename = "gpu", alias = "gpus")]
    pub gpus: Vec<DeclaredGpu>,
    /// Pools by name; the name is the `<pool>` token of `mesh.gpu.lease.<pool>`.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

/// One GPU declared in the config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeclaredGpu {
    /// Its unique id (the NVML uuid, `GPU-…`, on real hardware); the lease key.
    pub uuid: String,
    /// A human name, e.g. `NVIDIA H100 80GB HBM3`.
    #[serde(default)]
    pub name: String,
    /// Memory in MiB, for display.
    #[serde(default)]
    pub memory_total_mib: u64,
    /// Whether it may be leased (default true).
    #[serde(default = "default_true")]
    pub healthy: bool,
}

/// One pool: which backlog is its demand and how much GPU that demand needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Stream whose consumers carry the backlog (default `MESH_DELIVER`).
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Durable consumer names on `stream` whose backlog counts.
    #[serde(default)]
    pub consumers: Vec<String>,
    /// Subject patterns: every consumer on `stream` whose filter lies within one counts.
    #[serde(default)]
    pub subjects: Vec<String>,
    /// Backlog (pending + ack pending) one GPU is meant to serve.
    pub target_backlog_per_gpu: u64,
    /// GPUs the pool keeps even with no backlog.
    #[serde(default)]
    pub min_gpus: u32,
    /// GPUs the pool never exceeds.
    pub max_gpus: u32,
    /// How long demand must stay lower before GPUs are given back, e.g. `"60s"`.
    #[serde(default = "default_cooldown", with = "duration_str")]
    pub cooldown: Duration,
}

fn default_poll_interval() -> Duration {
    DEFAULT_POLL_INTERVAL
}
fn default_lease_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}
fn default_cooldown() -> Duration {
    DEFAULT_COOLDOWN
}
fn default_stream() -> String {
    DEFAULT_STREAM.to_owned()
}
fn default_true() -> bool {
    true
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self {
            poll_interval: DEFAULT_POLL_INTERVAL,
            lease_ttl: DEFAULT_LEASE_TTL,
            inventory: InventoryMode::Auto,
            gpus: Vec::new(),
            pools: BTreeMap::new(),
        }
    }
}

impl ConfigFile {
    /// Reads, parses and validates a config file (`.json` as JSON, else TOML).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let config = if is_json {
            Self::from_json(&text)
        } else {
            Self::from_toml(&text)
        };
        config.map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: shown,
                message,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<toml>".to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates JSON text.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_json::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<json>".to_owned(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types cannot: names usable as subject tokens and keys,
    /// and bounds that fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.poll_interval.is_zero() {
            return invalid("`poll_interval` must be above zero, e.g. \"250ms\"".to_owned());
        }
        if self.lease_ttl < self.poll_interval * 2 {
            return invalid(format!(
                "`lease_ttl` ({}) must be at least twice `poll_interval` ({}) so leases are renewed in time",
                DisplayDuration(self.lease_ttl),
                DisplayDuration(self.poll_interval)
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for gpu in &self.gpus {
            if !is_valid_key(&gpu.uuid) {
                return invalid(format!(
                    "gpu `{}`: `uuid` may only hold letters, digits and `-_=/.`, and may not start or end with `.`",
                    gpu.uuid
                ));
            }
            if !seen.insert(gpu.uuid.as_str()) {
                return invalid(format!("gpu `{}` is declared twice: remove one", gpu.uuid));
            }
        }
        for (name, pool) in &self.pools {
            if !is_valid_pool_name(name) {
                return invalid(format!(
                    "pool `{name}`: the name must match `[a-z0-9][a-z0-9_-]{{0,62}}` (it becomes the subject token of `mesh.gpu.lease.<pool>`)"
                ));
            }
            if pool.consumers.is_empty() && pool.subjects.is_empty() {
                return invalid(format!(
                    "pool `{name}`: set `consumers` (durable names) or `subjects` (e.g. [\"{}\"]) so it has a demand",
                    schemas::subjects::deliveries_to(name)
                ));
            }
            if pool.target_backlog_per_gpu == 0 {
                return invalid(format!(
                    "pool `{name}`: `target_backlog_per_gpu` must be at least 1"
                ));
            }
            if pool.max_gpus < pool.min_gpus {
                return invalid(format!(
                    "pool `{name}`: `max_gpus` ({}) is below `min_gpus` ({}): raise `max_gpus` or lower `min_gpus`",
                    pool.max_gpus, pool.min_gpus
                ));
            }
            if pool.stream.is_empty() || pool.stream.contains(['.', '*', '>', ' ']) {
                return invalid(format!(
                    "pool `{name}`: `stream` `{}` is not a stream name",
                    pool.stream
                ));
            }
            for subject in &pool.subjects {
                if !is_valid_subject_pattern(subject) {
                    return invalid(format!(
                        "pool `{name}`: subject `{subject}` is not a NATS subject pattern (tokens separated by `.`, `*` for one token, `>` last)"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Whether `name` may name a pool: `[a-z0-9][a-z0-9_-]{0,62}`.
pub(crate) fn is_valid_pool_name(name: &str) -> bool {
    schemas::AgentId::is_valid(name)
}

/// Whether `key` is a valid KV key (`[-/_=.a-zA-Z0-9]+`, not starting or ending with `.`).
pub(crate) fn is_valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

fn is_valid_subject_pattern(subject: &str) -> bool {
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && !t.contains(char::is_whitespace)
            && (*t == ">" && i == tokens.len() - 1 || !t.contains('>'))
            && (*t == "*" || !t.contains('*'))
    })
}

/// Formats a duration the way the config spells it (`250ms`, `60s`, `1.5s`).
#[derive(Debug, Clone, Copy)]
pub struct DisplayDuration(pub Duration);

impl fmt::Display for DisplayDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms < 1000 {
            write!(f, "{ms}ms")
        } else if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{}s", self.0.as_secs_f64())
        }
    }
}

/// Parses `"250ms"`, `"1.5s"`, `"2m"`, `"1h"` into a duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds >= 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// Serde for durations written as strings with a unit.
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::{DisplayDuration, parse_duration};

    pub(super) fn serialize<S: Serializer>(value: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&DisplayDuration(*value))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse_duration(&text).ok_or_else(|| {
            D::Error::custom(format!(
                "`{text}` is not a duration: write a number and a unit, e.g. \"250ms\", \"60s\", \"2m\""
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"
poll_interval = "100ms"
lease_ttl = "5s"
inventory = "declared"

[[gpu]]
uuid = "GPU-0"
name = "declared"
memory_total_mib = 81920

[[gpu]]
uuid = "GPU-1"
healthy = false

[pools.coder]
subjects = ["mesh.deliver.coder.>"]
target_backlog_per_gpu = 10
max_gpus = 2
cooldown = "1.5s"

[pools.reviewer]
consumers = ["reviewer"]
target_backlog_per_gpu = 5
min_gpus = 1
max_gpus = 1
"#;

    #[test]
    fn parses_toml_with_defaults() {
        let config = ConfigFile::from_toml(SAMPLE).unwrap();
        assert_eq!(config.poll_interval, Duration::from_millis(100));
        assert_eq!(config.lease_ttl, Duration::from_secs(5));
        assert_eq!(config.inventory, InventoryMode::Declared);
        assert_eq!(config.gpus.len(), 2);
        assert!(config.gpus[0].healthy);
        assert!(!config.gpus[1].healthy);
        let coder = &config.pools["coder"];
        assert_eq!(coder.stream, "MESH_DELIVER");
        assert_eq!(coder.cooldown, Duration::from_millis(1500));
        assert_eq!(config.pools["reviewer"].cooldown, DEFAULT_COOLDOWN);
    }

    #[test]
    fn shipped_example_parses() {
        let config =
            ConfigFile::from_toml(include_str!("../../gpu-scaler/examples/pools.toml")).unwrap();
        assert_eq!(config.gpus.len(), 4);
        assert_eq!(config.pools.len(), 3);
        assert_eq!(config.pools["coder"].cooldown, DEFAULT_COOLDOWN);
    }

    #[test]
    fn json_round_trip() {
        let config = ConfigFile::from_toml(SAMPLE).unwrap();
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(ConfigFile::from_json(&json).unwrap(), config);
    }

    #[test]
    fn defaults_when_empty() {
        let config = ConfigFile::from_toml("").unwrap();
        assert_eq!(config, ConfigFile::default());
        assert_eq!(config.poll_interval, Duration::from_millis(250));
    }

    #[test]
    fn unknown_field_is_named() {
        let err = ConfigFile::from_toml(
            "[pools.coder]\nsubjects=[\"a\"]\ntarget_backlog_per_gpu=1\nmax_gpus=1\nmax_gpu=2\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("max_gpu"), "{err}");
    }

    #[test]
    fn bad_values_say_how_to_fix() {
        let err = |t: &str| ConfigFile::from_toml(t).unwrap_err().to_string();
        let e = err(
            "[pools.coder]\nsubjects=[\"a\"]\ntarget_backlog_per_gpu=1\nmin_gpus=3\nmax_gpus=1\n",
        );
        assert!(e.contains("`max_gpus` (1) is below `min_gpus` (3)"), "{e}");
        let e = err("[pools.Coder]\nsubjects=[\"a\"]\ntarget_backlog_per_gpu=1\nmax_gpus=1\n");
        assert!(e.contains("pool `Coder`"), "{e}");
        let e = err("[pools.coder]\ntarget_backlog_per_gpu=1\nmax_gpus=1\n");
        assert!(e.contains("set `consumers`"), "{e}");
        let e = err("[pools.coder]\nsubjects=[\"a.>.b\"]\ntarget_backlog_per_gpu=1\nmax_gpus=1\n");
        assert!(e.contains("not a NATS subject pattern"), "{e}");
        let e = err("poll_interval = \"fast\"");
        assert!(e.contains("`fast` is not a duration"), "{e}");
        let e = err("[[gpu]]\nuuid = \"has space\"");
        assert!(e.contains("gpu `has space`"), "{e}");
        let e = err("poll_interval = \"1s\"\nlease_ttl = \"1s\"");
        assert!(e.contains("`lease_ttl`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
        assert_eq!(
            DisplayDuration(Duration::from_millis(250)).to_string(),
            "250ms"
        );
        assert_eq!(DisplayDuration(Duration::from_secs(60)).to_string(), "60s");
        assert_eq!(
            DisplayDuration(Duration::from_millis(1500)).to_string(),
            "1.5s"
        );
    }
}
