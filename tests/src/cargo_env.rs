//! Running a nested cargo from a build script or a test: the environment the
//! outer cargo set for its own build must not leak into it (no outer target
//! dir, rustflags, wrappers or jobserver), or it would fight the outer build's
//! lock and inherit its host settings. Shared by `tests/build.rs` (through
//! `#[path]`) and the tests that build projection crates for real.

use std::process::Command;

/// Drops what the outer cargo set for its own build.
pub fn clean_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let outer = (key.starts_with("CARGO_") && key != "CARGO_HOME")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "RUSTC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTDOC"
                    | "MAKEFLAGS"
                    | "MFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
            );
        if outer {
            cmd.env_remove(key);
        }
    }
}

/// The profile settings `scripts/build-projections` and `tests/build.rs`
/// build projections with (release, fat LTO, one codegen unit, no debug info).
pub fn projection_profile(cmd: &mut Command) {
    cmd.env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_LTO", "true")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "1")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false");
}
