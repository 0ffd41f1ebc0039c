//! [`Ops`]: what one service instance starts before anything else — its
//! readiness checks, its instruments and, when a port is set, the server of
//! `/healthz`, `/readyz` and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::server::{self, State};
use crate::{Error, Health, Metrics, OpsConfig};

/// The health, metrics and HTTP server of one service instance.
#[derive(Debug)]
pub struct Ops {
    health: Health,
    metrics: Metrics,
    addr: Option<SocketAddr>,
    stop: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Ops {
    /// Creates the instruments and binds the server (when `config` sets a
    /// port). `/healthz` answers from here on; `/readyz` once the service
    /// has registered its checks and they pass.
    pub async fn start(service: &'static str, config: &OpsConfig) -> Result<Self, Error> {
        let health = Health::default();
        let metrics = Metrics::new(service, config)?;
        let stop = CancellationToken::new();
        let (addr, server) = match config.http_addr() {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Error::Bind { addr, source })?;
                let local = listener.local_addr().unwrap_or(addr);
                let state = Arc::new(State {
                    health: health.clone(),
                    metrics: metrics.clone(),
                });
                tracing::info!(addr = %local, service, "Serving /healthz, /readyz and /metrics.");
                let task = tokio::spawn(server::serve(listener, state, stop.clone()));
                (Some(local), Some(task))
            }
            None => (None, None),
        };
        Ok(Self {
            health,
            metrics,
            addr,
            stop,
            server,
        })
    }

    /// The readiness checks.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The instruments.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Where the server listens, when it runs.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// Stops the server and exports the last metrics.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            let _ = server.await;
        }
        self.metrics.shutdown().await;
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use crate::testing::http_get;

    #[tokio::test]
    async fn serves_health_readiness_and_metrics() -> anyhow::Result<()> {
        let config = OpsConfig {
            http_port: Some(0),
            http_host: "127.0.0.1".parse()?,
            ..OpsConfig::default()
        };
        let ops = Ops::start("test", &config).await?;
        let addr = ops
            .local_addr()
            .ok_or_else(|| anyhow::anyhow!("no server"))?;

        assert_eq!(http_get(addr, "/healthz").await?, (200, "ok\n".to_owned()));
        assert_eq!(
            http_get(addr, "/readyz").await?,
            (503, "starting\n".to_owned())
        );
        let nats = ops.health().flag("nats", true);
        assert_eq!(
            http_get(addr, "/readyz").await?,
            (200, "nats: ok\n".to_owned())
        );
        nats.set(false);
        assert_eq!(http_get(addr, "/readyz").await?.0, 503);

        let counter = ops
            .metrics()
            .meter()
            .u64_counter("agentmesh.test.hits")
            .build();
        counter.add(3, &[]);
        let (status, body) = http_get(addr, "/metrics").await?;
        assert_eq!(status, 200);
        assert!(body.contains("agentmesh_test_hits_total 3\n"), "{body}");
        assert_eq!(http_get(addr, "/nope").await?.0, 404);

        ops.shutdown().await;
        assert!(
            http_get(addr, "/healthz").await.is_err(),
            "server still up after shutdown"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_that_names_the_flag() -> anyhow::Result<()> {
        let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
        let config = OpsConfig {
            http_port: Some(taken.local_addr()?.port()),
            http_host: "127.0.0.1".parse()?,
            ..OpsConfig::default()
        };
        let error = Ops::start("test", &config).await.unwrap_err().to_string();
        assert!(error.contains("--http-port"), "{error}");
        Ok(())
    }
}
