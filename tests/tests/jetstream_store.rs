//! The store conformance suite on JetStream (a real nats-server per test), plus
//! what only the JetStream backend promises: its wire format is usable from any
//! NATS client, kiln's own messages never reach a tail, and an existing stream is
//! checked (and fixed) at start-up.

use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use kiln::store::jetstream::{JetStreamConfig, JetStreamStore, NatsAuth, NatsTls};
use kiln::store::{AppendCondition, AppendRequest, EventStore, ExpectedVersion, StoreError};
use kiln_tests::conformance::{Harness, collect_tail, event, events, sid};
use kiln_tests::nats::{JetStreamHarness, NatsServer, test_config};
use uuid::Uuid;

kiln_tests::store_conformance!(JetStreamHarness);

/// A service in another language appends with its own NATS client, following the
/// documented wire format; kiln reads, versions and tails its events like its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_client_appends_follow_the_wire_format() {
    let h = JetStreamHarness::start().await;
    let s = h.store();
    must(s.append(AppendRequest::new(
        sid("order-9"),
        ExpectedVersion::NoStream,
        vec![event(1)],
    )))
    .await;
    let last = s.latest(&sid("order-9")).await.unwrap();
    // The foreign writer: plain publish with headers, guarded like kiln does.
    let client = async_nats::connect(h.server.url()).await.unwrap();
    let id = Uuid::new_v4();
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.to_string().as_str());
    headers.insert("Kiln-Type", "order.Shipped");
    headers.insert("Kiln-Version", "2");
    headers.insert("Kiln-Tags", "order-9,carrier:dhl");
    headers.insert("Kiln-Metadata", r#"{"source":"billing-service"}"#);
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        last.position.to_string().as_str(),
    );
    let reply = client
        .request_with_headers(
            "kiln.order.order-9",
            headers.clone(),
            Bytes::from(r#"{"by":"dhl"}"#),
        )
        .await
        .unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let seq = ack["seq"].as_u64().expect("stored");
    assert_eq!(s.latest_version(&sid("order-9")).await.unwrap(), 2);
    let got = s.read_stream(&sid("order-9"), 2, 10).await.unwrap();
    assert_eq!(got.len(), 1);
    let ev = &got[0];
    assert_eq!((ev.id, ev.version, ev.position), (id, 2, seq));
    assert_eq!(ev.event_type, "order.Shipped");
    assert_eq!(
        ev.tags,
        vec!["order-9".to_string(), "carrier:dhl".to_string()]
    );
    assert_eq!(
        ev.metadata.get("source").map(String::as_str),
        Some("billing-service")
    );
    // The same guard again is refused by the server: the stream moved.
    headers.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
    let reply = client
        .request_with_headers("kiln.order.order-9", headers, Bytes::from("{}"))
        .await
        .unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(ack["error"]["err_code"], 10071, "{ack}");
    let tailed = collect_tail(&*s, seq, 1).await;
    assert_eq!(&tailed[0], ev);
}

