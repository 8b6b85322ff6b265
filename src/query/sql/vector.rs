//! Vector functions for embedding columns, with Trino's names and semantics, so a
//! nearest-neighbour query runs unchanged on `sluice sql` and on Trino.
//!
//! | function | result |
//! |---|---|
//! | `cosine_similarity(x, y)` | `x·y / (‖x‖ ‖y‖)` |
//! | `cosine_distance(x, y)` | `1 − cosine_similarity(x, y)` |
//! | `dot_product(x, y)` | `x·y` |
//! | `euclidean_distance(x, y)` | `‖x − y‖` |
//!
//! Arguments are arrays of any numeric type (`array<float>` embeddings included), computed in
//! double precision like Trino's `array(double)` signatures. As in Trino: a null array gives
//! null, arrays of different lengths are an error, and a zero-length vector has no cosine (an
//! error, "Vector magnitude cannot be zero"). A null element gives null (Trino does so for the
//! cosine functions). These replace DataFusion's own `cosine_distance` and `dot_product`, which
//! return null for a zero vector.

use std::sync::Arc;

use deltalake::arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, Float64Builder, GenericListArray,
};
use deltalake::arrow::compute::cast;
use deltalake::arrow::datatypes::{DataType, Field, Float32Type, Float64Type};
use deltalake::datafusion::common::{DataFusionError, Result, ScalarValue, exec_err, plan_err};
use deltalake::datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};

/// Which vector function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    CosineSimilarity,
    CosineDistance,
    DotProduct,
    EuclideanDistance,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::CosineSimilarity => "cosine_similarity",
            Kind::CosineDistance => "cosine_distance",
            Kind::DotProduct => "dot_product",
            Kind::EuclideanDistance => "euclidean_distance",
        }
    }

    /// The value for one pair of equal-length vectors without nulls.
    fn compute(self, x: &[f64], y: &[f64]) -> Result<f64> {
        let dot = || x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        match self {
            Kind::DotProduct => Ok(dot()),
            Kind::EuclideanDistance => Ok(x
                .iter()
                .zip(y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt()),
            Kind::CosineSimilarity | Kind::CosineDistance => {
                let xx: f64 = x.iter().map(|a| a * a).sum();
                let yy: f64 = y.iter().map(|b| b * b).sum();
                if xx == 0.0 || yy == 0.0 {
                    return exec_err!("{}: Vector magnitude cannot be zero", self.name());
                }
                let similarity = dot() / (xx * yy).sqrt();
                Ok(match self {
                    Kind::CosineDistance => 1.0 - similarity,
                    _ => similarity,
                })
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct VectorFunction {
    kind: Kind,
    signature: Signature,
}

/// The four functions, ready for `SessionContext::register_udf`.
pub fn functions() -> Vec<ScalarUDF> {
    [
        Kind::CosineSimilarity,
        Kind::CosineDistance,
        Kind::DotProduct,
        Kind::EuclideanDistance,
    ]
    .into_iter()
    .map(|kind| {
        ScalarUDF::new_from_impl(VectorFunction {
            kind,
            signature: Signature::user_defined(Volatility::Immutable),
        })
    })
    .collect()
}

fn double_list() -> DataType {
    list_of(DataType::Float64)
}

fn list_of(element: DataType) -> DataType {
    DataType::List(Arc::new(Field::new_list_field(element, true)))
}

/// The type an argument is read as: `array<float>` (embeddings) as it is, widened per
/// element while computing; every other numeric array as `array<double>`.
fn argument_type(arg: &DataType) -> DataType {
    match arg {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _)
            if f.data_type() == &DataType::Float32 =>
        {
            list_of(DataType::Float32)
        }
        _ => double_list(),
    }
}

/// One argument's vectors, read in place from the list's flat values: no array per row and
/// no widened copy of the column.
struct Vectors<'a> {
    list: &'a GenericListArray<i32>,
    values: Values<'a>,
    /// A scalar argument: row 0 for every row.
    broadcast: bool,
}

enum Values<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// What one row of an argument holds.
enum Row {
    Null,
    NullElement,
    /// The vector, widened into the caller's buffer.
    Vector,
}

impl<'a> Vectors<'a> {
    fn new(array: &'a ArrayRef, broadcast: bool) -> Vectors<'a> {
        let list = array.as_list::<i32>();
        let values = match list.values().data_type() {
            DataType::Float32 => Values::F32(list.values().as_primitive::<Float32Type>().values()),
            _ => Values::F64(list.values().as_primitive::<Float64Type>().values()),
        };
        Vectors {
            list,
            values,
            broadcast,
        }
    }

    /// The list row standing for result row `row`.
    fn index(&self, row: usize) -> usize {
        if self.broadcast { 0 } else { row }
    }

    fn row(&self, row: usize, out: &mut Vec<f64>) -> Row {
        let row = self.index(row);
        if self.list.is_null(row) {
            return Row::Null;
        }
        let offsets = self.list.value_offsets();
        let (start, end) = (offsets[row] as usize, offsets[row + 1] as usize);
        if let Some(nulls) = self.list.values().nulls()
            && nulls.slice(start, end - start).null_count() > 0
        {
            return Row::NullElement;
        }
        out.clear();
        match self.values {
            Values::F32(v) => out.extend(v[start..end].iter().map(|&x| f64::from(x))),
            Values::F64(v) => out.extend_from_slice(&v[start..end]),
        }
        Row::Vector
    }
}

impl ScalarUDFImpl for VectorFunction {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn coerce_types(&self, args: &[DataType]) -> Result<Vec<DataType>> {
        if args.len() != 2 {
            return plan_err!(
                "{} takes two arrays, got {} arguments",
                self.name(),
                args.len()
            );
        }
        for arg in args {
            let numeric = match arg {
                DataType::Null => true,
                DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => {
                    f.data_type().is_numeric() || f.data_type() == &DataType::Null
                }
                _ => false,
            };
            if !numeric {
                return plan_err!("{} takes arrays of numbers, not {arg}", self.name());
            }
        }
        Ok(args.iter().map(argument_type).collect())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let broadcast: Vec<bool> = args
            .args
            .iter()
            .map(|a| matches!(a, ColumnarValue::Scalar(_)))
            .collect();
        let mut arrays = Vec::with_capacity(args.args.len());
        for arg in &args.args {
            arrays.push(match arg {
                ColumnarValue::Array(a) => a.clone(),
                ColumnarValue::Scalar(s) => s.to_array()?,
            });
        }
        let all_scalar = broadcast.iter().all(|b| *b);
        let rows = if all_scalar { 1 } else { args.number_rows };
        let result = self.evaluate(&arrays[0], &arrays[1], [broadcast[0], broadcast[1]], rows)?;
        if all_scalar {
            Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
                &result, 0,
            )?))
        } else {
            Ok(ColumnarValue::Array(result))
        }
    }
}

