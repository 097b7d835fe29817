//! proto <-> domain conversions. Each destructures every field, so a field added to the
//! proto fails the build here until someone decides what it means.

use crate::collections::{CollectionInfo, CreateCollection};
use crate::error::{Error, Field, Result};
use crate::grpc::pb;
use crate::store::codec::decode_input;
use crate::types::{
    self, Filter, Hit, Input, InputData, ItemData, Metric, NewItem, Precision, Query, SearchParams,
};

pub fn metric_from(field: &'static str, v: i32) -> Result<Option<Metric>> {
    match pb::Metric::try_from(v) {
        Ok(pb::Metric::Unspecified) => Ok(None),
        Ok(pb::Metric::Cosine) => Ok(Some(Metric::Cosine)),
        Ok(pb::Metric::L2) => Ok(Some(Metric::L2)),
        Ok(pb::Metric::InnerProduct) => Ok(Some(Metric::InnerProduct)),
        Err(_) => Err(Error::invalid(field, format!("unknown metric {v}"))),
    }
}

pub fn metric_to(m: Metric) -> pb::Metric {
    match m {
        Metric::Cosine => pb::Metric::Cosine,
        Metric::L2 => pb::Metric::L2,
        Metric::InnerProduct => pb::Metric::InnerProduct,
    }
}

pub fn precision_from(field: &'static str, v: i32) -> Result<Option<Precision>> {
    match pb::Precision::try_from(v) {
        Ok(pb::Precision::Unspecified) => Ok(None),
        Ok(pb::Precision::F32) => Ok(Some(Precision::F32)),
        Ok(pb::Precision::F16) => Ok(Some(Precision::F16)),
        Ok(pb::Precision::I8) => Ok(Some(Precision::I8)),
        Err(_) => Err(Error::invalid(field, format!("unknown precision {v}"))),
    }
}

pub fn precision_to(p: Precision) -> pb::Precision {
    match p {
        Precision::F32 => pb::Precision::F32,
        Precision::F16 => pb::Precision::F16,
        Precision::I8 => pb::Precision::I8,
    }
}

pub fn create_collection(req: pb::CreateCollectionRequest) -> Result<CreateCollection> {
    let pb::CreateCollectionRequest {
        name,
        dimension,
        metric,
        index,
        precision,
        model,
        keep_inputs,
        pair_model,
    } = req;
    let pb::IndexParams {
        connectivity,
        expansion_add,
        expansion_search,
    } = index.unwrap_or_default();
    Ok(CreateCollection {
        name,
        dimension,
        metric: metric_from("metric", metric)?,
        index: types::IndexParams {
            connectivity,
            expansion_add,
            expansion_search,
        },
        precision: precision_from("precision", precision)?,
        model,
        keep_inputs,
        pair_model,
        model_defaults: None,
    })
}

pub fn collection_info(info: CollectionInfo) -> pb::CollectionInfo {
    let CollectionInfo {
        spec,
        count,
        activation,
    } = info;
    let types::CollectionSpec {
        name,
        dimension,
        metric,
        index,
        precision,
        model,
        keep_inputs,
        dbl_margin,
        dbl_scale,
        threshold,
        pair_model,
        pair_threshold,
        uid: _,
        model_version,
        tree: _,
    } = spec;
    pb::CollectionInfo {
        name,
        dimension,
        metric: metric_to(metric) as i32,
        index: Some(pb::IndexParams {
            connectivity: index.connectivity,
            expansion_add: index.expansion_add,
            expansion_search: index.expansion_search,
        }),
        precision: precision_to(precision) as i32,
        model,
        count,
        keep_inputs,
        dbl_margin: dbl_margin.unwrap_or(0.0),
        threshold: threshold.unwrap_or(0.0),
        dbl_scale: dbl_scale.unwrap_or(1.0),
        pair_model,
        pair_threshold,
        model_version,
        activation: activation.map(activation_to),
    }
}

fn activation_to(a: crate::activation::ActivationInfo) -> pb::Activation {
    use crate::activation::State;
    let state = match a.state {
        State::Running => pb::activation::State::Running,
        State::Done => pb::activation::State::Done,
        State::Failed => pb::activation::State::Failed,
    };
    pb::Activation {
        state: state as i32,
        model: a.model,
        version: a.version,
        done: a.done,
        total: a.total,
        rate: a.rate,
        error: a.error,
    }
}

/// An item, with the input to embed when it has no vector.
pub fn item_from(field: Field, item: pb::Item) -> Result<NewItem> {
    let pb::Item {
        id,
        label,
        metadata,
        vector,
        input,
        generation,
    } = item;
    let input = input
        .map(|i| input_from(field.field("input"), i))
        .transpose()?;
    Ok(NewItem {
        item: ItemData {
            id,
            label,
            metadata: metadata.into_iter().collect(),
            vector,
            input: None,
            generation,
        },
        input,
    })
}

