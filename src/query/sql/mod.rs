//! SQL over the lake: a read-only DataFusion session in which every configured table and its
//! dead-letter table are registered by name.
//!
//! Tables are read through Delta (never by listing the folder), so files that compaction
//! removed are never counted, and partition pruning and file skipping use the Delta log's
//! statistics. Time travel: the session can be opened at a version per table or at a
//! timestamp, and any statement can read an older state with the table functions
//! `version_as_of('table', 12)` and `timestamp_as_of('table', '2026-11-20T12:00:00Z')`.
//! Statements that would write or reach the filesystem are refused before they run.
//! [`shell`] is the `sluice sql` command on top of this.

pub mod format;
pub mod shell;
mod travel;
mod vector;

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deltalake::arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use deltalake::datafusion::common::TableReference;
use deltalake::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use deltalake::datafusion::error::DataFusionError;
use deltalake::datafusion::logical_expr::{DdlStatement, LogicalPlan, Statement as PlanStatement};
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};
use deltalake::datafusion::sql::parser::{DFParserBuilder, Statement};
use deltalake::datafusion::sql::sqlparser::ast::Visit;
use deltalake::datafusion::sql::sqlparser::dialect::dialect_from_str;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use crate::config::Config;
use crate::contract::schema::{SchemaError, TableSchema, type_name};
use crate::contract::{dead_letters, deletions};
use crate::table::delta::{log, register_table, table_location, table_url, vector_columns};
use crate::table::problem::StorageError;

pub use travel::TravelKey;

/// Errors opening the session or running a statement.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// A schema file of the config is wrong.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// A table could not be opened.
    #[error("table {table} at {location}: {source}")]
    Open {
        /// Table name.
        table: String,
        /// Where it was looked for.
        location: String,
        /// delta-rs' error.
        source: StorageError<Box<DeltaTableError>>,
    },
    /// None of the configured tables exists yet.
    #[error("no table exists yet under {root} (has `sluice run` or `sluice demo` written one?)")]
    NoTables {
        /// The storage root.
        root: String,
    },
    /// A statement would write or touch the filesystem.
    #[error("sluice sql is read-only: {what} is refused")]
    ReadOnly {
        /// What the statement would do.
        what: String,
    },
    /// A time-travel request names an unknown table or a state the table never had.
    #[error("time travel: {0}")]
    TimeTravel(String),
    /// A name that is not a registered table.
    #[error("unknown table {name}; tables: {known} (`\\d NAME` shows a table's columns)")]
    UnknownTable {
        /// The name asked for.
        name: String,
        /// The registered tables.
        known: String,
    },
    /// DataFusion refused or failed the statement.
    #[error(transparent)]
    Query(#[from] DataFusionError),
}

/// Which state of the tables a session reads.
#[derive(Debug, Clone, Default)]
pub struct TimeTravel {
    /// A version per table name.
    pub versions: BTreeMap<String, i64>,
    /// A version for the config's only main table (`--as-of-version 12`).
    pub version: Option<i64>,
    /// The latest state at or before this time, for every table without a version.
    pub as_of: Option<DateTime<Utc>>,
}

/// A table registered in the session.
#[derive(Debug, Clone)]
pub struct LakeTable {
    /// Name in SQL.
    pub name: String,
    /// Where the table lives.
    pub location: String,
    /// Its columns and their documentation.
    pub schema: Arc<TableSchema>,
    /// The Delta version the session reads.
    pub version: i64,
    /// Data files in that version.
    pub files: usize,
    /// What it holds: `rows`, `dead letters of <table>` or `deletions from <table>`.
    pub holds: String,
}

/// The result of one statement.
#[derive(Debug)]
pub struct StatementResult {
    /// Column names and types.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Planning and execution time.
    pub elapsed: Duration,
}

impl StatementResult {
    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }
}

/// A read-only DataFusion session over the lake.
pub struct Session {
    ctx: SessionContext,
    tables: Vec<LakeTable>,
    travel: travel::Travel,
}

