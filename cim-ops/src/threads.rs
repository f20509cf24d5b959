//! The CPU thread settings a process starts with, fixed before any thread pool exists (`cim-run`
//! and the `fused_ops` bench call [`settle_cpu_threads`] first thing; so should a custom runner).
//!
//! candle keeps two thread pools on the CPU: rayon's, which runs its matmuls (the gemm crate) and
//! every kernel of `cim_ops`, and a "barrier pool" of `CANDLE_NUM_THREADS − 1` more threads
//! for its element-wise binary ops, whose workers spin for a while after each op before they
//! sleep. cim's heavy work runs in rayon's pool, so on a small machine those spinning workers take
//! cores from it: on a 2-core x86-64 VM the tiny bench ran 402.7 img/s (median of 5)
//! with the barrier pool off against 366.0 with it, alternating. And without `RAYON_NUM_THREADS`
//! candle works out its thread count again for every matmul — on Linux by reading `/proc/cpuinfo`.
//!
//! A command then runs on one of rayon's workers ([`on_pool`]), not on the main thread. Every
//! parallel kernel called from outside the pool is handed to it as a job and the caller sleeps on
//! a lock until the job is done: two thread wake-ups through the kernel per kernel call, and a
//! training step makes hundreds of such calls. Called from a worker, the kernel splits its work
//! in place: the caller runs its own half at once and only an idle worker is woken. On this
//! project's 2-core machine the tiny ResNet bench went from 432 to 534 img/s (step 69 → 56 ms) and
//! the tiny ViT bench from 408 to 462 img/s, alternating runs, identical losses.

/// Fixes the thread counts the user did not set: `RAYON_NUM_THREADS` to rayon's own default (the
/// available parallelism), so candle's every matmul reads a number instead of `/proc/cpuinfo`,
/// and `CANDLE_NUM_THREADS` to 1, so candle's element-wise ops run on the calling thread with no
/// spinning pool beside rayon's. Call first thing in `main`, before any other thread starts:
/// setting the environment while other threads read it is a data race. Returns the rayon thread
/// count.
///
/// Starts rayon's global pool with [`WORKER_STACK`] stacks, as a command run by [`on_pool`] has
/// the main thread's room for deep graphs (candle's backward walks the graph recursively); where
/// the pool already runs, it is left as it is.
pub fn settle_cpu_threads() -> usize {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // An error means the pool exists already (a second call, or a custom runner's own pool).
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(WORKER_STACK)
        .build_global();
    rayon::current_num_threads()
}

/// The stack of each of rayon's workers once [`settle_cpu_threads`] started the pool: 16 MiB of
/// address space (pages are only backed where touched), twice a Linux main thread's usual 8 MiB.
pub const WORKER_STACK: usize = 16 << 20;

/// Runs `f` on a worker of rayon's global pool and returns its result; the calling thread waits.
/// Where the caller is a worker already, `f` runs right here.
///
/// The parallel kernels `f` calls (candle's matmuls, `cim_ops`' CPU kernels) then split their
/// work in place instead of being handed to the pool and waited for (see the module doc). That
/// holds for a pool of one thread too (`RAYON_NUM_THREADS=1`, as for several processes on one
/// machine): called from outside it, each kernel would still be handed to its one worker while the
/// caller sleeps, two thread switches per call for no parallelism at all.
/// `cim_run::main` runs every command through it; a custom runner with its own `main`
/// should too.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_none() {
        rayon::scope(|_| f())
    } else {
        f()
    }
}
