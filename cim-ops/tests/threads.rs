//! `settle_cpu_threads` fills in the thread variables the user left unset and keeps the ones set.
//! One test in its own binary: it changes the process environment, which no other thread reads.

#[test]
fn unset_thread_variables_are_filled_and_set_ones_kept() {
    std::env::remove_var("CANDLE_NUM_THREADS");
    std::env::set_var("RAYON_NUM_THREADS", "3");
    let n = cim_ops::threads::settle_cpu_threads();
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("1"));
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
    // rayon's pool starts at the first call, reading the variable.
    assert_eq!(n, 3);

    std::env::set_var("CANDLE_NUM_THREADS", "2");
    std::env::remove_var("RAYON_NUM_THREADS");
    cim_ops::threads::settle_cpu_threads();
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("2"));
    let want = std::thread::available_parallelism()
        .unwrap()
        .get()
        .to_string();
    assert_eq!(std::env::var("RAYON_NUM_THREADS"), Ok(want));

    // `on_pool` runs its closure on one of the pool's workers, whose stacks have the room
    // `settle_cpu_threads` gave them: 6 MiB of frames (a default 2 MiB worker would overflow).
    let caller = std::thread::current().id();
    let (index, thread, depth) = cim_ops::threads::on_pool(|| {
        (
            rayon::current_thread_index(),
            std::thread::current().id(),
            deep(6 * 1024),
        )
    });
    assert!(index.is_some() && thread != caller, "{index:?}");
    assert_eq!(depth, 6 * 1024);
    // From a worker, it runs in place.
    let inner = rayon::scope(|_| {
        let here = std::thread::current().id();
        cim_ops::threads::on_pool(|| std::thread::current().id()) == here
    });
    assert!(inner);
}

/// Recurses `n` times with a 1 KiB frame each, alive across the call below it; returns `n`.
#[inline(never)]
fn deep(n: usize) -> usize {
    let frame = [n as u8; 1024];
    std::hint::black_box(&frame);
    if n == 0 {
        return 0;
    }
    let depth = 1 + deep(n - 1);
    std::hint::black_box(&frame);
    depth
}
