//! Frames: how columns of rows cross the host↔guest boundary in bulk (one copy into the guest's
//! memory per batch, not one call per value). Both sides encode and decode with this module.
//!
//! ```text
//! frame  := rows: u32, columns: u32, column*            (little-endian throughout)
//! column := type: u8, has_nulls: u8, [valid: u8 × rows if has_nulls], data
//! data   := Float64 | Int64: 8 bytes × rows
//!         | Boolean: 1 byte × rows
//!         | Utf8: offsets u32 × (rows + 1), then the bytes
//! ```
//!
//! Decoding checks every length against the bytes present before allocating, so a hostile
//! frame is an error, never a panic or a huge allocation.

use crate::contract::UdfType;

/// One column's values; nulls are kept aside in [`Column::valid`].
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    Float64(Vec<f64>),
    Int64(Vec<i64>),
    Boolean(Vec<bool>),
    Utf8(Vec<String>),
}

/// A column of a frame. A null row holds a placeholder value (0, false, "") in `data`.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub data: Data,
    /// `None`: no nulls. Otherwise one flag per row, `true` where the value is present.
    pub valid: Option<Vec<bool>>,
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError(pub &'static str);

impl std::fmt::Display for FrameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "malformed frame: {}", self.0)
    }
}

impl Data {
    pub fn len(&self) -> usize {
        match self {
            Data::Float64(v) => v.len(),
            Data::Int64(v) => v.len(),
            Data::Boolean(v) => v.len(),
            Data::Utf8(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn udf_type(&self) -> UdfType {
        match self {
            Data::Float64(_) => UdfType::Float64,
            Data::Int64(_) => UdfType::Int64,
            Data::Boolean(_) => UdfType::Boolean,
            Data::Utf8(_) => UdfType::Utf8,
        }
    }
}

impl Column {
    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Whether row `i` holds a value.
    #[inline]
    pub fn is_valid(&self, i: usize) -> bool {
        self.valid.as_ref().is_none_or(|v| v[i])
    }

    /// The present `Float64` values (nulls skipped; other types give nothing).
    pub fn floats(&self) -> impl Iterator<Item = f64> + '_ {
        let values: &[f64] = match &self.data {
            Data::Float64(v) => v,
            _ => &[],
        };
        values
            .iter()
            .enumerate()
            .filter(|(i, _)| self.is_valid(*i))
            .map(|(_, v)| *v)
    }
}

pub fn type_tag(t: UdfType) -> u8 {
    match t {
        UdfType::Float64 => 0,
        UdfType::Int64 => 1,
        UdfType::Boolean => 2,
        UdfType::Utf8 => 3,
    }
}

fn tag_type(tag: u8) -> Option<UdfType> {
    Some(match tag {
        0 => UdfType::Float64,
        1 => UdfType::Int64,
        2 => UdfType::Boolean,
        3 => UdfType::Utf8,
        _ => return None,
    })
}

/// Writes a frame header.
pub fn put_header(out: &mut Vec<u8>, rows: usize, columns: usize) {
    out.extend_from_slice(&(rows as u32).to_le_bytes());
    out.extend_from_slice(&(columns as u32).to_le_bytes());
}

/// Encodes columns of equal length as a frame.
pub fn encode(columns: &[Column]) -> Vec<u8> {
    let rows = columns.first().map_or(0, Column::len);
    let mut out = Vec::with_capacity(8 + columns.len() * (2 + rows * 9));
    put_header(&mut out, rows, columns.len());
    for c in columns {
        out.push(type_tag(c.data.udf_type()));
        match &c.valid {
            Some(valid) => {
                out.push(1);
                out.extend(valid.iter().map(|&v| v as u8));
            }
            None => out.push(0),
        }
        match &c.data {
            Data::Float64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::Int64(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Data::Boolean(v) => out.extend(v.iter().map(|&b| b as u8)),
            Data::Utf8(v) => {
                let mut offset = 0u32;
                out.extend_from_slice(&offset.to_le_bytes());
                for s in v {
                    offset = offset.wrapping_add(s.len() as u32);
                    out.extend_from_slice(&offset.to_le_bytes());
                }
                v.iter().for_each(|s| out.extend_from_slice(s.as_bytes()));
            }
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(FrameError("length overflow"))?;
        let s = self
            .bytes
            .get(self.at..end)
            .ok_or(FrameError("shorter than its header says"))?;
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, FrameError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
}

/// A frame's column as it lies in the frame's bytes: read in place, nothing copied. Lengths
/// were checked by [`view`], so the accessors only index within them.
#[derive(Debug, Clone, Copy)]
pub struct ColumnView<'a> {
    pub ty: UdfType,
    rows: usize,
    /// One byte per row, non-zero where a value is present; `None`: no nulls.
    valid: Option<&'a [u8]>,
    /// Float64/Int64: 8 bytes a row; Boolean: 1; Utf8: `u32` offsets × (rows + 1).
    data: &'a [u8],
    /// Utf8 only: the text the offsets point into (checked UTF-8, offsets on char boundaries).
    text: &'a str,
}

impl<'a> ColumnView<'a> {
    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    pub fn has_nulls(&self) -> bool {
        self.valid.is_some()
    }

    /// Whether row `i` holds a value.
    pub fn is_valid(&self, i: usize) -> bool {
        self.valid.is_none_or(|v| v[i] != 0)
    }

    #[inline]
    fn word(&self, i: usize) -> [u8; 8] {
        self.data[i * 8..i * 8 + 8].try_into().expect("8 bytes")
    }

    /// Row `i` of a Float64 column whose type and validity the caller checked.
    #[inline]
    pub fn f64_at(&self, i: usize) -> f64 {
        f64::from_le_bytes(self.word(i))
    }

    /// Row `i` of an Int64 column whose type and validity the caller checked.
    #[inline]
    pub fn i64_at(&self, i: usize) -> i64 {
        i64::from_le_bytes(self.word(i))
    }

    /// Row `i` of a Boolean column whose type and validity the caller checked.
    #[inline]
    pub fn bool_at(&self, i: usize) -> bool {
        self.data[i] != 0
    }

    /// Row `i` of a Float64 column (`None` for a null or another type).
    #[inline]
    pub fn f64(&self, i: usize) -> Option<f64> {
        (self.ty == UdfType::Float64 && self.is_valid(i)).then(|| f64::from_le_bytes(self.word(i)))
    }

    /// Row `i` of an Int64 column.
    #[inline]
    pub fn i64(&self, i: usize) -> Option<i64> {
        (self.ty == UdfType::Int64 && self.is_valid(i)).then(|| i64::from_le_bytes(self.word(i)))
    }

    /// Row `i` of a Boolean column.
    #[inline]
    pub fn bool(&self, i: usize) -> Option<bool> {
        (self.ty == UdfType::Boolean && self.is_valid(i)).then(|| self.data[i] != 0)
    }

    /// Row `i` of a Utf8 column.
    pub fn str(&self, i: usize) -> Option<&'a str> {
        if self.ty != UdfType::Utf8 || !self.is_valid(i) {
            return None;
        }
        Some(self.text_at(i))
    }

    /// The text of Utf8 row `i` (offsets were checked by [`view`]; "" should they not fit).
    fn text_at(&self, i: usize) -> &'a str {
        self.text
            .get(offset(self.data, i)..offset(self.data, i + 1))
            .unwrap_or("")
    }

    /// Float64/Int64 values as they lie: little-endian, 8 bytes a row (null rows included).
    pub fn fixed_bytes(&self) -> &'a [u8] {
        match self.ty {
            UdfType::Float64 | UdfType::Int64 => self.data,
            _ => &[],
        }
    }

    /// The validity bytes, if the column has nulls.
    pub fn valid_bytes(&self) -> Option<&'a [u8]> {
        self.valid
    }

