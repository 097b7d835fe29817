//! ANN quality on clustered data, before and after a restart on the same data dir.

use std::collections::HashSet;

use crate::common::*;
use likeness::grpc::pb;

const N: usize = 20_000;
const DIM: usize = 64;
const QUERIES: usize = 200;
const K: u32 = 10;

async fn recall(server: &TestServer, queries: &[Vec<f32>]) -> f64 {
    let mut items = server.items().await;
    let mut found = 0usize;
    for q in queries {
        let req = |exact| pb::SearchRequest {
            collection: "clusters".into(),
            query: vector_query(q.clone()),
            k: K,
            exact,
            ..Default::default()
        };
        let approx = items.search(req(false)).await.unwrap().into_inner().hits;
        let exact = items.search(req(true)).await.unwrap().into_inner().hits;
        assert_eq!(exact.len(), K as usize);
        assert!(exact.windows(2).all(|w| w[0].distance <= w[1].distance));
        let truth: HashSet<&str> = exact.iter().map(|h| h.id.as_str()).collect();
        found += approx
            .iter()
            .filter(|h| truth.contains(h.id.as_str()))
            .count();
    }
    found as f64 / (queries.len() * K as usize) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recall_at_10_on_20k_clustered_vectors_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::light_in(dir.path(), |_| {}).await;
    let mut c = server.collections().await;
    create(&mut c, "clusters", DIM as u32, pb::Metric::L2).await;
    let (vectors, clusters) = clustered(N + QUERIES, DIM, 200, 0.35, 42);
    let (data, queries) = vectors.split_at(N);
    let mut items = server.items().await;
    upsert_clustered(&mut items, "clusters", data, &clusters).await;
    let before = recall(&server, queries).await;
    println!("recall@10 = {before:.4}");
    assert!(before >= 0.95, "recall@10 {before} < 0.95");
    server.stop().await;

    // Restart on the same dir: the snapshot is loaded, nothing is lost, quality holds.
    let server = TestServer::light_in(dir.path(), |_| {}).await;
    let mut c = server.collections().await;
    let info = c
        .get_collection(pb::GetCollectionRequest {
            name: "clusters".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.count, N as u64);
    assert_eq!(info.dimension, DIM as u32);
    assert_eq!(info.metric, pb::Metric::L2 as i32);
    let after = recall(&server, queries).await;
    println!("recall@10 after restart = {after:.4}");
    assert!(after >= 0.95, "recall@10 after restart {after} < 0.95");
    server.stop().await;

    // Without a snapshot the index is rebuilt from the store; meanwhile health says
    // NOT_SERVING and the likeness services answer UNAVAILABLE.
    std::fs::remove_file(dir.path().join("index/clusters.snapshot.json")).unwrap();
    let server = TestServer::light_recovering(dir.path(), |c| c.index_threads = 1).await;
    use tonic_health::pb::health_check_response::ServingStatus;
    let status = health(&server.url(), "likeness.v1.Items").await;
    assert_eq!(status, ServingStatus::NotServing as i32);
    let err = server
        .collections()
        .await
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    wait_serving(&server.url()).await;
    assert_eq!(
        health(&server.url(), "likeness.v1.Collections").await,
        ServingStatus::Serving as i32
    );
    let rebuilt = recall(&server, &queries[..50]).await;
    assert!(rebuilt >= 0.95, "recall@10 after rebuild {rebuilt} < 0.95");
    server.stop().await;
}
