//! What the fuzz targets share: the fixed keyring and `Auth` they run the production
//! decoders with.

#[path = "fixtures.rs"]
pub mod fixtures;

use hale_store::{Key, Keyring};

/// The fuzzers' key.
pub fn key() -> Key {
    Key::new(fixtures::KEY_ID, &fixtures::KEY_BYTES).expect("a valid key id")
}

/// A keyring of the fuzzers' key only.
pub fn keyring() -> Keyring {
    Keyring::new(key(), []).expect("one key")
}

/// An `Auth` with the fixed admin token and signing key; every agent in generation 0.
pub fn auth() -> hale_server::auth::Auth {
    let config = hale_server::auth::AuthConfig::default();
    hale_server::auth::Auth::with_secrets(fixtures::ADMIN_TOKEN.to_string(), fixtures::SIGNING_KEY, config)
}

/// Reads a little-endian `u64` from the front of `data`, zero-padded if short, and
/// advances past it.
pub fn take_u64(data: &mut &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let n = data.len().min(8);
    bytes[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u64::from_le_bytes(bytes)
}

/// Reads a little-endian `u32` likewise.
pub fn take_u32(data: &mut &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    u32::from_le_bytes(bytes)
}