    /// The column copied out (null rows hold a placeholder).
    pub fn to_column(&self) -> Column {
        let n = self.rows;
        let data = match self.ty {
            UdfType::Float64 => Data::Float64((0..n).map(|i| self.f64_at(i)).collect()),
            UdfType::Int64 => Data::Int64((0..n).map(|i| self.i64_at(i)).collect()),
            UdfType::Boolean => Data::Boolean(self.data.iter().map(|&b| b != 0).collect()),
            UdfType::Utf8 => Data::Utf8((0..n).map(|i| self.text_at(i).to_owned()).collect()),
        };
        Column {
            data,
            valid: self.valid.map(|v| v.iter().map(|&b| b != 0).collect()),
        }
    }
}

/// String offset `k` of a Utf8 column's offsets.
fn offset(offsets: &[u8], k: usize) -> usize {
    u32::from_le_bytes(offsets[k * 4..k * 4 + 4].try_into().expect("4 bytes")) as usize
}

/// Reads a frame in place: its row count and a view of each column. Every length is checked
/// against the bytes present, string offsets for order and UTF-8 boundaries.
pub fn view(bytes: &[u8]) -> Result<(usize, Vec<ColumnView<'_>>), FrameError> {
    let mut r = Reader { bytes, at: 0 };
    let rows = r.u32()? as usize;
    let n_columns = r.u32()? as usize;
    // Every column takes at least two bytes, every row at least one per column.
    if n_columns > bytes.len() / 2 || (n_columns > 0 && rows > bytes.len()) {
        return Err(FrameError("more columns or rows than bytes"));
    }
    let mut columns = Vec::with_capacity(n_columns);
    for _ in 0..n_columns {
        let ty = tag_type(r.u8()?).ok_or(FrameError("unknown column type"))?;
        let valid = match r.u8()? {
            0 => None,
            1 => Some(r.take(rows)?),
            _ => return Err(FrameError("bad null flag")),
        };
        let width = |w: usize| rows.checked_mul(w).ok_or(FrameError("length overflow"));
        let (data, text) = match ty {
            UdfType::Float64 | UdfType::Int64 => (r.take(width(8)?)?, ""),
            UdfType::Boolean => (r.take(rows)?, ""),
            UdfType::Utf8 => {
                let offsets = r.take(
                    width(4)?
                        .checked_add(4)
                        .ok_or(FrameError("length overflow"))?,
                )?;
                let at = |k: usize| offset(offsets, k);
                if at(0) != 0 || (0..rows).any(|k| at(k) > at(k + 1)) {
                    return Err(FrameError("string offsets out of order"));
                }
                let text = std::str::from_utf8(r.take(at(rows))?)
                    .map_err(|_| FrameError("a string is not UTF-8"))?;
                if !(0..rows).all(|k| text.is_char_boundary(at(k))) {
                    return Err(FrameError("a string is not UTF-8"));
                }
                (offsets, text)
            }
        };
        columns.push(ColumnView {
            ty,
            rows,
            valid,
            data,
            text,
        });
    }
    if r.at != bytes.len() {
        return Err(FrameError("trailing bytes"));
    }
    Ok((rows, columns))
}

