//! The `kiln` command line: parses arguments and dispatches to a subcommand.
//!
//! Each subcommand's implementation lives in its own module; this file only
//! declares the surface (`kiln --help`) and maps errors to exit codes.

pub mod backup;
pub mod client;
pub mod fleet;
pub mod migrate;
pub mod new;
pub mod run;
pub mod serve;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::bench::{self, BenchCommand};

#[derive(Parser, Debug)]
#[command(
    name = "kiln",
    version,
    about = "WebAssembly projection and view-builder daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a benchmark and print its figures.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Copy an embedded log (offline) into a JetStream stream, resumably.
    Migrate(migrate::MigrateArgs),
    /// Restore a `kiln backup` into an empty data directory (offline).
    Restore(backup::RestoreArgs),
    /// Create a projection project (Rust or AssemblyScript) that builds as it is.
    New(new::NewArgs),
    /// Run a projection module offline over a JSONL file of events and print
    /// the resulting documents as JSONL.
    Run(run::RunArgs),
    /// Run the daemon: tail the log, build the views, serve the HTTP API.
    Serve(crate::config::ServeArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Bench(cmd) => bench::run(cmd),
        Command::New(args) => new::run(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Restore(args) => backup::restore(args),
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Client(cmd) => return client::main(cmd),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
