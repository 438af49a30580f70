use serde::{Deserialize, Serialize};

/// Bounds that `decide` enforces. Every one is configurable; the defaults suit agents that
/// checkpoint small incremental patches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest checkpoint patch, in bytes of compact JSON.
    pub patch_bytes_max: usize,
    /// Largest agent state after a patch is folded in, in bytes of compact JSON.
    pub state_bytes_max: usize,
    /// How many versions of each agent's state are kept for rollback (the current one
    /// included). Recovery points are kept in addition to these.
    pub history_len: usize,
    /// Most named recovery points one agent may hold; re-marking a name replaces it.
    pub recovery_points_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            patch_bytes_max: 256 * 1024,
            state_bytes_max: 4 * 1024 * 1024,
            history_len: 16,
            recovery_points_max: 64,
        }
    }
}
