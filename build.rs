//! Build steps:
//! 1. Compile proto/likeness/v1/likeness.proto with protox (pure Rust, so no protoc on any
//!    machine) and write the encoded descriptor set that server reflection serves.
//! 2. Find the ONNX Runtime shared library the embedders load at run time (ort's
//!    `load-dynamic`): LIKENESS_ORT_DYLIB or ORT_DYLIB_PATH when set; otherwise the CPU
//!    library from the official onnxruntime wheel, fetched once with pip into a cache
//!    outside target/, checked against a pinned sha256. Its path is compiled in as the
//!    default, so the binary finds it on the machine that built it without env vars.

use std::path::{Path, PathBuf};
use std::process::Command;

use prost::Message;

const ORT_VERSION: &str = "1.31.1";
/// sha256 of onnxruntime/capi/libonnxruntime.so.1.31.1 in the onnxruntime 1.31.1 wheel
/// for linux x86_64.
const ORT_SHA256: &str = "fc44112fbe06d7d689c57e11d3862031f64711007e4ee020f8eed5185fd2c1d3";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/likeness/v1/likeness.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("likeness_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;

    let ort = onnxruntime_library()?;
    println!(
        "cargo:rustc-env=LIKENESS_ORT_DYLIB_DEFAULT={}",
        ort.display()
    );
    Ok(())
}

fn onnxruntime_library() -> Result<PathBuf, Box<dyn std::error::Error>> {
    for var in ["LIKENESS_ORT_DYLIB", "ORT_DYLIB_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
        if let Ok(p) = std::env::var(var)
            && !p.is_empty()
        {
            return Ok(PathBuf::from(p));
        }
    }
    println!("cargo:rerun-if-env-changed=LIKENESS_CACHE_DIR");
    let cache = match std::env::var("LIKENESS_CACHE_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => {
            let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
            Path::new(&home).join(".cache").join("likeness")
        }
    }
    .join(format!("onnxruntime-{ORT_VERSION}"));
    let lib = cache.join(format!("libonnxruntime.so.{ORT_VERSION}"));
    if lib.exists() && sha256(&lib)? == ORT_SHA256 {
        return Ok(lib);
    }
    std::fs::create_dir_all(&cache)?;
    let wheels = cache.join("wheel");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"])
        .arg(format!("onnxruntime=={ORT_VERSION}"))
        .arg("-d")
        .arg(&wheels)
        .status()
        .map_err(|e| format!("running python3 -m pip to fetch ONNX Runtime: {e}; set LIKENESS_ORT_DYLIB to a libonnxruntime.so instead"))?;
    if !status.success() {
        return Err(format!(
            "pip could not download onnxruntime=={ORT_VERSION}; set LIKENESS_ORT_DYLIB to a libonnxruntime.so instead"
        )
        .into());
    }
    let wheel = std::fs::read_dir(&wheels)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("onnxruntime-{ORT_VERSION}-")) && n.ends_with(".whl")
            })
        })
        .ok_or("pip left no onnxruntime wheel")?;
    // A wheel is a zip; take the one library out of it with Python's zipfile.
    let member = format!("onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}");
    let tmp = cache.join("libonnxruntime.tmp");
    let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(&wheel)
        .arg(&member)
        .arg(&tmp)
        .status()?;
    if !status.success() {
        return Err(format!("could not extract {member} from {}", wheel.display()).into());
    }
    let got = sha256(&tmp)?;
    if got != ORT_SHA256 {
        return Err(format!("{member}: sha256 {got}, expected {ORT_SHA256}").into());
    }
    std::fs::rename(&tmp, &lib)?;
    let _ = std::fs::remove_dir_all(&wheels);
    Ok(lib)
}

fn sha256(path: &Path) -> Result<String, Box<dyn std::error::Error>> {
    let out = Command::new("python3")
        .args(["-c", "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())"])
        .arg(path)
        .output()?;
    if !out.status.success() {
        return Err(format!("hashing {}", path.display()).into());
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}
