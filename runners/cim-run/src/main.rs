fn main() -> std::process::ExitCode {
    cim_run::cli::main()
}
