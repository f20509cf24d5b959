//! `cim-run-custom`: the stock `cim-run` CLI with one more sampler linked in.
//!
//! ```sh
//! cargo run -p cim-example-custom-sampler --bin cim-run-custom -- \
//!     --preset quickstart --set sampler.name=epsilon_greedy --set sampler.epsilon_greedy.epsilon=0.2
//! ```

// Naming the crate keeps its `register_sampler!` submission in the binary.
use cim_example_custom_sampler as _;

fn main() -> std::process::ExitCode {
    cim_run::cli::main()
}
