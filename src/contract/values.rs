//! Contracts on values: what a column promises readers beyond its type (timestamps parsed from
//! every form upstreams send and within sane bounds, scores within their range, embeddings of
//! the right dimension). A violation rejects one message and names the field.

use deltalake::arrow::array::{Array, ArrayRef, AsArray, StringArray, TimestampMicrosecondArray};

/// The only timezone that maps to Delta's `timestamp` type (anything else becomes `timestamp_ntz`).
pub const UTC: &str = "UTC";
use deltalake::arrow::datatypes::{
    DataType, Float32Type, Float64Type, Int32Type, Int64Type, TimeUnit,
};

/// What a column promises; checked per row after decoding.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Contract {
    /// Inclusive bounds for every number in the column (also inside lists and structs);
    /// NaN and infinities are outside any range.
    pub range: Option<(f64, f64)>,
    /// Exact number of elements of a list column (an embedding's dimension).
    pub dimension: Option<usize>,
    /// Earliest acceptable timestamp, in microseconds since the epoch.
    pub not_before_us: Option<i64>,
    /// How far past the message's ingestion time a timestamp may lie, in microseconds.
    pub max_future_us: Option<i64>,
}

/// The first instant sluice stores: 0001-01-01T00:00:00Z, in microseconds since the epoch.
pub const FIRST_INSTANT_US: i64 = -62_135_596_800_000_000;
/// The last instant sluice stores: 9999-12-31T23:59:59.999999Z. Dates outside years 1 to 9999
/// have no `YYYY-MM-DD` partition value, and delta-rs panics building one.
pub const LAST_INSTANT_US: i64 = 253_402_300_799_999_999;
/// How a value outside [`FIRST_INSTANT_US`]..=[`LAST_INSTANT_US`] is described.
pub const INSTANT_RANGE: &str = "0001-01-01..9999-12-31";

/// Whether an instant (microseconds since the epoch) lies in years 1 to 9999.
pub fn instant_in_range(micros: i64) -> bool {
    (FIRST_INSTANT_US..=LAST_INSTANT_US).contains(&micros)
}

/// A Kafka timestamp (milliseconds) in microseconds, or `None` outside years 1 to 9999 (a
/// producer can set any 64-bit CreateTime; above ~9.2e15 ms the microseconds overflow).
pub fn kafka_micros(ms: i64) -> Option<i64> {
    ms.checked_mul(1_000).filter(|&us| instant_in_range(us))
}

/// Parses a timestamp the way upstreams really send it, to microseconds since the epoch (UTC).
///
/// Accepted: RFC 3339 with `Z` or an offset (also with a space instead of `T`), the same without
/// an offset (taken as UTC), a bare date, Twitter v1's `Wed Oct 10 20:19:24 +0000 2018`, and
/// epoch numbers. `unit` says what an epoch number counts; without it the unit follows from
/// the magnitude (seconds below 10^11, then milliseconds, microseconds, nanoseconds), which is
/// unambiguous for any date between 1973 and 5138.
pub fn parse_timestamp(text: &str, unit: Option<TimeUnit>) -> Result<i64, String> {
    let text = text.trim();
    if text.starts_with(|c: char| c.is_ascii_digit() || c == '-')
        && text
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E'))
        && !text[1..].contains('-')
    {
        return epoch_micros(text, unit);
    }
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.timestamp_micros());
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"] {
        if let Ok(t) = DateTime::parse_from_str(text, format) {
            return Ok(t.timestamp_micros());
        }
    }
    if let Ok(t) = DateTime::parse_from_str(text, "%a %b %d %H:%M:%S %z %Y") {
        return Ok(t.timestamp_micros());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_micros());
    }
    Err(format!("`{}` is not a timestamp", truncate(text, 64)))
}

