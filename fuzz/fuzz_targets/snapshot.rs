//! The snapshot decoder: `snapshot::decode` and `snapshot::decode_sealed` with a keyring,
//! on files as they could be found in a damaged or hostile snapshot directory.
//!
//! The first byte picks how the rest becomes a file:
//! 0: as it is (mostly fails the header or checksum);
//! 1: with the header's length and checksum set to match (reaches the format checks, the
//!    key id and the state decoder);
//! 2: seq, time, then the rest sealed under the fuzzers' key (reaches the state decoder
//!    after decryption).
//! Nothing may panic; a state read back must snapshot again and read back equal.

#![no_main]

use hale_core::Timestamp;
use hale_fuzz::take_u64;
use hale_store::Keyring;
use hale_store::snapshot::{self, SnapshotError};
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

static KEYS: LazyLock<Keyring> = LazyLock::new(hale_fuzz::keyring);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else { return };
    let bytes = match mode % 3 {
        0 => rest.to_vec(),
        1 => {
            let mut bytes = rest.to_vec();
            snapshot::fix_header(&mut bytes);
            bytes
        }
        _ => {
            let (seq, created) = (take_u64(&mut rest), Timestamp(take_u64(&mut rest)));
            snapshot::seal_bytes(seq, created, rest, KEYS.current())
        }
    };
    let plain = snapshot::decode(&bytes);
    let opened = snapshot::decode_sealed(&bytes, Some(&KEYS));
    if mode % 3 == 2 {
        assert!(matches!(opened, Ok(_) | Err(SnapshotError::Body(_))), "a sealed snapshot failed to open: {opened:?}");
        assert!(matches!(plain, Err(SnapshotError::KeyNotConfigured(_))), "opened without a key: {plain:?}");
    }
    if let Ok((seq, created, state)) = plain {
        let again = snapshot::decode(&snapshot::encode(seq, created, &state)).expect("a re-encoded state decodes");
        assert_eq!(again, (seq, created, state), "a state changed in a round trip through a snapshot");
    }
    if let Ok((seq, created, state, _)) = opened {
        let sealed = snapshot::encode_with(seq, created, &state, Some(KEYS.current()));
        let (_, _, again, key_id) = snapshot::decode_sealed(&sealed, Some(&KEYS)).expect("a re-sealed state opens");
        assert_eq!((again, key_id.as_deref()), (state, Some(hale_fuzz::fixtures::KEY_ID)));
    }
});
