//! Helpers shared by the integration tests that run the `cim-run` binary.

use std::process::{Command, Output};

/// Runs `cim-run ARGS` with `envs` set (and `RUST_LOG=info`, so progress lines are there to read).
pub fn cim_run(args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cim-run"));
    c.args(args).env("RUST_LOG", "info");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// Everything a run printed, stdout then stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