/// Tag markers, dedupe probes and snapshots live on subjects the tail never sees.
/// Regression (found by the fleet model test): with a foreign message last
/// on the stream, the head was the *earliest* of the per-subject last events
/// (a multi-subject "last" get answered per subject), not the last event:
/// 6 with events up to 19. A head too low makes a warming version look
/// caught up early. Removed messages and tag markers in between too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_head_is_the_last_event_whatever_follows_it() {
    let h = JetStreamHarness::start().await;
    let s = h.store();
    let client = async_nats::connect(h.server.url()).await.unwrap();
    let publish_foreign = |subject: &'static str| {
        let client = client.clone();
        async move {
            let reply = client
                .request(subject, Bytes::from_static(b"not a kiln event"))
                .await
                .unwrap();
            let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
            ack["seq"].as_u64().expect("stored")
        }
    };
    let mut last = 0;
    for (i, stream) in ["user-1", "user-2", "order-1", "user-3", "user-1"]
        .iter()
        .enumerate()
    {
        let mut e = event(i as u64);
        if i == 3 {
            e = e.with_tags(["account-1"]);
        }
        last = must(s.append(AppendRequest::new(
            sid(stream),
            ExpectedVersion::Any,
            vec![e],
        )))
        .await
        .position;
    }
    assert_eq!(s.head().await.unwrap(), last);
    // Foreign messages after it, on an event subject of another stream and on
    // one of its own.
    publish_foreign("kiln.zz.zz-1").await;
    let removed = publish_foreign("kiln.user.user-2").await;
    publish_foreign("kiln.zz.zz-2").await;
    assert_eq!(s.head().await.unwrap(), last);
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("KILN").await.unwrap();
    assert!(stream.delete_message(removed).await.unwrap());
    assert_eq!(s.head().await.unwrap(), last);
    // A tagged event last: its marker follows it.
    let tagged = must(s.append(AppendRequest::new(
        sid("user-4"),
        ExpectedVersion::Any,
        vec![event(9).with_tags(["account-2"])],
    )))
    .await
    .position;
    publish_foreign("kiln.zz.zz-3").await;
    assert_eq!(s.head().await.unwrap(), tagged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_events_reach_the_tail() {
    let h = JetStreamHarness::start().await;
    let s = h.store();
    let mut appended = Vec::new();
    for i in 0..5u64 {
        let req = AppendRequest::new(
            sid(&format!("seat-{i}")),
            ExpectedVersion::NoStream,
            events(i * 10, 2)
                .into_iter()
                .map(|e| e.with_tags(["show-1", "hall:a"]))
                .collect(),
        )
        .with_condition(AppendCondition {
            tags: vec!["hall:b".into()],
            after: s.head().await.unwrap(),
        });
        let r = must(s.append(req.clone())).await;
        // A retry is answered from the dedupe window and writes nothing.
        assert_eq!(must(s.append(req)).await, r);
        s.save_snapshot(&sid(&format!("seat-{i}")), 2, Bytes::from("snap"))
            .await
            .unwrap();
        appended.push(r);
    }
    let got = collect_tail(&*s, 1, 10).await;
    assert!(got.iter().all(|e| e.stream.category() == "seat"));
    let positions: Vec<u64> = got.iter().map(|e| e.position).collect();
    let want: Vec<u64> = appended
        .iter()
        .flat_map(|r| r.first_position..=r.position)
        .collect();
    assert_eq!(positions, want);
    // Markers sit between the events: positions have gaps. The head is the
    // last event's position, though markers come after it: a tail reaches it.
    assert_eq!(s.head().await.unwrap(), want[want.len() - 1]);
}

/// Stream ids use only characters valid in a subject token: nothing is escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_id_character_is_a_subject_token_character() {
    let h = JetStreamHarness::start().await;
    let s = h.store();
    let id = sid("acct:eu@x+y=z_w-42");
    must(s.append(AppendRequest::new(
        id.clone(),
        ExpectedVersion::NoStream,
        vec![event(1)],
    )))
    .await;
    let got = s.read_stream(&id, 1, 10).await.unwrap();
    assert_eq!(got[0].stream, id);
    assert_eq!(got[0].stream.category(), "acct:eu@x+y=z_w");
}

