//! The status page at `/`, rendered by a real headless Chromium (Debian's
//! `chromium` package): after its script ran, the page lists every view version
//! with its state.

use std::time::Duration;

use kiln_tests::browser::rendered_dom;
use kiln_tests::daemon::{
    Api, Daemon, deploy_slow_warming_chaos, projections_dir, slow_warming_options,
};
use kiln_tests::wasm::{USERS, users_module};
use serde_json::json;

/// The `<tr>` of version `id` in the rendered page.
fn row<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("data-id=\"{id}\""))
        .unwrap_or_else(|| panic!("no row for {id} in the rendered page:\n{dom}"));
    let end = dom[start..].find("</tr>").map_or(dom.len(), |e| start + e);
    &dom[start..end]
}

/// How many times the page's script has refreshed itself from `GET /views`.
fn refreshes(dom: &str) -> u64 {
    dom.split_once("data-refreshes=\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_states_aliases_and_a_progress_bar_while_warming_in_chromium() {
    let dir = projections_dir(&[USERS]);
    let d = Daemon::start_with(slow_warming_options().projections(dir.path()));
    let api = Api::new(&d);
    api.wait_state("users-1_0_0", "active", Duration::from_secs(60))
        .await;
    api.register_user("user-1").await;
    // Same logic as 1.0.0: an alias, ready at once, and (auto cutover) active.
    let (s, b) = api
        .deploy(kiln_tests::daemon::module_version(USERS, "1.0.1", None))
        .await;
    assert_eq!((s, b["outcome"].as_str()), (200, Some("alias")), "{b}");
    api.wait_state("users-1_0_1", "active", Duration::from_secs(10))
        .await;
    // A version that stays warming for 20 s or more.
    let chaos = deploy_slow_warming_chaos(&api, 20).await;

    let dom = tokio::task::spawn_blocking({
        let url = d.url() + "/";
        move || rendered_dom(&url)
    })
    .await
    .expect("chromium task");
    // Rows are built by the page's script from GET /views, so these prove it ran.
    assert!(
        dom.contains(r#"id="problem"></span>"#),
        "the page reports a problem: {dom}"
    );
    assert!(
        row(&dom, "users-1_0_1").contains(r#"data-state="active""#),
        "{dom}"
    );
    let standby = row(&dom, "users-1_0_0");
    assert!(standby.contains(r#"data-state="standby""#), "{standby}");
    assert!(
        row(&dom, "users-1_0_1").contains("alias of users-1_0_0"),
        "{dom}"
    );
    // The warming version has a (not yet done) progress bar with its percentage.
    let warming = row(&dom, &chaos);
    assert!(warming.contains(r#"data-state="warming""#), "{warming}");
    assert!(
        warming.contains(r#"class="bar""#),
        "no progress bar: {warming}"
    );
    assert!(warming.contains('%'), "{warming}");
    assert!(
        dom.contains("2 view(s), 3 version(s), 1 warming"),
        "summary line: {dom}"
    );
    // In no fleet: no fleet section (GET /fleet answers 404 no_fleet).
    assert!(dom.contains(r#"<section id="fleet" hidden"#), "{dom}");
    // It refreshes itself (once a second; Chromium ran 5 s of page time).
    assert!(refreshes(&dom) >= 3, "refreshed {} times", refreshes(&dom));
    // The chaos version is still warming: the page did not see a later state.
    let (_, views) = api.get("/views").await;
    let still = views["views"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["id"] == chaos.as_str()))
        .map(|v| v["state"].clone());
    assert_eq!(still, Some(json!("warming")), "{views}");
}

/// A ready version under manual cutover: the page shows what promoting it
/// would change, counts and examples with field paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_what_promoting_a_ready_version_would_change() {
    let d = Daemon::start_with(
        kiln_tests::daemon::Options::default()
            .arg("--cutover")
            .arg("manual"),
    );
    let api = Api::new(&d);
    api.register_user("user-1").await;
    let (s, b) = api
        .append("user-1", json!("any"), "LoginFailed", json!({}))
        .await;
    assert_eq!(s, 200, "{b}");
    api.deploy(users_module("1.0.0", false)).await;
    api.wait_state("users-1_0_0", "ready", Duration::from_secs(60))
        .await;
    let (s, b) = api
        .post_bytes("/admin/views/users-1_0_0/promote", vec![])
        .await;
    assert_eq!(s, 200, "{b}");
    api.deploy(users_module("1.1.0", true)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = api
            .wait_state("users-1_1_0", "ready", Duration::from_secs(60))
            .await;
        if v["cutover_check"]["result"] == "different" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dom = tokio::task::spawn_blocking({
        let url = d.url() + "/";
        move || rendered_dom(&url)
    })
    .await
    .expect("chromium task");
    let start = dom
        .find(r#"data-check-for="users-1_1_0""#)
        .unwrap_or_else(|| panic!("no comparison row:\n{dom}"));
    let check = &dom[start..start + dom[start..].find("</tr>").unwrap_or(0)];
    for part in [
        "against users-1_0_0",
        "1 changed, 0 added, 0 removed",
        "<code>user-1</code>",
        "/failed_logins: 1 → 0",
    ] {
        assert!(check.contains(part), "{part:?} not in {check}");
    }
}
