//! The guest side of the contract (wasm32 only): the imports, the allocator export and the
//! entry trampoline that `entry!` expands to.

use crate::contract::{QueryError, QueryRequest, QueryResponse, Release};

#[link(wasm_import_module = "unseen")]
unsafe extern "C" {
    #[link_name = "query"]
    fn host_query(ptr: i32, len: i32) -> i32;
    #[link_name = "take_response"]
    fn host_take_response(ptr: i32, len: i32) -> i32;
    #[link_name = "set_output"]
    fn host_set_output(ptr: i32, len: i32) -> i32;
}

/// Hands the host a buffer of `len` bytes; the guest takes it back in [`__run_entry`].
#[unsafe(export_name = "unseen_alloc")]
extern "C" fn unseen_alloc(len: i32) -> i32 {
    // A boxed slice has exactly `len` bytes, so `__run_entry` can rebuild it with the same layout.
    let buf = vec![0u8; len.max(0) as usize].into_boxed_slice();
    Box::into_raw(buf) as *mut u8 as i32
}

/// Runs a DP query through the host's gate.
pub fn query(request: &QueryRequest) -> Result<Release, QueryError> {
    let body = serde_json::to_vec(request).map_err(|e| QueryError {
        code: "guest_encoding".into(),
        message: e.to_string(),
    })?;
    // SAFETY: the host reads `len` bytes at `ptr` from this module's memory; `body` outlives the call.
    let len = unsafe { host_query(body.as_ptr() as i32, body.len() as i32) };
    if len < 0 {
        return Err(QueryError {
            code: "host_refused".into(),
            message: "the host did not accept the query request".into(),
        });
    }
    let mut response = vec![0u8; len as usize];
    // SAFETY: the host writes at most `len` bytes into `response`.
    let written = unsafe { host_take_response(response.as_mut_ptr() as i32, len) };
    if written != len {
        return Err(QueryError {
            code: "host_refused".into(),
            message: "the host's response was not delivered".into(),
        });
    }
    serde_json::from_slice::<QueryResponse>(&response).map_err(|e| QueryError {
        code: "guest_decoding".into(),
        message: e.to_string(),
    })?
}

fn set_output(bytes: &[u8]) {
    // SAFETY: the host reads `bytes.len()` bytes at `bytes.as_ptr()`.
    unsafe { host_set_output(bytes.as_ptr() as i32, bytes.len() as i32) };
}

#[doc(hidden)]
pub fn __run_entry(
    params_ptr: i32,
    params_len: i32,
    function: fn(serde_json::Value) -> Result<serde_json::Value, String>,
) -> i32 {
    // SAFETY: the host filled a buffer it obtained from `unseen_alloc(params_len)`.
    let params = unsafe {
        Vec::from_raw_parts(
            params_ptr as *mut u8,
            params_len as usize,
            params_len as usize,
        )
    };
    let params = match serde_json::from_slice(&params) {
        Ok(p) => p,
        Err(e) => {
            set_output(format!("params are not JSON: {e}").as_bytes());
            return 1;
        }
    };
    match function(params) {
        Ok(output) => {
            let bytes = serde_json::to_vec(&output).unwrap_or_else(|_| b"null".to_vec());
            set_output(&bytes);
            0
        }
        Err(message) => {
            set_output(message.as_bytes());
            1
        }
    }
}

thread_local! {
    /// The frame last handed to the host, freed at the next call.
    static LAST_FRAME: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Takes the frame the host wrote at `ptr` (a buffer from `unseen_alloc`), runs `f` over it
/// (`f` leaves 4 bytes before its answer frame) and answers the address of `u32` length +
/// answer frame, or -1.
#[doc(hidden)]
pub fn __frame_call(
    ptr: i32,
    len: i32,
    f: fn(&[u8], usize) -> Result<Vec<u8>, crate::frame::FrameError>,
) -> i32 {
    // SAFETY: the host filled a buffer it obtained from `unseen_alloc(len)`.
    let input = unsafe { Vec::from_raw_parts(ptr as *mut u8, len as usize, len as usize) };
    let Ok(mut out) = f(&input, 4) else { return -1 };
    drop(input);
    let n = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&n.to_le_bytes());
    LAST_FRAME.with(|last| {
        let mut last = last.borrow_mut();
        *last = out;
        last.as_ptr() as i32
    })
}

/// Serialises `value` and leaks it: `ptr << 32 | len` for the host to read.
#[doc(hidden)]
pub fn __leak_json<T: serde::Serialize>(value: &T) -> i64 {
    let bytes = serde_json::to_vec(value).unwrap_or_default().leak();
    ((bytes.as_ptr() as i64) << 32) | bytes.len() as i64
}
