//! The HTTP surface under hostile and heavy clients, against a real `kiln
//! serve` over raw sockets: private by default (an operations listener,
//! tokens, no cross-site writes or rebinding reads), bounded in time (header,
//! idle, body and write timeouts, a connection cap, a shutdown within its
//! grace) and in memory (bytes, not counts: followers, pages, uploads).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kiln_tests::daemon::{Daemon, Options, free_port, projections_dir};
use kiln_tests::wasm::USERS;

/// A daemon whose `[api]` table is `api` (plus `extra`'s options).
fn daemon(api: &str, extra: Options) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("kiln.toml");
    std::fs::write(&path, format!("[api]\n{api}\n")).expect("config file");
    let d = Daemon::start_with(extra.arg("--config").arg(path.to_str().expect("utf-8")));
    (d, dir)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    s
}

/// Sends `request` on a fresh connection and reads the whole answer (the
/// connection is closed by the request's `Connection: close`).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = connect(addr);
    s.write_all(request).expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse(&out)
}

fn parse(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// A request with these headers (`Host` and `Connection: close` added unless given).
fn request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        r.push_str("Host: 127.0.0.1\r\n");
    }
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    r.push_str(&format!(
        "Connection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    ));
    let mut bytes = r.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Whether the peer closes `s` within `within` (EOF or reset), reading and
/// dropping whatever comes first.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// The daemon's resident memory, in MB.
fn rss_mb(d: &Daemon) -> f64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", d.pid().expect("pid"))).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .expect("VmRSS")
        / 1024.0
}

fn append_json(stream: &str, data: &str) -> Vec<u8> {
    let body = format!(r#"[{{"type":"UserRegistered","data":{data}}}]"#);
    request(
        "POST",
        &format!("/streams/{stream}/events"),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// SIGTERM while a follower, a half-sent header and a slow upload hold
/// connections: the daemon is gone within its grace (2 s here), and the
/// follower's answer ended cleanly (the chunked terminator), not cut.
#[test]
fn sigterm_returns_within_the_grace_whatever_clients_hold() {
    let (mut d, _cfg) = daemon(
        "shutdown_grace_ms = 2000\nheader_timeout_ms = 60000\nbody_timeout_ms = 60000",
        Options::default(),
    );
    let addr = d.addr();
    assert_eq!(exchange(addr, &append_json("user-1", "{}")).0, 200);
    let mut follower = connect(addr);
    follower
        .write_all(b"GET /events?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("follow");
    let mut half = connect(addr);
    half.write_all(b"GET /views HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .expect("half a head");
    let mut slow = connect(addr);
    slow.write_all(
        b"POST /streams/user-2/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"type\"",
    )
    .expect("part of a body");
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let status = d.stop().expect("it was running");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "SIGTERM took {took:?} with a 2 s grace"
    );
    assert!(status.success(), "exit status {status}");
    let mut got = Vec::new();
    let _ = follower.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("\"position\":1"), "{text}");
    assert!(
        text.ends_with("\r\n0\r\n\r\n"),
        "the follower's stream ended with its terminator: {text:?}"
    );
    drop((half, slow));
}

/// A silent socket, a header trickled byte by byte and an idle keep-alive
/// connection are closed after the header timeout; a body that does not
/// arrive in time is a 408.
#[test]
fn silent_trickling_and_idle_connections_are_closed_and_slow_bodies_get_408() {
    let (d, _cfg) = daemon(
        "header_timeout_ms = 500\nbody_timeout_ms = 500",
        Options::default(),
    );
    let addr = d.addr();
    let mut silent = connect(addr);
    assert!(closed_within(&mut silent, Duration::from_secs(5)), "silent");

    let mut trickle = connect(addr);
    let started = Instant::now();
    let mut closed = false;
    for b in b"GET /views HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: yes".iter() {
        if trickle.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        if started.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    assert!(
        closed || closed_within(&mut trickle, Duration::from_secs(3)),
        "a trickled header kept its connection"
    );

    let mut idle = connect(addr);
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .expect("request");
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).expect("an answer");
    assert_eq!(&first, b"HTTP/1.1 200");
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)),
        "idle keep-alive"
    );

    let mut slow = connect(addr);
    slow.write_all(
        b"POST /streams/user-2/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\
          Content-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"type\"",
    )
    .expect("part of a body");
    let mut got = Vec::new();
    let _ = slow.read_to_end(&mut got);
    let (status, body) = parse(&got);
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("body_timeout"), "{body}");
}

