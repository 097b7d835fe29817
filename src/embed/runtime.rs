//! ONNX Runtime: the one process-wide environment, execution-provider choice, and
//! sessions checked against their manifests.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::ExecutionProvider;
use ort::session::Session;

use crate::error::{Error, Result};

/// Where inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// CUDA when the library and a GPU are there, otherwise CPU (with a WARN saying why).
    Auto,
    Cpu,
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("device {s:?}: use auto, cpu, cuda or cuda:N")),
        }
    }
}

/// How cuDNN picks a convolution algorithm on CUDA (ONNX Runtime's
/// `cudnn_conv_algo_search`). Exhaustive benchmarks every algorithm the first time each
/// input shape is seen, and dynamic batching sees up to `--embed-max-batch` shapes, each
/// paying that search on a live request; heuristic asks cuDNN for its best guess.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvSearch {
    Heuristic,
    Exhaustive,
    /// cuDNN's default algorithm, no search.
    Default,
}

impl std::str::FromStr for ConvSearch {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "heuristic" => Ok(ConvSearch::Heuristic),
            "exhaustive" => Ok(ConvSearch::Exhaustive),
            "default" => Ok(ConvSearch::Default),
            _ => Err(format!(
                "cuda conv search {s:?}: use heuristic, exhaustive or default"
            )),
        }
    }
}

impl ConvSearch {
    fn ort(self) -> ort::ep::cuda::ConvAlgorithmSearch {
        match self {
            ConvSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
            ConvSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
            ConvSearch::Default => ort::ep::cuda::ConvAlgorithmSearch::Default,
        }
    }
}

/// The ONNX Runtime library: LIKENESS_ORT_DYLIB, ORT_DYLIB_PATH, or the one the build
/// fetched (compiled in).
pub fn library_path() -> PathBuf {
    for var in ["LIKENESS_ORT_DYLIB", "ORT_DYLIB_PATH"] {
        if let Ok(p) = std::env::var(var)
            && !p.is_empty()
        {
            return PathBuf::from(p);
        }
    }
    PathBuf::from(env!("LIKENESS_ORT_DYLIB_DEFAULT"))
}

static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment (loaded once).
pub fn environment() -> Result<&'static ort::environment::Environment> {
    ENV.get_or_init(|| {
        let path = library_path();
        let env = ort::init_from(&path)
            .map_err(|e| format!("cannot load ONNX Runtime from {}: {e}", path.display()))?
            .with_name("likeness")
            .build()
            .map_err(|e| format!("ONNX Runtime environment: {e}"))?;
        tracing::info!(library = %path.display(), "loaded ONNX Runtime");
        Ok(env)
    })
    .as_ref()
    .map_err(|e| Error::Model(e.clone()))
}

/// What a graph must look like: its inputs (name, shape without the batch axis; -1 where
/// the dimension must be dynamic), and its output.
pub struct GraphCheck<'a> {
    pub inputs: Vec<(&'a str, Vec<i64>)>,
    pub output: &'a str,
    /// Values per row of the output.
    pub width: i64,
    /// A score per pair: the output may also be 1-D, [batch].
    pub score: bool,
}

