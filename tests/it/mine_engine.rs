//! The miner engine (issue 16): window strategies that look beyond the nearest
//! neighbours (a cold collection), the plain kNN with exclusions applied afterwards and
//! its filtered fallback, batches of neighbouring classes (MineBatches), and the Session
//! as a cross-batch memory (write-back).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;

use likeness::grpc::pb;
use likeness::types::Metric;
use tokio_stream::StreamExt;

use crate::common::corpus::{Corpus, ids_anchors, mine_all, miner, request, session};
use crate::common::*;

/// One item with its vector, if it exists.
async fn get_one(
    items: &mut likeness::grpc::pb::items_client::ItemsClient<tonic::transport::Channel>,
    id: &str,
) -> Option<pb::Item> {
    get(items, "m", vec![id.to_string()], true).await.pop()
}

/// Issue 16, part 1: on random vectors (an untrained network) the semi-hard window
/// lies in the middle of the distance distribution, far beyond the kNN pool. The old
/// miner found a window negative for 1 anchor in 5; drawing a uniform sample beside the
/// pool finds one for nearly every anchor, without a second search.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_hard_finds_window_negatives_on_a_cold_collection() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::cold(200, 100, 64, 3);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    let anchors: Vec<String> = (0..1500)
        .map(|i| c.ids[(i * 13 + 5) % c.ids.len()].clone())
        .collect();
    let (triplets, stats, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(anchors.clone()),
            margin: Some(0.2),
            ..request(pb::Strategy::SemiHard)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert_eq!(stats.anchors, 1500);
    let margin = 0.2;
    let inside = |t: &pb::Triplet| {
        let a = c.at(&t.anchor_id);
        let d_ap = c.d(a, c.at(&t.positive_id));
        !t.fallback
            && t.negative_ids.iter().all(|n| {
                let d = c.d(a, c.at(n));
                d_ap < d && d < d_ap + margin
            })
    };
    let good = triplets.iter().filter(|t| inside(t)).count();
    assert!(
        good as f64 >= 0.95 * 1500.0,
        "a window negative for {good} of 1500 anchors; stats {stats:?}"
    );
    // Against exact distances on a subset: of the (anchor, positive) pairs whose window
    // holds a negative, the share that got one.
    let (mut exists, mut got) = (0, 0);
    for t in triplets.iter().take(300) {
        let a = c.at(&t.anchor_id);
        let d_ap = c.d(a, c.at(&t.positive_id));
        if c.negatives(a)
            .iter()
            .any(|(_, d)| *d > d_ap && *d < d_ap + margin)
        {
            exists += 1;
            got += usize::from(inside(t));
        }
    }
    assert!(
        got as f64 >= 0.95 * exists as f64,
        "{got} of {exists} anchors whose window holds a negative got one"
    );
    let source = |k: &str| stats.sources.get(k).copied().unwrap_or(0);
    assert!(source("sample") > 1000, "sources {:?}", stats.sources);
    assert_eq!(
        source("knn") + source("sample") + source("second_search"),
        triplets
            .iter()
            .map(|t| t.negative_ids.len() as u64)
            .sum::<u64>()
    );
    // The second search (what made SEMI_HARD 50x slower than HARD) is now rare.
    let second = stats.fallbacks.get("second_search").copied().unwrap_or(0);
    assert!(second < 75, "{second} second searches for 1500 anchors");
}

