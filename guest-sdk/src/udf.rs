//! Guest functions that run over rows: scalar UDFs ([`crate::udf!`]) that queries call by name,
//! and block functions ([`crate::block!`]) for sample-and-aggregate. The macros expand to the
//! exports in [`crate::contract`] and to a module of the same name whose `call_frame` runs the
//! exact frame-in, frame-out path the host uses, so authors can test it natively.

use crate::contract::{UdfSignature, UdfType, Value};
use crate::frame::{self, Column, ColumnBuilder, ColumnView, Data};

/// A type a UDF may take. `Option<T>` sees nulls; a plain type makes a null row's result null
/// without calling the function.
pub trait UdfArg: Sized {
    const TYPE: UdfType;
    const NULLABLE: bool;
    /// Whether the type crosses as a plain wasm number ([`crate::contract::ROW_PREFIX`]).
    const ROW: bool;
    type Wasm;
    /// `None`: the row's result is null (a null for a plain type).
    fn get(column: &ColumnView<'_>, row: usize) -> Option<Self>;
    /// Row `row` of a column already found to be of this type with no nulls (the fast path
    /// taken when every argument is such a column).
    fn at(column: &ColumnView<'_>, row: usize) -> Self;
    fn from_wasm(w: Self::Wasm) -> Self;
}

/// A type a UDF may return; `Option<T>` may return null.
pub trait UdfResult: Sized {
    const TYPE: UdfType;
    const ROW: bool;
    type Wasm;
    fn push(self, out: &mut ColumnBuilder);
    fn to_value(self) -> Value;
    fn to_wasm(self) -> Self::Wasm;
}

macro_rules! plain {
    ($t:ty, $udf:ident, $read:ident, $at:ident, $push:ident, $wasm:ty, $from:expr, $to:expr, $value:expr) => {
        impl UdfArg for $t {
            const TYPE: UdfType = UdfType::$udf;
            const NULLABLE: bool = false;
            const ROW: bool = true;
            type Wasm = $wasm;
            #[inline]
            fn get(column: &ColumnView<'_>, row: usize) -> Option<Self> {
                column.$read(row)
            }
            #[inline]
            fn at(column: &ColumnView<'_>, row: usize) -> Self {
                column.$at(row)
            }
            fn from_wasm(w: $wasm) -> Self {
                $from(w)
            }
        }
        impl UdfResult for $t {
            const TYPE: UdfType = UdfType::$udf;
            const ROW: bool = true;
            type Wasm = $wasm;
            #[inline]
            fn push(self, out: &mut ColumnBuilder) {
                out.$push(self);
            }
            fn to_value(self) -> Value {
                $value(self)
            }
            fn to_wasm(self) -> $wasm {
                $to(self)
            }
        }
    };
}

plain!(
    f64,
    Float64,
    f64,
    f64_at,
    push_f64,
    f64,
    |w| w,
    |x| x,
    Value::Float
);
plain!(
    i64,
    Int64,
    i64,
    i64_at,
    push_i64,
    i64,
    |w| w,
    |x| x,
    Value::Int
);
plain!(
    bool,
    Boolean,
    bool,
    bool_at,
    push_bool,
    i32,
    |w| w != 0,
    |x| x as i32,
    Value::Bool
);

impl UdfArg for String {
    const TYPE: UdfType = UdfType::Utf8;
    const NULLABLE: bool = false;
    const ROW: bool = false;
    type Wasm = i32;
    fn get(column: &ColumnView<'_>, row: usize) -> Option<Self> {
        column.str(row).map(str::to_owned)
    }
    fn at(column: &ColumnView<'_>, row: usize) -> Self {
        column.str(row).unwrap_or_default().to_owned()
    }
    fn from_wasm(_: i32) -> Self {
        String::new()
    }
}

impl UdfResult for String {
    const TYPE: UdfType = UdfType::Utf8;
    const ROW: bool = false;
    type Wasm = i32;
    fn push(self, out: &mut ColumnBuilder) {
        out.push_str(&self);
    }
    fn to_value(self) -> Value {
        Value::Text(self)
    }
    fn to_wasm(self) -> i32 {
        0
    }
}

impl<T: UdfArg> UdfArg for Option<T> {
    const TYPE: UdfType = T::TYPE;
    const NULLABLE: bool = true;
    const ROW: bool = false;
    type Wasm = i32;
    fn get(column: &ColumnView<'_>, row: usize) -> Option<Self> {
        Some(T::get(column, row))
    }
    fn at(column: &ColumnView<'_>, row: usize) -> Self {
        T::get(column, row)
    }
    fn from_wasm(_: i32) -> Self {
        None
    }
}

impl<T: UdfResult> UdfResult for Option<T> {
    const TYPE: UdfType = T::TYPE;
    const ROW: bool = false;
    type Wasm = i32;
    fn push(self, out: &mut ColumnBuilder) {
        match self {
            Some(v) => v.push(out),
            None => out.push_null(),
        }
    }
    fn to_value(self) -> Value {
        self.map_or(Value::Null, T::to_value)
    }
    fn to_wasm(self) -> i32 {
        0
    }
}

/// The signature a `udf!` declares (what `unseen_sig_<name>` hands the host).
pub fn signature<R: UdfResult>(args: &[(UdfType, bool, bool)], default: R) -> UdfSignature {
    UdfSignature {
        args: args.iter().map(|a| a.0).collect(),
        returns: R::TYPE,
        takes_nulls: args.iter().any(|a| a.1),
        default: default.to_value(),
        row_abi: R::ROW && args.iter().all(|a| a.2),
    }
}

/// Runs a UDF over a frame of argument columns, reading them in place and writing the results
/// straight into the answer frame (after `lead` bytes left for the caller): the answer, or an
/// error the host turns into each row's declared default.
///
/// `args` are the declared argument types and whether each is a plain number or bool. When
/// every column is plain, of its declared type and without nulls (the common case), rows go
/// through `plain_row`, which reads values without checks; otherwise through `row`, which
/// checks each value and answers `None` for a null result.
pub fn call_frame<R: UdfResult>(
    bytes: &[u8],
    args: &[(UdfType, bool)],
    lead: usize,
    row: impl Fn(&[ColumnView<'_>], usize) -> Option<R>,
    plain_row: impl Fn(&[ColumnView<'_>], usize) -> R,
) -> Result<Vec<u8>, frame::FrameError> {
    let (rows, columns) = frame::view(bytes)?;
    if columns.len() != args.len() {
        return Err(frame::FrameError("wrong number of argument columns"));
    }
    let mut out = ColumnBuilder::new(R::TYPE, rows, lead);
    let plain = columns
        .iter()
        .zip(args)
        .all(|(c, &(ty, plain))| plain && c.ty == ty && !c.has_nulls());
    if plain {
        (0..rows).for_each(|i| plain_row(&columns, i).push(&mut out));
    } else {
        for i in 0..rows {
            match row(&columns, i) {
                Some(v) => v.push(&mut out),
                None => out.push_null(),
            }
        }
    }
    Ok(out.finish())
}

/// One block's rows for a sample-and-aggregate function, in the order the query selected
/// its columns.
#[derive(Debug, Clone, PartialEq)]
pub struct Rows {
    pub len: usize,
    pub columns: Vec<Column>,
}

impl Rows {
    /// A block with one `Float64` column (for tests).
    pub fn floats(values: Vec<f64>) -> Self {
        Rows {
            len: values.len(),
            columns: vec![Column {
                data: Data::Float64(values),
                valid: None,
            }],
        }
    }

    /// Column `i`, if the query selected that many.
    pub fn column(&self, i: usize) -> Option<&Column> {
        self.columns.get(i)
    }
}

/// Runs a block function over a frame: the frame of its outputs (one `Float64` column), after
/// `lead` bytes left for the caller.
pub fn call_block(
    bytes: &[u8],
    lead: usize,
    function: impl Fn(&Rows) -> Vec<f64>,
) -> Result<Vec<u8>, frame::FrameError> {
    let (len, columns) = frame::decode(bytes)?;
    let values = function(&Rows { len, columns });
    let mut out = ColumnBuilder::new(UdfType::Float64, values.len(), lead);
    values.into_iter().for_each(|v| out.push_f64(v));
    Ok(out.finish())
}

/// Exports a scalar UDF that queries can call by name, keeping the function as it is (call it
/// in native tests). The declared default is the result for a row on which the function
/// traps or runs out of fuel. Plain argument types make a null row's result null; take
/// `Option<T>` to see nulls.
///
/// ```
/// unseen_guest::udf! {
///     default = 0.0;
///     /// Fare per kilometre, 0 where the distance is not positive.
///     fn fare_per_km(fare: f64, km: f64) -> f64 {
///         if km > 0.0 { fare / km } else { 0.0 }
///     }
/// }
/// # fn main() {
/// assert_eq!(fare_per_km(30.0, 6.0), 5.0);
///
/// // The frame path the host takes: a batch of columns in, a column out.
/// use unseen_guest::frame::{Column, Data, decode, encode};
/// let args = encode(&[
///     Column { data: Data::Float64(vec![30.0, 8.0]), valid: None },
///     Column { data: Data::Float64(vec![6.0, 0.0]), valid: Some(vec![true, false]) },
/// ]);
/// let (_, out) = decode(&fare_per_km::call_frame(&args).unwrap()).unwrap();
/// assert_eq!(out[0].data, Data::Float64(vec![5.0, 0.0]));
/// assert_eq!(out[0].valid, Some(vec![true, false])); // null distance: null result
/// assert!(fare_per_km::signature().row_abi);
/// # }
/// ```
#[macro_export]
macro_rules! udf {
    (
        default = $default:expr;
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret $body

        #[allow(non_snake_case, dead_code)]
        $vis mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[allow(unused_imports)]
            use $crate::udf::{UdfArg as _, UdfResult as _};

            /// The signature handed to the host.
            pub fn signature() -> $crate::contract::UdfSignature {
                $crate::udf::signature::<$ret>(
                    &[$((<$ty as $crate::udf::UdfArg>::TYPE, <$ty as $crate::udf::UdfArg>::NULLABLE, <$ty as $crate::udf::UdfArg>::ROW)),*],
                    $default,
                )
            }

            /// The UDF over a frame of argument columns, as the host calls it.
            pub fn call_frame(bytes: &[u8]) -> Result<Vec<u8>, $crate::frame::FrameError> {
                framed(bytes, 0)
            }

            fn framed(
                bytes: &[u8],
                lead: usize,
            ) -> Result<Vec<u8>, $crate::frame::FrameError> {
                $crate::udf::call_frame::<$ret>(
                    bytes,
                    &[$((<$ty as $crate::udf::UdfArg>::TYPE, <$ty as $crate::udf::UdfArg>::ROW)),*],
                    lead,
                    |columns, row| {
                        let mut next = columns.iter();
                        $(
                            let $arg: $ty =
                                <$ty as $crate::udf::UdfArg>::get(next.next()?, row)?;
                        )*
                        Some(super::$name($($arg),*))
                    },
                    |columns, row| {
                        let mut next = columns.iter();
                        $(
                            let $arg: $ty = <$ty as $crate::udf::UdfArg>::at(
                                next.next().expect("one column per argument"),
                                row,
                            );
                        )*
                        super::$name($($arg),*)
                    },
                )
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_udf_", stringify!($name)))]
            extern "C" fn __batch(ptr: i32, len: i32) -> i32 {
                $crate::__frame_call(ptr, len, framed)
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_sig_", stringify!($name)))]
            extern "C" fn __signature() -> i64 {
                $crate::__leak_json(&signature())
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_row_", stringify!($name)))]
            extern "C" fn __row(
                $($arg: <$ty as $crate::udf::UdfArg>::Wasm),*
            ) -> <$ret as $crate::udf::UdfResult>::Wasm {
                super::$name($(<$ty as $crate::udf::UdfArg>::from_wasm($arg)),*).to_wasm()
            }
        }
    };
}

/// Exports a sample-and-aggregate block function: it gets one block's rows ([`Rows`]) and
/// returns one value per declared output. The gate clamps each to its bounds and releases
/// their DP mean over blocks, so the function need not be trusted.
///
/// ```
/// unseen_guest::block! {
///     fn median(rows: &unseen_guest::udf::Rows) -> Vec<f64> {
///         let mut v: Vec<f64> = rows.column(0).map(|c| c.floats().collect()).unwrap_or_default();
///         if v.is_empty() { return vec![]; }
///         v.sort_by(f64::total_cmp);
///         vec![v[v.len() / 2]]
///     }
/// }
/// # fn main() {
/// assert_eq!(median(&unseen_guest::udf::Rows::floats(vec![3.0, 1.0, 2.0])), vec![2.0]);
/// # }
/// ```
#[macro_export]
macro_rules! block {
    (
        $(#[$meta:meta])*
        $vis:vis fn $name:ident($rows:ident : &$rows_ty:ty) -> Vec<f64> $body:block
    ) => {
        $(#[$meta])*
        $vis fn $name($rows: &$rows_ty) -> Vec<f64> $body

        #[allow(non_snake_case, dead_code)]
        $vis mod $name {
            /// The block function over a frame of rows, as the host calls it.
            pub fn call_frame(bytes: &[u8]) -> Result<Vec<u8>, $crate::frame::FrameError> {
                framed(bytes, 0)
            }

            fn framed(
                bytes: &[u8],
                lead: usize,
            ) -> Result<Vec<u8>, $crate::frame::FrameError> {
                $crate::udf::call_block(bytes, lead, super::$name)
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_block_", stringify!($name)))]
            extern "C" fn __block(ptr: i32, len: i32) -> i32 {
                $crate::__frame_call(ptr, len, framed)
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use crate::frame::{Column, Data, decode, encode};

    crate::udf! {
        default = 0.0;
        fn scaled(x: f64, by: i64, on: bool) -> f64 {
            if on { x * by as f64 } else { -1.0 }
        }
    }

    fn run(columns: &[Column]) -> Option<Column> {
        let answer = scaled::call_frame(&encode(columns)).ok()?;
        let (_, mut out) = decode(&answer).ok()?;
        out.pop()
    }

    #[test]
    fn plain_columns_and_checked_columns_give_the_same_rows() {
        let x = Column {
            data: Data::Float64(vec![1.5, 2.0, 3.0]),
            valid: None,
        };
        let by = Column {
            data: Data::Int64(vec![2, 3, 4]),
            valid: None,
        };
        let on = Column {
            data: Data::Boolean(vec![true, false, true]),
            valid: None,
        };
        // No nulls, every type as declared: the unchecked path.
        let fast = run(&[x.clone(), by.clone(), on.clone()]).unwrap();
        assert_eq!(fast.data, Data::Float64(vec![3.0, -1.0, 12.0]));
        assert_eq!(fast.valid, None);
        // A null in one column: the checked path, a null result on that row only.
        let nulled = Column {
            data: Data::Int64(vec![2, 0, 4]),
            valid: Some(vec![true, false, true]),
        };
        let slow = run(&[x.clone(), nulled, on.clone()]).unwrap();
        assert_eq!(slow.data, Data::Float64(vec![3.0, 0.0, 12.0]));
        assert_eq!(slow.valid, Some(vec![true, false, true]));
        // A column of another type than declared: every row null, never misread.
        let wrong = Column {
            data: Data::Float64(vec![2.0, 3.0, 4.0]),
            valid: None,
        };
        let misread = run(&[x.clone(), wrong, on.clone()]).unwrap();
        assert_eq!(misread.valid, Some(vec![false, false, false]));
        // The wrong number of columns is an error (each row gets the default on the host).
        assert!(run(&[x, by]).is_none());
    }
}
