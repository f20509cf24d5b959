//! `cim-run`: the process owns its allocator, thread pools and backend switches; everything else
//! is the `cim-runner` library behind [`cim_run::main`].

// candle allocates a fresh buffer for every op; glibc's malloc hands large ones back to the
// kernel each time (page faults on every step). mimalloc keeps them (`cim_run::keep_freed_memory`).
#[global_allocator]
static GLOBAL: cim_run::MiMalloc = cim_run::MiMalloc;

fn main() -> std::process::ExitCode {
    cim_run::main()
}
