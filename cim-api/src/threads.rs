//! The CPU thread settings a process starts with, fixed before any thread pool exists (`cim-run`
//! and the `fused_ops` bench call [`settle_cpu_threads`] first thing; so should a custom runner).
//!
//! candle keeps two thread pools on the CPU: rayon's, which runs its matmuls (the gemm crate) and
//! every kernel of `cim_api::ops`, and a "barrier pool" of `CANDLE_NUM_THREADS − 1` more threads
//! for its element-wise binary ops, whose workers spin for a while after each op before they
//! sleep. cim's heavy work runs in rayon's pool, so on a small machine those spinning workers take
//! cores from it: on this project's 2-core machine the tiny bench ran 402.7 img/s (median of 5)
//! with the barrier pool off against 366.0 with it, alternating. And without `RAYON_NUM_THREADS`
//! candle works out its thread count again for every matmul — on Linux by reading `/proc/cpuinfo`.

/// Fixes the thread counts the user did not set: `RAYON_NUM_THREADS` to rayon's own default (the
/// available parallelism), so candle's every matmul reads a number instead of `/proc/cpuinfo`,
/// and `CANDLE_NUM_THREADS` to 1, so candle's element-wise ops run on the calling thread with no
/// spinning pool beside rayon's. Call first thing in `main`, before any other thread starts:
/// setting the environment while other threads read it is a data race. Returns the rayon thread
/// count.
pub fn settle_cpu_threads() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    rayon::current_num_threads()
}