/// Rows per batch when a table holds vectors (see [`Session::open`]).
const VECTOR_BATCH_ROWS: usize = 2048;

/// Settings a statement may change with `SET`: planning and execution knobs, never paths.
const SETTABLE: [&str; 5] = [
    "datafusion.execution.",
    "datafusion.optimizer.",
    "datafusion.explain.",
    "datafusion.sql_parser.",
    "datafusion.format.",
];

impl Session {
    /// Opens every table of `config` and its dead letters, at the state `time_travel` asks for.
    /// Tables that do not exist yet are skipped with a warning; none existing is an error.
    pub async fn open(config: &Config, time_travel: &TimeTravel) -> Result<Self, SqlError> {
        let mut wanted = Vec::new();
        for table in &config.tables {
            let schema = TableSchema::load(&table.schema)?;
            let name = schema.name.clone();
            let dl_schema = dead_letters::schema(&name)?;
            let deletions_schema = (!schema.key.is_empty())
                .then(|| deletions::schema(&schema))
                .transpose()?;
            wanted.push((Arc::new(schema), "rows".to_string()));
            wanted.push((Arc::new(dl_schema), format!("dead letters of {name}")));
            if let Some(d) = deletions_schema {
                wanted.push((Arc::new(d), format!("deletions from {name}")));
            }
        }
        let mut time_travel = time_travel.clone();
        if let Some(version) = time_travel.version {
            let [table] = config.tables.as_slice() else {
                return Err(SqlError::TimeTravel(format!(
                    "the config has {} tables: name one, as in TABLE={version}",
                    config.tables.len()
                )));
            };
            let main = TableSchema::load(&table.schema)?;
            time_travel.versions.insert(main.name, version);
        }
        let known: Vec<&str> = wanted.iter().map(|(s, _)| s.name.as_str()).collect();
        for name in time_travel.versions.keys() {
            if !known.contains(&name.as_str()) {
                return Err(SqlError::TimeTravel(format!(
                    "no table {name} in the config; tables: {}",
                    known.join(", ")
                )));
            }
        }

        // Rows of embeddings are ~1.5 KB of floats each: DataFusion's 8,192-row batches grow
        // 12 MB buffers per column that are reallocated and faulted in on every batch. 2,048
        // rows made nearest_posts.sql 20 % faster; narrow tables keep the default.
        let vectors = wanted
            .iter()
            .any(|(schema, _)| !vector_columns(&schema.arrow_schema()).is_empty());
        let mut session_config = SessionConfig::new()
            .with_information_schema(true)
            .with_default_catalog_and_schema("sluice", "lake");
        if vectors {
            session_config = session_config.with_batch_size(VECTOR_BATCH_ROWS);
        }
        let ctx = SessionContext::new_with_config(session_config);
        for f in vector::functions() {
            ctx.register_udf(f);
        }
        let storage_options = config.storage_options();
        let mut tables = Vec::new();
        for (schema, holds) in wanted {
            let location = table_location(&config.storage.root, &schema.name);
            let version = time_travel.versions.get(&schema.name).copied();
            let state = match (version, time_travel.as_of) {
                (Some(v), _) => AsOf::Version(v),
                (None, Some(t)) => AsOf::Timestamp(t),
                (None, None) => AsOf::Latest,
            };
            let open_error = |source: DeltaTableError| SqlError::Open {
                table: schema.name.clone(),
                location: location.clone(),
                source: source.into(),
            };
            let table = match load(&location, &storage_options, state).await {
                Ok(table) => table,
                Err(DeltaTableError::NotATable(_)) if state == AsOf::Latest => {
                    tracing::warn!(table = %schema.name, %location, "table does not exist yet; not registered");
                    continue;
                }
                // A table beside the main one may be younger than the moment asked for.
                Err(DeltaTableError::NotATable(_) | DeltaTableError::Generic(_))
                    if holds != "rows" && matches!(state, AsOf::Timestamp(_)) =>
                {
                    tracing::warn!(table = %schema.name, %location, "table did not exist at that time; not registered");
                    continue;
                }
                Err(source) => return Err(open_error(source)),
            };
            register_table(&ctx, &schema.name, &table)
                .await
                .map_err(open_error)?;
            let snapshot = table.snapshot().map_err(open_error)?;
            tables.push(LakeTable {
                name: schema.name.clone(),
                location,
                version: snapshot.version() as i64,
                files: snapshot.log_data().num_files(),
                schema,
                holds,
            });
        }
        if tables.is_empty() {
            return Err(SqlError::NoTables {
                root: config.storage.root.clone(),
            });
        }
        let travel = travel::Travel::new(
            storage_options,
            tables.iter().map(|t| (t.name.clone(), t.location.clone())),
        );
        travel.register(&ctx);
        Ok(Session {
            ctx,
            tables,
            travel,
        })
    }

