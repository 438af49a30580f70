use hale_core::{Event, Timestamp};

/// The log format this hale writes: the serde JSON shape of `hale_core::Event`.
pub const FORMAT: u32 = 1;

/// One encoded log record, checksummed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub at: Timestamp,
    pub format: u32,
    pub body: Vec<u8>,
    pub crc: u32,
}

/// Why a record read back from the log cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The stored checksum does not match the record.
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    /// The format number is unknown.
    #[error("unknown format {0}")]
    Format(u32),
    /// The body is not a valid event.
    #[error("undecodable body: {0}")]
    Body(String),
}

impl Record {
    /// Encodes `event` as record `seq`.
    pub fn encode(seq: u64, at: Timestamp, event: &Event) -> Record {
        Record::new(seq, at, FORMAT, serde_json::to_vec(event).expect("events always serialize"))
    }

    /// A checksummed record of any format (e.g. one converted from an older format).
    pub fn new(seq: u64, at: Timestamp, format: u32, body: Vec<u8>) -> Record {
        let crc = checksum(seq, at, format, &body);
        Record { seq, at, format, body, crc }
    }

    /// Whether the stored checksum matches.
    pub fn check(&self) -> Result<(), RecordError> {
        let computed = checksum(self.seq, self.at, self.format, &self.body);
        if computed != self.crc {
            return Err(RecordError::Checksum { stored: self.crc, computed });
        }
        Ok(())
    }

    /// Checks the record and decodes its event.
    pub fn decode(&self) -> Result<Event, RecordError> {
        self.check()?;
        if self.format != FORMAT {
            return Err(RecordError::Format(self.format));
        }
        serde_json::from_slice(&self.body).map_err(|error| RecordError::Body(error.to_string()))
    }
}

/// crc32c over the sequence number, time and format (little endian) and the body, so a
/// record copied to the wrong place fails as surely as a flipped bit.
fn checksum(seq: u64, at: Timestamp, format: u32, body: &[u8]) -> u32 {
    let mut crc = crc32c::crc32c(&seq.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &at.0.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &format.to_le_bytes());
    crc32c::crc32c_append(crc, body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hale_core::AgentName;

    fn event() -> Event {
        Event::IncarnationStarted { agent: AgentName::new("a").unwrap(), incarnation: 3 }
    }

    #[test]
    fn round_trip() {
        let record = Record::encode(7, Timestamp(99), &event());
        assert_eq!(record.decode(), Ok(event()));
    }

    #[test]
    fn every_field_is_covered_by_the_checksum() {
        let record = Record::encode(7, Timestamp(99), &event());
        let mutations: [fn(&mut Record); 4] =
            [|r| r.seq += 1, |r| r.at.0 += 1, |r| r.format += 1, |r| r.body[3] ^= 0x01];
        for mutate in mutations {
            let mut damaged = record.clone();
            mutate(&mut damaged);
            assert!(matches!(damaged.decode(), Err(RecordError::Checksum { .. })));
        }
    }
}
