//! The core without gRPC: stream transactions that undo themselves (issue 7, hole 2),
//! the index audit the crash test relies on (hole 1), and the read view the miner
//! builds on (label index, vectors by key, batched kNN with exclusions and bounds).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::store::{create, items, open};
use likeness::collections::{KnnOptions, KnnQuery, Registry};
use likeness::error::Field;
use likeness::types::{Filter, QueryTarget, SearchParams};

fn ids(n: usize, from: usize) -> Vec<String> {
    (from..from + n).map(|i| format!("i{i}")).collect()
}

/// Polls until `f` holds (a rollback runs on a thread of its own), 10 s at most.
fn eventually(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The base state: 100 committed items; the stream then replaces i0..i49 and adds
/// i100..i149. Undone, exactly the base must remain, with the base's vectors.
fn stage_half(db: &Registry) -> likeness::collections::StreamTxn {
    let coll = db.collection("s").unwrap();
    let txn = db.begin_stream().unwrap();
    let mut replaced = items(1000, 50, 8);
    for (i, it) in replaced.iter_mut().enumerate() {
        it.id = format!("i{i}");
        it.label = "stream".into();
    }
    db.stage(&txn, &coll, &replaced).unwrap();
    db.stage(&txn, &coll, &items(100, 50, 8)).unwrap();
    assert_eq!(coll.len(), 150, "staged messages are visible before commit");
    txn
}

fn assert_base_only(db: &Registry) {
    let coll = db.collection("s").unwrap();
    assert_eq!(coll.len(), 100);
    assert_eq!(coll.index_len(), 100);
    let got = coll.get_items(&ids(150, 0), true, false).unwrap();
    let base = items(0, 100, 8);
    assert_eq!(got.len(), 100, "nothing of the stream remains");
    for (g, b) in got.iter().zip(&base) {
        assert_eq!((&g.id, &g.label, &g.vector), (&b.id, &b.label, &b.vector));
    }
    assert!(coll.audit_index().unwrap().is_exact());
}

fn base(dir: &std::path::Path) -> Registry {
    let (db, _) = open(dir);
    create(&db, "s", 8);
    db.upsert(&db.collection("s").unwrap(), &items(0, 100, 8))
        .unwrap();
    db
}

#[test]
fn a_dropped_stream_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = base(dir.path());
    drop(stage_half(&db));
    let coll = db.collection("s").unwrap();
    // The undo publishes to the catalogue, then drops the stream's keys from the index.
    eventually("rollback of a dropped stream", || {
        coll.len() == 100
            && coll.index_len() == 100
            && coll.get_items(&ids(1, 0), false, false).unwrap()[0].label != "stream"
    });
    assert_base_only(&db);
    // And durably: the undo was committed, so a crash now keeps the base.
    drop(coll);
    drop(db);
    let (db, _) = open(dir.path());
    assert_base_only(&db);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_task_panics_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(base(dir.path()));
    let task = {
        let db = db.clone();
        tokio::spawn(async move {
            let _txn = stage_half(&db);
            panic!("the handler panics mid-stream");
        })
    };
    assert!(task.await.unwrap_err().is_panic());
    let coll = db.collection("s").unwrap();
    eventually("rollback after a panic", || {
        coll.len() == 100
            && coll.index_len() == 100
            && coll.get_items(&ids(1, 0), false, false).unwrap()[0].label != "stream"
    });
    assert_base_only(&db);
}

#[test]
fn shutdown_rolls_back_an_open_stream_before_it_flushes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = base(dir.path());
        let txn = stage_half(&db);
        // The grace period ran out with the stream still open: shutdown undoes it.
        db.shutdown().unwrap();
        let coll = db.collection("s").unwrap();
        assert!(
            db.stage(&txn, &coll, &items(200, 5, 8)).is_err(),
            "no stage after shutdown"
        );
        assert!(txn.commit().is_err(), "no commit after shutdown");
    }
    let (db, report) = open(dir.path());
    assert!(report[0].from_snapshot);
    assert_base_only(&db);
}