/// Decodes a frame into owned columns: its row count and columns.
pub fn decode(bytes: &[u8]) -> Result<(usize, Vec<Column>), FrameError> {
    let (rows, columns) = view(bytes)?;
    Ok((rows, columns.iter().map(ColumnView::to_column).collect()))
}

/// Builds a one-column frame row by row, straight into the bytes it will be sent as.
///
/// The buffer starts with `lead` bytes the caller may fill (the guest's length prefix). A
/// column with no nulls — the usual case — is finished in place; one with nulls is copied once
/// to put its validity bytes before its values.
pub struct ColumnBuilder {
    ty: UdfType,
    lead: usize,
    /// `lead` bytes, the header and the column's tag and null flag, then the values
    /// (Utf8: the offsets).
    bytes: Vec<u8>,
    /// Utf8 only.
    text: Vec<u8>,
    /// Started at the first null.
    valid: Option<Vec<u8>>,
    rows: usize,
}

/// Header (8) + type tag + null flag.
const COLUMN_HEAD: usize = 10;

impl ColumnBuilder {
    pub fn new(ty: UdfType, capacity: usize, lead: usize) -> Self {
        let width = match ty {
            UdfType::Float64 | UdfType::Int64 => 8,
            UdfType::Boolean => 1,
            UdfType::Utf8 => 4,
        };
        let mut bytes = Vec::with_capacity(lead + COLUMN_HEAD + 4 + capacity * width);
        bytes.resize(lead + COLUMN_HEAD, 0);
        if ty == UdfType::Utf8 {
            bytes.extend_from_slice(&0u32.to_le_bytes());
        }
        ColumnBuilder {
            ty,
            lead,
            bytes,
            text: Vec::new(),
            valid: None,
            rows: 0,
        }
    }

