//! `sluice forget`: erasure requests by key or author, applied at once and recorded so every
//! later pass removes what still arrives for them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};

use sluice::contract::dead_letters;
use sluice::contract::schema::TableSchema;
use sluice::service::app::keyed_table;
use sluice::service::background::table_settings;
use sluice::table::compact::DEFAULT_LEASE_TTL;
use sluice::table::deletes::{ApplyOptions, ApplyOutcome, Forget, ForgetRequest, forget};
use sluice::table::lease;
use sluice::table::maintain::purge_removed;

use super::load_config;

/// Exit code when a compactor holds the table's lease: nothing was recorded.
const EXIT_LEASE_HELD: u8 = 3;

/// `sluice forget` flags.
#[derive(clap::Args)]
pub struct ForgetArgs {
    /// Config file.
    #[arg(long, env = "SLUICE_CONFIG")]
    config: PathBuf,
    /// The table (needed when the config has several keyed tables).
    #[arg(long)]
    table: Option<String>,
    /// A key to forget: `column=value` for each key column, joined by commas
    /// (`platform=bluesky,post_id=at://did:plc:x/app.bsky.feed.post/3k`); a one-column key may
    /// be given as its bare value. Repeatable.
    #[arg(long = "key")]
    keys: Vec<String>,
    /// An author to forget: the value of the table's `author` column. Repeatable.
    #[arg(long = "author")]
    authors: Vec<String>,
    /// A file of requests, one JSON object per line: `{"author": "..."}` or every key column
    /// (`{"platform": "bluesky", "post_id": "..."}`), each with an optional `"reason"`.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Recorded with each request and everything it removes (a ticket, a request id).
    #[arg(long)]
    reason: Option<String>,
    /// Also delete at once every file earlier versions of the table and its dead letters
    /// removed (the rows stay in those until vacuum otherwise). Time travel to those versions
    /// fails afterwards.
    #[arg(long)]
    purge_history: bool,
}