/// One connection over `max_connections` gets a clear 503 and is closed;
/// the operations listener has its own connections, so probes still answer;
/// once the idle sockets go, the API answers again.
#[test]
fn a_connection_over_the_cap_is_refused_clearly() {
    let ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (d, _cfg) = daemon(
        "max_connections = 4\nheader_timeout_ms = 30000",
        Options::default().arg("--ops-listen").arg(&ops.to_string()),
    );
    let addr = d.addr();
    let held: Vec<TcpStream> = (0..4).map(|_| connect(addr)).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (status, body) = exchange(addr, &request("GET", "/healthz", &[], b""));
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("too_many_connections") && body.contains('4'),
        "{body}"
    );
    let (status, _) = exchange(ops, &request("GET", "/healthz", &[], b""));
    assert_eq!(status, 200, "the operations listener answers");
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, _) = exchange(addr, &request("GET", "/healthz", &[], b""));
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the API did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What a web page in the operator's browser can send to a daemon on
/// loopback: a `text/plain` or form body, a foreign `Origin`, a foreign
/// `Host` (DNS rebinding). None of it writes, deploys, retires or reads.
#[test]
fn browsers_cannot_write_or_read_across_sites() {
    let dir = projections_dir(&[USERS]);
    let (d, _cfg) = daemon(
        "allowed_hosts = [\"kiln.internal\"]",
        Options::default().projections(dir.path()),
    );
    // Active before the requests below, so "still active" at the end means
    // the refused retire did nothing (not merely that the warm-up ended).
    assert!(
        d.wait_for_status("/readyz/users", 200, Duration::from_secs(30)),
        "users never became active: {}",
        d.log()
    );
    let addr = d.addr();
    let body = br#"[{"type":"UserRegistered","data":{}}]"#;
    for ct in ["text/plain", "application/x-www-form-urlencoded", ""] {
        let headers: Vec<(&str, &str)> = if ct.is_empty() {
            vec![]
        } else {
            vec![("Content-Type", ct)]
        };
        let (status, answer) = exchange(
            addr,
            &request("POST", "/streams/user-1/events", &headers, body),
        );
        assert_eq!(status, 415, "{ct}: {answer}");
        assert!(answer.contains("unsupported_media_type"), "{answer}");
    }
    let foreign = [
        ("Content-Type", "application/json"),
        ("Origin", "http://evil.example"),
    ];
    let (status, answer) = exchange(
        addr,
        &request("POST", "/streams/user-1/events", &foreign, body),
    );
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("foreign_origin"), "{answer}");
    let wasm = std::fs::read(kiln_tests::wasm::ORDERS).expect("module");
    let (status, answer) = exchange(
        addr,
        &request(
            "POST",
            "/admin/views",
            &[
                ("Content-Type", "application/wasm"),
                ("Origin", "http://evil.example"),
            ],
            &wasm,
        ),
    );
    assert_eq!(status, 403, "{answer}");
    let (status, answer) = exchange(
        addr,
        &request(
            "POST",
            "/admin/views/users-1_0_0/retire",
            &[("Origin", "null")],
            b"",
        ),
    );
    assert_eq!(status, 403, "{answer}");
    for path in ["/views", "/events?follow=false", "/views/users/user-1"] {
        let (status, answer) = exchange(
            addr,
            &request("GET", path, &[("Host", "rebound.evil.example:7070")], b""),
        );
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(answer.contains("foreign_host"), "{answer}");
    }
    // Nothing was written, deployed or retired.
    let (_, head) = exchange(addr, &request("GET", "/streams/user-1", &[], b""));
    assert!(head.contains("\"version\":0"), "{head}");
    let (_, views) = exchange(addr, &request("GET", "/views", &[], b""));
    assert!(!views.contains("orders"), "{views}");
    assert!(views.contains("\"state\":\"active\""), "{views}");
    // The same origin, a loopback name and an allowed host are fine.
    let origin = format!("http://{addr}");
    let host = addr.to_string();
    let own = [
        ("Content-Type", "application/json"),
        ("Host", host.as_str()),
        ("Origin", origin.as_str()),
    ];
    let (status, answer) = exchange(addr, &request("POST", "/streams/user-1/events", &own, body));
    assert_eq!(status, 200, "{answer}");
    for host in ["localhost:7070", "kiln.internal", "[::1]:7070"] {
        let (status, answer) = exchange(addr, &request("GET", "/views", &[("Host", host)], b""));
        assert_eq!(status, 200, "{host}: {answer}");
    }
}

