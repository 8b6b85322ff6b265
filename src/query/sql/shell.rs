//! `sluice sql`: runs one statement (`-c`), a file (`-f`), or an interactive shell with line
//! editing, history and multi-line statements that end at `;`.
//!
//! Meta commands (at the start of a line): `\d` lists the tables, `\d name` describes one,
//! `\format table|csv|json|ndjson` switches the output, `\library` lists the query library,
//! `\run NAME` runs one of its queries, `\?` helps, `\q` quits. On a
//! terminal every result ends with a row count and the time it took.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use rustyline::DefaultEditor;
use rustyline::error::ReadlineError;

use super::format::{Format, write};
use super::{Session, SqlError, StatementResult};
use crate::query::library::{self, LibraryError};

/// Errors of the shell itself (a failed statement is reported and the shell goes on).
#[derive(Debug, thiserror::Error)]
pub enum ShellError {
    /// The terminal could not be read.
    #[error("reading the terminal: {0}")]
    Readline(#[from] ReadlineError),
    /// Results could not be written.
    #[error("writing results: {0}")]
    Output(#[from] std::io::Error),
    /// The query library could not be read, or has no such query.
    #[error(transparent)]
    Library(#[from] LibraryError),
    /// A statement failed (in `-c` and `-f` mode, where the first failure ends the run).
    #[error("{context}: {source}")]
    Statement {
        /// Which statement.
        context: String,
        /// Why.
        source: Box<SqlError>,
    },
}

const HELP: &str = "\
Statements end with `;` and may span lines. Meta commands:
  \\d                list tables (each table and its dead letters)
  \\d NAME           describe a table's columns
  \\format FORMAT    table, csv, json or ndjson
  \\library          list the query library (sql/, built in) and what each query answers
  \\run NAME         run a query of the library
  \\q                quit (or Ctrl-D)
Time travel: SELECT ... FROM version_as_of('enriched_posts', 12)
             SELECT ... FROM timestamp_as_of('enriched_posts', '2026-11-20T12:00:00Z')
Vectors: cosine_similarity, cosine_distance, dot_product, euclidean_distance on arrays.";

/// Prints results the way the user asked.
pub struct Printer {
    /// Output format.
    pub format: Format,
    /// Row count and time after each result.
    pub footer: bool,
}

impl Printer {
    /// A printer for stdout: footers only when stdout is a terminal.
    pub fn stdout(format: Format) -> Self {
        Printer {
            format,
            footer: std::io::stdout().is_terminal(),
        }
    }

    fn result(&self, out: &mut dyn Write, result: &StatementResult) -> Result<(), ShellError> {
        write(out, self.format, &result.schema, &result.batches)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        if self.footer {
            let rows = result.rows();
            writeln!(
                out,
                "{rows} row{} in {:.3} s",
                if rows == 1 { "" } else { "s" },
                result.elapsed.as_secs_f64()
            )?;
        }
        Ok(())
    }

    fn batch(
        &self,
        out: &mut dyn Write,
        batch: &deltalake::arrow::array::RecordBatch,
    ) -> Result<(), ShellError> {
        write(
            out,
            self.format,
            &batch.schema(),
            std::slice::from_ref(batch),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(())
    }
}

/// Runs a query of the library, as [`run_script`] runs a file.
pub async fn run_query(
    session: &Session,
    query: &library::Query,
    printer: &Printer,
    out: &mut dyn Write,
    library: Option<&Path>,
) -> Result<(), ShellError> {
    Box::pin(run_script(
        session,
        &query.sql,
        &query.name,
        printer,
        out,
        library,
    ))
    .await
}

/// Runs every statement of `sql` in order, printing each result; stops at the first failure.
/// `origin` names the source in errors (`-c` or the file name).
/// `library` is the `--sql-dir` folder, if one replaces the built-in query library.
pub async fn run_script(
    session: &Session,
    sql: &str,
    origin: &str,
    printer: &Printer,
    out: &mut dyn Write,
    library: Option<&Path>,
) -> Result<(), ShellError> {
    if let Some(meta) = sql.trim().strip_prefix('\\') {
        return match meta_command(session, meta, printer, out, library)? {
            Meta::Done | Meta::Quit => Ok(()),
            Meta::Format(_) => Ok(()),
            Meta::Run(query) => run_query(session, &query, printer, out, library).await,
        };
    }
    let statements = session.parse(sql).map_err(|source| ShellError::Statement {
        context: origin.to_string(),
        source: Box::new(source),
    })?;
    let count = statements.len();
    for (n, statement) in statements.into_iter().enumerate() {
        let result = session
            .execute(statement)
            .await
            .map_err(|source| ShellError::Statement {
                context: if count > 1 {
                    format!("{origin}, statement {} of {count}", n + 1)
                } else {
                    origin.to_string()
                },
                source: Box::new(source),
            })?;
        if n > 0 && printer.format == Format::Table {
            writeln!(out)?;
        }
        printer.result(out, &result)?;
    }
    out.flush()?;
    Ok(())
}

/// Reads statements from the terminal (or from piped stdin) until `\q` or end of input.
pub async fn repl(
    session: &Session,
    format: Format,
    library: Option<&Path>,
) -> Result<(), ShellError> {
    let mut printer = Printer::stdout(format);
    let interactive = std::io::stdin().is_terminal();
    let mut editor = DefaultEditor::new()?;
    let history = history_file();
    if interactive && let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    if interactive {
        println!(
            "sluice sql: {} tables ({}). \\? for help, \\q to quit.",
            session.tables().len(),
            session
                .tables()
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            "sluice> "
        } else {
            "     -> "
        };
        let line = match tokio::task::block_in_place(|| editor.readline(prompt)) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                buffer.clear();
                continue;
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let mut stdout = std::io::stdout().lock();
        if buffer.is_empty() && line.trim_start().starts_with('\\') {
            let _ = editor.add_history_entry(line.trim());
            let meta = line.trim_start()[1..].to_string();
            let ran = match meta_command(session, &meta, &printer, &mut stdout, library) {
                Ok(Meta::Quit) => break,
                Ok(Meta::Format(f)) => {
                    printer.format = f;
                    Ok(())
                }
                Ok(Meta::Done) => Ok(()),
                Ok(Meta::Run(query)) => {
                    run_query(session, &query, &printer, &mut stdout, library).await
                }
                Err(e) => Err(e),
            };
            match ran {
                Ok(()) => {}
                Err(ShellError::Statement { source, .. }) => eprintln!("error: {source}"),
                Err(ShellError::Library(e)) => eprintln!("error: {e}"),
                Err(e) => return Err(e),
            }
            continue;
        }
        buffer.push_str(&line);
        buffer.push('\n');
        if !ends_statement(&buffer) {
            continue;
        }
        let sql = std::mem::take(&mut buffer);
        let _ = editor.add_history_entry(sql.trim());
        drop(stdout);
        let statements = match session.parse(&sql) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        for statement in statements {
            tokio::select! {
                result = session.execute(statement) => match result {
                    Ok(result) => printer.result(&mut std::io::stdout().lock(), &result)?,
                    Err(e) => {
                        eprintln!("error: {e}");
                        break;
                    }
                },
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("cancelled");
                    break;
                }
            }
        }
    }
    if !buffer.trim().is_empty() {
        eprintln!(
            "error: input ended inside a statement (missing `;`): {}",
            buffer.trim()
        );
    }
    if interactive && let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    Ok(())
}

enum Meta {
    Done,
    Quit,
    Format(Format),
    /// Run a query of the library.
    Run(library::Query),
}

fn meta_command(
    session: &Session,
    command: &str,
    printer: &Printer,
    out: &mut dyn Write,
    library: Option<&Path>,
) -> Result<Meta, ShellError> {
    let mut words = command.split_whitespace();
    let statement_error = |source| ShellError::Statement {
        context: format!("\\{command}"),
        source: Box::new(source),
    };
    match (words.next().unwrap_or(""), words.next()) {
        ("q" | "quit", _) => return Ok(Meta::Quit),
        ("d", None) => printer.batch(out, &session.list())?,
        ("d", Some(name)) => {
            let (table, columns) = session.describe(name).map_err(statement_error)?;
            writeln!(
                out,
                "{}: version {}, {} files, {}",
                table.name, table.version, table.files, table.location
            )?;
            if let Some(description) = &table.schema.description {
                writeln!(out, "{description}")?;
            }
            printer.batch(out, &columns)?;
        }
        ("format", Some(name)) => {
            use clap::ValueEnum;
            return match Format::from_str(name, true) {
                Ok(f) => Ok(Meta::Format(f)),
                Err(_) => {
                    writeln!(out, "unknown format {name}: table, csv, json or ndjson")?;
                    Ok(Meta::Done)
                }
            };
        }
        ("library", None) => {
            let queries = library::queries(library)?;
            let width = queries.iter().map(|q| q.name.len()).max().unwrap_or(0);
            for query in queries {
                writeln!(out, "{:<width$}  {}", query.name, query.question)?;
            }
        }
        ("run", Some(name)) => return Ok(Meta::Run(library::find(library, name)?)),
        _ => writeln!(out, "{HELP}")?,
    }
    Ok(Meta::Done)
}

/// Whether `buffer` ends with a `;` outside quotes and comments (so the statement is complete).
pub fn ends_statement(buffer: &str) -> bool {
    let mut last_significant = None;
    let mut chars = buffer.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' => {
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                }
                last_significant = Some(c);
            }
            '-' if chars.peek() == Some(&'-') => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut star = false;
                for n in chars.by_ref() {
                    if star && n == '/' {
                        break;
                    }
                    star = n == '*';
                }
            }
            c if c.is_whitespace() => {}
            c => last_significant = Some(c),
        }
    }
    last_significant == Some(';')
}

fn history_file() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("SLUICE_SQL_HISTORY") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".sluice_sql_history"))
}

#[cfg(test)]
mod tests {
    use super::ends_statement;

    #[test]
    fn a_statement_ends_at_a_semicolon_outside_quotes_and_comments() {
        assert!(ends_statement("SELECT 1;"));
        assert!(ends_statement("SELECT 1;  \n"));
        assert!(ends_statement("SELECT 1; -- trailing comment\n"));
        assert!(ends_statement("SELECT 1; /* done */"));
        assert!(!ends_statement("SELECT 1"));
        assert!(!ends_statement("SELECT ';"));
        assert!(!ends_statement("SELECT 1 -- not yet;\n"));
        assert!(!ends_statement("SELECT 1 /* ; */"));
        assert!(ends_statement("SELECT 'a;b' AS \"x;\";"));
    }
}