/// Records the requests and applies them in one pass.
pub async fn run(args: ForgetArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args.config, None)?;
    let mut chosen = None;
    for table in &cfg.tables {
        let schema = TableSchema::load(&table.schema)?;
        if args.table.as_deref().is_some_and(|t| t != schema.name) {
            continue;
        }
        if schema.key.is_empty() {
            if args.table.is_some() {
                bail!(
                    "table {} declares no `key`: sluice forget needs a keyed table",
                    schema.name
                );
            }
            continue;
        }
        if chosen.is_some() {
            bail!(
                "{} has several keyed tables: name one with --table",
                args.config.display()
            );
        }
        chosen = Some((table, schema));
    }
    let Some((table_config, schema)) = chosen else {
        bail!(
            "no keyed table{} in {}",
            args.table
                .as_deref()
                .map_or(String::new(), |t| format!(" named {t}")),
            args.config.display()
        );
    };
    let reason = args
        .reason
        .clone()
        .unwrap_or_else(|| format!("sluice forget at {}", chrono::Utc::now().to_rfc3339()));
    let mut requests = Vec::new();
    for key in &args.keys {
        requests.push(ForgetRequest {
            target: Forget::Key(parse_key(&schema, key)?),
            reason: reason.clone(),
        });
    }
    for author in &args.authors {
        requests.push(ForgetRequest {
            target: Forget::Author(author.clone()),
            reason: reason.clone(),
        });
    }
    if let Some(file) = &args.file {
        requests.extend(read_requests(&schema, file, &reason)?);
    }
    if requests.is_empty() {
        bail!("nothing to forget: give --key, --author or --file");
    }
    let keyed = keyed_table(&cfg, table_config)?.expect("the table is keyed");
    let options = ApplyOptions {
        owner: lease::owner_id(),
        lease_ttl: DEFAULT_LEASE_TTL,
        settings: table_settings(&cfg.delta),
        skip_when_idle: false,
    };
    let storage = cfg.storage_options();
    let applied = match forget(&keyed, &storage, &options, &requests).await? {
        ApplyOutcome::Applied(applied) => applied,
        ApplyOutcome::Busy { owner, expires_at } => {
            println!(
                "{}: lease held by {owner} until {expires_at}; nothing recorded, try again later",
                schema.name
            );
            return Ok(ExitCode::from(EXIT_LEASE_HELD));
        }
    };
    let name = &schema.name;
    let known = requests.len() as u64 - applied.forget_requests;
    println!(
        "{name}: {} erasure requests recorded{}; removed {} rows ({} files rewritten{}) and {} \
         dead letters ({} files rewritten){}",
        applied.forget_requests,
        if known > 0 {
            format!(" ({known} recorded before)")
        } else {
            String::new()
        },
        applied.forgotten,
        applied.files_rewritten,
        applied
            .version
            .map_or(String::new(), |v| format!(", version {v}")),
        applied.forgotten_dead_letters,
        applied.dead_letter_files_rewritten,
        if applied.dead_letters_pending > 0 {
            format!(
                "; {} dead letters wait for the dead-letter table's compaction lease (the next \
                 pass removes them)",
                applied.dead_letters_pending
            )
        } else {
            String::new()
        },
    );
    if applied.deleted + applied.replaced > 0 {
        println!(
            "{name}: the same pass removed {} rows of deleted posts and {} older versions",
            applied.deleted, applied.replaced
        );
    }
    println!(
        "{name}: recorded in {name}_deletions; every later pass (the service's maintenance, \
         sluice apply) removes rows and dead letters of these requests that arrive after them"
    );
    if args.purge_history {
        eprintln!(
            "warning: purging history: time travel to versions of {name} before this one, and \
             reads that started before, fail from now on"
        );
        let dead = dead_letters::table_name(name);
        let rows = purge_removed(&keyed.location, storage.clone()).await?;
        let letters = match purge_removed(&keyed.dead_letters_location, storage.clone()).await {
            Ok(report) => report.files,
            Err(e) if applied.forgotten_dead_letters == 0 => {
                tracing::debug!(error = %e, "no dead-letter table to purge");
                0
            }
            Err(e) => return Err(e.into()),
        };
        println!(
            "{name}: history purged: {} removed files deleted from {name}, {letters} from {dead}",
            rows.files
        );
    } else {
        println!(
            "{name}: earlier versions still hold the removed rows until vacuum deletes their \
             files (sluice vacuum, or the service's, after the retention: {} h by default); \
             --purge-history deletes them now",
            cfg.maintenance.vacuum_retention_h
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// A key from `column=value,...` (or a bare value for a one-column key), in the table's key
/// order.
fn parse_key(schema: &TableSchema, text: &str) -> anyhow::Result<Vec<String>> {
    let named = schema
        .key
        .iter()
        .any(|k| text.starts_with(&format!("{k}=")));
    if schema.key.len() == 1 && !named {
        return Ok(vec![text.to_string()]);
    }
    let mut values: Vec<Option<String>> = vec![None; schema.key.len()];
    for part in text.split(',') {
        let Some((column, value)) = part.split_once('=') else {
            bail!(
                "--key {text:?}: expected column=value for each key column ({}), joined by commas",
                schema.key.join(", ")
            );
        };
        let Some(i) = schema.key.iter().position(|k| k == column.trim()) else {
            bail!(
                "--key {text:?}: `{column}` is not a key column of {} ({})",
                schema.name,
                schema.key.join(", ")
            );
        };
        values[i] = Some(value.to_string());
    }
    values
        .into_iter()
        .zip(&schema.key)
        .map(|(v, k)| v.with_context(|| format!("--key {text:?}: no value for `{k}`")))
        .collect()
}

/// Requests from a JSON-lines file; blank lines and lines starting with `#` are skipped.
fn read_requests(
    schema: &TableSchema,
    file: &Path,
    reason: &str,
) -> anyhow::Result<Vec<ForgetRequest>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading requests from {}", file.display()))?;
    let mut requests = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{} line {}", file.display(), n + 1);
        let object: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(line).with_context(|| format!("{}: not a JSON object", at()))?;
        let value = |name: &str| -> anyhow::Result<Option<String>> {
            match object.get(name) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => bail!("{}: `{name}` is {other}, not a string or number", at()),
            }
        };
        for field in object.keys() {
            if field != "author" && field != "reason" && !schema.key.contains(field) {
                bail!(
                    "{}: `{field}` is neither `author`, `reason` nor a key column ({})",
                    at(),
                    schema.key.join(", ")
                );
            }
        }
        let author = value("author")?;
        let key: Vec<Option<String>> = schema
            .key
            .iter()
            .map(|k| value(k))
            .collect::<anyhow::Result<_>>()?;
        let target = match (author, key.iter().all(Option::is_some)) {
            (Some(_), _) if key.iter().any(Option::is_some) => {
                bail!("{}: name an author or a key, not both", at())
            }
            (Some(author), _) => Forget::Author(author),
            (None, true) => Forget::Key(key.into_iter().flatten().collect()),
            (None, false) => bail!(
                "{}: needs `author` or every key column ({})",
                at(),
                schema.key.join(", ")
            ),
        };
        requests.push(ForgetRequest {
            target,
            reason: value("reason")?.unwrap_or_else(|| reason.to_string()),
        });
    }
    Ok(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> TableSchema {
        TableSchema::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/schemas/enriched_posts.toml"
        )))
        .unwrap()
    }

    #[test]
    fn keys_name_every_key_column_in_any_order() {
        let s = schema();
        assert_eq!(
            parse_key(
                &s,
                "post_id=at://did:plc:a/app.bsky.feed.post/1,platform=bluesky"
            )
            .unwrap(),
            ["bluesky", "at://did:plc:a/app.bsky.feed.post/1"]
        );
        let missing = parse_key(&s, "post_id=1").unwrap_err().to_string();
        assert!(missing.contains("no value for `platform`"), "{missing}");
        let unknown = parse_key(&s, "platform=x,id=1").unwrap_err().to_string();
        assert!(unknown.contains("`id` is not a key column"), "{unknown}");
        let bare = parse_key(&s, "123").unwrap_err().to_string();
        assert!(bare.contains("expected column=value"), "{bare}");
    }

    #[test]
    fn request_files_name_an_author_or_a_whole_key() {
        let s = schema();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("requests.jsonl");
        std::fs::write(
            &file,
            "# GDPR batch 7\n{\"author\": \"did:plc:a\"}\n\n\
             {\"platform\": \"twitter\", \"post_id\": 42, \"reason\": \"DMCA 9\"}\n",
        )
        .unwrap();
        let requests = read_requests(&s, &file, "GDPR 7").unwrap();
        assert_eq!(
            requests,
            [
                ForgetRequest {
                    target: Forget::Author("did:plc:a".into()),
                    reason: "GDPR 7".into()
                },
                ForgetRequest {
                    target: Forget::Key(vec!["twitter".into(), "42".into()]),
                    reason: "DMCA 9".into()
                },
            ]
        );
        for (line, expected) in [
            (
                "{\"post_id\": \"1\"}",
                "line 1: needs `author` or every key column",
            ),
            (
                "{\"author\": \"a\", \"post_id\": \"1\"}",
                "line 1: name an author or a key, not both",
            ),
            ("{\"user\": \"a\"}", "line 1: `user` is neither"),
            ("author=a", "line 1: not a JSON object"),
        ] {
            std::fs::write(&file, line).unwrap();
            let error = format!("{:#}", read_requests(&s, &file, "r").unwrap_err());
            assert!(error.contains(expected), "{line}: {error}");
        }
    }
}
