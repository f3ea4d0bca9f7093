//! Keeps the linker's relocations in the wasm module (`--emit-relocs`): with
//! them kiln tells a rebuild at another version (same logic, another layout)
//! from a change of logic, and the new version reuses the view. See
//! docs/projections.md, "Which changes keep a view".
fn main() {
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        println!("cargo::rustc-cdylib-link-arg=--emit-relocs");
    }
}
