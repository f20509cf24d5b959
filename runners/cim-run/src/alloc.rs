//! The allocator's purge setting: the only foreign call of the runner, kept in this module.
#![allow(unsafe_code)]

/// `mi_option_purge_delay` in mimalloc v3's `mi_option_e` (the `mimalloc` crate builds v3).
const MI_OPTION_PURGE_DELAY: std::ffi::c_int = 15;

unsafe extern "C" {
    fn mi_option_get(option: std::ffi::c_int) -> std::ffi::c_long;
    fn mi_option_set(option: std::ffi::c_int, value: std::ffi::c_long);
}

/// Stops mimalloc from handing freed memory back to the kernel, unless `MIMALLOC_PURGE_DELAY` is
/// set. With v3's default (purge a second after a free, arenas later) the large activation
/// buffers still go back and are page-faulted in again (2 MiB pages the kernel zeroes): a 10-step
/// tiny bench took 8 795–12 231 page faults, and the kernel's page clearing was ~10 % of its
/// `perf` samples; never purging leaves ~580 faults (measured step time: 1–5 % less, within this
/// machine's noise). The process keeps its high-water mark, as PyTorch's caching allocator does.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: plain option setters of the linked allocator; any value is valid.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// The allocator's current purge delay in milliseconds (−1: never).
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads an option of the linked allocator.
    unsafe { mi_option_get(MI_OPTION_PURGE_DELAY) as i64 }
}

#[cfg(test)]
mod tests {
    /// The option id is mimalloc's purge delay: it reads v3's default (1000 ms, `src/options.c`) until
    /// [`super::keep_freed_memory`] turns purging off.
    #[test]
    fn purge_delay_option_is_the_one_we_set() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return; // the user's setting wins and is left alone
        }
        let before = super::purge_delay_ms();
        super::keep_freed_memory();
        assert_eq!((before, super::purge_delay_ms()), (1000, -1));
    }
}
