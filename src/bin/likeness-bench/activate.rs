//! Activate: a collection of images enrolled by input, re-embedded with a second model
//! (tests/fixtures/proj, published over gRPC) while searches and writes go on.
//!
//! Figures: the re-embedding rate beside the same model's plain Embed throughput over
//! gRPC in the same run (the cost of the store writes and the walk), Search QPS and
//! latency before and during the run, the latency of writes by input during it, and how
//! long the switch held writes (from the daemon's log).

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use likeness::grpc::pb;
use likeness::grpc::pb::collections_client::CollectionsClient;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::models_client::ModelsClient;

use crate::Ctx;
use crate::daemon::{COLLECTION, Daemon, items_client, status};

const NEW: &str = "fmnist-triplet@2";

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn pct(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    ms(sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)])
}

/// Search callers (by stored vector) until `stop`; returns the latencies.
async fn searchers(
    d: &Daemon,
    queries: Arc<Vec<Vec<f32>>>,
    clients: usize,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinSet<Result<Vec<Duration>, String>>, String> {
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let mut items = items_client(d.channel().await?);
        let (queries, stop) = (queries.clone(), stop.clone());
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut i = c;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                items
                    .search(crate::daemon::search_request(
                        queries[i % queries.len()].clone(),
                    ))
                    .await
                    .map_err(status)?;
                lat.push(t.elapsed());
                i += clients;
            }
            Ok(lat)
        });
    }
    Ok(set)
}

async fn join(
    mut set: tokio::task::JoinSet<Result<Vec<Duration>, String>>,
) -> Result<Vec<Duration>, String> {
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r.map_err(|e| e.to_string())??);
    }
    all.sort();
    Ok(all)
}

fn item(i: usize, png: &pb::Input) -> pb::Item {
    pb::Item {
        id: format!("v{i}"),
        label: format!("c{}", i % 100),
        input: Some(png.clone()),
        ..Default::default()
    }
}