/// Creates stream `SHARED` capturing kiln's subjects under prefix `shop`
/// and `extra`, with none of kiln's settings.
async fn shared_stream(
    client: &async_nats::Client,
    extra: &[&str],
) -> async_nats::jetstream::Context {
    let js = async_nats::jetstream::new(client.clone());
    let subjects: Vec<String> = ["shop.*.*", "shop._kiln.tag.*", "shop._kiln.probe.*"]
        .into_iter()
        .chain(extra.iter().copied())
        .map(str::to_string)
        .collect();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SHARED".into(),
        subjects,
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

/// An existing stream missing kiln's settings is updated; one capturing other
/// subjects is refused with a message saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_streams_are_checked_at_start_up() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = shared_stream(&client, &[]).await;
    let mut config = test_config(&server.url());
    config.stream = "SHARED".into();
    config.subject_prefix = "shop".into();
    let store = JetStreamStore::connect(config.clone())
        .await
        .expect("adopts the stream");
    let info = js
        .get_stream("SHARED")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert!(info.config.allow_direct && info.config.allow_atomic_publish);
    assert_eq!(
        info.config.duplicate_window,
        Duration::from_millis(config.duplicate_window_ms)
    );
    drop(store);

    let mut other = JetStreamConfig::new(server.url());
    other.stream = "SHARED".into();
    other.subject_prefix = "elsewhere".into();
    let err = match JetStreamStore::connect(other).await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a stream not capturing kiln's subjects must be refused"),
    };
    assert!(
        err.contains("SHARED") && err.contains("elsewhere.*.*"),
        "{err}"
    );
}

