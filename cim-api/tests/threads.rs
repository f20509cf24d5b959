//! `settle_cpu_threads` fills in the thread variables the user left unset and keeps the ones set.
//! One test in its own binary: it changes the process environment, which no other thread reads.

#[test]
fn unset_thread_variables_are_filled_and_set_ones_kept() {
    std::env::remove_var("CANDLE_NUM_THREADS");
    std::env::set_var("RAYON_NUM_THREADS", "3");
    let n = cim_api::threads::settle_cpu_threads();
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("1"));
    assert_eq!(std::env::var("RAYON_NUM_THREADS").as_deref(), Ok("3"));
    // rayon's pool starts at the first call, reading the variable.
    assert_eq!(n, 3);

    std::env::set_var("CANDLE_NUM_THREADS", "2");
    std::env::remove_var("RAYON_NUM_THREADS");
    cim_api::threads::settle_cpu_threads();
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").as_deref(), Ok("2"));
    let want = std::thread::available_parallelism()
        .unwrap()
        .get()
        .to_string();
    assert_eq!(std::env::var("RAYON_NUM_THREADS"), Ok(want));
}
