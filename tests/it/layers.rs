//! Dependencies point one way (issue 20): every `crate::` path in the library names a
//! module of a lower layer than its own, so the circle that grew once (the store
//! importing the app through metrics) cannot come back unseen. Reads src/ as text.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The library's top-level modules, lowest first. A module may use those of lower
/// layers only; modules of one layer do not use each other.
const LAYERS: &[&[&str]] = &[
    &["error", "types", "rng", "metrics", "memory"],
    &["pool", "synth", "store", "index", "embed"],
    &["collections"],
    &["judge", "mine"],
    &["activation"],
    &["app"],
    &["exporter", "config"],
    &["grpc"],
    &["daemon", "cli"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// The source without comments and string literals, so that prose and messages that
/// mention a path are not taken for uses.
fn code_only(text: &str) -> String {
    let (mut out, mut chars) = (String::with_capacity(text.len()), text.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut last = ' ';
                for c in chars.by_ref() {
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if !escaped && c == '"' {
                        break;
                    }
                    escaped = !escaped && c == '\\';
                }
                out.push_str("\"\"");
            }
            // A char literal ('"', '\''), not a lifetime: skip it whole.
            '\'' => {
                let rest: String = chars.clone().take(3).collect();
                if rest.starts_with('\\') || rest.chars().nth(1) == Some('\'') {
                    for c in chars.by_ref() {
                        if c == '\'' && !out.ends_with('\\') {
                            break;
                        }
                        out.push(' ');
                    }
                } else {
                    out.push(c);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// The top-level modules a file's code names: `crate::x`, the names of a grouped
/// `use crate::{x, y::z}`, and `super::` paths that climb out of the file's module.
fn uses(code: &str, module_path: &[String]) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `likeness_crate::` or `$crate::` are not this crate's paths.
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        found.insert(ident(group[start..j].trim()));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    // `super::` from a/b/c.rs (module a::b::c): one climbs to a::b, two to a, three to
    // the root, from where the next name is a top-level module.
    let mut rest = code;
    while let Some(i) = rest.find("super::") {
        let before = rest[..i].chars().last();
        rest = &rest[i..];
        let mut climbs = 0;
        while let Some(r) = rest.strip_prefix("super::") {
            climbs += 1;
            rest = r;
        }
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // Inline modules (`mod tests`) climb once more than their file: a name that is
        // no top-level module was such a climb within the file's own module.
        let name = ident(rest);
        if climbs >= module_path.len() && rank(&name).is_some() {
            found.insert(name);
        }
    }
    found.retain(|m| !m.is_empty() && m != "self");
    found
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            // The benchmark harness is a binary of its own, outside the library.
            if path.file_name().is_some_and(|n| n != "bin") {
                sources(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// src/a/b.rs -> [a, b]; src/a/mod.rs -> [a]; lib.rs and main.rs -> none.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts.len() == 1 && (parts[0] == "lib" || parts[0] == "main") {
        parts.clear();
    }
    parts
}

/// Every edge between two top-level modules, with a file that makes it.
fn edges(src: &Path) -> BTreeMap<(String, String), String> {
    let mut files = Vec::new();
    sources(src, &mut files);
    let mut edges = BTreeMap::new();
    for file in files {
        let path = module_path(src, &file);
        let Some(own) = path.first() else { continue };
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        for used in uses(&code, &path) {
            if &used != own {
                let shown = file.strip_prefix(src).unwrap().display().to_string();
                edges.entry((own.clone(), used)).or_insert(shown);
            }
        }
    }
    edges
}

fn violations(edges: &BTreeMap<(String, String), String>) -> Vec<String> {
    let mut bad = Vec::new();
    for ((from, to), file) in edges {
        match (rank(from), rank(to)) {
            (Some(a), Some(b)) if b < a => {}
            (None, _) => bad.push(format!("{from} ({file}) is in no layer: add it to LAYERS")),
            (_, None) => bad.push(format!("{to} (used by {file}) is in no layer")),
            _ => bad.push(format!("{from} uses {to} ({file}), which is not below it")),
        }
    }
    bad
}

#[test]
fn every_module_uses_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let edges = edges(&src);
    // The check reads what it should: the app's uses are there, and the layering of
    // lib.rs's modules is complete.
    assert!(edges.contains_key(&("app".into(), "collections".into())));
    assert!(edges.contains_key(&("store".into(), "metrics".into())));
    let bad = violations(&edges);
    assert!(bad.is_empty(), "layering broken:\n{}", bad.join("\n"));
}

/// The integration tests share helpers through `common` only: a test module that
/// imports another's helpers ties the two together (issue 20).
#[test]
fn test_modules_share_helpers_through_common_only() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it");
    let mut files = Vec::new();
    sources(&dir, &mut files);
    let mut bad = Vec::new();
    let mut seen_common = false;
    for file in files {
        let rel = file.strip_prefix(&dir).unwrap().display().to_string();
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        // The rank check does not apply here: every name counts.
        let mut rest = code.as_str();
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == "common" {
                seen_common = true;
            } else if !rel.starts_with("common") {
                bad.push(format!("{rel} uses crate::{name}"));
            }
        }
    }
    assert!(seen_common, "the check found no use of common at all");
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

#[test]
fn the_check_sees_a_circle_and_the_forms_of_a_path() {
    let path = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let code = code_only(
        "use crate::{app::App, judge::{self, Decision}};\n\
         // crate::grpc in a comment\n\
         let s = \"crate::daemon in a string\";\n\
         let c = '\"'; let t = crate::exporter::render(x);\n\
         use super::super::mine::Miner; use super::catalogue::Tags;",
    );
    let found = uses(&code, &path(&["collections", "write"]));
    assert_eq!(
        found,
        ["app", "exporter", "judge", "mine"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    // The circle this issue broke: metrics rendered the app, which the store reached.
    let mut circle = BTreeMap::new();
    circle.insert(("store".into(), "metrics".into()), "store/commit.rs".into());
    circle.insert(("metrics".into(), "app".into()), "metrics.rs".into());
    let bad = violations(&circle);
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].starts_with("metrics uses app"), "{bad:?}");
}
