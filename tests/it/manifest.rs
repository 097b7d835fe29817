//! Model manifests: several towers into one space, and manifests that disagree with
//! their graph are refused at load with the reason.

use std::path::{Path, PathBuf};

use crate::common::*;
use likeness::embed::{BatchConfig, Device, Models};
use likeness::grpc::pb;

fn shipped_onnx() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-triplet/model.onnx")
}

/// A manifest with the shipped graph under each of `towers`, with `input`, `output`
/// and `dimension` as given.
fn manifest(dir: &Path, towers: &[&str], input: &str, output: &str, dimension: u32) -> PathBuf {
    let mut text = String::from("name = \"test\"\nversion = \"7\"\n");
    for t in towers {
        text.push_str(&format!(
            "[[towers]]\nname = \"{t}\"\nfile = {:?}\ninput = \"{input}\"\noutput = \"{output}\"\ndimension = {dimension}\nnormalize = true\nmetric = \"cosine\"\n[towers.image]\nchannels = 1\nheight = 28\nwidth = 28\nmean = [0.2844]\nstd = [0.3542]\n",
            shipped_onnx()
        ));
    }
    let path = dir.join("model.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(path: &Path) -> Result<Models, String> {
    let config = BatchConfig {
        device: Device::Cpu,
        threads: 1,
        ..Default::default()
    };
    Models::load(&[("m".to_string(), path.to_path_buf())], config).map_err(|e| e.to_string())
}

#[test]
fn manifests_that_disagree_with_the_graph_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(&manifest(dir.path(), &["a"], "pixels", "embedding", 64))
        .err()
        .unwrap();
    assert!(
        err.contains("no input \"pixels\"") && err.contains("input"),
        "{err}"
    );
    let err = load(&manifest(dir.path(), &["a"], "input", "features", 64))
        .err()
        .unwrap();
    assert!(err.contains("no output \"features\""), "{err}");
    let err = load(&manifest(dir.path(), &["a"], "input", "embedding", 32))
        .err()
        .unwrap();
    assert!(err.contains("expected [batch, 32]"), "{err}");
    std::fs::write(dir.path().join("bad.toml"), "name = \"x\"\ntowers = []\n").unwrap();
    let err = load(&dir.path().join("bad.toml")).err().unwrap();
    assert!(err.contains("no towers"), "{err}");
    assert!(load(&manifest(dir.path(), &["a"], "input", "embedding", 64)).is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_choose_their_tower() {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), &["ground", "aerial"], "input", "embedding", 64);
    let data = dir.path().join("data");
    let server =
        TestServer::start_in(&data, |c| c.models = vec![("two".into(), path.clone())]).await;
    let ch = channel(&server.url()).await;
    let info = pb::models_client::ModelsClient::new(ch.clone())
        .get_model(pb::GetModelRequest { name: "two".into() })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = info.towers.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["ground", "aerial"]);
    assert_eq!(info.version, "7");

    let png = fixture_pngs("enrol_images.npy").remove(0);
    let mut c = pb::embedder_client::EmbedderClient::new(ch);
    let with_tower = |tower: &str| pb::Input {
        tower: tower.into(),
        ..image_input(&png)
    };
    let r = c
        .embed(pb::EmbedRequest {
            model: "two".into(),
            inputs: vec![with_tower(""), with_tower("ground"), with_tower("aerial")],
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    // Both towers run the same weights here, so they must agree; the default is the first.
    assert_eq!(r.len(), 3);
    for e in &r[1..] {
        let diff = max_diff(&e.values, &r[0].values);
        assert!(diff <= 1e-5, "{diff}");
    }
    let err = c
        .embed(pb::EmbedRequest {
            model: "two".into(),
            inputs: vec![with_tower("ground"), with_tower("street")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert!(
        err.message().contains("inputs[1].tower") && err.message().contains("street"),
        "{}",
        err.message()
    );
    server.stop().await;
}

#[test]
fn keep_size_needs_dynamic_spatial_dims() {
    let dir = tempfile::tempdir().unwrap();
    let path = manifest(dir.path(), &["a"], "input", "embedding", 64);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("width = 28\n", "width = 28\nresize = \"keep\"\n");
    std::fs::write(&path, text).unwrap();
    let err = load(&path).err().unwrap();
    assert!(
        err.contains("dynamic height and width") && err.contains("[batch, 1, dynamic, dynamic]"),
        "{err}"
    );
}

/// `likeness pack` writes an .onnx that carries its manifest; `--model NAME=FILE.onnx`
/// then loads it with no TOML, and it embeds exactly as the TOML-described model does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_in_onnx_metadata_loads_without_toml() {
    let dir = tempfile::tempdir().unwrap();
    let packed = dir.path().join("packed.onnx");
    let shipped_toml =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-triplet/model.toml");
    let pack = |manifest: &Path, out: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_likeness"))
            .args(["pack", "--manifest"])
            .arg(manifest)
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let out = pack(&shipped_toml, &packed);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Packing a packed file again is refused; so is a manifest spanning two files.
    let again = dir.path().join("packed.toml");
    std::fs::write(
        &again,
        std::fs::read_to_string(&shipped_toml)
            .unwrap()
            .replace("file = \"model.onnx\"", &format!("file = {packed:?}")),
    )
    .unwrap();
    let out = pack(&again, &dir.path().join("twice.onnx"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already carries a manifest"));
    let spp = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spp/model.toml");
    let out = pack(&spp, &dir.path().join("spp.onnx"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 files"));
    // A bare .onnx has no manifest to load.
    let err = load(&shipped_onnx()).err().unwrap();
    assert!(
        err.contains("no manifest") && err.contains("likeness.manifest"),
        "{err}"
    );

    // A pair model packs the same way.
    let packed_pair = dir.path().join("pair.onnx");
    let pair_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/fmnist-pair/model.toml");
    let out = pack(&pair_toml, &packed_pair);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data = dir.path().join("data");
    let server = TestServer::start_in(&data, |c| {
        c.models.push(("packed".into(), packed.clone()));
        c.models.push(("packed-pair".into(), packed_pair.clone()));
    })
    .await;
    let ch = channel(&server.url()).await;
    let mut models = pb::models_client::ModelsClient::new(ch.clone());
    let list = models
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let pairs: Vec<_> = list.iter().filter(|m| m.kind == "pair").collect();
    assert_eq!(pairs.len(), 2);
    assert_eq!(
        pairs[0].pair, pairs[1].pair,
        "the same pair manifest, read from metadata"
    );
    let embedders: Vec<_> = list.iter().filter(|m| m.kind == "embedder").collect();
    let names: Vec<_> = embedders.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["fmnist-triplet", "packed"]);
    assert_eq!(
        embedders[0].towers, embedders[1].towers,
        "the same manifest, read from metadata"
    );
    let png = fixture_pngs("enrol_images.npy").remove(0);
    let mut e = pb::embedder_client::EmbedderClient::new(ch);
    let mut got = Vec::new();
    for model in ["fmnist-triplet", "packed"] {
        got.push(
            e.embed(pb::EmbedRequest {
                model: model.into(),
                inputs: vec![image_input(&png)],
            })
            .await
            .unwrap()
            .into_inner()
            .embeddings
            .remove(0)
            .values,
        );
    }
    assert_eq!(got[0], got[1]);
    server.stop().await;
}
