//! `cim-run-custom`: the stock `cim-run` CLI with one more sampler linked in.
//!
//! ```sh
//! cargo run -p cim-example-custom-sampler --bin cim-run-custom -- \
//!     --preset quickstart --set sampler.name=epsilon_greedy --set sampler.epsilon_greedy.epsilon=0.2
//! ```

// Naming the crate keeps its `register_sampler!` submission in the binary.
use cim_example_custom_sampler as _;

// The allocator cim-run runs on (it keeps freed buffers for the next step).
#[global_allocator]
static GLOBAL: cim_run::MiMalloc = cim_run::MiMalloc;

fn main() -> std::process::ExitCode {
    cim_run::main()
}
