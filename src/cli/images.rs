//! The image files a command names: folders expanded into their images, sorted by
//! name; and the chunks of them one Embed call carries.

use std::path::{Path, PathBuf};

use crate::grpc::pb;

/// A folder stands for its files with these extensions (in any case).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "gif"];

/// Image bytes per Embed call: half the daemon's default 64 MiB message limit, so that
/// a folder of large photos still goes through in several calls.
const MAX_CALL_BYTES: u64 = 32 << 20;

/// Expands folders into their image files (sorted by name); files stay as given, in
/// order. Every path must exist, and a folder must hold at least one image.
pub fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        let named = |e: std::io::Error| format!("{}: {e}", path.display());
        if !std::fs::metadata(path).map_err(named)?.is_dir() {
            files.push(path.clone());
            continue;
        }
        let mut found = Vec::new();
        for entry in std::fs::read_dir(path).map_err(named)? {
            let entry = entry.map_err(named)?.path();
            let is_image = entry
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && entry.is_file() {
                found.push(entry);
            }
        }
        if found.is_empty() {
            return Err(format!(
                "{}: no image files in this folder (looked for .{})",
                path.display(),
                IMAGE_EXTENSIONS.join(", .")
            ));
        }
        found.sort();
        files.extend(found);
    }
    Ok(files)
}

pub(super) fn read_file(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

pub(super) fn image_input(bytes: Vec<u8>) -> pb::Input {
    pb::Input {
        kind: Some(pb::input::Kind::Image(bytes)),
        tower: String::new(),
    }
}

/// The files for the next Embed call from `start`: at most `batch`, and at most
/// MAX_CALL_BYTES of them unless a single file is larger.
pub(super) fn next_chunk(
    files: &[PathBuf],
    start: usize,
    batch: usize,
) -> Result<Vec<pb::Input>, String> {
    let mut inputs = Vec::new();
    let mut bytes = 0u64;
    for path in files[start..].iter().take(batch) {
        let len = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if !inputs.is_empty() && bytes + len > MAX_CALL_BYTES {
            break;
        }
        bytes += len;
        inputs.push(image_input(read_file(path)?));
    }
    Ok(inputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_its_images_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.PNG", "a.jpg", "c.txt", "d.gif"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("e.png")).unwrap();
        let loose = dir.path().join("c.txt");
        let files = image_files(&[loose.clone(), dir.path().to_path_buf()]).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["c.txt", "a.jpg", "b.PNG", "d.gif"]);
        let err = image_files(&[dir.path().join("nope.png")]).unwrap_err();
        assert!(err.contains("nope.png"), "{err}");
        let empty = dir.path().join("e.png");
        assert!(
            image_files(&[empty])
                .unwrap_err()
                .contains("no image files")
        );
    }
}
