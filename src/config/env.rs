//! `SLUICE_*` environment overrides: `SLUICE_SECTION__KEY` sets a key of the file, and
//! `SLUICE_KAFKA__PROPERTIES__*` sets librdkafka properties (secrets belong here, never in files).

use std::collections::BTreeMap;

use super::ConfigError;

/// Prefix of environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "SLUICE_";

/// Prefix of the environment variables that set librdkafka properties.
pub const KAFKA_PROPERTIES_ENV: &str = "SLUICE_KAFKA__PROPERTIES__";

/// The librdkafka properties that `SLUICE_KAFKA__PROPERTIES__*` variables of `env` set, for
/// commands that reach a cluster without a config file (`sluice produce`, `sluice bench`).
pub fn kafka_properties_from_env(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut root = toml::Table::new();
    apply_env(
        &mut root,
        env.into_iter()
            .filter(|(k, _)| k.starts_with(KAFKA_PROPERTIES_ENV)),
    )?;
    let properties = root
        .get("kafka")
        .and_then(|k| k.get("properties"))
        .and_then(toml::Value::as_table)
        .map(|t| {
            t.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    Ok(properties)
}

/// Applies `SLUICE_*` overrides; returns the names of the variables applied.
pub(super) fn apply_env(
    root: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.contains("__"))
        .collect();
    vars.sort();
    let applied = vars.iter().map(|(k, _)| k.clone()).collect();
    for (var, raw) in vars {
        let rest = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let mut path: Vec<String> = rest.split("__").map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(ConfigError::Env {
                var,
                message: "empty key segment".into(),
            });
        }
        if path.len() == 3 && path[0] == "kafka" && path[1] == "properties" {
            path[2] = path[2].replace('_', ".");
        }
        let is_property = path.len() == 3 && path[1] == "properties";
        let value = if is_property {
            toml::Value::String(raw)
        } else {
            parse_scalar(&raw)
        };
        let (last, parents) = path
            .split_last()
            .expect("split yields at least one segment");
        let mut table = &mut *root;
        for key in parents {
            let entry = table
                .entry(key.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!("`{key}` is not a table in the config file"),
            })?;
        }
        table.insert(last.clone(), value);
    }
    Ok(applied)
}

/// Reads an environment value as a TOML scalar when it is one (`42`, `true`), else a string.
fn parse_scalar(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .filter(|v| !v.is_table())
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}