/// `--ops-listen` serves probes and metrics and nothing else; on the data
/// listener, the read, write and admin tokens each open what they should.
#[test]
fn the_ops_listener_and_the_tokens() {
    let ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (d, _cfg) = daemon(
        "",
        Options::default()
            .admin_token("adm")
            .arg("--ops-listen")
            .arg(&ops.to_string())
            .arg("--read-token")
            .arg("rd")
            .arg("--write-token")
            .arg("wr"),
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = exchange(ops, &request("GET", path, &[], b""));
        assert_eq!(status, 200, "{path}: {body}");
    }
    for path in [
        "/views",
        "/events?follow=false",
        "/streams/user-1",
        "/",
        "/store/health",
    ] {
        let (status, body) = exchange(ops, &request("GET", path, &[], b""));
        assert_eq!(status, 404, "{path} on the ops listener: {body}");
    }
    let (status, _) = exchange(ops, &append_json("user-1", "{}"));
    assert_eq!(status, 404, "no appends on the ops listener");

    let addr = d.addr();
    let with = |token: &str| format!("Bearer {token}");
    let read = |auth: Option<&str>| {
        let h: Vec<(&str, &str)> = auth.map(|a| vec![("Authorization", a)]).unwrap_or_default();
        exchange(addr, &request("GET", "/views", &h, b"")).0
    };
    assert_eq!(read(None), 401);
    assert_eq!(read(Some(&with("nope"))), 401);
    for t in ["rd", "wr", "adm"] {
        assert_eq!(read(Some(&with(t))), 200, "{t} reads");
    }
    let append = |auth: &str| {
        let h = [
            ("Content-Type", "application/json"),
            ("Authorization", auth),
        ];
        exchange(
            addr,
            &request(
                "POST",
                "/streams/user-1/events",
                &h,
                br#"[{"type":"UserRegistered","data":{}}]"#,
            ),
        )
        .0
    };
    assert_eq!(append(&with("rd")), 401, "a read token does not write");
    assert_eq!(append(&with("wr")), 200);
    assert_eq!(append(&with("adm")), 200);
    let (status, _) = exchange(
        addr,
        &request(
            "POST",
            "/admin/views/users-1_0_0/retire",
            &[("Authorization", &with("wr"))],
            b"",
        ),
    );
    assert_eq!(status, 401, "a write token is not an admin token");
    assert_eq!(
        exchange(addr, &request("GET", "/healthz", &[], b"")).0,
        200,
        "probes need no token on the data listener either"
    );
}