fn epoch_micros(text: &str, unit: Option<TimeUnit>) -> Result<i64, String> {
    let out_of_range = || format!("`{}` is out of the timestamp range", truncate(text, 64));
    let by_magnitude = |v: f64| match v.abs() {
        v if v < 1e11 => TimeUnit::Second,
        v if v < 1e14 => TimeUnit::Millisecond,
        v if v < 1e17 => TimeUnit::Microsecond,
        _ => TimeUnit::Nanosecond,
    };
    // Integers stay exact; fractions (`1740823200.5`) go through f64.
    if let Ok(n) = text.parse::<i64>() {
        let micros = match unit.unwrap_or_else(|| by_magnitude(n as f64)) {
            TimeUnit::Second => n.checked_mul(1_000_000),
            TimeUnit::Millisecond => n.checked_mul(1_000),
            TimeUnit::Microsecond => Some(n),
            TimeUnit::Nanosecond => Some(n / 1_000),
        };
        return micros.ok_or_else(out_of_range);
    }
    let value: f64 = text
        .parse()
        .map_err(|_| format!("`{}` is not a number", truncate(text, 64)))?;
    if !value.is_finite() {
        return Err(format!("`{}` is not a finite number", truncate(text, 64)));
    }
    let micros = match unit.unwrap_or_else(|| by_magnitude(value)) {
        TimeUnit::Second => value * 1e6,
        TimeUnit::Millisecond => value * 1e3,
        TimeUnit::Microsecond => value,
        TimeUnit::Nanosecond => value / 1e3,
    };
    if micros.abs() >= 9.2e18 {
        return Err(out_of_range());
    }
    Ok(micros.round() as i64)
}

/// Parses a duration such as `30s`, `15m`, `24h` or `7d` to microseconds.
pub fn parse_duration_us(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("`{text}` needs a unit (s, m, h or d)"))?;
    let (number, unit) = text.split_at(split);
    let n: i64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 15m, 24h or 7d"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "`{text}` has an unknown unit (expected s, m, h or d)"
            ));
        }
    };
    Ok(n * seconds * 1_000_000)
}

/// Converts a column of timestamp texts; rows that do not parse are null and reported.
pub fn timestamps_from_text(
    texts: &StringArray,
    unit: Option<TimeUnit>,
    column: &str,
) -> (TimestampMicrosecondArray, Vec<(usize, String)>) {
    let mut errors = Vec::new();
    let values = texts.iter().enumerate().map(|(row, text)| {
        let text = text?;
        match parse_timestamp(text, unit) {
            Ok(micros) => Some(micros),
            Err(e) => {
                errors.push((row, format!("`{column}`: {e}")));
                None
            }
        }
    });
    let array = TimestampMicrosecondArray::from_iter(values).with_timezone(UTC);
    (array, errors)
}

/// Which promise a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broken {
    /// A number outside the column's range.
    Range,
    /// A list of the wrong length.
    Dimension,
    /// A timestamp outside the column's window.
    TimeWindow,
}

/// Rows of `array` that break `contract`, with what they broke and a detail naming the field.
pub fn violations(
    array: &ArrayRef,
    contract: &Contract,
    column: &str,
    ingested_at_us: i64,
) -> Vec<(usize, Broken, String)> {
    let mut out = Vec::new();
    if let Some((min, max)) = contract.range {
        let mut ranged = Vec::new();
        range_violations(array.as_ref(), min, max, column, &mut ranged);
        out.extend(ranged.into_iter().map(|(r, d)| (r, Broken::Range, d)));
    }
    if let Some(dim) = contract.dimension
        && let Some(list) = array.as_list_opt::<i32>()
    {
        for row in 0..list.len() {
            let len = list.value_length(row) as usize;
            if list.is_valid(row) && len != dim {
                out.push((
                    row,
                    Broken::Dimension,
                    format!("`{column}` has {len} values, the schema expects {dim}"),
                ));
            }
        }
    }
    if let Some(ts) = array.as_any().downcast_ref::<TimestampMicrosecondArray>() {
        for (row, value) in ts.iter().enumerate() {
            let Some(v) = value else { continue };
            if let Some(min) = contract.not_before_us
                && v < min
            {
                out.push((
                    row,
                    Broken::TimeWindow,
                    format!(
                        "`{column}` is {}, before the earliest accepted {}",
                        micros_to_text(v),
                        micros_to_text(min)
                    ),
                ));
            } else if let Some(ahead) = contract.max_future_us
                && v > ingested_at_us.saturating_add(ahead)
            {
                out.push((
                    row,
                    Broken::TimeWindow,
                    format!(
                        "`{column}` is {}, more than {}s in the future",
                        micros_to_text(v),
                        ahead / 1_000_000
                    ),
                ));
            }
        }
    }
    out
}

