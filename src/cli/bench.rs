//! `sluice bench`: the flags, and the run split into one measuring process per stage and
//! profile (`--row`, internal) so each row's CPU time and peak RSS are its own.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use sluice::tools::bench::{BenchOptions, Profile, Stage};

/// `sluice bench` flags.
#[derive(clap::Args)]
pub struct BenchArgs {
    /// Records per profile and stage (the mock cluster holds ~4.5 MB per partition, so the
    /// kafka stage may use fewer; the table says how many).
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Stages to run, comma-separated. Default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    stage: Vec<Stage>,
    /// Record profiles, comma-separated. Default: posts and embeddings (JSON); avro and
    /// protobuf measure the limit stage (decoding) only.
    #[arg(long, value_enum, value_delimiter = ',')]
    profile: Vec<Profile>,
    /// Write the tables where this config's [storage] says (e.g. s3:// on MinIO) instead of
    /// a temporary folder, maintained as its [maintenance] and [delta] say (the stages fed by
    /// a broker run the service's maintenance); a service config or a file of only these
    /// sections. The tables go under `<root>/sluice-bench-<run>/`. Not read from
    /// SLUICE_CONFIG: a benchmark writes where it is told to, never into a service's store
    /// by accident.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Broker for the kafka and freshness stages instead of an in-process mock cluster.
    #[arg(long)]
    brokers: Option<String>,
    /// Producer rate of the freshness stage, messages per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Duration of the freshness stage in seconds.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// batch.max_age_ms of the freshness stage: the flush age, hence the freshness bound.
    #[arg(long, default_value_t = sluice::tools::bench::FRESHNESS_FLUSH_MS)]
    max_age_ms: u64,
    /// Freshness measurements back to back (each its own writer process and topics).
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// A folder of `.sql` files for the compaction stage to run before and after, instead of
    /// the built-in query library.
    #[arg(long, value_name = "DIR")]
    sql_dir: Option<PathBuf>,
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// batch.max_bytes for every stage instead of the default (the memory stage shows what it
    /// bounds).
    #[arg(long)]
    max_bytes: Option<usize>,
    /// Internal: measure one STAGE:PROFILE in this process and print its table row.
    #[arg(long, hide = true)]
    row: Option<String>,
    /// Internal: the run the row belongs to.
    #[arg(long, hide = true, default_value = "adhoc")]
    run: String,
    /// Internal: the parent `sluice bench` created the topics on --brokers and produces.
    #[arg(long, hide = true)]
    parent_produces: bool,
    /// Internal: payload bytes of the set the parent produced.
    #[arg(long, hide = true, default_value_t = 0)]
    set_bytes: u64,
}

impl BenchArgs {
    /// The flags a measurement process needs to repeat this run's settings.
    fn child_args(&self) -> Vec<String> {
        let mut args = vec![
            "--records".to_string(),
            self.records.to_string(),
            "--rate".into(),
            self.rate.to_string(),
            "--seconds".into(),
            self.seconds.to_string(),
            "--max-age-ms".into(),
            self.max_age_ms.to_string(),
            "--seed".into(),
            self.seed.to_string(),
        ];
        if let Some(dir) = &self.sql_dir {
            args.extend(["--sql-dir".to_string(), dir.display().to_string()]);
        }
        if let Some(config) = &self.config {
            args.extend(["--config".to_string(), config.display().to_string()]);
        }
        if let Some(brokers) = &self.brokers {
            args.extend(["--brokers".to_string(), brokers.clone()]);
        }
        if let Some(max_bytes) = self.max_bytes {
            args.extend(["--max-bytes".to_string(), max_bytes.to_string()]);
        }
        args
    }
}

/// `STAGE:PROFILE` of `sluice bench --row`.
fn parse_row(spec: &str) -> anyhow::Result<(Stage, Profile)> {
    use clap::ValueEnum;
    let (stage, profile) = spec.split_once(':').context("--row takes STAGE:PROFILE")?;
    let stage = Stage::from_str(stage, true).map_err(anyhow::Error::msg)?;
    let profile = Profile::from_str(profile, true).map_err(anyhow::Error::msg)?;
    Ok((stage, profile))
}

/// Runs `sluice bench`: every stage and profile asked for, or one row with `--row`.
pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    let storage = match &args.config {
        Some(file) => Some(sluice::config::Lake::load(file, std::env::vars())?),
        None => None,
    };
    let child_args = args.child_args();
    let options = BenchOptions {
        records: args.records,
        profiles: if args.profile.is_empty() {
            Profile::ALL.to_vec()
        } else {
            args.profile
        },
        stages: if args.stage.is_empty() {
            Stage::ALL.to_vec()
        } else {
            args.stage
        },
        storage,
        brokers: args.brokers,
        kafka_properties: sluice::config::kafka_properties_from_env(std::env::vars())?,
        rate: args.rate,
        seconds: args.seconds,
        max_age_ms: args.max_age_ms,
        runs: args.runs.max(1),
        sql_dir: args.sql_dir,
        seed: args.seed,
        max_bytes: args.max_bytes,
        set_bytes: args.set_bytes,
        parent_produces: args.parent_produces,
    };
    if let Some(spec) = &args.row {
        let (stage, profile) = parse_row(spec)?;
        println!(
            "{}",
            sluice::tools::bench::row(&options, &args.run, stage, profile).await?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "## sluice bench on {}, sluice {}\n",
        sluice::tools::bench::machine(),
        env!("CARGO_PKG_VERSION")
    );
    let report =
        sluice::tools::bench::run(&options, &child_args, &mut |line| eprintln!("{line}")).await?;
    println!("{}", report.render());
    Ok(ExitCode::SUCCESS)
}
