//! Time travel inside a statement: `version_as_of('table', 12)` and
//! `timestamp_as_of('table', '2026-11-20T12:00:00Z')` read an older state of a registered table.
//!
//! DataFusion plans table functions synchronously, while loading a Delta version is I/O. So
//! before a statement is planned, [`Travel::prepare`] finds these calls in its syntax tree and
//! loads each requested state; the table functions then only look the state up.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use deltalake::datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use deltalake::datafusion::common::{Result, ScalarValue, plan_err};
use deltalake::datafusion::logical_expr::Expr;
use deltalake::datafusion::prelude::SessionContext;
use deltalake::datafusion::sql::parser::Statement;
use deltalake::datafusion::sql::sqlparser::ast::{
    Expr as SqlExpr, FunctionArg, FunctionArgExpr, Value,
};

use super::{AsOf, SqlError, load, table_function_calls};
use crate::contract::values::parse_timestamp;
use crate::table::delta::table_provider;

const VERSION_AS_OF: &str = "version_as_of";
const TIMESTAMP_AS_OF: &str = "timestamp_as_of";

/// A table state a statement asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TravelKey {
    table: String,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum State {
    Version(i64),
    /// Microseconds since the epoch.
    Timestamp(i64),
}

type Loaded = Arc<Mutex<HashMap<TravelKey, Arc<dyn TableProvider>>>>;

/// The registered tables' locations and the states loaded so far.
pub(super) struct Travel {
    storage_options: HashMap<String, String>,
    /// Location per lower-cased table name.
    locations: BTreeMap<String, String>,
    loaded: Loaded,
}

impl Travel {
    /// Time travel over `tables` (name, location).
    pub(super) fn new(
        storage_options: HashMap<String, String>,
        tables: impl IntoIterator<Item = (String, String)>,
    ) -> Self {
        Travel {
            storage_options,
            locations: tables
                .into_iter()
                .map(|(name, location)| (name.to_ascii_lowercase(), location))
                .collect(),
            loaded: Loaded::default(),
        }
    }

    /// Registers the two table functions.
    pub(super) fn register(&self, ctx: &SessionContext) {
        for function in [VERSION_AS_OF, TIMESTAMP_AS_OF] {
            ctx.register_udtf(
                function,
                Arc::new(AsOfFunction {
                    function,
                    loaded: self.loaded.clone(),
                }),
            );
        }
    }

    /// Loads every table state `statement` asks for that is not loaded yet.
    pub(super) async fn prepare(
        &self,
        ctx: &SessionContext,
        statement: &Statement,
    ) -> Result<(), SqlError> {
        let mut wanted = Vec::new();
        let mut malformed = None;
        table_function_calls(statement, |function, args| {
            if function != VERSION_AS_OF && function != TIMESTAMP_AS_OF {
                return;
            }
            let texts: Vec<Option<String>> = args.iter().map(sql_literal).collect();
            match key(function, &texts) {
                Ok(k) => wanted.push(k),
                Err(e) => malformed = Some(e),
            }
        });
        if let Some(e) = malformed {
            return Err(SqlError::TimeTravel(e));
        }
        for key in wanted {
            if self.loaded.lock().expect("lock").contains_key(&key) {
                continue;
            }
            let location = self.location(&key.table)?;
            let state = match key.state {
                State::Version(v) => AsOf::Version(v),
                State::Timestamp(us) => {
                    AsOf::Timestamp(chrono::DateTime::from_timestamp_micros(us).ok_or_else(
                        || SqlError::TimeTravel(format!("timestamp {us} µs is out of range")),
                    )?)
                }
            };
            let table = load(&location, &self.storage_options, state)
                .await
                .map_err(|e| SqlError::TimeTravel(format!("{} {:?}: {e}", key.table, key.state)))?;
            let open_error = |source: deltalake::DeltaTableError| SqlError::Open {
                table: key.table.clone(),
                location: location.clone(),
                source: source.into(),
            };
            table
                .update_datafusion_session(&ctx.state())
                .map_err(open_error)?;
            let provider = table_provider(&table).await.map_err(open_error)?;
            self.loaded.lock().expect("lock").insert(key, provider);
        }
        Ok(())
    }

    fn location(&self, table: &str) -> Result<String, SqlError> {
        self.locations.get(table).cloned().ok_or_else(|| {
            SqlError::TimeTravel(format!(
                "no table {table}; tables: {}",
                self.locations
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }
}

/// The text of a literal argument as written in SQL.
fn sql_literal(arg: &FunctionArg) -> Option<String> {
    match arg {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(SqlExpr::Value(v))) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => Some(s.clone()),
            Value::Number(n, _) => Some(n.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// The text of a literal argument as DataFusion planned it.
fn plan_literal(expr: &Expr) -> Option<String> {
    match expr {
        Expr::Literal(value, _) => match value {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::Utf8View(Some(s))
            | ScalarValue::LargeUtf8(Some(s)) => Some(s.clone()),
            ScalarValue::Int8(Some(_))
            | ScalarValue::Int16(Some(_))
            | ScalarValue::Int32(Some(_))
            | ScalarValue::Int64(Some(_))
            | ScalarValue::UInt8(Some(_))
            | ScalarValue::UInt16(Some(_))
            | ScalarValue::UInt32(Some(_))
            | ScalarValue::UInt64(Some(_)) => Some(value.to_string()),
            _ => None,
        },
        _ => None,
    }
}

fn usage(function: &str) -> String {
    match function {
        VERSION_AS_OF => format!("{function}('table', version): the version is a whole number"),
        _ => format!("{function}('table', 'timestamp'): for example '2026-11-20T12:00:00Z'"),
    }
}

fn key(function: &str, args: &[Option<String>]) -> Result<TravelKey, String> {
    let [Some(table), Some(spec)] = args else {
        return Err(usage(function));
    };
    let state = if function == VERSION_AS_OF {
        State::Version(spec.trim().parse().map_err(|_| usage(function))?)
    } else {
        State::Timestamp(
            parse_timestamp(spec, None).map_err(|e| format!("{}: {e}", usage(function)))?,
        )
    };
    Ok(TravelKey {
        table: table.to_ascii_lowercase(),
        state,
    })
}

#[derive(Debug)]
struct AsOfFunction {
    function: &'static str,
    loaded: Loaded,
}

impl TableFunctionImpl for AsOfFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let texts: Vec<Option<String>> = args.exprs().iter().map(plan_literal).collect();
        let key = match key(self.function, &texts) {
            Ok(key) => key,
            Err(e) => return plan_err!("{e}"),
        };
        match self.loaded.lock().expect("lock").get(&key) {
            Some(provider) => Ok(provider.clone()),
            None => plan_err!(
                "{} state {:?} was not loaded before planning; use literal arguments",
                key.table,
                key.state
            ),
        }
    }
}
