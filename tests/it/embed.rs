//! The shipped embedder through the daemon, on the real ONNX Runtime (CPU) and the
//! committed Fashion-MNIST fixture (classes 6-9, unseen in training).

use crate::common::*;
use likeness::grpc::pb;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::models_client::ModelsClient;
use tonic::Code;
use tonic::transport::Channel;

const MODEL: &str = "fmnist-triplet";

async fn embed(c: &mut EmbedderClient<Channel>, inputs: Vec<pb::Input>) -> Vec<Vec<f32>> {
    embed_with(c, MODEL, inputs).await
}

async fn embed_with(
    c: &mut EmbedderClient<Channel>,
    model: &str,
    inputs: Vec<pb::Input>,
) -> Vec<Vec<f32>> {
    c.embed(pb::EmbedRequest {
        model: model.into(),
        inputs,
    })
    .await
    .unwrap()
    .into_inner()
    .embeddings
    .into_iter()
    .map(|v| v.values)
    .collect()
}

async fn clients(server: &TestServer) -> (EmbedderClient<Channel>, ModelsClient<Channel>) {
    let ch = channel(&server.url()).await;
    (
        EmbedderClient::new(ch.clone()).max_decoding_message_size(64 << 20),
        ModelsClient::new(ch),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_model_is_listed_with_its_input_spec() {
    let (server, _dir) = TestServer::start().await;
    let (_, mut models) = clients(&server).await;
    let list = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    // Both shipped models, by name: the pair model, then the embedder.
    let names: Vec<_> = list
        .iter()
        .map(|m| (m.name.as_str(), m.kind.as_str()))
        .collect();
    assert_eq!(names, [("fmnist-pair", "pair"), (MODEL, "embedder")]);
    let m = models
        .get_model(pb::GetModelRequest { name: MODEL.into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m, list[1]);
    assert!(m.pair.is_none());
    assert_eq!(m.dimension, 64);
    assert_eq!(m.execution_provider, "CPUExecutionProvider");
    let t = &m.towers[0];
    assert_eq!(
        (t.input_name.as_str(), t.output_name.as_str()),
        ("input", "embedding")
    );
    let Some(pb::tower_info::Input::Image(img)) = &t.input else {
        panic!("image tower expected")
    };
    assert_eq!((img.channels, img.height, img.width), (1, 28, 28));
    assert!(t.threshold > 0.0);
    let err = models
        .get_model(pb::GetModelRequest {
            name: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_match_onnx_runtime_and_batching_changes_nothing() {
    let (server, _dir) = TestServer::start().await;
    let (mut c, _) = clients(&server).await;
    let pngs = fixture_pngs("enrol_images.npy");
    let (shape, reference) = fixture("reference_embeddings.npy");
    assert_eq!(shape, [16, 64]);

    // One request of 16: equal to ONNX Runtime run directly (in Python) on the same
    // preprocessed tensors.
    let batch = embed(&mut c, pngs[..16].iter().map(|p| image_input(p)).collect()).await;
    for (i, v) in batch.iter().enumerate() {
        let want: Vec<f32> = reference[i * 64..(i + 1) * 64]
            .iter()
            .map(|x| *x as f32)
            .collect();
        assert!(
            max_diff(v, &want) <= 1e-5,
            "image {i}: {}",
            max_diff(v, &want)
        );
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // One by one, concurrently (so they are batched with each other differently).
    let singles = futures_join(&server, &pngs[..16]).await;
    for (i, (a, b)) in batch.iter().zip(&singles).enumerate() {
        assert!(
            max_diff(a, b) <= 1e-5,
            "image {i}: batch vs single {}",
            max_diff(a, b)
        );
    }
    // A tensor input with the same preprocessing gives the same embedding.
    let (_, pixels) = fixture("enrol_images.npy");
    let tensor: Vec<f32> = pixels[..784]
        .iter()
        .map(|p| ((*p / 255.0) as f32 - 0.2844) / 0.3542)
        .collect();
    let err = c
        .embed(pb::EmbedRequest {
            model: MODEL.into(),
            inputs: vec![pb::Input {
                kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                    shape: vec![1, 28, 28],
                    values: tensor.clone(),
                })),
                tower: String::new(),
            }],
        })
        .await;
    let v = err.unwrap().into_inner().embeddings.remove(0).values;
    assert!(
        max_diff(&v, &batch[0]) <= 1e-4,
        "tensor vs image {}",
        max_diff(&v, &batch[0])
    );

    // EmbedStream answers in request order, equal to the unary answers.
    let reqs: Vec<pb::EmbedRequest> = (0..4)
        .map(|r| pb::EmbedRequest {
            model: MODEL.into(),
            inputs: pngs[r * 4..r * 4 + 4]
                .iter()
                .map(|p| image_input(p))
                .collect(),
        })
        .collect();
    let mut stream = c
        .embed_stream(tokio_stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    for r in 0..4 {
        let resp = stream.message().await.unwrap().unwrap();
        for (j, e) in resp.embeddings.iter().enumerate() {
            assert!(max_diff(&e.values, &batch[r * 4 + j]) <= 1e-5);
        }
    }
    assert!(stream.message().await.unwrap().is_none());
    server.stop().await;
}

async fn futures_join(server: &TestServer, pngs: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let mut tasks = Vec::new();
    for p in pngs {
        let url = server.url();
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = EmbedderClient::new(channel(&url).await);
            embed(&mut c, vec![image_input(&p)]).await.remove(0)
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identification_and_verification_match_the_model_card() {
    let (server, _dir) = TestServer::start().await;
    check_card(&server, "fmnist", MODEL).await;
    server.stop().await;
}

/// The shipped `cjk` model (training/CJK_MODEL_CARD.md), loaded by --model as a user
/// loads it: its vectors are ONNX Runtime's, and its figures on 80 unseen characters
/// in held-out fonts are the card's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cjk_model_matches_its_card() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |c| {
        c.models.push((
            "cjk".into(),
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/cjk/model.toml"),
        ))
    })
    .await;
    let (mut c, _) = clients(&server).await;
    let pngs = fixture_pngs_in("cjk", "enrol_images.npy");
    let (shape, reference) = fixture_in("cjk", "reference_embeddings.npy");
    assert_eq!(shape, [16, 64]);
    let got = embed_with(
        &mut c,
        "cjk",
        pngs[..16].iter().map(|p| image_input(p)).collect(),
    )
    .await;
    for (i, v) in got.iter().enumerate() {
        let want: Vec<f32> = reference[i * 64..(i + 1) * 64]
            .iter()
            .map(|x| *x as f32)
            .collect();
        assert!(
            max_diff(v, &want) <= 1e-5,
            "glyph {i}: {}",
            max_diff(v, &want)
        );
    }
    check_card(&server, "cjk", "cjk").await;
    server.stop().await;
}

/// Identification (exact search through a gallery collection) and verification at the
/// manifest's threshold on tests/fixtures/`set`, against its expected.json.
async fn check_card(server: &TestServer, set: &str, model: &str) {
    let (mut c, _) = clients(server).await;
    let expected = expected_in(set);
    let (_, enrol_labels) = fixture_in(set, "enrol_labels.npy");
    let (_, query_labels) = fixture_in(set, "query_labels.npy");
    let mut enrol = Vec::new();
    for chunk in fixture_pngs_in(set, "enrol_images.npy").chunks(100) {
        let inputs = chunk.iter().map(|p| image_input(p)).collect();
        enrol.extend(embed_with(&mut c, model, inputs).await);
    }
    // Enrol: a collection of the 400 embeddings, labelled by class.
    let mut colls = server.collections().await;
    create(&mut colls, "gallery", 64, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "gallery".into(),
            items: enrol
                .iter()
                .enumerate()
                .map(|(i, v)| item(&format!("e{i}"), &format!("{}", enrol_labels[i]), v.clone()))
                .collect(),
        })
        .await
        .unwrap();
    let (_, pairs) = fixture_in(set, "pairs.npy");
    let threshold = expected["threshold"].as_f64().unwrap() as f32;
    for (kind, file) in [
        ("clean", "query_clean_images.npy"),
        ("reid", "query_reid_images.npy"),
    ] {
        let mut queries = Vec::new();
        for chunk in fixture_pngs_in(set, file).chunks(100) {
            let inputs = chunk.iter().map(|p| image_input(p)).collect();
            queries.extend(embed_with(&mut c, model, inputs).await);
        }
        // Identification: the nearest enrolled item's label, through the daemon's search.
        let mut right = 0;
        for (q, v) in queries.iter().enumerate() {
            let hits = items
                .search(pb::SearchRequest {
                    collection: "gallery".into(),
                    query: vector_query(v.clone()),
                    k: 1,
                    exact: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .hits;
            right += usize::from(hits[0].label == format!("{}", query_labels[q]));
        }
        let recall = right as f64 / queries.len() as f64;
        let want = expected[format!("model_{kind}")]["recall_at_1"]
            .as_f64()
            .unwrap();
        println!("{kind}: recall@1 {recall:.4} (model card {want:.4})");
        assert!(
            (recall - want).abs() <= 0.0051,
            "{set} {kind} recall@1 {recall} vs {want}"
        );
        // Verification at the manifest threshold over the card's pairs.
        let mut correct = 0;
        for p in pairs.chunks(3) {
            let (q, e, same) = (p[0] as usize, p[1] as usize, p[2] == 1.0);
            let d = likeness::types::Metric::Cosine.distance(&queries[q], &enrol[e]);
            correct += usize::from((d <= threshold) == same);
        }
        let acc = correct as f64 / (pairs.len() / 3) as f64;
        let want = if kind == "clean" {
            expected["model_clean"]["accuracy_at_manifest_threshold"].as_f64()
        } else {
            expected["model_reid"]["accuracy_at_clean_threshold"].as_f64()
        }
        .unwrap();
        println!("{kind}: verification accuracy {acc:.4} (model card {want:.4})");
        assert!(
            (acc - want).abs() <= 0.002,
            "{set} {kind} verification {acc} vs {want}"
        );
    }
}

/// A PNG whose header claims `w` x `h` pixels (no image data follows).
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for b in bytes {
            c ^= u32::from(*b);
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&ihdr);
    out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    out
}

/// (case, model, inputs, expected code, substrings of the message)
type Case<'a> = (&'a str, &'a str, Vec<pb::Input>, Code, Vec<&'a str>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_name_their_index_and_the_daemon_keeps_serving() {
    let (server, _dir) = TestServer::start().await;
    let (mut c, _) = clients(&server).await;
    let good = fixture_pngs("enrol_images.npy").remove(0);
    let tensor = |shape: Vec<u32>, n: usize| pb::Input {
        kind: Some(pb::input::Kind::Tensor(pb::Tensor {
            shape,
            values: vec![0.5; n],
        })),
        tower: String::new(),
    };
    let cases: Vec<Case> = vec![
        (
            "undecodable",
            MODEL,
            vec![image_input(&good), image_input(b"not an image at all")],
            Code::InvalidArgument,
            vec!["inputs[1].image"],
        ),
        (
            "empty image",
            MODEL,
            vec![image_input(b"")],
            Code::InvalidArgument,
            vec!["inputs[0].image", "empty"],
        ),
        (
            "zero-size",
            MODEL,
            vec![image_input(&png_header(0, 10))],
            Code::InvalidArgument,
            vec!["inputs[0].image"],
        ),
        (
            "decompression bomb",
            MODEL,
            vec![
                image_input(&good),
                image_input(&good),
                image_input(&png_header(100_000, 100_000)),
            ],
            Code::InvalidArgument,
            vec!["inputs[2].image"],
        ),
        (
            "wrong tensor shape",
            MODEL,
            vec![tensor(vec![1, 28, 27], 756)],
            Code::InvalidArgument,
            vec!["inputs[0].tensor.shape"],
        ),
        (
            "tensor values short",
            MODEL,
            vec![tensor(vec![1, 28, 28], 10)],
            Code::InvalidArgument,
            vec!["inputs[0].tensor.values"],
        ),
        (
            "unknown tower",
            MODEL,
            vec![pb::Input {
                tower: "aerial".into(),
                ..image_input(&good)
            }],
            Code::NotFound,
            vec!["inputs[0].tower", "aerial"],
        ),
        (
            "empty input",
            MODEL,
            vec![pb::Input {
                kind: None,
                tower: String::new(),
            }],
            Code::InvalidArgument,
            vec!["inputs[0]"],
        ),
        (
            "no inputs",
            MODEL,
            vec![],
            Code::InvalidArgument,
            vec!["inputs"],
        ),
        (
            "unknown model",
            "nope",
            vec![image_input(&good)],
            Code::NotFound,
            vec!["\"nope\""],
        ),
    ];
    for (case, model, inputs, code, needles) in cases {
        let err = c
            .embed(pb::EmbedRequest {
                model: model.into(),
                inputs,
            })
            .await
            .expect_err(case);
        assert_status(case, &err, code, &needles);
    }
    // Still serving.
    let v = embed(&mut c, vec![image_input(&good)]).await;
    assert_eq!(v[0].len(), 64);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_queue_refuses_what_cannot_fit_and_streams_wait_for_room() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two waiting inputs per tower.
    let server = TestServer::start_in(dir.path(), |c| c.batch.queue = 2).await;
    let (mut c, _) = clients(&server).await;
    let pngs = fixture_pngs("enrol_images.npy");
    let err = c
        .embed(pb::EmbedRequest {
            model: MODEL.into(),
            inputs: pngs[..3].iter().map(|p| image_input(p)).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    // Nothing of the refused request stays queued: a full-size request goes through.
    assert_eq!(
        embed(&mut c, pngs[..2].iter().map(|p| image_input(p)).collect())
            .await
            .len(),
        2
    );

    // Eight streams at once, each request filling the whole queue: unary calls would be
    // refused under this contention, streams wait their turn and all finish.
    let mut tasks = Vec::new();
    for s in 0..8 {
        let url = server.url();
        let pngs = pngs.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = EmbedderClient::new(channel(&url).await);
            let reqs: Vec<pb::EmbedRequest> = (0..5)
                .map(|r| pb::EmbedRequest {
                    model: MODEL.into(),
                    inputs: pngs[s * 10 + r * 2..s * 10 + r * 2 + 2]
                        .iter()
                        .map(|p| image_input(p))
                        .collect(),
                })
                .collect();
            let mut stream = c
                .embed_stream(tokio_stream::iter(reqs))
                .await
                .unwrap()
                .into_inner();
            let mut n = 0;
            while let Some(resp) = stream.message().await.unwrap() {
                assert_eq!(resp.embeddings.len(), 2);
                n += 1;
            }
            n
        }));
    }
    for t in tasks {
        assert_eq!(
            tokio::time::timeout(std::time::Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap(),
            5
        );
    }
    server.stop().await;
}

/// The batcher waits for company only as many jobs as the previous batch had: a lone
/// client never waits out max_delay, while concurrent callers still share batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_client_does_not_wait_for_company() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start_in(dir.path(), |c| {
        c.batch.max_delay = std::time::Duration::from_secs(2);
    })
    .await;
    let stats = server
        .app()
        .await
        .embedder()
        .batch_stats()
        .into_iter()
        .find(|(graph, _)| graph.starts_with("fmnist-triplet/"))
        .map(|(_, s)| s)
        .expect("the shipped embedder's tower");
    let counts = || {
        use std::sync::atomic::Ordering::Relaxed;
        (stats.batches.load(Relaxed), stats.jobs.load(Relaxed))
    };
    let (mut c, _) = clients(&server).await;
    let png = fixture_pngs("enrol_images.npy").remove(0);
    let start = std::time::Instant::now();
    let mut first = Vec::new();
    let before = counts();
    for _ in 0..5 {
        first = embed(&mut c, vec![image_input(&png)]).await.remove(0);
    }
    // Waiting out the delay even once would take 2 s; five calls take milliseconds.
    let took = start.elapsed();
    assert!(took < std::time::Duration::from_secs(2), "{took:?}");
    let lone = counts();
    assert_eq!(
        (lone.0 - before.0, lone.1 - before.1),
        (5, 5),
        "a lone client's calls run one batch each"
    );
    // Eight callers at once, three times: each answer is still the image's embedding,
    // and the 24 jobs ran in fewer batches than jobs: callers shared batches.
    for _ in 0..3 {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..8 {
            let (mut c, png) = (c.clone(), png.clone());
            tasks.spawn(async move { embed(&mut c, vec![image_input(&png)]).await.remove(0) });
        }
        while let Some(v) = tasks.join_next().await {
            let v = v.unwrap();
            let d = max_diff(&v, &first);
            assert!(d <= 1e-5, "{d}");
        }
    }
    let after = counts();
    let (batches, jobs) = (after.0 - lone.0, after.1 - lone.1);
    println!("24 concurrent calls ran in {batches} batches");
    assert_eq!(jobs, 24);
    assert!(
        batches < jobs,
        "concurrent callers shared no batch ({batches} batches)"
    );
    server.stop().await;
}

/// The batchprobe fixture's fourth value is the number of rows of the batch it ran in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn padded_batches_run_at_max_batch_rows_and_reply_only_with_the_real_rows() {
    let probe = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/batchprobe/model.toml");
    // None: the provider decides, and on CPU it does not pad.
    for pad in [Some(true), Some(false), None] {
        let dir = tempfile::tempdir().unwrap();
        let server = TestServer::start_in(dir.path(), |c| {
            c.models = vec![("batchprobe".into(), probe.clone())];
            c.batch.max_batch = 16;
            c.batch.pad = pad;
        })
        .await;
        let (mut c, _) = clients(&server).await;
        for n in [1usize, 3, 16] {
            let inputs = (0..n)
                .map(|i| pb::Input {
                    kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                        shape: vec![1, 28, 28],
                        values: vec![i as f32 + 1.0; 784],
                    })),
                    tower: String::new(),
                })
                .collect();
            let out = c
                .embed(pb::EmbedRequest {
                    model: "batchprobe".into(),
                    inputs,
                })
                .await
                .unwrap()
                .into_inner()
                .embeddings;
            assert_eq!(out.len(), n, "pad {pad:?}: one reply row per input");
            for (i, row) in out.iter().enumerate() {
                let v = i as f32 + 1.0;
                assert_eq!(row.values[..3], [v, v, v], "pad {pad:?}, input {i} of {n}");
                let rows = row.values[3];
                if pad == Some(true) {
                    assert_eq!(rows, 16.0, "a padded batch has max_batch rows");
                } else {
                    assert!(
                        rows >= 1.0 && rows <= n as f32,
                        "pad {pad:?}: an unpadded batch of {rows} rows for {n} inputs"
                    );
                }
            }
        }
        server.stop().await;
    }
}
