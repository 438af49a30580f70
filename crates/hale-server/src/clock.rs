use hale_core::Timestamp;
use std::time::{SystemTime, UNIX_EPOCH};

/// The wall clock, read in the shell and handed to the core as a value.
pub fn now() -> Timestamp {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp(since_epoch.as_millis() as u64)
}

/// A seed for the core's jitter, different on every start.
pub fn seed() -> u64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    since_epoch.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)
}
