//! Connecting to NATS and making sure the streams are fit for kiln: the
//! server can do atomic batches, the event and snapshot streams exist,
//! capture kiln's subjects and allow direct gets and atomic batches; and the
//! checks an operation makes when the server does not answer (is the stream
//! electing a leader, or gone?).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::{self as js_stream, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, ConnectOptions, Event, Request};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::watch;

use super::super::StoreError;
use super::{ACK_PATIENCE, Inner, JetStreamConfig, JetStreamStore, NatsAuth, Subjects};

/// How long a publish nobody answered waits to learn whether its stream was
/// deleted (see [`Inner::no_responders`]). Once nothing has answered for
/// longer than an election takes ([`NO_RESPONDERS_PATIENCE`]), it waits
/// [`NO_RESPONDERS_LOOKUP_LONG`], so a deleted stream is still named on a
/// link slower than the short wait.
const NO_RESPONDERS_LOOKUP: Duration = Duration::from_millis(300);
const NO_RESPONDERS_LOOKUP_LONG: Duration = Duration::from_secs(2);
const NO_RESPONDERS_PATIENCE: Duration = Duration::from_secs(15);

impl JetStreamStore {
    /// Connects, then creates the event and snapshot streams or checks that the
    /// existing ones capture kiln's subjects and allow what kiln needs (direct get,
    /// atomic batches, the configured dedupe window), updating them if not.
    pub async fn connect(config: JetStreamConfig) -> Result<Self, StoreError> {
        config.validate()?;
        let timeout = config.request_timeout();
        let (gen_tx, gen_rx) = watch::channel(0u64);
        let gen_tx = Arc::new(gen_tx);
        let elections_tx = gen_tx.clone();
        let (elected_tx, elections_rx) = watch::channel(0u64);
        let connects = Arc::new(AtomicU64::new(0));
        let connects_seen = connects.clone();
        let disconnects = Arc::new(AtomicU64::new(0));
        let disconnects_seen = disconnects.clone();
        let mut opts = ConnectOptions::new()
            .name(&config.connection_name)
            .request_timeout(Some(timeout))
            .connection_timeout(timeout)
            .event_callback(move |event| {
                let gen_tx = gen_tx.clone();
                let connects = connects_seen.clone();
                let disconnects = disconnects_seen.clone();
                async move {
                    match event {
                        Event::Connected => {
                            connects.fetch_add(1, Ordering::AcqRel);
                            gen_tx.send_modify(|g| *g += 1);
                            tracing::info!("connected to NATS");
                        }
                        Event::Disconnected => {
                            disconnects.fetch_add(1, Ordering::AcqRel);
                            tracing::warn!("disconnected from NATS");
                        }
                        other => tracing::debug!("NATS connection event: {other}"),
                    }
                }
            });
        opts = match &config.auth {
            NatsAuth::None => opts,
            NatsAuth::CredentialsFile { path } => {
                opts.credentials_file(path).await.map_err(|e| {
                    StoreError::backend(
                        format!("reading the NATS credentials file {}", path.display()),
                        e,
                    )
                })?
            }
            NatsAuth::UserPassword { user, password } => {
                opts.user_and_password(user.clone(), password.clone())
            }
            NatsAuth::Token { token } => opts.token(token.clone()),
            NatsAuth::Nkey { seed } => opts.nkey(seed.clone()),
        };
        if let Some(tls) = &config.tls {
            opts = opts.require_tls(true);
            if let Some(ca) = &tls.ca_file {
                opts = opts.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                opts = opts.add_client_certificate(cert.clone(), key.clone());
            }
            if tls.handshake_first {
                opts = opts.tls_first();
            }
        }
        let client = opts.connect(&config.servers).await.map_err(|e| {
            StoreError::backend(
                format!("connecting to NATS at {}", config.servers.join(", ")),
                e,
            )
        })?;
        check_server_version(&client, &config)?;
        let clustered = client.server_info().cluster.is_some();
        let js = jetstream::ContextBuilder::new()
            .timeout(timeout)
            .build(client.clone());
        let subjects = Subjects::new(&config.subject_prefix);
        let storage = if config.memory_storage {
            StorageType::Memory
        } else {
            StorageType::File
        };
        let events = ensure_stream(
            &js,
            js_stream::Config {
                name: config.stream.clone(),
                description: Some("kiln event log".into()),
                subjects: vec![
                    subjects.events_filter(),
                    subjects.tags_filter(),
                    subjects.probe_filter(),
                ],
                allow_direct: true,
                allow_atomic_publish: true,
                duplicate_window: config.duplicate_window(),
                num_replicas: config.replicas,
                storage,
                ..Default::default()
            },
        )
        .await?;
        check_stream(&events, &client)?;
        watch_leader_elections(&client, &config.stream, elections_tx, elected_tx).await;
        let snapshots = ensure_stream(
            &js,
            js_stream::Config {
                name: config.snapshot_stream(),
                description: Some("kiln aggregate snapshots (newest per stream)".into()),
                subjects: vec![subjects.snapshots_filter()],
                allow_direct: true,
                max_messages_per_subject: 1,
                num_replicas: config.replicas,
                storage,
                ..Default::default()
            },
        )
        .await?;
        let whole_stream_tail = {
            let ours = [
                subjects.events_filter(),
                subjects.tags_filter(),
                subjects.probe_filter(),
            ];
            events
                .cached_info()
                .config
                .subjects
                .iter()
                .all(|s| ours.contains(s))
        };
        let identity = format!(
            "jetstream:{}:{}",
            config.stream,
            events.cached_info().created.unix_timestamp_nanos()
        );
        Ok(JetStreamStore {
            inner: Arc::new(Inner {
                identity,
                client,
                js,
                events,
                snapshots,
                subjects,
                config,
                reconnects: gen_rx,
                head_hints: Mutex::new(HashMap::new()),
                foreign: Mutex::new(BTreeMap::new()),
                foreign_total: AtomicU64::new(0),
                tail_stalls: AtomicU64::new(0),
                no_responders_since: AtomicU64::new(0),
                started: std::time::Instant::now(),
                elections: elections_rx,
                disconnects,
                clustered,
                whole_stream_tail,
                connects,
                seen_events: AtomicU64::new(0),
                seen_snapshots: AtomicU64::new(0),
            }),
        })
    }
}

