use crate::crypt::{Key, Keyring, NONCE_LEN, TAG_LEN};
use hale_core::{Event, Timestamp};
use std::sync::Arc;

/// The log format this hale writes: the serde JSON shape of `hale_core::Event`.
pub const FORMAT: u32 = 1;

/// Set in `format` when the body is sealed (encryption at rest): the low bits are still
/// the event format. An older hale sees a format it does not know and refuses to start
/// ("upgrade hale") instead of taking the ciphertext for a damaged record.
pub const ENCRYPTED: u32 = 1 << 16;

/// One encoded log record, checksummed.
///
/// A sealed record has `key_id` set, [`ENCRYPTED`] in `format`, and a body of
/// `nonce || ciphertext || tag` (see [`crate::crypt`]); the checksum covers the stored
/// bytes and the key id, so damage is found without the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub at: Timestamp,
    pub format: u32,
    pub body: Vec<u8>,
    pub crc: u32,
    /// The key the body is sealed with; `None` for a plaintext body.
    pub key_id: Option<Arc<str>>,
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
    /// The record is sealed with a key that is not configured. Not damage.
    #[error("it is encrypted with key '{0}', which is not configured")]
    KeyNotConfigured(String),
    /// The key configured under the record's key id does not open it. Not damage: the
    /// checksum matched.
    #[error("key '{0}' does not decrypt it: wrong key")]
    WrongKey(String),
}

impl RecordError {
    /// A key problem, not damage: never to be set aside by `--repair`.
    pub fn is_key_problem(&self) -> bool {
        matches!(self, RecordError::KeyNotConfigured(_) | RecordError::WrongKey(_))
    }
}

impl Record {
    /// Encodes `event` as record `seq`, in plaintext.
    pub fn encode(seq: u64, at: Timestamp, event: &Event) -> Record {
        Record::new(seq, at, FORMAT, serde_json::to_vec(event).expect("events always serialize"))
    }

    /// Encodes `event` as record `seq`, sealed with `key` if one is given.
    pub fn encode_with(seq: u64, at: Timestamp, event: &Event, key: Option<&Key>) -> Record {
        let Some(key) = key else { return Record::encode(seq, at, event) };
        Record::sealed(seq, at, key, 256, |body| serde_json::to_writer(body, event).expect("events always serialize"))
    }

    /// Record `seq` with `plain` (any bytes, not necessarily an event) sealed under `key`
    /// as [`Record::encode_with`] seals an event (for fuzzing and tests: what a sealed
    /// record's opener does with a body that decrypts but does not decode).
    pub fn seal_bytes(seq: u64, at: Timestamp, plain: &[u8], key: &Key) -> Record {
        Record::sealed(seq, at, key, plain.len(), |body| body.extend_from_slice(plain))
    }

    /// Seals what `write` appends to the body, then checksums the record.
    fn sealed(seq: u64, at: Timestamp, key: &Key, capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Record {
        let format = FORMAT | ENCRYPTED;
        let mut body = Vec::with_capacity(NONCE_LEN + capacity + TAG_LEN);
        body.resize(NONCE_LEN, 0);
        write(&mut body);
        key.seal_in_place(&associated(seq, at, format, key.id()), &mut body, 0);
        Record::with_checksum(seq, at, format, body, Some(key.id_arc()))
    }

    /// A checksummed plaintext record of any format (e.g. one converted from an older format).
    pub fn new(seq: u64, at: Timestamp, format: u32, body: Vec<u8>) -> Record {
        Record::with_checksum(seq, at, format, body, None)
    }

    /// A record of any fields, stored body and key id as given, with the checksum that
    /// matches them (for fuzzing and tests: inputs that get past the checksum).
    pub fn with_checksum(seq: u64, at: Timestamp, format: u32, body: Vec<u8>, key_id: Option<Arc<str>>) -> Record {
        let crc = checksum(seq, at, format, &body, key_id.as_deref());
        Record { seq, at, format, body, crc, key_id }
    }

    /// Whether the body is sealed.
    pub fn is_encrypted(&self) -> bool {
        self.key_id.is_some()
    }

    /// Whether the stored checksum matches.
    pub fn check(&self) -> Result<(), RecordError> {
        let computed = checksum(self.seq, self.at, self.format, &self.body, self.key_id.as_deref());
        if computed != self.crc {
            return Err(RecordError::Checksum { stored: self.crc, computed });
        }
        Ok(())
    }

    /// Checks the record and decodes its event (a sealed record needs [`Record::open`]).
    pub fn decode(&self) -> Result<Event, RecordError> {
        self.open(None)
    }

    /// Checks the record, opens it with its key from `keys` if it is sealed, and decodes
    /// its event.
    pub fn open(&self, keys: Option<&Keyring>) -> Result<Event, RecordError> {
        self.check()?;
        let plain;
        let body = match (&self.key_id, self.format & ENCRYPTED != 0) {
            (None, false) => &self.body[..],
            (Some(key_id), true) => {
                // The event format is checked before the key: a newer format is not a
                // key problem.
                if self.format & !ENCRYPTED != FORMAT {
                    return Err(RecordError::Format(self.format));
                }
                let key = keys
                    .and_then(|keys| keys.get(key_id))
                    .ok_or_else(|| RecordError::KeyNotConfigured(key_id.to_string()))?;
                plain = key
                    .open(&associated(self.seq, self.at, self.format, key_id), &self.body)
                    .map_err(|_| RecordError::WrongKey(key_id.to_string()))?;
                &plain[..]
            }
            (Some(_), false) => return Err(RecordError::Body("a key id on a plaintext record".into())),
            (None, true) => return Err(RecordError::Body("an encrypted record without a key id".into())),
        };
        if self.format != FORMAT && self.format != FORMAT | ENCRYPTED {
            return Err(RecordError::Format(self.format));
        }
        serde_json::from_slice(body).map_err(|error| RecordError::Body(error.to_string()))
    }
}

/// What a sealed body is bound to: moved to another record (or given another time,
/// format or key id) it no longer opens.
fn associated(seq: u64, at: Timestamp, format: u32, key_id: &str) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(11 + 8 + 8 + 4 + key_id.len());
    bytes.extend_from_slice(b"hale-record");
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&at.0.to_le_bytes());
    bytes.extend_from_slice(&format.to_le_bytes());
    bytes.extend_from_slice(key_id.as_bytes());
    bytes
}

