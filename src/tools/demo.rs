//! Demo: the whole pipeline on an embedded default, with nothing installed.
//!
//! An in-process Kafka cluster (librdkafka's mock cluster), the generator publishing the three
//! upstream shapes to it, the writer landing them in `<dir>/enriched_posts`, and a printed
//! summary. The folder keeps a `sluice.toml` and the schema files, so every other command can be
//! pointed at the demo's table with `--config <dir>/sluice.toml`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, ArrayRef, AsArray};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::DataType;
use deltalake::arrow::datatypes::Int64Type;
use deltalake::datafusion::prelude::SessionContext;
use rdkafka::mocking::MockCluster;

use crate::config::Config;
use crate::ingest::decode::Format;
use crate::ingest::progress::Progress;
use crate::ingest::registry::Registry;
use crate::query::audit::audit_table;
use crate::service::app;
use crate::service::background::table_settings;
use crate::table::compact::DEFAULT_LEASE_TTL;
use crate::table::deletes::{Applied, ApplyOptions, ApplyOutcome, apply};
use crate::table::delta::{open_table, register_table, table_location};
use crate::table::lease;
use crate::tools::generator::Shape;
use crate::tools::produce::{ProduceOptions, ProduceReport, produce};
use crate::tools::wire::{SubjectStrategy, WireEncoder};

/// First line of a demo-written config; marks a folder the demo may reset.
const DEMO_MARKER: &str = "# Written by `sluice demo`.";
/// How long the writer may take to catch up after the last message is produced.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);

const SCHEMA: &str = include_str!("../../schemas/enriched_posts.toml");
const MAPPINGS: [(&str, &str); 3] = [
    (
        "mastodon.toml",
        include_str!("../../schemas/mappings/mastodon.toml"),
    ),
    (
        "bluesky.toml",
        include_str!("../../schemas/mappings/bluesky.toml"),
    ),
    (
        "tweets.toml",
        include_str!("../../schemas/mappings/tweets.toml"),
    ),
];

/// Errors running the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The output folder holds something that is not a previous demo.
    #[error(
        "{dir} is not empty and was not written by `sluice demo`; choose another --dir or empty it"
    )]
    NotADemoFolder {
        /// The folder.
        dir: PathBuf,
    },
    /// File system trouble in the output folder.
    #[error("{path}: {source}")]
    Io {
        /// Path concerned.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The embedded Kafka cluster failed.
    #[error("embedded kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// Publishing failed.
    #[error(transparent)]
    Produce(#[from] crate::tools::produce::ProduceError),
    /// The writer failed.
    #[error(transparent)]
    App(#[from] app::AppError),
    /// The written config did not load; a bug.
    #[error("bug: the demo's own config does not load: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// The writer did not commit everything in time.
    #[error("the writer committed {committed} of {produced} messages within {timeout:?}")]
    Stalled {
        /// Messages committed.
        committed: u64,
        /// Messages produced.
        produced: u64,
        /// How long it waited.
        timeout: Duration,
    },
    /// Querying the result failed.
    /// A registry format was asked for without a registry.
    #[error(
        "--format {} needs --registry URL (e.g. `bash scripts/registry.sh start DIR`)",
        .0.as_str()
    )]
    NoRegistry(Format),
    /// The registry format's schemas could not be registered.
    #[error(transparent)]
    Wire(#[from] crate::tools::wire::WireError),
    #[error("summary query: {0}")]
    Query(String),
}

/// Demo settings (the `sluice demo` flags).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Output folder.
    pub dir: PathBuf,
    /// Messages to publish.
    pub records: u64,
    /// Messages per second (0 = as fast as possible).
    pub rate: u64,
    /// Partitions per topic.
    pub partitions: i32,
    /// Embedding dimension of tweets.
    pub embedding_dim: usize,
    /// Every n-th message is hostile (0 = none).
    pub bad_every: u64,
    /// Every n-th message edits, redelivers or deletes a recent post (JSON only; 0 = none).
    pub operations_every: u64,
    /// Generator seed.
    pub seed: u64,
    /// How the posts are encoded: JSON, or a registry format whose schemas go to `registry`.
    pub format: Format,
    /// The schema registry's URL (Confluent-compatible API) for a registry format.
    pub registry: Option<String>,
}

