//! Embedding throughput: the shipped embedder in an ONNX Runtime session in this process
//! (on tensors already preprocessed) against the daemon's Embed over gRPC (PNG images
//! in), at several batch sizes, and 64 concurrent single-image clients.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use likeness::grpc::pb;
use serde::Deserialize;

use crate::daemon::Daemon;
use crate::procfs::Meter;
use crate::{Stat, stat};

/// Images embedded per run of each embedding figure.
const EMBED_IMAGES: usize = 4096;

/// The part of a model manifest (models/NAME/model.toml) the reference needs.
#[derive(Debug, Deserialize)]
struct Manifest {
    name: String,
    towers: Vec<Tower>,
}

#[derive(Debug, Deserialize)]
struct Tower {
    file: PathBuf,
    input: String,
    output: String,
    image: Option<ImageSpec>,
}

#[derive(Debug, Deserialize)]
struct ImageSpec {
    channels: u32,
    height: u32,
    width: u32,
    mean: Vec<f32>,
    std: Vec<f32>,
}

/// The ONNX Runtime library, found as the daemon finds it: LIKENESS_ORT_DYLIB,
/// ORT_DYLIB_PATH, or the one the build fetched.
fn ort_library() -> PathBuf {
    for var in ["LIKENESS_ORT_DYLIB", "ORT_DYLIB_PATH"] {
        if let Ok(p) = std::env::var(var)
            && !p.is_empty()
        {
            return PathBuf::from(p);
        }
    }
    PathBuf::from(env!("LIKENESS_ORT_DYLIB_DEFAULT"))
}

