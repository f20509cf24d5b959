//! With a pool of one thread (`RAYON_NUM_THREADS=1`), `on_pool` still runs its closure on that
//! worker, so the parallel kernels it calls run in place rather than being handed across threads.
//! Its own binary: the global pool is built once per process.

use rayon::prelude::*;

#[test]
fn a_one_thread_pool_still_runs_the_command_on_its_worker() {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    assert_eq!(cim_ops::threads::settle_cpu_threads(), 1);
    let caller = std::thread::current().id();
    let (index, thread, in_place) = cim_ops::threads::on_pool(|| {
        let here = std::thread::current().id();
        // A parallel loop called from the worker runs on it: every item sees the same thread.
        let in_place = (0..64u32)
            .into_par_iter()
            .all(|_| std::thread::current().id() == here);
        (rayon::current_thread_index(), here, in_place)
    });
    assert_eq!(index, Some(0));
    assert_ne!(thread, caller);
    assert!(in_place);
}