impl VectorFunction {
    /// `rows` results; a `broadcast` argument is one row standing for all.
    fn evaluate(
        &self,
        left: &ArrayRef,
        right: &ArrayRef,
        broadcast: [bool; 2],
        rows: usize,
    ) -> Result<ArrayRef> {
        let readable = |a: &ArrayRef| -> Result<ArrayRef> {
            let wanted = argument_type(a.data_type());
            Ok(if a.data_type() == &wanted {
                a.clone()
            } else {
                cast(a, &wanted)?
            })
        };
        let (left, right) = (readable(left)?, readable(right)?);
        let (left, right) = (
            Vectors::new(&left, broadcast[0]),
            Vectors::new(&right, broadcast[1]),
        );
        let (mut x, mut y) = (Vec::new(), Vec::new());
        let mut out = Float64Builder::with_capacity(rows);
        for row in 0..rows {
            match (left.row(row, &mut x), right.row(row, &mut y)) {
                (Row::Null, _) | (_, Row::Null) => {
                    out.append_null();
                    continue;
                }
                (Row::Vector, Row::Vector) if x.len() == y.len() => {
                    out.append_value(self.kind.compute(&x, &y)?);
                    continue;
                }
                _ => {}
            }
            let (lx, ly) = (
                left.list.value_length(left.index(row)),
                right.list.value_length(right.index(row)),
            );
            if lx != ly {
                return Err(DataFusionError::Execution(format!(
                    "{}: the arguments must have the same length, got {lx} and {ly}",
                    self.name(),
                )));
            }
            // Equal lengths, one has a null element.
            out.append_null();
        }
        let result: Float64Array = out.finish();
        Ok(Arc::new(result))
    }
}