/// crc32c over the sequence number, time and format (little endian), the body and, for a
/// sealed record, the key id, so a record copied to the wrong place fails as surely as a
/// flipped bit. (A plaintext record's checksum is what it was before encryption existed.)
fn checksum(seq: u64, at: Timestamp, format: u32, body: &[u8], key_id: Option<&str>) -> u32 {
    let mut crc = crc32c::crc32c(&seq.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &at.0.to_le_bytes());
    crc = crc32c::crc32c_append(crc, &format.to_le_bytes());
    crc = crc32c::crc32c_append(crc, body);
    match key_id {
        Some(key_id) => crc32c::crc32c_append(crc, key_id.as_bytes()),
        None => crc,
    }
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

    /// Found by fuzz/frame: a float parsed from a long literal must survive the log
    /// exactly (serde_json's `float_roundtrip`), or replay drifts from the live state.
    #[test]
    fn a_float_round_trips_exactly_through_a_record() {
        let long = "4444444444444444444444444444444444444444444";
        let patch: serde_json::Value = serde_json::from_str(&format!(r#"{{"tokens_out":{long}}}"#)).unwrap();
        let event = Event::Checkpointed { agent: AgentName::new("a").unwrap(), incarnation: 1, version: 1, patch };
        let again = Record::encode(7, Timestamp(99), &event).decode().unwrap();
        assert_eq!(again, event);
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

    fn keys(text: &[(&str, u8)]) -> Keyring {
        let mut keys = text.iter().map(|(id, byte)| Key::new(id, &[*byte; 32]).unwrap());
        let current = keys.next().unwrap();
        Keyring::new(current, keys).unwrap()
    }

    fn secret_event() -> Event {
        Event::Checkpointed {
            agent: AgentName::new("a").unwrap(),
            incarnation: 1,
            version: 1,
            patch: serde_json::json!({"note": "SECRET-PAYLOAD-4711"}),
        }
    }

    #[test]
    fn a_sealed_record_round_trips_and_hides_its_event() {
        let ring = keys(&[("k1", 1)]);
        let record = Record::encode_with(7, Timestamp(99), &secret_event(), Some(ring.current()));
        assert_eq!(record.key_id.as_deref(), Some("k1"));
        assert_eq!(record.format, FORMAT | ENCRYPTED);
        assert!(!record.body.windows(6).any(|w| w == b"SECRET"), "plaintext in the body");
        assert_eq!(record.open(Some(&ring)), Ok(secret_event()));
        // Without a key the checksum still verifies.
        assert_eq!(record.check(), Ok(()));
        // And a plaintext record still reads with or without a ring.
        let plain = Record::encode_with(8, Timestamp(99), &event(), None);
        assert_eq!((plain.key_id.as_deref(), plain.format), (None, FORMAT));
        assert_eq!(plain.open(Some(&ring)), Ok(event()));
        assert_eq!(plain.decode(), Ok(event()));
    }

    #[test]
    fn a_missing_or_wrong_key_is_a_key_problem_not_damage() {
        let record = Record::encode_with(7, Timestamp(99), &event(), Some(keys(&[("k1", 1)]).current()));
        let missing = record.open(Some(&keys(&[("k2", 1)]))).unwrap_err();
        assert_eq!(missing, RecordError::KeyNotConfigured("k1".into()));
        assert_eq!(record.decode().unwrap_err(), RecordError::KeyNotConfigured("k1".into()));
        let wrong = record.open(Some(&keys(&[("k1", 2)]))).unwrap_err();
        assert_eq!(wrong, RecordError::WrongKey("k1".into()));
        assert!(missing.is_key_problem() && wrong.is_key_problem());
        // An older key in the ring opens what it sealed.
        assert_eq!(record.open(Some(&keys(&[("k2", 2), ("k1", 1)]))), Ok(event()));
    }

    #[test]
    fn a_sealed_body_moved_to_another_record_does_not_open() {
        let ring = keys(&[("k1", 1)]);
        let record = Record::encode_with(7, Timestamp(99), &event(), Some(ring.current()));
        // Moved with a checksum made to match: the checksum cannot tell, the AEAD can.
        for (seq, at) in [(8, 99), (7, 100)] {
            let mut moved = record.clone();
            (moved.seq, moved.at) = (seq, Timestamp(at));
            moved.crc = checksum(moved.seq, moved.at, moved.format, &moved.body, moved.key_id.as_deref());
            assert_eq!(moved.open(Some(&ring)), Err(RecordError::WrongKey("k1".into())));
        }
        // Every stored field, the key id too, is under the checksum.
        let mutations: [fn(&mut Record); 6] = [
            |r| r.seq += 1,
            |r| r.at.0 += 1,
            |r| r.format ^= ENCRYPTED,
            |r| r.body[30] ^= 0x01,
            |r| r.key_id = Some("k2".into()),
            |r| r.key_id = None,
        ];
        for mutate in mutations {
            let mut damaged = record.clone();
            mutate(&mut damaged);
            assert!(matches!(damaged.open(Some(&ring)), Err(RecordError::Checksum { .. })));
        }
    }

    #[test]
    fn a_sealed_record_of_a_newer_event_format_says_so() {
        let ring = keys(&[("k1", 1)]);
        let mut record = Record::encode_with(7, Timestamp(99), &event(), Some(ring.current()));
        record.format = (FORMAT + 1) | ENCRYPTED;
        record.crc = checksum(record.seq, record.at, record.format, &record.body, record.key_id.as_deref());
        assert_eq!(record.open(Some(&ring)), Err(RecordError::Format((FORMAT + 1) | ENCRYPTED)));
    }
}

#[cfg(test)]
mod cost {
    use super::*;
    use hale_core::AgentName;

    /// What sealing and opening cost per record, beside plain encoding and decoding:
    /// `cargo test -p hale-store --release record::cost -- --ignored --nocapture`.
    #[test]
    #[ignore = "a measurement, not a test"]
    fn per_record_cost() {
        let key = Key::new("k1", &[7; 32]).unwrap();
        let keys = Keyring::new(key.clone(), []).unwrap();
        let event = Event::Checkpointed {
            agent: AgentName::new("bench-12345-17").unwrap(),
            incarnation: 1,
            version: 42,
            patch: serde_json::json!({"lane": 3, "n": 12345, "note": "step done"}),
        };
        const N: u64 = 200_000;
        {
            use rand::RngCore;
            let mut nonce = [0u8; 24];
            let started = std::time::Instant::now();
            for _ in 0..N {
                rand::rng().fill_bytes(&mut nonce);
                std::hint::black_box(&nonce);
            }
            println!("nonce: {:.3} µs", started.elapsed().as_secs_f64() * 1e6 / N as f64);
            let mut buffer = vec![0u8; 24 + 120];
            let started = std::time::Instant::now();
            for _ in 0..N {
                buffer.truncate(24 + 120);
                key.seal_in_place(b"hale-record0123456789012345678", &mut buffer, 0);
                std::hint::black_box(&buffer);
            }
            println!("seal 120 bytes: {:.3} µs", started.elapsed().as_secs_f64() * 1e6 / N as f64);
        }
        for sealed in [false, true] {
            let key = sealed.then_some(&key);
            let started = std::time::Instant::now();
            let records: Vec<Record> =
                (1..=N).map(|seq| Record::encode_with(seq, Timestamp(seq), &event, key)).collect();
            let encode = started.elapsed();
            let started = std::time::Instant::now();
            for record in &records {
                std::hint::black_box(record.open(Some(&keys)).unwrap());
            }
            let decode = started.elapsed();
            println!(
                "sealed={sealed}: encode {:.2} µs/record, decode {:.2} µs/record, body {} bytes",
                encode.as_secs_f64() * 1e6 / N as f64,
                decode.as_secs_f64() * 1e6 / N as f64,
                records[0].body.len()
            );
        }
    }
}