/// Relaxed appends racing on one stream all land, with gap-free versions: the
/// server refuses stale guards and the losers read again and retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relaxed_appends_under_contention_all_land() {
    let h = JetStreamHarness::start().await;
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = h.store();
            tokio::spawn(async move {
                for j in 0..10u64 {
                    let evs = if j % 2 == 0 {
                        vec![event(i * 100 + j)]
                    } else {
                        events(i * 100 + j, 3)
                    };
                    s.append(AppendRequest::new(sid("hot-1"), ExpectedVersion::Any, evs))
                        .await
                        .expect("a relaxed append always lands");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = h.store();
    assert_eq!(
        s.latest_version(&sid("hot-1")).await.unwrap(),
        16 * (5 + 15)
    );
    let all = s.read_stream(&sid("hot-1"), 1, 1000).await.unwrap();
    let versions: Vec<u64> = all.iter().map(|e| e.version).collect();
    assert_eq!(versions, (1..=320).collect::<Vec<_>>());
    let mid = s.read_stream(&sid("hot-1"), 177, 3).await.unwrap();
    assert_eq!(
        mid.iter().map(|e| e.version).collect::<Vec<_>>(),
        vec![177, 178, 179]
    );
}

async fn must<F>(f: F) -> kiln::store::AppendResult
where
    F: std::future::Future<Output = Result<kiln::store::AppendResult, StoreError>>,
{
    f.await
        .unwrap_or_else(|e| panic!("append should succeed: {e}"))
}

/// Connects with `config`, appends and reads the version back: the connection
/// options worked end to end.
async fn round_trip(config: JetStreamConfig) {
    let store = JetStreamStore::connect(config)
        .await
        .unwrap_or_else(|e| panic!("connecting: {e}"));
    must(store.append(AppendRequest::new(
        sid("auth-1"),
        ExpectedVersion::Any,
        vec![event(1)],
    )))
    .await;
    assert!(store.latest_version(&sid("auth-1")).await.unwrap() >= 1);
}

/// Connecting with `config` fails with an error naming the server.
async fn refused(config: JetStreamConfig, why: &str) -> String {
    let attempt = tokio::time::timeout(Duration::from_secs(20), JetStreamStore::connect(config));
    match attempt.await {
        Ok(Ok(_)) => panic!("{why}: the connection was accepted"),
        Ok(Err(e)) => {
            let message = e.to_string();
            assert!(
                message.contains("connecting to NATS at"),
                "{why}: {message}"
            );
            message
        }
        Err(_) => panic!("{why}: connect neither succeeded nor failed within 20 s"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_password_and_token_authentication() {
    let server = tokio::task::spawn_blocking(|| {
        NatsServer::start_with(&["--user", "kiln", "--pass", "s3cret"])
    })
    .await
    .unwrap();
    let mut config = test_config(&server.url());
    config.auth = NatsAuth::UserPassword {
        user: "kiln".into(),
        password: "s3cret".into(),
    };
    round_trip(config.clone()).await;
    config.auth = NatsAuth::UserPassword {
        user: "kiln".into(),
        password: "wrong".into(),
    };
    let m = refused(config.clone(), "a wrong password").await;
    assert!(m.to_lowercase().contains("authoriz"), "{m}");
    config.auth = NatsAuth::None;
    refused(config, "no credentials").await;

    let server =
        tokio::task::spawn_blocking(|| NatsServer::start_with(&["--auth", "t0ken-for-kiln"]))
            .await
            .unwrap();
    let mut config = test_config(&server.url());
    config.auth = NatsAuth::Token {
        token: "t0ken-for-kiln".into(),
    };
    round_trip(config.clone()).await;
    config.auth = NatsAuth::Token {
        token: "another".into(),
    };
    refused(config, "a wrong token").await;
}

/// A CA and a server certificate for 127.0.0.1, made with the openssl CLI.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("running openssl (apt package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=kiln test CA"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    run(&ca);
    let mut csr = vec!["req", "-subj", "/CN=127.0.0.1"];
    csr.extend(ec);
    csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
    run(&csr);
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.pem",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let (cert, key) = (
        certs.path().join("server.pem"),
        certs.path().join("server.key"),
    );
    let server = tokio::task::spawn_blocking(move || {
        let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
        NatsServer::start_with(&["--tls", "--tlscert", cert, "--tlskey", key])
    })
    .await
    .unwrap();
    let url = format!("tls://127.0.0.1:{}", server.port());
    let mut config = test_config(&url);
    config.tls = Some(NatsTls {
        ca_file: Some(certs.path().join("ca.pem")),
        ..NatsTls::default()
    });
    round_trip(config.clone()).await;
    // Without the CA the server's certificate is not trusted.
    config.tls = Some(NatsTls::default());
    refused(config, "an untrusted certificate").await;
}

/// Publishes one raw message (another service, a typo'd publisher) and
/// returns the sequence the server stored it at.
async fn publish_raw(
    client: &async_nats::Client,
    subject: &str,
    headers: HeaderMap,
    payload: &'static str,
) -> u64 {
    let reply = client
        .request_with_headers(subject.to_string(), headers, Bytes::from(payload))
        .await
        .unwrap_or_else(|e| panic!("raw publish on {subject}: {e}"));
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    ack["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("raw publish on {subject} was not stored: {ack}"))
}

/// Headers of a well-formed kiln event, for raw publishes to spoil one by
/// one: `guard` is its `Nats-Expected-Last-Subject-Sequence`, if any.
fn kiln_headers(version: &str, guard: Option<u64>) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", Uuid::new_v4().to_string().as_str());
    h.insert("Kiln-Type", "user.Renamed");
    h.insert("Kiln-Version", version);
    if let Some(g) = guard {
        h.insert(
            "Nats-Expected-Last-Subject-Sequence",
            g.to_string().as_str(),
        );
    }
    h
}

/// Every kind of message on an event subject that is not a kiln event: tails
/// and reads skip it (recorded with its position), `latest` reports the last
/// kiln event, appends after it are refused naming it, other streams carry
/// on, and nothing overflows. A marker with an absurd position blocks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_messages_never_stop_kiln() {
    let h = JetStreamHarness::start().await;
    let s = h.store();
    let client = async_nats::connect(h.server.url()).await.unwrap();
    let mut want = Vec::new();
    let mut last = Vec::new();
    let blocked = ["user-1", "user-2", "user-3", "user-5"];
    for stream in blocked {
        let r = must(s.append(AppendRequest::new(
            sid(stream),
            ExpectedVersion::NoStream,
            events(1, 2),
        )))
        .await;
        want.extend(r.first_position..=r.position);
        last.push(Some(r.position));
    }
    let mut foreign = Vec::new();
    // No kiln headers at all, and not JSON.
    foreign.push(publish_raw(&client, "kiln.user.user-1", HeaderMap::new(), "hello").await);
    // A version that would overflow `version + 1`.
    foreign.push(
        publish_raw(
            &client,
            "kiln.user.user-2",
            kiln_headers("18446744073709551615", last[1]),
            "{}",
        )
        .await,
    );
    // Good headers, data that is not JSON.
    foreign.push(
        publish_raw(
            &client,
            "kiln.user.user-3",
            kiln_headers("3", last[2]),
            "{nope",
        )
        .await,
    );
    // Good headers and data, published past the version check (no guard):
    // its version is not known to follow.
    foreign.push(publish_raw(&client, "kiln.user.user-5", kiln_headers("3", None), "{}").await);
    // A category token that is not the stream id's.
    foreign.push(
        publish_raw(
            &client,
            "kiln.order.user-9",
            kiln_headers("1", Some(0)),
            "{}",
        )
        .await,
    );
    // A first event (guard 0) whose version does not follow nothing.
    foreign.push(
        publish_raw(
            &client,
            "kiln.user.user-6",
            kiln_headers("5", Some(0)),
            "{}",
        )
        .await,
    );
    // A tag marker pointing far beyond the log.
    let mut marker = HeaderMap::new();
    marker.insert("Kiln-Tag-Position", "18446744073709551615");
    let marker_seq = publish_raw(&client, "kiln._kiln.tag.vip", marker, "").await;
    // Good events after all of them, on another stream, in the same pull batch.
    let r = must(s.append(AppendRequest::new(
        sid("user-4"),
        ExpectedVersion::NoStream,
        events(1, 3),
    )))
    .await;
    want.extend(r.first_position..=r.position);

    // The tail skips every foreign message and drops no good event after one.
    let tailed = collect_tail(&*s, 1, want.len()).await;
    assert_eq!(tailed.iter().map(|e| e.position).collect::<Vec<_>>(), want);
    let health = s.health();
    let seen: Vec<u64> = health.foreign_messages.iter().map(|f| f.position).collect();
    assert_eq!(seen, foreign, "{health:?}");
    assert_eq!(health.foreign_messages_total, foreign.len() as u64);
    assert!(
        health.foreign_messages[0].reason.contains("Nats-Msg-Id"),
        "{health:?}"
    );
    assert!(
        health.foreign_messages[3]
            .reason
            .contains("no version guard"),
        "{health:?}"
    );
    assert!(
        health.foreign_messages[5]
            .reason
            .contains("does not follow"),
        "{health:?}"
    );
    // A stream holding only a foreign message is empty: version 0.
    assert_eq!(s.latest_version(&sid("user-6")).await.unwrap(), 0);
    // The head is the last kiln event; latest and reads step over foreign messages.
    assert_eq!(s.head().await.unwrap(), want[want.len() - 1]);
    for (i, stream) in blocked.iter().enumerate() {
        let head = s.latest(&sid(stream)).await.unwrap();
        assert_eq!(head.version, 2, "{stream}");
        assert!(head.position < foreign[i], "{stream}");
        let read = s.read_stream(&sid(stream), 1, 10).await.unwrap();
        assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), [1, 2]);
        // An append after the foreign message is refused, naming it.
        let err = s
            .append(AppendRequest::new(
                sid(stream),
                ExpectedVersion::Any,
                vec![event(3)],
            ))
            .await
            .unwrap_err();
        match &err {
            StoreError::ForeignMessage { position, .. } => assert_eq!(*position, foreign[i]),
            other => panic!("{stream}: expected a foreign-message error, got {other}"),
        }
        assert!(err.to_string().contains(&foreign[i].to_string()), "{err}");
    }
    // Other streams carry on, and the absurd marker blocks nothing after it.
    must(
        s.append(
            AppendRequest::new(sid("user-4"), ExpectedVersion::Exact(3), vec![event(4)])
                .with_condition(AppendCondition {
                    tags: vec!["vip".into()],
                    after: marker_seq,
                }),
        ),
    )
    .await;
    // Removing the foreign message unblocks its stream.
    let js = async_nats::jetstream::new(client.clone());
    js.get_stream("KILN")
        .await
        .unwrap()
        .delete_message(foreign[0])
        .await
        .unwrap();
    must(s.append(AppendRequest::new(
        sid("user-1"),
        ExpectedVersion::Exact(2),
        vec![event(3)],
    )))
    .await;
}

