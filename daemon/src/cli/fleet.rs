//! `kiln fleet status` for people: the answer of `GET /fleet` as tables
//! (members, decisions, digests that disagree).

use std::fmt::Write;

use serde_json::Value;

/// The text `kiln fleet status` prints for a `GET /fleet` answer.
pub fn render(body: &Value) -> String {
    let mut out = String::new();
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let _ = writeln!(
        out,
        "fleet {} (answered by {}; members drop out after {} ms silent)",
        s(&body["fleet"]),
        s(&body["instance"]),
        body["member_ttl_ms"]
    );
    let empty = Vec::new();
    let members = body["members"].as_array().unwrap_or(&empty);
    let _ = writeln!(out, "\n{} member(s)", members.len());
    let _ = writeln!(
        out,
        "  {:<16} {:<24} {:<9} {:>10} {:>8}  serving",
        "INSTANCE", "VERSION", "STATE", "CHECKPOINT", "LAG"
    );
    let suspects: Vec<String> = body["mismatches"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .flat_map(|m| m["suspects"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    for m in members {
        let instance = s(&m["instance"]);
        let flag = if suspects.contains(&instance) {
            "  DIGEST MISMATCH"
        } else {
            ""
        };
        let serving: Vec<String> = m["serving"]
            .as_object()
            .map(|o| {
                o.iter()
                    .map(|(name, v)| {
                        let what = match (&v["version"], v["fenced"].as_bool()) {
                            (_, Some(true)) => "fenced".to_string(),
                            (Value::String(ver), _) => ver.clone(),
                            _ => "-".into(),
                        };
                        let stale = if v["stale"].as_bool() == Some(true) {
                            " (stale)"
                        } else {
                            ""
                        };
                        format!("{name}={what}{stale}")
                    })
                    .collect()
            })
            .unwrap_or_default();
        let views = m["views"].as_array().unwrap_or(&empty);
        if views.is_empty() {
            let _ = writeln!(out, "  {instance:<16} (no views){flag}");
        }
        for (i, v) in views.iter().enumerate() {
            let who = if i == 0 { instance.as_str() } else { "" };
            let tail = if i == 0 {
                format!("{}{flag}", serving.join(" "))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  {who:<16} {:<24} {:<9} {:>10} {:>8}  {tail}",
                s(&v["id"]),
                s(&v["state"]),
                v["checkpoint"],
                v["lag"],
            );
        }
    }
    if let Some(bad) = body["unreadable"].as_array()
        && !bad.is_empty()
    {
        let ids: Vec<String> = bad.iter().map(&s).collect();
        let _ = writeln!(
            out,
            "  unreadable record(s): {} (a newer kiln?): no cutover proceeds while they are there",
            ids.join(", ")
        );
    }
    if let Some(decisions) = body["decisions"].as_object()
        && !decisions.is_empty()
    {
        let _ = writeln!(out, "\ndecisions");
        let switching = body["switching"].as_array().unwrap_or(&empty);
        for (name, d) in decisions {
            let next = match &d["next"] {
                Value::String(n) => {
                    let waiting: Vec<String> = switching
                        .iter()
                        .filter(|w| w["name"].as_str() == Some(name))
                        .flat_map(|w| w["waiting_on"].as_array().cloned().unwrap_or_default())
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect();
                    if waiting.is_empty() {
                        format!(" -> switching to {n}")
                    } else {
                        format!(
                            " -> switching to {n}, waiting for {} to stop answering {}",
                            waiting.join(", "),
                            s(&d["active"])
                        )
                    }
                }
                _ => String::new(),
            };
            let held: Vec<String> = d["held_back"]
                .as_array()
                .map(|h| {
                    h.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            let held = if held.is_empty() {
                String::new()
            } else {
                format!("; held back (rolled back from): {}", held.join(", "))
            };
            let _ = writeln!(
                out,
                "  {name:<16} active {}{next} (revision {}, {} by {}){held}",
                s(&d["active"]),
                d["revision"],
                s(&d["reason"]),
                s(&d["by"]),
            );
        }
    }
    let logic = body["logic_mismatches"].as_array().unwrap_or(&empty);
    if !logic.is_empty() {
        let _ = writeln!(
            out,
            "\nONE VERSION, SEVERAL MODULES (never proposed; members with another module do not answer it):"
        );
        for l in logic {
            let _ = writeln!(out, "  {}", s(&l["view"]));
            if let Some(fps) = l["fingerprints"].as_object() {
                for (fp, members) in fps {
                    let _ = writeln!(out, "    {fp}  {members}");
                }
            }
        }
    }
    let mismatches = body["mismatches"].as_array().unwrap_or(&empty);
    let _ = writeln!(
        out,
        "\ndigests: {} position(s) agree, {} disagree",
        body["digests_agreeing"],
        mismatches.len()
    );
    for m in mismatches {
        let _ = writeln!(
            out,
            "  {} at position {} (fingerprint {}): suspects {}",
            s(&m["view"]),
            m["position"],
            s(&m["fingerprint"]),
            m["suspects"]
        );
        if let Some(d) = m["digests"].as_object() {
            for (instance, digest) in d {
                let _ = writeln!(out, "    {instance:<16} {}", s(digest));
            }
        }
    }
    out
}