/// Appends (element index, detail) for numbers outside `[min, max]` at any depth of `array`.
fn range_violations(
    array: &dyn Array,
    min: f64,
    max: f64,
    path: &str,
    out: &mut Vec<(usize, String)>,
) {
    let mut check = |row: usize, v: f64| {
        // NaN is outside every range.
        if v.is_nan() || v < min || v > max {
            out.push((row, format!("`{path}` is {v}, outside [{min}, {max}]")));
        }
    };
    match array.data_type() {
        DataType::Float64 => {
            let a = array.as_primitive::<Float64Type>();
            (0..a.len())
                .filter(|&r| a.is_valid(r))
                .for_each(|r| check(r, a.value(r)));
        }
        DataType::Float32 => {
            let a = array.as_primitive::<Float32Type>();
            (0..a.len())
                .filter(|&r| a.is_valid(r))
                .for_each(|r| check(r, f64::from(a.value(r))));
        }
        DataType::Int64 => {
            let a = array.as_primitive::<Int64Type>();
            (0..a.len())
                .filter(|&r| a.is_valid(r))
                .for_each(|r| check(r, a.value(r) as f64));
        }
        DataType::Int32 => {
            let a = array.as_primitive::<Int32Type>();
            (0..a.len())
                .filter(|&r| a.is_valid(r))
                .for_each(|r| check(r, f64::from(a.value(r))));
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let mut inner = Vec::new();
            range_violations(list.values().as_ref(), min, max, path, &mut inner);
            let offsets = list.value_offsets();
            for (element, detail) in inner {
                // The row whose slice [offsets[row], offsets[row + 1]) holds the element.
                let row = offsets.partition_point(|&o| o as usize <= element) - 1;
                if row < list.len() && list.is_valid(row) {
                    out.push((row, detail));
                }
            }
        }
        DataType::Struct(fields) => {
            let s = array.as_struct();
            for (field, child) in fields.iter().zip(s.columns()) {
                let mut inner = Vec::new();
                let child_path = format!("{path}.{}", field.name());
                range_violations(child.as_ref(), min, max, &child_path, &mut inner);
                out.extend(inner.into_iter().filter(|(row, _)| s.is_valid(*row)));
            }
        }
        _ => {}
    }
}

