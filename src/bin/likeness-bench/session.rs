//! The session part: a Miner.Session used as a cross-batch memory, the way a trainer
//! would use it. A fresh daemon holds `--session-n` labelled unit vectors (cold by
//! default: an untrained network's); one Session then sends a step per training batch:
//! `--session-anchors` anchors (consecutive slices of a seeded permutation of the ids),
//! each with the trainer's fresh vector (the stored one plus a little noise, unit
//! length), asking for HARD negatives with their vectors. The same steps run twice,
//! write_back off and then on (each step's fresh vectors upserted durably after its
//! answer is sent, before the next step is mined), so the cost of the memory is the
//! difference. Per step: the round trip as the trainer sees it (send to answer), the
//! daemon's CPU (procfs), the answer's size.
//!
//! The reference for the write itself is Items.Upsert of the same 128 items, durable on
//! return, one call at a time. A probe step after the last one (one anchor, no
//! write-back) says when the last step's write-back was durable: its answer carries
//! `written_step`.

use std::time::{Duration, Instant};

use likeness::grpc::client::Channel;
use likeness::grpc::pb;
use likeness::grpc::pb::miner_client::MinerClient;
use likeness::rng::Rng;

use crate::Ctx;
use crate::daemon::{COLLECTION, Daemon, status};
use crate::mine::{Corpus, gaussian, unit};
use crate::procfs::{Cpu, Meter};

/// Seeds: the corpus, the anchors' order, the trainer's noise.
const CORPUS_SEED: u64 = 7;
const ORDER_SEED: u64 = 42;
const NOISE_SEED: u64 = 5;
/// Upsert calls in the reference.
const UPSERTS: usize = 100;

