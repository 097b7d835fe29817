//! The reach part: HNSW nodes that an unfiltered search cannot reach (issue 20), in
//! process, on the daemon's own index type built the daemon's way (batches from
//! `--writers` concurrent writers, each on `--threads` threads), beside usearch's own
//! build of the same vectors. For each build: the unreachable keys a full check finds,
//! what the check and the repair cost against the build itself, and recall@10 over the
//! ef sweep of `--curve-efs` (the ceiling) before and after the repair.
//!
//! The daemon sweeps (checks every key, re-links or stashes what search misses) after a
//! rebuild and once writes go quiet (src/index/reach.rs); "after a sweep" is that. The
//! alternative it was chosen over, a check of each batch as it is inserted, is measured
//! too ("checked per batch").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use likeness::index::AnnIndex;
use likeness::index::reach;
use likeness::types::{CollectionSpec, IndexParams, Precision};

use crate::data::{Data, exact_knn, recall};
use crate::reference::usearch_add;
use crate::{Ctx, Stat, stat};

const K: usize = 10;

/// One build and what was found in it.
struct Build {
    name: String,
    /// Seconds to insert every vector (one build).
    secs: f64,
    /// Keys a full check found unreachable.
    unreachable: usize,
    /// Seconds of a full check, over `--runs` runs.
    check: Stat,
    /// Recall@10 at each ef of the sweep.
    recall: Vec<f64>,
}

pub fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    for which in &args.reach_datasets {
        let data = Data::load(
            *which,
            match which {
                crate::data::Which::Fmnist => args.n.map(|n| n.min(60_000)),
                _ => args.n,
            },
            args.dim,
            args.recall_queries,
            &args.fmnist_dir,
        )?;
        dataset(ctx, &data)?;
    }
    Ok(())
}