/// Issue 16, part 2: with many labels the miner's kNN is a plain HNSW search with the
/// exclusions applied afterwards; where the anchor's own label crowds its neighbourhood
/// it falls back to the filtered walk. Both give only other labels, and the exact
/// nearest negatives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_knn_is_plain_where_labels_are_many_and_filtered_where_they_crowd() {
    for (case, c, plain_share) in [
        ("cold, 500 labels", Corpus::cold(500, 10, 32, 4), (0.9, 1.0)),
        // Tight classes of 100: the 72 nearest of an anchor are nearly all its own.
        (
            "tight classes",
            Corpus::clustered(50, 100, 32, 0.02, 5),
            (0.0, 0.3),
        ),
    ] {
        let (mut server, _dir) = TestServer::light().await;
        c.load(&server, "m").await;
        let app = server.app().await;
        let coll = app.registry().collection("m").unwrap();
        let mut m = miner(&server).await;
        let anchors: Vec<String> = (0..400)
            .map(|i| c.ids[(i * 11 + 3) % c.ids.len()].clone())
            .collect();
        let (triplets, _, _) = mine_all(
            &mut m,
            pb::MineRequest {
                anchors: ids_anchors(anchors),
                negatives_per_anchor: 10,
                ..request(pb::Strategy::Hard)
            },
        )
        .await;
        c.check_labels(&triplets);
        let (mut hit, mut total) = (0, 0);
        for t in &triplets {
            let exact: HashSet<usize> = c
                .negatives(c.at(&t.anchor_id))
                .iter()
                .take(10)
                .map(|(j, _)| *j)
                .collect();
            total += t.negative_ids.len();
            hit += t
                .negative_ids
                .iter()
                .filter(|n| exact.contains(&c.at(n)))
                .count();
        }
        let overlap = hit as f64 / total as f64;
        assert!(
            overlap >= 0.9,
            "{case}: HARD overlap with exact {overlap:.3}"
        );
        let s = coll.search_stats();
        let (plain, filtered) = (s.knn_plain.load(Relaxed), s.knn_filtered.load(Relaxed));
        let share = plain as f64 / (plain + filtered) as f64;
        assert!(
            (plain_share.0..=plain_share.1).contains(&share),
            "{case}: {plain} plain, {filtered} filtered kNN queries"
        );
    }
}

/// Centroids of each class of a corpus.
fn centroids(c: &Corpus) -> HashMap<String, Vec<f32>> {
    let mut sums: HashMap<String, (Vec<f32>, usize)> = HashMap::new();
    for (i, v) in c.vectors.iter().enumerate() {
        let n: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let e = sums
            .entry(format!("c{}", c.labels[i]))
            .or_insert_with(|| (vec![0.0; v.len()], 0));
        e.0.iter_mut().zip(v).for_each(|(s, x)| *s += x / n);
        e.1 += 1;
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s.into_iter().map(|x| x / n as f32).collect()))
        .collect()
}

async fn batches(
    server: &TestServer,
    req: pb::BatchRequest,
) -> (Vec<pb::ClassBatch>, pb::MineStats) {
    let mut m = miner(server).await;
    let mut stream = m.mine_batches(req).await.unwrap().into_inner();
    let mut out = Vec::new();
    while let Some(b) = stream.next().await {
        out.push(b.unwrap());
    }
    let last = out.pop().expect("a last message");
    assert!(last.last && last.items.is_empty());
    (out, last.stats.expect("stats on the last message"))
}

fn batch_request(shard: Option<(u32, u32)>) -> pb::BatchRequest {
    pb::BatchRequest {
        collection: "m".into(),
        classes: 6,
        per_class: 4,
        seed: 3,
        shard: shard.map(|(index, count)| pb::Shard { index, count }),
        ..Default::default()
    }
}