/// What the demo did.
#[derive(Debug, Clone)]
pub struct DemoReport {
    /// Publishing figures.
    pub produced: ProduceReport,
    /// Writer figures.
    pub written: Progress,
    /// From the first message produced to the last commit.
    pub elapsed: Duration,
    /// Rows per (sentiment, category), as canonicalized by the schema's labels.
    pub sentiment_by_category: Vec<(String, String, i64)>,
    /// Per label column: rows whose label was corrected, and rows that became UNKNOWN.
    pub labels: Vec<(String, i64, i64)>,
    /// Dead letters stored, by reason, counted by query.
    pub dead_letters: Vec<(String, i64)>,
    /// The audit's verdict line, read back from the broker and both tables.
    pub audit: String,
    /// Rows the table holds, counted by query.
    pub table_rows: i64,
    /// The pass that applied the deletes and edits after the writer stopped.
    pub applied: Option<Applied>,
    /// Where the config was written.
    pub config_file: PathBuf,
}

/// Runs the demo and returns its report.
pub async fn run(options: &DemoOptions) -> Result<DemoReport, DemoError> {
    if options.format != Format::Json && options.registry.is_none() {
        return Err(DemoError::NoRegistry(options.format));
    }
    prepare_folder(&options.dir)?;
    let config_file = write_config(&options.dir, options.format, options.registry.as_deref())?;
    let mut config = Config::load(&config_file, std::env::vars())?;
    let wire = match &config.registry {
        Some(registry) if options.format != Format::Json => {
            let registry = Registry::new(registry.settings()).map_err(app::AppError::from)?;
            let topics: Vec<(Shape, String)> = Shape::ALL
                .iter()
                .map(|s| (*s, s.default_topic().to_string()))
                .collect();
            Some(
                WireEncoder::register(&registry, options.format, &topics, SubjectStrategy::Topic)
                    .await?,
            )
        }
        _ => None,
    };

    let cluster = MockCluster::new(1)?;
    for shape in Shape::ALL {
        cluster.create_topic(shape.default_topic(), options.partitions, 1)?;
    }
    config.kafka.brokers = cluster.bootstrap_servers();
    config.batch.max_age_ms = 1000;

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = app::start(&config, async move {
        let _ = stop_rx.await;
    })
    .await?;
    let mut table = running
        .into_iter()
        .next()
        .expect("the demo config has one table");
    // The embedded broker delays a new group's first assignment by a few seconds; timing starts
    // once the writer owns every partition.
    let partitions = Shape::ALL.len() * options.partitions.max(1) as usize;
    let assigned = tokio::time::timeout(
        CATCH_UP_TIMEOUT,
        table.progress.wait_for(|p| p.owned.len() == partitions),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    if !assigned {
        return Err(DemoError::Stalled {
            committed: 0,
            produced: 0,
            timeout: CATCH_UP_TIMEOUT,
        });
    }
    let started = Instant::now();
    let produced = produce(&ProduceOptions {
        connection: config.kafka.connection(),
        shapes: Shape::ALL
            .iter()
            .map(|s| (*s, s.default_topic().to_string()))
            .collect(),
        count: options.records,
        rate: options.rate,
        seed: options.seed,
        embedding_dim: options.embedding_dim,
        bad_every: options.bad_every,
        operations_every: if wire.is_some() {
            0
        } else {
            options.operations_every
        },
        spread_days: 3,
        clock_ms: None,
        progress: false,
        wire,
    })
    .await?;

    let caught_up = tokio::time::timeout(
        CATCH_UP_TIMEOUT,
        table
            .progress
            .wait_for(|p| p.covers(&produced.last_offsets)),
    )
    .await
    .map(|r| r.is_ok());
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let written = match table.task.await {
        Ok(result) => result.map_err(app::AppError::from)?,
        Err(e) => {
            return Err(DemoError::App(app::AppError::Panicked {
                table: table.name,
                message: e.to_string(),
            }));
        }
    };
    if !matches!(caught_up, Ok(true)) {
        return Err(DemoError::Stalled {
            committed: written.rows + written.rejected + written.deletions,
            produced: produced.delivered,
            timeout: CATCH_UP_TIMEOUT,
        });
    }
    // What the service's maintenance does every interval: apply the deletes and edits.
    let keyed = app::keyed_table(&config, &config.tables[0])
        .map_err(|e| DemoError::Query(e.to_string()))?;
    let applied = match keyed {
        None => None,
        Some(keyed) => {
            let options = ApplyOptions {
                owner: lease::owner_id(),
                lease_ttl: DEFAULT_LEASE_TTL,
                settings: table_settings(&config.delta),
                skip_when_idle: false,
            };
            match apply(&keyed, &config.storage_options(), &options)
                .await
                .map_err(|e| DemoError::Query(e.to_string()))?
            {
                ApplyOutcome::Applied(applied) => Some(applied),
                ApplyOutcome::Busy { .. } => None,
            }
        }
    };
    let audit = audit_table(&config, &config.tables[0])
        .await
        .map_err(|e| DemoError::Query(e.to_string()))?;
    let audit = audit
        .render()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    drop(cluster);

    let summary = summarize(&config.storage.root).await?;
    Ok(DemoReport {
        produced,
        written,
        elapsed,
        sentiment_by_category: summary.sentiment_by_category,
        labels: summary.labels,
        dead_letters: summary.dead_letters,
        table_rows: summary.table_rows,
        applied,
        audit,
        config_file,
    })
}

/// Refuses folders that hold anything but a previous demo; resets a previous demo's table so
/// each run starts from an empty table.
fn prepare_folder(dir: &Path) -> Result<(), DemoError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DemoError::Io { path, source }
    };
    if dir.exists() {
        let config = dir.join("sluice.toml");
        let is_demo = std::fs::read_to_string(&config)
            .map(|t| t.starts_with(DEMO_MARKER))
            .unwrap_or(false);
        let is_empty = std::fs::read_dir(dir).map_err(io(dir))?.next().is_none();
        if !is_demo && !is_empty {
            return Err(DemoError::NotADemoFolder {
                dir: dir.to_path_buf(),
            });
        }
        for name in [
            "enriched_posts",
            "enriched_posts_dead_letters",
            "enriched_posts_deletions",
            "schemas",
        ] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
    }
    std::fs::create_dir_all(dir.join("schemas/mappings")).map_err(io(dir))?;
    Ok(())
}