/// A server before atomic batches (2.11) is refused at connect, naming its
/// version and what is missing, before kiln creates anything on it. On that
/// server a batch commit is acknowledged without a message count, which is
/// why kiln accepts an append's ack only with the right count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_atomic_batches_is_refused() {
    let program = kiln_tests::nats::old_server_program();
    let server = tokio::task::spawn_blocking(move || NatsServer::start_program(&program, &[]))
        .await
        .unwrap();
    let err = match JetStreamStore::connect(test_config(&server.url())).await {
        Ok(_) => panic!("kiln started on nats-server 2.11"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("2.11.") && err.contains("atomic batch") && err.contains("2.12"),
        "{err}"
    );
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let names: Vec<String> = futures::TryStreamExt::try_collect(js.stream_names())
        .await
        .unwrap();
    assert!(names.is_empty(), "nothing created: {names:?}");
    // What kiln would have had to deal with: a "batch" the server stores as
    // separate messages, its commit acknowledged without a count.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "OLD".into(),
        subjects: vec!["old.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut first = HeaderMap::new();
    first.insert("Nats-Batch-Id", "b1");
    first.insert("Nats-Batch-Sequence", "1");
    client
        .publish_with_headers("old.a", first, Bytes::from("{}"))
        .await
        .unwrap();
    let mut commit = HeaderMap::new();
    commit.insert("Nats-Batch-Id", "b1");
    commit.insert("Nats-Batch-Sequence", "2");
    commit.insert("Nats-Batch-Commit", "1");
    let reply = client
        .request_with_headers("old.a", commit, Bytes::from("{}"))
        .await
        .unwrap();
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert!(ack.get("count").is_none(), "{ack}");
}

/// One replica on file storage is only as durable as the server's periodic
/// sync: `kiln serve` warns about it at start (this is the text it logs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_is_flagged_as_not_synced_on_every_write() {
    let h = JetStreamHarness::start().await;
    let warning = h.jetstream().durability_warning().expect("a warning");
    assert!(
        warning.contains("1 replica") && warning.contains("sync_interval: always"),
        "{warning}"
    );
}

