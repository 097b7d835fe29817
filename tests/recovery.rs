//! Recovery and group commit, through the library API (the daemon's core without gRPC).

mod common;

use std::sync::{Arc, Barrier};

use common::clustered;
use likeness::Config;
use likeness::db::{CreateCollection, Db};
use likeness::types::{ItemData, Metric, QueryTarget, SearchParams};

fn open(dir: &std::path::Path) -> (Db, Vec<likeness::db::Recovered>) {
    let mut config = Config::with_data_dir(dir);
    config.cache_mb = 32;
    let db = Db::open(&config).unwrap();
    let report = db.recover().unwrap();
    (db, report)
}

fn items(from: usize, n: usize, dim: usize) -> Vec<ItemData> {
    let (vectors, labels) = clustered(n, dim, 10, 0.2, from as u64 + 1);
    vectors
        .into_iter()
        .zip(labels)
        .enumerate()
        .map(|(i, (vector, l))| ItemData {
            id: format!("i{}", from + i),
            label: format!("L{l}"),
            vector,
            ..Default::default()
        })
        .collect()
}

fn create(db: &Db, name: &str, dim: u32) {
    db.create_collection(CreateCollection {
        name: name.into(),
        dimension: dim,
        metric: Some(Metric::Cosine),
        ..Default::default()
    })
    .unwrap();
}

#[test]
fn snapshot_is_used_only_when_it_matches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, report) = open(dir.path());
        assert!(report.is_empty());
        create(&db, "a", 8);
        db.upsert("a", items(0, 500, 8)).unwrap();
        db.shutdown().unwrap();
    }
    {
        let (db, report) = open(dir.path());
        assert_eq!(report.len(), 1);
        assert!(report[0].from_snapshot, "clean shutdown: snapshot loaded");
        assert_eq!(report[0].items, 500);
        // Writes after the snapshot, then a crash (no shutdown): the snapshot is stale.
        db.upsert("a", items(500, 100, 8)).unwrap();
        db.delete_items("a", &["i3".to_string()]).unwrap();
    }
    {
        let (db, report) = open(dir.path());
        assert!(
            !report[0].from_snapshot,
            "stale snapshot must not be loaded"
        );
        let coll = db.collection("a").unwrap();
        assert_eq!(coll.len(), 599);
        assert_eq!(coll.index_len(), 599, "index matches the store exactly");
        let hits = db
            .search(
                "a",
                &QueryTarget::Id("i4".into()),
                &SearchParams {
                    k: 600,
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(hits.len(), 598);
        assert!(hits.iter().all(|h| h.id != "i3"));
        db.shutdown().unwrap();
    }
    // A corrupt snapshot file is rebuilt around, not trusted.
    let snap = dir.path().join("index").join("a.usearch");
    let len = std::fs::metadata(&snap).unwrap().len();
    std::fs::write(&snap, vec![7u8; len as usize / 2]).unwrap();
    let (db, report) = open(dir.path());
    assert!(!report[0].from_snapshot);
    assert_eq!(db.collection("a").unwrap().index_len(), 599);
}

#[test]
fn deleted_collection_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, _) = open(dir.path());
        create(&db, "gone", 4);
        db.upsert("gone", items(0, 50, 4)).unwrap();
        db.shutdown().unwrap();
    }
    {
        let (db, _) = open(dir.path());
        assert_eq!(db.delete_collection("gone").unwrap(), 50);
        assert!(!dir.path().join("index/gone.usearch").exists());
        create(&db, "gone", 4);
    }
    let (db, report) = open(dir.path());
    assert_eq!(report.len(), 1);
    assert_eq!(
        db.collection("gone").unwrap().len(),
        0,
        "the new collection starts empty"
    );
}

#[test]
fn concurrent_writers_are_all_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "g", 8);
    let db = Arc::new(db);
    let writers = 32;
    let before = db.flushes();
    let barrier = Arc::new(Barrier::new(writers));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let db = db.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                db.upsert("g", items(w * 10, 10, 8)).unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let flushes = db.flushes() - before;
    println!("{writers} acknowledged upserts, {flushes} flushes");
    // Whether flushes are shared here depends on timing (src/store/commit.rs tests the
    // sharing itself with a slow flush); what must hold is that each write was flushed.
    assert!((1..=writers as u64).contains(&flushes));
    assert_eq!(db.collection("g").unwrap().len(), writers * 10);
}

#[test]
fn concurrent_writers_to_the_same_ids_leave_index_and_store_agreeing() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "race", 8);
    let db = Arc::new(db);
    let writers = 8;
    let barrier = Arc::new(Barrier::new(writers));
    let handles: Vec<_> = (0..writers)
        .map(|w| {
            let (db, barrier) = (db.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for round in 0..10 {
                    // Everyone writes the same 100 ids; some rounds delete a few.
                    let mut batch = items(round * 100, 100, 8);
                    for (i, it) in batch.iter_mut().enumerate() {
                        it.id = format!("shared{i}");
                        it.label = format!("w{w}r{round}");
                    }
                    db.upsert("race", batch).unwrap();
                    if (w + round) % 4 == 0 {
                        let ids: Vec<String> =
                            (0..10).map(|i| format!("shared{}", i * 7)).collect();
                        db.delete_items("race", &ids).unwrap();
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let coll = db.collection("race").unwrap();
    assert_eq!(
        coll.index_len(),
        coll.len(),
        "index size equals the catalogue's"
    );
    let ids: Vec<String> = (0..100).map(|i| format!("shared{i}")).collect();
    let stored = db.get_items("race", &ids, false, false).unwrap();
    assert_eq!(stored.len(), coll.len());
    // Every stored item is found by search with its stored label: no stale copies.
    let hits = db
        .search(
            "race",
            &QueryTarget::Vector(vec![1.0; 8]),
            &SearchParams {
                k: 100,
                expansion: 200,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(hits.len(), stored.len());
    for item in &stored {
        let hit = hits
            .iter()
            .find(|h| h.id == item.id)
            .expect("stored item is searchable");
        assert_eq!(
            hit.label, item.label,
            "search shows the stored version of {}",
            item.id
        );
    }
    // And a restart without a snapshot rebuilds the same state.
    drop(coll);
    drop(db);
    let (db, report) = open(dir.path());
    assert!(!report[0].from_snapshot);
    assert_eq!(db.collection("race").unwrap().len(), stored.len());
}
