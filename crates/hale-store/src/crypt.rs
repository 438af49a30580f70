//! Encryption at rest: XChaCha20-Poly1305 under keys named by an id.
//!
//! A [`Keyring`] holds the current key (new records and snapshots are sealed with it) and
//! older keys kept for reading what they sealed. Each sealed record or snapshot names its
//! key by id, so a key can be rotated without rewriting the log. Sealed bytes are
//! `nonce (24 bytes, random) || ciphertext || tag (16 bytes)`; what the ciphertext must
//! stay attached to (a record's sequence number, time, format and key id) is bound as
//! associated data, so a ciphertext moved to another record fails to open.
//!
//! Keys are written as `ID:BASE64` (32 random bytes in standard base64), one per line or
//! separated by commas, the current one first; `#` starts a comment line. `hale keygen`
//! prints such a line.
//!
//! XChaCha20-Poly1305 is built as its specification (draft-irtf-cfrg-xchacha) builds it:
//! HChaCha20 of the key and the nonce's first 16 bytes gives a subkey, and
//! ChaCha20-Poly1305 (RFC 8439) under that subkey seals with the nonce `0000 ||` its last 8
//! bytes. HChaCha20 comes from the `chacha20` crate and the AEAD from ring, whose
//! assembly is about ten times faster on a short record than the RustCrypto AEAD (which
//! the tests keep as the reference the output must match byte for byte).
//!
//! The store decides nothing about keys: which ring to use is the caller's business.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::{RngCore, TryRngCore};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use std::fmt;
use std::sync::Arc;
use zeroize::{Zeroize, Zeroizing};

/// Random nonce before each ciphertext.
pub const NONCE_LEN: usize = 24;
/// Authentication tag after each ciphertext.
pub const TAG_LEN: usize = 16;
/// A key is 32 bytes.
pub const KEY_LEN: usize = 32;
/// Longest key id.
pub const KEY_ID_MAX: usize = 64;

/// Why a key or a key list was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key id {0:?} is not valid: an id is 1 to 64 letters, digits, '.', '_' or '-' (for example k1 or 2026-11)")]
    BadId(String),
    #[error(
        "{at}: expected ID:BASE64 (a key id, a colon, and 32 random bytes in standard base64, as `hale keygen` prints), found {found}"
    )]
    Malformed { at: String, found: String },
    #[error("{at}: the key of {id:?} is not valid base64 ({reason}); `hale keygen` prints a valid key line")]
    Base64 { at: String, id: String, reason: String },
    #[error("{at}: the key of {id:?} is {len} bytes; a key is exactly 32 bytes (`hale keygen` makes one)")]
    Length { at: String, id: String, len: usize },
    #[error("key id {0:?} is given twice; every key needs its own id")]
    Duplicate(String),
    #[error("no key found: expected one ID:BASE64 per line, the current key first")]
    Empty,
    #[error("the operating system gave no randomness: {0}")]
    Random(String),
}

/// One named key. Its bytes are wiped from memory when it is dropped.
#[derive(Clone)]
pub struct Key {
    id: Arc<str>,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key bytes.
        f.debug_struct("Key").field("id", &self.id).finish_non_exhaustive()
    }
}

/// The AEAD refused: the key is not the one that sealed the bytes, or the bytes (or what
/// they are bound to) changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpenFailed;

impl Key {
    /// A key named `id` from its 32 bytes.
    pub fn new(id: &str, bytes: &[u8; KEY_LEN]) -> Result<Key, KeyError> {
        check_id(id)?;
        Ok(Key { id: Arc::from(id), bytes: Zeroizing::new(*bytes) })
    }

    /// Its id, stored beside everything it seals.
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn id_arc(&self) -> Arc<str> {
        self.id.clone()
    }

    /// Seals `buffer[start + NONCE_LEN..]` in place: fills the `NONCE_LEN` bytes at
    /// `start` (which the caller reserved) with a fresh random nonce and appends the tag.
    pub(crate) fn seal_in_place(&self, associated: &[u8], buffer: &mut Vec<u8>, start: usize) {
        assert!(buffer.len() >= start + NONCE_LEN, "room for the nonce is reserved");
        let (nonce, plain) = buffer[start..].split_at_mut(NONCE_LEN);
        // ThreadRng: ChaCha12 seeded from the operating system and reseeded by it, so a
        // nonce costs no system call; 192-bit random nonces do not collide in practice.
        rand::rng().fill_bytes(nonce);
        let (key, nonce) = self.subkey(nonce);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(associated), plain)
            .expect("ChaCha20-Poly1305 seals any length hale writes");
        buffer.extend_from_slice(tag.as_ref());
    }

    /// The ChaCha20-Poly1305 key and nonce that XChaCha20-Poly1305 uses for `nonce`.
    fn subkey(&self, nonce: &[u8]) -> (LessSafeKey, Nonce) {
        let input: [u8; 16] = nonce[..16].try_into().expect("24-byte nonce");
        let mut subkey: [u8; KEY_LEN] = chacha20::hchacha::<chacha20::R20>(&(*self.bytes).into(), &input.into()).into();
        let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &subkey).expect("32-byte key"));
        subkey.zeroize();
        let mut short = [0u8; 12];
        short[4..].copy_from_slice(&nonce[16..NONCE_LEN]);
        (key, Nonce::assume_unique_for_key(short))
    }

    /// Opens bytes sealed by [`Key::seal_in_place`] with the same associated data.
    pub(crate) fn open(&self, associated: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenFailed> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(OpenFailed);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (key, nonce) = self.subkey(nonce);
        let mut plain = rest.to_vec();
        let len = key.open_in_place(nonce, Aad::from(associated), &mut plain).map_err(|_| OpenFailed)?.len();
        plain.truncate(len);
        Ok(plain)
    }
}