/// Issue 16, part 3: P x K batches whose classes are neighbours of each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn class_batches_bring_neighbouring_classes_k_items_each_and_cover_every_item() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(100, 20, 32, 0.15, 6);
    c.load(&server, "m").await;
    let cent = centroids(&c);
    let dist = |a: &str, b: &str| Metric::Cosine.distance(&cent[a], &cent[b]);
    let label_of: HashMap<&str, String> = c
        .ids
        .iter()
        .zip(&c.labels)
        .map(|(id, l)| (id.as_str(), format!("c{l}")))
        .collect();

    // Each class's exact nearest classes by centroid distance.
    let nearest_classes = |anchor: &str| -> Vec<(String, f32)> {
        let mut v: Vec<(String, f32)> = cent
            .keys()
            .filter(|k| *k != anchor)
            .map(|k| (k.clone(), dist(anchor, k)))
            .collect();
        v.sort_by(|a, b| a.1.total_cmp(&b.1));
        v
    };
    let (all, stats) = batches(&server, batch_request(None)).await;
    let (mut near, mut best, mut far) = (Vec::new(), Vec::new(), Vec::new());
    let (mut in_top, mut neighbours) = (0, 0);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, b) in all.iter().enumerate() {
        assert_eq!(b.batch, i as u64);
        assert_eq!(b.classes.len(), 6);
        assert_eq!(
            b.neighbours, 5,
            "every class beside the anchor's is a neighbour"
        );
        assert_eq!(
            b.classes.iter().collect::<HashSet<_>>().len(),
            6,
            "distinct classes"
        );
        // K items of each class, class by class, in the order of `classes`.
        assert_eq!(b.items.len(), 24);
        for (j, item) in b.items.iter().enumerate() {
            assert_eq!(item.label, b.classes[j / 4]);
            assert_eq!(label_of[item.id.as_str()], item.label);
            *seen.entry(item.id.clone()).or_default() += 1;
        }
        let exact = nearest_classes(&b.classes[0]);
        let top10: HashSet<&str> = exact.iter().take(10).map(|(k, _)| k.as_str()).collect();
        for other in &b.classes[1..] {
            near.push(dist(&b.classes[0], other));
            in_top += usize::from(top10.contains(other.as_str()));
            neighbours += 1;
        }
        best.extend(exact.iter().take(5).map(|(_, d)| *d));
        far.extend(exact.iter().map(|(_, d)| *d));
    }
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let (near, best, far) = (mean(&near), mean(&best), mean(&far));
    // Nearer to the best possible (the 5 nearest classes by exact centroid) than to
    // what chance gives, and mostly among the 10 nearest classes.
    assert!(
        near - best < 0.25 * (far - best),
        "neighbour classes at mean centroid distance {near:.3}; the 5 nearest {best:.3}; all {far:.3}"
    );
    assert!(
        in_top as f64 >= 0.7 * neighbours as f64,
        "{in_top} of {neighbours} neighbour classes among the anchor class's 10 nearest"
    );
    // One pass: every item at least once, about N / (P K) batches.
    assert_eq!(seen.len(), c.ids.len(), "a pass covers every item");
    assert!(
        all.len() <= 2000 / 24 * 2,
        "{} batches for one pass",
        all.len()
    );
    assert_eq!(stats.batches, all.len() as u64);
    assert_eq!(stats.neighbour_classes, 5 * all.len() as u64);

    // Random classes only: as far as any, and flagged as such.
    let (random, stats) = batches(
        &server,
        pb::BatchRequest {
            neighbours: Some(0),
            max_batches: 20,
            ..batch_request(None)
        },
    )
    .await;
    assert_eq!(random.len(), 20);
    assert_eq!(stats.random_classes, 100);
    let mut rand = Vec::new();
    for b in &random {
        assert_eq!(b.neighbours, 0);
        assert!(b.class_distances[1..].iter().all(|d| d.is_nan()));
        for other in &b.classes[1..] {
            rand.push(dist(&b.classes[0], other));
        }
    }
    let rand = mean(&rand);
    assert!(
        rand - best > 0.75 * (far - best),
        "random classes at {rand:.3}; the 5 nearest {best:.3}; all {far:.3}"
    );

    // Shards: disjoint, each within its hash part, together every item, each item in
    // its own shard's pass.
    let mut owner: HashMap<String, u32> = HashMap::new();
    for s in 0..3 {
        let (part, _) = batches(&server, batch_request(Some((s, 3)))).await;
        let ids: HashSet<String> = part
            .iter()
            .flat_map(|b| b.items.iter().map(|i| i.id.clone()))
            .collect();
        for id in ids {
            let want = likeness::mine::spec::fnv1a(id.as_bytes()) % 3;
            assert_eq!(want, u64::from(s), "{id} in shard {s}");
            assert!(owner.insert(id.clone(), s).is_none(), "{id} in two shards");
        }
    }
    assert_eq!(owner.len(), c.ids.len(), "the shards cover every item");

    // A seed reproduces the stream.
    let (again, _) = batches(&server, batch_request(None)).await;
    let classes = |v: &[pb::ClassBatch]| v.iter().map(|b| b.classes.clone()).collect::<Vec<_>>();
    assert_eq!(classes(&again), classes(&all));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batch_requests_name_their_field() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(5, 4, 8, 0.1, 7);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    for (case, req, code, needle) in [
        (
            "one class",
            pb::BatchRequest {
                classes: 1,
                ..batch_request(None)
            },
            tonic::Code::InvalidArgument,
            "classes",
        ),
        (
            "too many neighbours",
            pb::BatchRequest {
                neighbours: Some(6),
                ..batch_request(None)
            },
            tonic::Code::InvalidArgument,
            "neighbours",
        ),
        (
            "shard",
            pb::BatchRequest {
                shard: Some(pb::Shard { index: 3, count: 3 }),
                ..batch_request(None)
            },
            tonic::Code::InvalidArgument,
            "shard.index",
        ),
        (
            "no collection",
            pb::BatchRequest {
                collection: "nope".into(),
                ..batch_request(None)
            },
            tonic::Code::NotFound,
            "nope",
        ),
    ] {
        let err = m.mine_batches(req).await.unwrap_err();
        assert_status(case, &err, code, &[needle]);
    }
    // And the daemon keeps serving.
    let (ok, _) = batches(&server, batch_request(None)).await;
    assert!(!ok.is_empty());
}