/// One Session read step by step.
struct SessionRun {
    /// Round trip per measured step (send to answer).
    lat: Vec<Duration>,
    /// The daemon's own time per step (MineStats.seconds: from the step's arrival to
    /// its answer being mined), to split a round trip into mining and the rest.
    mined: Vec<Duration>,
    /// From sending the first measured step to the probe's answer.
    wall: f64,
    /// Daemon and client CPU over the same span.
    cpu: Cpu,
    bytes: Vec<usize>,
    items: Vec<usize>,
    triplets: Vec<usize>,
    anchors_without_triplet: u64,
    /// Measured answers whose written_step was not the step before (write_back on).
    lagging: usize,
    /// The probe's round trip, its written_step and MineStats.written.
    probe: Duration,
    probe_written_step: Option<u64>,
    written: u64,
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The q-quantile of sorted `xs`.
fn quantile<T: Copy + Default>(xs: &[T], q: f64) -> T {
    xs.get(((xs.len() as f64 * q) as usize).min(xs.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn median(mut xs: Vec<usize>) -> usize {
    xs.sort_unstable();
    quantile(&xs, 0.5)
}

fn request(negatives: u32, expansion: u32) -> pb::MineRequest {
    pb::MineRequest {
        collection: COLLECTION.into(),
        strategy: pb::Strategy::Hard as i32,
        expansion,
        // A memory step wants its negatives, not a 64-wide pool: with an ef given, the
        // pool is that wide too.
        candidates: expansion,
        negatives_per_anchor: negatives,
        positives_per_anchor: 1,
        with_vectors: true,
        seed: 7,
        ..Default::default()
    }
}

/// The steps' anchors: step s takes the s-th slice of `order` (wrapping), each with
/// the trainer's fresh vector.
fn steps(
    corpus: &Corpus,
    order: &[usize],
    total: usize,
    per_step: usize,
    noise: f32,
) -> Vec<Vec<pb::StepAnchor>> {
    let mut rng = Rng::new(NOISE_SEED);
    let dim = corpus.data.dim;
    (0..total)
        .map(|s| {
            (0..per_step)
                .map(|j| {
                    let row = order[(s * per_step + j) % order.len()];
                    let mut v: Vec<f32> = corpus.data.vectors[row]
                        .iter()
                        .zip(gaussian(&mut rng, dim, noise))
                        .map(|(a, b)| a + b)
                        .collect();
                    unit(&mut v);
                    pb::StepAnchor {
                        id: format!("v{row}"),
                        label: String::new(),
                        vector: v,
                    }
                })
                .collect()
        })
        .collect()
}

/// What both Sessions send: the steps (warm-up first), the negatives per anchor, the
/// trainer's pause between an answer and its next step, and the probe's anchor.
struct Plan<'a> {
    steps: &'a [Vec<pb::StepAnchor>],
    warmup: usize,
    negatives: u32,
    /// The steps' ef (0: the collection's).
    expansion: u32,
    think: Duration,
    probe_id: String,
}

/// One Session: every step of `plan`, each sent when the previous one is answered, then
/// the probe.
async fn session(
    d: &Daemon,
    ch: Channel,
    plan: &Plan<'_>,
    write_back: bool,
) -> Result<SessionRun, String> {
    let Plan {
        steps,
        warmup,
        negatives,
        expansion,
        think,
        ref probe_id,
    } = *plan;
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let mut out = MinerClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(256 << 20)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(status)?
        .into_inner();
    let mut run = SessionRun {
        lat: Vec::with_capacity(steps.len()),
        mined: Vec::with_capacity(steps.len()),
        wall: 0.0,
        cpu: Cpu::default(),
        bytes: Vec::new(),
        items: Vec::new(),
        triplets: Vec::new(),
        anchors_without_triplet: 0,
        lagging: 0,
        probe: Duration::ZERO,
        probe_written_step: None,
        written: 0,
    };
    let mut meter = None;
    let mut start = Instant::now();
    for (s, anchors) in steps.iter().enumerate() {
        let msg = pb::MineStep {
            step: s as u64,
            request: (s == 0).then(|| request(negatives, expansion)),
            anchors: anchors.clone(),
            write_back,
        };
        if s == warmup {
            meter = Some(Meter::start(d.pid()));
            start = Instant::now();
        }
        let t = Instant::now();
        tx.send(msg)
            .await
            .map_err(|_| format!("the session ended before step {s}"))?;
        let answer = out
            .message()
            .await
            .map_err(status)?
            .ok_or_else(|| format!("the session ended without answering step {s}"))?;
        let rt = t.elapsed();
        if answer.step != s as u64 {
            return Err(format!("step {s} was answered as step {}", answer.step));
        }
        if s >= warmup {
            run.lat.push(rt);
            run.mined.push(Duration::from_secs_f64(
                answer.stats.as_ref().map_or(0.0, |st| st.seconds),
            ));
            run.bytes.push(prost::Message::encoded_len(&answer));
            run.items.push(answer.items.len());
            run.triplets.push(answer.triplets.len());
            run.anchors_without_triplet += answer
                .stats
                .as_ref()
                .map_or(0, |st| st.anchors_without_triplet);
            // The previous step's write is done before a step is mined, so an answer
            // says the step before it is durable.
            if write_back && s > 0 && answer.written_step != Some(s as u64 - 1) {
                run.lagging += 1;
            }
        }
        // The probe goes at once after the last answer: it measures what is left of
        // that step's write.
        if !think.is_zero() && s + 1 < steps.len() {
            tokio::time::sleep(think).await;
        }
    }
    // The probe: one stored anchor, no vector, no write-back. Its answer comes once the
    // last step's write-back is durable.
    let probe = pb::MineStep {
        step: steps.len() as u64,
        request: None,
        anchors: vec![pb::StepAnchor {
            id: probe_id.clone(),
            ..Default::default()
        }],
        write_back: false,
    };
    let t = Instant::now();
    tx.send(probe)
        .await
        .map_err(|_| "the session ended before the probe".to_string())?;
    let answer = out
        .message()
        .await
        .map_err(status)?
        .ok_or("the session ended without answering the probe")?;
    run.probe = t.elapsed();
    run.wall = start.elapsed().as_secs_f64();
    run.cpu = meter.map(|m| m.stop()).unwrap_or_default();
    run.probe_written_step = answer.written_step;
    run.written = answer.stats.as_ref().map_or(0, |st| st.written);
    drop(tx);
    while out.message().await.map_err(status)?.is_some() {}
    Ok(run)
}

/// The write's reference: Items.Upsert of the steps' items (their fresh vectors), one
/// call at a time. Returns the latencies, sorted, and the CPU.
async fn upserts(
    d: &Daemon,
    steps: &[Vec<pb::StepAnchor>],
    labels: &[u32],
) -> Result<(Vec<Duration>, Cpu), String> {
    let mut client = d.items().await?;
    let calls: Vec<pb::UpsertRequest> = steps
        .iter()
        .take(UPSERTS)
        .map(|anchors| pb::UpsertRequest {
            collection: COLLECTION.into(),
            items: anchors
                .iter()
                .map(|a| {
                    let row: usize = a.id[1..].parse().unwrap_or(0);
                    pb::Item {
                        id: a.id.clone(),
                        label: format!("c{}", labels[row]),
                        vector: a.vector.clone(),
                        ..Default::default()
                    }
                })
                .collect(),
        })
        .collect();
    let meter = Meter::start(d.pid());
    let mut lat = Vec::with_capacity(calls.len());
    for call in calls {
        let t = Instant::now();
        client.upsert(call).await.map_err(status)?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok((lat, meter.stop()))
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let n = args.session_n;
    let per_step = args.session_anchors.max(1);
    let total = args.session_warmup + args.session_steps.max(1);
    let think = Duration::from_millis(args.session_think_ms);
    let per_class = (n / args.session_labels.max(1)).max(1);
    eprintln!(
        "session: generating {n} x {} vectors ({} corpus)",
        args.session_dim,
        args.session_corpus.name()
    );
    let corpus = Corpus::new(
        args.session_corpus,
        n,
        args.session_dim,
        per_class,
        CORPUS_SEED,
    );
    let mut rng = Rng::new(ORDER_SEED);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    let steps = steps(&corpus, &order, total, per_step, args.session_noise);

    let d = Daemon::start(&ctx.spec).await?;
    eprintln!("session: loading {n} items into a fresh daemon");
    let ingest = d.ingest(&corpus.data, args.batch, args.writers).await?;
    eprintln!("session: ingest {:.0} vectors/s", ingest.rate);

    // Off first: it leaves the collection as it was, so both see the same data at
    // their start (the on run then moves the anchors it writes back).
    let plan = Plan {
        steps: &steps,
        warmup: args.session_warmup,
        negatives: args.session_negatives,
        expansion: args.session_expansion,
        think,
        probe_id: format!("v{}", order[0]),
    };
    let mut runs = Vec::new();
    for write_back in [false, true] {
        eprintln!(
            "session: {total} steps of {per_step} anchors, write_back {}",
            if write_back { "on" } else { "off" }
        );
        let r = session(&d, d.channel().await?, &plan, write_back).await?;
        runs.push((write_back, r));
    }
    eprintln!("session: the Upsert reference ({UPSERTS} calls of {per_step} items)");
    let (up_lat, up_cpu) = upserts(&d, &steps, &corpus.labels).await?;

    let measured = args.session_steps.max(1);
    println!(
        "## Session as a cross-batch memory ({}; {} steps of {per_step} anchors after {} warm-up, HARD at ef {}, {} negatives and 1 positive per anchor, with_vectors; fresh vectors = stored + Gaussian noise of norm {}, unit length; the trainer waits {} ms between an answer and its next step; one Session at a time)\n",
        corpus.data.describe,
        measured,
        args.session_warmup,
        if args.session_expansion == 0 {
            "64 (the collection's)".to_string()
        } else {
            args.session_expansion.to_string()
        },
        args.session_negatives,
        args.session_noise,
        args.session_think_ms,
    );
    println!(
        "| write_back | round trip p50 ms | p99 ms | max ms | mean ms | of it mining in the daemon, p50 ms | steps/s (with the trainer's wait) | daemon CPU ms per step | client CPU ms per step | answer KiB (median) | items per answer (median) | triplets per answer (median) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut summary = Vec::new();
    for (write_back, r) in &runs {
        let mut lat = r.lat.clone();
        lat.sort();
        let mean = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / lat.len().max(1) as f64;
        let steps_n = lat.len().max(1) as f64;
        let (dc, cc) = (r.cpu.daemon * 1e3 / steps_n, r.cpu.client * 1e3 / steps_n);
        let p50 = millis(quantile(&lat, 0.5));
        let p99 = millis(quantile(&lat, 0.99));
        let mut mined = r.mined.clone();
        mined.sort();
        let mined = millis(quantile(&mined, 0.5));
        println!(
            "| {} | {p50:.1} | {p99:.1} | {:.1} | {:.1} | {mined:.1} | {:.1} | {dc:.1} | {cc:.1} | {:.0} | {} | {} |",
            if *write_back { "on" } else { "off" },
            millis(lat.last().copied().unwrap_or_default()),
            mean * 1e3,
            steps_n / r.wall,
            median(r.bytes.clone()) as f64 / 1024.0,
            median(r.items.clone()),
            median(r.triplets.clone()),
        );
        summary.push((p50, p99, mean * 1e3, dc, steps_n / r.wall));
    }
    if let [off, on] = summary[..] {
        println!(
            "| on ÷ off | {:.2} | {:.2} | - | {:.2} | - | {:.2} | {:.2} | - | - | - | - |",
            on.0 / off.0,
            on.1 / off.1,
            on.2 / off.2,
            on.4 / off.4,
            on.3 / off.3,
        );
    }
    println!();
    let up_n = up_lat.len().max(1) as f64;
    println!(
        "Reference for the write itself: Items.Upsert of one step's {per_step} items (their fresh vectors), durable on return, {} calls one at a time: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; daemon CPU {:.1} ms per call.\n",
        up_lat.len(),
        millis(quantile(&up_lat, 0.5)),
        millis(quantile(&up_lat, 0.99)),
        millis(up_lat.last().copied().unwrap_or_default()),
        up_cpu.daemon * 1e3 / up_n,
    );
    let off_probe = runs
        .iter()
        .find(|(w, _)| !w)
        .map_or(Duration::ZERO, |(_, r)| r.probe);
    for (write_back, r) in &runs {
        let without: u64 = r.anchors_without_triplet;
        if !write_back {
            println!(
                "write_back off: the probe step (one anchor) answered in {:.1} ms; {without} anchors of the measured steps got no triplet.",
                millis(r.probe)
            );
            continue;
        }
        let last = total as u64 - 1;
        println!(
            "write_back on: the probe step after the last answer was answered in {:.1} ms with written_step = {} (expected {last}), {:.1} ms more than the same probe without a pending write: about how long after its answer the last step's write-back became durable. MineStats.written = {} (expected {}). Answers whose written_step was not the step before: {} of {}; {without} anchors of the measured steps got no triplet.",
            millis(r.probe),
            r.probe_written_step
                .map_or("unset".into(), |s| s.to_string()),
            millis(r.probe.saturating_sub(off_probe)),
            r.written,
            total * per_step,
            r.lagging,
            r.lat.len(),
        );
        if r.probe_written_step != Some(last) || r.written != (total * per_step) as u64 {
            println!(
                "\n**Check failed:** the write-back's durability report does not match what was sent."
            );
        }
    }
    println!();
    d.stop().await
}
