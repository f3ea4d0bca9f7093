//! `kiln bench diff`: comparing two big views ([`ViewStore::compare`]) next
//! to a plain scan of both (the baseline: reading every document once,
//! comparing nothing), in the same run.
//!
//! Two views of `--docs` user documents each are written straight into a
//! fresh views database and flushed to files: B equals A except `--changed`
//! documents with one field changed, `--removed` documents missing and
//! `--added` documents more. Each round times a plain scan of A then B,
//! then the comparison; printed: each round, then the best of each (the
//! least disturbed by other load) with keys compared per second and the
//! ratio comparison / scan. Each round also times the digest of A (what a
//! fleet member computes at every `digest_every` position, from its view
//! pinned there while it goes on), against the plain scan of one view.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::ratio;
use crate::views::diff::{Compared, DiffOptions};
use crate::views::{ViewId, ViewStore, Writes};

#[derive(Args, Debug, Clone)]
pub struct DiffBenchArgs {
    /// Documents in view A.
    #[arg(long, default_value_t = 1_000_000)]
    pub docs: u64,
    /// Documents of A changed in B (one field each).
    #[arg(long, default_value_t = 1_000)]
    pub changed: u64,
    /// Documents of A missing from B.
    #[arg(long, default_value_t = 100)]
    pub removed: u64,
    /// Documents in B only.
    #[arg(long, default_value_t = 100)]
    pub added: u64,
    /// Examples kept of each kind.
    #[arg(long, default_value_t = 10)]
    pub examples: usize,
    /// Rounds (one scan and one comparison each).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Directory for the views database (a temp dir, removed afterwards, by default).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

pub async fn run(args: DiffBenchArgs) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("kiln-bench-diff-{}", uuid::Uuid::new_v4())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let owned = args.dir.is_none();
    let result = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || bench(&args, &dir)
    })
    .await?;
    if owned {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn doc(i: u64, logins: u64) -> Vec<u8> {
    format!(
        r#"{{"name":"user {i}","email":"user{i}@example.com","logins":{logins},"plan":"free","tags":["a","b"]}}"#
    )
    .into_bytes()
}

fn key(i: u64) -> Vec<u8> {
    format!("user-{i:08}").into_bytes()
}

/// Writes A and B (see the module docs) in batches of 10,000 documents.
fn fill(views: &ViewStore, a: &ViewId, b: &ViewId, args: &DiffBenchArgs) -> anyhow::Result<()> {
    let step = 10_000u64;
    let changed_every = args.docs / args.changed.max(1);
    let removed_every = args.docs / args.removed.max(1);
    let mut start = 0;
    while start < args.docs {
        let end = (start + step).min(args.docs);
        let mut wa = Writes::new();
        let mut wb = Writes::new();
        for i in start..end {
            wa.insert(key(i), Some(doc(i, i % 100)));
            let changed =
                args.changed > 0 && i % changed_every == 1 && i / changed_every < args.changed;
            let removed =
                args.removed > 0 && i % removed_every == 2 && i / removed_every < args.removed;
            if !removed {
                wb.insert(key(i), Some(doc(i, i % 100 + u64::from(changed))));
            }
        }
        views.commit(a, &wa, 1)?;
        views.commit(b, &wb, 1)?;
        start = end;
    }
    let mut wb = Writes::new();
    for i in 0..args.added {
        wb.insert(key(args.docs + i), Some(doc(args.docs + i, 0)));
    }
    views.commit(b, &wb, 1)?;
    views.flush(a)?;
    views.flush(b)?;
    Ok(())
}

fn bench(args: &DiffBenchArgs, dir: &std::path::Path) -> anyhow::Result<()> {
    let views = ViewStore::open(dir.join("views"))?;
    let a = ViewId::from_parts("users", "1.0.0")?;
    let b = ViewId::from_parts("users", "1.1.0")?;
    views.ensure(&a)?;
    views.ensure(&b)?;
    let t = Instant::now();
    fill(&views, &a, &b, args)?;
    println!(
        "filled two views of {} documents (B: {} changed, {} removed, {} added) in {:.1} s",
        args.docs,
        args.changed,
        args.removed,
        args.added,
        t.elapsed().as_secs_f64()
    );
    let opts = DiffOptions {
        prefix: Vec::new(),
        examples: args.examples,
    };
    let mut best_scan = Duration::MAX;
    let mut best_diff = Duration::MAX;
    let mut best_digest = Duration::MAX;
    let mut digested = 0;
    let mut keys = 0;
    let mut read = 0;
    for round in 1..=args.rounds {
        let t = Instant::now();
        let (na, _) = views.scan_count(&a, b"")?;
        let (nb, _) = views.scan_count(&b, b"")?;
        let scan = t.elapsed();
        let t = Instant::now();
        let Compared::Report(r) = views.compare(&a, &b, &opts, |_, _| {})? else {
            anyhow::bail!("the two views are at different checkpoints");
        };
        let diff = t.elapsed();
        anyhow::ensure!(
            (r.changed, r.only_in_a, r.only_in_b) == (args.changed, args.removed, args.added),
            "the comparison found {} changed, {} only in A, {} only in B",
            r.changed,
            r.only_in_a,
            r.only_in_b
        );
        keys = r.compared;
        read = na + nb;
        println!(
            "round {round}: plain scan of both {:.3} s ({:.0} documents/s), comparison {:.3} s ({:.0} keys compared/s, {} changed, {} only in A, {} only in B)",
            scan.as_secs_f64(),
            read as f64 / scan.as_secs_f64(),
            diff.as_secs_f64(),
            keys as f64 / diff.as_secs_f64(),
            r.changed,
            r.only_in_a,
            r.only_in_b
        );
        best_scan = best_scan.min(scan);
        best_diff = best_diff.min(diff);
        let t = Instant::now();
        let d = views.digest(&a)?;
        let digest = t.elapsed();
        digested = d.documents;
        println!(
            "round {round}: digest of A {:.3} s ({:.0} documents/s)",
            digest.as_secs_f64(),
            d.documents as f64 / digest.as_secs_f64()
        );
        best_digest = best_digest.min(digest);
    }
    let scan_rate = read as f64 / best_scan.as_secs_f64();
    let diff_docs = read as f64 / best_diff.as_secs_f64();
    let diff_keys = keys as f64 / best_diff.as_secs_f64();
    println!();
    println!("| measure (best of {} rounds) | figure |", args.rounds);
    println!("|---|---|");
    println!(
        "| plain scan of both views (baseline) | {:.3} s, {scan_rate:.0} documents read/s |",
        best_scan.as_secs_f64()
    );
    println!(
        "| comparison | {:.3} s, {diff_keys:.0} keys compared/s ({diff_docs:.0} documents read/s) |",
        best_diff.as_secs_f64()
    );
    println!(
        "| comparison / plain scan (documents read/s) | **{:.2}** |",
        ratio(diff_docs, scan_rate)
    );
    let digest_rate = digested as f64 / best_digest.as_secs_f64();
    println!(
        "| digest of A (a fleet member's view held while it runs) | {:.3} s, {digest_rate:.0} documents/s |",
        best_digest.as_secs_f64()
    );
    println!(
        "| digest / plain scan (documents read/s) | **{:.2}** |",
        ratio(digest_rate, scan_rate)
    );
    Ok(())
}
