//! Load: many concurrent streams held open beside a mixed unary load, for a fixed time,
//! on loopback. Reports throughput and latency per kind of call, every status that is
//! not OK (RESOURCE_EXHAUSTED, the daemon's back-pressure, apart from the rest), and the
//! daemon's peak RSS.
//!
//! The streams are spread over a fixed number of HTTP/2 connections, as many clients
//! would hold them, and rotate over four kinds, each sending (or reading) one message per
//! interval:
//! - EmbedStream: one image per message, answered one embedding per message;
//! - Session (mining): one step of two anchors with their vectors, answered by a batch;
//! - MineTriplets: a long SEMI_HARD stream read one message per interval (a slow reader
//!   the daemon must hold without buffering ahead);
//! - UpsertStream: one item per message, acknowledged as a whole when the stream ends.
//!
//! The unary callers loop as fast as they are answered over: Search (6 in 10), Upsert of
//! 10 items (re-writing stored ids, so the collection keeps its size; 3 in 10) and Embed
//! of one image (1 in 10).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use likeness::grpc::client::Channel;
use likeness::grpc::pb;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::items_client::ItemsClient;
use likeness::grpc::pb::miner_client::MinerClient;
use tokio_stream::StreamExt;

use crate::Ctx;
use crate::daemon::{COLLECTION, Daemon, search_request};

const KINDS: [&str; 4] = ["EmbedStream", "Session", "MineTriplets", "UpsertStream"];
/// The kinds `--only streams` holds idle: the load's four, and the class-batch stream.
const IDLE_KINDS: [&str; 5] = [
    "EmbedStream",
    "Session",
    "MineTriplets",
    "UpsertStream",
    "MineBatches",
];
const UNARY: [&str; 3] = ["Search", "Upsert", "Embed"];

/// What every caller records: latencies and statuses per call kind.
#[derive(Default)]
struct Tally {
    lat: BTreeMap<&'static str, Vec<Duration>>,
    codes: BTreeMap<(&'static str, String), usize>,
    /// Streams that were open and had been answered at least once when the time was up.
    streams_alive: usize,
}

impl Tally {
    fn ok(&mut self, kind: &'static str, d: Duration) {
        self.lat.entry(kind).or_default().push(d);
    }

    fn err(&mut self, kind: &'static str, s: &tonic::Status) {
        *self
            .codes
            .entry((kind, format!("{:?}", s.code())))
            .or_default() += 1;
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.lat {
            self.lat.entry(k).or_default().extend(v);
        }
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        self.streams_alive += other.streams_alive;
    }
}

struct Shared {
    items: Vec<pb::Item>,
    images: Vec<pb::Input>,
    model: String,
    until: Instant,
    interval: Duration,
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q) as usize).min(sorted.len() - 1);
    sorted[i].as_secs_f64() * 1e3
}

fn mine_request(seed: u64) -> pb::MineRequest {
    pb::MineRequest {
        collection: COLLECTION.into(),
        strategy: pb::Strategy::SemiHard as i32,
        margin: Some(0.2),
        negatives_per_anchor: 1,
        batch_size: 4,
        seed,
        anchors: Some(pb::AnchorSet {
            kind: Some(pb::anchor_set::Kind::All(true)),
        }),
        ..Default::default()
    }
}

/// Sleeps until the next tick of a stream, or returns false when the time is up.
async fn tick(next: &mut Instant, sh: &Shared) -> bool {
    *next += sh.interval;
    if *next >= sh.until {
        tokio::time::sleep_until(sh.until.into()).await;
        return false;
    }
    tokio::time::sleep_until((*next).into()).await;
    true
}

/// One message out on a bidirectional stream and its answer back, timed into `t`;
/// false when the call's request side has closed.
/// Stream `n`'s EmbedStream request number `i`: one image.
fn embed_request(sh: &Shared, i: usize) -> pb::EmbedRequest {
    pb::EmbedRequest {
        model: sh.model.clone(),
        inputs: vec![sh.images[i % sh.images.len()].clone()],
    }
}

/// Session `n`'s step `step`: two anchors, the mining request on the first step.
fn session_step(sh: &Shared, n: usize, step: u64) -> pb::MineStep {
    let anchors = (0..2)
        .map(|j| {
            let it = &sh.items[(n * 31 + step as usize * 2 + j) % sh.items.len()];
            pb::StepAnchor {
                id: it.id.clone(),
                label: it.label.clone(),
                vector: it.vector.clone(),
            }
        })
        .collect();
    pb::MineStep {
        step,
        request: (step == 0).then(|| mine_request(n as u64)),
        anchors,
        write_back: false,
    }
}

