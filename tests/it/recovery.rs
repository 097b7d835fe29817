//! Recovery, group commit and stream transactions, through the library API (the
//! daemon's core without gRPC).

use std::sync::{Arc, Barrier};

use crate::common::store::{create, items, open};
use likeness::collections::Registry;
use likeness::error::Field;
use likeness::types::{ItemData, QueryTarget, SearchParams};

fn upsert(db: &Registry, name: &str, items: Vec<ItemData>) {
    db.upsert(&db.collection(name).unwrap(), &items).unwrap();
}

fn delete(db: &Registry, name: &str, ids: &[String]) {
    db.delete_items(&db.collection(name).unwrap(), ids).unwrap();
}

fn search(db: &Registry, name: &str, q: QueryTarget, p: SearchParams) -> Vec<likeness::types::Hit> {
    db.collection(name)
        .unwrap()
        .search(&Field::name("query"), &q, &p)
        .unwrap()
}

#[test]
fn snapshot_is_used_only_when_it_matches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (db, report) = open(dir.path());
        assert!(report.is_empty());
        create(&db, "a", 8);
        upsert(&db, "a", items(0, 500, 8));
        db.shutdown().unwrap();
    }
    {
        let (db, report) = open(dir.path());
        assert_eq!(report.len(), 1);
        assert!(report[0].from_snapshot, "clean shutdown: snapshot loaded");
        assert_eq!(report[0].items, 500);
        // Writes after the snapshot, then a crash (no shutdown): the snapshot is stale.
        upsert(&db, "a", items(500, 100, 8));
        delete(&db, "a", &["i3".to_string()]);
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
        let hits = search(
            &db,
            "a",
            QueryTarget::Id("i4".into()),
            SearchParams {
                k: 600,
                ..Default::default()
            },
        );
        assert_eq!(hits.len(), 598);
        assert!(hits.iter().all(|h| h.id != "i3"));
        db.shutdown().unwrap();
    }
    // A torn catalogue file is not trusted: the catalogue comes from the store.
    let cat = dir.path().join("index").join("a.catalogue");
    let mut bytes = std::fs::read(&cat).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&cat, &bytes).unwrap();
    {
        let (db, report) = open(dir.path());
        let coll = db.collection("a").unwrap();
        assert_eq!(coll.len(), 599);
        assert_eq!(
            coll.get_items(&["i4".to_string()], false, false)
                .unwrap()
                .len(),
            1
        );
        assert!(coll.audit_index().unwrap().is_exact());
        assert!(
            report[0].from_snapshot,
            "the index file itself is still good"
        );
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
        upsert(&db, "gone", items(0, 50, 4));
        db.shutdown().unwrap();
    }
    {
        let (db, _) = open(dir.path());
        assert_eq!(db.delete("gone").unwrap(), 50);
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

/// Every acknowledged upsert of 32 concurrent writers is on disk when acknowledged: a
/// copy of the data dir taken right after the acks (what a kill -9 would leave) opens
/// with every item and vector in it.
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
                upsert(&db, "g", items(w * 10, 10, 8));
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
    // The on-disk state as it stands, with the daemon still running and nothing
    // flushed by a shutdown: copy it and open the copy.
    let copy = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), copy.path());
    let (reopened, _) = open(copy.path());
    let coll = reopened.collection("g").unwrap();
    assert_eq!(coll.len(), writers * 10);
    for w in 0..writers {
        let want = items(w * 10, 10, 8);
        let ids: Vec<String> = want.iter().map(|i| i.id.clone()).collect();
        let got = coll.get_items(&ids, true, false).unwrap();
        assert_eq!(got.len(), 10, "writer {w}'s acknowledged items");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.vector, w.vector, "{}", w.id);
        }
    }
    drop(db);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else if entry.file_name() != "db.lock" {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
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
                    upsert(&db, "race", batch);
                    if (w + round) % 4 == 0 {
                        let ids: Vec<String> =
                            (0..10).map(|i| format!("shared{}", i * 7)).collect();
                        delete(&db, "race", &ids);
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
    let stored = coll.get_items(&ids, false, false).unwrap();
    assert_eq!(stored.len(), coll.len());
    // Every stored item is found by search with its stored label: no stale copies.
    let hits = search(
        &db,
        "race",
        QueryTarget::Vector(vec![1.0; 8]),
        SearchParams {
            k: 100,
            expansion: 200,
            ..Default::default()
        },
    );
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
