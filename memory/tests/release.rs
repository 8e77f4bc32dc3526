//! Its own test binary (its own process), so that no other test's allocations move the
//! resident set while it is measured.

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_memory_between_live_allocations_goes_back_to_the_kernel() {
    const N: usize = 200_000;
    const SIZE: usize = 512;
    // About 100 MB in small chunks, written so that every page is resident. Then free all but
    // every 64th: the survivors pin the heap's top and pepper its middle, the shape a cold
    // start leaves (its caches stay, its request buffers go). The allocator cannot shrink the
    // heap from the top, so the freed pages stay resident until they are released.
    let mut chunks: Vec<Vec<u8>> = (0..N).map(|i| vec![i as u8; SIZE]).collect();
    let survivors: Vec<Vec<u8>> = chunks
        .drain(..)
        .enumerate()
        .filter(|(i, _)| i % 64 == 0)
        .map(|(_, c)| c)
        .collect();
    let before = resident_bytes();
    assert!(
        keylimit_memory::release_free_memory(),
        "nothing was released"
    );
    let after = resident_bytes();
    assert!(
        before.saturating_sub(after) > 50 << 20,
        "resident {} MB before the release, {} MB after",
        before >> 20,
        after >> 20
    );
    // The live data is intact.
    assert!(survivors
        .iter()
        .enumerate()
        .all(|(i, c)| c.len() == SIZE && c[0] == (i * 64) as u8));
}