/// An UpsertStream message: item number `i` of the data set.
fn upsert_request(sh: &Shared, i: usize) -> pb::UpsertRequest {
    pb::UpsertRequest {
        collection: COLLECTION.into(),
        items: vec![sh.items[i % sh.items.len()].clone()],
    }
}

/// A bidirectional stream as the bench holds it: the sender of its requests and the
/// stream of its answers.
type Bidi<Req, Resp> = (tokio::sync::mpsc::Sender<Req>, tonic::Streaming<Resp>);

async fn open_embed_stream(
    ch: Channel,
) -> Result<Bidi<pb::EmbedRequest, pb::EmbedResponse>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let out = EmbedderClient::new(ch)
        .embed_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, out))
}

async fn open_session(ch: Channel) -> Result<Bidi<pb::MineStep, pb::MinedBatch>, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let out = MinerClient::new(ch)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, out))
}

async fn round_trip<Req, Resp>(
    tx: &tokio::sync::mpsc::Sender<Req>,
    out: &mut tonic::Streaming<Resp>,
    msg: Req,
    name: &'static str,
    t: &mut Tally,
) -> Result<bool, tonic::Status> {
    let sent = Instant::now();
    if tx.send(msg).await.is_err() {
        return Ok(false);
    }
    match out.next().await {
        Some(r) => {
            r?;
            t.ok(name, sent.elapsed());
            Ok(true)
        }
        None => Err(tonic::Status::aborted(format!("{name} ended early"))),
    }
}

/// One stream of `kind` on `ch`, for the whole run.
async fn stream(ch: Channel, kind: usize, n: usize, sh: Arc<Shared>) -> Tally {
    let mut t = Tally::default();
    let name = KINDS[kind];
    // Streams start spread over the first interval, not all at once.
    let mut next = Instant::now() + sh.interval.mul_f64((n % 97) as f64 / 97.0);
    tokio::time::sleep_until(next.into()).await;
    let mut answered = false;
    let result: Result<(), tonic::Status> = async {
        match name {
            "EmbedStream" => {
                let (tx, mut out) = open_embed_stream(ch).await?;
                let mut i = n;
                loop {
                    let req = embed_request(&sh, i);
                    i += 1;
                    if !round_trip(&tx, &mut out, req, name, &mut t).await? {
                        break;
                    }
                    answered = true;
                    if !tick(&mut next, &sh).await {
                        break;
                    }
                }
            }
            "Session" => {
                let (tx, mut out) = open_session(ch).await?;
                let mut step = 0u64;
                loop {
                    let msg = session_step(&sh, n, step);
                    step += 1;
                    if !round_trip(&tx, &mut out, msg, name, &mut t).await? {
                        break;
                    }
                    answered = true;
                    if !tick(&mut next, &sh).await {
                        break;
                    }
                }
            }
            "MineTriplets" => {
                let mut client = MinerClient::new(ch);
                let mut out = client
                    .mine_triplets(mine_request(1000 + n as u64))
                    .await?
                    .into_inner();
                loop {
                    let asked = Instant::now();
                    match out.next().await {
                        Some(r) => {
                            r?;
                            t.ok(name, asked.elapsed());
                            answered = true;
                        }
                        None => break,
                    }
                    if !tick(&mut next, &sh).await {
                        break;
                    }
                }
            }
            _ => {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let mut client = ItemsClient::new(ch);
                let call = tokio::spawn(async move {
                    client
                        .upsert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                });
                let mut i = n * 7;
                loop {
                    let msg = upsert_request(&sh, i);
                    i += 1;
                    if tx.send(msg).await.is_err() {
                        break;
                    }
                    if !tick(&mut next, &sh).await {
                        break;
                    }
                }
                drop(tx);
                let sent = Instant::now();
                call.await
                    .map_err(|e| tonic::Status::internal(e.to_string()))??;
                t.ok(name, sent.elapsed());
                answered = true;
            }
        }
        Ok(())
    }
    .await;
    match result {
        Ok(()) if answered => t.streams_alive += 1,
        Ok(()) => {}
        Err(s) => t.err(name, &s),
    }
    t
}

