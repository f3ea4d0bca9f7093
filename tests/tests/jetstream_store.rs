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

/// An existing stream missing kiln's settings is updated; one capturing other
/// subjects is refused with a message saying what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn existing_streams_are_checked_at_start_up() {
    let server = tokio::task::spawn_blocking(NatsServer::start)
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "SHARED".into(),
        subjects: vec![
            "shop.*.*".into(),
            "shop._kiln.tag.*".into(),
            "shop._kiln.probe.*".into(),
        ],
        ..Default::default()
    })
    .await
    .unwrap();
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