pub async fn run(ctx: &Ctx) -> Result<(), String> {
    let args = &ctx.args;
    let n = args.activate_n;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut images = Vec::new();
    for f in [
        "enrol_images.npy",
        "query_clean_images.npy",
        "query_reid_images.npy",
    ] {
        images.extend(crate::embed::png_inputs(&fixtures.join("fmnist").join(f))?);
    }
    let d = Daemon::start(&ctx.spec).await?;
    CollectionsClient::new(d.channel().await?)
        .create_collection(pb::CreateCollectionRequest {
            name: COLLECTION.into(),
            model: "fmnist-triplet".into(),
            ..Default::default()
        })
        .await
        .map_err(status)?;
    eprintln!("activate: enrolling {n} images by input");
    let items: Vec<pb::Item> = (0..n).map(|i| item(i, &images[i % images.len()])).collect();
    let enrol = d.upsert_all(&items, 200, args.writers).await?;
    let manifest = std::fs::read_to_string(fixtures.join("proj/model.toml"))
        .map_err(|e| format!("tests/fixtures/proj/model.toml: {e}"))?;
    let onnx = std::fs::read(fixtures.join("proj/proj.onnx"))
        .map_err(|e| format!("tests/fixtures/proj/proj.onnx: {e}"))?;
    let chunks = vec![pb::ModelChunk {
        name: "fmnist-triplet".into(),
        manifest,
        bytes: onnx,
    }];
    ModelsClient::new(d.channel().await?)
        .publish(tokio_stream::iter(chunks))
        .await
        .map_err(status)?;

    // The new model's plain throughput over gRPC: the same images, batches of 256.
    let mut embedder = EmbedderClient::new(d.channel().await?)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);
    let t = Instant::now();
    for chunk in items.chunks(256) {
        embedder
            .embed(pb::EmbedRequest {
                model: NEW.into(),
                inputs: chunk.iter().filter_map(|it| it.input.clone()).collect(),
            })
            .await
            .map_err(status)?;
    }
    let embed_rate = n as f64 / t.elapsed().as_secs_f64();

    // Queries: stored vectors of the current generation.
    let got = items_client(d.channel().await?)
        .get(pb::GetRequest {
            collection: COLLECTION.into(),
            ids: (0..200.min(n)).map(|i| format!("v{i}")).collect(),
            with_vectors: true,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    let queries = Arc::new(
        got.items
            .into_iter()
            .map(|it| it.vector)
            .collect::<Vec<_>>(),
    );
    let clients = args.clients.min(8);

    let stop = Arc::new(AtomicBool::new(false));
    let before = searchers(&d, queries.clone(), clients, stop.clone()).await?;
    let secs = 5.0;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let before = join(before).await?;
    let before_qps = before.len() as f64 / secs;

    // The run: searches and a writer by input beside it, until the switch.
    let stop = Arc::new(AtomicBool::new(false));
    let during = searchers(&d, queries.clone(), clients, stop.clone()).await?;
    let writer = {
        let mut items = items_client(d.channel().await?);
        let (stop, images) = (stop.clone(), images.clone());
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let batch =
                    (0..10).map(|j| item(n + i * 10 + j, &images[(i * 10 + j) % images.len()]));
                let t = Instant::now();
                items
                    .upsert(pb::UpsertRequest {
                        collection: COLLECTION.into(),
                        items: batch.collect(),
                    })
                    .await
                    .map_err(status)?;
                lat.push(t.elapsed());
                i += 1;
            }
            lat.sort();
            Ok::<_, String>((lat, i * 10))
        })
    };
    let mut colls = CollectionsClient::new(d.channel().await?);
    let started = Instant::now();
    ModelsClient::new(d.channel().await?)
        .activate(pb::ActivateRequest {
            collection: COLLECTION.into(),
            model: "fmnist-triplet".into(),
            version: "2".into(),
        })
        .await
        .map_err(status)?;
    let last = loop {
        let info = colls
            .get_collection(pb::GetCollectionRequest {
                name: COLLECTION.into(),
            })
            .await
            .map_err(status)?
            .into_inner();
        let a = info.activation.clone().ok_or("no activation reported")?;
        match a.state() {
            pb::activation::State::Done => break (info, a),
            pb::activation::State::Failed => {
                return Err(format!("the activation failed: {}", a.error));
            }
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err("the activation took over 30 minutes".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = join(during).await?;
    let (writes, written) = writer.await.map_err(|e| e.to_string())??;
    let (info, a) = last;
    let log = d.log();
    let held = log
        .lines()
        .filter(|l| l.contains("switched to the new generation"))
        .find_map(|l| {
            l.split("writes_held_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
    d.stop().await?;

    let rate = a.done as f64 / took.as_secs_f64();
    println!(
        "## Activate: {n} images enrolled by input (fmnist-triplet), re-embedded with a second model (tests/fixtures/proj) while {clients} search clients and one writer (10 images by input per Upsert) run\n"
    );
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| enrolment by input (embed + store), images/s | {:.0} |",
        enrol.rate
    );
    println!(
        "| the new model's Embed over gRPC alone (batches of 256), images/s | {embed_rate:.0} |"
    );
    println!(
        "| re-embedding rate (items re-embedded / wall time to the switch), items/s | {rate:.0} ({:.2}x Embed alone) |",
        rate / embed_rate
    );
    println!(
        "| items re-embedded, of which written during the run | {} ({written} written during it; count after: {}) |",
        a.done, info.count
    );
    println!("| wall time to the switch | {:.1} s |", took.as_secs_f64());
    println!(
        "| Search QPS before / during | {before_qps:.0} / {:.0} ({:.2}x) |",
        during.len() as f64 / took.as_secs_f64(),
        during.len() as f64 / took.as_secs_f64() / before_qps
    );
    println!(
        "| Search p50 / p99 before, ms | {:.2} / {:.2} |",
        pct(&before, 0.5),
        pct(&before, 0.99)
    );
    println!(
        "| Search p50 / p99 during, ms | {:.2} / {:.2} |",
        pct(&during, 0.5),
        pct(&during, 0.99)
    );
    println!(
        "| Upsert (10 by input) p50 / p99 / max during, ms | {:.1} / {:.1} / {:.1} |",
        pct(&writes, 0.5),
        pct(&writes, 0.99),
        writes.last().map_or(f64::NAN, |d| ms(*d))
    );
    println!(
        "| writes held by the switch, ms (daemon log) | {} |\n",
        held.map_or("?".into(), |h| h.to_string())
    );
    Ok(())
}
