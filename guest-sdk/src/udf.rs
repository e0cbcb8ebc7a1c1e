//! Guest functions that run over rows: scalar UDFs ([`crate::udf!`]) that queries call by name,
//! and block functions ([`crate::block!`]) for sample-and-aggregate. The macros expand to the
//! exports in [`crate::contract`] and to a module of the same name whose `call_frame` runs the
//! exact frame-in, frame-out path the host uses, so authors can test it natively.

use crate::contract::{UdfSignature, UdfType, Value};
use crate::frame::{self, Column, Data};

/// A type a UDF may take. `Option<T>` sees nulls; a plain type makes a null row's result null
/// without calling the function.
pub trait UdfArg: Sized {
    const TYPE: UdfType;
    const NULLABLE: bool;
    /// Whether the type crosses as a plain wasm number ([`crate::contract::ROW_PREFIX`]).
    const ROW: bool;
    type Wasm;
    /// `None`: the row's result is null (a null for a plain type).
    fn get(column: &Column, row: usize) -> Option<Self>;
    fn from_wasm(w: Self::Wasm) -> Self;
}

/// A type a UDF may return; `Option<T>` may return null.
pub trait UdfResult: Sized {
    const TYPE: UdfType;
    const ROW: bool;
    type Wasm;
    fn push(self, out: &mut Builder);
    fn to_value(self) -> Value;
    fn to_wasm(self) -> Self::Wasm;
}

/// Collects a UDF's results for one frame column.
pub struct Builder {
    data: Data,
    valid: Vec<bool>,
    nulls: bool,
}

impl Builder {
    pub fn new(ty: UdfType, rows: usize) -> Self {
        let data = match ty {
            UdfType::Float64 => Data::Float64(Vec::with_capacity(rows)),
            UdfType::Int64 => Data::Int64(Vec::with_capacity(rows)),
            UdfType::Boolean => Data::Boolean(Vec::with_capacity(rows)),
            UdfType::Utf8 => Data::Utf8(Vec::with_capacity(rows)),
        };
        Builder {
            data,
            valid: Vec::with_capacity(rows),
            nulls: false,
        }
    }

    pub fn push_null(&mut self) {
        match &mut self.data {
            Data::Float64(v) => v.push(0.0),
            Data::Int64(v) => v.push(0),
            Data::Boolean(v) => v.push(false),
            Data::Utf8(v) => v.push(String::new()),
        }
        self.valid.push(false);
        self.nulls = true;
    }

    fn push_valid(&mut self) {
        self.valid.push(true);
    }

    pub fn finish(self) -> Column {
        Column {
            data: self.data,
            valid: self.nulls.then_some(self.valid),
        }
    }
}

