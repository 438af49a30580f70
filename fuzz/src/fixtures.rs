// The fixed secrets the fuzz targets run with. Shared, by `#[path]`, with the test that
// writes the seed corpora (crates/hale/tests/it/fuzz.rs), so sealed seeds open and seed
// tokens verify under exactly these. Not secrets of any real hale.

/// The id of the one key in the fuzzers' keyring.
pub const KEY_ID: &str = "fuzz";
/// Its 32 bytes.
pub const KEY_BYTES: [u8; 32] = [0x42; 32];
/// The JWT signing key of the fuzzers' `Auth`.
pub const SIGNING_KEY: &str = "hale-fuzz-signing-key-0123456789abcdef";
/// The admin token of the fuzzers' `Auth`.
pub const ADMIN_TOKEN: &str = "hale-fuzz-admin-token";
