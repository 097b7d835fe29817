//! Every RPC of likeness.v1 against a real server on 127.0.0.1:0.

use crate::common::*;
use likeness::grpc::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collections_lifecycle() {
    let (server, _dir) = TestServer::light().await;
    let mut c = server.collections().await;
    let info = c
        .create_collection(pb::CreateCollectionRequest {
            name: "faces.v1".into(),
            dimension: 8,
            metric: pb::Metric::Unspecified as i32,
            index: Some(pb::IndexParams {
                connectivity: 8,
                expansion_add: 0,
                expansion_search: 0,
            }),
            precision: pb::Precision::Unspecified as i32,
            model: String::new(),
            keep_inputs: None,
            pair_model: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.metric,
        pb::Metric::Cosine as i32,
        "unspecified means COSINE"
    );
    assert_eq!(
        info.precision,
        pb::Precision::F32 as i32,
        "unspecified means F32"
    );
    let idx = info.index.unwrap();
    assert_eq!(idx.connectivity, 8);
    assert_eq!((idx.expansion_add, idx.expansion_search), (100, 64));
    create(&mut c, "other", 3, pb::Metric::L2).await;

    let got = c
        .get_collection(pb::GetCollectionRequest {
            name: "faces.v1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, info);
    let list = c
        .list_collections(pb::ListCollectionsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = list.collections.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["faces.v1", "other"]);

    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "other".into(),
            items: vec![item("a", "", vec![1.0, 2.0, 3.0])],
        })
        .await
        .unwrap();
    let del = c
        .delete_collection(pb::DeleteCollectionRequest {
            name: "other".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(del.deleted, 1);
    let err = c
        .get_collection(pb::GetCollectionRequest {
            name: "other".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The name is free again, and the new collection starts empty.
    let again = create(&mut c, "other", 3, pb::Metric::L2).await;
    assert_eq!(again.count, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_get_replace_delete() {
    let (server, _dir) = TestServer::light().await;
    let mut c = server.collections().await;
    create(&mut c, "c", 2, pb::Metric::L2).await;
    let mut items = server.items().await;
    let mut a = item("a", "cat", vec![0.0, 0.0]);
    a.metadata.insert("colour".into(), "red".into());
    let r = items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: vec![a.clone(), item("b", "dog", vec![10.0, 0.0])],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.upserted, 2);

    // Get: request order, unknown ids left out, vectors only on request.
    let got = get(
        &mut items,
        "c",
        vec!["b".into(), "zzz".into(), "a".into()],
        true,
    )
    .await;
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].id, "b");
    assert_eq!(got[1], a);
    let bare = get(&mut items, "c", vec!["a".into()], false).await;
    assert!(bare[0].vector.is_empty());
    assert_eq!(bare[0].metadata["colour"], "red");

    // Replace a: new vector, label and metadata; search never sees the old copy.
    items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: vec![item("a", "bird", vec![20.0, 0.0])],
        })
        .await
        .unwrap();
    let hits = search(&mut items, "c", vec![0.0, 0.0], 10).await;
    assert_eq!(ids(&hits), ["b", "a"]);
    assert_eq!(hits[1].label, "bird");
    assert!(
        (hits[1].distance - 20.0).abs() < 1e-4,
        "L2 is Euclidean, not squared"
    );
    assert!((hits[0].distance - 10.0).abs() < 1e-4);
    assert!(hits[1].metadata.is_empty(), "metadata replaced too");
    let info = c
        .get_collection(pb::GetCollectionRequest { name: "c".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.count, 2);

    let d = items
        .delete(pb::DeleteRequest {
            collection: "c".into(),
            ids: vec!["a".into(), "a".into(), "nope".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.deleted, 1);
    let hits = search(&mut items, "c", vec![0.0, 0.0], 10).await;
    assert_eq!(ids(&hits), ["b"]);
    server.stop().await;
}

async fn search(
    items: &mut pb::items_client::ItemsClient<tonic::transport::Channel>,
    coll: &str,
    v: Vec<f32>,
    k: u32,
) -> Vec<pb::Hit> {
    items
        .search(pb::SearchRequest {
            collection: coll.into(),
            query: vector_query(v),
            k,
            with_metadata: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits
}

fn ids(hits: &[pb::Hit]) -> Vec<&str> {
    hits.iter().map(|h| h.id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_metrics_and_batch() {
    let (server, _dir) = TestServer::light().await;
    let mut c = server.collections().await;
    create(&mut c, "cos", 16, pb::Metric::Cosine).await;
    create(&mut c, "ip", 2, pb::Metric::InnerProduct).await;
    let mut items = server.items().await;
    let (vectors, clusters) = clustered(3000, 16, 20, 0.3, 7);
    let batch: Vec<pb::Item> = vectors
        .iter()
        .zip(&clusters)
        .enumerate()
        .map(|(i, (v, c))| {
            let mut it = item(&format!("v{i}"), &format!("L{c}"), v.clone());
            it.metadata.insert("parity".into(), (i % 2).to_string());
            it
        })
        .collect();
    items
        .upsert(pb::UpsertRequest {
            collection: "cos".into(),
            items: batch,
        })
        .await
        .unwrap();

    // Cosine distance matches 1 - cos computed here.
    let q = vectors[5].clone();
    let hits = search(&mut items, "cos", q.clone(), 5).await;
    assert_eq!(hits[0].id, "v5");
    assert!(hits[0].distance.abs() < 1e-4);
    for h in &hits {
        let i: usize = h.id[1..].parse().unwrap();
        let want = likeness::types::Metric::Cosine.distance(&q, &vectors[i]);
        assert!((h.distance - want).abs() < 1e-3, "{} vs {want}", h.distance);
    }
    assert!(hits.windows(2).all(|w| w[0].distance <= w[1].distance));

    // A selective filter inside the ANN search still yields k hits when k items match:
    // label L3 (about 150 items) and parity 1 (half of them), from a query far away.
    let far = vectors[clusters.iter().position(|c| *c != 3).unwrap()].clone();
    let r = items
        .search(pb::SearchRequest {
            collection: "cos".into(),
            query: vector_query(far),
            k: 40,
            filter: Some(pb::Filter {
                labels: vec!["L3".into()],
                exclude_labels: vec![],
                metadata: [("parity".to_string(), "1".to_string())].into(),
            }),
            with_metadata: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 40);
    assert!(
        r.hits
            .iter()
            .all(|h| h.label == "L3" && h.metadata["parity"] == "1")
    );

    // exclude_labels, and a query by id leaves the item itself out.
    let r = items
        .search(pb::SearchRequest {
            collection: "cos".into(),
            query: id_query("v5"),
            k: 10,
            filter: Some(pb::Filter {
                exclude_labels: vec![format!("L{}", clusters[5])],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.hits.len(), 10);
    assert!(
        r.hits
            .iter()
            .all(|h| h.id != "v5" && h.label != format!("L{}", clusters[5]))
    );

    // Exact search agrees with the ANN search on the top hit and returns vectors.
    let r = items
        .search(pb::SearchRequest {
            collection: "cos".into(),
            query: id_query("v9"),
            k: 3,
            exact: true,
            with_vectors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let approx = items
        .search(pb::SearchRequest {
            collection: "cos".into(),
            query: id_query("v9"),
            k: 3,
            expansion: 200,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The top hit is the same; below it, HNSW may miss a node that has no incoming edge
    // (README, "How it keeps data"), but it can never rank one nearer than exact search.
    assert_eq!(r.hits[0].id, approx.hits[0].id);
    assert_eq!(approx.hits.len(), r.hits.len());
    for (e, a) in r.hits.iter().zip(&approx.hits) {
        assert!(
            a.distance >= e.distance - 1e-6,
            "{a:?} nearer than exact {e:?}"
        );
    }
    assert_eq!(r.hits[0].vector.len(), 16);

    // SearchBatch: one result per query, in order.
    let r = items
        .search_batch(pb::SearchBatchRequest {
            collection: "cos".into(),
            queries: vec![
                vector_query(vectors[1].clone()).unwrap(),
                id_query("v2").unwrap(),
                vector_query(vectors[3].clone()).unwrap(),
            ],
            k: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results.len(), 3);
    assert_eq!(r.results[0].hits[0].id, "v1");
    assert_ne!(r.results[1].hits[0].id, "v2");
    assert_eq!(r.results[2].hits[0].id, "v3");

    // Inner product: distance = 1 - a.b.
    items
        .upsert(pb::UpsertRequest {
            collection: "ip".into(),
            items: vec![item("x", "", vec![0.5, 0.5]), item("y", "", vec![2.0, 0.0])],
        })
        .await
        .unwrap();
    let hits = search(&mut items, "ip", vec![1.0, 0.0], 2).await;
    assert_eq!(ids(&hits), ["y", "x"]);
    assert!((hits[0].distance - (1.0 - 2.0)).abs() < 1e-5);
    assert!((hits[1].distance - 0.5).abs() < 1e-5);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upsert_stream_commits_once_and_rolls_back_on_error() {
    let (server, _dir) = TestServer::light().await;
    let mut c = server.collections().await;
    create(&mut c, "s", 2, pb::Metric::L2).await;
    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "s".into(),
            items: vec![item("keep", "old", vec![1.0, 1.0])],
        })
        .await
        .unwrap();

    let msgs: Vec<pb::UpsertRequest> = (0..5)
        .map(|m| pb::UpsertRequest {
            collection: "s".into(),
            items: (0..100)
                .map(|i| item(&format!("m{m}-{i}"), "x", vec![m as f32, i as f32]))
                .collect(),
        })
        .collect();
    let r = items
        .upsert_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.upserted, 500);
    assert_eq!(count(&mut c, "s").await, 501);

    // Message 0 replaces `keep` and adds new ids; message 1 is fine; message 2 has a NaN.
    let bad = vec![
        pb::UpsertRequest {
            collection: "s".into(),
            items: vec![
                item("keep", "new", vec![9.0, 9.0]),
                item("fresh", "", vec![0.0, 1.0]),
            ],
        },
        pb::UpsertRequest {
            collection: "s".into(),
            items: vec![
                item("fresh2", "", vec![0.0, 2.0]),
                item("m0-0", "changed", vec![5.0, 5.0]),
            ],
        },
        pb::UpsertRequest {
            collection: "s".into(),
            items: vec![
                item("ok", "", vec![0.0, 3.0]),
                item("nan", "", vec![f32::NAN, 0.0]),
            ],
        },
    ];
    let err = items
        .upsert_stream(tokio_stream::iter(bad))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("messages[2].items[1].vector[0]"),
        "{}",
        err.message()
    );
    assert!(
        err.message().contains("\"nan\""),
        "names the item: {}",
        err.message()
    );
    // Nothing of the failed stream remains: count, new ids, replaced items.
    assert_eq!(count(&mut c, "s").await, 501);
    let got = get(
        &mut items,
        "s",
        vec![
            "keep".into(),
            "fresh".into(),
            "fresh2".into(),
            "ok".into(),
            "m0-0".into(),
        ],
        true,
    )
    .await;
    assert_eq!(got.len(), 2);
    assert_eq!(
        (got[0].label.as_str(), got[0].vector.as_slice()),
        ("old", &[1.0, 1.0][..])
    );
    assert_eq!(
        (got[1].label.as_str(), got[1].vector.as_slice()),
        ("x", &[0.0, 0.0][..])
    );
    let hits = search(&mut items, "s", vec![9.0, 9.0], 1).await;
    assert_ne!(hits[0].id, "keep", "the index was rolled back too");
    server.stop().await;
}

/// Health per service (wait_serving has only seen Items), and reflection in both
/// protocols: grpcurl speaks v1; Python's grpc_reflection and older tools only v1alpha.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    let (server, _dir) = TestServer::light().await;
    let mut h = HealthClient::new(channel(&server.url()).await);
    let check = |service: &str| HealthCheckRequest {
        service: service.into(),
    };
    for service in [
        "likeness.v1.Collections",
        "likeness.v1.Embedder",
        "likeness.v1.Models",
    ] {
        let r = h.check(check(service)).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = h.check(check("likeness.v1.Nope")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut r = ServerReflectionClient::new(channel(&server.url()).await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = r
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    assert!(names.contains(&"likeness.v1.Items"), "{names:?}");
    assert!(names.contains(&"likeness.v1.Collections"), "{names:?}");

    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut r = ServerReflectionClient::new(channel(&server.url()).await);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "likeness.v1.Items".into(),
            )),
        };
        let mut stream = r
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .expect("v1alpha reflection is served")
            .into_inner();
        let resp = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = resp.message_response else {
            panic!("unexpected v1alpha reflection response: {resp:?}");
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    server.stop().await;
}
