//! The gate's one value kernel: clamp a value to public bounds, shift it, scale it and
//! truncate it to a fixed-point integer — in one pass, instead of a CASE, a subtraction, a
//! multiplication and a cast, each of which materialises a column (that chain was a fifth of a
//! small job's CPU). A scalar function for the grouped plan; the dense plan (`dense.rs`) calls
//! [`Convert`] inside its sums, with no column in between. Built only by the gate into plans it
//! constructs; it is not registered in the session, so guest SQL cannot name it.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, AsArray, Int64Array};
use arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{Result, ScalarValue, internal_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// `trunc((clamp(x, lo, hi) − shift) · scale)`, squared before scaling for sums of squares.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Convert {
    lo: f64,
    hi: f64,
    shift: f64,
    scale: f64,
    /// Square the shifted value before scaling (for sums of squares).
    squared: bool,
}

impl Convert {
    pub(crate) fn new(lo: f64, hi: f64, shift: f64, scale: f64, squared: bool) -> Self {
        Convert {
            lo,
            hi,
            shift,
            scale,
            squared,
        }
    }

    /// `trunc((clamp(x, lo, hi) − shift) · scale)`; NaN counts as `lo`. The result lies in
    /// `[trunc((lo − shift)·scale), trunc((hi − shift)·scale)]`, the bounds the gate gives
    /// OpenDP's `make_sum`. (`as` truncates toward zero, as DataFusion's cast did.)
    #[inline]
    pub(crate) fn apply(&self, x: f64) -> i64 {
        let c = if x.is_nan() {
            self.lo
        } else {
            x.clamp(self.lo, self.hi)
        };
        let d = c - self.shift;
        if self.squared {
            ((d * d) * self.scale) as i64
        } else {
            (d * self.scale) as i64
        }
    }

    fn key(&self) -> ([u64; 4], bool) {
        (
            [self.lo, self.hi, self.shift, self.scale].map(f64::to_bits),
            self.squared,
        )
    }
}

impl PartialEq for Convert {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Convert {}

impl Hash for Convert {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

/// [`Convert`] as a scalar function over `Float64`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct FixedPoint {
    convert: Convert,
    signature: Signature,
}

impl FixedPoint {
    pub(crate) fn new(convert: Convert) -> Self {
        FixedPoint {
            convert,
            signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for FixedPoint {
    fn name(&self) -> &str {
        "unseen_fixed_point"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match args.args.first() {
            Some(ColumnarValue::Array(a)) if a.data_type() == &DataType::Float64 => {
                let out: Int64Array = a
                    .as_primitive::<Float64Type>()
                    .unary(|x| self.convert.apply(x));
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
            Some(ColumnarValue::Scalar(ScalarValue::Float64(v))) => Ok(ColumnarValue::Scalar(
                ScalarValue::Int64(v.map(|x| self.convert.apply(x))),
            )),
            _ => internal_err!("unseen_fixed_point takes one Float64 argument"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_clamped_shifted_scaled_and_truncated() {
        let f = Convert::new(0.0, 100.0, 50.0, 4.0, false);
        assert_eq!(f.apply(-3.0), -200);
        assert_eq!(f.apply(1e300), 200);
        assert_eq!(f.apply(f64::NAN), -200);
        assert_eq!(f.apply(f64::INFINITY), 200);
        assert_eq!(f.apply(50.3), 1); // 1.2 truncates to 1
        assert_eq!(f.apply(49.7), -1); // −1.2 truncates toward zero
        let sq = Convert::new(0.0, 100.0, 50.0, 4.0, true);
        assert_eq!(sq.apply(-3.0), 10_000); // (0 − 50)² · 4
        assert_eq!(sq.apply(52.0), 16);
    }
}
