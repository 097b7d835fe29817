//! The model lifecycle against the real ONNX Runtime: Models.Publish (checked, kept,
//! refused whole when corrupt or too large) and Models.Activate (the collection
//! re-embedded in the background, reads on the old generation until an atomic switch,
//! writes during the run landing in the new one, a kill -9 halfway resumed at start).
//!
//! The second model is tests/fixtures/proj (make.py there): the same input and
//! dimension as the shipped fmnist-triplet, other vectors, so every answer shows which
//! generation gave it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use likeness::grpc::pb;
use likeness::grpc::pb::embedder_client::EmbedderClient;
use likeness::grpc::pb::models_client::ModelsClient;
use tonic::Code;

use crate::common::{
    TestServer, assert_status, channel, cli, fixture_pngs, image_input, input_query, spawn_daemon,
};

const MODEL: &str = "fmnist-triplet";
const NEW: &str = "fmnist-triplet@2";

fn proj_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proj")
}

/// The second model's manifest (with its sha256) and .onnx bytes.
fn proj() -> (String, Vec<u8>) {
    let dir = proj_dir();
    (
        std::fs::read_to_string(dir.join("model.toml")).unwrap(),
        std::fs::read(dir.join("proj.onnx")).unwrap(),
    )
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Publishes in chunks of `chunk` bytes; the first chunk names the model.
async fn publish(
    url: &str,
    name: &str,
    manifest: &str,
    bytes: &[u8],
    chunk: usize,
) -> Result<pb::ModelInfo, tonic::Status> {
    let chunks: Vec<pb::ModelChunk> = bytes
        .chunks(chunk)
        .enumerate()
        .map(|(i, b)| pb::ModelChunk {
            name: if i == 0 { name.into() } else { String::new() },
            manifest: if i == 0 {
                manifest.into()
            } else {
                String::new()
            },
            bytes: b.to_vec(),
        })
        .collect();
    ModelsClient::new(channel(url).await)
        .max_encoding_message_size(64 << 20)
        .publish(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

async fn model_names(url: &str) -> Vec<String> {
    ModelsClient::new(channel(url).await)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .map(|m| m.name)
        .collect()
}

async fn embed(url: &str, model: &str, pngs: &[Vec<u8>]) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    let mut client = EmbedderClient::new(channel(url).await);
    for batch in pngs.chunks(200) {
        let r = client
            .embed(pb::EmbedRequest {
                model: model.into(),
                inputs: batch.iter().map(|p| image_input(p)).collect(),
            })
            .await
            .unwrap()
            .into_inner();
        out.extend(r.embeddings.into_iter().map(|v| v.values));
    }
    out
}

/// Entries of the models dir, temporary uploads included.
fn stored_versions(data: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(data.join("models")) else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match std::fs::read_dir(e.path()) {
            Ok(versions) => {
                for v in versions.flatten() {
                    out.push(format!("{name}/{}", v.file_name().to_string_lossy()));
                }
            }
            Err(_) => out.push(name),
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn publish_checks_keeps_and_serves_a_new_version() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start_in(dir.path(), |c| c.max_model_mb = 1).await;
    let url = server.url();
    let (manifest, bytes) = proj();

    // Refused whole, nothing stored: a corrupt upload (one byte flipped)...
    let mut corrupt = bytes.clone();
    corrupt[bytes.len() / 2] ^= 0x40;
    let err = publish(&url, MODEL, &manifest, &corrupt, 64 << 10)
        .await
        .unwrap_err();
    assert_status(
        "corrupt",
        &err,
        Code::InvalidArgument,
        &["bytes", "SHA-256"],
    );
    // ... an incomplete one (the last chunk lost)...
    let err = publish(
        &url,
        MODEL,
        &manifest,
        &bytes[..bytes.len() - 1000],
        64 << 10,
    )
    .await
    .unwrap_err();
    assert_status(
        "incomplete",
        &err,
        Code::InvalidArgument,
        &["bytes", "SHA-256"],
    );
    // ... one over the size limit (1 MiB here), refused while it streams...
    let big = vec![7u8; 3 << 20];
    let big_manifest = manifest.replace(&sha256_hex(&bytes), &sha256_hex(&big));
    let err = publish(&url, MODEL, &big_manifest, &big, 256 << 10)
        .await
        .unwrap_err();
    assert_status(
        "oversized",
        &err,
        Code::ResourceExhausted,
        &["bytes", "limit"],
    );
    // ... bytes that match their digest but are no model...
    let junk = b"not an onnx graph".to_vec();
    let junk_manifest = manifest.replace(&sha256_hex(&bytes), &sha256_hex(&junk));
    let err = publish(&url, MODEL, &junk_manifest, &junk, 1 << 20)
        .await
        .unwrap_err();
    assert_status(
        "not a model",
        &err,
        Code::InvalidArgument,
        &["bytes", "does not load"],
    );
    // ... a manifest without a digest, or naming another model.
    let no_digest: String = manifest
        .lines()
        .filter(|l| !l.starts_with("sha256"))
        .map(|l| format!("{l}\n"))
        .collect();
    let err = publish(&url, MODEL, &no_digest, &bytes, 1 << 20)
        .await
        .unwrap_err();
    assert_status(
        "no digest",
        &err,
        Code::InvalidArgument,
        &["manifest.sha256"],
    );
    let err = publish(&url, "other", &manifest, &bytes, 1 << 20)
        .await
        .unwrap_err();
    assert_status(
        "other name",
        &err,
        Code::InvalidArgument,
        &["manifest.name"],
    );
    assert_eq!(stored_versions(dir.path()), Vec::<String>::new());
    assert!(!model_names(&url).await.contains(&NEW.to_string()));

    // Accepted: in many chunks, served as NAME@VERSION beside the original.
    let info = publish(&url, MODEL, &manifest, &bytes, 16 << 10)
        .await
        .unwrap();
    assert_eq!((info.name.as_str(), info.version.as_str()), (NEW, "2"));
    assert_eq!(info.dimension, 64);
    assert_eq!(stored_versions(dir.path()), vec![format!("{MODEL}/2")]);
    let names = model_names(&url).await;
    assert!(names.contains(&NEW.to_string()) && names.contains(&MODEL.to_string()));
    let pngs = fixture_pngs("enrol_images.npy");
    let old = embed(&url, MODEL, &pngs[..4]).await;
    let new = embed(&url, NEW, &pngs[..4]).await;
    for (o, n) in old.iter().zip(&new) {
        let norm: f32 = n.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        assert!(
            crate::common::max_diff(o, n) > 0.05,
            "the new version embeds alike"
        );
    }
    // The same version again: ALREADY_EXISTS, the stored copy untouched.
    let err = publish(&url, MODEL, &manifest, &bytes, 1 << 20)
        .await
        .unwrap_err();
    assert_status("again", &err, Code::AlreadyExists, &["version"]);
    server.stop().await;

    // Kept: a restart serves it again, with the same vectors.
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    assert!(model_names(&server.url()).await.contains(&NEW.to_string()));
    let again = embed(&server.url(), NEW, &pngs[..4]).await;
    for (a, b) in again.iter().zip(&new) {
        assert!(crate::common::max_diff(a, b) < 1e-5);
    }
    server.stop().await;
}

/// Creates collection `name` on the shipped model and enrols `pngs` by input.
async fn enrol(url: &str, name: &str, pngs: &[Vec<u8>], keep_inputs: Option<bool>) {
    let mut colls =
        likeness::grpc::pb::collections_client::CollectionsClient::new(channel(url).await);
    colls
        .create_collection(pb::CreateCollectionRequest {
            name: name.into(),
            model: MODEL.into(),
            keep_inputs,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut items = likeness::grpc::pb::items_client::ItemsClient::new(channel(url).await);
    for (c, chunk) in pngs.chunks(200).enumerate() {
        items
            .upsert(pb::UpsertRequest {
                collection: name.into(),
                items: chunk
                    .iter()
                    .enumerate()
                    .map(|(i, p)| pb::Item {
                        id: format!("x{}", c * 200 + i),
                        label: format!("l{}", (c * 200 + i) % 10),
                        input: Some(image_input(p)),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }
}

/// Collection "c" of 800 fixture images enrolled by input, and the second model
/// published; returns the images (item i is `x<i>`).
async fn enrol_and_publish(url: &str) -> Vec<Vec<u8>> {
    let mut pngs = fixture_pngs("enrol_images.npy");
    pngs.extend(fixture_pngs("query_clean_images.npy"));
    enrol(url, "c", &pngs, None).await;
    let (manifest, bytes) = proj();
    publish(url, MODEL, &manifest, &bytes, 1 << 20)
        .await
        .unwrap();
    pngs
}

async fn info(url: &str, name: &str) -> pb::CollectionInfo {
    likeness::grpc::pb::collections_client::CollectionsClient::new(channel(url).await)
        .get_collection(pb::GetCollectionRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn activate(
    url: &str,
    collection: &str,
    version: &str,
) -> Result<pb::CollectionInfo, tonic::Status> {
    ModelsClient::new(channel(url).await)
        .activate(pb::ActivateRequest {
            collection: collection.into(),
            model: MODEL.into(),
            version: version.into(),
        })
        .await
        .map(|r| r.into_inner())
}

fn state(info: &pb::CollectionInfo) -> pb::activation::State {
    info.activation
        .as_ref()
        .map_or(pb::activation::State::Unspecified, |a| a.state())
}

/// The (id, distance) hits of a k = 10 search by image.
async fn search(url: &str, name: &str, png: &[u8]) -> Vec<(String, f32)> {
    likeness::grpc::pb::items_client::ItemsClient::new(channel(url).await)
        .search(pb::SearchRequest {
            collection: name.into(),
            query: input_query(png),
            k: 10,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .hits
        .into_iter()
        .map(|h| (h.id, h.distance))
        .collect()
}

/// Vectors of one generation: by id, and the query's.
struct Generation {
    items: std::collections::HashMap<String, Vec<f32>>,
}

impl Generation {
    /// Whether every hit is at the distance this generation puts it from `query`.
    fn gave(&self, query: &[f32], hits: &[(String, f32)]) -> bool {
        !hits.is_empty()
            && hits.iter().all(|(id, d)| {
                self.items.get(id).is_some_and(|v| {
                    (likeness::types::Metric::Cosine.distance(v, query) - d).abs() < 2e-4
                })
            })
    }
}

/// Every item's stored vector, by id.
async fn vectors(url: &str, name: &str, n: usize) -> Vec<Vec<f32>> {
    let r = likeness::grpc::pb::items_client::ItemsClient::new(channel(url).await)
        .max_decoding_message_size(64 << 20)
        .get(pb::GetRequest {
            collection: name.into(),
            ids: (0..n).map(|i| format!("x{i}")).collect(),
            with_vectors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.items.len(), n, "missing items");
    r.items.into_iter().map(|it| it.vector).collect()
}

#[tokio::test]
async fn activate_reembeds_then_switches_with_reads_never_mixed() {
    let dir = tempfile::tempdir().unwrap();
    // A cap on the re-embedding rate keeps the run long enough to watch.
    let server = TestServer::start_in(dir.path(), |c| c.reembed_rate = 400).await;
    let url = server.url();
    let pngs = enrol_and_publish(&url).await;
    let n = pngs.len();

    // What each generation must answer: every hit at the distance that generation's
    // model puts it, for items enrolled before and written during the run.
    let queries = fixture_pngs("query_reid_images.npy");
    let extra = &queries[100..110];
    let queries = &queries[..20];
    let old_vectors = vectors(&url, "c", n).await;
    let new_vectors = embed(&url, NEW, &pngs).await;
    let generation = |vs: &[Vec<f32>], extra_vs: Vec<Vec<f32>>| Generation {
        items: vs
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("x{i}"), v.clone()))
            .chain(
                extra_vs
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| (format!("w{i}"), v)),
            )
            .collect(),
    };
    let old = generation(&old_vectors, embed(&url, MODEL, extra).await);
    let extra_new = embed(&url, NEW, extra).await;
    let new = generation(&new_vectors, extra_new.clone());
    let old_q = embed(&url, MODEL, queries).await;
    let new_q = embed(&url, NEW, queries).await;

    let started = activate(&url, "c", "2").await.unwrap();
    assert_eq!(state(&started), pb::activation::State::Running);
    assert_eq!(
        started.model_version, "",
        "the old generation serves until the switch"
    );

    // Meanwhile: each search is answered by one generation, whole; a write by input
    // lands in both; a write by vector is refused while the run lasts.
    let mut items = likeness::grpc::pb::items_client::ItemsClient::new(channel(&url).await);
    let mut wrote = false;
    let (mut seen_old, mut progress) = (0, HashSet::new());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = info(&url, "c").await;
        let a = now.activation.clone().unwrap();
        progress.insert(a.done);
        for (i, q) in queries.iter().enumerate() {
            let got = search(&url, "c", q).await;
            match (old.gave(&old_q[i], &got), new.gave(&new_q[i], &got)) {
                (true, false) => seen_old += 1,
                (false, true) => {}
                _ => panic!("query {i} got {got:?}: not one generation's answer"),
            }
        }
        if !wrote && a.done > 100 {
            wrote = true;
            let err = items
                .upsert(pb::UpsertRequest {
                    collection: "c".into(),
                    items: vec![crate::common::item("v0", "l0", vec![0.5; 64])],
                })
                .await
                .unwrap_err();
            assert_status(
                "vector during run",
                &err,
                Code::FailedPrecondition,
                &["re-embedded"],
            );
            items
                .upsert(pb::UpsertRequest {
                    collection: "c".into(),
                    items: extra
                        .iter()
                        .enumerate()
                        .map(|(i, p)| pb::Item {
                            id: format!("w{i}"),
                            label: "w".into(),
                            input: Some(image_input(p)),
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .unwrap();
        }
        if state(&now) == pb::activation::State::Done {
            assert_eq!(now.model_version, "2");
            break;
        }
        assert_eq!(
            state(&now),
            pb::activation::State::Running,
            "{:?}",
            now.activation
        );
        assert!(Instant::now() < deadline, "the activation never finished");
    }
    assert!(
        wrote,
        "the run was over before the write could land during it"
    );
    assert!(seen_old > 0, "no search ran on the old generation");
    assert!(progress.len() > 2, "progress never moved: {progress:?}");
    // After the switch: the new generation only, holding every item and the writes
    // made during the run, each with the new model's vector.
    for (i, q) in queries.iter().enumerate() {
        let got = search(&url, "c", q).await;
        assert!(
            new.gave(&new_q[i], &got),
            "query {i} after the switch: {got:?}"
        );
    }
    let done = info(&url, "c").await;
    assert_eq!(done.count as usize, n + extra.len());
    let a = done.activation.unwrap();
    assert!(a.done >= n as u64 && a.rate > 0.0, "{a:?}");
    let now_vectors = vectors(&url, "c", n).await;
    for (i, (got, want)) in now_vectors.iter().zip(&new_vectors).enumerate() {
        assert!(crate::common::max_diff(got, want) < 1e-5, "item x{i}");
    }
    let written = items
        .get(pb::GetRequest {
            collection: "c".into(),
            ids: (0..extra.len()).map(|i| format!("w{i}")).collect(),
            with_vectors: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .items;
    assert_eq!(written.len(), extra.len());
    for (it, want) in written.iter().zip(&extra_new) {
        let got = &it.vector;
        assert!(crate::common::max_diff(got, want) < 1e-5, "{}", it.id);
    }
    // Writes by vector are taken again.
    items
        .upsert(pb::UpsertRequest {
            collection: "c".into(),
            items: vec![crate::common::item("v0", "l0", new_vectors[0].clone())],
        })
        .await
        .unwrap();
    // A clean restart keeps the new generation.
    server.stop().await;
    let server = TestServer::start_in(dir.path(), |_| {}).await;
    let back = info(&server.url(), "c").await;
    assert_eq!(
        (back.model_version.as_str(), back.count as usize),
        ("2", n + extra.len() + 1)
    );
    let got = search(&server.url(), "c", &queries[0]).await;
    assert!(new.gave(&new_q[0], &got), "after a restart: {got:?}");
    server.stop().await;
}

#[tokio::test]
async fn activate_refuses_what_it_cannot_do() {
    let (server, _dir) = TestServer::start().await;
    let url = server.url();
    let pngs = fixture_pngs("enrol_images.npy");
    let (manifest, bytes) = proj();
    publish(&url, MODEL, &manifest, &bytes, 1 << 20)
        .await
        .unwrap();
    // No inputs kept.
    enrol(&url, "bare", &pngs[..20], Some(false)).await;
    let err = activate(&url, "bare", "2").await.unwrap_err();
    assert_status(
        "no inputs",
        &err,
        Code::FailedPrecondition,
        &["keeps no inputs"],
    );
    // Items written by vector have no input to re-embed.
    enrol(&url, "mixed", &pngs[..20], None).await;
    let v = embed(&url, MODEL, &pngs[20..21]).await.remove(0);
    likeness::grpc::pb::items_client::ItemsClient::new(channel(&url).await)
        .upsert(pb::UpsertRequest {
            collection: "mixed".into(),
            items: vec![crate::common::item("by-vector", "l0", v)],
        })
        .await
        .unwrap();
    let err = activate(&url, "mixed", "2").await.unwrap_err();
    assert_status(
        "by vector",
        &err,
        Code::FailedPrecondition,
        &["1 of the 21 items"],
    );
    // Unknown collection, version; the model it already uses.
    let err = activate(&url, "nope", "2").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = activate(&url, "mixed", "9").await.unwrap_err();
    assert_status("version", &err, Code::NotFound, &["version"]);
    let err = activate(&url, "mixed", "").await.unwrap_err();
    assert_status("same", &err, Code::FailedPrecondition, &["already uses"]);
    // Nothing started: the collections serve as before.
    assert!(info(&url, "mixed").await.activation.is_none());
    server.stop().await;
}

/// A trainer that publishes each version of its network waits for one activation to
/// be reported done and activates the next at once. GetCollection says done as soon as
/// the collection serves the new generation, before the old one's files are gone; an
/// Activate in that window was refused as "already being re-embedded" (seen in the
/// CJK training runs at about one activation in two).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activate_again_as_soon_as_the_last_is_reported_done() {
    let (server, _dir) = TestServer::start().await;
    let url = server.url();
    let mut pngs = enrol_and_publish(&url).await;
    // More items make the old generation's clean-up, the window, longer.
    let more: Vec<Vec<u8>> = pngs.iter().cycle().take(2400).cloned().collect();
    pngs.extend(more);
    enrol(&url, "big", &pngs, None).await;
    let mut colls =
        likeness::grpc::pb::collections_client::CollectionsClient::new(channel(&url).await);
    for round in 0..8 {
        // Alternates between the published version and the one loaded at start.
        let version = if round % 2 == 0 { "2" } else { "" };
        let started = activate(&url, "big", version).await;
        assert!(
            started.is_ok(),
            "round {round}: activate right after the last was reported done: {:?}",
            started.err()
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let now = colls
                .get_collection(pb::GetCollectionRequest { name: "big".into() })
                .await
                .unwrap()
                .into_inner();
            match state(&now) {
                pb::activation::State::Done => {
                    assert_eq!(now.model_version, version, "round {round}");
                    break;
                }
                pb::activation::State::Running => {}
                other => panic!("round {round}: {other:?}: {:?}", now.activation),
            }
            assert!(Instant::now() < deadline, "round {round}: not done");
        }
    }
    assert_eq!(info(&url, "big").await.count, pngs.len() as u64);
    server.stop().await;
}

#[tokio::test]
async fn activation_killed_halfway_resumes_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let slow = ["--reembed-rate", "200"];
    let mut daemon = spawn_daemon(dir.path(), &slow, &[]);
    let url = format!("http://{}", daemon.addr);
    crate::common::wait_serving(&url).await;
    let pngs = enrol_and_publish(&url).await;
    let n = pngs.len();
    let new_vectors = embed(&url, NEW, &pngs).await;
    activate(&url, "c", "2").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let a = info(&url, "c").await.activation.unwrap();
        assert_eq!(
            a.state(),
            pb::activation::State::Running,
            "finished before the kill"
        );
        if a.done >= 256 {
            break;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();

    // Restarted: the old generation serves until the resumed run completes.
    let daemon = spawn_daemon(dir.path(), &[], &[]);
    let url = format!("http://{}", daemon.addr);
    crate::common::wait_serving(&url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let resumed_from = loop {
        let now = info(&url, "c").await;
        if let Some(a) = &now.activation {
            break a.clone();
        }
        assert_eq!(now.model_version, "");
        assert!(Instant::now() < deadline, "the activation was not resumed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        resumed_from.done >= 256,
        "resumed from the start: {resumed_from:?}"
    );
    loop {
        let now = info(&url, "c").await;
        match state(&now) {
            pb::activation::State::Done => {
                assert_eq!((now.model_version.as_str(), now.count as usize), ("2", n));
                break;
            }
            pb::activation::State::Running => assert_eq!(now.model_version, ""),
            other => panic!("{other:?}: {:?}", now.activation),
        }
        assert!(
            Instant::now() < deadline,
            "the resumed activation never finished"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now_vectors = vectors(&url, "c", n).await;
    for (i, (got, want)) in now_vectors.iter().zip(&new_vectors).enumerate() {
        assert!(crate::common::max_diff(got, want) < 1e-5, "item x{i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_publishes_and_activates() {
    let (server, dir) = TestServer::start().await;
    let url = server.url();
    let pngs = fixture_pngs("enrol_images.npy");
    enrol(&url, "c", &pngs[..30], None).await;
    // A manifest without its digest: the CLI adds it from the file it names.
    let (manifest, bytes) = proj();
    let bare: String = manifest
        .lines()
        .filter(|l| !l.starts_with("sha256"))
        .map(|l| format!("{l}\n"))
        .collect();
    let model_dir = dir.path().join("upload");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::write(model_dir.join("model.toml"), bare).unwrap();
    std::fs::write(model_dir.join("proj.onnx"), &bytes).unwrap();
    let manifest_path = model_dir.join("model.toml");
    let (ok, out, err) = cli(
        &url,
        &["publish", "--manifest", manifest_path.to_str().unwrap()],
    )
    .await;
    assert!(ok, "{err}");
    let published: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(published["name"], NEW, "{out}");

    let args = [
        "activate",
        "-c",
        "c",
        "--model",
        MODEL,
        "--version",
        "2",
        "--wait",
    ];
    let (ok, out, err) = cli(&url, &args).await;
    assert!(ok, "{err}");
    let done: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(done["model_version"], "2", "{out}");
    assert_eq!(done["count"], 30, "{out}");
    assert_eq!(done["activation"]["state"], "DONE", "{out}");
    // Again: refused, with the status on stderr and a failing exit.
    let (ok, _, err) = cli(&url, &args).await;
    assert!(
        !ok && err.contains("FailedPrecondition") && err.contains("already uses"),
        "{err}"
    );
    server.stop().await;
}