pub fn item_to(item: ItemData) -> pb::Item {
    let ItemData {
        id,
        label,
        metadata,
        vector,
        input,
        generation,
    } = item;
    pb::Item {
        id,
        label,
        metadata: metadata.into_iter().collect(),
        vector,
        input: input.as_deref().and_then(decode_input).map(input_to),
        generation,
    }
}

pub fn input_from(field: Field, input: pb::Input) -> Result<Input> {
    let pb::Input { kind, tower } = input;
    let data = match kind {
        Some(pb::input::Kind::Image(bytes)) => InputData::Image(bytes),
        Some(pb::input::Kind::Tensor(pb::Tensor { shape, values })) => {
            InputData::Tensor { shape, values }
        }
        None => return Err(Error::invalid(field, "empty: set image or tensor")),
    };
    Ok(Input { data, tower })
}

pub fn input_to(data: InputData) -> pb::Input {
    pb::Input {
        kind: Some(match data {
            InputData::Image(bytes) => pb::input::Kind::Image(bytes),
            InputData::Tensor { shape, values } => {
                pb::input::Kind::Tensor(pb::Tensor { shape, values })
            }
        }),
        tower: String::new(),
    }
}

pub fn query_from(field: Field, q: Option<pb::Query>) -> Result<Query> {
    match q.and_then(|q| q.kind) {
        Some(pb::query::Kind::Vector(pb::Vector { values })) => Ok(Query::Vector(values)),
        Some(pb::query::Kind::Id(id)) => Ok(Query::Id(id)),
        Some(pb::query::Kind::Input(input)) => {
            Ok(Query::Input(input_from(field.field("input"), input)?))
        }
        None => Err(Error::invalid(field, "empty: set vector, id or input")),
    }
}

pub fn filter_from(f: Option<pb::Filter>) -> Filter {
    let pb::Filter {
        labels,
        exclude_labels,
        metadata,
    } = f.unwrap_or_default();
    Filter {
        labels,
        exclude_labels,
        metadata: metadata.into_iter().collect(),
    }
}

pub fn search_request(req: pb::SearchRequest) -> Result<(String, Query, SearchParams)> {
    let pb::SearchRequest {
        collection,
        query,
        k,
        filter,
        exact,
        expansion,
        with_vectors,
        with_metadata,
        rerank,
    } = req;
    let query = query_from(Field::name("query"), query)?;
    Ok((
        collection,
        query,
        SearchParams {
            k: k as usize,
            filter: filter_from(filter),
            exact,
            expansion: expansion as usize,
            with_vectors,
            with_metadata,
            rerank: rerank as usize,
        },
    ))
}

pub fn search_batch_request(
    req: pb::SearchBatchRequest,
) -> Result<(String, Vec<Query>, SearchParams)> {
    let pb::SearchBatchRequest {
        collection,
        queries,
        k,
        filter,
        exact,
        expansion,
        with_vectors,
        with_metadata,
        rerank,
    } = req;
    let queries = queries
        .into_iter()
        .enumerate()
        .map(|(i, q)| query_from(Field::name("queries").at(i), Some(q)))
        .collect::<Result<Vec<_>>>()?;
    Ok((
        collection,
        queries,
        SearchParams {
            k: k as usize,
            filter: filter_from(filter),
            exact,
            expansion: expansion as usize,
            with_vectors,
            with_metadata,
            rerank: rerank as usize,
        },
    ))
}

pub fn hits_to(hits: Vec<Hit>) -> pb::SearchResponse {
    pb::SearchResponse {
        hits: hits
            .into_iter()
            .map(|h| {
                let Hit {
                    id,
                    label,
                    distance,
                    metadata,
                    vector,
                    pair_score,
                } = h;
                pb::Hit {
                    id,
                    label,
                    distance,
                    metadata: metadata.into_iter().collect(),
                    vector,
                    pair_score,
                }
            })
            .collect(),
    }
}

pub fn backup_info(info: crate::collections::BackupInfo) -> pb::BackupInfo {
    let crate::collections::BackupInfo {
        path,
        collections,
        items,
        bytes,
        took,
        longest_pause,
    } = info;
    pb::BackupInfo {
        path: path.display().to_string(),
        collections: collections
            .into_iter()
            .map(|(name, items)| pb::BackupCollection { name, items })
            .collect(),
        items,
        bytes,
        seconds: took.as_secs_f64(),
        longest_pause_seconds: longest_pause.as_secs_f64(),
    }
}