/// Bumps `tails` and `elected` whenever the event stream elects a leader (a
/// JetStream advisory): every tail recreates its consumer at once instead of
/// waiting to notice that a consumer on the old leader went silent, and a
/// publish waiting for its ack gives up (see [`Inner::publish_request`]).
async fn watch_leader_elections(
    client: &Client,
    stream: &str,
    tails: Arc<watch::Sender<u64>>,
    elected: watch::Sender<u64>,
) {
    let subject = format!("$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{stream}");
    match client.subscribe(subject.clone()).await {
        Ok(mut advisories) => {
            let stream = stream.to_string();
            tokio::spawn(async move {
                while advisories.next().await.is_some() {
                    tracing::info!(
                        stream,
                        "the event stream elected a leader; recreating tails"
                    );
                    tails.send_modify(|g| *g += 1);
                    elected.send_modify(|g| *g += 1);
                }
            });
        }
        Err(e) => tracing::warn!(
            "cannot follow {subject} ({e}); tails notice a leader change by their idle checks"
        ),
    }
}

/// The first release of nats-server with atomic batch publish.
const ATOMIC_BATCHES_SINCE: (u64, u64) = (2, 12);

/// `major.minor` of a server version string (`2.12.1`, `v2.14.0-beta.1`).
fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((major, minor))
}

/// Refuses a server that cannot do atomic batches: multi-event and tagged
/// appends would not be all-or-nothing on it.
fn check_server_version(client: &Client, config: &JetStreamConfig) -> Result<(), StoreError> {
    let info = client.server_info();
    let (want_major, want_minor) = ATOMIC_BATCHES_SINCE;
    match major_minor(&info.version) {
        Some(v) if v >= ATOMIC_BATCHES_SINCE => Ok(()),
        _ => Err(StoreError::backend(
            format!(
                "checking the NATS server at {} ({})",
                config.servers.join(", "),
                info.server_name
            ),
            format!(
                "nats-server {:?} cannot do atomic batch publish (nats-server \
                 {want_major}.{want_minor} or newer): kiln's multi-event and tagged appends \
                 would not be all-or-nothing; upgrade the server",
                info.version
            ),
        )),
    }
}

/// Refuses a stream that does not allow atomic batches after kiln asked for
/// them (a server or cluster member too old for the setting drops it).
fn check_stream(stream: &js_stream::Stream, client: &Client) -> Result<(), StoreError> {
    let info = stream.cached_info();
    if info.config.allow_atomic_publish && info.config.allow_direct {
        return Ok(());
    }
    let missing: Vec<&str> = [
        (!info.config.allow_atomic_publish).then_some("allow_atomic_publish (atomic batches)"),
        (!info.config.allow_direct).then_some("allow_direct (direct get)"),
    ]
    .into_iter()
    .flatten()
    .collect();
    Err(StoreError::backend(
        format!("checking JetStream stream '{}'", info.config.name),
        format!(
            "the stream does not allow {} though kiln asked for it; the server \
             (nats-server {} at {}) or a member of its cluster does not support it",
            missing.join(" and "),
            client.server_info().version,
            client.server_info().server_name
        ),
    ))
}