    #[inline]
    fn pushed(&mut self, present: bool) {
        if let Some(valid) = &mut self.valid {
            valid.push(present as u8);
        } else if !present {
            let mut valid = vec![1u8; self.rows];
            valid.push(0);
            self.valid = Some(valid);
        }
        self.rows += 1;
    }

    #[inline]
    pub fn push_f64(&mut self, x: f64) {
        self.bytes.extend_from_slice(&x.to_le_bytes());
        self.pushed(true);
    }

    #[inline]
    pub fn push_i64(&mut self, x: i64) {
        self.bytes.extend_from_slice(&x.to_le_bytes());
        self.pushed(true);
    }

    #[inline]
    pub fn push_bool(&mut self, x: bool) {
        self.bytes.push(x as u8);
        self.pushed(true);
    }

    pub fn push_str(&mut self, s: &str) {
        self.text.extend_from_slice(s.as_bytes());
        self.bytes
            .extend_from_slice(&(self.text.len() as u32).to_le_bytes());
        self.pushed(true);
    }

    /// A null: a placeholder value and a cleared validity byte.
    pub fn push_null(&mut self) {
        match self.ty {
            UdfType::Float64 | UdfType::Int64 => self.bytes.extend_from_slice(&[0; 8]),
            UdfType::Boolean => self.bytes.push(0),
            UdfType::Utf8 => self
                .bytes
                .extend_from_slice(&(self.text.len() as u32).to_le_bytes()),
        }
        self.pushed(false);
    }