fn micros_to_text(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
        .unwrap_or_else(|| format!("{micros}µs"))
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kafka_timestamps_beyond_year_9999_or_the_i64_microseconds_have_no_instant() {
        use super::*;
        assert_eq!(kafka_micros(1_740_823_200_000), Some(1_740_823_200_000_000));
        assert_eq!(
            kafka_micros(LAST_INSTANT_US / 1_000),
            Some(LAST_INSTANT_US - 999)
        );
        assert_eq!(kafka_micros(8_300_000_000_000_000), None);
        assert_eq!(
            kafka_micros(9_300_000_000_000_000),
            None,
            "overflows i64 µs"
        );
        assert_eq!(kafka_micros(i64::MIN), None);
        assert!(instant_in_range(FIRST_INSTANT_US) && !instant_in_range(FIRST_INSTANT_US - 1));
    }

    use std::sync::Arc;

    use deltalake::arrow::array::{Float64Array, ListArray, StructArray};
    use deltalake::arrow::datatypes::{Field, Float32Type};

    use super::*;

    const T: i64 = 1_740_823_200_000_000; // 2025-03-01T10:00:00Z

    #[test]
    fn every_upstream_timestamp_form_parses_to_the_same_instant() {
        for text in [
            "2025-03-01T10:00:00Z",
            "2025-03-01T10:00:00.000Z",
            "2025-03-01T11:00:00+01:00",
            "2025-03-01T05:00:00-05:00",
            "2025-03-01 10:00:00Z",
            "2025-03-01 10:00:00+00:00",
            "2025-03-01T10:00:00",
            "Sat Mar 01 10:00:00 +0000 2025",
            "1740823200",
            "1740823200000",
            "1740823200000000",
            "1740823200000000000",
            "1740823200.0",
        ] {
            assert_eq!(parse_timestamp(text, None), Ok(T), "{text}");
        }
        assert_eq!(parse_timestamp("2025-03-01", None), Ok(T - 36_000_000_000));
        assert_eq!(
            parse_timestamp("1740823200000", Some(TimeUnit::Millisecond)),
            Ok(T)
        );
        assert_eq!(
            parse_timestamp("1740823200000123", Some(TimeUnit::Microsecond)),
            Ok(T + 123)
        );
    }

    #[test]
    fn garbage_timestamps_are_explained() {
        for text in ["yesterday", "2025-13-01T00:00:00Z", "", "12:00", "1e400"] {
            let err = parse_timestamp(text, None).unwrap_err();
            assert!(
                err.contains("not a") || err.contains("range"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn ranges_reach_into_lists_and_structs() {
        let scores: ArrayRef = Arc::new(Float64Array::from(vec![
            Some(0.5),
            Some(1.5),
            None,
            Some(f64::NAN),
        ]));
        let c = Contract {
            range: Some((0.0, 1.0)),
            ..Contract::default()
        };
        let v = violations(&scores, &c, "toxicity", 0);
        assert_eq!(v.iter().map(|(r, _, _)| *r).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(v[0].2, "`toxicity` is 1.5, outside [0, 1]");

        let labels: ArrayRef = Arc::new(StructArray::from(vec![(
            Arc::new(Field::new("insult", DataType::Float64, true)),
            Arc::new(Float64Array::from(vec![0.1, -0.2])) as ArrayRef,
        )]));
        let v = violations(&labels, &c, "toxicity_labels", 0);
        assert_eq!(
            v,
            vec![(
                1,
                Broken::Range,
                "`toxicity_labels.insult` is -0.2, outside [0, 1]".into()
            )]
        );

        let embedding: ArrayRef =
            Arc::new(ListArray::from_iter_primitive::<Float32Type, _, _>(vec![
                Some(vec![Some(0.1), Some(0.2)]),
                None,
                Some(vec![Some(0.3)]),
                Some(vec![Some(9.0), Some(0.0)]),
            ]));
        let c = Contract {
            range: Some((-1.0, 1.0)),
            dimension: Some(2),
            ..Contract::default()
        };
        let v = violations(&embedding, &c, "embedding", 0);
        assert_eq!(
            v,
            vec![
                (3, Broken::Range, "`embedding` is 9, outside [-1, 1]".into()),
                (
                    2,
                    Broken::Dimension,
                    "`embedding` has 1 values, the schema expects 2".into()
                ),
            ]
        );
    }

    #[test]
    fn timestamps_outside_their_window_are_reported() {
        let ts: ArrayRef = Arc::new(
            TimestampMicrosecondArray::from(vec![T, 0, T + 3 * 86_400_000_000]).with_timezone(UTC),
        );
        let c = Contract {
            not_before_us: Some(parse_timestamp("2006-01-01T00:00:00Z", None).unwrap()),
            max_future_us: Some(parse_duration_us("1d").unwrap()),
            ..Contract::default()
        };
        let v = violations(&ts, &c, "created_at", T);
        assert_eq!(v.len(), 2);
        assert!(v.iter().all(|(_, b, _)| *b == Broken::TimeWindow));
        assert!(
            v[0].2
                .contains("before the earliest accepted 2006-01-01T00:00:00Z"),
            "{}",
            v[0].2
        );
        assert!(
            v[1].2.contains("more than 86400s in the future"),
            "{}",
            v[1].2
        );
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration_us("90s"), Ok(90_000_000));
        assert_eq!(parse_duration_us("2h"), Ok(7_200_000_000));
        assert!(parse_duration_us("10").is_err());
        assert!(parse_duration_us("3w").is_err());
    }
}
