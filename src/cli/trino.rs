//! `sluice trino-sql`: prints the Trino SQL that registers the tables, or registers them
//! through a coordinator with `--server`.

use std::path::PathBuf;
use std::process::ExitCode;

use sluice::query::trino::{Client, Outcome, Target, register, registration_sql};

use super::load_config;

/// `sluice trino-sql` flags.
#[derive(clap::Args)]
pub struct TrinoSqlArgs {
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
}

/// Runs `sluice trino-sql`.
pub async fn run(args: TrinoSqlArgs) -> anyhow::Result<ExitCode> {
    let TrinoSqlArgs {
        config,
        catalog,
        schema,
        server,
        user,
    } = args;
    let cfg = load_config(&config, None)?;
    let tables = sluice::service::app::check(&cfg)?;
    let target = Target { catalog, schema };
    if let Some(server) = server {
        // Password authentication: the password only from the environment.
        let password = std::env::var("TRINO_PASSWORD")
            .ok()
            .filter(|p| !p.is_empty());
        let client = Client::new(&server, &user, password)?;
        for done in register(&client, &cfg, &tables, &target).await? {
            let what = match done.outcome {
                Outcome::Registered => "registered",
                Outcome::AlreadyThere => "already registered",
            };
            println!("{what}: {} at {}", done.name, done.location);
        }
    } else {
        let source = config.file_name().map_or_else(
            || config.display().to_string(),
            |name| name.to_string_lossy().into_owned(),
        );
        print!("{}", registration_sql(&cfg, &tables, &target, &source)?);
    }
    Ok(ExitCode::SUCCESS)
}