    /// The frame, after `lead` zero bytes.
    pub fn finish(mut self) -> Vec<u8> {
        let head = self.lead;
        self.bytes[head..head + 4].copy_from_slice(&(self.rows as u32).to_le_bytes());
        self.bytes[head + 4..head + 8].copy_from_slice(&1u32.to_le_bytes());
        self.bytes[head + 8] = type_tag(self.ty);
        self.bytes.extend_from_slice(&self.text);
        match self.valid {
            None => self.bytes,
            Some(valid) => {
                self.bytes[head + 9] = 1;
                let at = head + COLUMN_HEAD;
                let mut out = Vec::with_capacity(self.bytes.len() + valid.len());
                out.extend_from_slice(&self.bytes[..at]);
                out.extend_from_slice(&valid);
                out.extend_from_slice(&self.bytes[at..]);
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_every_type_with_and_without_nulls() {
        let columns = vec![
            Column {
                data: Data::Float64(vec![1.5, -0.0, f64::MAX]),
                valid: None,
            },
            Column {
                data: Data::Int64(vec![7, 0, i64::MIN]),
                valid: Some(vec![true, false, true]),
            },
            Column {
                data: Data::Boolean(vec![true, false, false]),
                valid: None,
            },
            Column {
                data: Data::Utf8(vec!["D01".into(), String::new(), "街道".into()]),
                valid: Some(vec![true, false, true]),
            },
        ];
        let bytes = encode(&columns);
        assert_eq!(decode(&bytes), Ok((3, columns)));
    }

    #[test]
    fn built_frames_equal_encoded_ones_and_views_read_them_in_place() {
        let columns = [
            Column {
                data: Data::Float64(vec![1.5, 0.0, -2.0, 7.0]),
                valid: None,
            },
            Column {
                data: Data::Float64(vec![0.0, 2.5, 0.0, 1.0]),
                valid: Some(vec![false, true, false, true]),
            },
            Column {
                data: Data::Int64(vec![i64::MIN, 0, 3, 0]),
                valid: Some(vec![true, true, true, false]),
            },
            Column {
                data: Data::Boolean(vec![true, false, false, true]),
                valid: None,
            },
            Column {
                data: Data::Utf8(vec!["街道".into(), String::new(), "x".into(), "".into()]),
                valid: Some(vec![true, true, true, false]),
            },
        ];
        for column in &columns {
            let mut b = ColumnBuilder::new(column.data.udf_type(), 2, 3);
            for i in 0..column.len() {
                if !column.is_valid(i) {
                    b.push_null();
                    continue;
                }
                match &column.data {
                    Data::Float64(v) => b.push_f64(v[i]),
                    Data::Int64(v) => b.push_i64(v[i]),
                    Data::Boolean(v) => b.push_bool(v[i]),
                    Data::Utf8(v) => b.push_str(&v[i]),
                }
            }
            let built = b.finish();
            let expected = encode(std::slice::from_ref(column));
            assert_eq!(&built[..3], &[0, 0, 0]);
            assert_eq!(&built[3..], expected.as_slice(), "{column:?}");
            let (rows, views) = view(&built[3..]).unwrap();
            assert_eq!(rows, 4);
            let v = views[0];
            assert_eq!(v.to_column(), *column);
            for i in 0..rows {
                assert_eq!(v.is_valid(i), column.is_valid(i));
                let present = column.is_valid(i);
                match &column.data {
                    Data::Float64(x) => assert_eq!(v.f64(i), present.then_some(x[i])),
                    Data::Int64(x) => assert_eq!(v.i64(i), present.then_some(x[i])),
                    Data::Boolean(x) => assert_eq!(v.bool(i), present.then_some(x[i])),
                    Data::Utf8(x) => assert_eq!(v.str(i), present.then_some(x[i].as_str())),
                }
                // Another type's accessor reads nothing.
                if column.data.udf_type() != UdfType::Int64 {
                    assert_eq!(v.i64(i), None);
                }
            }
        }
        // A string offset inside a character is refused, not sliced.
        let mut split = encode(&[Column {
            data: Data::Utf8(vec!["街".into(), "".into()]),
            valid: None,
        }]);
        split[14] = 1; // offsets 0, 1, 3: the first string ends mid-character
        assert!(view(&split).is_err());
    }

    #[test]
    fn hostile_frames_are_errors_not_panics_or_huge_allocations() {
        // Claims four billion rows in a few bytes.
        let mut huge = Vec::new();
        put_header(&mut huge, u32::MAX as usize, 1);
        huge.extend_from_slice(&[0, 0]);
        assert!(decode(&huge).is_err());
        // Truncated, unknown type, bad null flag, trailing bytes, backwards string offsets.
        let good = encode(&[Column {
            data: Data::Utf8(vec!["ab".into(), "c".into()]),
            valid: None,
        }]);
        assert!(decode(&good[..good.len() - 1]).is_err());
        let mut bad_type = good.clone();
        bad_type[8] = 9;
        assert!(decode(&bad_type).is_err());
        let mut bad_flag = good.clone();
        bad_flag[9] = 2;
        assert!(decode(&bad_flag).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        let mut backwards = good.clone();
        backwards[14] = 4; // offsets 0, 4, 3

        assert!(decode(&backwards).is_err());
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
    }
}
