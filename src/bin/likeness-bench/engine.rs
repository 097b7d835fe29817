//! The engine without gRPC: the collections registry in this process, loaded with the
//! same items and searched from `threads` threads. The one place the bench reaches into
//! the library's core; its API is younger than the wire protocol's.

use std::time::Instant;

use crate::data::Data;
use crate::procfs::Meter;

/// What the search table calls this figure.
pub const NAME: &str = "Collection::search";

/// `runs` runs of `total` searches (k = 10) round-robin over `queries`:
/// (queries/s, this process's CPU µs per query) for each.
pub fn search_qps(
    data: &Data,
    queries: &[Vec<f32>],
    total: usize,
    threads: usize,
    runs: usize,
) -> Result<Vec<(f64, f64)>, String> {
    use likeness::collections::{CreateCollection, Registry, Settings};
    use likeness::error::Field;
    use likeness::types::{ItemData, QueryTarget, SearchParams};
    let dir = crate::reference::temp_dir("engine")?;
    let mut settings = Settings::new(&dir);
    settings.index_threads = threads;
    settings.cache_bytes = 512 << 20; // the daemon's default --cache-mb
    let registry = Registry::open(settings).map_err(|e| e.to_string())?;
    registry.recover().map_err(|e| e.to_string())?;
    registry
        .create(CreateCollection {
            name: "bench".into(),
            dimension: data.dim as u32,
            metric: Some(data.metric),
            ..Default::default()
        })
        .map_err(|e| e.to_string())?;
    let coll = registry.collection("bench").map_err(|e| e.to_string())?;
    for chunk in data.items.chunks(1000) {
        let batch: Vec<ItemData> = chunk
            .iter()
            .map(|it| ItemData {
                id: it.id.clone(),
                label: it.label.clone(),
                metadata: Default::default(),
                vector: it.vector.clone(),
                input: None,
                generation: 0,
            })
            .collect();
        registry.upsert(&coll, &batch).map_err(|e| e.to_string())?;
    }
    let params = SearchParams {
        k: 10,
        ..Default::default()
    };
    let field = Field::name("query");
    let mut out = Vec::new();
    for _ in 0..runs {
        let cpu = Meter::start(None);
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..threads {
                let (coll, params, field) = (&coll, &params, &field);
                s.spawn(move || {
                    let mut i = t;
                    while i < total {
                        let q = QueryTarget::Vector(queries[i % queries.len()].clone());
                        let _ = coll.search(field, &q, params);
                        i += threads;
                    }
                });
            }
        });
        let qps = total as f64 / start.elapsed().as_secs_f64();
        out.push((qps, cpu.stop().client * 1e6 / total as f64));
    }
    drop(coll);
    drop(registry);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
