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

/// Decodes a frame: its row count and columns.
pub fn decode(bytes: &[u8]) -> Result<(usize, Vec<Column>), FrameError> {
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
            1 => Some(r.take(rows)?.iter().map(|&b| b != 0).collect()),
            _ => return Err(FrameError("bad null flag")),
        };
        let width = |w: usize| rows.checked_mul(w).ok_or(FrameError("length overflow"));
        let data = match ty {
            UdfType::Float64 => Data::Float64(
                r.take(width(8)?)?
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            UdfType::Int64 => Data::Int64(
                r.take(width(8)?)?
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            UdfType::Boolean => Data::Boolean(r.take(rows)?.iter().map(|&b| b != 0).collect()),
            UdfType::Utf8 => {
                let offsets: Vec<usize> = r
                    .take(
                        width(4)?
                            .checked_add(4)
                            .ok_or(FrameError("length overflow"))?,
                    )?
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")) as usize)
                    .collect();
                if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) {
                    return Err(FrameError("string offsets out of order"));
                }
                let text = r.take(offsets[rows])?;
                let mut v = Vec::with_capacity(rows);
                for w in offsets.windows(2) {
                    let s = std::str::from_utf8(&text[w[0]..w[1]])
                        .map_err(|_| FrameError("a string is not UTF-8"))?;
                    v.push(s.to_owned());
                }
                Data::Utf8(v)
            }
        };
        columns.push(Column { data, valid });
    }
    if r.at != bytes.len() {
        return Err(FrameError("trailing bytes"));
    }
    Ok((rows, columns))
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
