//! `gpu-scaler`: the service skeleton's `main` (`telemetry::service::main`:
//! flags into a [`gpu_scaler::Config`], logging, SIGINT/SIGTERM) around
//! [`gpu_scaler::run`].

#[tokio::main]
async fn main() -> std::process::ExitCode {
    telemetry::service::main(
        "gpu-scaler",
        &["GPU_SCALER_"],
        |config: &gpu_scaler::Config| &config.ops,
        gpu_scaler::run,
    )
    .await
}