/// Writes the embedded flagship schema, its mappings and a `sluice.toml` for them into `dir`
/// (whose `schemas/mappings` folder exists); returns the config's path.
pub(crate) fn write_config(
    dir: &Path,
    format: Format,
    registry: Option<&str>,
) -> Result<PathBuf, DemoError> {
    let write = |path: PathBuf, text: &str| {
        std::fs::write(&path, text).map_err(|source| DemoError::Io { path, source })
    };
    write(dir.join("schemas/enriched_posts.toml"), SCHEMA)?;
    for (name, text) in MAPPINGS {
        write(dir.join("schemas/mappings").join(name), text)?;
    }
    let mut sources = String::new();
    for shape in Shape::ALL {
        let _ = writeln!(
            sources,
            "  {{ topic = \"{}\", mapping = \"schemas/{}\", format = \"{}\" }},",
            shape.default_topic(),
            shape.mapping_file(),
            format.as_str()
        );
    }
    let registry = match registry {
        Some(url) => format!("[registry]\nurl = \"{url}\"\n\n"),
        None => String::new(),
    };
    let config = format!(
        "{DEMO_MARKER} Tables live next to this file; point other commands here with\n\
         # `--config {}`. The demo's Kafka was in-process and is gone: to keep ingesting,\n\
         # set kafka.brokers (or SLUICE_KAFKA__BROKERS) to a real cluster.\n\n\
         [kafka]\nbrokers = \"localhost:9092\"\ngroup_id = \"sluice-demo\"\n\n\
         [storage]\nroot = \".\"\n\n\
         [batch]\nmax_age_ms = 1000\n\n\
         {registry}[[tables]]\nschema = \"schemas/enriched_posts.toml\"\nsources = [\n{sources}]\n",
        dir.join("sluice.toml").display()
    );
    let file = dir.join("sluice.toml");
    write(file.clone(), &config)?;
    Ok(file)
}