/// Issue 16, part 4: a Session step as a cross-batch memory. The answer carries the
/// stored vectors of the anchors' negatives and positives; the step's fresh vectors
/// are written back (durably, metadata kept) before the next step is mined.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_step_returns_stored_vectors_and_writes_the_fresh_ones_back() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(10, 50, 8, 0.2, 8);
    c.load(&server, "m").await;
    let mut items = server.items().await;
    // One item with metadata, which a write-back must keep.
    upsert_ok(
        &mut items,
        "m",
        vec![pb::Item {
            metadata: [("source".to_string(), "scan-7".to_string())].into(),
            ..item("i1", &format!("c{}", c.labels[1]), c.vectors[1].clone())
        }],
    )
    .await;
    let (tx, mut answers) = session(&server).await;
    let fresh = |i: usize| -> Vec<f32> { c.vectors[i].iter().map(|x| x + 0.05).collect() };
    let anchors = |ids: &[usize]| -> Vec<pb::StepAnchor> {
        ids.iter()
            .map(|&i| pb::StepAnchor {
                id: c.ids[i].clone(),
                label: String::new(),
                vector: fresh(i),
            })
            .collect()
    };
    // No batch_size: a Session's step mines the anchors it sends.
    let req = pb::MineRequest {
        collection: "m".into(),
        strategy: pb::Strategy::Hard as i32,
        negatives_per_anchor: 4,
        positives_per_anchor: 2,
        with_vectors: true,
        ..Default::default()
    };
    let first_ids: Vec<usize> = (0..8).collect();
    tx.send(pb::MineStep {
        step: 1,
        request: Some(req),
        anchors: anchors(&first_ids),
        write_back: true,
    })
    .await
    .unwrap();
    let first = answers.next().await.unwrap().unwrap();
    assert_eq!(
        first.written_step, None,
        "nothing written before the first step"
    );
    assert_eq!(first.triplets.len(), 16, "8 anchors x 2 positives");
    let by_id: HashMap<&str, &pb::MinedItem> =
        first.items.iter().map(|i| (i.id.as_str(), i)).collect();
    for t in &first.triplets {
        for id in t.negative_ids.iter().chain([&t.positive_id]) {
            let item = by_id[id.as_str()];
            // The memory: stored vectors and labels, as they were before this step.
            assert!(max_diff(&item.vector, &c.vectors[c.at(id)]) < 1e-6, "{id}");
            assert_eq!(item.label, format!("c{}", c.labels[c.at(id)]));
        }
    }

    // A new id with a label is enrolled by its write-back too.
    let mut second_anchors = anchors(&[20, 21]);
    second_anchors.push(pb::StepAnchor {
        id: "new-1".into(),
        label: "c3".into(),
        vector: fresh(3),
    });
    tx.send(pb::MineStep {
        step: 2,
        request: None,
        anchors: second_anchors,
        write_back: true,
    })
    .await
    .unwrap();
    let second = answers.next().await.unwrap().unwrap();
    assert_eq!(second.written_step, Some(1));
    assert_eq!(second.stats.as_ref().unwrap().written, 8);
    // Step 1's write-back is durable and visible: fresh vectors at generation 1.
    for &i in &first_ids {
        let got = get_one(&mut items, &c.ids[i]).await.expect("still there");
        assert!(
            max_diff(&got.vector, &fresh(i)) < 1e-6,
            "{} not written back",
            c.ids[i]
        );
        assert_eq!(got.generation, 1);
        assert_eq!(got.label, format!("c{}", c.labels[i]));
    }
    let kept = get_one(&mut items, "i1").await.unwrap();
    assert_eq!(
        kept.metadata.get("source").map(String::as_str),
        Some("scan-7")
    );

    // A step whose anchor cannot be written (wrong dimension) fails with its field
    // named, and nothing of it is written.
    tx.send(pb::MineStep {
        step: 3,
        request: None,
        anchors: vec![pb::StepAnchor {
            id: "i30".into(),
            label: String::new(),
            vector: vec![1.0; 3],
        }],
        write_back: true,
    })
    .await
    .unwrap();
    let err = answers.next().await.unwrap().unwrap_err();
    assert_status(
        "bad write-back",
        &err,
        tonic::Code::InvalidArgument,
        &["steps[2].anchors[0].vector"],
    );
    drop(tx);
    // The session's last write-back (step 2) is durable once the session is over.
    let mut enrolled = None;
    for _ in 0..100 {
        enrolled = get_one(&mut items, "new-1").await;
        if enrolled.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let enrolled = enrolled.expect("the new id was enrolled by its write-back");
    assert_eq!((enrolled.label.as_str(), enrolled.generation), ("c3", 2));
    let old = get_one(&mut items, "i30").await.unwrap();
    assert!(max_diff(&old.vector, &c.vectors[30]) < 1e-6);
}