/// The keys hale may use: the current one seals, every one opens what it sealed.
#[derive(Clone, Debug)]
pub struct Keyring {
    /// The current key first; ids are unique.
    keys: Vec<Key>,
}

impl Keyring {
    /// A ring of `current` and older keys kept for reading.
    pub fn new(current: Key, older: impl IntoIterator<Item = Key>) -> Result<Keyring, KeyError> {
        let mut keys = vec![current];
        for key in older {
            if keys.iter().any(|known| known.id == key.id) {
                return Err(KeyError::Duplicate(key.id.to_string()));
            }
            keys.push(key);
        }
        Ok(Keyring { keys })
    }

    /// Parses `ID:BASE64` entries, one per line or separated by commas, the current key
    /// first. Blank lines and lines starting with `#` are skipped.
    pub fn parse(text: &str) -> Result<Keyring, KeyError> {
        let mut keys = Vec::new();
        let one_line = !text.trim().contains('\n');
        for (line, content) in text.lines().enumerate() {
            if content.trim_start().starts_with('#') {
                continue;
            }
            let entries = content.split(',').map(str::trim).filter(|entry| !entry.is_empty());
            for (index, entry) in entries.enumerate() {
                let at = if one_line { format!("entry {}", index + 1) } else { format!("line {}", line + 1) };
                let Some((id, encoded)) = entry.split_once(':') else {
                    return Err(KeyError::Malformed { at, found: describe(entry) });
                };
                let (id, encoded) = (id.trim(), encoded.trim());
                check_id(id)?;
                let bytes = Zeroizing::new(BASE64.decode(encoded).map_err(|error| KeyError::Base64 {
                    at: at.clone(),
                    id: id.to_string(),
                    reason: error.to_string(),
                })?);
                let bytes: Zeroizing<[u8; KEY_LEN]> =
                    Zeroizing::new(bytes.as_slice().try_into().map_err(|_| KeyError::Length {
                        at,
                        id: id.to_string(),
                        len: bytes.len(),
                    })?);
                keys.push(Key::new(id, &bytes)?);
            }
        }
        let mut keys = keys.into_iter();
        let current = keys.next().ok_or(KeyError::Empty)?;
        Keyring::new(current, keys)
    }

    /// The key new records and snapshots are sealed with.
    pub fn current(&self) -> &Key {
        &self.keys[0]
    }

    /// The key named `id`, if configured.
    pub fn get(&self, id: &str) -> Option<&Key> {
        self.keys.iter().find(|key| &*key.id == id)
    }

    /// Every configured id, the current one first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|key| key.id())
    }
}

/// A fresh key line `ID:BASE64` from the operating system's randomness.
pub fn generate_key_line(id: &str) -> Result<String, KeyError> {
    check_id(id)?;
    let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.try_fill_bytes(&mut *bytes).map_err(|error| KeyError::Random(error.to_string()))?;
    Ok(format!("{id}:{}", BASE64.encode(*bytes)))
}

fn check_id(id: &str) -> Result<(), KeyError> {
    let valid = !id.is_empty()
        && id.len() <= KEY_ID_MAX
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid { Ok(()) } else { Err(KeyError::BadId(id.to_string())) }
}

