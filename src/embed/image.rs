//! Image inputs: decode (PNG, JPEG, WebP, BMP, the first frame of a GIF), refuse
//! decompression bombs, convert to the tower's channels, resize and normalise into the
//! CHW f32 layout the ONNX graph takes.

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader};

use super::manifest::{ImageSpec, Resize};

/// The most pixels a decoded image may have (a 64 MiB RGBA buffer); larger is refused
/// before any of it is allocated.
pub const MAX_PIXELS: u64 = 16 << 20;

/// Decodes and preprocesses one image into `channels * height * width` values; returns
/// them with the height and width (the spec's, or the image's own with `resize = "keep"`).
pub fn preprocess(bytes: &[u8], spec: &ImageSpec) -> Result<(Vec<f32>, u32, u32), String> {
    if bytes.is_empty() {
        return Err("empty image".into());
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable image: {e}"))?;
    if reader.format().is_none() {
        return Err("not an image in a supported format (PNG, JPEG, WebP, BMP, GIF)".into());
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| format!("undecodable image: {e}"))?;
    if w == 0 || h == 0 {
        return Err("zero-size image".into());
    }
    if u64::from(w) * u64::from(h) > MAX_PIXELS {
        return Err(format!("{w}x{h} pixels exceed the limit of {MAX_PIXELS}"));
    }
    let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("unreadable image: {e}"))?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 4);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| format!("undecodable image: {e}"))?;
    Ok(tensor(&img, spec))
}

/// The size a `w` x `h` image is brought to: the spec's, or with `resize = "keep"` its
/// own, scaled down (aspect kept) when it exceeds the spec's height or width.
pub fn target_size(w: u32, h: u32, spec: &ImageSpec) -> (u32, u32) {
    if spec.resize != Resize::Keep {
        return (spec.width, spec.height);
    }
    if w <= spec.width && h <= spec.height {
        return (w, h);
    }
    let scale = (f64::from(spec.width) / f64::from(w)).min(f64::from(spec.height) / f64::from(h));
    let fit = |v: u32, max: u32| ((f64::from(v) * scale).round() as u32).clamp(1, max);
    (fit(w, spec.width), fit(h, spec.height))
}

/// Resizes and normalises a decoded image; returns the values, height and width.
pub fn tensor(img: &DynamicImage, spec: &ImageSpec) -> (Vec<f32>, u32, u32) {
    let filter = match spec.resize {
        Resize::Bilinear | Resize::Keep => FilterType::Triangle,
        Resize::Nearest => FilterType::Nearest,
    };
    let (w, h) = target_size(img.width(), img.height(), spec);
    let plane = (w * h) as usize;
    let mut out = vec![0f32; plane * spec.channels as usize];
    if spec.channels == 1 {
        let mut g = img.to_luma8();
        if g.dimensions() != (w, h) {
            g = image::imageops::resize(&g, w, h, filter);
        }
        for (o, p) in out.iter_mut().zip(g.pixels()) {
            *o = (f32::from(p.0[0]) / 255.0 - spec.mean[0]) / spec.std[0];
        }
    } else {
        let mut rgb = img.to_rgb8();
        if rgb.dimensions() != (w, h) {
            rgb = image::imageops::resize(&rgb, w, h, filter);
        }
        for (i, p) in rgb.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (f32::from(p.0[c]) / 255.0 - spec.mean[c]) / spec.std[c];
            }
        }
    }
    (out, h, w)
}