/// Memory follows bytes, not counts: five followers that stop reading a log
/// of 300 events of 240 KB (72 MB) hold a bounded amount each and are cut
/// after the write timeout; a sixth follower over the cap is refused;
/// listing pages and stream reads stop at `page_bytes`; uploads without
/// the admin token are not kept.
#[test]
fn memory_is_bounded_by_bytes_not_counts() {
    let dir = projections_dir(&[USERS]);
    let (d, _cfg) = daemon(
        "max_followers = 5\nwrite_timeout_ms = 1500\npage_bytes = 1048576",
        Options::default()
            .projections(dir.path())
            .admin_token("adm"),
    );
    let addr = d.addr();
    let blob = "x".repeat(240 * 1024);
    for i in 0..300 {
        let (status, body) = exchange(
            addr,
            &append_json(
                &format!("big-{}", i % 3),
                &format!(r#"{{"blob":"{blob}"}}"#),
            ),
        );
        assert_eq!(status, 200, "{body}");
    }
    let log_bytes = 300 * blob.len();
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_mb(&d);
    let mut followers: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut s = connect(addr);
            s.write_all(b"GET /events?follow=true HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                .expect("follow");
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    let held = rss_mb(&d);
    let (status, body) = exchange(addr, &request("GET", "/events?follow=true", &[], b""));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too_many_followers"), "{body}");
    // The write timeout cuts them: none gets the whole log.
    std::thread::sleep(Duration::from_secs(3));
    let mut got = Vec::new();
    let _ = followers[0].read_to_end(&mut got);
    assert!(
        got.len() < log_bytes,
        "a stalled follower was cut: it read {} of {log_bytes} bytes",
        got.len()
    );
    drop(followers);
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_mb(&d);
    eprintln!(
        "RSS: {before:.0} MB before, {held:.0} MB with 5 stalled followers over a {} MB log, \
         {after:.0} MB after they were cut",
        log_bytes / 1_000_000
    );
    assert!(
        held - before < 150.0,
        "5 stalled followers took {:.0} MB (budget 150 MB; each holds at most one 8 MiB \
         batch and one 64 KiB chunk)",
        held - before
    );
    // A stream read stops at 1 MiB of events and says where to go on.
    let (status, body) = exchange(
        addr,
        &request("GET", "/streams/big-0/events?limit=1000", &[], b""),
    );
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let n = page["events"].as_array().expect("events").len();
    assert!((1..=6).contains(&n), "{n} events of 240 KB in a 1 MiB page");
    assert_eq!(page["next"], n as u64 + 1, "next: {}", page["next"]);
    let (status, body) = exchange(
        addr,
        &request("GET", "/streams/big-0/events?limit=5000", &[], b""),
    );
    assert_eq!(status, 400, "a limit over max_page is refused: {body}");
    // Uploads without the token are drained, not kept.
    let before = rss_mb(&d);
    let junk = vec![0u8; 15 * 1024 * 1024];
    let uploads: Vec<_> = (0..6)
        .map(|_| {
            let junk = junk.clone();
            std::thread::spawn(move || {
                exchange(
                    addr,
                    &request(
                        "POST",
                        "/admin/views",
                        &[("Content-Type", "application/wasm")],
                        &junk,
                    ),
                )
                .0
            })
        })
        .collect();
    for u in uploads {
        assert_eq!(u.join().expect("upload"), 401);
    }
    let after = rss_mb(&d);
    assert!(
        after - before < 40.0,
        "6 unauthenticated 15 MiB uploads took {:.0} MB",
        after - before
    );
}

/// A listing page stops at `page_bytes` and its `next` cursor leads through
/// every document once.
#[test]
fn listing_pages_stop_at_their_byte_budget() {
    let dir = projections_dir(&[USERS]);
    let (d, _cfg) = daemon(
        "page_bytes = 2048",
        Options::default().projections(dir.path()),
    );
    let addr = d.addr();
    for i in 0..60 {
        let (status, body) = exchange(
            addr,
            &append_json(&format!("user-{i:03}"), r#"{"name":"n","email":"e"}"#),
        );
        assert_eq!(status, 200, "{body}");
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let path = match &after {
            Some(a) => format!("/views/users?limit=1000&after={a}&position=60"),
            None => "/views/users?limit=1000&position=60".to_string(),
        };
        let (status, body) = exchange(addr, &request("GET", &path, &[], b""));
        assert_eq!(status, 200, "{body}");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let items = page["items"].as_array().expect("items");
        assert!(
            items.len() < 60,
            "a 2 KiB page held {} documents",
            items.len()
        );
        seen.extend(
            items
                .iter()
                .map(|i| i["key"].as_str().expect("key").to_string()),
        );
        pages += 1;
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
        assert!(Instant::now() < deadline);
    }
    let want: Vec<String> = (0..60).map(|i| format!("user-{i:03}")).collect();
    assert_eq!(
        seen, want,
        "every document once, in order, over {pages} pages"
    );
    assert!(pages > 2);
}

/// What the HTTP layer refuses before a request reaches kiln is answered
/// in JSON like every other error: a header too large, a URI too long,
/// bytes that are not HTTP.
#[test]
fn even_unreadable_requests_get_a_json_error() {
    let (d, _cfg) = daemon("", Options::default());
    let addr = d.addr();
    let big_header = format!(
        "GET /views HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    // Under hyper's read buffer: it parses these whole, kiln refuses them.
    let header_over_64k = format!(
        "GET /views HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let long_uri = format!(
        "GET /{} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "a".repeat(100_000)
    );
    for (raw, status, code) in [
        (big_header.as_bytes(), 431, "headers_too_large"),
        (header_over_64k.as_bytes(), 431, "headers_too_large"),
        (long_uri.as_bytes(), 414, "uri_too_long"),
        (&b"GARBAGE\r\n\r\n"[..], 400, "malformed_request"),
    ] {
        let (got, body) = exchange(addr, raw);
        assert_eq!(got, status, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
        assert_eq!(answer["error"]["code"], code, "{body}");
    }
    // And the daemon answers the next client as usual.
    assert_eq!(exchange(addr, &request("GET", "/healthz", &[], b"")).0, 200);
}