/// What a malformed entry looked like, without echoing what may be key material.
fn describe(entry: &str) -> String {
    format!("{} characters without a colon", entry.chars().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> Key {
        Key::new(id, &[byte; KEY_LEN]).unwrap()
    }

    fn seal(key: &Key, associated: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut buffer = vec![0; NONCE_LEN];
        buffer.extend_from_slice(plain);
        key.seal_in_place(associated, &mut buffer, 0);
        buffer
    }

    /// Sealed by the RustCrypto XChaCha20-Poly1305 (what hale used before, and what every
    /// record sealed then holds): `nonce || ciphertext || tag`.
    fn reference_seal(bytes: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], associated: &[u8], plain: &[u8]) -> Vec<u8> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new_from_slice(bytes).unwrap();
        let sealed = cipher.encrypt(&(*nonce).into(), Payload { msg: plain, aad: associated }).unwrap();
        [&nonce[..], &sealed].concat()
    }

    #[test]
    fn sealing_matches_the_reference_xchacha20_poly1305_both_ways() {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let bytes: [u8; KEY_LEN] = std::array::from_fn(|i| 0x80 + i as u8);
        let ours = Key::new("k1", &bytes).unwrap();
        for len in [0usize, 1, 15, 16, 63, 64, 65, 120, 1000, 4097] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
            let associated = format!("hale-record-{len}");
            // Ours opens what the reference sealed, with the same bytes out.
            let nonce: [u8; NONCE_LEN] = std::array::from_fn(|i| (len + i) as u8);
            let theirs = reference_seal(&bytes, &nonce, associated.as_bytes(), &plain);
            assert_eq!(ours.open(associated.as_bytes(), &theirs).unwrap(), plain, "len {len}");
            // The reference opens what ours sealed.
            let sealed = seal(&ours, associated.as_bytes(), &plain);
            let cipher = chacha20poly1305::XChaCha20Poly1305::new_from_slice(&bytes).unwrap();
            let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().unwrap();
            let opened = cipher
                .decrypt(&nonce.into(), Payload { msg: &sealed[NONCE_LEN..], aad: associated.as_bytes() })
                .expect("the reference opens ours");
            assert_eq!(opened, plain, "len {len}");
            // Byte for byte: the same nonce gives the same ciphertext and tag.
            assert_eq!(sealed, reference_seal(&bytes, &nonce, associated.as_bytes(), &plain), "len {len}");
            // And a changed byte anywhere is refused.
            let mut tampered = theirs.clone();
            let last = tampered.len() - 1;
            tampered[last] ^= 1;
            assert_eq!(ours.open(associated.as_bytes(), &tampered), Err(OpenFailed));
            assert_eq!(ours.open(b"another record", &theirs), Err(OpenFailed));
        }
    }

    #[test]
    fn sealed_bytes_open_only_with_the_same_key_and_associated_data() {
        let sealed = seal(&key("k1", 1), b"ad", b"hello");
        assert_eq!(sealed.len(), NONCE_LEN + 5 + TAG_LEN);
        assert_eq!(key("k1", 1).open(b"ad", &sealed).unwrap(), b"hello");
        assert_eq!(key("k1", 2).open(b"ad", &sealed), Err(OpenFailed));
        assert_eq!(key("k1", 1).open(b"other", &sealed), Err(OpenFailed));
        assert_eq!(key("k1", 1).open(b"ad", &sealed[..10]), Err(OpenFailed));
        // Fresh nonces: the same plaintext never seals the same way twice.
        assert_ne!(seal(&key("k1", 1), b"ad", b"hello"), sealed);
    }

    #[test]
    fn key_lines_parse_current_first_and_refuse_what_is_wrong() {
        let a = generate_key_line("new").unwrap();
        let b = generate_key_line("old-1").unwrap();
        let ring = Keyring::parse(&format!("# keys\n{a}\n\n{b}\n")).unwrap();
        assert_eq!(ring.ids().collect::<Vec<_>>(), ["new", "old-1"]);
        assert_eq!(ring.current().id(), "new");
        assert!(ring.get("old-1").is_some() && ring.get("other").is_none());
        assert_eq!(Keyring::parse(&format!("{a},{b}")).unwrap().current().id(), "new");

        assert_eq!(Keyring::parse(" \n# nothing\n").unwrap_err(), KeyError::Empty);
        assert!(matches!(Keyring::parse("justbase64"), Err(KeyError::Malformed { at, .. }) if at == "entry 1"));
        let second = Keyring::parse(&format!("{a}, nocolon")).unwrap_err();
        assert!(matches!(&second, KeyError::Malformed { at, .. } if at == "entry 2"), "{second}");
        let on_line_3 = Keyring::parse(&format!("# keys\n{a}\nk9:AAAA\n")).unwrap_err();
        assert!(matches!(&on_line_3, KeyError::Length { at, .. } if at == "line 3"), "{on_line_3}");
        assert!(matches!(Keyring::parse("bad id:AAAA"), Err(KeyError::BadId(_))));
        assert!(matches!(Keyring::parse("k:AAAA"), Err(KeyError::Length { len: 3, .. })));
        assert!(matches!(Keyring::parse("k:!!"), Err(KeyError::Base64 { .. })));
        assert!(matches!(Keyring::parse(&format!("{a}\n{a}")), Err(KeyError::Duplicate(id)) if id == "new"));
        // Errors never echo key material.
        let error = Keyring::parse("c2VjcmV0c2VjcmV0").unwrap_err().to_string();
        assert!(!error.contains("c2VjcmV0"), "{error}");
        assert!(!format!("{:?}", ring.current()).contains(&a[4..]));
    }
}
