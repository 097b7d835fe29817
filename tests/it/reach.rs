//! Issue 20: an item that exists must be found. 100,000 items written by four concurrent
//! clients (two unary Upsert loops, two UpsertStreams) into a server whose index inserts
//! each batch on two threads, so the graph is built by several threads at once; once the
//! sweep that follows quiet writes has run, every item searched for by its own vector at
//! k = 1 must come back first. The same after a restart that rebuilds the index from the
//! store, as a kill -9 leaves it: recovery sweeps before it serves.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::*;
use likeness::grpc::pb;

const N: usize = 100_000;
const DIM: usize = 16;
const BATCH: usize = 1_000;
const WRITERS: usize = 4;

/// Unit Gaussian vectors: no two alike, and a hard case for HNSW (no cluster structure).
fn vectors() -> Vec<Vec<f32>> {
    let mut rng = likeness::rng::Rng::new(20);
    (0..N)
        .map(|_| (0..DIM).map(|_| rng.normal()).collect())
        .collect()
}

fn batch(vectors: &[Vec<f32>], b: usize) -> Vec<pb::Item> {
    (b * BATCH..((b + 1) * BATCH).min(N))
        .map(|i| item(&format!("r{i}"), "x", vectors[i].clone()))
        .collect()
}

/// Writers 0 and 1 send one Upsert per batch; 2 and 3 send theirs as the messages of
/// one UpsertStream each. All take the next batch from one counter.
async fn ingest(server: &TestServer, vectors: Arc<Vec<Vec<f32>>>) {
    let next = Arc::new(AtomicUsize::new(0));
    let batches = N.div_ceil(BATCH);
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let mut items = server.items().await;
        let (next, vectors) = (next.clone(), vectors.clone());
        tasks.spawn(async move {
            let take = move || {
                let b = next.fetch_add(1, Ordering::Relaxed);
                (b < batches).then_some(b)
            };
            if w < 2 {
                while let Some(b) = take() {
                    items
                        .upsert(pb::UpsertRequest {
                            collection: "reach".into(),
                            items: batch(&vectors, b),
                        })
                        .await
                        .unwrap();
                }
            } else {
                // The stream's messages are applied as they arrive, so this writer's
                // batches reach the index beside the others'.
                let msgs = std::iter::from_fn(take).map(move |b| pb::UpsertRequest {
                    collection: "reach".into(),
                    items: batch(&vectors, b),
                });
                items.upsert_stream(tokio_stream::iter(msgs)).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

/// The ids whose k = 1 search for their own vector answers something else, with what
/// it answered.
async fn not_found_first(server: &TestServer, vectors: &[Vec<f32>]) -> Vec<(String, String)> {
    let mut items = server.items().await;
    let mut missed = Vec::new();
    for (c, chunk) in vectors.chunks(2_000).enumerate() {
        let results = items
            .search_batch(pb::SearchBatchRequest {
                collection: "reach".into(),
                queries: chunk
                    .iter()
                    .map(|v| vector_query(v.clone()).unwrap())
                    .collect(),
                k: 1,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .results;
        assert_eq!(results.len(), chunk.len());
        for (i, r) in results.iter().enumerate() {
            let id = format!("r{}", c * 2_000 + i);
            let got = r.hits.first().map_or("nothing", |h| h.id.as_str());
            if got != id {
                missed.push((id, got.to_string()));
            }
        }
    }
    missed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_item_of_a_concurrent_100k_ingest_finds_itself_at_k_1() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::light_in(dir.path(), |c| c.index_threads = 2).await;
    let mut c = server.collections().await;
    create(&mut c, "reach", DIM as u32, pb::Metric::Cosine).await;
    let vectors = Arc::new(vectors());
    ingest(&server, vectors.clone()).await;
    assert_eq!(count(&mut c, "reach").await, N as u64);

    // Writes are quiet now: the daemon sweeps the index within a second or so. (A
    // stall of the writers on a busy machine can set off a sweep midway; the keys
    // after it are then swept once the catch-up delay has passed, a minute or so.)
    let app = server.app().await;
    let coll = app.registry().collection("reach").unwrap();
    wait_for_sweep(&coll, std::time::Duration::from_secs(300)).await;
    let reach = coll.reach_counts();
    println!("after the ingest and its sweep: {reach:?}");
    let missed = not_found_first(&server, &vectors).await;
    assert!(
        missed.is_empty(),
        "{} of {N} items not found first by their own vector at k = 1 (e.g. {:?}); {reach:?}",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    assert!(reach.checked >= N as u64, "{reach:?}");
    assert_eq!(
        reach.repaired + reach.stashed,
        reach.unreachable,
        "{reach:?}"
    );
    drop((coll, app));
    server.stop().await;

    // Without a snapshot (as a kill -9 leaves the data dir), recovery rebuilds the index
    // from the store on two threads, and checks it as it goes.
    std::fs::remove_file(dir.path().join("index/reach.snapshot.json")).unwrap();
    let server = TestServer::light_in(dir.path(), |c| c.index_threads = 2).await;
    let missed = not_found_first(&server, &vectors).await;
    assert!(
        missed.is_empty(),
        "after the rebuild, {} of {N} items not found first (e.g. {:?})",
        missed.len(),
        &missed[..missed.len().min(5)]
    );
    server.stop().await;
}