/// What the demo reads back from its tables.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Rows in the main table.
    pub table_rows: i64,
    /// Rows per (sentiment, category).
    pub sentiment_by_category: Vec<(String, String, i64)>,
    /// Per label column: (column, corrected, unknown).
    pub labels: Vec<(String, i64, i64)>,
    /// Dead letters by reason.
    pub dead_letters: Vec<(String, i64)>,
}

/// Label columns of the flagship schema, summarised by the demo.
const LABEL_COLUMNS: [&str; 5] = [
    "sentiment",
    "language",
    "sarcasm",
    "category",
    "appropriateness",
];

/// Reads the demo's tables back through delta-rs' DataFusion provider, which reads exactly the
/// files of the current table versions.
pub async fn summarize(root: &str) -> Result<Summary, DemoError> {
    let q = |e: &dyn std::fmt::Display| DemoError::Query(e.to_string());
    let ctx = SessionContext::new();
    for name in ["enriched_posts", "enriched_posts_dead_letters"] {
        let table = open_table(&table_location(root, name), Default::default())
            .await
            .map_err(|e| q(&e))?;
        register_table(&ctx, name, &table)
            .await
            .map_err(|e| q(&e))?;
    }
    let sql = |text: String| {
        let ctx = ctx.clone();
        async move {
            ctx.sql(&text)
                .await
                .map_err(|e| q(&e))?
                .collect()
                .await
                .map_err(|e| q(&e))
        }
    };
    let int = |batch: &deltalake::arrow::record_batch::RecordBatch, col: usize, row: usize| {
        batch.column(col).as_primitive::<Int64Type>().value(row)
    };
    let mut summary = Summary::default();
    let total = sql("SELECT count(*) AS n FROM enriched_posts".into()).await?;
    summary.table_rows = total.first().map(|b| int(b, 0, 0)).unwrap_or(0);
    for batch in sql(
        "SELECT coalesce(sentiment, '(none)'), coalesce(category, '(none)'), count(*) \
             FROM enriched_posts GROUP BY 1, 2 ORDER BY 1, 2"
            .into(),
    )
    .await?
    {
        let sentiments = string_values(batch.column(0))?;
        let categories = string_values(batch.column(1))?;
        for (i, (s, c)) in sentiments.into_iter().zip(categories).enumerate() {
            summary
                .sentiment_by_category
                .push((s, c, int(&batch, 2, i)));
        }
    }
    for column in LABEL_COLUMNS {
        let batches = sql(format!(
            "SELECT count(*) FILTER (WHERE {column}_raw IS NOT NULL AND {column} <> 'UNKNOWN'), \
                    count(*) FILTER (WHERE {column} = 'UNKNOWN') FROM enriched_posts"
        ))
        .await?;
        if let Some(b) = batches.first() {
            summary
                .labels
                .push((column.to_string(), int(b, 0, 0), int(b, 1, 0)));
        }
    }
    for batch in sql(
        "SELECT reason, count(*) FROM enriched_posts_dead_letters GROUP BY reason ORDER BY reason"
            .into(),
    )
    .await?
    {
        for (i, reason) in string_values(batch.column(0))?.into_iter().enumerate() {
            summary.dead_letters.push((reason, int(&batch, 1, i)));
        }
    }
    Ok(summary)
}

/// A string column as owned strings, whatever string encoding DataFusion chose.
fn string_values(array: &ArrayRef) -> Result<Vec<String>, DemoError> {
    let utf8 = cast(array, &DataType::Utf8).map_err(|e| DemoError::Query(e.to_string()))?;
    let strings = utf8.as_string::<i32>();
    Ok((0..strings.len())
        .map(|i| strings.value(i).to_string())
        .collect())
}

