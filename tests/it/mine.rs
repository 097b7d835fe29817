//! Hard-negative mining (issue 11), over gRPC against a real server: each strategy is
//! checked against an exact brute-force miner written here, on 20,000 labelled vectors;
//! then flow control, cancellation, shards, seeds, Sessions that see fresh upserts,
//! generations, pairs, and every bad request.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use likeness::grpc::pb;
use likeness::rng::Rng;
use likeness::types::Metric;
use tokio_stream::StreamExt;

use crate::common::corpus::*;
use crate::common::*;

/// Every 50th id: a fixed, spread sample of anchors.
fn sample_ids(c: &Corpus, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| c.ids[(i * 50 + 7) % c.ids.len()].clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn semi_hard_negatives_meet_their_condition_under_exact_distances() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(200, 100, 32, 0.12, 1);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    let (triplets, stats, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(sample_ids(&c, 400)),
            positives_per_anchor: 2,
            negatives_per_anchor: 3,
            ..request(pb::Strategy::SemiHard)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert!(
        triplets.len() >= 700,
        "{} triplets for 400 anchors x 2 positives",
        triplets.len()
    );
    let margin = 0.2;
    let (mut ok, mut total, mut fallbacks, mut fallback_ok) = (0, 0, 0, 0);
    for t in &triplets {
        let a = c.at(&t.anchor_id);
        let d_ap = c.d(a, c.at(&t.positive_id));
        assert!(
            (d_ap - t.d_ap).abs() < 1e-3,
            "reported d_ap {} vs exact {d_ap}",
            t.d_ap
        );
        for (n, reported) in t.negative_ids.iter().zip(&t.d_an) {
            let d_an = c.d(a, c.at(n));
            assert!(
                (d_an - reported).abs() < 1e-3,
                "reported d_an {reported} vs exact {d_an}"
            );
            if t.fallback {
                fallbacks += 1;
                // A fallback is taken only when the window is empty, and lies beyond d_ap.
                let window_empty = !c
                    .negatives(a)
                    .iter()
                    .any(|(_, d)| *d > d_ap && *d < d_ap + margin);
                fallback_ok += usize::from(d_an > d_ap && window_empty);
            } else {
                total += 1;
                ok += usize::from(d_ap < d_an && d_an < d_ap + margin);
            }
        }
    }
    let precision = ok as f64 / total as f64;
    assert!(
        precision >= 0.95,
        "condition precision {precision:.3} ({ok}/{total})"
    );
    if fallbacks > 0 {
        let f = fallback_ok as f64 / fallbacks as f64;
        assert!(f >= 0.9, "fallbacks that were due: {f:.3}");
    }
    assert_eq!(
        stats
            .fallbacks
            .get("semi_hard_beyond")
            .copied()
            .unwrap_or(0)
            > 0,
        triplets.iter().any(|t| t.fallback)
    );
    assert_eq!(stats.anchors, 400);
    assert_eq!(stats.triplets, triplets.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_negatives_overlap_the_exact_nearest_negatives() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(200, 100, 32, 0.12, 2);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    let k = 10;
    let (triplets, _, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(sample_ids(&c, 300)),
            negatives_per_anchor: k as u32,
            ..request(pb::Strategy::Hard)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert_eq!(triplets.len(), 300);
    let (mut hit, mut all) = (0, 0);
    for t in &triplets {
        let exact: HashSet<usize> = c
            .negatives(c.at(&t.anchor_id))
            .iter()
            .take(k)
            .map(|x| x.0)
            .collect();
        hit += t
            .negative_ids
            .iter()
            .filter(|n| exact.contains(&c.at(n)))
            .count();
        all += k;
        assert!(
            t.d_an.windows(2).all(|w| w[0] <= w[1]),
            "nearest first: {:?}",
            t.d_an
        );
    }
    let overlap = hit as f64 / all as f64;
    assert!(
        overlap >= 0.9,
        "overlap with the exact nearest negatives: {overlap:.3}"
    );

    // skip_nearest starts the window later: the first ranks are gone.
    let (skipped, stats, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(sample_ids(&c, 50)),
            negatives_per_anchor: 1,
            skip_nearest: 3,
            ..request(pb::Strategy::Hard)
        },
    )
    .await;
    let mut rank_ok = 0;
    for t in &skipped {
        let exact = c.negatives(c.at(&t.anchor_id));
        let rank = exact
            .iter()
            .position(|x| c.ids[x.0] == t.negative_ids[0])
            .unwrap();
        rank_ok += usize::from(rank >= 3);
    }
    assert!(rank_ok >= 48, "{rank_ok}/50 skipped the 3 nearest");
    assert!(stats.rejections["skip_nearest"] >= 150);
}

/// DISTANCE_WEIGHTED's draws, binned by distance, against the target distribution over
/// the whole collection computed by brute force: a chi-square goodness-of-fit test.
/// HARD's draws on the same bins must fail it, or the test could not tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distance_weighted_draws_follow_their_target_distribution() {
    let (server, _dir) = TestServer::light().await;
    let dim = 16;
    let c = Corpus::clustered(200, 100, dim, 0.25, 3);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    let anchors = sample_ids(&c, 300);
    let u = |d: f32| f64::from((2.0 * d).max(0.0).sqrt());
    let log_w = |u: f64| {
        if u >= 1.4 {
            None
        } else {
            let u = u.max(0.5);
            let n = dim as f64;
            Some(-((n - 2.0) * u.ln() + ((n - 3.0) / 2.0) * (1.0 - u * u / 4.0).ln()))
        }
    };
    // Per anchor, the exact target: each negative's probability.
    let mut target: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for id in &anchors {
        let negs = c.negatives(c.at(id));
        let lw: Vec<Option<f64>> = negs.iter().map(|(_, d)| log_w(u(*d))).collect();
        let max = lw.iter().flatten().copied().fold(f64::MIN, f64::max);
        let w: Vec<f64> = lw
            .iter()
            .map(|l| l.map_or(0.0, |l| (l - max).exp()))
            .collect();
        let total: f64 = w.iter().sum();
        target.insert(
            id.clone(),
            negs.iter()
                .zip(w)
                .map(|((_, d), w)| (u(*d), w / total))
                .collect(),
        );
    }
    let mut draws: Vec<(String, f64)> = Vec::new();
    let mut hard_draws: Vec<(String, f64)> = Vec::new();
    for seed in 0..4 {
        for (strategy, out) in [
            (pb::Strategy::DistanceWeighted, &mut draws),
            (pb::Strategy::Hard, &mut hard_draws),
        ] {
            let (triplets, _, _) = mine_all(
                &mut m,
                pb::MineRequest {
                    anchors: ids_anchors(anchors.clone()),
                    seed,
                    ..request(strategy)
                },
            )
            .await;
            c.check_labels(&triplets);
            for t in triplets {
                let d = c.d(c.at(&t.anchor_id), c.at(&t.negative_ids[0]));
                out.push((t.anchor_id, u(d)));
            }
        }
    }
    assert!(draws.len() >= 1100, "{} draws", draws.len());
    // Bin edges at the pooled target's deciles, so every bin expects about as much.
    let mut pooled: Vec<(f64, f64)> = draws
        .iter()
        .flat_map(|(a, _)| target[a].iter().copied())
        .collect();
    pooled.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total: f64 = pooled.iter().map(|p| p.1).sum();
    let mut edges = Vec::new();
    let mut acc = 0.0;
    for (x, p) in &pooled {
        acc += p;
        if acc >= total * (edges.len() + 1) as f64 / 10.0 && edges.len() < 9 {
            edges.push(*x);
        }
    }
    let bin = |x: f64| edges.iter().take_while(|e| x > **e).count();
    let chi2 = |draws: &[(String, f64)]| {
        let mut expected = [0.0; 10];
        let mut observed = [0.0; 10];
        for (a, x) in draws {
            for (y, p) in &target[a] {
                expected[bin(*y)] += p;
            }
            observed[bin(*x)] += 1.0;
        }
        expected
            .iter()
            .zip(&observed)
            .filter(|(e, _)| **e > 0.0)
            .map(|(e, o)| (o - e) * (o - e) / e)
            .sum::<f64>()
    };
    // Chi-square, 9 degrees of freedom: 27.88 at p = 0.001.
    let fit = chi2(&draws);
    let hard = chi2(&hard_draws);
    assert!(
        fit < 27.88,
        "DISTANCE_WEIGHTED draws do not follow the target: chi2 {fit:.1}"
    );
    assert!(
        hard > 27.88,
        "HARD's draws pass the same test (chi2 {hard:.1}): it cannot tell"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_hard_and_multi_similarity_match_their_definitions() {
    let (server, _dir) = TestServer::light().await;
    let c = Corpus::clustered(200, 100, 32, 0.12, 4);
    c.load(&server, "m").await;
    let mut m = miner(&server).await;
    let anchors = sample_ids(&c, 200);

    // BATCH_HARD: the farthest positive of the label group (100 members, all looked
    // at) and the nearest negative.
    let (triplets, _, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(anchors.clone()),
            ..request(pb::Strategy::BatchHard)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert_eq!(triplets.len(), 200, "one triplet per anchor");
    let mut nearest_ok = 0;
    for t in &triplets {
        let a = c.at(&t.anchor_id);
        let farthest = c
            .positives(a)
            .into_iter()
            .max_by(|x, y| x.1.total_cmp(&y.1))
            .unwrap();
        assert_eq!(
            c.ids[farthest.0], t.positive_id,
            "not the farthest positive"
        );
        nearest_ok += usize::from(c.negatives(a)[0].0 == c.at(&t.negative_ids[0]));
    }
    assert!(
        nearest_ok >= 190,
        "{nearest_ok}/200 took the exact nearest negative"
    );

    // MULTI_SIMILARITY (S = 1 - D, eps 0.1): a negative is kept when S_an + eps > min
    // S_ap over the positives; a positive when S_ap - eps < max S_an over negatives.
    let (triplets, stats, _) = mine_all(
        &mut m,
        pb::MineRequest {
            anchors: ids_anchors(anchors.clone()),
            positives_per_anchor: 4,
            negatives_per_anchor: 4,
            ..request(pb::Strategy::MultiSimilarity)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert!(!triplets.is_empty());
    let eps = 0.1;
    let (mut ok, mut all) = (0, 0);
    for t in &triplets {
        let a = c.at(&t.anchor_id);
        let min_sap = c
            .positives(a)
            .iter()
            .map(|p| 1.0 - p.1)
            .fold(f32::MAX, f32::min);
        let max_san = 1.0 - c.negatives(a)[0].1;
        let s_ap = 1.0 - c.d(a, c.at(&t.positive_id));
        all += 1;
        ok += usize::from(s_ap - eps < max_san);
        for n in &t.negative_ids {
            let s_an = 1.0 - c.d(a, c.at(n));
            all += 1;
            ok += usize::from(s_an + eps > min_sap);
        }
    }
    assert!(
        ok as f64 >= 0.99 * all as f64,
        "{ok}/{all} pairs meet multi-similarity's rule"
    );
    assert!(
        stats
            .rejections
            .get("multi_similarity")
            .copied()
            .unwrap_or(0)
            > 0,
        "nothing was filtered: {stats:?}"
    );
}

/// A small labelled set on a light server: `n` items, 8-d, `labels` classes.
async fn small(server: &TestServer, n: usize, labels: usize) -> Corpus {
    let mut c = Corpus::clustered(labels, n / labels, 8, 0.3, 5);
    c.metric = Metric::Cosine;
    c.load(server, "m").await;
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_negatives_spread_over_the_other_labels() {
    let (server, _dir) = TestServer::light().await;
    let c = small(&server, 2000, 10).await;
    let mut m = miner(&server).await;
    let (triplets, stats, _) = mine_all(
        &mut m,
        pb::MineRequest {
            negatives_per_anchor: 4,
            ..request(pb::Strategy::Random)
        },
    )
    .await;
    c.check_labels(&triplets);
    assert_eq!(stats.anchors, 2000);
    assert_eq!(triplets.len(), 2000);
    // Uniform over the other labels: every other label shows up, near equally.
    let mut per_label = [0usize; 10];
    for t in &triplets {
        for n in &t.negative_ids {
            per_label[c.labels[c.at(n)]] += 1;
        }
    }
    let mean = 8000.0 / 10.0;
    for (l, n) in per_label.iter().enumerate() {
        assert!(
            (*n as f64 - mean).abs() < mean * 0.2,
            "label {l}: {n} negatives, mean {mean}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shards_cover_every_anchor_exactly_once_and_a_seed_reproduces_the_stream() {
    let (server, _dir) = TestServer::light().await;
    let c = small(&server, 3000, 10).await;
    let mut m = miner(&server).await;
    let mut seen: HashMap<String, u32> = HashMap::new();
    for index in 0..3 {
        let (triplets, stats, _) = mine_all(
            &mut m,
            pb::MineRequest {
                shard: Some(pb::Shard { index, count: 3 }),
                ..request(pb::Strategy::Hard)
            },
        )
        .await;
        assert_eq!(stats.anchors, triplets.len() as u64);
        for t in triplets {
            *seen.entry(t.anchor_id).or_default() += 1;
        }
    }
    assert_eq!(
        seen.len(),
        c.ids.len(),
        "every anchor once across the shards"
    );
    assert!(seen.values().all(|n| *n == 1), "an anchor in two shards");

    let run = |seed| pb::MineRequest {
        seed,
        batch_size: 100,
        ..request(pb::Strategy::Random)
    };
    let (a, _, _) = mine_all(&mut m, run(11)).await;
    let (b, _, _) = mine_all(&mut m, run(11)).await;
    let (other, _, _) = mine_all(&mut m, run(12)).await;
    assert_eq!(a, b, "the same seed gave another stream");
    assert_ne!(a, other, "another seed gave the same stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_job_and_cancelling_stops_it() {
    let (mut server, _dir) = TestServer::light().await;
    let app = server.app().await;
    let dim = 256;
    let mut rng = Rng::new(9);
    let mut colls = server.collections().await;
    create(&mut colls, "m", dim, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    for chunk in 0..5 {
        items
            .upsert(pb::UpsertRequest {
                collection: "m".into(),
                items: (0..1000)
                    .map(|i| {
                        let n = chunk * 1000 + i;
                        item(
                            &format!("i{n}"),
                            &format!("c{}", n % 20),
                            (0..dim).map(|_| rng.normal()).collect(),
                        )
                    })
                    .collect(),
            })
            .await
            .unwrap();
    }
    let counters = app.miner().counters().clone();
    let mut m = miner(&server).await;
    // 5,000 anchors in 79 messages of about 200 KB each (vectors included).
    let mut stream = m
        .mine_triplets(pb::MineRequest {
            batch_size: 64,
            with_vectors: true,
            ..request(pb::Strategy::Hard)
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.items.is_empty());
    // The job fills its read-ahead, then waits for the reader (an event the miner
    // reports, not a guessed pause): while it waits it makes nothing more.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counters.waiting.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never waited for its reader"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let held = counters.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        held < 30,
        "{held} of 79 messages produced for a reader that took one"
    );
    assert_eq!(
        counters.active.load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Dropping the stream stops the job.
    drop(stream);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while counters.active.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the job outlived its reader"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let anchors = counters.anchors.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        anchors < 5000,
        "the job mined {anchors} anchors for a reader that left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_step_sees_the_vectors_upserted_before_it() {
    let (server, _dir) = TestServer::light().await;
    let c = small(&server, 1000, 10).await;
    let mut items = server.items().await;
    let (tx, mut answers) = session(&server).await;
    let anchor = "i3".to_string();
    let a = c.at(&anchor);
    let step =
        |n: u64, anchors: Vec<pb::StepAnchor>, request: Option<pb::MineRequest>| pb::MineStep {
            step: n,
            request,
            anchors,
            write_back: false,
        };
    let by_id = |id: &str| pb::StepAnchor {
        id: id.into(),
        ..Default::default()
    };
    tx.send(step(
        1,
        vec![by_id(&anchor)],
        Some(pb::MineRequest {
            negatives_per_anchor: 1,
            ..request(pb::Strategy::Hard)
        }),
    ))
    .await
    .unwrap();
    let first = answers.next().await.unwrap().unwrap();
    assert_eq!(first.step, 1);
    assert_eq!(
        first.triplets[0].negative_ids[0],
        c.ids[c.negatives(a)[0].0]
    );

    // The trainer writes a new negative right on top of the anchor...
    let other = format!("c{}", (c.labels[a] + 1) % 10);
    let mut v = c.vectors[a].clone();
    v[0] += 1e-3;
    items
        .upsert(pb::UpsertRequest {
            collection: "m".into(),
            items: vec![pb::Item {
                generation: 42,
                ..item("fresh-negative", &other, v)
            }],
        })
        .await
        .unwrap();
    // ...and the next step finds it.
    tx.send(step(2, vec![by_id(&anchor)], None)).await.unwrap();
    let second = answers.next().await.unwrap().unwrap();
    assert_eq!(second.step, 2);
    assert_eq!(second.triplets[0].negative_ids[0], "fresh-negative");
    assert_eq!(second.generation.unwrap().newest, 42);

    // A step's own vector is what distances are measured from.
    let fresh: Vec<f32> = c.vectors[c.at("i7")].iter().map(|x| -x).collect();
    tx.send(step(
        3,
        vec![pb::StepAnchor {
            id: anchor.clone(),
            label: String::new(),
            vector: fresh.clone(),
        }],
        None,
    ))
    .await
    .unwrap();
    let third = answers.next().await.unwrap().unwrap();
    let t = &third.triplets[0];
    let n = c.at(&t.negative_ids[0]);
    let exact = Metric::Cosine.distance(&fresh, &c.vectors[n]);
    assert!(
        (exact - t.d_an[0]).abs() < 1e-3,
        "d_an {} not from the step's vector ({exact})",
        t.d_an[0]
    );
    let nearest = (0..c.ids.len())
        .filter(|&j| c.labels[j] != c.labels[a])
        .map(|j| Metric::Cosine.distance(&fresh, &c.vectors[j]))
        .fold(f32::MAX, f32::min);
    assert!(
        (t.d_an[0] - nearest).abs() < 1e-3,
        "not the nearest negative to the step's vector"
    );

    // A bad step ends the session with the step and field named.
    tx.send(step(
        4,
        vec![pb::StepAnchor {
            id: anchor.clone(),
            label: String::new(),
            vector: vec![1.0, 2.0, f32::NAN, 0.0, 0.0, 0.0, 0.0, 0.0],
        }],
        None,
    ))
    .await
    .unwrap();
    let err = answers.next().await.unwrap().unwrap_err();
    assert_status(
        "NaN in a step",
        &err,
        tonic::Code::InvalidArgument,
        &["steps[3].anchors[0].vector[2]"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_generation_leaves_out_stale_vectors_and_pairs_follow_their_margins() {
    let (server, _dir) = TestServer::light().await;
    let mut colls = server.collections().await;
    create(&mut colls, "m", 8, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    let mut rng = Rng::new(3);
    let gen_of = |i: usize| if i.is_multiple_of(2) { 1 } else { 5 };
    items
        .upsert(pb::UpsertRequest {
            collection: "m".into(),
            items: (0..1000)
                .map(|i| pb::Item {
                    generation: gen_of(i),
                    ..item(
                        &format!("i{i}"),
                        &format!("c{}", i % 10),
                        (0..8).map(|_| rng.normal()).collect(),
                    )
                })
                .collect(),
        })
        .await
        .unwrap();
    // Get returns the generation written.
    let got = get(&mut items, "m", vec!["i1".into()], false).await;
    assert_eq!(got[0].generation, 5);

    let mut m = miner(&server).await;
    let (triplets, _, batches) = mine_all(
        &mut m,
        pb::MineRequest {
            min_generation: 3,
            negatives_per_anchor: 5,
            positives_per_anchor: 2,
            ..request(pb::Strategy::Hard)
        },
    )
    .await;
    assert!(!triplets.is_empty());
    let stale = |id: &str| id[1..].parse::<usize>().unwrap() % 2 == 0;
    for t in &triplets {
        assert!(!stale(&t.anchor_id) && !stale(&t.positive_id), "{t:?}");
        assert!(t.negative_ids.iter().all(|n| !stale(n)), "{t:?}");
    }
    for b in batches.iter().filter(|b| !b.triplets.is_empty()) {
        let g = b.generation.unwrap();
        assert_eq!((g.oldest, g.newest), (5, 5));
    }

    // Pairs: positives kept only beyond pos_margin, negatives only within neg_margin.
    let mut stream = m
        .mine_pairs(pb::MineRequest {
            negatives_per_anchor: 5,
            positives_per_anchor: 3,
            pos_margin: Some(0.5),
            neg_margin: Some(0.6),
            ..request(pb::Strategy::Hard)
        })
        .await
        .unwrap()
        .into_inner();
    let mut pairs = Vec::new();
    let mut last = None;
    while let Some(b) = stream.next().await {
        let b = b.unwrap();
        pairs.extend(b.pairs);
        if b.last {
            last = b.stats;
        }
    }
    let stats = last.expect("final stats");
    let label = |id: &str| id[1..].parse::<usize>().unwrap() % 10;
    assert!(pairs.iter().any(|p| p.same) && pairs.iter().any(|p| !p.same));
    for p in &pairs {
        assert_eq!(p.same, label(&p.a_id) == label(&p.b_id), "{p:?}");
        if p.same {
            assert!(p.distance > 0.5, "{p:?}");
        } else {
            assert!(p.distance < 0.6, "{p:?}");
        }
    }
    assert_eq!(stats.pairs, pairs.len() as u64);
    // Every anchor had 3 positives and 5 negatives: each was kept or turned away.
    let rejected = |rule: &str| stats.rejections.get(rule).copied().unwrap_or(0);
    let kept_same = pairs.iter().filter(|p| p.same).count() as u64;
    let kept_other = pairs.len() as u64 - kept_same;
    assert_eq!(kept_same + rejected("pos_margin"), 1000 * 3);
    assert_eq!(kept_other + rejected("neg_margin"), 1000 * 5);
    assert!(
        rejected("pos_margin") > 0,
        "pos_margin turned nothing away: {stats:?}"
    );

    // max_triplets caps the stream; with_vectors sends each used item once per message.
    let (capped, stats, batches) = mine_all(
        &mut m,
        pb::MineRequest {
            max_triplets: 100,
            with_vectors: true,
            batch_size: 32,
            ..request(pb::Strategy::SemiHard)
        },
    )
    .await;
    assert_eq!(capped.len(), 100);
    assert_eq!(stats.triplets, 100);
    for b in batches.iter().filter(|b| !b.triplets.is_empty()) {
        let ids: Vec<&str> = b.items.iter().map(|i| i.id.as_str()).collect();
        let unique: HashSet<&str> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique.len(), "an item twice in one message");
        for t in &b.triplets {
            for id in std::iter::once(&t.anchor_id)
                .chain([&t.positive_id])
                .chain(&t.negative_ids)
            {
                let it = b
                    .items
                    .iter()
                    .find(|i| &i.id == id)
                    .expect("every used item is sent");
                assert_eq!(it.vector.len(), 8);
                assert_eq!(it.label, format!("c{}", label(id)));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_mining_requests_name_their_field_and_the_daemon_keeps_serving() {
    let (server, _dir) = TestServer::light().await;
    small(&server, 200, 4).await;
    let mut colls = server.collections().await;
    create(&mut colls, "unlabelled", 8, pb::Metric::Cosine).await;
    let mut items = server.items().await;
    items
        .upsert(pb::UpsertRequest {
            collection: "unlabelled".into(),
            items: (0..10)
                .map(|i| item(&format!("u{i}"), "", vec![1.0 + i as f32; 8]))
                .collect(),
        })
        .await
        .unwrap();
    let mut m = miner(&server).await;
    use tonic::Code::{InvalidArgument, NotFound};
    let base = request(pb::Strategy::SemiHard);
    let cases: Vec<(&str, pb::MineRequest, tonic::Code, &[&str])> = vec![
        (
            "unknown collection",
            pb::MineRequest {
                collection: "nope".into(),
                ..base.clone()
            },
            NotFound,
            &["nope"],
        ),
        (
            "no labels",
            pb::MineRequest {
                collection: "unlabelled".into(),
                ..base.clone()
            },
            InvalidArgument,
            &["collection", "label"],
        ),
        (
            "negative margin",
            pb::MineRequest {
                margin: Some(-0.1),
                ..base.clone()
            },
            InvalidArgument,
            &["margin"],
        ),
        (
            "unspecified strategy",
            pb::MineRequest {
                strategy: 0,
                ..base.clone()
            },
            InvalidArgument,
            &["strategy"],
        ),
        (
            "unknown strategy",
            pb::MineRequest {
                strategy: 99,
                ..base.clone()
            },
            InvalidArgument,
            &["strategy"],
        ),
        (
            "missing anchor",
            pb::MineRequest {
                anchors: ids_anchors(vec!["i1".into(), "ghost".into()]),
                ..base.clone()
            },
            InvalidArgument,
            &["anchors.ids[1]", "ghost"],
        ),
        (
            "missing label",
            pb::MineRequest {
                anchors: Some(pb::AnchorSet {
                    kind: Some(pb::anchor_set::Kind::Labels(pb::AnchorLabels {
                        labels: vec!["zzz".into()],
                    })),
                }),
                ..base.clone()
            },
            InvalidArgument,
            &["anchors.labels[0]"],
        ),
        (
            // 0 is proto3's unset, and means the default (issue 20): too many is the error.
            "batch too large",
            pb::MineRequest {
                batch_size: 5000,
                ..base.clone()
            },
            InvalidArgument,
            &["batch_size"],
        ),
        (
            "batch too big",
            pb::MineRequest {
                batch_size: 1 << 20,
                ..base.clone()
            },
            InvalidArgument,
            &["batch_size"],
        ),
        (
            "shard index",
            pb::MineRequest {
                shard: Some(pb::Shard { index: 3, count: 3 }),
                ..base.clone()
            },
            InvalidArgument,
            &["shard.index"],
        ),
        (
            "NaN bound",
            pb::MineRequest {
                min_distance: Some(f32::NAN),
                ..base.clone()
            },
            InvalidArgument,
            &["min_distance"],
        ),
    ];
    for (case, req, code, needles) in cases {
        let err = m
            .mine_triplets(req.clone())
            .await
            .err()
            .unwrap_or_else(|| panic!("{case}: accepted"));
        assert_status(case, &err, code, needles);
        let err = m
            .mine_pairs(req)
            .await
            .err()
            .unwrap_or_else(|| panic!("{case} (pairs): accepted"));
        assert_status(case, &err, code, needles);
    }

    // Sessions: the first step must carry the request; vectors must fit the collection.
    let session_err = |steps: Vec<pb::MineStep>| {
        let mut m = m.clone();
        async move {
            let mut out = m
                .session(tokio_stream::iter(steps))
                .await
                .unwrap()
                .into_inner();
            loop {
                match out.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return e,
                    None => panic!("the session ended without an error"),
                }
            }
        }
    };
    let anchor = |vector: Vec<f32>| pb::StepAnchor {
        id: "i1".into(),
        label: String::new(),
        vector,
    };
    let err = session_err(vec![pb::MineStep {
        step: 0,
        request: None,
        anchors: vec![anchor(vec![])],
        write_back: false,
    }])
    .await;
    assert_status("no request", &err, InvalidArgument, &["steps[0].request"]);
    let err = session_err(vec![
        pb::MineStep {
            step: 0,
            request: Some(base.clone()),
            anchors: vec![anchor(vec![])],
            write_back: false,
        },
        pb::MineStep {
            step: 1,
            request: None,
            anchors: vec![anchor(vec![1.0; 5])],
            write_back: false,
        },
    ])
    .await;
    assert_status(
        "wrong dimension",
        &err,
        InvalidArgument,
        &["steps[1].anchors[0].vector", "dimension"],
    );
    let err = session_err(vec![pb::MineStep {
        step: 0,
        request: Some(pb::MineRequest {
            margin: Some(-1.0),
            ..base.clone()
        }),
        anchors: vec![anchor(vec![])],
        write_back: false,
    }])
    .await;
    assert_status(
        "bad request in a step",
        &err,
        InvalidArgument,
        &["steps[0].request.margin"],
    );

    // Still serving: a good request works.
    let (triplets, _, _) = mine_all(&mut m, base).await;
    assert!(!triplets.is_empty());
}
