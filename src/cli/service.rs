//! `sluice run` and `sluice config check`: the service's config file and the flags that
//! override it, the service started with its health endpoint, and stopped by a signal.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use sluice::config::Config;
use sluice::service::health::Health;
use sluice::service::telemetry::serve;

use super::load_config;

/// The config file and the flags that override it (`sluice run`, `sluice config check`).
#[derive(clap::Args)]
pub struct ServiceArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Override kafka.brokers.
    #[arg(long)]
    brokers: Option<String>,
    /// Override kafka.group_id.
    #[arg(long)]
    group_id: Option<String>,
    /// Override storage.root (local path or s3://bucket/prefix).
    #[arg(long)]
    storage_root: Option<String>,
    /// Override metrics.listen (e.g. 0.0.0.0:9464).
    #[arg(long)]
    metrics_listen: Option<String>,
}

impl ServiceArgs {
    /// The file, then `SLUICE_*` environment overrides, then these flags.
    fn load(&self) -> anyhow::Result<Config> {
        let mut cfg = load_config(&self.config, self.brokers.clone())?;
        if let Some(g) = &self.group_id {
            cfg.kafka.group_id = g.clone();
        }
        if let Some(r) = &self.storage_root {
            cfg.storage.root = r.clone();
        }
        if let Some(m) = &self.metrics_listen {
            cfg.metrics.listen = Some(m.clone());
        }
        Ok(cfg)
    }
}

#[derive(clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a config (file + SLUICE_* environment + flags), its schema and mapping files,
    /// and print the effective configuration with secrets redacted. Exit 1 names what is wrong.
    Check(ServiceArgs),
}

/// Runs the service until SIGINT or SIGTERM.
pub async fn run(args: ServiceArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.load()?;
    let requested = shutdown_signal()?;
    let health = match &cfg.metrics.listen {
        Some(listen) => {
            let max_wait =
                cfg.batch.max_age() + std::time::Duration::from_secs(cfg.health.commit_stall_s);
            let health = Health::new(cfg.tables.len(), max_wait);
            serve(listen, health.clone())
                .await
                .map_err(anyhow::Error::msg)?;
            Some(health)
        }
        None => None,
    };
    tracing::info!(config = %args.config.display(), "starting sluice");
    tracing::debug!(effective = %cfg.redacted(), "effective configuration");
    let stopping = health.clone();
    let shutdown = async move {
        requested.await;
        if let Some(h) = stopping {
            h.stopping();
        }
    };
    sluice::service::app::run(cfg, shutdown, health).await?;
    Ok(ExitCode::SUCCESS)
}

/// Validates a config and prints the effective configuration, secrets redacted.
pub fn check(args: ServiceArgs) -> anyhow::Result<ExitCode> {
    let cfg = args.load()?;
    let names = sluice::service::app::check(&cfg)?;
    eprintln!(
        "{}: valid; tables {}",
        args.config.display(),
        names.join(", ")
    );
    print!("{}", cfg.redacted());
    Ok(ExitCode::SUCCESS)
}

/// Listens for SIGINT and SIGTERM from this call on (a signal that arrives while the tables
/// are still opening stops the service cleanly instead of killing it); the future resolves on
/// the first.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let requested = {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("listening for SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
        }
    };
    #[cfg(not(unix))]
    let requested = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Ok(async move {
        requested.await;
        tracing::info!("shutdown requested: committing buffered messages");
    })
}
