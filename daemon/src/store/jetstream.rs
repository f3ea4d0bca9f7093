//! The NATS JetStream backend (in progress).