/// Opens a session on `device` with `threads` intra-op threads (and `conv` on CUDA) and
/// checks it against `check`; returns it with the execution provider it really runs on.
pub fn open_session(
    file: &Path,
    check: &GraphCheck<'_>,
    device: Device,
    conv: ConvSearch,
    threads: usize,
    spin: bool,
) -> Result<(Session, &'static str)> {
    let env = environment()?;
    let ort_err = |e: ort::Error| Error::Model(format!("{}: {e}", file.display()));
    let mut builder = Session::builder(env)
        .map_err(ort_err)?
        .with_intra_threads(threads.max(1))
        .map_err(|e| Error::Model(format!("{}: {e}", file.display())))?
        .with_intra_op_spinning(spin)
        .map_err(|e| Error::Model(format!("{}: {e}", file.display())))?;
    let mut provider = "CPUExecutionProvider";
    let cuda_id = match device {
        Device::Cpu => None,
        Device::Cuda(id) => Some(id),
        Device::Auto => Some(0),
    };
    if let Some(id) = cuda_id {
        let cuda = ort::ep::CUDA::default()
            .with_device_id(id)
            .with_conv_algorithm_search(conv.ort());
        let available = ort::ep::CUDA::is_available().unwrap_or(false);
        if available {
            match builder.with_execution_providers([cuda.build().error_on_failure()]) {
                Ok(b) => {
                    builder = b;
                    provider = "CUDAExecutionProvider";
                }
                Err(e) => {
                    if device != Device::Auto {
                        return Err(Error::Model(format!("CUDA device {id}: {e}")));
                    }
                    tracing::warn!(error = %e, "CUDA provider could not start; running on CPU");
                    builder = e.recover();
                }
            }
        } else if device == Device::Auto {
            tracing::warn!(
                "CUDA is not available in this ONNX Runtime build or machine; running on CPU"
            );
        } else {
            return Err(Error::Model(format!(
                "--device cuda:{id}: this ONNX Runtime ({}) has no CUDA provider",
                library_path().display()
            )));
        }
    }
    let session = builder.commit_from_file(file).map_err(ort_err)?;
    check_graph(&session, file, check)?;
    Ok((session, provider))
}

/// The manifest must agree with the graph: names, element types, fixed dimensions.
fn check_graph(session: &Session, file: &Path, check: &GraphCheck<'_>) -> Result<()> {
    let bad = |why: String| {
        Err(Error::Model(format!(
            "{} vs its manifest: {why}",
            file.display()
        )))
    };
    for (name, want) in &check.inputs {
        let Some(input) = session.inputs().iter().find(|i| i.name() == *name) else {
            let names: Vec<_> = session
                .inputs()
                .iter()
                .map(|i| i.name().to_string())
                .collect();
            return bad(format!("no input {name:?} (the graph has {names:?})"));
        };
        let Some(shape) = input.dtype().tensor_shape() else {
            return bad(format!("input {name:?} is not a tensor"));
        };
        let dims: Vec<i64> = shape.iter().copied().collect();
        let implied = || {
            let w: Vec<String> = want
                .iter()
                .map(|d| {
                    if *d < 0 {
                        "dynamic".into()
                    } else {
                        d.to_string()
                    }
                })
                .collect();
            format!("[batch, {}]", w.join(", "))
        };
        if dims.len() != want.len() + 1 {
            return bad(format!(
                "input {name:?} has shape {dims:?}, the manifest implies {}",
                implied()
            ));
        }
        for (g, w) in dims[1..].iter().zip(want) {
            let fits = if *w < 0 { *g < 0 } else { *g < 0 || g == w };
            if !fits {
                return bad(format!(
                    "input {name:?} has shape {dims:?}, the manifest implies {}{}",
                    implied(),
                    if *w < 0 {
                        " (resize = \"keep\" needs dynamic height and width)"
                    } else {
                        ""
                    }
                ));
            }
        }
        if input.dtype().tensor_type() != Some(ort::value::TensorElementType::Float32) {
            return bad(format!("input {name:?} must be float32"));
        }
    }
    let Some(output) = session.outputs().iter().find(|o| o.name() == check.output) else {
        let names: Vec<_> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        return bad(format!(
            "no output {:?} (the graph has {names:?})",
            check.output
        ));
    };
    let Some(out_shape) = output.dtype().tensor_shape() else {
        return bad(format!("output {:?} is not a tensor", check.output));
    };
    let out: Vec<i64> = out_shape.iter().copied().collect();
    let fits = match out.len() {
        1 => check.score,
        2 => out[1] < 0 || out[1] == check.width,
        _ => false,
    };
    if !fits {
        return bad(format!(
            "output {:?} has shape {out:?}, expected [batch, {}]{}",
            check.output,
            check.width,
            if check.score { " or [batch]" } else { "" }
        ));
    }
    if output.dtype().tensor_type() != Some(ort::value::TensorElementType::Float32) {
        return bad(format!("output {:?} must be float32", check.output));
    }
    Ok(())
}