    /// The registered tables, each main table followed by its dead letters.
    pub fn tables(&self) -> &[LakeTable] {
        &self.tables
    }

    /// The DataFusion context, for callers that add their own tables or functions.
    pub fn context(&self) -> &SessionContext {
        &self.ctx
    }

    /// Splits `sql` into statements (`;`-separated, comments and quotes respected).
    pub fn parse(&self, sql: &str) -> Result<Vec<Statement>, SqlError> {
        let state = self.ctx.state();
        let dialect_name = state.config().options().sql_parser.dialect.to_string();
        let dialect = dialect_from_str(&dialect_name)
            .ok_or_else(|| DataFusionError::Plan(format!("unknown SQL dialect {dialect_name}")))?;
        let statements = DFParserBuilder::new(sql)
            .with_dialect(dialect.as_ref())
            .build()?
            .parse_statements()?;
        Ok(statements.into_iter().collect())
    }

    /// Runs every statement of `sql` and returns their results in order.
    pub async fn run(&self, sql: &str) -> Result<Vec<StatementResult>, SqlError> {
        let mut results = Vec::new();
        for statement in self.parse(sql)? {
            results.push(self.execute(statement).await?);
        }
        Ok(results)
    }

    /// Runs one statement: plans it, refuses it if it writes, executes it.
    pub async fn execute(&self, statement: Statement) -> Result<StatementResult, SqlError> {
        let started = Instant::now();
        self.travel.prepare(&self.ctx, &statement).await?;
        let state = self.ctx.state();
        let references = state.resolve_table_references(&statement);
        let plan = match state.statement_to_plan(statement).await {
            Ok(plan) => plan,
            Err(error) => return Err(self.explain(error, references.ok())),
        };
        refuse_writes(&plan)?;
        let frame = self.ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame.collect().await?;
        Ok(StatementResult {
            schema,
            batches,
            elapsed: started.elapsed(),
        })
    }

    /// A planning error about a table the session does not have becomes
    /// [`SqlError::UnknownTable`], which lists the tables; any other error stays as it is.
    fn explain(&self, error: DataFusionError, references: Option<Vec<TableReference>>) -> SqlError {
        if !matches!(error.find_root(), DataFusionError::Plan(_)) {
            return SqlError::Query(error);
        }
        let missing = references.into_iter().flatten().find(|reference| {
            self.ctx.table_function(reference.table()).is_err()
                && self
                    .ctx
                    .table_exist(reference.clone())
                    .is_ok_and(|exists| !exists)
        });
        match missing {
            Some(reference) => self.unknown_table(reference.table()),
            None => SqlError::Query(error),
        }
    }