#[cfg(test)]
mod tests {
    use deltalake::datafusion::prelude::SessionContext;

    use super::*;

    /// The first column of `sql`'s result (in a session with the vector functions), as doubles.
    async fn column(sql: &str) -> Result<Float64Array> {
        let ctx = SessionContext::new();
        for f in functions() {
            ctx.register_udf(f);
        }
        let batches = ctx.sql(sql).await?.collect().await?;
        let values = cast(batches[0].column(0), &DataType::Float64)?;
        Ok(values.as_primitive::<Float64Type>().clone())
    }

    async fn one(sql: &str) -> Result<Option<f64>> {
        let values = column(sql).await?;
        Ok((!values.is_null(0)).then(|| values.value(0)))
    }

    fn close(got: Option<f64>, want: f64) {
        let got = got.expect("a value, not null");
        assert!((got - want).abs() < 1e-12, "got {got}, want {want}");
    }

    #[tokio::test]
    async fn values_match_trino_definitions() {
        close(
            one("SELECT cosine_similarity([1.0, 0.0], [0.0, 1.0])")
                .await
                .unwrap(),
            0.0,
        );
        close(
            one("SELECT cosine_similarity([1, 2, 3], [2, 4, 6])")
                .await
                .unwrap(),
            1.0,
        );
        close(
            one("SELECT cosine_distance([1.0, 0.0], [-1.0, 0.0])")
                .await
                .unwrap(),
            2.0,
        );
        close(
            one("SELECT dot_product([1, 2, 3], [4, 5, 6])")
                .await
                .unwrap(),
            32.0,
        );
        close(
            one("SELECT euclidean_distance([0, 0], [3, 4])")
                .await
                .unwrap(),
            5.0,
        );
        // Float arrays, as embeddings are stored, compute in double precision.
        close(
            one("SELECT dot_product(arrow_cast([0.5, 0.25], 'List(Float32)'), [2.0, 4.0])")
                .await
                .unwrap(),
            2.0,
        );
    }

    #[tokio::test]
    async fn nulls_lengths_and_zero_vectors_behave_as_in_trino() {
        assert_eq!(
            one("SELECT cosine_similarity(NULL, [1.0])").await.unwrap(),
            None
        );
        assert_eq!(
            one("SELECT cosine_similarity([1.0, NULL], [1.0, 2.0])")
                .await
                .unwrap(),
            None
        );
        let mismatch = one("SELECT dot_product([1.0, 2.0], [1.0])")
            .await
            .unwrap_err();
        assert!(
            mismatch
                .to_string()
                .contains("must have the same length, got 2 and 1"),
            "{mismatch}"
        );
        let zero = one("SELECT cosine_distance([0.0, 0.0], [1.0, 2.0])")
            .await
            .unwrap_err();
        assert!(
            zero.to_string().contains("Vector magnitude cannot be zero"),
            "{zero}"
        );
        let text = one("SELECT cosine_similarity(['a'], ['b'])")
            .await
            .unwrap_err();
        assert!(
            text.to_string().contains("takes arrays of numbers"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn float_columns_row_by_row_with_null_vectors_and_elements() {
        let s = column(
            "SELECT cosine_similarity(arrow_cast(v, 'List(Float32)'), \
                                      arrow_cast(w, 'List(Float32)')) AS s FROM \
             (VALUES (1, [1.0, 0.0], [2.0, 0.0]), (2, [1.0, NULL], [1.0, 1.0]), \
                     (3, NULL, [1.0, 1.0]), (4, [3.0, 4.0], [4.0, 3.0])) AS t(i, v, w) \
             ORDER BY i",
        )
        .await
        .unwrap();
        assert_eq!(s.value(0), 1.0);
        assert!(s.is_null(1) && s.is_null(2));
        assert!((s.value(3) - 0.96).abs() < 1e-12, "{}", s.value(3));
    }

    #[tokio::test]
    async fn works_row_by_row_on_columns() {
        let d = column(
            "SELECT euclidean_distance(v, [0.0, 0.0]) AS d FROM \
             (VALUES ([3.0, 4.0]), ([6.0, 8.0]), (NULL)) AS t(v) ORDER BY d NULLS LAST",
        )
        .await
        .unwrap();
        assert_eq!((d.value(0), d.value(1), d.is_null(2)), (5.0, 10.0, true));
    }
}
