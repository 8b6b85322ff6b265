//! `sluice sql`: the SQL shell over the tables, one statement (`-c`) or a file (`-f`), with
//! time travel by version or timestamp.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use sluice::contract::values::parse_timestamp;
use sluice::query::library::find;
use sluice::query::sql::format::Format;
use sluice::query::sql::shell::{Printer, repl, run_query, run_script};
use sluice::query::sql::{Session, TimeTravel};

use super::load_config;

/// `sluice sql` flags.
#[derive(clap::Args)]
pub struct SqlArgs {
    /// Config file (tables and storage are read from it).
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// Run this statement (or meta command such as `\d` or `\library`) and exit.
    #[arg(short = 'c', long = "command", conflicts_with_all = ["file", "query"])]
    command: Option<String>,
    /// Run the statements of this file and exit.
    #[arg(short = 'f', long, conflicts_with = "query")]
    file: Option<PathBuf>,
    /// Run this query of the library and exit (`sluice sql -c '\library'` lists them), for
    /// example `toxicity_surges`.
    #[arg(short = 'q', long, value_name = "NAME")]
    query: Option<String>,
    /// A folder of `.sql` files to use as the query library instead of the built-in one.
    #[arg(long, value_name = "DIR")]
    sql_dir: Option<PathBuf>,
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

/// Runs `sluice sql`.
pub async fn run(args: SqlArgs) -> anyhow::Result<ExitCode> {
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
        let micros = parse_timestamp(t, None).map_err(|e| anyhow::anyhow!("--as-of {t}: {e}"))?;
        travel.as_of = chrono::DateTime::from_timestamp_micros(micros);
    }
    let library = args.sql_dir.as_deref();
    // An unknown query name fails before any table is opened.
    let query = args
        .query
        .as_deref()
        .map(|name| find(library, name))
        .transpose()?;
    let session = Session::open(&cfg, &travel).await?;
    let printer = Printer::stdout(args.format);
    let mut stdout = std::io::stdout().lock();
    let outcome = match (&args.command, &args.file, &query) {
        (Some(sql), _, _) => run_script(&session, sql, "-c", &printer, &mut stdout, library).await,
        (None, None, Some(query)) => {
            run_query(&session, query, &printer, &mut stdout, library).await
        }
        (None, Some(file), _) => {
            let sql = std::fs::read_to_string(file)
                .with_context(|| format!("reading {}", file.display()))?;
            run_script(
                &session,
                &sql,
                &file.display().to_string(),
                &printer,
                &mut stdout,
                library,
            )
            .await
        }
        (None, None, None) => {
            drop(stdout);
            repl(&session, args.format, library).await
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