    fn unknown_table(&self, name: &str) -> SqlError {
        SqlError::UnknownTable {
            name: name.to_string(),
            known: self
                .tables
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// One row per registered table: name, what it holds, version, files, location.
    pub fn list(&self) -> RecordBatch {
        let column = |values: Vec<String>| -> ArrayRef { Arc::new(StringArray::from(values)) };
        let schema = Schema::new(vec![
            Field::new("table", DataType::Utf8, false),
            Field::new("holds", DataType::Utf8, false),
            Field::new("version", DataType::Int64, false),
            Field::new("files", DataType::Int64, false),
            Field::new("location", DataType::Utf8, false),
        ]);
        let t = &self.tables;
        RecordBatch::try_new(
            Arc::new(schema),
            vec![
                column(t.iter().map(|t| t.name.clone()).collect()),
                column(t.iter().map(|t| t.holds.clone()).collect()),
                Arc::new(Int64Array::from_iter_values(t.iter().map(|t| t.version))),
                Arc::new(Int64Array::from_iter_values(
                    t.iter().map(|t| t.files as i64),
                )),
                column(t.iter().map(|t| t.location.clone()).collect()),
            ],
        )
        .expect("columns match the schema")
    }

    /// The columns of table `name`: type, nullability, partitioning and documentation.
    pub fn describe(&self, name: &str) -> Result<(&LakeTable, RecordBatch), SqlError> {
        let table = self
            .tables
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| self.unknown_table(name))?;
        let arrow = table.schema.arrow_schema();
        let columns = &table.schema.columns;
        let partition = table.schema.partition_column.as_deref();
        let schema = Schema::new(vec![
            Field::new("column", DataType::Utf8, false),
            Field::new("type", DataType::Utf8, false),
            Field::new("nullable", DataType::Boolean, false),
            Field::new("partition", DataType::Boolean, false),
            Field::new("doc", DataType::Utf8, true),
        ]);
        let batch = RecordBatch::try_new(
            Arc::new(schema),
            vec![
                Arc::new(StringArray::from_iter_values(
                    columns.iter().map(|c| c.name.as_str()),
                )),
                Arc::new(StringArray::from_iter_values(
                    arrow.fields().iter().map(|f| type_name(f.data_type())),
                )),
                Arc::new(BooleanArray::from_iter(
                    arrow.fields().iter().map(|f| Some(f.is_nullable())),
                )),
                Arc::new(BooleanArray::from_iter(
                    columns
                        .iter()
                        .map(|c| Some(Some(c.name.as_str()) == partition)),
                )),
                Arc::new(StringArray::from_iter(
                    columns.iter().map(|c| c.doc.as_deref()),
                )),
            ],
        )
        .expect("columns match the schema");
        Ok((table, batch))
    }
}

/// Which state of a table to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AsOf {
    Latest,
    Version(i64),
    Timestamp(DateTime<Utc>),
}

async fn load(
    location: &str,
    storage_options: &HashMap<String, String>,
    state: AsOf,
) -> Result<DeltaTable, DeltaTableError> {
    let url = table_url(location).map_err(DeltaTableError::InvalidTableLocation)?;
    let builder = DeltaTableBuilder::from_url(url)?.with_storage_options(storage_options.clone());
    match state {
        AsOf::Latest => builder.load().await,
        AsOf::Version(v) => {
            let version = u64::try_from(v).map_err(|_| {
                DeltaTableError::Generic(format!("version {v} does not exist: versions start at 0"))
            })?;
            builder.with_version(version).load().await
        }
        AsOf::Timestamp(t) => {
            let mut table = builder.load().await?;
            let version = version_at(&table, t).await?;
            if table.version() != Some(version) {
                table.load_version(version).await?;
            }
            Ok(table)
        }
    }
}

