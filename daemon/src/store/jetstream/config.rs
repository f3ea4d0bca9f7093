//! How to reach NATS and which JetStream stream holds the log.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::super::{Limits, StoreError};

/// Connection and stream settings of the JetStream backend. Every field has a
/// default, so a config file only names what differs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JetStreamConfig {
    /// Server URLs (`nats://host:4222`, `tls://host:4222`); several for a cluster.
    pub servers: Vec<String>,
    /// How to authenticate.
    pub auth: NatsAuth,
    /// TLS settings; `None` uses TLS only when the URL or the server asks for it.
    pub tls: Option<NatsTls>,
    /// The JetStream stream holding the events (and tag markers).
    pub stream: String,
    /// Subject prefix: events are on `<prefix>.<category>.<stream-id>`.
    pub subject_prefix: String,
    /// How long the server remembers event ids for idempotent retries. The embedded
    /// store remembers them forever; JetStream only within this window.
    pub duplicate_window_ms: u64,
    /// Replicas of the streams kiln creates (1, 3 or 5).
    pub replicas: usize,
    /// Keep the streams kiln creates in memory instead of on disk (tests only).
    pub memory_storage: bool,
    /// Timeout of each request to the server.
    pub request_timeout_ms: u64,
    /// Name of the connection, as the server's monitoring shows it.
    pub connection_name: String,
    /// Size limits on appends (the same as the embedded store's by default).
    pub limits: Limits,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            servers: vec!["nats://127.0.0.1:4222".into()],
            auth: NatsAuth::None,
            tls: None,
            stream: "KILN".into(),
            subject_prefix: "kiln".into(),
            duplicate_window_ms: 120_000,
            replicas: 1,
            memory_storage: false,
            request_timeout_ms: 5_000,
            connection_name: "kiln".into(),
            limits: Limits::default(),
        }
    }
}

/// Authentication to the NATS server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NatsAuth {
    /// No credentials (or credentials in the URL).
    #[default]
    None,
    /// A `.creds` file (JWT + NKey seed), as `nsc` writes it.
    CredentialsFile {
        path: PathBuf,
    },
    UserPassword {
        user: String,
        password: String,
    },
    Token {
        token: String,
    },
    /// An NKey seed (`SU...`).
    Nkey {
        seed: String,
    },
}

/// TLS to the NATS server. Present means TLS is required.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct NatsTls {
    /// PEM file of CA certificates to trust, besides the system's.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Start TLS before the server's INFO (servers configured with `handshake_first`).
    pub handshake_first: bool,
}

impl JetStreamConfig {
    /// A config for one server URL with everything else at its default.
    pub fn new(url: impl Into<String>) -> Self {
        JetStreamConfig {
            servers: vec![url.into()],
            ..JetStreamConfig::default()
        }
    }

    pub fn duplicate_window(&self) -> Duration {
        Duration::from_millis(self.duplicate_window_ms)
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// The stream holding snapshots (one per aggregate stream, newest only).
    pub fn snapshot_stream(&self) -> String {
        format!("{}_SNAPSHOTS", self.stream)
    }

    /// Refuses settings the server would refuse later, naming the field.
    pub fn validate(&self) -> Result<(), StoreError> {
        let bad = |field: &str, reason: String| {
            StoreError::backend(
                "checking the JetStream configuration",
                format!("{field}: {reason}"),
            )
        };
        if self.servers.is_empty() {
            return Err(bad("servers", "at least one server URL is needed".into()));
        }
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 200
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        };
        if !name_ok(&self.stream) {
            return Err(bad(
                "stream",
                format!(
                    "{:?} is not a usable stream name (use 1 to 200 ASCII letters, digits, '-' or '_')",
                    self.stream
                ),
            ));
        }
        let token_ok = |t: &str| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>' && c != '.')
        };
        if !self.subject_prefix.split('.').all(token_ok) {
            return Err(bad(
                "subject_prefix",
                format!(
                    "{:?} must be one or more dot-separated subject tokens without wildcards or spaces",
                    self.subject_prefix
                ),
            ));
        }
        if self.duplicate_window_ms == 0 {
            return Err(bad(
                "duplicate_window_ms",
                "must be above 0: idempotent retries rely on the server's dedupe window".into(),
            ));
        }
        if self.request_timeout_ms == 0 {
            return Err(bad("request_timeout_ms", "must be above 0".into()));
        }
        if !matches!(self.replicas, 1..=5) {
            return Err(bad(
                "replicas",
                format!("{} is not between 1 and 5", self.replicas),
            ));
        }
        if let Some(tls) = &self.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err(bad(
                "tls",
                "cert_file and key_file go together (mutual TLS needs both)".into(),
            ));
        }
        Ok(())
    }
}
