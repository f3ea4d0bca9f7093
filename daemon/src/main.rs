//! The `kiln` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
