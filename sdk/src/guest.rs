//! The guest side of the ABI: the exports [`crate::export!`] emits call into
//! here, and [`HostBackend`] reaches the view through kiln's host functions.
//! Only compiled for `wasm32`; see `sdk/ABI.md` for the contract.

#[cfg(target_arch = "wasm32")]
pub use wasm::{alloc, apply};

#[cfg(target_arch = "wasm32")]
mod wasm {
    use std::cell::{Cell, RefCell};

    use crate::abi::{self, APPLY_FAILED, APPLY_OK};
    use crate::{Backend, Projection};

    #[link(wasm_import_module = "kiln")]
    unsafe extern "C" {
        #[link_name = "get"]
        fn host_get(key: *const u8, key_len: usize, out: *mut u8, out_cap: usize) -> i64;
        #[link_name = "put"]
        fn host_put(key: *const u8, key_len: usize, value: *const u8, value_len: usize);
        #[link_name = "delete"]
        fn host_delete(key: *const u8, key_len: usize);
        #[link_name = "scan"]
        fn host_scan(prefix: *const u8, prefix_len: usize, out: *mut u8, out_cap: usize) -> i64;
        #[link_name = "fail"]
        fn host_fail(index: u32, msg: *const u8, msg_len: usize);
        #[link_name = "panic"]
        fn host_panic(index: u32, msg: *const u8, msg_len: usize);
    }

    thread_local! {
        static INPUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        static CURRENT: Cell<u32> = const { Cell::new(0) };
        static HOOKED: Cell<bool> = const { Cell::new(false) };
    }

    /// `kiln_alloc`: a buffer of `len` bytes for the next batch (reused).
    pub fn alloc(len: i32) -> i32 {
        install_panic_hook();
        INPUT.with_borrow_mut(|input| {
            input.clear();
            input.resize(len.max(0) as usize, 0);
            input.as_mut_ptr() as i32
        })
    }

    /// `kiln_apply`: applies the batch the host wrote into the `kiln_alloc` buffer.
    pub fn apply<P: Projection>(_ptr: i32, len: i32) -> i32 {
        install_panic_hook();
        INPUT.with_borrow(|input| {
            let len = (len.max(0) as usize).min(input.len());
            let mut backend = HostBackend { buf: Vec::new() };
            match crate::run_batch::<P>(&input[..len], &mut backend, |i| CURRENT.set(i)) {
                Ok(()) => APPLY_OK,
                Err(e) => {
                    // SAFETY: pointer and length of a live string.
                    unsafe { host_fail(e.index, e.message.as_ptr(), e.message.len()) };
                    APPLY_FAILED
                }
            }
        })
    }

    fn install_panic_hook() {
        if HOOKED.replace(true) {
            return;
        }
        std::panic::set_hook(Box::new(|info| {
            let message = info.to_string();
            // SAFETY: pointer and length of a live string.
            unsafe { host_panic(CURRENT.get(), message.as_ptr(), message.len()) };
        }));
    }

    struct HostBackend {
        buf: Vec<u8>,
    }

    impl HostBackend {
        /// Calls a host function that copies a result into `buf` when it fits and
        /// returns its length either way (`ABSENT` for none); grows and retries.
        fn fetch(&mut self, call: impl Fn(*mut u8, usize) -> i64) -> Option<usize> {
            loop {
                let n = call(self.buf.as_mut_ptr(), self.buf.capacity());
                if n < 0 {
                    return None;
                }
                let n = n as usize;
                if n <= self.buf.capacity() {
                    // SAFETY: the host wrote n bytes into the buffer's capacity.
                    unsafe { self.buf.set_len(n) };
                    return Some(n);
                }
                self.buf.clear();
                self.buf.reserve(n);
            }
        }
    }

    impl Backend for HostBackend {
        fn get(&mut self, key: &str) -> Option<&[u8]> {
            // SAFETY: key is live; out/cap describe our buffer's spare capacity.
            let n =
                self.fetch(|out, cap| unsafe { host_get(key.as_ptr(), key.len(), out, cap) })?;
            Some(&self.buf[..n])
        }

        fn put(&mut self, key: &str, value: &[u8]) {
            // SAFETY: both slices are live for the call.
            unsafe { host_put(key.as_ptr(), key.len(), value.as_ptr(), value.len()) }
        }

        fn delete(&mut self, key: &str) {
            // SAFETY: key is live for the call.
            unsafe { host_delete(key.as_ptr(), key.len()) }
        }

        fn scan(&mut self, prefix: &str) -> Vec<(String, Vec<u8>)> {
            // SAFETY: prefix is live; out/cap describe our buffer's capacity.
            let fetched = self
                .fetch(|out, cap| unsafe { host_scan(prefix.as_ptr(), prefix.len(), out, cap) });
            let mut entries = Vec::new();
            let Some(n) = fetched else { return entries };
            if let Ok(mut r) = abi::EntryReader::new(&self.buf[..n]) {
                while let Ok(Some((k, v))) = r.next_entry() {
                    entries.push((k.to_string(), v.to_vec()));
                }
            }
            entries
        }
    }
}
