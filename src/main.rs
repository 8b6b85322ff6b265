//! The `sluice` command line: parse, start telemetry, hand over to the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use sluice::config::Config;
use sluice::meter::Meter;
use sluice::query::sql::format::Format;
use sluice::query::sql::shell::{Printer, repl, run_script};
use sluice::query::sql::{Session, TimeTravel};
use sluice::service::health::Health;
use sluice::service::telemetry::{LogFormat, init_logging, serve};
use sluice::tools::demo::{DemoOptions, run as run_demo};
use sluice::tools::generator::Shape;
use sluice::tools::produce::{ProduceOptions, create_topics, produce};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Exactly-once Kafka → Delta Lake for enriched social streams"
)]
struct Cli {
    /// Log format: human-readable text or JSON lines.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "SLUICE_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on an in-process Kafka and a local table, then print a summary.
    Demo(DemoArgs),
    /// Run the writer service until SIGINT/SIGTERM.
    Run(ServiceArgs),
    /// Work with configuration files.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Publish generated enriched posts to a Kafka cluster.
    Produce(ProduceArgs),
    /// Prove every Kafka offset is in the table or its dead letters exactly once.
    ///
    /// Exit codes: 0 clean, 2 something missing or duplicated, 1 the audit could not run.
    Audit {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Audit only this table (default: every configured table).
        #[arg(long)]
        table: Option<String>,
        /// Override kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Read a partition from the broker's new log after its log went backwards (a recreated
    /// topic, a failover, an unclean leader election): the writer stops such a partition and
    /// says so; this moves the table's position to the broker's first offset and records when,
    /// so the audit tells the old log's rows from the new one's. Restart the writers after.
    AcceptLog {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// The table whose partition stopped.
        #[arg(long)]
        table: String,
        /// The topic.
        #[arg(long)]
        topic: String,
        /// The partition.
        #[arg(long)]
        partition: i32,
        /// Override kafka.brokers.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Compact small files into files near a target size (one-shot, for cron or a CronJob).
    ///
    /// Exit codes: 0 done (or nothing to do), 3 another compactor holds the table's lease,
    /// 1 failure.
    Compact(CompactArgs),
    /// Delete data files no version within the retention references (default 7 days).
    Vacuum {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Only this table (and its dead letters).
        #[arg(long)]
        table: Option<String>,
        /// Keep files referenced by any version of the last this many hours.
        #[arg(long, default_value_t = 168)]
        retention_hours: u64,
        /// Allow a retention below 168 hours (breaks longer readers and time travel).
        #[arg(long)]
        allow_short_retention: bool,
        /// List what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a checkpoint at the current version and remove expired log files.
    Checkpoint {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Only this table (and its dead letters).
        #[arg(long)]
        table: Option<String>,
    },
    /// Show per partition files, small files, bytes and rows; version, last checkpoint,
    /// committed Kafka positions and the compaction lease.
    Inspect {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Only this table (and its dead letters).
        #[arg(long)]
        table: Option<String>,
    },
    /// Query the tables with SQL: an interactive shell, one statement (-c) or a file (-f).
    ///
    /// Read-only. Every table of the config is registered by name, with its dead letters.
    Sql(SqlArgs),
    /// Measure throughput, freshness and memory against the machine's limit; prints Markdown
    /// tables (stages: limit, pipeline, kafka, memory, freshness, compaction).
    Bench(BenchArgs),
    /// Print the Trino SQL that registers every table of the config (and its dead letters)
    /// in a delta_lake catalog, with the locations taken from storage.root; or, with
    /// --server, register them through Trino (again and again: registered tables are kept).
    TrinoSql {
        /// Config file.
        #[arg(long, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Trino catalog (delta_lake connector, register-table procedure enabled).
        #[arg(long, default_value = "delta")]
        catalog: String,
        /// Trino schema the tables are registered in.
        #[arg(long, default_value = "sluice")]
        schema: String,
        /// Register through this Trino coordinator (http://host:8080 or https://...) instead
        /// of printing SQL: creates the schema, registers what is missing, checks that what
        /// is registered is at the config's location. Safe to repeat.
        #[arg(long)]
        server: Option<String>,
        /// Trino user for --server.
        #[arg(long, default_value = "sluice", env = "TRINO_USER")]
        user: String,
    },
}

/// `sluice bench` flags.
#[derive(clap::Args)]
struct BenchArgs {
    /// Records per profile and stage (the mock cluster holds ~4.5 MB per partition, so the
    /// kafka stage may use fewer; the table says how many).
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Stages to run, comma-separated. Default: all.
    #[arg(long, value_enum, value_delimiter = ',')]
    stage: Vec<sluice::tools::bench::Stage>,
    /// Record profiles, comma-separated. Default: both.
    #[arg(long, value_enum, value_delimiter = ',')]
    profile: Vec<sluice::tools::bench::Profile>,
    /// Write the tables where this config's [storage] says (e.g. s3:// on MinIO) instead of
    /// a temporary folder; they go under `<root>/sluice-bench-<run>/`. Not read from
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
    /// The sql/ library the compaction stage runs before and after.
    #[arg(long, default_value = "sql")]
    sql_dir: PathBuf,
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
            "--seed".into(),
            self.seed.to_string(),
            "--sql-dir".into(),
            self.sql_dir.display().to_string(),
        ];
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
fn parse_row(
    spec: &str,
) -> anyhow::Result<(sluice::tools::bench::Stage, sluice::tools::bench::Profile)> {
    use clap::ValueEnum;
    let (stage, profile) = spec.split_once(':').context("--row takes STAGE:PROFILE")?;
    let stage = sluice::tools::bench::Stage::from_str(stage, true).map_err(anyhow::Error::msg)?;
    let profile =
        sluice::tools::bench::Profile::from_str(profile, true).map_err(anyhow::Error::msg)?;
    Ok((stage, profile))
}

/// The config file and the flags that override it (`sluice run`, `sluice config check`).
#[derive(clap::Args)]
struct ServiceArgs {
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

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a config (file + SLUICE_* environment + flags), its schema and mapping files,
    /// and print the effective configuration with secrets redacted. Exit 1 names what is wrong.
    Check(ServiceArgs),
}

/// `sluice compact` flags.
#[derive(clap::Args)]
struct CompactArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Only this table (its dead-letter table is compacted too). Default: every table.
    #[arg(long)]
    table: Option<String>,
    /// Only this partition value (e.g. 2026-11-20); repeatable.
    #[arg(long)]
    partition: Vec<String>,
    /// Only partitions on or after this date.
    #[arg(long, value_name = "DATE")]
    since: Option<chrono::NaiveDate>,
    /// Z-order rewritten partitions by these columns (comma-separated).
    #[arg(long, value_delimiter = ',')]
    zorder: Vec<String>,
    /// Target file size in MiB.
    #[arg(long, default_value_t = 128)]
    target_size_mb: u64,
    /// Memory budget of one partition's rewrite in MiB (Z-order sorts spill beyond it).
    #[arg(long, default_value_t = 1024)]
    memory_mb: u64,
    /// Print the plan (partitions, files and bytes in, files out) and change nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Exit code of `sluice compact` when another compactor holds the lease.
const EXIT_LEASE_HELD: u8 = 3;

/// `sluice sql` flags.
#[derive(clap::Args)]
struct SqlArgs {
    /// Config file (tables and storage are read from it).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Run this statement (or meta command such as `\d`) and exit.
    #[arg(short = 'c', long = "command", conflicts_with = "file")]
    command: Option<String>,
    /// Run the statements of this file and exit.
    #[arg(short = 'f', long)]
    file: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// Read a table at a Delta version: TABLE=VERSION, or VERSION when the config has one
    /// table. Repeat for several tables.
    #[arg(long = "as-of-version", value_name = "[TABLE=]VERSION")]
    as_of_version: Vec<String>,
    /// Read every table as it was at this time (for example 2026-11-20T12:00:00Z).
    #[arg(long, value_name = "TIMESTAMP")]
    as_of: Option<String>,
}

/// Exit code of `sluice audit` when something is missing or duplicated.
const EXIT_AUDIT_FAILED: u8 = 2;

/// `sluice demo` flags.
#[derive(clap::Args)]
struct DemoArgs {
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
    /// Generator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
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
            seed: a.seed,
        }
    }
}

/// `sluice produce` flags.
#[derive(clap::Args)]
struct ProduceArgs {
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
    /// Generator seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Create the topics that do not exist yet with this many partitions first (for brokers
    /// that do not create topics on first use, such as Tansu or a hardened Kafka).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    partitions: Option<i32>,
}

fn main() -> anyhow::Result<ExitCode> {
    limit_malloc_arenas();
    let cli = Cli::parse();
    // delta-kernel logs an ERROR when it looks for a table that does not exist yet (sluice then
    // creates it); its real failures reach sluice as errors and are logged with context.
    let level = match cli.command {
        // Query output owns the terminal; only warnings and errors are logged.
        Command::Sql(_) | Command::Config(_) | Command::TrinoSql { .. } | Command::Bench(_) => {
            "warn"
        }
        // On a terminal long jobs draw a progress bar instead of logging progress lines.
        Command::Compact(_) | Command::Produce(_) | Command::Audit { .. }
            if std::io::stderr().is_terminal() =>
        {
            "warn"
        }
        _ => "info",
    };
    init_logging(
        cli.log_format,
        &format!(
            "{level},deltalake=warn,deltalake_core=warn,deltalake_core::writer::stats=error,buoyant_kernel=off,buoyant_kernel_engine=off"
        ),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async_main(cli.command))
}

async fn async_main(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Demo(args) => {
            let options = DemoOptions::from(args);
            let report = run_demo(&options).await?;
            println!("{}", report.render());
        }
        Command::Run(args) => {
            let cfg = args.load()?;
            let requested = shutdown_signal()?;
            let health = match &cfg.metrics.listen {
                Some(listen) => {
                    let max_wait = cfg.batch.max_age()
                        + std::time::Duration::from_secs(cfg.health.commit_stall_s);
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
        }
        Command::Bench(args) => {
            let storage = match &args.config {
                Some(file) => Some(load_config(file, None)?),
                None => None,
            };
            let child_args = args.child_args();
            let options = sluice::tools::bench::BenchOptions {
                records: args.records,
                profiles: if args.profile.is_empty() {
                    sluice::tools::bench::Profile::ALL.to_vec()
                } else {
                    args.profile
                },
                stages: if args.stage.is_empty() {
                    sluice::tools::bench::Stage::ALL.to_vec()
                } else {
                    args.stage
                },
                storage,
                brokers: args.brokers,
                kafka_properties: sluice::config::kafka_properties_from_env(std::env::vars())?,
                rate: args.rate,
                seconds: args.seconds,
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
                sluice::tools::bench::run(&options, &child_args, &mut |line| eprintln!("{line}"))
                    .await?;
            println!("{}", report.render());
        }
        Command::TrinoSql {
            config,
            catalog,
            schema,
            server,
            user,
        } => {
            let cfg = load_config(&config, None)?;
            let tables = sluice::service::app::check(&cfg)?;
            let target = sluice::query::trino::Target { catalog, schema };
            if let Some(server) = server {
                // Password authentication: the password only from the environment.
                let password = std::env::var("TRINO_PASSWORD")
                    .ok()
                    .filter(|p| !p.is_empty());
                let client = sluice::query::trino::Client::new(&server, &user, password)?;
                for done in sluice::query::trino::register(&client, &cfg, &tables, &target).await? {
                    let what = match done.outcome {
                        sluice::query::trino::Outcome::Registered => "registered",
                        sluice::query::trino::Outcome::AlreadyThere => "already registered",
                    };
                    println!("{what}: {} at {}", done.name, done.location);
                }
            } else {
                let source = config.file_name().map_or_else(
                    || config.display().to_string(),
                    |name| name.to_string_lossy().into_owned(),
                );
                print!(
                    "{}",
                    sluice::query::trino::registration_sql(&cfg, &tables, &target, &source)?
                );
            }
        }
        Command::Config(ConfigCommand::Check(args)) => {
            let cfg = args.load()?;
            let names = sluice::service::app::check(&cfg)?;
            eprintln!(
                "{}: valid; tables {}",
                args.config.display(),
                names.join(", ")
            );
            print!("{}", cfg.redacted());
        }
        Command::Produce(ProduceArgs {
            brokers,
            config,
            shape,
            topic,
            count,
            rate,
            embedding_dim,
            bad_every,
            seed,
            partitions,
        }) => {
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
            let connection = match &config {
                Some(file) => load_config(file, brokers)?.kafka.connection(),
                None => sluice::ingest::kafka::Connection {
                    brokers: brokers.unwrap_or_else(|| "localhost:9092".into()),
                    properties: sluice::config::kafka_properties_from_env(std::env::vars())?,
                },
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
                spread_days: 3,
                clock_ms: None,
                progress: true,
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
        }
        Command::Audit {
            config,
            table,
            brokers,
        } => {
            let cfg = load_config(&config, brokers)?;
            let mut clean = true;
            let mut audited = 0;
            for table_config in &cfg.tables {
                let name = sluice::contract::schema::TableSchema::load(&table_config.schema)?.name;
                if table.as_ref().is_some_and(|t| *t != name) {
                    continue;
                }
                let audit = sluice::query::audit::audit_table(&cfg, table_config).await?;
                print!("{}", audit.render());
                clean &= audit.is_clean();
                audited += 1;
            }
            if audited == 0 {
                anyhow::bail!(
                    "no table named {} in {}",
                    table.unwrap_or_default(),
                    config.display()
                );
            }
            if !clean {
                return Ok(ExitCode::from(EXIT_AUDIT_FAILED));
            }
        }
        Command::AcceptLog {
            config,
            table,
            topic,
            partition,
            brokers,
        } => {
            let cfg = load_config(&config, brokers)?;
            let mut table_config = None;
            for candidate in &cfg.tables {
                if sluice::contract::schema::TableSchema::load(&candidate.schema)?.name == table {
                    table_config = Some(candidate);
                }
            }
            let Some(table_config) = table_config else {
                anyhow::bail!("no table named {table} in {}", config.display());
            };
            if !table_config.sources.iter().any(|s| s.topic == topic) {
                anyhow::bail!("table {table} does not read topic {topic}");
            }
            let accepted =
                sluice::service::accept::accept_log(&cfg, table_config, &topic, partition).await?;
            println!(
                "{}: {} now reads the broker's log from offset {} (was at {} in the old log); \
                 restart the writers of the table",
                accepted.table, accepted.partition, accepted.new_start, accepted.old_position
            );
        }
        Command::Sql(args) => return sql(args).await,
        Command::Compact(args) => return compact(args).await,
        Command::Vacuum {
            config,
            table,
            retention_hours,
            allow_short_retention,
            dry_run,
        } => {
            let cfg = load_config(&config, None)?;
            for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
                let report = sluice::table::maintain::vacuum(
                    &location,
                    cfg.storage_options(),
                    std::time::Duration::from_secs(retention_hours * 3600),
                    allow_short_retention,
                    dry_run,
                )
                .await?;
                println!(
                    "{name}: {} {} files",
                    if report.dry_run {
                        "would delete"
                    } else {
                        "deleted"
                    },
                    report.files
                );
            }
        }
        Command::Checkpoint { config, table } => {
            let cfg = load_config(&config, None)?;
            for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
                let report =
                    sluice::table::maintain::checkpoint(&location, cfg.storage_options()).await?;
                println!(
                    "{name}: checkpoint at version {}, {} expired log files removed",
                    report.version, report.logs_removed
                );
            }
        }
        Command::Inspect { config, table } => {
            let cfg = load_config(&config, None)?;
            for (name, location) in table_locations(&cfg, table.as_deref(), &config)? {
                let inspection = sluice::table::maintain::inspect(
                    &name,
                    &location,
                    cfg.storage_options(),
                    &cfg.kafka.group_id,
                )
                .await?;
                print!("{}", inspection.render());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// (name, location) of every configured table matching `only`, each followed by its
/// dead-letter table.
fn table_locations(
    cfg: &Config,
    only: Option<&str>,
    file: &std::path::Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for table in &cfg.tables {
        let name = sluice::contract::schema::TableSchema::load(&table.schema)?.name;
        if only.is_none_or(|t| t == name) {
            let dead = sluice::contract::dead_letters::table_name(&name);
            for n in [name, dead] {
                let location = sluice::table::delta::table_location(&cfg.storage.root, &n);
                out.push((n, location));
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!(
            "no table named {} in {}",
            only.unwrap_or_default(),
            file.display()
        );
    }
    Ok(out)
}

async fn compact(args: CompactArgs) -> anyhow::Result<ExitCode> {
    use sluice::table::compact::{CompactOptions, CompactOutcome};
    let cfg = load_config(&args.config, None)?;
    let options = CompactOptions {
        target_size: args.target_size_mb.max(1) * 1024 * 1024,
        partitions: args.partition,
        since: args.since,
        zorder: args.zorder,
        dry_run: args.dry_run,
        memory_limit: (args.memory_mb * 1024 * 1024) as usize,
        zstd_level: cfg.delta.zstd_level,
        ..CompactOptions::default()
    };
    let tables = table_locations(&cfg, args.table.as_deref(), &args.config)?;
    let dead_letter_tables = cfg
        .tables
        .iter()
        .map(|t| {
            sluice::contract::schema::TableSchema::load(&t.schema)
                .map(|schema| sluice::contract::dead_letters::table_name(&schema.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut busy = false;
    for (name, location) in tables {
        let mut meter: Option<Meter> = None;
        let mut bar =
            |p: &sluice::table::compact::CompactedPartition, done: usize, total: usize| {
                let m = meter.get_or_insert_with(|| {
                    Meter::new(format!("compact {name}"), total as u64, "partitions", true)
                });
                let detail = format!(
                    "last {} ({} files -> {})",
                    p.partition, p.files_removed, p.files_added
                );
                if done == total {
                    m.finish(done as u64, &detail);
                } else {
                    m.update(done as u64, &detail);
                }
            };
        // Z-order columns are the main table's; its dead letters are bin-packed.
        let bin_pack = CompactOptions {
            zorder: Vec::new(),
            ..options.clone()
        };
        let options = if dead_letter_tables.contains(&name) {
            &bin_pack
        } else {
            &options
        };
        let outcome = sluice::table::compact::compact_with_progress(
            &location,
            cfg.storage_options(),
            options,
            &mut bar,
        )
        .await?;
        match outcome {
            CompactOutcome::Planned(plan) => {
                println!("{name}: {} partitions to compact", plan.len());
                for p in plan {
                    println!(
                        "  {:<12} {:>6} files in ({:.1} MB) -> {} out",
                        p.partition,
                        p.files_in,
                        p.bytes_in as f64 / 1e6,
                        p.files_out
                    );
                }
            }
            CompactOutcome::Busy { owner, expires_at } => {
                println!("{name}: lease held by {owner} until {expires_at}; not compacted");
                busy = true;
            }
            CompactOutcome::Compacted(done) => {
                println!("{name}: {} partitions compacted", done.len());
                for p in done {
                    println!(
                        "  {:<12} {:>6} files ({:.1} MB) -> {} files ({:.1} MB), version {}{}",
                        p.partition,
                        p.files_removed,
                        p.bytes_removed as f64 / 1e6,
                        p.files_added,
                        p.bytes_added as f64 / 1e6,
                        p.version,
                        if p.spilled {
                            ", sort spilled to disk (raise --memory-mb to keep it in memory)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
    }
    Ok(if busy {
        ExitCode::from(EXIT_LEASE_HELD)
    } else {
        ExitCode::SUCCESS
    })
}

async fn sql(args: SqlArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args.config, None)?;
    let mut travel = TimeTravel::default();
    for spec in &args.as_of_version {
        let (table, version) = match spec.split_once('=') {
            Some((t, v)) => (Some(t.trim().to_string()), v),
            None => (None, spec.as_str()),
        };
        let version: i64 = version.trim().parse().with_context(|| {
            format!("--as-of-version {spec}: expected [TABLE=]VERSION with a whole number")
        })?;
        match table {
            Some(t) => travel.versions.insert(t, version),
            None => travel.version.replace(version),
        };
    }
    if let Some(t) = &args.as_of {
        let micros = sluice::contract::values::parse_timestamp(t, None)
            .map_err(|e| anyhow::anyhow!("--as-of {t}: {e}"))?;
        travel.as_of = chrono::DateTime::from_timestamp_micros(micros);
    }
    let session = Session::open(&cfg, &travel).await?;
    let printer = Printer::stdout(args.format);
    let mut stdout = std::io::stdout().lock();
    let outcome = match (&args.command, &args.file) {
        (Some(sql), _) => run_script(&session, sql, "-c", &printer, &mut stdout).await,
        (None, Some(file)) => {
            let sql = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            run_script(
                &session,
                &sql,
                &file.display().to_string(),
                &printer,
                &mut stdout,
            )
            .await
        }
        (None, None) => {
            drop(stdout);
            repl(&session, args.format).await
        }
    };
    match outcome {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Two malloc arenas instead of glibc's eight per core. librdkafka's broker threads allocate
/// the fetched batches in arenas of their own and the writer frees them from other threads;
/// the freed memory stayed in those arenas. Draining Apache Kafka at the shipped settings the
/// writer peaked at 344–388 MiB with glibc's default and 285–299 MiB with two arenas, at the
/// same throughput (`sluice bench --stage kafka,memory --brokers`). `MALLOC_ARENA_MAX` in the
/// environment wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only tunes the allocator; it runs before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}

/// The config file, then `SLUICE_*` environment overrides, then `--brokers`.
fn load_config(file: &std::path::Path, brokers: Option<String>) -> anyhow::Result<Config> {
    let mut config = Config::load(file, std::env::vars())?;
    if let Some(b) = brokers {
        config.kafka.brokers = b;
    }
    Ok(config)
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
