//! likeness.v1.Miner: convert -> [`crate::mine::Miner`] -> convert. The streams are the
//! miner's channels, mapped message by message; dropping one (the client went away)
//! stops its job.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::app::App;
use crate::error::{Error, Field, Result};
use crate::grpc::pb;
use crate::mine::{
    Anchors, Batch, ClassBatch, MinedItem, Mode, Pair, RawBatchSpec, RawSpec, Shard, Stats, Step,
    StepAnchor, Strategy, Triplet,
};

pub struct MinerService {
    pub app: Arc<App>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::miner_server::Miner for MinerService {
    type MineTripletsStream = BoxStream<pb::MinedBatch>;
    type MinePairsStream = BoxStream<pb::MinedPairBatch>;
    type SessionStream = BoxStream<pb::MinedBatch>;
    type MineBatchesStream = BoxStream<pb::ClassBatch>;

    async fn mine_batches(
        &self,
        request: Request<pb::BatchRequest>,
    ) -> std::result::Result<Response<Self::MineBatchesStream>, Status> {
        let raw = batch_spec_from(request.into_inner());
        let rx = self.app.miner().mine_batches(raw).await?;
        let out = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|r| r.map(class_batch_to).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn mine_triplets(
        &self,
        request: Request<pb::MineRequest>,
    ) -> std::result::Result<Response<Self::MineTripletsStream>, Status> {
        let raw = spec_from(request.into_inner(), &Field::default())?;
        let rx = self.app.miner().mine(raw, Mode::Triplets).await?;
        let out = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|r| r.map(batch_to).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn mine_pairs(
        &self,
        request: Request<pb::MineRequest>,
    ) -> std::result::Result<Response<Self::MinePairsStream>, Status> {
        let raw = spec_from(request.into_inner(), &Field::default())?;
        let rx = self.app.miner().mine(raw, Mode::Pairs).await?;
        let out = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|r| r.map(pair_batch_to).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }

    async fn session(
        &self,
        request: Request<Streaming<pb::MineStep>>,
    ) -> std::result::Result<Response<Self::SessionStream>, Status> {
        let may_write = request
            .extensions()
            .get::<super::auth::MayWrite>()
            .is_none_or(|w| w.0);
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        // Steps are converted as they arrive; the first bad one ends the session with
        // its field named.
        tokio::spawn(async move {
            let mut index = 0usize;
            while let Some(msg) = inbound.next().await {
                let root = Field::name("steps").at(index);
                let step = match msg {
                    Ok(m) if m.write_back && !may_write => Err(Error::PermissionDenied(format!(
                        "{}: writing the step's vectors back needs a write token; this one may only read",
                        Field::name("write_back").under(&root)
                    ))),
                    Ok(m) => step_from(m, &root),
                    Err(_) => return, // the client went away
                };
                index += 1;
                let failed = step.is_err();
                if tx.send(step).await.is_err() || failed {
                    return;
                }
            }
        });
        let out = tokio_stream::wrappers::ReceiverStream::new(self.app.miner().session(rx))
            .map(|r| r.map(batch_to).map_err(Status::from));
        Ok(Response::new(Box::pin(out)))
    }
}

fn strategy_from(field: Field, s: i32) -> Result<Option<Strategy>> {
    Ok(match pb::Strategy::try_from(s) {
        Ok(pb::Strategy::Unspecified) => None,
        Ok(pb::Strategy::Random) => Some(Strategy::Random),
        Ok(pb::Strategy::Hard) => Some(Strategy::Hard),
        Ok(pb::Strategy::SemiHard) => Some(Strategy::SemiHard),
        Ok(pb::Strategy::DistanceWeighted) => Some(Strategy::DistanceWeighted),
        Ok(pb::Strategy::BatchHard) => Some(Strategy::BatchHard),
        Ok(pb::Strategy::MultiSimilarity) => Some(Strategy::MultiSimilarity),
        Err(_) => return Err(Error::invalid(field, format!("unknown strategy {s}"))),
    })
}

/// A MineRequest as the core's [`RawSpec`]; checks happen in the core.
pub fn spec_from(req: pb::MineRequest, root: &Field) -> Result<RawSpec> {
    let pb::MineRequest {
        collection,
        strategy,
        margin,
        negatives_per_anchor,
        positives_per_anchor,
        anchors,
        batch_size,
        max_triplets,
        seed,
        candidates,
        skip_nearest,
        min_distance,
        max_distance,
        pos_margin,
        neg_margin,
        exclude_ids,
        min_generation,
        shard,
        with_vectors,
        with_inputs,
        expansion,
        sample,
    } = req;
    let anchors = match anchors.and_then(|a| a.kind) {
        None | Some(pb::anchor_set::Kind::All(_)) => Anchors::All,
        Some(pb::anchor_set::Kind::Ids(pb::AnchorIds { ids })) => Anchors::Ids(ids),
        Some(pb::anchor_set::Kind::Labels(pb::AnchorLabels { labels })) => Anchors::Labels(labels),
    };
    Ok(RawSpec {
        collection,
        strategy: strategy_from(Field::name("strategy").under(root), strategy)?,
        margin,
        negatives: negatives_per_anchor,
        positives: positives_per_anchor,
        anchors,
        batch_size,
        max_triplets,
        seed,
        candidates,
        sample,
        skip_nearest,
        min_distance,
        max_distance,
        pos_margin,
        neg_margin,
        exclude_ids,
        min_generation,
        shard: shard.map(|pb::Shard { index, count }| Shard { index, count }),
        with_vectors,
        with_inputs,
        expansion,
    })
}

fn step_from(m: pb::MineStep, root: &Field) -> Result<Step> {
    let pb::MineStep {
        step,
        request,
        anchors,
        write_back,
    } = m;
    let request = request
        .map(|r| spec_from(r, &Field::name("request").under(root)))
        .transpose()?;
    Ok(Step {
        step,
        request,
        anchors: anchors
            .into_iter()
            .map(|pb::StepAnchor { id, label, vector }| StepAnchor { id, label, vector })
            .collect(),
        write_back,
    })
}

/// A BatchRequest as the core's [`RawBatchSpec`]; checks happen in the core.
fn batch_spec_from(req: pb::BatchRequest) -> RawBatchSpec {
    let pb::BatchRequest {
        collection,
        classes,
        per_class,
        neighbours,
        seed,
        shard,
        min_generation,
        max_batches,
        with_vectors,
        with_inputs,
        expansion,
        candidates,
    } = req;
    RawBatchSpec {
        collection,
        classes,
        per_class,
        neighbours,
        seed,
        shard: shard.map(|pb::Shard { index, count }| Shard { index, count }),
        min_generation,
        max_batches,
        with_vectors,
        with_inputs,
        expansion,
        candidates,
    }
}

fn class_batch_to(b: ClassBatch) -> pb::ClassBatch {
    let ClassBatch {
        items,
        classes,
        neighbours,
        class_distances,
        batch,
        pass,
        generations,
        stats,
        last,
    } = b;
    pb::ClassBatch {
        items: items.into_iter().map(item_to).collect(),
        classes: classes.iter().map(|c| c.to_string()).collect(),
        neighbours,
        class_distances,
        batch,
        pass,
        generation: generations_to(generations),
        stats: stats.map(stats_to),
        last,
    }
}

fn triplet_to(t: Triplet) -> pb::Triplet {
    let Triplet {
        anchor,
        positive,
        negatives,
        d_ap,
        d_an,
        fallback,
    } = t;
    pb::Triplet {
        anchor_id: anchor.to_string(),
        positive_id: positive.to_string(),
        negative_ids: negatives.iter().map(|n| n.to_string()).collect(),
        d_ap,
        d_an,
        fallback,
    }
}

fn pair_to(p: Pair) -> pb::Pair {
    let Pair {
        a,
        b,
        same,
        distance,
    } = p;
    pb::Pair {
        a_id: a.to_string(),
        b_id: b.to_string(),
        same,
        distance,
    }
}

fn item_to(i: MinedItem) -> pb::MinedItem {
    let MinedItem {
        id,
        label,
        vector,
        input,
        generation,
    } = i;
    pb::MinedItem {
        id: id.to_string(),
        label: label.to_string(),
        vector,
        input: input.map(super::convert::input_to),
        generation,
    }
}

fn stats_to(s: Stats) -> pb::MineStats {
    let Stats {
        anchors,
        anchors_without_triplet,
        triplets,
        pairs,
        candidates_examined,
        rejections,
        fallbacks,
        sources,
        written,
        batches,
        neighbour_classes,
        random_classes,
        seconds,
    } = s;
    let rate = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    pb::MineStats {
        anchors,
        anchors_without_triplet,
        triplets,
        pairs,
        candidates_examined,
        rejections: rejections
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        fallbacks: fallbacks
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        sources: sources
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        written,
        batches,
        neighbour_classes,
        random_classes,
        seconds,
        anchors_per_second: rate(anchors),
        triplets_per_second: rate(triplets.max(pairs)),
    }
}

fn generations_to(g: Option<(u64, u64)>) -> Option<pb::GenerationRange> {
    g.map(|(oldest, newest)| pb::GenerationRange { oldest, newest })
}

fn batch_to(b: Batch) -> pb::MinedBatch {
    let Batch {
        triplets,
        pairs: _,
        items,
        generations,
        step,
        stats,
        last,
        written_step,
    } = b;
    pb::MinedBatch {
        triplets: triplets.into_iter().map(triplet_to).collect(),
        items: items.into_iter().map(item_to).collect(),
        generation: generations_to(generations),
        step,
        stats: stats.map(stats_to),
        last,
        written_step,
    }
}

fn pair_batch_to(b: Batch) -> pb::MinedPairBatch {
    let Batch {
        triplets: _,
        pairs,
        items,
        generations,
        step: _,
        stats,
        last,
        written_step: _,
    } = b;
    pb::MinedPairBatch {
        pairs: pairs.into_iter().map(pair_to).collect(),
        items: items.into_iter().map(item_to).collect(),
        generation: generations_to(generations),
        stats: stats.map(stats_to),
        last,
    }
}
