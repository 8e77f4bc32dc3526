//! Returns the allocator's free pages to the kernel.
//!
//! glibc's malloc keeps the memory a burst of work freed: each thread's arena holds its free
//! chunks for reuse, and only the top of the main heap goes back on its own. After the
//! operator's cold start over 100,000 ApiKeys, 411 MB were resident; `malloc_trim(0)` once the
//! operator was idle took that to 321 MB (20,000 keys: 112 to 93 MB). The live data is the
//! same before and after: only pages no allocation uses are returned.
//!
//! This is the workspace's only `unsafe` call, kept in its own crate so that the operator and
//! the sidecar keep `#![forbid(unsafe_code)]`.
#![deny(unsafe_code)]

/// Hands every free page of every malloc arena back to the kernel. Returns whether any memory
/// was released. A no-op (false) where the C library is not glibc.
///
/// It walks the whole heap under the allocator's locks, so call it when the process is idle
/// (after a burst), from a blocking thread, not on a request path.
pub fn release_free_memory() -> bool {
    release()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release() -> bool {
    // SAFETY: malloc_trim takes no pointer; it reads and changes only the allocator's own
    // state, under the allocator's locks, and is safe to call from any thread at any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release() -> bool {
    false
}