/// The newest version of `table` committed at or before `t`, by the commit timestamps its log
/// records (`inCommitTimestamp`, else `commitInfo.timestamp`): the times `$history` shows in
/// Trino, and the ones Trino's `FOR TIMESTAMP AS OF` resolves by, so both engines read the same
/// version. (delta-rs' own resolution goes by the commit files' modification times, which S3
/// reports to the second and which fall after the commit's timestamp.) Commits are searched by
/// bisection: their timestamps grow with their versions.
async fn version_at(table: &DeltaTable, t: DateTime<Utc>) -> Result<u64, DeltaTableError> {
    let store = table.object_store();
    let commits = log::commits(table).await?;
    let wanted = t.timestamp_millis();
    let (mut low, mut high) = (0, commits.len());
    let mut earliest = None;
    while low < high {
        let middle = (low + high) / 2;
        let (_, meta) = &commits[middle];
        let committed = log::commit_timestamp(&store, meta).await?;
        if middle == 0 {
            earliest = Some(committed);
        }
        if committed <= wanted {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    if low > 0 {
        return Ok(commits[low - 1].0);
    }
    let Some(&(first, ref meta)) = commits.first() else {
        return Err(DeltaTableError::Generic(
            "the table's log holds no commits".to_string(),
        ));
    };
    let first_time = match earliest {
        Some(millis) => millis,
        None => log::commit_timestamp(&store, meta).await?,
    };
    let first_time = DateTime::from_timestamp_millis(first_time).unwrap_or_default();
    Err(DeltaTableError::Generic(if first == 0 {
        format!("the table did not exist yet at {t} (its first version is from {first_time})")
    } else {
        format!(
            "the log no longer holds the version read at {t}: its oldest commit is version \
             {first}, from {first_time} (older commits went after delta.logRetentionDuration)"
        )
    }))
}

/// Refuses plans that write, create or drop anything but session views, or change settings
/// outside [`SETTABLE`].
fn refuse_writes(plan: &LogicalPlan) -> Result<(), SqlError> {
    let mut refused: Option<String> = None;
    plan.apply(|node| {
        refused = match node {
            LogicalPlan::Dml(dml) => Some(format!("{} on {}", dml.op, dml.table_name)),
            LogicalPlan::Copy(copy) => Some(format!("COPY TO {}", copy.output_url)),
            LogicalPlan::Ddl(DdlStatement::CreateView(_) | DdlStatement::DropView(_)) => None,
            LogicalPlan::Ddl(ddl) => Some(ddl.name().to_string()),
            LogicalPlan::Statement(PlanStatement::SetVariable(set)) => {
                let key = set.variable.to_ascii_lowercase();
                (!SETTABLE.iter().any(|p| key.starts_with(p)))
                    .then(|| format!("SET {} (settable: {}*)", set.variable, SETTABLE.join("*, ")))
            }
            LogicalPlan::Statement(
                PlanStatement::Prepare(_)
                | PlanStatement::Execute(_)
                | PlanStatement::Deallocate(_),
            ) => None,
            LogicalPlan::Statement(other) => Some(other.name().to_string()),
            _ => None,
        };
        Ok(match refused {
            Some(_) => TreeNodeRecursion::Stop,
            None => TreeNodeRecursion::Continue,
        })
    })?;
    match refused {
        Some(what) => Err(SqlError::ReadOnly { what }),
        None => Ok(()),
    }
}

/// Calls `f` on every table-function call in `statement` (name lower-cased, raw arguments).
fn table_function_calls(
    statement: &Statement,
    mut f: impl FnMut(&str, &[deltalake::datafusion::sql::sqlparser::ast::FunctionArg]),
) {
    use deltalake::datafusion::sql::sqlparser::ast::{TableFactor, Visitor};
    struct Calls<'a, F>(&'a mut F);
    impl<F> Visitor for Calls<'_, F>
    where
        F: FnMut(&str, &[deltalake::datafusion::sql::sqlparser::ast::FunctionArg]),
    {
        type Break = ();
        fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                args: Some(args),
                ..
            } = factor
                && let Some(last) = name.0.last()
            {
                let function = last.to_string().trim_matches('"').to_ascii_lowercase();
                (self.0)(&function, &args.args);
            }
            ControlFlow::Continue(())
        }
    }
    match statement {
        Statement::Statement(s) => {
            let _ = s.visit(&mut Calls(&mut f));
        }
        Statement::Explain(explain) => table_function_calls(&explain.statement, f),
        _ => {}
    }
}