#[test]
fn a_committed_stream_stays_and_a_rolled_back_one_goes() {
    let dir = tempfile::tempdir().unwrap();
    let db = base(dir.path());
    stage_half(&db).commit().unwrap();
    assert_eq!(db.collection("s").unwrap().len(), 150);
    drop(db);
    let (db, _) = open(dir.path());
    assert_eq!(db.collection("s").unwrap().len(), 150);
    drop(db);

    let dir = tempfile::tempdir().unwrap();
    let db = base(dir.path());
    stage_half(&db).rollback().unwrap();
    assert_base_only(&db);
}

#[test]
fn the_audit_sees_a_lost_index_entry() {
    let dir = tempfile::tempdir().unwrap();
    let db = base(dir.path());
    let coll = db.collection("s").unwrap();
    let audit = coll.audit_index().unwrap();
    assert!(audit.is_exact(), "{audit:?}");
    assert_eq!(audit.stored, 100);
    // Drop one entry from the index behind the store's back.
    assert!(coll.forget_in_index("i17").unwrap());
    let audit = coll.audit_index().unwrap();
    assert!(!audit.is_exact());
    assert_eq!(audit.missing.len(), 1);
    assert_eq!(audit.indexed, 99);
}

#[test]
fn the_read_view_serves_labels_vectors_and_batched_knn() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "v", 16);
    let coll = db.collection("v").unwrap();
    let data = items(0, 3000, 16);
    db.upsert(&coll, &data).unwrap();
    let g0 = coll.generation();
    assert!(g0 > 0);

    // Label index: every key of a label carries it, and the lists cover every item.
    let (labels, total) = {
        let c = coll.catalogue();
        let labels: Vec<_> = c.labels().collect();
        let mut total = 0;
        for l in &labels {
            for k in c.members(*l) {
                assert_eq!(c.get(*k).unwrap().label, *l);
            }
            total += c.members(*l).len();
        }
        (labels, total)
    };
    assert_eq!(total, 3000);
    assert!(labels.len() >= 5);

    // Vectors by key are the stored ones.
    let key = coll.catalogue().key_of("i42").unwrap();
    assert_eq!(coll.vector(key).unwrap().unwrap(), data[42].vector);

    // Batched kNN that excludes the query's own label and key, and a set of ids.
    let anchors: Vec<usize> = (0..200).map(|i| i * 13).collect();
    let banned: HashSet<u64> = {
        let c = coll.catalogue();
        (0..50)
            .map(|i| c.key_of(&format!("i{}", i * 7)).unwrap())
            .collect()
    };
    let queries: Vec<KnnQuery> = {
        let c = coll.catalogue();
        anchors
            .iter()
            .map(|a| {
                let key = c.key_of(&format!("i{a}")).unwrap();
                KnnQuery {
                    vector: data[*a].vector.clone(),
                    exclude_key: Some(key),
                    exclude_label: Some(c.get(key).unwrap().label),
                    min_distance: None,
                }
            })
            .collect()
    };
    let opts = KnnOptions {
        k: 10,
        expansion: 64,
        exclude_keys: banned.clone(),
        ..Default::default()
    };
    let r = coll.knn_batch(&queries, &opts).unwrap();
    assert_eq!(r.neighbours.len(), queries.len());
    assert!(r.generation >= g0);
    let metric = coll.spec().metric;
    let mut recall_hits = 0;
    for (q, found) in queries.iter().zip(&r.neighbours) {
        assert_eq!(found.len(), 10);
        for n in found {
            assert_ne!(
                Some(n.label),
                q.exclude_label,
                "the anchor's label is excluded"
            );
            assert!(!banned.contains(&n.key));
            let v = coll.vector(n.key).unwrap().unwrap();
            assert!((metric.distance(&q.vector, &v) - n.distance).abs() < 1e-3);
        }
        assert!(found.windows(2).all(|w| w[0].distance <= w[1].distance));
        // Exact nearest other-label neighbour, for recall.
        let c = coll.catalogue();
        let best = data
            .iter()
            .filter_map(|it| {
                let k = c.key_of(&it.id)?;
                let e = c.get(k)?;
                (Some(e.label) != q.exclude_label && !banned.contains(&k))
                    .then(|| (metric.distance(&q.vector, &it.vector), k))
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        recall_hits += usize::from(found.iter().any(|n| n.key == best.1));
    }
    assert!(
        recall_hits >= 190,
        "nearest negative found for {recall_hits}/200"
    );

    // Distance bounds: everything returned lies inside them.
    let d10 = r.neighbours[0][9].distance;
    let bounded = KnnOptions {
        k: 5,
        expansion: 64,
        min_distance: Some(d10),
        max_distance: Some(d10 * 1.5),
        ..Default::default()
    };
    let b = coll.knn_batch(&queries[..1], &bounded).unwrap();
    assert!(!b.neighbours[0].is_empty());
    for n in &b.neighbours[0] {
        assert!(
            n.distance >= d10 && n.distance <= d10 * 1.5,
            "{}",
            n.distance
        );
    }

    // A write moves the generation on, and the next kNN sees it.
    let mut fresh = items(5000, 1, 16);
    fresh[0].vector = data[anchors[0]].vector.iter().map(|x| x + 1e-4).collect();
    fresh[0].label = "fresh".into();
    db.upsert(&coll, &fresh).unwrap();
    let r2 = coll.knn_batch(&queries[..1], &opts).unwrap();
    assert!(r2.generation > r.generation);
    let fresh_key = coll.catalogue().key_of("i5000").unwrap();
    assert_eq!(r2.neighbours[0][0].key, fresh_key);
}

#[test]
fn a_selective_filter_is_answered_by_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "f", 16);
    let coll = db.collection("f").unwrap();
    let mut data = items(0, 4000, 16);
    // 40 items carry a rare label, spread through the data.
    for it in data.iter_mut().step_by(100) {
        it.label = "rare".into();
    }
    db.upsert(&coll, &data).unwrap();
    let p = SearchParams {
        k: 30,
        filter: Filter {
            labels: vec!["rare".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    let mut hits_total = 0;
    for q in 0..20 {
        let hits = coll
            .search(
                &Field::name("query"),
                &QueryTarget::Vector(data[q * 37].vector.clone()),
                &p,
            )
            .unwrap();
        assert_eq!(hits.len(), 30, "k hits whenever k items match");
        assert!(hits.iter().all(|h| h.label == "rare"));
        hits_total += hits.len();
    }
    assert_eq!(hits_total, 600);
    // usearch's filtered walk keeps going while its result set is short, so a 1%
    // filter is answered by the graph: no query paid for a scan of the store.
    let stats = coll.search_stats();
    let fallbacks = stats.fallbacks.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(fallbacks, 0);
}

/// A kNN whose distance floor rules out the nearest candidates grows its expansion
/// (counted) until k neighbours lie beyond the floor, instead of scanning the store.
#[test]
fn a_distance_floor_grows_the_knn_expansion() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "g", 16);
    let coll = db.collection("g").unwrap();
    let data = items(0, 5000, 16);
    db.upsert(&coll, &data).unwrap();
    let q = KnnQuery {
        vector: data[0].vector.clone(),
        ..Default::default()
    };
    let metric = coll.spec().metric;
    let mut d: Vec<f32> = data
        .iter()
        .map(|it| metric.distance(&q.vector, &it.vector))
        .collect();
    d.sort_by(f32::total_cmp);
    let floor = d[300];
    let opts = KnnOptions {
        k: 5,
        expansion: 16,
        min_distance: Some(floor),
        ..Default::default()
    };
    let r = coll.knn_batch(&[q], &opts).unwrap();
    assert_eq!(r.neighbours[0].len(), 5);
    assert!(r.neighbours[0].iter().all(|n| n.distance >= floor));
    assert_eq!(r.expanded, 1);
    assert_eq!(
        coll.search_stats()
            .expanded
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

/// The batched kNN split into chunks on the search pool answers exactly what one
/// sequential batch does, in query order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_knn_matches_the_sequential_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (db, _) = open(dir.path());
    create(&db, "p", 16);
    let coll = db.collection("p").unwrap();
    let data = items(0, 3000, 16);
    db.upsert(&coll, &data).unwrap();
    let queries: Vec<KnnQuery> = {
        let c = coll.catalogue();
        (0..257)
            .map(|i| {
                let key = c.key_of(&format!("i{}", i * 11)).unwrap();
                KnnQuery {
                    vector: data[i * 11].vector.clone(),
                    exclude_key: Some(key),
                    exclude_label: Some(c.get(key).unwrap().label),
                    min_distance: None,
                }
            })
            .collect()
    };
    let opts = KnnOptions {
        k: 8,
        expansion: 64,
        ..Default::default()
    };
    let sequential = coll.knn_batch(&queries, &opts).unwrap();
    let pool = likeness::pool::WorkPool::new("knn", 2, 64);
    let parallel = likeness::collections::knn_parallel(
        &pool,
        coll.clone(),
        Arc::new(queries),
        Arc::new(opts),
        4,
    )
    .await
    .unwrap();
    assert_eq!(parallel.neighbours.len(), 257);
    assert_eq!(parallel.generation, sequential.generation);
    for (a, b) in parallel.neighbours.iter().zip(&sequential.neighbours) {
        let ka: Vec<u64> = a.iter().map(|n| n.key).collect();
        let kb: Vec<u64> = b.iter().map(|n| n.key).collect();
        assert_eq!(ka, kb);
    }
}

/// Writes from many threads at once, unary and stream messages interleaved (the mix
/// of issue 20's fault 3): each lands whole, in its thread's order, durably, and a
/// stream rolled back meanwhile restores exactly what it replaced.
#[test]
fn concurrent_writes_each_land_whole_and_a_stream_beside_them_rolls_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(base(dir.path()));
    let coll = db.collection("s").unwrap();
    let (writers, rounds, ids_per) = (6, 40, 10);
    let barrier = Arc::new(std::sync::Barrier::new(writers + 2));
    let vector = |t: usize, j: usize| -> Vec<f32> {
        (0..8)
            .map(|d| ((t * 131 + j * 17 + d) % 23) as f32 - 11.0)
            .collect()
    };
    let mut handles = Vec::new();
    for t in 0..writers {
        let (db, coll, barrier) = (db.clone(), coll.clone(), barrier.clone());
        handles.push(std::thread::spawn(move || {
            barrier.wait();
            for j in 0..rounds {
                let item = likeness::types::ItemData {
                    id: format!("w{t}_{}", j % ids_per),
                    label: format!("t{t}"),
                    vector: vector(t, j),
                    generation: j as u64,
                    ..Default::default()
                };
                db.upsert(&coll, &[item]).unwrap();
            }
        }));
    }
    // Two streams stage beside them, message by message: one commits, one rolls back
    // (it replaced base items i0..i19 and added new ones).
    for commit in [true, false] {
        let (db, coll, barrier) = (db.clone(), coll.clone(), barrier.clone());
        handles.push(std::thread::spawn(move || {
            let txn = db.begin_stream().unwrap();
            barrier.wait();
            for j in 0..20 {
                let mut item = items(5000 + j, 1, 8).remove(0);
                if commit {
                    item.id = format!("s{j}");
                } else if j % 2 == 0 {
                    item.id = format!("i{j}");
                } else {
                    item.id = format!("gone{j}");
                }
                db.stage(&txn, &coll, &[item]).unwrap();
            }
            if commit {
                txn.commit().unwrap();
            } else {
                txn.rollback().unwrap();
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    let check = |db: &Registry| {
        let coll = db.collection("s").unwrap();
        assert_eq!(coll.len(), 100 + writers * ids_per + 20);
        // Each id holds the last vector its thread wrote.
        for t in 0..writers {
            let ids: Vec<String> = (0..ids_per).map(|k| format!("w{t}_{k}")).collect();
            let got = coll.get_items(&ids, true, false).unwrap();
            assert_eq!(got.len(), ids_per);
            for (k, g) in got.iter().enumerate() {
                let last = rounds - ids_per + k;
                assert_eq!(g.vector, vector(t, last), "{}", g.id);
                assert_eq!(g.generation, last as u64);
            }
        }
        // The rolled-back stream left the base items as they were and nothing of its own.
        let base = items(0, 20, 8);
        let got = coll.get_items(&ids(20, 0), true, false).unwrap();
        for (g, b) in got.iter().zip(&base) {
            assert_eq!((&g.id, &g.vector), (&b.id, &b.vector));
        }
        let gone: Vec<String> = (0..20).map(|j| format!("gone{j}")).collect();
        assert!(coll.get_items(&gone, false, false).unwrap().is_empty());
        assert!(coll.audit_index().unwrap().is_exact());
    };
    check(&db);
    drop((coll, Arc::try_unwrap(db).ok().expect("threads are done")));
    let (db, _) = open(dir.path());
    check(&db);
}
