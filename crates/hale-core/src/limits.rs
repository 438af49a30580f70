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
    /// Deepest nesting of a patch (an object holding an object is depth 2). States are
    /// never deeper than the patches that made them, and the log and snapshots wrap a
    /// state in a few more levels, which must stay under the JSON decoder's limit of 128.
    pub patch_depth_max: usize,
    /// How many versions of each agent's state are kept for rollback (the current one
    /// included). Recovery points are kept in addition to these.
    pub history_len: usize,
    /// Most named recovery points one agent may hold; re-marking a name replaces it.
    pub recovery_points_max: usize,
    /// Most unacked messages one mailbox holds; sends past it are refused (`mailbox_full`).
    pub mailbox_max: usize,
    /// Largest message body, in bytes of compact JSON.
    pub message_bytes_max: usize,
    /// Most open conversations one agent takes part in.
    pub conversations_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            patch_bytes_max: 256 * 1024,
            state_bytes_max: 4 * 1024 * 1024,
            patch_depth_max: PATCH_DEPTH_MAX,
            history_len: 16,
            recovery_points_max: 64,
            mailbox_max: 10_000,
            message_bytes_max: 64 * 1024,
            conversations_max: 1_000,
        }
    }
}

/// The default and largest allowed `patch_depth_max`.
pub const PATCH_DEPTH_MAX: usize = 64;

/// serde_json refuses input nested deeper than this; a state inside a snapshot sits under
/// about eight levels of envelope, so patches must stay well below.
const JSON_DECODER_DEPTH_MAX: usize = 128;
const _: () = assert!(PATCH_DEPTH_MAX + 16 <= JSON_DECODER_DEPTH_MAX);