/// A cross-batch memory starts empty: a Session on a collection with no items answers
/// its first step with no triplets and writes the step back; the next step mines against
/// it. An id sent twice in one step (a sampler drawing with replacement) is written
/// once, with its last vector, instead of failing the step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_session_starts_on_an_empty_collection_and_writes_a_repeated_id_once() {
    let (server, _dir) = TestServer::light().await;
    let mut colls = server.collections().await;
    create(&mut colls, "m", 4, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    let (tx, mut answers) = session(&server).await;
    let anchor = |id: &str, label: &str, v: [f32; 4]| pb::StepAnchor {
        id: id.into(),
        label: label.into(),
        vector: v.to_vec(),
    };
    let step = |n: u64, anchors: Vec<pb::StepAnchor>| pb::MineStep {
        step: n,
        request: (n == 1).then(|| pb::MineRequest {
            collection: "m".into(),
            strategy: pb::Strategy::Hard as i32,
            negatives_per_anchor: 1,
            ..Default::default()
        }),
        anchors,
        write_back: true,
    };
    tx.send(step(
        1,
        vec![
            anchor("a1", "a", [1.0, 0.1, 0.0, 0.0]),
            anchor("a2", "a", [1.0, 0.0, 0.1, 0.0]),
            anchor("b1", "b", [0.0, 1.0, 0.1, 0.0]),
            anchor("b2", "b", [0.1, 1.0, 0.0, 0.0]),
            // a1 again: the last vector is the one written.
            anchor("a1", "a", [1.0, 0.0, 0.0, 0.1]),
        ],
    ))
    .await
    .unwrap();
    let first = answers
        .next()
        .await
        .unwrap()
        .expect("a first step on an empty collection");
    assert!(
        first.triplets.is_empty(),
        "nothing stored to mine against yet"
    );
    tx.send(step(
        2,
        vec![
            anchor("a3", "a", [1.0, 0.05, 0.05, 0.0]),
            anchor("b3", "b", [0.05, 1.0, 0.05, 0.0]),
        ],
    ))
    .await
    .unwrap();
    let second = answers.next().await.unwrap().expect("a second step");
    assert_eq!(second.written_step, Some(1));
    assert_eq!(
        second.stats.as_ref().unwrap().written,
        4,
        "a1 once, b1, a2, b2"
    );
    assert_eq!(
        second.triplets.len(),
        2,
        "each anchor has a stored positive and negative"
    );
    for t in &second.triplets {
        assert_eq!(t.anchor_id.chars().next(), t.positive_id.chars().next());
        assert_ne!(t.anchor_id.chars().next(), t.negative_ids[0].chars().next());
    }
    let a1 = get_one(&mut items, "a1")
        .await
        .expect("a1 was written back");
    assert!(
        max_diff(&a1.vector, &[1.0, 0.0, 0.0, 0.1]) < 1e-6,
        "{:?}",
        a1.vector
    );
    drop(tx);
}
