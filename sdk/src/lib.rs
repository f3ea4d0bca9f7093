//! kiln-sdk: author projections for kiln (the guest ABI lands with the runtime).
