//! Identification and verification over gRPC with a model-backed collection: images in,
//! the shipped embedder on the real ONNX Runtime, and the model card's figures out.

use crate::common::*;
use likeness::grpc::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrol_identify_verify_calibrate_with_images() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let expected = expected();
    let mut colls = server.collections().await;
    let info = colls
        .create_collection(pb::CreateCollectionRequest {
            name: "wardrobe".into(),
            model: "fmnist-triplet".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.dimension, 64, "dimension defaults to the model's");
    assert_eq!(info.metric, pb::Metric::Cosine as i32);
    assert!(info.keep_inputs, "keep_inputs defaults to on with a model");
    let threshold = expected["threshold"].as_f64().unwrap() as f32;
    assert!(
        (info.threshold - threshold).abs() < 1e-6,
        "threshold from the manifest"
    );
    let (m, scale) = (
        expected["dbl_margin"].as_f64().unwrap(),
        expected["dbl_scale"].as_f64().unwrap(),
    );
    assert!(
        (f64::from(info.dbl_margin) - m).abs() < 1e-6
            && (f64::from(info.dbl_scale) - scale).abs() < 1e-6,
        "the logistic from the manifest: {info:?}"
    );

    // Enrol 400 images by input, over UpsertStream (4 messages of 100).
    let enrol = fixture_pngs("enrol_images.npy");
    let (_, labels) = fixture("enrol_labels.npy");
    let msgs: Vec<pb::UpsertRequest> = enrol
        .chunks(100)
        .enumerate()
        .map(|(m, chunk)| pb::UpsertRequest {
            collection: "wardrobe".into(),
            items: chunk
                .iter()
                .enumerate()
                .map(|(i, png)| {
                    let n = m * 100 + i;
                    pb::Item {
                        id: format!("e{n}"),
                        label: format!("{}", labels[n]),
                        input: Some(image_input(png)),
                        ..Default::default()
                    }
                })
                .collect(),
        })
        .collect();
    let mut items = server.items().await;
    let r = items
        .upsert_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.upserted, 400);
    // The raw input is kept and comes back byte for byte.
    let got = items
        .get(pb::GetRequest {
            collection: "wardrobe".into(),
            ids: vec!["e7".into()],
            with_vectors: true,
            with_inputs: true,
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(got[0].vector.len(), 64);
    let Some(pb::input::Kind::Image(bytes)) = got[0].input.as_ref().and_then(|i| i.kind.clone())
    else {
        panic!("input not kept")
    };
    assert_eq!(bytes, enrol[7]);

    // Identification: Classify with k = 1 is the nearest enrolled label (recall@1).
    let (_, query_labels) = fixture("query_labels.npy");
    for (kind, file) in [
        ("clean", "query_clean_images.npy"),
        ("reid", "query_reid_images.npy"),
    ] {
        let queries = fixture_pngs(file);
        let mut right = 0;
        let mut right_vote = 0;
        for (q, png) in queries.iter().enumerate() {
            let c = items
                .classify(pb::ClassifyRequest {
                    collection: "wardrobe".into(),
                    query: input_query(png),
                    k: 1,
                })
                .await
                .unwrap()
                .into_inner();
            right += usize::from(c.label == format!("{}", query_labels[q]));
            assert!((c.confidence - 1.0).abs() < 1e-6, "one neighbour, one vote");
            if q % 4 == 0 {
                let v = items
                    .classify(pb::ClassifyRequest {
                        collection: "wardrobe".into(),
                        query: input_query(png),
                        k: 9,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                assert!(v.votes.iter().map(|v| v.count).sum::<u32>() == 9);
                assert!(v.votes.windows(2).all(|w| w[0].weight >= w[1].weight));
                right_vote += usize::from(v.label == format!("{}", query_labels[q]));
            }
        }
        let recall = right as f64 / queries.len() as f64;
        let want = expected[format!("model_{kind}")]["recall_at_1"]
            .as_f64()
            .unwrap();
        println!(
            "{kind}: Classify k=1 recall@1 {recall:.4} (card {want:.4}); k=9 vote {:.4} on every 4th",
            right_vote as f64 / 100.0
        );
        assert!(
            (recall - want).abs() <= 0.0051,
            "{kind}: {recall} vs {want}"
        );
    }

    // Verification of the card's clean pairs: query image (input) vs enrolled item (id).
    let queries = fixture_pngs("query_clean_images.npy");
    let (_, pairs) = fixture("pairs.npy");
    let mut correct = 0;
    for p in pairs.chunks(3).take(600) {
        let (q, e, same) = (p[0] as usize, p[1] as usize, p[2] == 1.0);
        let v = items
            .verify(pb::VerifyRequest {
                collection: "wardrobe".into(),
                a: input_query(&queries[q]),
                b: id_query(&format!("e{e}")),
            })
            .await
            .unwrap()
            .into_inner();
        assert!((v.similarity - (1.0 - v.distance)).abs() < 1e-6);
        let p = (1.0 + (-m).exp()) / (1.0 + (scale * f64::from(v.distance) - m).exp());
        assert!((f64::from(v.probability) - p).abs() < 1e-5, "{v:?} vs {p}");
        assert_eq!(v.same, v.distance < threshold);
        correct += usize::from(v.same == same);
    }
    let acc = correct as f64 / 600.0;
    println!("verification accuracy on 600 clean pairs: {acc:.4}");
    let card = expected["model_clean"]["accuracy_at_manifest_threshold"]
        .as_f64()
        .unwrap();
    assert!(
        (acc - card).abs() < 0.05,
        "verification {acc} far from the card's {card}"
    );
    // The same image against itself: distance 0, probability 1, same.
    let v = items
        .verify(pb::VerifyRequest {
            collection: "wardrobe".into(),
            a: input_query(&enrol[3]),
            b: id_query("e3"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(v.distance.abs() < 1e-5 && v.same && (v.probability - 1.0).abs() < 1e-4);

    // Calibrate on pairs sampled from the enrolled items; stored and reported.
    let cal = items
        .calibrate(pb::CalibrateRequest {
            collection: "wardrobe".into(),
            pairs: 2000,
            seed: 7,
        })
        .await
        .unwrap()
        .into_inner();
    println!("calibrated: {cal:?}");
    assert_eq!(cal.pairs, 2000);
    assert!(cal.roc_auc > 0.7, "{cal:?}");
    assert!(
        cal.accuracy > 0.6 && cal.threshold > 0.0 && cal.threshold < 2.0,
        "{cal:?}"
    );
    // The logistic has an interior optimum (not the edge of the search box), and it
    // crosses 1/2 near the best-accuracy threshold: both read the same pairs.
    assert!(
        cal.dbl_margin > -9.9
            && cal.dbl_margin < 9.9
            && cal.dbl_scale > 0.11
            && cal.dbl_scale < 999.0,
        "{cal:?}"
    );
    let p_at = |d: f32| {
        let (m, s) = (f64::from(cal.dbl_margin), f64::from(cal.dbl_scale));
        (1.0 + (-m).exp()) / (1.0 + (s * f64::from(d) - m).exp())
    };
    assert!(
        (0.3..0.7).contains(&p_at(cal.threshold)),
        "p(threshold) = {}",
        p_at(cal.threshold)
    );
    let v = items
        .verify(pb::VerifyRequest {
            collection: "wardrobe".into(),
            a: input_query(&queries[0]),
            b: id_query("e0"),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        (f64::from(v.probability) - p_at(v.distance)).abs() < 1e-4,
        "{v:?}"
    );
    assert_eq!(v.same, v.distance < cal.threshold);
    let info = colls
        .get_collection(pb::GetCollectionRequest {
            name: "wardrobe".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.threshold, info.dbl_margin, info.dbl_scale),
        (cal.threshold, cal.dbl_margin, cal.dbl_scale)
    );
    server.stop().await;

    // Calibration survives a restart.
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let info = collection_info(&server, "wardrobe").await;
    assert_eq!(
        (info.threshold, info.dbl_margin, info.dbl_scale),
        (cal.threshold, cal.dbl_margin, cal.dbl_scale)
    );
    assert_eq!(info.count, 400);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_collection_bad_inputs() {
    let (server, _dir) = TestServer::start().await;
    let mut colls = server.collections().await;
    let err = colls
        .create_collection(pb::CreateCollectionRequest {
            name: "x".into(),
            model: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("\"nope\""), "{}", err.message());
    let err = colls
        .create_collection(pb::CreateCollectionRequest {
            name: "x".into(),
            model: "fmnist-triplet".into(),
            dimension: 32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("dimension"), "{}", err.message());
    colls
        .create_collection(pb::CreateCollectionRequest {
            name: "img".into(),
            model: "fmnist-triplet".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    create(&mut colls, "plain", 64, pb::Metric::Cosine).await;
    let png = fixture_pngs("enrol_images.npy").remove(0);
    let mut items = server.items().await;
    let with_input = |id: &str, bytes: &[u8]| pb::Item {
        id: id.into(),
        input: Some(image_input(bytes)),
        ..Default::default()
    };
    let err = items
        .upsert(pb::UpsertRequest {
            collection: "plain".into(),
            items: vec![with_input("a", &png)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("items[0].input"),
        "{}",
        err.message()
    );
    let err = items
        .upsert(pb::UpsertRequest {
            collection: "img".into(),
            items: vec![
                with_input("a", &png),
                with_input("b", &png),
                with_input("c", b"garbage"),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("items[2].input.image"),
        "{}",
        err.message()
    );
    let err = items
        .search(pb::SearchRequest {
            collection: "img".into(),
            query: input_query(b"garbage"),
            k: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("query.input.image"),
        "{}",
        err.message()
    );
    let err = items
        .classify(pb::ClassifyRequest {
            collection: "img".into(),
            query: input_query(&png),
            k: 3,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::InvalidArgument,
        "empty collection: {}",
        err.message()
    );
    let err = items
        .verify(pb::VerifyRequest {
            collection: "img".into(),
            a: input_query(&png),
            b: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains('b'), "{}", err.message());
    let err = items
        .calibrate(pb::CalibrateRequest {
            collection: "img".into(),
            pairs: 10,
            seed: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    // Nothing was written, and the daemon still serves.
    let info = colls
        .get_collection(pb::GetCollectionRequest { name: "img".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.count, 0);
    server.stop().await;
}
