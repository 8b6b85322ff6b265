//! `sluice demo`: the whole pipeline on an in-process Kafka and a local table, then a summary.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::ingest::decode::Format;
use sluice::tools::demo::{DemoOptions, run as run_demo};

/// `sluice demo` flags.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Output folder: the table, its schema files and a sluice.toml.
    #[arg(long, default_value = "lakehouse")]
    dir: PathBuf,
    /// Messages to publish.
    #[arg(long, default_value_t = 60_000)]
    records: u64,
    /// Messages per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Partitions per topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Embedding dimension of tweets.
    #[arg(long, default_value_t = 64)]
    embedding_dim: usize,
    /// Every n-th message is a hostile payload, to show rejections (0 = none).
    #[arg(long, default_value_t = 1000)]
    bad_every: u64,
    /// Every n-th message edits, redelivers or deletes a recent post, or replays a deleted
    /// one, to show them applied (0 = none; JSON only).
    #[arg(long, default_value_t = 100)]
    operations_every: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Message encoding: json, or avro, protobuf, json-schema in the schema registry's wire
    /// format (the shapes' schemas are registered first; needs --registry).
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Schema registry URL (Confluent-compatible API) for the registry formats.
    #[arg(long, env = "SLUICE_REGISTRY__URL")]
    registry: Option<String>,
}

impl From<DemoArgs> for DemoOptions {
    fn from(a: DemoArgs) -> Self {
        DemoOptions {
            dir: a.dir,
            records: a.records,
            rate: a.rate,
            partitions: a.partitions,
            embedding_dim: a.embedding_dim,
            bad_every: a.bad_every,
            operations_every: a.operations_every,
            seed: a.seed,
            format: a.format,
            registry: a.registry,
        }
    }
}

/// Runs the demo and prints its summary.
pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let options = DemoOptions::from(args);
    let report = run_demo(&options).await?;
    println!("{}", report.render());
    Ok(ExitCode::SUCCESS)
}
