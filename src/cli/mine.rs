//! `likeness mine`: a mining stream written as JSON lines, with a progress bar and the
//! stream's stats at the end, so mining can be tried without writing a client.

use std::io::Write;
use std::time::Instant;

use clap::ValueEnum;
use tokio_stream::StreamExt;

use super::{Daemon, connect, load::Progress, status};
use crate::grpc::pb;
use crate::grpc::pb::miner_client::MinerClient;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StrategyArg {
    Random,
    Hard,
    SemiHard,
    DistanceWeighted,
    BatchHard,
    MultiSimilarity,
}

impl From<StrategyArg> for pb::Strategy {
    fn from(s: StrategyArg) -> pb::Strategy {
        match s {
            StrategyArg::Random => pb::Strategy::Random,
            StrategyArg::Hard => pb::Strategy::Hard,
            StrategyArg::SemiHard => pb::Strategy::SemiHard,
            StrategyArg::DistanceWeighted => pb::Strategy::DistanceWeighted,
            StrategyArg::BatchHard => pb::Strategy::BatchHard,
            StrategyArg::MultiSimilarity => pb::Strategy::MultiSimilarity,
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct MineArgs {
    #[command(flatten)]
    pub conn: crate::cli::ConnectArgs,
    #[arg(long, short)]
    pub collection: String,
    #[arg(long, value_enum, default_value = "semi-hard")]
    pub strategy: StrategyArg,
    /// Triplet margin (SEMI_HARD's window).
    #[arg(long, allow_hyphen_values = true)]
    pub margin: Option<f32>,
    /// Stop after this many triplets (or pairs); 0: one pass over the anchors.
    #[arg(long, short = 'n', default_value_t = 0)]
    pub max_triplets: u64,
    #[arg(long, default_value_t = 1)]
    pub negatives: u32,
    #[arg(long, default_value_t = 1)]
    pub positives: u32,
    /// Anchors per message.
    #[arg(long, default_value_t = 256)]
    pub batch: u32,
    /// ANN candidate pool per anchor (0: the server's default).
    #[arg(long, default_value_t = 0)]
    pub candidates: u32,
    /// Skip this many nearest negatives.
    #[arg(long, default_value_t = 0)]
    pub skip_nearest: u32,
    #[arg(long)]
    pub min_distance: Option<f32>,
    #[arg(long)]
    pub max_distance: Option<f32>,
    /// Leave out items written with an older generation.
    #[arg(long, default_value_t = 0)]
    pub min_generation: u64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// This part of the anchors, INDEX/COUNT (e.g. 0/4).
    #[arg(long, value_parser = parse_shard)]
    pub shard: Option<(u32, u32)>,
    /// Only these anchors (repeatable).
    #[arg(long = "anchor", conflicts_with = "label")]
    pub anchors: Vec<String>,
    /// Only anchors with these labels (repeatable).
    #[arg(long)]
    pub label: Vec<String>,
    /// Never use these ids (repeatable).
    #[arg(long)]
    pub exclude: Vec<String>,
    /// Mine pairs (MinePairs) instead of triplets.
    #[arg(long)]
    pub pairs: bool,
    /// Pairs: keep positives farther than this...
    #[arg(long)]
    pub pos_margin: Option<f32>,
    /// ...and negatives nearer than this.
    #[arg(long)]
    pub neg_margin: Option<f32>,
    /// Uniform negatives drawn beside the kNN pool by window strategies (0: the
    /// server's default).
    #[arg(long, default_value_t = 0)]
    pub sample: u32,
    /// Stream P x K batches of neighbouring classes (MineBatches) instead: one JSON line
    /// per batch (its classes, ids and labels). Takes --classes, --per-class,
    /// --neighbours, --max-batches, --seed, --shard, --min-generation.
    #[arg(long, conflicts_with_all = ["pairs", "anchors", "label"])]
    pub batches: bool,
    /// Batches: classes per batch (P).
    #[arg(long, default_value_t = 8)]
    pub classes: u32,
    /// Batches: items per class (K).
    #[arg(long, default_value_t = 4)]
    pub per_class: u32,
    /// Batches: how many of the P - 1 other classes are the anchor class's neighbours
    /// (default: all; the rest are random).
    #[arg(long)]
    pub neighbours: Option<u32>,
    /// Batches: stop after this many (0: one pass over the items).
    #[arg(long, default_value_t = 0)]
    pub max_batches: u64,
    /// Where to write the JSON lines (default: standard output).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

fn parse_shard(s: &str) -> Result<(u32, u32), String> {
    let (i, n) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not INDEX/COUNT"))?;
    let parse = |x: &str| x.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
    Ok((parse(i)?, parse(n)?))
}

pub async fn mine(daemon: &Daemon, args: MineArgs) -> Result<(), String> {
    if args.batches {
        return mine_batches(daemon, args).await;
    }
    let ch = connect(daemon).await?;
    let total = if args.max_triplets > 0 {
        args.max_triplets as usize
    } else {
        let info = pb::collections_client::CollectionsClient::new(ch.clone())
            .get_collection(pb::GetCollectionRequest {
                name: args.collection.clone(),
            })
            .await
            .map_err(status)?
            .into_inner();
        info.count as usize
    };
    let anchors = if !args.anchors.is_empty() {
        Some(pb::anchor_set::Kind::Ids(pb::AnchorIds {
            ids: args.anchors,
        }))
    } else if !args.label.is_empty() {
        Some(pb::anchor_set::Kind::Labels(pb::AnchorLabels {
            labels: args.label,
        }))
    } else {
        None
    };
    let req = pb::MineRequest {
        collection: args.collection,
        strategy: pb::Strategy::from(args.strategy) as i32,
        margin: args.margin,
        negatives_per_anchor: args.negatives,
        positives_per_anchor: args.positives,
        anchors: anchors.map(|kind| pb::AnchorSet { kind: Some(kind) }),
        batch_size: args.batch,
        max_triplets: args.max_triplets,
        seed: args.seed,
        candidates: args.candidates,
        skip_nearest: args.skip_nearest,
        min_distance: args.min_distance,
        max_distance: args.max_distance,
        pos_margin: args.pos_margin,
        neg_margin: args.neg_margin,
        exclude_ids: args.exclude,
        min_generation: args.min_generation,
        shard: args.shard.map(|(index, count)| pb::Shard { index, count }),
        sample: args.sample,
        ..Default::default()
    };
    let mut out = output(&args.out)?;
    let mut client = MinerClient::new(ch).max_decoding_message_size(256 << 20);
    // The bar counts triplets when a cap is set, else anchors (one pass).
    let progress = Progress::counting(
        total,
        if args.max_triplets > 0 {
            "triplets"
        } else {
            "anchors"
        },
    );
    let start = Instant::now();
    let write_err = |e: std::io::Error| format!("writing: {e}");
    let mut done = 0usize;
    let mut anchors_seen = std::collections::HashSet::new();
    // Both streams as one: per message, (anchor, JSON line) rows and the final stats.
    type Rows = (
        Vec<(String, serde_json::Value)>,
        Option<pb::MineStats>,
        bool,
    );
    let mut stream: std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<Rows, String>> + Send>,
    > = if args.pairs {
        let s = client.mine_pairs(req).await.map_err(status)?.into_inner();
        Box::pin(s.map(|b| {
                let b = b.map_err(status)?;
                let rows = b
                    .pairs
                    .into_iter()
                    .map(|p| {
                        let line = serde_json::json!({"a": p.a_id, "b": p.b_id, "same": p.same, "distance": p.distance});
                        (p.a_id, line)
                    })
                    .collect();
                Ok((rows, b.stats, b.last))
            }))
    } else {
        let s = client
            .mine_triplets(req)
            .await
            .map_err(status)?
            .into_inner();
        Box::pin(s.map(|b| {
                let b = b.map_err(status)?;
                let rows = b
                    .triplets
                    .into_iter()
                    .map(|t| {
                        let line = serde_json::json!({
                            "anchor": t.anchor_id, "positive": t.positive_id, "negatives": t.negative_ids,
                            "d_ap": t.d_ap, "d_an": t.d_an, "fallback": t.fallback,
                        });
                        (t.anchor_id, line)
                    })
                    .collect();
                Ok((rows, b.stats, b.last))
            }))
    };
    let mut stats = None;
    while let Some(message) = stream.next().await {
        let (rows, message_stats, last) = message?;
        let n = rows.len();
        for (anchor, line) in rows {
            writeln!(out, "{line}").map_err(write_err)?;
            anchors_seen.insert(anchor);
        }
        done = if args.max_triplets > 0 {
            done + n
        } else {
            anchors_seen.len()
        };
        progress.show(done.min(total), start.elapsed());
        if last {
            stats = message_stats;
        }
    }
    out.flush().map_err(write_err)?;
    progress.finish();
    let Some(s) = stats else {
        return Err("the stream ended without its stats".into());
    };
    eprintln!(
        "mined {} {} from {} anchors ({} without one) in {:.2} s: {:.0} anchors/s; {} candidates examined",
        s.triplets.max(s.pairs),
        if args.pairs { "pairs" } else { "triplets" },
        s.anchors,
        s.anchors_without_triplet,
        s.seconds,
        s.anchors_per_second,
        s.candidates_examined
    );
    let show = |name: &str, m: &std::collections::HashMap<String, u64>| {
        if !m.is_empty() {
            let mut v: Vec<_> = m.iter().collect();
            v.sort();
            let parts: Vec<String> = v.iter().map(|(k, n)| format!("{k} {n}")).collect();
            eprintln!("{name}: {}", parts.join(", "));
        }
    };
    show("rejections", &s.rejections);
    show("fallbacks", &s.fallbacks);
    show("negatives by source", &s.sources);
    Ok(())
}

/// Where the JSON lines go: a file, or standard output.
fn output(path: &Option<std::path::PathBuf>) -> Result<Box<dyn Write>, String> {
    Ok(match path {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| format!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// `likeness mine --batches`: MineBatches as JSON lines, one per batch.
async fn mine_batches(daemon: &Daemon, args: MineArgs) -> Result<(), String> {
    let ch = connect(daemon).await?;
    let total = if args.max_batches > 0 {
        args.max_batches as usize
    } else {
        pb::collections_client::CollectionsClient::new(ch.clone())
            .get_collection(pb::GetCollectionRequest {
                name: args.collection.clone(),
            })
            .await
            .map_err(status)?
            .into_inner()
            .count as usize
    };
    let req = pb::BatchRequest {
        collection: args.collection,
        classes: args.classes,
        per_class: args.per_class,
        neighbours: args.neighbours,
        seed: args.seed,
        shard: args.shard.map(|(index, count)| pb::Shard { index, count }),
        min_generation: args.min_generation,
        max_batches: args.max_batches,
        candidates: args.candidates,
        ..Default::default()
    };
    let mut out = output(&args.out)?;
    let write_err = |e: std::io::Error| format!("writing: {e}");
    let mut client = MinerClient::new(ch).max_decoding_message_size(256 << 20);
    // The bar counts batches when a cap is set, else distinct items (one pass).
    let progress = Progress::counting(
        total,
        if args.max_batches > 0 {
            "batches"
        } else {
            "items"
        },
    );
    let start = Instant::now();
    let mut seen = std::collections::HashSet::new();
    let mut stream = client.mine_batches(req).await.map_err(status)?.into_inner();
    let mut stats = None;
    let mut batches = 0usize;
    while let Some(b) = stream.next().await {
        let b = b.map_err(status)?;
        if b.last {
            stats = b.stats;
            break;
        }
        batches += 1;
        let ids: Vec<&str> = b.items.iter().map(|i| i.id.as_str()).collect();
        let labels: Vec<&str> = b.items.iter().map(|i| i.label.as_str()).collect();
        let distances: Vec<Option<f32>> = b
            .class_distances
            .iter()
            .map(|d| d.is_finite().then_some(*d))
            .collect();
        let line = serde_json::json!({
            "batch": b.batch, "pass": b.pass, "classes": b.classes,
            "neighbours": b.neighbours, "class_distances": distances,
            "ids": ids, "labels": labels,
        });
        writeln!(out, "{line}").map_err(write_err)?;
        seen.extend(b.items.into_iter().map(|i| i.id));
        let done = if args.max_batches > 0 {
            batches
        } else {
            seen.len()
        };
        progress.show(done.min(total), start.elapsed());
    }
    out.flush().map_err(write_err)?;
    progress.finish();
    let Some(s) = stats else {
        return Err("the stream ended without its stats".into());
    };
    eprintln!(
        "{} batches ({} neighbour and {} random classes beside the anchor classes), {} distinct items, in {:.2} s",
        s.batches,
        s.neighbour_classes,
        s.random_classes,
        seen.len(),
        s.seconds
    );
    Ok(())
}
