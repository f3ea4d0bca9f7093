//! The `kiln` binary under another name, built with this crate so that cargo
//! rebuilds it before the end-to-end tests run it (see `kiln_tests::daemon`).

fn main() -> std::process::ExitCode {
    kiln::cli::main()
}
