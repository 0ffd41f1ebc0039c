//! Without an OTLP endpoint the service subscriber disables the mesh's
//! spans (nothing would export them), while log lines still pass. Its own
//! test binary: `init_tracing` installs the process-wide subscriber.

use tracing::Level;

#[tokio::test]
async fn without_an_exporter_the_mesh_spans_are_disabled_and_logs_are_not() {
    let config = telemetry::OpsConfig::default();
    let _guard = telemetry::init_tracing("test", &config).unwrap();
    let decision = telemetry::spans::decision("mesh.ingress.a.b");
    assert!(
        decision.is_disabled(),
        "a decision span exists with no exporter to read it"
    );
    assert!(telemetry::spans::delivery(&decision).is_disabled());
    assert!(
        tracing::enabled!(Level::INFO),
        "log lines at info are still enabled"
    );
}
