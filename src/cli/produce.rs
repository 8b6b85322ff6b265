//! `sluice produce`: generated enriched posts published to a Kafka cluster at a steady rate.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::config::RegistryConfig;
use sluice::ingest::decode::Format;
use sluice::ingest::kafka::Connection;
use sluice::ingest::registry::Registry;
use sluice::tools::generator::Shape;
use sluice::tools::produce::{ProduceOptions, create_topics, produce};
use sluice::tools::wire::{SubjectStrategy, WireEncoder};

use super::load_config;

/// `sluice produce` flags.
#[derive(clap::Args)]
pub struct ProduceArgs {
    /// Bootstrap servers (default: the config's kafka.brokers, else localhost:9092).
    #[arg(long, env = "SLUICE_KAFKA__BROKERS")]
    brokers: Option<String>,
    /// Take the cluster (kafka.brokers and kafka.properties: TLS, SASL) from this config
    /// file. Without it, librdkafka properties come from SLUICE_KAFKA__PROPERTIES__*
    /// variables alone.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Upstream shape; repeat for several (round robin). Default: all three.
    #[arg(long, value_enum)]
    shape: Vec<Shape>,
    /// Topic (only with a single --shape); default posts.<shape>.
    #[arg(long)]
    topic: Option<String>,
    /// Messages to publish.
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// Messages per second (0 = as fast as possible).
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Embedding dimension of tweets.
    #[arg(long, default_value_t = 384)]
    embedding_dim: usize,
    /// Every n-th message is a hostile payload (0 = none).
    #[arg(long, default_value_t = 0)]
    bad_every: u64,
    /// Every n-th message edits, redelivers or deletes a recent post, or replays a deleted
    /// post's create after its delete (0 = none; JSON only). For tables with a `key`.
    #[arg(long, default_value_t = 0)]
    operations_every: u64,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Create the topics that do not exist yet with this many partitions first (for brokers
    /// that do not create topics on first use, such as Tansu or a hardened Kafka).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    partitions: Option<i32>,
    /// Message encoding: json, or avro, protobuf, json-schema in the schema registry's wire
    /// format (the shapes' schemas in schemas/registry/ are registered first).
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// Schema registry URL (Confluent-compatible API) for the registry formats; default: the
    /// config's [registry]. Credentials come from SLUICE_REGISTRY__USERNAME and
    /// SLUICE_REGISTRY__PASSWORD.
    #[arg(long, env = "SLUICE_REGISTRY__URL")]
    registry: Option<String>,
    /// Subject the schemas are registered under: topic (<topic>-value), record (the record's
    /// full name) or topic-record.
    #[arg(long, value_enum, default_value_t = SubjectStrategy::Topic)]
    subject_strategy: SubjectStrategy,
}

/// Runs `sluice produce`.
pub async fn run(args: ProduceArgs) -> anyhow::Result<ExitCode> {
    let ProduceArgs {
        brokers,
        config,
        shape,
        topic,
        count,
        rate,
        embedding_dim,
        bad_every,
        operations_every,
        seed,
        partitions,
        format,
        registry,
        subject_strategy,
    } = args;
    let shapes: Vec<Shape> = if shape.is_empty() {
        Shape::ALL.to_vec()
    } else {
        shape
    };
    if topic.is_some() && shapes.len() != 1 {
        anyhow::bail!("--topic needs exactly one --shape");
    }
    let shapes = shapes
        .into_iter()
        .map(|s| {
            (
                s,
                topic
                    .clone()
                    .unwrap_or_else(|| s.default_topic().to_string()),
            )
        })
        .collect::<Vec<_>>();
    let loaded = config
        .as_ref()
        .map(|file| load_config(file, brokers.clone()))
        .transpose()?;
    let connection = match &loaded {
        Some(config) => config.kafka.connection(),
        None => Connection {
            brokers: brokers.unwrap_or_else(|| "localhost:9092".into()),
            properties: sluice::config::kafka_properties_from_env(std::env::vars())?,
        },
    };
    let wire = match format {
        Format::Json => None,
        _ => {
            let settings = match (registry, loaded.as_ref().and_then(|c| c.registry.as_ref())) {
                (Some(url), _) => RegistryConfig {
                    url,
                    username: std::env::var("SLUICE_REGISTRY__USERNAME").ok(),
                    password: std::env::var("SLUICE_REGISTRY__PASSWORD").ok(),
                    ca_file: None,
                    timeout_ms: sluice::config::DEFAULT_REGISTRY_TIMEOUT_MS,
                },
                (None, Some(configured)) => configured.clone(),
                (None, None) => anyhow::bail!(
                    "--format {} needs a schema registry: --registry URL, SLUICE_REGISTRY__URL or \
                     a --config with [registry]",
                    format.as_str()
                ),
            };
            let registry = Registry::new(settings.settings())?;
            let wire = WireEncoder::register(&registry, format, &shapes, subject_strategy).await?;
            eprintln!(
                "registered the {} schemas of {} with {}",
                format.as_str(),
                shapes
                    .iter()
                    .map(|(_, t)| t.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                registry.url()
            );
            Some(wire)
        }
    };
    if let Some(partitions) = partitions {
        let topics: Vec<String> = shapes.iter().map(|(_, t)| t.clone()).collect();
        for topic in create_topics(&connection, &topics, partitions).await? {
            eprintln!("created topic {topic} with {partitions} partitions");
        }
    }
    let report = produce(&ProduceOptions {
        connection,
        shapes,
        count,
        rate,
        seed,
        embedding_dim,
        bad_every,
        operations_every,
        spread_days: 3,
        clock_ms: None,
        progress: true,
        wire,
    })
    .await?;
    let secs = report.elapsed.as_secs_f64().max(1e-9);
    println!(
        "delivered {} messages ({:.1} MB) in {:.1}s: {:.0} msg/s",
        report.delivered,
        report.bytes as f64 / 1e6,
        secs,
        report.delivered as f64 / secs
    );
    let ops = report.operations;
    if ops.total() > 0 {
        println!(
            "of them {} edits, {} redeliveries, {} deletes and {} replays of deleted posts",
            ops.edits, ops.redeliveries, ops.deletes, ops.replays
        );
    }
    Ok(ExitCode::SUCCESS)
}