fn dataset(ctx: &Ctx, data: &Data) -> Result<(), String> {
    let (args, threads) = (&ctx.args, ctx.threads);
    let rq = data.recall_queries();
    eprintln!(
        "[{}] exact neighbours of {} queries",
        data.describe,
        rq.len()
    );
    let truth = exact_knn(&data.vectors, rq, data.metric, K, threads);
    let entries: Vec<(u64, &[f32])> = data
        .vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (i as u64, v.as_slice()))
        .collect();
    let spec = CollectionSpec {
        name: "reach".into(),
        dimension: data.dim as u32,
        metric: data.metric,
        index: IndexParams::default(),
        precision: Precision::F32,
        model: String::new(),
        keep_inputs: false,
        dbl_margin: None,
        dbl_scale: None,
        pair_model: String::new(),
        pair_threshold: None,
        threshold: None,
        uid: 1,
        model_version: String::new(),
        tree: String::new(),
    };
    let ef = IndexParams::default().expansion_search as usize;
    let per_100k = |secs: f64| secs * 100_000.0 / data.n() as f64;
    let mut builds = Vec::new();

    // usearch's own build: every vector split among `threads` threads.
    eprintln!(
        "[{}] usearch's own build on {threads} threads",
        data.describe
    );
    let (own, rate, _) = usearch_add(&data.vectors, data.metric, IndexParams::default(), threads)?;
    let (unreachable, check) = timed_check(ctx, &entries, |e| {
        reach::unreachable(&own, e, ef, threads, || ())
            .map(|found| found.into_iter().map(|(k, _)| k).collect())
            .map_err(|e| e.to_string())
    })?;
    let own_recall: Vec<f64> = args
        .curve_efs
        .iter()
        .map(|&ef| {
            own.change_expansion_search(ef);
            recall(&truth, |q| {
                own.search(&rq[q][..], K)
                    .map(|m| m.keys.iter().map(|k| *k as usize).collect())
                    .unwrap_or_default()
            })
        })
        .collect();
    builds.push(Build {
        name: format!("usearch in-process, {threads} threads"),
        secs: data.n() as f64 / rate,
        unreachable,
        check,
        recall: own_recall,
    });
    drop(own);

    let ann_recall = |index: &AnnIndex| -> Vec<f64> {
        args.curve_efs
            .iter()
            .map(|&ef| {
                recall(&truth, |q| {
                    index
                        .search(&rq[q], K, ef)
                        .map(|hits| hits.iter().map(|(k, _)| *k as usize).collect())
                        .unwrap_or_default()
                })
            })
            .collect()
    };
    let full_check = |index: &AnnIndex| {
        timed_check(ctx, &entries, |e| {
            index.unreachable(e, threads).map_err(|e| e.to_string())
        })
    };
    let how = format!(
        "batches of {} from {} writers, {threads} threads each",
        args.batch, args.writers
    );

    // The daemon's build, as it stands before its first sweep (and as every build stood
    // before issue 20).
    eprintln!("[{}] the daemon's build", data.describe);
    let (index, secs) = build(&spec, &entries, args.batch, args.writers, threads, false)?;
    let (unreachable, check) = full_check(&index)?;
    builds.push(Build {
        name: format!("likeness index ({how})"),
        secs,
        unreachable,
        check,
        recall: ann_recall(&index),
    });
    // Then the sweep the daemon runs once writes go quiet.
    let start = Instant::now();
    let swept = index
        .sweep(entries.iter().map(|(k, v)| Ok((*k, v.to_vec()))), threads)
        .map_err(|e| e.to_string())?;
    let sweep_secs = start.elapsed().as_secs_f64();
    let (unreachable, check) = full_check(&index)?;
    let in_stash = index.reach_counts().in_stash;
    builds.push(Build {
        name: format!(
            "the same after a sweep ({sweep_secs:.1} s, {:.1} s per 100k: {} unreachable, {} re-linked, {} stashed); unreachable through the graph alone",
            per_100k(sweep_secs),
            swept.unreachable,
            swept.repaired,
            swept.stashed,
        ),
        secs,
        unreachable,
        check,
        recall: ann_recall(&index),
    });
    // The stash makes search find what the graph misses: k = 1 for every key.
    // (An exact duplicate may answer for its twin, at distance 0.)
    let (mut twins, mut missed) = (0, 0);
    for (k, v) in &entries {
        match index.search(v, 1, 0).ok().and_then(|h| h.first().copied()) {
            Some((hit, _)) if hit == *k => {}
            Some((_, 0.0)) => twins += 1,
            _ => missed += 1,
        }
    }
    eprintln!(
        "[{}] after the sweep: {in_stash} keys stashed; {missed} keys not their own k = 1 answer, {twins} answered by an exact duplicate",
        data.describe
    );
    drop(index);

    // The alternative: each batch checked, re-linked and stashed as it is inserted.
    eprintln!("[{}] the daemon's build, checked per batch", data.describe);
    let (index, secs) = build(&spec, &entries, args.batch, args.writers, threads, true)?;
    let counts = index.reach_counts();
    let (unreachable, check) = full_check(&index)?;
    builds.push(Build {
        name: format!(
            "likeness index, each batch checked as inserted ({how}; {} found, {} re-linked, {} stashed while inserting)",
            counts.unreachable, counts.repaired, counts.stashed
        ),
        secs,
        unreachable,
        check,
        recall: ann_recall(&index),
    });
    drop(index);

    // One thread, one batch at a time: what concurrency adds.
    eprintln!("[{}] the daemon's build on one thread", data.describe);
    let (index, secs) = build(&spec, &entries, args.batch, 1, 1, false)?;
    let (unreachable, check) = full_check(&index)?;
    builds.push(Build {
        name: format!(
            "likeness index, serial (batches of {}, 1 thread)",
            args.batch
        ),
        secs,
        unreachable,
        check,
        recall: ann_recall(&index),
    });
    drop(index);

    println!(
        "## Unreachable nodes and the recall ceiling: {} (k = 10, M {}, ef_add {}, check at ef {ef})\n",
        data.describe,
        IndexParams::default().connectivity,
        IndexParams::default().expansion_add,
    );
    println!(
        "A key is unreachable when a search for its own vector at ef {ef} neither returns it nor fills its list with items at least as near. Builds are one run each; full checks are medians of {} runs on {threads} threads. Recall after a sweep includes the stash, as the daemon searches it.\n",
        ctx.runs
    );
    let efs: Vec<String> = args.curve_efs.iter().map(|e| format!("ef {e}")).collect();
    println!(
        "| build | build s (s per 100k) | unreachable | full check s (per 100k; / build) | recall@10 at {} |",
        efs.join(" / ")
    );
    println!("|---|---|---|---|---|");
    for b in &builds {
        let recall: Vec<String> = b.recall.iter().map(|r| format!("{r:.4}")).collect();
        println!(
            "| {} | {:.1} ({:.1}) | {} | {} ({:.2}; {:.2}) | {} |",
            b.name,
            b.secs,
            per_100k(b.secs),
            b.unreachable,
            b.check,
            per_100k(b.check.median),
            b.check.median / b.secs,
            recall.join(" / ")
        );
    }
    println!();
    Ok(())
}

/// `runs` full checks: the unreachable count of the first, and the seconds of each.
fn timed_check(
    ctx: &Ctx,
    entries: &[(u64, &[f32])],
    check: impl Fn(&[(u64, &[f32])]) -> Result<Vec<u64>, String>,
) -> Result<(usize, Stat), String> {
    let mut found = None;
    let mut secs = Vec::new();
    for _ in 0..ctx.runs {
        let start = Instant::now();
        let keys = check(entries)?;
        secs.push(start.elapsed().as_secs_f64());
        found.get_or_insert(keys.len());
    }
    Ok((found.unwrap_or(0), stat(secs)))
}

/// The daemon's build: batches of `batch` taken in turn by `writers` threads, each
/// inserted on `threads` threads, each checked after its insert or not. The index and
/// its seconds.
fn build(
    spec: &CollectionSpec,
    entries: &[(u64, &[f32])],
    batch: usize,
    writers: usize,
    threads: usize,
    checked: bool,
) -> Result<(AnnIndex, f64), String> {
    let index = AnnIndex::new(spec, 0).map_err(|e| e.to_string())?;
    let batches: Vec<&[(u64, &[f32])]> = entries.chunks(batch.max(1)).collect();
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..writers.max(1))
            .map(|_| {
                let (index, batches, next) = (&index, &batches, &next);
                s.spawn(move || -> Result<(), String> {
                    while let Some(b) = batches.get(next.fetch_add(1, Ordering::Relaxed)) {
                        index.add_many(b, threads).map_err(|e| e.to_string())?;
                        if checked {
                            index
                                .ensure_reachable(b, threads)
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("build thread panicked"))
    })?;
    Ok((index, start.elapsed().as_secs_f64()))
}