fn png(h: u32, w: u32, px: &[u8]) -> Result<Vec<u8>, String> {
    let img = image::GrayImage::from_raw(w, h, px.to_vec()).ok_or("bad image size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

/// The model name in a manifest.
pub fn model_name(model: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let manifest: Manifest =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", model.display()))?;
    Ok(manifest.name)
}

/// The images of a uint8 N x H x W .npy file as PNG inputs.
pub fn png_inputs(images: &Path) -> Result<Vec<pb::Input>, String> {
    let (h, w, raw) = likeness::cli::load::npy_images(images)?;
    raw.iter()
        .map(|px| {
            Ok(pb::Input {
                kind: Some(pb::input::Kind::Image(png(h, w, px)?)),
                ..Default::default()
            })
        })
        .collect()
}

/// A CPU figure in µs, as a table cell.
fn us(x: f64) -> String {
    format!("{x:.0}")
}

pub async fn run(
    d: &Daemon,
    model: &Path,
    images: &Path,
    ref_device: &str,
    batches: &[usize],
    threads: usize,
    runs: usize,
) -> Result<(), String> {
    let cuda_id: Option<i32> = match ref_device {
        "cpu" => None,
        "cuda" => Some(0),
        other => Some(
            other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| format!("--embed-ref-device {other:?}: use cpu, cuda or cuda:N"))?,
        ),
    };
    let text = std::fs::read_to_string(model).map_err(|e| format!("{}: {e}", model.display()))?;
    let manifest: Manifest =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", model.display()))?;
    let tower = manifest.towers.first().ok_or("the model has no tower")?;
    let spec = tower
        .image
        .as_ref()
        .ok_or("the model's tower takes no images")?;
    let (h, w, raw) = likeness::cli::load::npy_images(images)?;
    if spec.channels != 1 || (spec.height, spec.width) != (h, w) {
        return Err(format!(
            "the reference feeds {h}x{w} grayscale images unresized; the model wants {}x{}x{}",
            spec.channels, spec.height, spec.width
        ));
    }
    // What the daemon does to each decoded grayscale image (src/embed/image.rs).
    let tensors: Vec<Vec<f32>> = raw
        .iter()
        .map(|px| {
            px.iter()
                .map(|p| (f32::from(*p) / 255.0 - spec.mean[0]) / spec.std[0])
                .collect()
        })
        .collect();
    let pngs: Vec<Vec<u8>> = raw
        .iter()
        .map(|px| png(h, w, px))
        .collect::<Result<_, _>>()?;
    let lib = ort_library();
    let env = ort::init_from(&lib)
        .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", lib.display()))?
        .with_name("likeness-bench")
        .build()
        .map_err(|e| e.to_string())?;
    let file = model.parent().unwrap_or(Path::new(".")).join(&tower.file);
    let mut builder = ort::session::Session::builder(&env)
        .map_err(|e| e.to_string())?
        .with_intra_threads(threads)
        .map_err(|e| e.to_string())?
        .with_intra_op_spinning(true) // ONNX Runtime's default
        .map_err(|e| e.to_string())?;
    let provider = match cuda_id {
        None => "CPUExecutionProvider",
        Some(id) => {
            let cuda = ort::ep::CUDA::default()
                .with_device_id(id)
                .with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic);
            builder = builder
                .with_execution_providers([cuda.build().error_on_failure()])
                .map_err(|e| format!("the reference on CUDA device {id}: {e}"))?;
            "CUDAExecutionProvider"
        }
    };
    let mut session = builder
        .commit_from_file(&file)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    let per = tensors[0].len();
    let png_inputs: Arc<Vec<pb::Input>> = Arc::new(
        pngs.iter()
            .map(|p| pb::Input {
                kind: Some(pb::input::Kind::Image(p.clone())),
                ..Default::default()
            })
            .collect(),
    );
    let tensor_inputs: Arc<Vec<pb::Input>> = Arc::new(
        tensors
            .iter()
            .map(|t| pb::Input {
                kind: Some(pb::input::Kind::Tensor(pb::Tensor {
                    shape: vec![spec.channels, spec.height, spec.width],
                    values: t.clone(),
                })),
                ..Default::default()
            })
            .collect(),
    );
    let name = manifest.name.as_str();
    let mut grpc_best = (0usize, 0f64);
    let mut inproc_best = (0usize, 0f64);
    println!(
        "## Embedding ({name} on {provider}, {threads} intra-op threads in-process; the daemon runs one session per tower with its own --device and --embed-threads)\n"
    );
    println!(
        "| batch | in-process ONNX Runtime, images/s | likeness Embed over gRPC (PNG in), images/s | likeness / in-process | in-process CPU µs/image | daemon CPU µs/image | client CPU µs/image |"
    );
    println!("|---|---|---|---|---|---|---|");
    let batches: &[usize] = match (batches, cuda_id) {
        ([_, ..], _) => batches,
        ([], Some(_)) => &[1, 8, 32, 64, 128, 256, 512],
        ([], None) => &[1, 8, 32, 64, 128],
    };
    if batches.contains(&0) {
        return Err("--embed-batches: a batch has at least one image".into());
    }
    for &batch in batches {
        let mut ort_rates = Vec::new();
        let mut ort_cpu = Vec::new();
        let mut grpc_rates = Vec::new();
        let mut grpc_cpu = Vec::new();
        for _ in 0..runs {
            let cpu = Meter::start(None);
            let start = Instant::now();
            let mut done = 0;
            while done < EMBED_IMAGES {
                let n = batch.min(EMBED_IMAGES - done);
                let mut data = Vec::with_capacity(n * per);
                for i in 0..n {
                    data.extend_from_slice(&tensors[(done + i) % tensors.len()]);
                }
                let shape = vec![
                    n as i64,
                    i64::from(spec.channels),
                    i64::from(spec.height),
                    i64::from(spec.width),
                ];
                let t = ort::value::Tensor::from_array((shape, data)).map_err(|e| e.to_string())?;
                let out = session
                    .run(ort::inputs![tower.input.as_str() => t])
                    .map_err(|e| e.to_string())?;
                let _ = out[tower.output.as_str()]
                    .try_extract_tensor::<f32>()
                    .map_err(|e| e.to_string())?;
                done += n;
            }
            ort_rates.push(EMBED_IMAGES as f64 / start.elapsed().as_secs_f64());
            ort_cpu.push(cpu.stop().per(EMBED_IMAGES).1);
            // Two clients keep the daemon's pipeline full at this batch size.
            let r = d
                .embed_rate(name, &png_inputs, EMBED_IMAGES, batch, 2)
                .await?;
            grpc_rates.push(r.rate);
            grpc_cpu.push(r.cpu_us());
        }
        let (o, g) = (stat(ort_rates), stat(grpc_rates));
        let (dc, cc) = median_pair(grpc_cpu);
        if o.median > inproc_best.1 {
            inproc_best = (batch, o.median);
        }
        if g.median > grpc_best.1 {
            grpc_best = (batch, g.median);
        }
        println!(
            "| {batch} | {o} | {g} | {:.2} | {} | {} | {} |",
            g.median / o.median,
            us(stat(ort_cpu).median),
            us(dc),
            us(cc)
        );
    }
    let mut single = Vec::new();
    let mut lat = Vec::new();
    let mut single_cpu = Vec::new();
    for _ in 0..runs {
        let r = d.embed_rate(name, &png_inputs, EMBED_IMAGES, 1, 64).await?;
        single.push(r.rate);
        lat.push((r.p50, r.p99));
        single_cpu.push(r.cpu_us());
    }
    lat.sort();
    let (p50, p99) = lat[lat.len() / 2];
    let s1: Stat = stat(single);
    let (sd, sc) = median_pair(single_cpu);
    // The same best batch with preprocessed tensors instead of PNGs: what decoding costs.
    let mut raw_rates = Vec::new();
    let mut raw_cpu = Vec::new();
    for _ in 0..runs {
        let r = d
            .embed_rate(name, &tensor_inputs, EMBED_IMAGES, grpc_best.0, 2)
            .await?;
        raw_rates.push(r.rate);
        raw_cpu.push(r.cpu_us());
    }
    let raw_stat = stat(raw_rates);
    let (rd, rc) = median_pair(raw_cpu);
    println!(
        "\nBatch {}, preprocessed tensors instead of PNGs over gRPC: {raw_stat} images/s, {:.2}x the best in-process batch (PNGs: {:.2}x); daemon CPU {} µs/image, client CPU {} µs/image",
        grpc_best.0,
        raw_stat.median / inproc_best.1,
        grpc_best.1 / inproc_best.1,
        us(rd),
        us(rc)
    );
    println!();
    println!(
        "64 concurrent clients, one image per request: {s1} images/s (p50 {:.2} ms, p99 {:.2} ms), {:.2}x the best in-process batch ({} at batch {}); daemon CPU {} µs/image, client CPU {} µs/image\n",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        s1.median / inproc_best.1,
        inproc_best.1 as u64,
        inproc_best.0,
        us(sd),
        us(sc)
    );
    drop(session);
    Ok(())
}

/// Medians of each half of (daemon, client) pairs.
fn median_pair(xs: Vec<(f64, f64)>) -> (f64, f64) {
    let (a, b): (Vec<f64>, Vec<f64>) = xs.into_iter().unzip();
    (stat(a).median, stat(b).median)
}
