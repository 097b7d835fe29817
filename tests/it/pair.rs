//! Pair models: the shipped fmnist-pair (a network that scores two images) decides
//! Verify and re-ranks search hits, on the real ONNX Runtime, and reproduces its model
//! card (training/PAIR_MODEL_CARD.md, tests/fixtures/fmnist/pair_expected.json).

use crate::common::*;
use likeness::grpc::pb;
use tonic::Code;

fn pair_expected() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/fmnist/pair_expected.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn search(query: Option<pb::Query>, k: u32, rerank: u32) -> pb::SearchRequest {
    pb::SearchRequest {
        collection: "wardrobe".into(),
        query,
        k,
        exact: true,
        rerank,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_model_verifies_and_reranks() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let card = pair_expected();
    let threshold = card["threshold"].as_f64().unwrap() as f32;
    let ch = channel(&server.url()).await;

    // Listed beside the embedder, as a pair model; it does not embed.
    let info = pb::models_client::ModelsClient::new(ch.clone())
        .get_model(pb::GetModelRequest {
            name: "fmnist-pair".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((info.kind.as_str(), info.dimension), ("pair", 0));
    let pair = info.pair.unwrap();
    assert_eq!(pair.input_names, ["a", "b"]);
    assert!((pair.threshold - threshold).abs() < 1e-6);
    let err = pb::embedder_client::EmbedderClient::new(ch)
        .embed(pb::EmbedRequest {
            model: "fmnist-pair".into(),
            inputs: vec![image_input(&fixture_pngs("enrol_images.npy")[0])],
        })
        .await
        .unwrap_err();
    assert_status(
        "embed with a pair model",
        &err,
        Code::InvalidArgument,
        &["model", "pair model"],
    );

    // A collection names it; it must keep inputs, and it must be a pair model.
    let mut colls = server.collections().await;
    let bad = [
        ("nope", None, Code::NotFound, "pair_model"),
        ("fmnist-triplet", None, Code::InvalidArgument, "pair_model"),
        (
            "fmnist-pair",
            Some(false),
            Code::InvalidArgument,
            "keep_inputs",
        ),
    ];
    for (name, keep, code, field) in bad {
        let err = colls
            .create_collection(pb::CreateCollectionRequest {
                name: "bad".into(),
                model: "fmnist-triplet".into(),
                pair_model: name.into(),
                keep_inputs: keep,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_status(name, &err, code, &[field]);
    }
    let info = colls
        .create_collection(pb::CreateCollectionRequest {
            name: "wardrobe".into(),
            model: "fmnist-triplet".into(),
            pair_model: "fmnist-pair".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(info.keep_inputs);
    assert_eq!(info.pair_model, "fmnist-pair");

    // Enrol the card's 400 images by input.
    let enrol = fixture_pngs("enrol_images.npy");
    let (_, labels) = fixture("enrol_labels.npy");
    let mut items = server.items().await;
    for (m, chunk) in enrol.chunks(100).enumerate() {
        items
            .upsert(pb::UpsertRequest {
                collection: "wardrobe".into(),
                items: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, png)| pb::Item {
                        id: format!("e{}", m * 100 + i),
                        label: format!("{}", labels[m * 100 + i]),
                        input: Some(image_input(png)),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }

    // Verify: the pair model decides; its score equals ONNX Runtime's in Python.
    let queries = fixture_pngs("query_clean_images.npy");
    let (_, pairs) = fixture("pairs.npy");
    let (_, reference) = fixture("pair_reference_scores.npy");
    let verify = |q: usize, e: usize| pb::VerifyRequest {
        collection: "wardrobe".into(),
        a: input_query(&queries[q]),
        b: id_query(&format!("e{e}")),
    };
    let verdicts = verify_all(&items, &pairs, &verify).await;
    let mut correct = 0usize;
    for (n, (v, p)) in verdicts.iter().zip(pairs.chunks(3)).enumerate() {
        let score = v.pair_score.expect("a pair score");
        assert_eq!(v.same, score >= threshold, "pair {n}");
        if n < reference.len() {
            assert!(
                (f64::from(score) - reference[n]).abs() <= 1e-5,
                "pair {n}: {score} vs ONNX Runtime's {}",
                reference[n]
            );
        }
        correct += usize::from(v.same == (p[2] == 1.0));
    }
    let total = verdicts.len() as f64;
    let acc = correct as f64 / total;
    let want = card["clean"]["accuracy_at_threshold"].as_f64().unwrap();
    println!("pair verification accuracy, clean: {acc:.4} (card {want:.4})");
    assert!((acc - want).abs() <= 2.0 / total + 1e-9, "{acc} vs {want}");

    // The same pairs with re-identification queries (rotated, scaled, shifted,
    // re-lit, occluded).
    let reid = fixture_pngs("query_reid_images.npy");
    let verdicts = verify_all(&items, &pairs, &|q: usize, e: usize| pb::VerifyRequest {
        collection: "wardrobe".into(),
        a: input_query(&reid[q]),
        b: id_query(&format!("e{e}")),
    })
    .await;
    let correct = verdicts
        .iter()
        .zip(pairs.chunks(3))
        .filter(|(v, p)| v.same == (p[2] == 1.0))
        .count();
    let acc = correct as f64 / total;
    let want = card["reid"]["accuracy_at_threshold"].as_f64().unwrap();
    println!("pair verification accuracy, re-id: {acc:.4} (card {want:.4})");
    assert!((acc - want).abs() <= 2.0 / total + 1e-9, "{acc} vs {want}");

    // Calibrate also fits the pair model's threshold on pairs of the collection's own
    // (unseen) classes, where the manifest's, chosen on classes 0-5, transfers poorly;
    // Verify then decides with it.
    let cal = items
        .calibrate(pb::CalibrateRequest {
            collection: "wardrobe".into(),
            pairs: 2000,
            seed: 11,
        })
        .await
        .unwrap()
        .into_inner();
    println!("calibrated: {cal:?}");
    let fitted = cal.pair_threshold.expect("a pair threshold");
    assert!(
        fitted > 0.0 && fitted < 1.0 && (fitted - threshold).abs() > 1e-3,
        "{cal:?}"
    );
    assert!(
        cal.pair_roc_auc > 0.75 && cal.pair_accuracy > 0.7,
        "{cal:?}"
    );
    assert_eq!(
        collection_info(&server, "wardrobe").await.pair_threshold,
        Some(fitted)
    );
    let verdicts = verify_all(&items, &pairs, &verify).await;
    let mut correct = 0usize;
    for (v, p) in verdicts.iter().zip(pairs.chunks(3)) {
        assert_eq!(v.same, v.pair_score.unwrap() >= fitted);
        correct += usize::from(v.same == (p[2] == 1.0));
    }
    let acc = correct as f64 / total;
    let best = card["clean"]["best_accuracy"].as_f64().unwrap();
    println!(
        "pair verification accuracy, clean, calibrated threshold: {acc:.4} (best possible on these pairs {best:.4})"
    );
    assert!(acc > best - 0.03, "{acc} vs the best {best}");

    // Re-ranking: the 10 nearest by distance, re-ordered by the pair model; recall@1
    // over the card's 400 clean queries matches the card.
    let (_, query_labels) = fixture("query_labels.npy");
    let mut right = 0usize;
    for (q, png) in queries.iter().enumerate() {
        let hits = items
            .search(search(input_query(png), 1, 10))
            .await
            .unwrap()
            .into_inner()
            .hits;
        assert!(hits[0].pair_score.is_some());
        right += usize::from(hits[0].label == format!("{}", query_labels[q]));
    }
    let recall = right as f64 / queries.len() as f64;
    let want = card["clean"]["rerank_recall_at_1"]["10"].as_f64().unwrap();
    println!("re-ranked recall@1, clean, R=10: {recall:.4} (card {want:.4})");
    assert!(
        (recall - want).abs() <= 2.0 / 400.0 + 1e-9,
        "{recall} vs {want}"
    );

    // Hits come by descending score; by id, the item's stored input is the query and
    // the item itself is left out.
    let hits = items
        .search(search(id_query("e5"), 5, 10))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 5);
    assert!(hits.iter().all(|h| h.id != "e5"));
    let scores: Vec<f32> = hits.iter().map(|h| h.pair_score.unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // SearchBatch re-ranks each query the same way.
    let batch = items
        .search_batch(pb::SearchBatchRequest {
            collection: "wardrobe".into(),
            queries: vec![id_query("e5").unwrap(), input_query(&queries[0]).unwrap()],
            k: 5,
            exact: true,
            rerank: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let ids = |h: &[pb::Hit]| h.iter().map(|h| h.id.clone()).collect::<Vec<_>>();
    assert_eq!(ids(&batch[0].hits), ids(&hits));

    // An item with no stored input cannot be scored: it comes after the scored hits.
    let v = items
        .get(pb::GetRequest {
            collection: "wardrobe".into(),
            ids: vec!["e7".into()],
            with_vectors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items
        .remove(0)
        .vector;
    items
        .upsert(pb::UpsertRequest {
            collection: "wardrobe".into(),
            items: vec![item("bare", "7", v)],
        })
        .await
        .unwrap();
    let hits = items
        .search(search(input_query(&enrol[7]), 4, 4))
        .await
        .unwrap()
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 4);
    assert_eq!(hits[3].id, "bare", "{hits:?}");
    assert!(hits[3].pair_score.is_none() && hits[..3].iter().all(|h| h.pair_score.is_some()));

    // Bad requests name their field; the daemon keeps serving.
    let err = items
        .search(search(vector_query(vec![0.1; 64]), 3, 10))
        .await
        .unwrap_err();
    assert_status(
        "rerank a vector",
        &err,
        Code::InvalidArgument,
        &["query.vector"],
    );
    let err = items
        .search(search(id_query("bare"), 3, 10))
        .await
        .unwrap_err();
    assert_status(
        "rerank from a bare item",
        &err,
        Code::InvalidArgument,
        &["query.id", "stored input"],
    );
    let err = items
        .search(search(id_query("e1"), 3, 5000))
        .await
        .unwrap_err();
    assert_status("rerank too deep", &err, Code::InvalidArgument, &["rerank"]);
    let err = items
        .search(search(id_query("e1"), 0, 10))
        .await
        .unwrap_err();
    assert_status("rerank with k = 0", &err, Code::InvalidArgument, &["k"]);
    let err = items
        .verify(pb::VerifyRequest {
            collection: "wardrobe".into(),
            a: id_query("e1"),
            b: Some(pb::Query {
                kind: Some(pb::query::Kind::Input(pb::Input {
                    kind: Some(pb::input::Kind::Image(b"not an image".to_vec())),
                    tower: String::new(),
                })),
            }),
        })
        .await
        .unwrap_err();
    assert_status(
        "verify a bad image",
        &err,
        Code::InvalidArgument,
        &["b.input"],
    );
    let mut plain = server.collections().await;
    plain
        .create_collection(pb::CreateCollectionRequest {
            name: "plain".into(),
            model: "fmnist-triplet".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let err = items
        .search(pb::SearchRequest {
            collection: "plain".into(),
            ..search(input_query(&enrol[0]), 3, 10)
        })
        .await
        .unwrap_err();
    assert_status(
        "rerank without a pair model",
        &err,
        Code::InvalidArgument,
        &["rerank", "no pair model"],
    );
    server.stop().await;

    // The collection's pair model survives a restart.
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let info = collection_info(&server, "wardrobe").await;
    assert_eq!(info.pair_model, "fmnist-pair");
    assert_eq!(info.pair_threshold, Some(fitted));
    let v = server
        .items()
        .await
        .verify(verify(0, 0))
        .await
        .unwrap()
        .into_inner();
    assert!(v.pair_score.is_some());
    server.stop().await;
}

/// Every pair of `pairs` (query, enrolled, same) through Verify, 16 at a time; in order.
async fn verify_all(
    items: &pb::items_client::ItemsClient<tonic::transport::Channel>,
    pairs: &[f64],
    req: impl Fn(usize, usize) -> pb::VerifyRequest,
) -> Vec<pb::VerifyResponse> {
    let mut tasks = tokio::task::JoinSet::new();
    let mut out: Vec<Option<pb::VerifyResponse>> = vec![None; pairs.len() / 3];
    for (n, p) in pairs.chunks(3).enumerate() {
        if tasks.len() >= 16 {
            let (i, v) = tasks.join_next().await.unwrap().unwrap();
            out[i] = Some(v);
        }
        let mut items = items.clone();
        let r = req(p[0] as usize, p[1] as usize);
        tasks.spawn(async move { (n, items.verify(r).await.unwrap().into_inner()) });
    }
    while let Some(r) = tasks.join_next().await {
        let (i, v) = r.unwrap();
        out[i] = Some(v);
    }
    out.into_iter().map(Option::unwrap).collect()
}
