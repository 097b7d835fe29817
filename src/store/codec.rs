//! The binary layout of stored records. Little-endian, length-prefixed, versioned.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::types::{InputData, ItemData};

const VERSION: u8 = 2;
/// Records written before items had a generation; read as generation 0.
const VERSION_1: u8 = 1;

/// Encodes an item and the ANN key it currently has.
pub fn encode_item(key: u64, item: &ItemData) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        1 + 8 + 4 + item.label.len() + 4 + item.metadata.len() * 16 + 4 + item.vector.len() * 4,
    );
    out.push(VERSION);
    out.extend_from_slice(&key.to_le_bytes());
    out.extend_from_slice(&item.generation.to_le_bytes());
    put_str(&mut out, &item.label);
    out.extend_from_slice(&(item.metadata.len() as u32).to_le_bytes());
    for (k, v) in &item.metadata {
        put_str(&mut out, k);
        put_str(&mut out, v);
    }
    out.extend_from_slice(&(item.vector.len() as u32).to_le_bytes());
    for x in &item.vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// Decodes a record written by [`encode_item`]; `id` comes from the record's key.
pub fn decode_item(id: &str, bytes: &[u8], with_vector: bool) -> Result<(u64, ItemData)> {
    let mut r = Reader { bytes, pos: 0, id };
    let version = r.take(1)?[0];
    if version != VERSION && version != VERSION_1 {
        return Err(Error::Corrupt(format!(
            "item {id}: unknown record version {version}"
        )));
    }
    let key = u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"));
    let generation = if version == VERSION_1 {
        0
    } else {
        u64::from_le_bytes(r.take(8)?.try_into().expect("8 bytes"))
    };
    let label = r.string()?;
    let n = r.u32()? as usize;
    let mut metadata = BTreeMap::new();
    for _ in 0..n {
        let k = r.string()?;
        let v = r.string()?;
        metadata.insert(k, v);
    }
    let dim = r.u32()? as usize;
    let raw = r.take(dim * 4)?;
    let vector = if with_vector {
        raw.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    } else {
        Vec::new()
    };
    Ok((
        key,
        ItemData {
            id: id.to_string(),
            label,
            metadata,
            vector,
            input: None,
            generation,
        },
    ))
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    id: &'a str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::Corrupt(format!(
                "item {}: truncated record",
                self.id
            )));
        };
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::Corrupt(format!("item {}: invalid UTF-8", self.id)))
    }
}

/// Encodes an input for the store: kind byte, then the image bytes, or the shape and
/// values of a tensor (little-endian).
pub fn encode_input(data: &InputData) -> Vec<u8> {
    match data {
        InputData::Image(bytes) => {
            let mut out = Vec::with_capacity(1 + bytes.len());
            out.push(0);
            out.extend_from_slice(bytes);
            out
        }
        InputData::Tensor { shape, values } => {
            let mut out = Vec::with_capacity(5 + shape.len() * 4 + values.len() * 4);
            out.push(1);
            out.extend_from_slice(&(shape.len() as u32).to_le_bytes());
            shape
                .iter()
                .for_each(|d| out.extend_from_slice(&d.to_le_bytes()));
            values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
            out
        }
    }
}

/// Decodes what [`encode_input`] wrote; None when it is not such a record.
pub fn decode_input(raw: &[u8]) -> Option<InputData> {
    let (&kind, rest) = raw.split_first()?;
    match kind {
        0 => Some(InputData::Image(rest.to_vec())),
        1 => {
            let n = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let dims = rest.get(4..4 + n * 4)?;
            let shape = dims
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let values = rest[4 + n * 4..]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            Some(InputData::Tensor { shape, values })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_field() {
        let item = ItemData {
            id: "a/1".into(),
            label: "shirt".into(),
            metadata: [("k".to_string(), "v".to_string())].into_iter().collect(),
            vector: vec![1.5, -2.0, f32::MIN_POSITIVE],
            input: None,
            generation: 9,
        };
        let bytes = encode_item(42, &item);
        let (key, back) = decode_item("a/1", &bytes, true).unwrap();
        assert_eq!(key, 42);
        assert_eq!(back, item);
        let (_, no_vec) = decode_item("a/1", &bytes, false).unwrap();
        assert!(no_vec.vector.is_empty());
    }

    #[test]
    fn version_1_records_read_as_generation_0() {
        // A version-1 record: version, key, label, metadata count, dimension, vector.
        let mut v1 = vec![1u8];
        v1.extend_from_slice(&7u64.to_le_bytes());
        put_str(&mut v1, "cat");
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&2.5f32.to_le_bytes());
        let (key, item) = decode_item("old", &v1, true).unwrap();
        assert_eq!((key, item.label.as_str(), item.generation), (7, "cat", 0));
        assert_eq!(item.vector, vec![2.5]);
    }

    #[test]
    fn truncated_record_is_an_error_not_a_panic() {
        let item = ItemData {
            id: "x".into(),
            vector: vec![1.0; 4],
            ..Default::default()
        };
        let bytes = encode_item(1, &item);
        for cut in 0..bytes.len() {
            assert!(
                decode_item("x", &bytes[..cut], true).is_err(),
                "cut at {cut}"
            );
        }
    }
}
