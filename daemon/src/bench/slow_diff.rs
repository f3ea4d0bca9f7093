//! `kiln bench slow-diff`: read-your-writes lag on the active version while
//! `kiln diff` against a **slow candidate** waits for it, next to the same
//! probes with nothing compared, in the same run (issue 32's goal: ≤ 2×).
//!
//! The candidate is slow for real, not paused: two versions of the example
//! `chaos` projection tail one log, the active one handed only `Note`
//! events, the candidate `Spin` events too. A `Spin` never returns, so each
//! costs the candidate three batch deadlines (`--deadline-ms`: its batch,
//! then the event alone twice) before it is parked. Each round:
//!
//! 1. **baseline**: `--samples` probes with nothing compared;
//! 2. **spinning**: `--spins` `Spin` events appended, probes running until
//!    the candidate is past them, nothing compared: what the spinning guest
//!    alone costs (it takes a core);
//! 3. **slow diff**: `--spins` more `Spin` events appended, then `kiln diff` of
//!    the active version against the candidate asked at once, probes running
//!    until it answers. The diff pins the active view where it stands and
//!    waits for the candidate to get there (about 3 × spins × deadline);
//!    the active view keeps applying the probes meanwhile. Before issue 32
//!    the diff held the active view's tail instead, and every probe of the
//!    wait timed out behind it.
//!
//! A probe appends one `Note` and waits until the active view has applied it
//! (see `kiln bench lag`). The spinning guest burns a core while it spins:
//! on a small machine that, not the diff, is most of what the probes see,
//! hence phase 2 and the ratio of 3 to it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hdrhistogram::Histogram;

use super::lag::{baseline_line, probe_with, summary, tally, wait_while_warming};
use super::ratio;
use crate::lifecycle::{
    CutoverPolicy, Lifecycle, LifecycleConfig, PoisonPolicy, ViewPolicy, ViewState,
};
use crate::runtime::{Runtime, RuntimeConfig, manifest_edit};
use crate::store::embedded::{Durability, EmbeddedConfig, EmbeddedStore};
use crate::store::{AppendRequest, EventStore, ExpectedVersion, NewEvent, StreamId};

/// `chaos` streams the fill and the probes write notes to.
const NOTE_STREAMS: u64 = 1000;

#[derive(Args, Debug, Clone)]
pub struct SlowDiffBenchArgs {
    /// Probes per second (open loop).
    #[arg(long, default_value_t = 200)]
    pub rate: u64,
    /// Probes of each baseline phase.
    #[arg(long, default_value_t = 400)]
    pub samples: u64,
    /// Rounds (a baseline and a slow diff each).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// `Spin` events appended before each diff.
    #[arg(long, default_value_t = 3)]
    pub spins: u32,
    /// The batch deadline, which each `Spin` costs the candidate three times.
    #[arg(long, default_value_t = 200)]
    pub deadline_ms: u64,
    /// Notes in the log before the first round (what each diff reads).
    #[arg(long, default_value_t = 20_000)]
    pub notes: u64,
    /// The chaos module (by default the example `cargo test --release` builds).
    #[arg(long)]
    pub module: Option<PathBuf>,
}

fn note(n: u64) -> (String, NewEvent) {
    (
        format!("chaos-{}", n % NOTE_STREAMS),
        NewEvent::json("Note", &serde_json::json!({ "text": format!("n{n}") })),
    )
}

/// Appends `n` spins and waits until the active version has stepped over
/// them (not its type: at once), so the candidate is behind it, spinning.
/// The last one's position.
async fn spin(
    store: &Arc<dyn EventStore>,
    lifecycle: &Lifecycle,
    active: &crate::views::ViewId,
    n: u32,
    tag: &str,
) -> anyhow::Result<u64> {
    let mut last = 0;
    for i in 0..n {
        last = store
            .append(AppendRequest::new(
                StreamId::new(format!("chaos-spin{tag}-{i}"))?,
                ExpectedVersion::Any,
                vec![NewEvent::json("Spin", &serde_json::json!({}))],
            ))
            .await?
            .position;
    }
    lifecycle
        .wait_for_position(active, last, Duration::from_secs(60))
        .await?;
    Ok(last)
}

/// `chaos` at `version`, handed the event types `events`.
fn chaos(module: &[u8], version: &str, events: &[&str]) -> anyhow::Result<Vec<u8>> {
    let mut manifest: serde_json::Value =
        serde_json::from_slice(manifest_edit::manifest_bytes(module)?)?;
    manifest["version"] = version.into();
    manifest["events"] = serde_json::json!(events);
    Ok(manifest_edit::replace_manifest(
        module,
        &serde_json::to_vec(&manifest)?,
    )?)
}

