//! The log record decoder: `Record::decode` and `Record::open` with a keyring, on records
//! as they could be read back from a damaged or hostile log.
//!
//! The first byte picks how the rest becomes a record (seq, time, format, then the body):
//! 0: every field, the checksum too, from the input (mostly fails the checksum);
//! 1: a plaintext record with a matching checksum (reaches the event decoder);
//! 2: a sealed record with a matching checksum, the body as given (reaches the AEAD);
//! 3: the rest sealed under the fuzzers' key (reaches the event decoder after decryption).
//! Nothing may panic; an event read back must re-encode to a record that reads back equal.

#![no_main]

use hale_core::{Event, Timestamp};
use hale_fuzz::{take_u32, take_u64};
use hale_store::{Keyring, Record, RecordError};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, LazyLock};

static KEYS: LazyLock<Keyring> = LazyLock::new(hale_fuzz::keyring);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let (seq, at) = (take_u64(&mut rest), Timestamp(take_u64(&mut rest)));
    let format = take_u32(&mut rest);
    let body = rest.to_vec();
    let record = match mode % 4 {
        0 => {
            let crc = take_u32(&mut rest);
            let key_id = (format & 1 == 1).then(|| Arc::from(hale_fuzz::fixtures::KEY_ID));
            Record { seq, at, format, body: rest.to_vec(), crc, key_id }
        }
        1 => Record::with_checksum(seq, at, format, body, None),
        2 => {
            // Key ids the ring knows and does not know.
            let key_id = if mode & 0x80 == 0 { hale_fuzz::fixtures::KEY_ID } else { "other" };
            Record::with_checksum(seq, at, format, body, Some(Arc::from(key_id)))
        }
        _ => Record::seal_bytes(seq, at, &body, KEYS.current()),
    };
    let plain = record.decode();
    let opened = record.open(Some(&KEYS));
    if mode % 4 == 3 {
        // It was sealed with a key of the ring: only the event inside can be wrong.
        assert!(matches!(opened, Ok(_) | Err(RecordError::Body(_))), "a sealed record failed to open: {opened:?}");
        assert_eq!(plain, Err(RecordError::KeyNotConfigured(hale_fuzz::fixtures::KEY_ID.into())));
    }
    for event in [plain, opened].into_iter().flatten() {
        round_trip(seq, at, &event);
    }
});

fn round_trip(seq: u64, at: Timestamp, event: &Event) {
    let again = Record::encode(seq, at, event).decode().expect("a re-encoded event decodes");
    assert_eq!(&again, event, "an event changed in a round trip through the log");
    let sealed = Record::encode_with(seq, at, event, Some(KEYS.current()));
    assert_eq!(sealed.open(Some(&KEYS)).as_ref(), Ok(event), "a re-sealed event changed");
}