macro_rules! plain {
    ($t:ty, $variant:ident, $udf:ident, $wasm:ty, $from:expr, $to:expr, $value:expr) => {
        impl UdfArg for $t {
            const TYPE: UdfType = UdfType::$udf;
            const NULLABLE: bool = false;
            const ROW: bool = true;
            type Wasm = $wasm;
            fn get(column: &Column, row: usize) -> Option<Self> {
                match &column.data {
                    Data::$variant(v) if column.is_valid(row) => v.get(row).copied(),
                    _ => None,
                }
            }
            fn from_wasm(w: $wasm) -> Self {
                $from(w)
            }
        }
        impl UdfResult for $t {
            const TYPE: UdfType = UdfType::$udf;
            const ROW: bool = true;
            type Wasm = $wasm;
            fn push(self, out: &mut Builder) {
                if let Data::$variant(v) = &mut out.data {
                    v.push(self);
                    out.push_valid();
                } else {
                    out.push_null();
                }
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

plain!(f64, Float64, Float64, f64, |w| w, |x| x, Value::Float);
plain!(i64, Int64, Int64, i64, |w| w, |x| x, Value::Int);
plain!(
    bool,
    Boolean,
    Boolean,
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
    fn get(column: &Column, row: usize) -> Option<Self> {
        match &column.data {
            Data::Utf8(v) if column.is_valid(row) => v.get(row).cloned(),
            _ => None,
        }
    }
    fn from_wasm(_: i32) -> Self {
        String::new()
    }
}

impl UdfResult for String {
    const TYPE: UdfType = UdfType::Utf8;
    const ROW: bool = false;
    type Wasm = i32;
    fn push(self, out: &mut Builder) {
        if let Data::Utf8(v) = &mut out.data {
            v.push(self);
            out.push_valid();
        } else {
            out.push_null();
        }
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
    fn get(column: &Column, row: usize) -> Option<Self> {
        Some(T::get(column, row))
    }
    fn from_wasm(_: i32) -> Self {
        None
    }
}

impl<T: UdfResult> UdfResult for Option<T> {
    const TYPE: UdfType = T::TYPE;
    const ROW: bool = false;
    type Wasm = i32;
    fn push(self, out: &mut Builder) {
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

/// Runs a UDF over a frame of argument columns: the frame of its results, or an error the host
/// turns into each row's declared default.
pub fn call_frame<R: UdfResult>(
    bytes: &[u8],
    arity: usize,
    row: impl Fn(&[Column], usize) -> Option<R>,
) -> Result<Vec<u8>, frame::FrameError> {
    let (rows, columns) = frame::decode(bytes)?;
    if columns.len() != arity {
        return Err(frame::FrameError("wrong number of argument columns"));
    }
    let mut out = Builder::new(R::TYPE, rows);
    for i in 0..rows {
        match row(&columns, i) {
            Some(v) => v.push(&mut out),
            None => out.push_null(),
        }
    }
    Ok(frame::encode(&[out.finish()]))
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

/// Runs a block function over a frame: the frame of its outputs (one `Float64` column).
pub fn call_block(
    bytes: &[u8],
    function: impl Fn(&Rows) -> Vec<f64>,
) -> Result<Vec<u8>, frame::FrameError> {
    let (len, columns) = frame::decode(bytes)?;
    let out = function(&Rows { len, columns });
    Ok(frame::encode(&[Column {
        data: Data::Float64(out),
        valid: None,
    }]))
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
            use super::*;
            #[allow(unused_imports)]
            use $crate::udf::{UdfArg as _, UdfResult as _};

            const ARITY: usize = <[&str]>::len(&[$(stringify!($arg)),*]);

            /// The signature handed to the host.
            pub fn signature() -> $crate::contract::UdfSignature {
                $crate::udf::signature::<$ret>(
                    &[$((<$ty as $crate::udf::UdfArg>::TYPE, <$ty as $crate::udf::UdfArg>::NULLABLE, <$ty as $crate::udf::UdfArg>::ROW)),*],
                    $default,
                )
            }

            /// The UDF over a frame of argument columns, as the host calls it.
            pub fn call_frame(bytes: &[u8]) -> Result<Vec<u8>, $crate::frame::FrameError> {
                $crate::udf::call_frame::<$ret>(bytes, ARITY, |columns, row| {
                    let mut next = columns.iter();
                    $(
                        let $arg: $ty =
                            <$ty as $crate::udf::UdfArg>::get(next.next()?, row)?;
                    )*
                    Some(super::$name($($arg),*))
                })
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_udf_", stringify!($name)))]
            extern "C" fn __batch(ptr: i32, len: i32) -> i32 {
                $crate::__frame_call(ptr, len, call_frame)
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
                $crate::udf::call_block(bytes, super::$name)
            }

            #[cfg(target_arch = "wasm32")]
            #[unsafe(export_name = concat!("unseen_block_", stringify!($name)))]
            extern "C" fn __block(ptr: i32, len: i32) -> i32 {
                $crate::__frame_call(ptr, len, call_frame)
            }
        }
    };
}