pub async fn run(args: SlowDiffBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate > 0 && args.samples > 0 && args.rounds > 0 && args.deadline_ms > 0,
        "--rate, --samples, --rounds and --deadline-ms must be positive"
    );
    let module = args.module.clone().unwrap_or_else(|| {
        PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../target/wasm-projections/wasm32-unknown-unknown/release/projection_chaos.wasm"
        ))
    });
    let wasm = std::fs::read(&module).with_context(|| {
        format!(
            "reading the module {} (run `cargo test --release` once to build it, or pass --module)",
            module.display()
        )
    })?;
    let dir = std::env::temp_dir().join(format!("kiln-bench-slow-diff-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = bench(&args, &wasm, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn bench(args: &SlowDiffBenchArgs, wasm: &[u8], dir: &std::path::Path) -> anyhow::Result<()> {
    let mut config = EmbeddedConfig::new(dir.join("log"));
    config.durability = Durability::Buffered;
    let store: Arc<dyn EventStore> =
        Arc::new(EmbeddedStore::open(config).context("opening the embedded store")?);
    for chunk in 0..args.notes.div_ceil(500) {
        let events = (chunk * 500..((chunk + 1) * 500).min(args.notes))
            .map(|n| note(n).1)
            .collect();
        store
            .append(AppendRequest::new(
                StreamId::new(format!("chaos-fill{chunk}"))?,
                ExpectedVersion::Any,
                events,
            ))
            .await?;
    }
    let mut lc = LifecycleConfig::new(dir.join("data"));
    lc.policies.insert(
        "chaos".into(),
        ViewPolicy {
            cutover: CutoverPolicy::Manual,
            poison: PoisonPolicy::Park,
            ..ViewPolicy::default()
        },
    );
    lc.standby_grace = Duration::from_secs(24 * 3600);
    let runtime = Runtime::new(RuntimeConfig {
        batch_deadline: Duration::from_millis(args.deadline_ms),
        ..RuntimeConfig::default()
    })?;
    let lifecycle = Lifecycle::start(lc, store.clone(), runtime)
        .await
        .context("starting the lifecycle")?;
    let active = lifecycle
        .deploy(&chaos(wasm, "1.0.0", &["Note"])?, "quick")
        .await?
        .id()
        .clone();
    wait_while_warming(&lifecycle, &active).await?;
    lifecycle.promote(&active).await?;
    let slow = lifecycle
        .deploy(&chaos(wasm, "1.1.0", &["Note", "Spin"])?, "slow")
        .await?
        .id()
        .clone();
    wait_while_warming(&lifecycle, &slow).await?;
    println!(
        "kiln bench slow-diff — {} notes, active {active} (notes only), candidate {slow} (notes and spins, each spin 3 × {} ms), probes at {}/s",
        args.notes, args.deadline_ms, args.rate
    );

    let (mut baseline, mut slow_diff) = (Histogram::<u64>::new(3)?, Histogram::<u64>::new(3)?);
    let mut spinning = Histogram::<u64>::new(3)?;
    let (mut best_idle, mut best_busy) = (None, None);
    for round in 1..=args.rounds {
        let idle = probe_with(
            &lifecycle,
            &store,
            &active,
            args.rate,
            |n| n >= args.samples,
            note,
        )
        .await?;
        tally(
            &format!("round {round}: baseline"),
            idle,
            &mut baseline,
            &mut best_idle,
        )?;
        // The same spins with nothing compared: what the spinning guest
        // alone costs the probes (it takes a core).
        let last = spin(
            &store,
            &lifecycle,
            &active,
            args.spins,
            &format!("{round}a"),
        )
        .await?;
        let alone = probe_with(
            &lifecycle,
            &store,
            &active,
            args.rate,
            |_| lifecycle.checkpoint_of(&slow).is_some_and(|c| c >= last),
            note,
        )
        .await?;
        let mut unused = None;
        tally(
            &format!("  while {slow} spins, nothing compared:"),
            alone,
            &mut spinning,
            &mut unused,
        )?;
        spin(
            &store,
            &lifecycle,
            &active,
            args.spins,
            &format!("{round}b"),
        )
        .await?;
        let asked = Instant::now();
        let diff = {
            let (lifecycle, a, b) = (lifecycle.clone(), active.to_string(), slow.to_string());
            tokio::spawn(async move {
                let wait = Duration::from_secs(600);
                lifecycle
                    .diff(&a, &b, crate::views::diff::DiffOptions::default(), wait)
                    .await
            })
        };
        let busy = probe_with(
            &lifecycle,
            &store,
            &active,
            args.rate,
            |_| diff.is_finished(),
            note,
        )
        .await?;
        let took = asked.elapsed().as_secs_f64();
        let outcome = diff
            .await?
            .with_context(|| format!("the diff of {active} against {slow}"))?;
        let waited = outcome.waited.as_millis();
        anyhow::ensure!(
            lifecycle.status_of(&slow).map(|s| s.state) == Some(ViewState::Ready),
            "{slow} is no longer ready"
        );
        tally(
            &format!(
                "  while a diff waits for {slow} ({took:.2} s, of which {waited} ms waiting):"
            ),
            busy,
            &mut slow_diff,
            &mut best_busy,
        )?;
    }
    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p) as f64;
    println!("read-your-writes lag on {active}, all rounds:");
    baseline_line("idle:                      ", &baseline);
    summary("it spins, no diff", &spinning, &baseline);
    summary("a slow diff waits", &slow_diff, &baseline);
    println!(
        "    ratio / the same spins with no diff:  p50 {:.2}  p99 {:.2}  (what the diff itself adds)",
        ratio(q(&slow_diff, 0.5), q(&spinning, 0.5)),
        ratio(q(&slow_diff, 0.99), q(&spinning, 0.99))
    );
    if let (Some(idle), Some(busy)) = (&best_idle, &best_busy) {
        println!(
            "    best rounds (lowest p99): ratio p50 {:.2}  p99 {:.2}",
            ratio(q(busy, 0.5), q(idle, 0.5)),
            ratio(q(busy, 0.99), q(idle, 0.99))
        );
    }
    lifecycle.shutdown().await;
    Ok(())
}
