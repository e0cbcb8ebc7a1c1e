//! Group-key positions kept beside a cached table.
//!
//! For public keys, the gate turns each row's key into its position in the catalogue's key
//! list (`gate/dense.rs`) and adds the row's values into that slot, with no hash table per
//! query. Finding the position still takes a lookup per row. A cached table's columns do not
//! change, so the positions of one column against one key list are the same for every job:
//! they are kept here, with the table, and later jobs reuse them.
//!
//! An array is recognised by its buffers: `ArrayData::ptr_eq` (same buffers, offset, length
//! and null mask). The cached table owns its arrays, so while this memo lives no other array
//! can have those addresses, and a slice, a filtered copy or a computed column never matches.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayData, UInt32Array};
use arrow::record_batch::RecordBatch;

/// Positions of a cached table's columns against key lists, bounded in bytes.
pub struct PositionMemo {
    /// Every column array of the table, by the address of its first buffer, with its id.
    arrays: HashMap<usize, Vec<(usize, ArrayData)>>,
    /// Most bytes of positions held (beyond it, positions are computed and not kept).
    cap: usize,
    inner: Mutex<MemoInner>,
}

#[derive(Default)]
struct MemoInner {
    /// By key list, then by array id.
    entries: HashMap<Vec<String>, HashMap<usize, Arc<UInt32Array>>>,
    bytes: usize,
}

impl PositionMemo {
    pub(super) fn new(partitions: &[Vec<RecordBatch>], cap: usize) -> Self {
        let mut arrays: HashMap<usize, Vec<(usize, ArrayData)>> = HashMap::new();
        let mut id = 0;
        for batch in partitions.iter().flatten() {
            for column in batch.columns() {
                let data = column.to_data();
                if let Some(address) = address(&data) {
                    arrays.entry(address).or_default().push((id, data));
                    id += 1;
                }
            }
        }
        PositionMemo {
            arrays,
            cap,
            inner: Mutex::default(),
        }
    }

    /// The id of `array` if it is one of the table's own column arrays, unsliced and unmasked.
    pub fn id_of(&self, array: &dyn Array) -> Option<usize> {
        let data = array.to_data();
        self.arrays
            .get(&address(&data)?)?
            .iter()
            .find(|(_, d)| d.ptr_eq(&data))
            .map(|(id, _)| *id)
    }

    /// Positions kept for array `id` against `keys`.
    pub fn get(&self, id: usize, keys: &[String]) -> Option<Arc<UInt32Array>> {
        self.lock().entries.get(keys)?.get(&id).cloned()
    }

    /// Keeps `positions` for array `id` against `keys`, if they fit in the memo's bytes.
    pub fn put(&self, id: usize, keys: &[String], positions: Arc<UInt32Array>) {
        let bytes = positions.get_array_memory_size();
        let mut inner = self.lock();
        if inner.bytes + bytes > self.cap {
            return;
        }
        let old = inner
            .entries
            .entry(keys.to_vec())
            .or_default()
            .insert(id, positions);
        inner.bytes += bytes;
        if let Some(old) = old {
            inner.bytes -= old.get_array_memory_size();
        }
    }

    /// Bytes of positions held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl std::fmt::Debug for PositionMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PositionMemo(<{} bytes hidden>)", self.bytes())
    }
}

fn address(data: &ArrayData) -> Option<usize> {
    data.buffers().first().map(|b| b.as_ptr() as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, StringViewArray, make_array};
    use arrow::buffer::NullBuffer;

    #[test]
    fn only_the_tables_own_arrays_are_recognised_and_the_cap_holds() {
        let a: ArrayRef = Arc::new(StringViewArray::from(vec!["D01", "D02", "D01"]));
        let b: ArrayRef = Arc::new(StringViewArray::from(vec!["D02", "D02", "D03"]));
        let batch = RecordBatch::try_from_iter([("a", a.clone()), ("b", b.clone())]).unwrap();
        let memo = PositionMemo::new(&[vec![batch]], 1 << 20);

        let (ia, ib) = (memo.id_of(a.as_ref()), memo.id_of(b.as_ref()));
        assert!(ia.is_some() && ib.is_some() && ia != ib);
        // Another array object over the same buffers is the same array.
        assert_eq!(memo.id_of(make_array(a.to_data()).as_ref()), ia);
        // A slice shares the buffers but not the offset; an equal copy shares nothing.
        assert_eq!(memo.id_of(a.slice(1, 2).as_ref()), None);
        let copy = StringViewArray::from(vec!["D01", "D02", "D01"]);
        assert_eq!(memo.id_of(&copy), None);
        // The same views under another null mask are another array.
        let masked = a
            .to_data()
            .into_builder()
            .nulls(Some(NullBuffer::from(vec![true, false, true])))
            .build()
            .unwrap();
        assert_eq!(memo.id_of(make_array(masked).as_ref()), None);

        let keys = vec!["D01".to_string(), "D02".to_string()];
        let positions = Arc::new(UInt32Array::from(vec![Some(0), Some(1), Some(0)]));
        memo.put(ia.unwrap(), &keys, positions.clone());
        assert_eq!(
            memo.get(ia.unwrap(), &keys).as_deref(),
            Some(positions.as_ref())
        );
        assert_eq!(memo.get(ib.unwrap(), &keys), None);
        assert_eq!(memo.get(ia.unwrap(), &keys[..1]), None, "another key list");

        let small = PositionMemo::new(&[], positions.get_array_memory_size() - 1);
        small.put(0, &keys, positions);
        assert_eq!(small.bytes(), 0, "over the cap: not kept");
    }
}