/// A stream shared with another service that publishes on subjects of its
/// own (kiln's stream captures them too): their messages sit between kiln's
/// events, and a tail hands out kiln's events only, counts none of them as
/// foreign, and its positions step over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_services_subjects_on_a_shared_stream_never_reach_a_tail() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    shared_stream(&client, &["billing.>"]).await;
    let mut config = test_config(&server.url());
    config.stream = "SHARED".into();
    config.subject_prefix = "shop".into();
    let s = JetStreamStore::connect(config)
        .await
        .expect("adopts the stream");
    let mut want = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..6u64 {
        theirs.push(
            publish_raw(
                &client,
                &format!("billing.invoice.{i}"),
                HeaderMap::new(),
                "{}",
            )
            .await,
        );
        let r = must(s.append(AppendRequest::new(
            sid(&format!("cart-{i}")),
            ExpectedVersion::NoStream,
            events(1, 2),
        )))
        .await;
        want.extend(r.first_position..=r.position);
        theirs.push(
            publish_raw(
                &client,
                "billing.deep.nested.subject",
                HeaderMap::new(),
                "x",
            )
            .await,
        );
    }
    let tailed = collect_tail(&s, 1, want.len()).await;
    assert_eq!(tailed.iter().map(|e| e.position).collect::<Vec<_>>(), want);
    assert!(tailed.iter().all(|e| e.stream.category() == "cart"));
    assert!(theirs.iter().all(|p| !want.contains(p)));
    let health = s.health();
    assert_eq!(health.foreign_messages_total, 0, "{health:?}");
    // Their messages after kiln's last event: the tail waits on, nothing else.
    assert_eq!(s.head().await.unwrap(), want[want.len() - 1]);
}
