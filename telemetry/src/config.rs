//! The operating flags every service binary flattens into its arguments.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// Health, metrics, tracing and log settings of one service.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct OpsConfig {
    /// Serve /healthz, /readyz and /metrics on this port (off when unset;
    /// the container image sets 9090).
    #[arg(long, env = "AGENTMESH_HTTP_PORT")]
    pub http_port: Option<u16>,
    /// Address the health and metrics server listens on.
    #[arg(long, env = "AGENTMESH_HTTP_HOST", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub http_host: IpAddr,
    /// Log format on stderr.
    #[arg(long, env = "AGENTMESH_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// OTLP/HTTP (protobuf) base URL, e.g. `http://otel-collector:4318`:
    /// spans go to `<url>/v1/traces`, metrics to `<url>/v1/metrics`. Off
    /// when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Milliseconds between two OTLP metric exports.
    #[arg(long, env = "OTEL_METRIC_EXPORT_INTERVAL", default_value_t = 60_000)]
    pub otlp_metrics_interval_ms: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            http_port: None,
            http_host: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            otlp_metrics_interval_ms: 60_000,
        }
    }
}

impl OpsConfig {
    /// The address of the health and metrics server, when enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_port
            .map(|port| SocketAddr::new(self.http_host, port))
    }

    /// The OTLP base URL, when set and not empty.
    pub fn otlp(&self) -> Option<&str> {
        self.otlp_endpoint
            .as_deref()
            .map(str::trim)
            .filter(|e| !e.is_empty())
    }

    /// `<base>/v1/<signal>`, as the OTLP spec builds signal URLs from
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub(crate) fn otlp_signal_url(&self, signal: &str) -> Option<String> {
        self.otlp()
            .map(|base| format!("{}/v1/{signal}", base.trim_end_matches('/')))
    }

    pub(crate) fn metrics_interval(&self) -> Duration {
        Duration::from_millis(self.otlp_metrics_interval_ms.max(100))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ops: OpsConfig,
    }

    #[test]
    fn defaults_match_the_flags() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        // The environment of the test run may set these; compare what is not.
        if std::env::var_os("AGENTMESH_HTTP_PORT").is_none()
            && std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && std::env::var_os("AGENTMESH_LOG_FORMAT").is_none()
            && std::env::var_os("AGENTMESH_HTTP_HOST").is_none()
            && std::env::var_os("OTEL_METRIC_EXPORT_INTERVAL").is_none()
        {
            assert_eq!(cli.ops, OpsConfig::default());
        }
    }

    #[test]
    fn signal_urls_follow_the_spec() {
        let cli = Cli::try_parse_from([
            "x",
            "--otlp-endpoint",
            "http://collector:4318/",
            "--http-port",
            "9090",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(
            cli.ops.otlp_signal_url("traces").as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(cli.ops.http_addr(), Some("0.0.0.0:9090".parse().unwrap()));
        assert_eq!(cli.ops.log_format, LogFormat::Json);
        let empty = OpsConfig {
            otlp_endpoint: Some("  ".into()),
            ..OpsConfig::default()
        };
        assert_eq!(empty.otlp(), None);
    }
}
