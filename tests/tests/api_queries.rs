//! Queries through real HTTP against a real `kiln serve`: view specs (bare name,
//! exact id, semver requirement), paged prefix and range listings, and JSON
//! errors with stable codes for everything a client can get wrong.

use std::time::Duration;

use kiln_tests::daemon::{Api, Daemon, Options, projections_dir};
use kiln_tests::wasm::USERS;
use serde_json::{Value, json};

async fn users_daemon() -> (Daemon, Api, tempfile::TempDir) {
    let dir = projections_dir(&[USERS]);
    let d = Daemon::start_with(Options::default().projections(dir.path()));
    let api = Api::new(&d);
    api.wait_state("users-1_0_0", "active", Duration::from_secs(60))
        .await;
    (d, api, dir)
}

async fn register(api: &Api, n: usize) -> u64 {
    let (status, body) = api
        .append(
            &format!("user-{n:03}"),
            json!("no_stream"),
            "UserRegistered",
            json!({ "name": format!("User {n}"), "email": format!("u{n}@x.io") }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["position"].as_u64().expect("position")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_name_exact_id_and_semver_requirement_read_the_same_document() {
    let (_d, api, _dir) = users_daemon().await;
    register(&api, 1).await;
    for spec in ["users", "users-1_0_0", "users@%5E1", "users@%3E%3D1.0.0"] {
        let (status, body) = api
            .get(&format!("/views/{spec}/user-001?stream=user-001"))
            .await;
        assert_eq!(status, 200, "{spec}: {body}");
        assert_eq!(body["view"], "users-1_0_0", "{spec}");
        assert_eq!(body["key"], "user-001");
        assert_eq!(body["doc"]["name"], "User 1", "{spec}: {body}");
    }
    // A requirement nothing matches, and a name nobody deployed.
    let (status, body) = api.get("/views/users@%5E2/user-001").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"]["code"], "no_matching_version");
    let (status, body) = api.get("/views/people/user-001").await;
    assert_eq!(status, 404, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("people"),
        "the message names the view: {body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_a_prefix_and_a_range_in_key_order() {
    let (_d, api, _dir) = users_daemon().await;
    let mut last = 0;
    for n in 0..25 {
        last = register(&api, n).await;
    }
    // Three pages of 10, 10, 5 by prefix, following `next`.
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = format!("/views/users?prefix=user-0&limit=10&position={last}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let (status, body) = api.get(&path).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        for item in body["items"].as_array().expect("items") {
            keys.push(item["key"].as_str().expect("key").to_string());
            assert!(item["doc"]["name"].is_string(), "{item}");
        }
        match body["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let expected: Vec<String> = (0..25).map(|n| format!("user-{n:03}")).collect();
    assert_eq!(keys, expected);

    // Range: from inclusive, to exclusive.
    let (status, body) = api
        .get("/views/users?from=user-005&to=user-009&keys_only=true")
        .await;
    assert_eq!(status, 200, "{body}");
    let keys: Vec<&str> = body["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["key"].as_str().expect("key"))
        .collect();
    assert_eq!(keys, ["user-005", "user-006", "user-007", "user-008"]);
    assert_eq!(body["next"], Value::Null);
    // A range page continues after its cursor.
    let (_, body) = api
        .get("/views/users?from=user-005&to=user-009&limit=2")
        .await;
    assert_eq!(body["next"], "user-006");
    let (_, body) = api
        .get("/views/users?from=user-005&to=user-009&limit=2&after=user-006")
        .await;
    assert_eq!(body["items"][0]["key"], "user-007");
    assert_eq!(body["items"][1]["key"], "user-008");
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, mentions: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(mentions),
        "message {message:?} should name {mentions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_a_stable_code_naming_the_thing() {
    let (_d, api, _dir) = users_daemon().await;
    register(&api, 1).await;

    let (s, b) = api.get("/views/users/user-404").await;
    assert_error(s, &b, 404, "unknown_key", "user-404");
    let (s, b) = api.get(&format!("/views/users/{}", "k".repeat(2000))).await;
    assert_error(s, &b, 400, "bad_key", "2000 bytes");
    let (s, b) = api.get("/views/users/a%01b").await;
    assert_error(s, &b, 400, "bad_key", "control character");
    let (s, b) = api.get("/views/Users!/x").await;
    assert!(s == 400 || s == 404, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("Users!"),
        "{b}"
    );
    let (s, b) = api.get("/views/users@not-semver/x").await;
    assert_eq!(s, 400, "{b}");
    assert_eq!(b["error"]["code"], "invalid_view");
    let (s, b) = api.get("/views/users?limit=0").await;
    assert_error(s, &b, 400, "bad_query", "limit");
    let (s, b) = api.get("/views/users?colour=blue").await;
    assert_error(s, &b, 400, "bad_query", "colour");
    let (s, b) = api.get("/views/users/user-001?position=x").await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("bad_query")),
        "{b}"
    );
    let (s, b) = api.get("/no/such/route").await;
    assert_error(s, &b, 404, "no_route", "/no/such/route");
    let (s, b) = api.post_json("/views", &json!({})).await;
    assert_error(s, &b, 405, "method_not_allowed", "/views");

    // Appends: malformed bodies, bad stream ids, bad events, oversized bodies.
    let (s, b) = api
        .post_bytes("/streams/user-1/events", b"{not json".to_vec())
        .await;
    assert_error(s, &b, 400, "malformed_body", "user-1");
    let (s, b) = api
        .post_json("/streams/user-1/events", &json!({ "evnts": [] }))
        .await;
    assert_error(s, &b, 400, "malformed_body", "user-1");
    let (s, b) = api
        .append("bad.id", json!("any"), "UserRegistered", json!({}))
        .await;
    assert_error(s, &b, 400, "invalid_stream_id", "bad.id");
    let (s, b) = api
        .append("user-1", json!("sometimes"), "UserRegistered", json!({}))
        .await;
    assert_error(s, &b, 400, "bad_expected_version", "sometimes");
    let (s, b) = api
        .append("user-1", json!("any"), "has space", json!({}))
        .await;
    assert_error(s, &b, 400, "invalid_event", "has space");
    let (s, b) = api
        .post_json("/streams/user-1/events", &json!({ "events": [] }))
        .await;
    assert_error(s, &b, 400, "no_events", "user-1");
    let huge = vec![b' '; 17 * 1024 * 1024];
    let (s, b) = api.post_bytes("/streams/user-1/events", huge).await;
    assert_error(s, &b, 413, "body_too_large", "bytes");
    let big = "x".repeat(600 * 1024);
    let (s, b) = api
        .append("user-1", json!("any"), "Big", json!({ "blob": big }))
        .await;
    assert_error(s, &b, 413, "append_too_large", "user-1");

    // Admin: not a module.
    let (s, b) = api.post_bytes("/admin/views", b"hello".to_vec()).await;
    assert_error(s, &b, 400, "invalid_module", "WebAssembly");
    let (s, b) = api
        .post_json("/admin/views/users-9_9_9/promote", &json!({}))
        .await;
    assert_eq!(s, 404, "{b}");
    assert!(
        b["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("users-9_9_9"),
        "{b}"
    );
}