impl DemoReport {
    /// The summary printed at the end of `sluice demo`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let w = &self.written;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(out, "\nsluice demo: done in {:.1}s", secs);
        let _ = writeln!(
            out,
            "  produced      {} messages ({:.1} MB) to 3 topics in {:.1}s",
            self.produced.delivered,
            self.produced.bytes as f64 / 1e6,
            self.produced.elapsed.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "  committed     {} rows + {} dead letters + {} deletes = {} messages",
            w.rows,
            w.rejected,
            w.deletions,
            w.rows + w.rejected + w.deletions
        );
        let lost = self
            .produced
            .delivered
            .saturating_sub(w.rows + w.rejected + w.deletions);
        if lost > 0 {
            let _ = writeln!(
                out,
                "  WARNING       {lost} messages were dropped by the embedded broker (it keeps only \
                 ~5 MiB per partition) before the writer read them: lower --rate or raise --partitions"
            );
        }
        if !self.dead_letters.is_empty() {
            let reasons: Vec<String> = self
                .dead_letters
                .iter()
                .map(|(r, n)| format!("{r}: {n}"))
                .collect();
            let total: i64 = self.dead_letters.iter().map(|(_, n)| n).sum();
            let _ = writeln!(
                out,
                "  dead letters  {total} in enriched_posts_dead_letters ({})",
                reasons.join(", ")
            );
        }
        let labels: Vec<String> = self
            .labels
            .iter()
            .map(|(c, fixed, unknown)| format!("{c} {fixed} fixed / {unknown} UNKNOWN"))
            .collect();
        let _ = writeln!(out, "  labels        {}", labels.join(", "));
        let ops = self.produced.operations;
        if let Some(a) = self.applied.as_ref().filter(|_| ops.total() > 0) {
            let _ = writeln!(
                out,
                "  upstream ops  {} edits, {} redeliveries, {} deletes, {} deleted posts replayed: \
                 applied in one pass, {} rows of deleted posts and {} older versions removed \
                 (enriched_posts_deletions)",
                ops.edits, ops.redeliveries, ops.deletes, ops.replays, a.deleted, a.replaced
            );
        }
        let _ = writeln!(out, "  audit         {}", self.audit);
        let _ = writeln!(
            out,
            "  table         {} rows in {} Parquet files ({:.1} MB, zstd), {} commits, Delta version {}",
            self.table_rows,
            w.files,
            w.bytes as f64 / 1e6,
            w.commits,
            w.table_version
        );
        let _ = writeln!(
            out,
            "  throughput    {:.0} records/s end to end, first produce to last commit ({:.1} MB/s of JSON)",
            (w.rows + w.rejected) as f64 / secs,
            self.produced.bytes as f64 / 1e6 / secs
        );
        let _ = writeln!(out, "  config        {}", self.config_file.display());
        let _ = writeln!(
            out,
            "\nPosts by sentiment × category (labels canonicalized; raw ones kept in *_raw):\n"
        );
        out.push_str(&pivot(&self.sentiment_by_category));
        let _ = writeln!(
            out,
            "\nQuery it: sluice sql --config {} (a shell; or --query toxicity_surges, any query of \\library)",
            self.config_file.display()
        );
        out
    }
}

/// Renders (row, column, count) triples as a table, biggest columns first.
fn pivot(cells: &[(String, String, i64)]) -> String {
    let mut col_totals: BTreeMap<&str, i64> = BTreeMap::new();
    let mut rows: BTreeMap<&str, BTreeMap<&str, i64>> = BTreeMap::new();
    for (r, c, n) in cells {
        *col_totals.entry(c).or_default() += n;
        *rows.entry(r).or_default().entry(c).or_default() += n;
    }
    let mut cols: Vec<(&str, i64)> = col_totals.into_iter().collect();
    cols.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let shown: Vec<&str> = cols.iter().take(8).map(|(c, _)| *c).collect();
    let other = cols.len() > shown.len();
    let width = |s: &str| s.len().max(6);
    let mut out = format!("  {:<10}", "");
    for c in &shown {
        let _ = write!(out, " {:>w$}", c, w = width(c));
    }
    if other {
        let _ = write!(out, " {:>6}", "other");
    }
    out.push('\n');
    for (r, counts) in &rows {
        let _ = write!(out, "  {:<10}", r);
        for c in &shown {
            let _ = write!(out, " {:>w$}", counts.get(c).unwrap_or(&0), w = width(c));
        }
        if other {
            let rest: i64 = counts
                .iter()
                .filter(|(c, _)| !shown.contains(c))
                .map(|(_, n)| n)
                .sum();
            let _ = write!(out, " {:>6}", rest);
        }
        out.push('\n');
    }
    out
}
