//! The query library: the questions of `sql/`, one file each, shipped inside the binary so
//! `sluice sql --query NAME`, the shell's `\library` and the benchmark's compaction stage work
//! from any folder. A folder of `.sql` files given with `--sql-dir` replaces it.
//!
//! Each file opens with a `-- Question:` line saying what it answers; the file's name without
//! `.sql` is the query's name.

use std::path::{Path, PathBuf};

/// The files of `sql/`, as built into the binary.
const BUILT_IN: &[(&str, &str)] = &[
    (
        "bot_like_authors",
        include_str!("../../sql/bot_like_authors.sql"),
    ),
    (
        "dead_letters_by_reason",
        include_str!("../../sql/dead_letters_by_reason.sql"),
    ),
    (
        "deletions_by_day",
        include_str!("../../sql/deletions_by_day.sql"),
    ),
    (
        "inappropriate_by_category",
        include_str!("../../sql/inappropriate_by_category.sql"),
    ),
    ("label_quality", include_str!("../../sql/label_quality.sql")),
    (
        "language_mix_over_time",
        include_str!("../../sql/language_mix_over_time.sql"),
    ),
    (
        "most_engaged_posts",
        include_str!("../../sql/most_engaged_posts.sql"),
    ),
    ("nearest_posts", include_str!("../../sql/nearest_posts.sql")),
    (
        "sarcasm_by_category_language",
        include_str!("../../sql/sarcasm_by_category_language.sql"),
    ),
    (
        "sentiment_by_category",
        include_str!("../../sql/sentiment_by_category.sql"),
    ),
    (
        "sentiment_distribution",
        include_str!("../../sql/sentiment_distribution.sql"),
    ),
    ("top_entities", include_str!("../../sql/top_entities.sql")),
    (
        "toxicity_surges",
        include_str!("../../sql/toxicity_surges.sql"),
    ),
];

/// Errors finding a library query.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    /// The `--sql-dir` folder could not be read.
    #[error("reading the query library {dir}: {source}; check --sql-dir")]
    Read {
        /// The folder.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The folder holds no `.sql` file.
    #[error(
        "no .sql files in {0}; point --sql-dir at a folder of queries, or leave it out for the built-in library"
    )]
    Empty(PathBuf),
    /// No query has the name asked for.
    #[error("no query named {name} in {library}; `sluice sql -c '\\library'` lists them")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The built-in library or the folder searched.
        library: String,
    },
}

/// One query of the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    /// The file's name without `.sql`.
    pub name: String,
    /// What the query answers (its `-- Question:` line), or empty.
    pub question: String,
    /// The SQL text, comments included.
    pub sql: String,
}

impl Query {
    fn new(name: &str, sql: &str) -> Self {
        let question = sql
            .lines()
            .find_map(|line| line.trim().strip_prefix("-- Question:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        Query {
            name: name.to_string(),
            question,
            sql: sql.to_string(),
        }
    }
}

/// The queries, sorted by name: those of `dir` when given, else the built-in ones.
pub fn queries(dir: Option<&Path>) -> Result<Vec<Query>, LibraryError> {
    let Some(dir) = dir else {
        return Ok(BUILT_IN
            .iter()
            .map(|(name, sql)| Query::new(name, sql))
            .collect());
    };
    let read = |source| LibraryError::Read {
        dir: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_none_or(|e| e != "sql") {
            continue;
        }
        let Some(name) = path.file_stem().map(|s| s.to_string_lossy().into_owned()) else {
            continue;
        };
        let sql = std::fs::read_to_string(&path).map_err(read)?;
        out.push(Query::new(&name, &sql));
    }
    if out.is_empty() {
        return Err(LibraryError::Empty(dir.to_path_buf()));
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The query named `name` (a trailing `.sql` is ignored).
pub fn find(dir: Option<&Path>, name: &str) -> Result<Query, LibraryError> {
    let wanted = name.strip_suffix(".sql").unwrap_or(name);
    queries(dir)?
        .into_iter()
        .find(|q| q.name == wanted)
        .ok_or_else(|| LibraryError::Unknown {
            name: name.to_string(),
            library: dir.map_or_else(
                || "the built-in library".to_string(),
                |d| d.display().to_string(),
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_folder() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("sql")
    }

    #[test]
    fn the_built_in_library_is_the_sql_folder_file_for_file() {
        assert_eq!(
            queries(None).unwrap(),
            queries(Some(&sql_folder())).unwrap()
        );
    }

    #[test]
    fn every_query_says_what_it_answers_and_is_found_by_name() {
        for query in queries(None).unwrap() {
            assert!(
                query.question.contains('?'),
                "{}: {:?}",
                query.name,
                query.question
            );
            assert_eq!(find(None, &format!("{}.sql", query.name)).unwrap(), query);
        }
        let unknown = find(None, "toxicity").unwrap_err().to_string();
        assert!(unknown.contains("no query named toxicity"), "{unknown}");
        let empty = queries(Some(Path::new(env!("CARGO_MANIFEST_DIR")))).unwrap_err();
        assert!(matches!(empty, LibraryError::Empty(_)), "{empty}");
    }
}
