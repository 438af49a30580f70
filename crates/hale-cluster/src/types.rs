//! What hale puts in a Raft entry, and openraft's type configuration for hale.

use base64::Engine as _;
use hale_store::Record;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A node of the cluster: `[cluster] node_id`.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's types for hale: an entry carries a [`Batch`]; applying it answers the
    /// [`Applied`] position; nodes are known by id and address.
    pub TypeConfig:
        D = Batch,
        R = Applied,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        SnapshotData = std::io::Cursor<Vec<u8>>,
);

/// The records of one engine append, in sequence order: one Raft entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub records: Vec<WireRecord>,
}

impl Batch {
    /// The batch of `records`, as the engine appended them.
    pub fn of(records: &[Record]) -> Batch {
        Batch { records: records.iter().map(WireRecord::from).collect() }
    }

    /// The sequence number of its last record (`None` for an empty batch).
    pub fn last_seq(&self) -> Option<u64> {
        self.records.last().map(|record| record.seq)
    }
}

/// What applying an entry answers: the last hale sequence number folded so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub last_seq: u64,
}

/// A hale record as Raft carries and stores it: the stored bytes (plain or sealed) and the
/// checksum the record was written with, so a follower stores exactly what the leader
/// did and damage anywhere is found by the same check.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireRecord {
    pub seq: u64,
    pub at_ms: u64,
    pub format: u32,
    #[serde(with = "base64_bytes")]
    pub body: Vec<u8>,
    pub crc: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl From<&Record> for WireRecord {
    fn from(record: &Record) -> WireRecord {
        WireRecord {
            seq: record.seq,
            at_ms: record.at.0,
            format: record.format,
            body: record.body.clone(),
            crc: record.crc,
            key_id: record.key_id.as_deref().map(str::to_string),
        }
    }
}

impl WireRecord {
    /// The record again, checksum and all (checked when it is decoded).
    pub fn to_record(&self) -> Record {
        Record {
            seq: self.seq,
            at: hale_core::Timestamp(self.at_ms),
            format: self.format,
            body: self.body.clone(),
            crc: self.crc,
            key_id: self.key_id.as_deref().map(Arc::from),
        }
    }
}

mod base64_bytes {
    use super::*;

    pub fn serialize<S: serde::Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD.decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_crosses_the_wire_unchanged_and_still_decodes() {
        let event = hale_core::Event::Released { agent: hale_core::AgentName::new("a").unwrap() };
        let record = Record::encode(7, hale_core::Timestamp(1_700), &event);
        let batch = Batch::of(std::slice::from_ref(&record));
        let text = serde_json::to_string(&batch).unwrap();
        let back: Batch = serde_json::from_str(&text).unwrap();
        assert_eq!(back, batch);
        assert_eq!(back.last_seq(), Some(7));
        let again = back.records[0].to_record();
        assert_eq!(again, record);
        assert_eq!(again.decode().unwrap(), event);
    }
}
