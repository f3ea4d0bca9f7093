//! The status page as a browser shows it: a real headless Chromium
//! (Debian's `chromium` package, which `scripts/setup` installs) loads a
//! page and dumps its DOM after the page's scripts ran.

use std::path::PathBuf;
use std::process::Command;

pub fn chromium() -> PathBuf {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        for dir in ["/usr/bin", "/usr/local/bin"] {
            let p = PathBuf::from(dir).join(c);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("headless Chromium is needed: apt-get install -y chromium (scripts/setup does)");
}

/// The DOM after the page's scripts ran (virtual time lets the poll complete).
pub fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().expect("chromium profile dir");
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .output()
        .expect("running chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
