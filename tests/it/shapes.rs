//! Models beyond one fixed-size tower: a graph with dynamic spatial dims (SPP-style)
//! that keeps each image's size and batches only same-sized inputs, beside a second,
//! tensor-input tower of its own (a genuine two-tower model: two graphs, two input
//! kinds, one space). Reference outputs are ONNX Runtime's, run in Python by
//! tests/fixtures/spp/make.py on the same preprocessed tensors.

use std::path::{Path, PathBuf};

use crate::common::*;
use likeness::grpc::pb;

fn spp_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/spp")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(spp_dir().join("reference.json")).unwrap())
        .unwrap()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn tensor_input(shape: Vec<u32>, values: Vec<f32>, tower: &str) -> pb::Input {
    pb::Input {
        kind: Some(pb::input::Kind::Tensor(pb::Tensor { shape, values })),
        tower: tower.into(),
    }
}

/// A grey PNG of `w` x `h` with a gradient.
fn png(w: u32, h: u32) -> Vec<u8> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 7 + y * 3) % 256) as u8]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_keep_their_size_and_towers_differ() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = spp_dir().join("model.toml");
    let server = TestServer::start_in(dir.path(), |c| {
        c.models = vec![("spp".into(), manifest.clone())];
    })
    .await;
    let ch = channel(&server.url()).await;
    let info = pb::models_client::ModelsClient::new(ch.clone())
        .get_model(pb::GetModelRequest { name: "spp".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.kind, "embedder");
    match &info.towers[0].input {
        Some(pb::tower_info::Input::Image(img)) => {
            assert_eq!(
                (img.resize.as_str(), img.height, img.width),
                ("keep", 48, 48)
            );
        }
        other => panic!("{other:?}"),
    }
    match &info.towers[1].input {
        Some(pb::tower_info::Input::Tensor(t)) => assert_eq!(t.shape, [10]),
        other => panic!("{other:?}"),
    }

    let r = reference();
    let images = r["images"].as_array().unwrap();
    let pngs: Vec<Vec<u8>> = images
        .iter()
        .map(|i| std::fs::read(spp_dir().join(i["file"].as_str().unwrap())).unwrap())
        .collect();
    let mut e = pb::embedder_client::EmbedderClient::new(ch);
    // One request: three sizes (two images share one), plus one over the 48x48 cap that
    // is scaled down to fit. Each must equal ONNX Runtime's output at its own size.
    let mut inputs: Vec<pb::Input> = pngs.iter().map(|p| image_input(p)).collect();
    inputs.push(image_input(&png(96, 30)));
    let batch = e
        .embed(pb::EmbedRequest {
            model: "spp".into(),
            inputs: inputs.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    assert_eq!(batch.len(), 5);
    for (i, img) in images.iter().enumerate() {
        let d = max_diff(&batch[i].values, &floats(&img["embedding"]));
        assert!(
            d <= 1e-5,
            "image {i} ({}x{}): {d}",
            img["height"],
            img["width"]
        );
    }
    // The two same-sized images differ, so they were not confused within their batch.
    assert!(max_diff(&batch[1].values, &batch[3].values) > 1e-3);
    // One by one: the same vectors.
    for (i, input) in inputs.iter().enumerate() {
        let one = e
            .embed(pb::EmbedRequest {
                model: "spp".into(),
                inputs: vec![input.clone()],
            })
            .await
            .unwrap()
            .into_inner()
            .embeddings;
        let d = max_diff(&one[0].values, &batch[i].values);
        assert!(d <= 1e-5, "input {i}: batch vs single {d}");
    }
    // The over-size image is the same as its 48x15 downscale sent as-is.
    let small = image::imageops::resize(
        &image::load_from_memory(&png(96, 30)).unwrap().to_luma8(),
        48,
        15,
        image::imageops::FilterType::Triangle,
    );
    let mut buf = std::io::Cursor::new(Vec::new());
    small.write_to(&mut buf, image::ImageFormat::Png).unwrap();
    let direct = e
        .embed(pb::EmbedRequest {
            model: "spp".into(),
            inputs: vec![image_input(&buf.into_inner())],
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    assert!(max_diff(&direct[0].values, &batch[4].values) <= 1e-5);

    // A tensor input keeps its size too: the preprocessed 20x36 image as values.
    let (mean, std) = (
        r["mean"].as_f64().unwrap() as f32,
        r["std"].as_f64().unwrap() as f32,
    );
    let decoded = image::load_from_memory(&pngs[1]).unwrap().to_luma8();
    let values: Vec<f32> = decoded
        .pixels()
        .map(|p| (f32::from(p.0[0]) / 255.0 - mean) / std)
        .collect();
    let tensor = tensor_input(vec![1, 20, 36], values, "image");
    let out = e
        .embed(pb::EmbedRequest {
            model: "spp".into(),
            inputs: vec![tensor],
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    assert!(max_diff(&out[0].values, &floats(&images[1]["embedding"])) <= 1e-5);

    // The tensor tower is another graph into the same space.
    let t = &r["tensor"];
    let out = e
        .embed(pb::EmbedRequest {
            model: "spp".into(),
            inputs: vec![
                tensor_input(vec![10], floats(&t["values"]), "tensor"),
                image_input(&pngs[0]),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .embeddings;
    assert!(max_diff(&out[0].values, &floats(&t["embedding"])) <= 1e-5);
    assert!(max_diff(&out[1].values, &floats(&images[0]["embedding"])) <= 1e-5);

    // Bad shapes are named, and the rest of the daemon keeps serving.
    let bad = [
        (
            tensor_input(vec![1, 49, 10], vec![0.0; 490], "image"),
            "inputs[0].tensor.shape",
        ),
        (
            tensor_input(vec![3, 20, 20], vec![0.0; 1200], "image"),
            "inputs[0].tensor.shape",
        ),
        (image_input(&pngs[0]).clone(), "inputs[0].image"),
    ];
    for (i, (mut input, field)) in bad.into_iter().enumerate() {
        if i == 2 {
            input.tower = "tensor".into();
        }
        let err = e
            .embed(pb::EmbedRequest {
                model: "spp".into(),
                inputs: vec![input],
            })
            .await
            .unwrap_err();
        assert_status(
            &format!("case {i}"),
            &err,
            tonic::Code::InvalidArgument,
            &[field],
        );
    }
    server.stop().await;
}
