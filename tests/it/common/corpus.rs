//! A labelled corpus with exact distances, and the mining calls the mining tests share
//! (tests/it/mine.rs, tests/it/mine_engine.rs).

use std::collections::HashMap;

use likeness::grpc::pb;
use likeness::grpc::pb::miner_client::MinerClient;
use likeness::rng::Rng;
use likeness::types::Metric;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::*;

/// A labelled corpus and the exact distances the miner is checked against.
pub struct Corpus {
    pub ids: Vec<String>,
    pub labels: Vec<usize>,
    pub vectors: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
    pub metric: Metric,
}

impl Corpus {
    /// `classes` x `per_class` vectors around random unit centres (Gaussian noise of
    /// `sigma` per dimension), so that classes overlap enough for hard negatives.
    pub fn clustered(
        classes: usize,
        per_class: usize,
        dim: usize,
        sigma: f32,
        seed: u64,
    ) -> Corpus {
        let mut rng = Rng::new(seed);
        let centres: Vec<Vec<f32>> = (0..classes)
            .map(|_| {
                let v: Vec<f32> = (0..dim).map(|_| rng.normal()).collect();
                let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.into_iter().map(|x| x / n).collect()
            })
            .collect();
        let (mut ids, mut labels, mut vectors) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..classes * per_class {
            let c = i % classes;
            ids.push(format!("i{i}"));
            labels.push(c);
            vectors.push(
                centres[c]
                    .iter()
                    .map(|x| x + sigma * rng.normal())
                    .collect(),
            );
        }
        let index = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.clone(), i))
            .collect();
        Corpus {
            ids,
            labels,
            vectors,
            index,
            metric: Metric::Cosine,
        }
    }

    /// `labels` x `per_label` Gaussian vectors with no class structure at all: what an
    /// untrained network emits (issue 16's cold collection).
    pub fn cold(labels: usize, per_label: usize, dim: usize, seed: u64) -> Corpus {
        let mut rng = Rng::new(seed);
        let n = labels * per_label;
        let ids: Vec<String> = (0..n).map(|i| format!("i{i}")).collect();
        Corpus {
            index: ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i))
                .collect(),
            ids,
            labels: (0..n).map(|i| i % labels).collect(),
            vectors: (0..n)
                .map(|_| (0..dim).map(|_| rng.normal()).collect())
                .collect(),
            metric: Metric::Cosine,
        }
    }

    pub fn at(&self, id: &str) -> usize {
        self.index[id]
    }

    pub fn d(&self, a: usize, b: usize) -> f32 {
        self.metric.distance(&self.vectors[a], &self.vectors[b])
    }

    /// Every negative of `a`, nearest first, by brute force.
    pub fn negatives(&self, a: usize) -> Vec<(usize, f32)> {
        let mut v: Vec<(usize, f32)> = (0..self.ids.len())
            .filter(|&j| self.labels[j] != self.labels[a])
            .map(|j| (j, self.d(a, j)))
            .collect();
        v.sort_by(|x, y| x.1.total_cmp(&y.1));
        v
    }

    pub fn positives(&self, a: usize) -> Vec<(usize, f32)> {
        (0..self.ids.len())
            .filter(|&j| j != a && self.labels[j] == self.labels[a])
            .map(|j| (j, self.d(a, j)))
            .collect()
    }

    pub async fn load(&self, server: &TestServer, name: &str) {
        let mut colls = server.collections().await;
        create(
            &mut colls,
            name,
            self.vectors[0].len() as u32,
            pb::Metric::Cosine,
        )
        .await;
        let mut items = server.items().await;
        let all: Vec<usize> = (0..self.ids.len()).collect();
        for chunk in all.chunks(2000) {
            items
                .upsert(pb::UpsertRequest {
                    collection: name.into(),
                    items: chunk
                        .iter()
                        .map(|&i| {
                            item(
                                &self.ids[i],
                                &format!("c{}", self.labels[i]),
                                self.vectors[i].clone(),
                            )
                        })
                        .collect(),
                })
                .await
                .unwrap();
        }
    }

    /// Asserts what holds for every strategy: positives share the anchor's label and
    /// are not the anchor; negatives never share it.
    pub fn check_labels(&self, triplets: &[pb::Triplet]) {
        for t in triplets {
            let a = self.at(&t.anchor_id);
            let p = self.at(&t.positive_id);
            assert_ne!(a, p, "{t:?}: the anchor is its own positive");
            assert_eq!(
                self.labels[a], self.labels[p],
                "{t:?}: positive of another label"
            );
            assert_eq!(t.negative_ids.len(), t.d_an.len());
            for n in &t.negative_ids {
                assert_ne!(
                    self.labels[a],
                    self.labels[self.at(n)],
                    "{t:?}: negative of the anchor's label"
                );
            }
        }
    }
}

/// An open Session: the sender of its steps and the stream of its answers.
pub async fn session(
    server: &TestServer,
) -> (
    tokio::sync::mpsc::Sender<pb::MineStep>,
    tonic::Streaming<pb::MinedBatch>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let answers = miner(server)
        .await
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, answers)
}

pub async fn miner(server: &TestServer) -> MinerClient<Channel> {
    MinerClient::new(channel(&server.url()).await).max_decoding_message_size(64 << 20)
}

pub fn request(strategy: pb::Strategy) -> pb::MineRequest {
    pb::MineRequest {
        collection: "m".into(),
        strategy: strategy as i32,
        batch_size: 64,
        seed: 7,
        ..Default::default()
    }
}

pub fn ids_anchors(ids: Vec<String>) -> Option<pb::AnchorSet> {
    Some(pb::AnchorSet {
        kind: Some(pb::anchor_set::Kind::Ids(pb::AnchorIds { ids })),
    })
}

/// Reads a whole MineTriplets stream: every message, and the triplets in order.
pub async fn mine_all(
    client: &mut MinerClient<Channel>,
    req: pb::MineRequest,
) -> (Vec<pb::Triplet>, pb::MineStats, Vec<pb::MinedBatch>) {
    let mut stream = client.mine_triplets(req).await.unwrap().into_inner();
    let mut batches = Vec::new();
    while let Some(m) = stream.next().await {
        batches.push(m.unwrap());
    }
    let last = batches.last().expect("a final message");
    assert!(
        last.last && last.triplets.is_empty(),
        "the stream ends with its stats"
    );
    let stats = last.stats.clone().expect("final stats");
    let triplets = batches.iter().flat_map(|b| b.triplets.clone()).collect();
    (triplets, stats, batches)
}