async fn ensure_stream(
    js: &Context,
    want: js_stream::Config,
) -> Result<js_stream::Stream, StoreError> {
    let name = want.name.clone();
    let mut stream = js.get_or_create_stream(want.clone()).await.map_err(|e| {
        StoreError::backend(format!("creating or opening JetStream stream '{name}'"), e)
    })?;
    let have = stream
        .info()
        .await
        .map_err(|e| StoreError::backend(format!("reading the settings of stream '{name}'"), e))?
        .config
        .clone();
    let missing: Vec<&String> = want
        .subjects
        .iter()
        .filter(|s| !have.subjects.contains(s))
        .collect();
    if !missing.is_empty() {
        return Err(StoreError::backend(
            format!("checking JetStream stream '{name}'"),
            format!(
                "the stream exists but does not capture {missing:?} (it captures {:?}); \
                 add those subjects to it, or configure another stream name or subject prefix",
                have.subjects
            ),
        ));
    }
    let mut update = have.clone();
    update.allow_direct = true;
    update.allow_atomic_publish |= want.allow_atomic_publish;
    if want.duplicate_window > Duration::ZERO {
        update.duplicate_window = want.duplicate_window;
    }
    if want.max_messages_per_subject != 0 {
        update.max_messages_per_subject = want.max_messages_per_subject;
    }
    if update != have {
        tracing::info!(stream = %name, "updating the stream to the settings kiln needs");
        js.update_stream(update).await.map_err(|e| {
            StoreError::backend(
                format!(
                    "updating stream '{name}' to allow direct get and atomic batches \
                     with the configured dedupe window"
                ),
                e,
            )
        })?;
        stream = js
            .get_stream(&name)
            .await
            .map_err(|e| StoreError::backend(format!("reopening stream '{name}'"), e))?;
    }
    Ok(stream)
}

impl Inner {
    /// No server answered for the stream: it is electing a leader (all of its
    /// replicas are there but none leads yet), or it is gone. Asks which,
    /// briefly: a deleted stream is reported at once by the meta leader, and
    /// a stream without a leader answers nothing, so every retry of an
    /// append during an election would wait out the lookup (2 s before:
    /// appends came back up to 1.8 s after a raw client's).
    pub(super) async fn no_responders(&self, op: String, subject: &str) -> StoreError {
        let name = &self.config.stream;
        // Milliseconds since the store was made (1 at least: 0 is "none").
        let now = (self.started.elapsed().as_millis() as u64).max(1);
        let since = match self.no_responders_since.compare_exchange(
            0,
            now,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => now,
            Err(since) => since,
        };
        let wait = if now.saturating_sub(since) > NO_RESPONDERS_PATIENCE.as_millis() as u64 {
            NO_RESPONDERS_LOOKUP_LONG
        } else {
            NO_RESPONDERS_LOOKUP
        };
        let lookup = tokio::time::timeout(wait, self.js.get_stream(name)).await;
        match lookup {
            Ok(Err(e)) if e.to_string().contains("not found") => StoreError::backend(
                op,
                format!("no JetStream stream captures '{subject}': stream '{name}' was deleted"),
            ),
            _ => self.electing(op),
        }
    }

    /// Does the event stream have a leader right now? One stream info request
    /// (answered by the leader), bounded by [`ACK_PATIENCE`]; no answer, an
    /// error or no leader in a cluster's answer all mean no.
    pub(super) async fn stream_has_leader(&self) -> bool {
        let api = format!("$JS.API.STREAM.INFO.{}", self.config.stream);
        let request = Request::new()
            .payload(Bytes::new())
            .timeout(Some(ACK_PATIENCE));
        let Ok(reply) = self.client.send_request(api, request).await else {
            return false;
        };
        #[derive(Deserialize)]
        struct Leader {
            #[serde(default)]
            leader: Option<String>,
        }
        #[derive(Deserialize)]
        struct Info {
            #[serde(default)]
            error: Option<serde_json::Value>,
            #[serde(default)]
            cluster: Option<Leader>,
        }
        match serde_json::from_slice::<Info>(&reply.payload) {
            Ok(info) if info.error.is_none() => info
                .cluster
                .is_none_or(|c| c.leader.is_some_and(|l| !l.is_empty())),
            _ => false,
        }
    }

    pub(super) fn electing(&self, op: String) -> StoreError {
        StoreError::Unavailable {
            op,
            reason: format!(
                "JetStream stream '{}' has no leader right now (electing a leader after a \
                 server left); retry in a moment",
                self.config.stream
            ),
        }
    }
}