/// One unary caller for the whole run.
async fn unary(ch: Channel, c: usize, queries: Arc<Vec<Vec<f32>>>, sh: Arc<Shared>) -> Tally {
    let mut t = Tally::default();
    let mut items = ItemsClient::new(ch.clone());
    let mut embedder = EmbedderClient::new(ch);
    let mut i = c;
    while Instant::now() < sh.until {
        let which = match i % 10 {
            0..=5 => 0,
            6..=8 => 1,
            _ => 2,
        };
        let name = UNARY[which];
        let start = Instant::now();
        let r = match which {
            0 => items
                .search(search_request(queries[i % queries.len()].clone()))
                .await
                .map(|_| ()),
            1 => {
                let from = (i * 10) % sh.items.len().saturating_sub(10).max(1);
                items
                    .upsert(pb::UpsertRequest {
                        collection: COLLECTION.into(),
                        items: sh.items[from..(from + 10).min(sh.items.len())].to_vec(),
                    })
                    .await
                    .map(|_| ())
            }
            _ => embedder
                .embed(pb::EmbedRequest {
                    model: sh.model.clone(),
                    inputs: vec![sh.images[i % sh.images.len()].clone()],
                })
                .await
                .map(|_| ()),
        };
        match r {
            Ok(()) => t.ok(name, start.elapsed()),
            Err(s) => t.err(name, &s),
        }
        i += 7;
    }
    t
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let data = &ctx.data;
    let d = Daemon::start(&ctx.spec).await?;
    eprintln!("load: loading {} items", data.n());
    d.ingest(data, args.batch, args.writers).await?;
    let images = crate::embed::png_inputs(&args.embed_images)?;
    let model = crate::embed::model_name(&args.embed_model)?;
    let secs = args.load_secs;
    let (streams, conns) = (args.load_streams, args.load_connections.max(1));
    // The stream kinds in turn (--load-kinds picks some, to see what each costs).
    let kinds: Vec<usize> = (0..KINDS.len())
        .filter(|&k| args.load_kinds.is_empty() || args.load_kinds.iter().any(|n| n == KINDS[k]))
        .collect();
    if kinds.is_empty() {
        return Err(format!("--load-kinds: the kinds are {}", KINDS.join(", ")));
    }
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(d.channel().await?);
    }
    let mut unary_channels = Vec::new();
    for _ in 0..args.load_unary.min(conns).max(1) {
        unary_channels.push(d.channel().await?);
    }
    let rss_before = d.memory_kib()?;
    let phases_before = write_phases(&d).await?;
    let start = Instant::now();
    let sh = Arc::new(Shared {
        items: data.items.to_vec(),
        images,
        model,
        until: start + Duration::from_secs_f64(secs),
        interval: Duration::from_millis(args.load_interval_ms.max(1)),
    });
    eprintln!(
        "load: {streams} streams over {conns} connections and {} unary callers for {secs} s",
        args.load_unary
    );
    let cpu = crate::procfs::Meter::start(d.pid());
    // Peak RSS is VmHWM at the end; the sampler also keeps the largest VmRSS it saw.
    let peak = Arc::new(Mutex::new(0u64));
    let sampler = {
        let (peak, pid) = (peak.clone(), d.pid());
        tokio::spawn(async move {
            while let Some(pid) = pid {
                if let Ok(kib) = crate::procfs::status_kib(pid, "VmRSS") {
                    let mut p = peak.lock().expect("peak");
                    *p = (*p).max(kib);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..streams {
        let ch = channels[n % conns].clone();
        let kind = kinds[n % kinds.len()];
        tasks.spawn(stream(ch, kind, n, sh.clone()));
    }
    for c in 0..args.load_unary {
        let ch = unary_channels[c % unary_channels.len()].clone();
        tasks.spawn(unary(ch, c, ctx.queries.clone(), sh.clone()));
    }
    let mut total = Tally::default();
    while let Some(t) = tasks.join_next().await {
        total.merge(t.map_err(|e| e.to_string())?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu.stop();
    sampler.abort();
    let mem = d.memory_kib()?;
    let peak_seen = *peak.lock().expect("peak");
    let phases_after = write_phases(&d).await?;
    d.stop().await?;

    println!(
        "## Load: {streams} streams over {conns} HTTP/2 connections, one message per {} ms each, beside {} unary callers, for {secs} s ({} x {}-d in the collection; loopback)\n",
        args.load_interval_ms,
        args.load_unary,
        data.n(),
        data.dim
    );
    println!(
        "| call | kind | OK calls or messages | per second | p50, ms | p99, ms | RESOURCE_EXHAUSTED | other errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut others = 0;
    for (kind, names) in [("stream", &KINDS[..]), ("unary", &UNARY[..])] {
        for &name in names {
            let mut lat = total.lat.get(name).cloned().unwrap_or_default();
            lat.sort();
            let exhausted = total
                .codes
                .get(&(name, "ResourceExhausted".to_string()))
                .copied()
                .unwrap_or(0);
            let other: usize = total
                .codes
                .iter()
                .filter(|((k, c), _)| *k == name && c != "ResourceExhausted")
                .map(|(_, n)| n)
                .sum();
            others += other;
            println!(
                "| {name} | {kind} | {} | {:.0} | {:.2} | {:.2} | {exhausted} | {other} |",
                lat.len(),
                lat.len() as f64 / elapsed,
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
            );
        }
    }
    println!(
        "\nStreams open and answered at the end: {} of {streams}. Errors beyond RESOURCE_EXHAUSTED: {others}{}.",
        total.streams_alive,
        if others == 0 {
            " (target 0: met)"
        } else {
            " (target 0: missed)"
        }
    );
    for ((name, code), n) in &total.codes {
        println!("- {name}: {n} x {code}");
    }
    println!(
        "\nDaemon memory: VmRSS {:.1} MiB before the load, {:.1} MiB at the end, peak (VmHWM, including the ingest) {:.1} MiB, largest VmRSS sampled during the load {:.1} MiB. Daemon CPU {:.2} cores busy on average, clients {:.2}.\n",
        rss_before.0 as f64 / 1024.0,
        mem.0 as f64 / 1024.0,
        mem.2 as f64 / 1024.0,
        peak_seen as f64 / 1024.0,
        cpu.daemon / elapsed,
        cpu.client / elapsed,
    );
    print_write_phases(&phases_before, &phases_after);
    Ok(())
}

/// The daemon's write phases (likeness_write_phase_seconds): per phase, the sum of
/// seconds and the count, for the bench's collection.
async fn write_phases(d: &Daemon) -> Result<Vec<(&'static str, f64, f64)>, String> {
    let mut out = Vec::new();
    for phase in likeness::collections::WritePhase::ALL {
        let name = phase.name();
        let labels = format!("{{collection=\"{COLLECTION}\",phase=\"{name}\"}}");
        let sum = d
            .metric(&format!("likeness_write_phase_seconds_sum{labels}"))
            .await?;
        let count = d
            .metric(&format!("likeness_write_phase_seconds_count{labels}"))
            .await?;
        out.push((name, sum.unwrap_or(0.0), count.unwrap_or(0.0)));
    }
    Ok(out)
}

/// Where the writes during the load spent their time, phase by phase (the difference
/// of the daemon's write-phase histograms across the load).
fn print_write_phases(before: &[(&'static str, f64, f64)], after: &[(&'static str, f64, f64)]) {
    println!(
        "\nWhere the writes during the load spent their time (likeness_write_phase_seconds, all writes: Upsert, stream messages, write-backs):\n"
    );
    println!("| phase | writes | mean, ms | total, s |");
    println!("|---|---|---|---|");
    for ((name, s0, c0), (_, s1, c1)) in before.iter().zip(after) {
        let (sum, count) = (s1 - s0, c1 - c0);
        let mean = if count > 0.0 { sum / count * 1e3 } else { 0.0 };
        println!("| {name} | {count:.0} | {mean:.2} | {sum:.1} |");
    }
}

/// Idle streams: per kind, `--load-streams` streams are opened over the connections,
/// each sends its first message (or reads its first answer) and then holds still; the
/// daemon's RSS with them open, less its RSS before, over their count, is what one idle
/// open stream costs. Then they close and the RSS is read again.
pub async fn idle(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let data = &ctx.data;
    let d = Daemon::start(&ctx.spec).await?;
    eprintln!("streams: loading {} items", data.n());
    d.ingest(data, args.batch, args.writers).await?;
    let sh = Arc::new(Shared {
        items: data.items.to_vec(),
        images: crate::embed::png_inputs(&args.embed_images)?,
        model: crate::embed::model_name(&args.embed_model)?,
        until: Instant::now(),
        interval: Duration::from_millis(1),
    });
    let (n, conns) = (args.load_streams.max(1), args.load_connections.max(1));
    let mut channels = Vec::with_capacity(conns);
    for _ in 0..conns {
        channels.push(d.channel().await?);
    }
    // The heap settles (the daemon trims it once writes are quiet) before each reading.
    let settle = || tokio::time::sleep(Duration::from_secs(3));
    settle().await;
    println!(
        "## Idle open streams: {n} of each kind over {conns} HTTP/2 connections, each after its first message ({} x {}-d in the collection; loopback)\n",
        data.n(),
        data.dim
    );
    println!(
        "| kind | VmRSS before, MiB | with the second round open, MiB | per stream, first round, KiB | per stream, second round, KiB | after they close, MiB |"
    );
    println!("|---|---|---|---|---|---|");
    for name in IDLE_KINDS {
        if !args.load_kinds.is_empty() && !args.load_kinds.iter().any(|k| k == name) {
            continue;
        }
        // Twice: the first round also grows what the daemon keeps for a load of this
        // size once seen (the embedder's arena for a batch of n images, the runtime's
        // buffers), the second is what the streams themselves hold.
        let first = hold_many(&d, &channels, name, n, &sh).await?;
        let second = hold_many(&d, &channels, name, n, &sh).await?;
        let per = |(before, open, _): (u64, u64, u64)| (open as f64 - before as f64) / n as f64;
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            first.0 as f64 / 1024.0,
            second.1 as f64 / 1024.0,
            per(first),
            per(second),
            second.2 as f64 / 1024.0,
        );
    }
    println!();
    d.stop().await
}

/// Opens `n` streams of `kind`, each past its first message, reads the daemon's RSS,
/// closes them: RSS before, with them open, and after (KiB).
async fn hold_many(
    d: &Daemon,
    channels: &[Channel],
    kind: &'static str,
    n: usize,
    sh: &Arc<Shared>,
) -> Result<(u64, u64, u64), String> {
    let settle = || tokio::time::sleep(Duration::from_secs(3));
    let conns = channels.len();
    {
        let before = d.memory_kib()?.0;
        let (close_tx, close_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let (open_tx, mut open_rx) = tokio::sync::mpsc::channel::<Result<(), String>>(n);
        for i in 0..n {
            let (ch, sh) = (channels[i % conns].clone(), sh.clone());
            let (open_tx, mut close_rx) = (open_tx.clone(), close_rx.clone());
            tasks.spawn(async move {
                let held = hold_one(ch, kind, i, &sh).await;
                let _ = open_tx
                    .send(held.as_ref().map(|_| ()).map_err(|e| e.to_string()))
                    .await;
                let _ = close_rx.wait_for(|c| *c).await;
                drop(held);
            });
        }
        for _ in 0..n {
            open_rx.recv().await.ok_or("a stream task ended")??;
        }
        settle().await;
        let open = d.memory_kib()?.0;
        close_tx.send(true).map_err(|e| e.to_string())?;
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())?;
        }
        settle().await;
        let after = d.memory_kib()?.0;
        Ok((before, open, after))
    }
}

/// What keeps one idle stream open: its request sender and its answer stream.
type Held = (Box<dyn std::any::Any + Send>, Box<dyn std::any::Any + Send>);

/// Opens a stream of `kind`, sends its first message or reads its first answer.
async fn hold_one(
    ch: Channel,
    name: &'static str,
    n: usize,
    sh: &Shared,
) -> Result<Held, tonic::Status> {
    let mut t = Tally::default();
    match name {
        "EmbedStream" => {
            let (tx, mut out) = open_embed_stream(ch).await?;
            round_trip(&tx, &mut out, embed_request(sh, n), name, &mut t).await?;
            Ok((Box::new(tx), Box::new(out)))
        }
        "Session" => {
            let (tx, mut out) = open_session(ch).await?;
            round_trip(&tx, &mut out, session_step(sh, n, 0), name, &mut t).await?;
            Ok((Box::new(tx), Box::new(out)))
        }
        "MineTriplets" => {
            let mut out = MinerClient::new(ch)
                .mine_triplets(mine_request(1000 + n as u64))
                .await?
                .into_inner();
            match out.next().await {
                Some(r) => r.map(|_| ())?,
                None => return Err(tonic::Status::aborted("MineTriplets ended early")),
            }
            Ok((Box::new(()), Box::new(out)))
        }
        "MineBatches" => {
            let req = pb::BatchRequest {
                collection: COLLECTION.into(),
                seed: n as u64,
                ..Default::default()
            };
            let mut out = MinerClient::new(ch).mine_batches(req).await?.into_inner();
            match out.next().await {
                Some(r) => r.map(|_| ())?,
                None => return Err(tonic::Status::aborted("MineBatches ended early")),
            }
            Ok((Box::new(()), Box::new(out)))
        }
        _ => {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut client = ItemsClient::new(ch);
            let call = tokio::spawn(async move {
                client
                    .upsert_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
            });
            tx.send(upsert_request(sh, n * 7))
                .await
                .map_err(|_| tonic::Status::aborted("UpsertStream ended early"))?;
            // Dropping the sender ends the stream (committed); the call is aborted with it.
            Ok((Box::new(tx), Box::new(AbortOnDrop(call))))
        }
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
