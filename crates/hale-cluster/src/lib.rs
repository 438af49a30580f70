//! hale's cluster: the log replicated with Raft, on openraft 0.9.
//!
//! A Raft entry is a batch of hale records, the records one engine append hands the
//! [`DurableLog`](hale_store::DurableLog), with their sequence numbers and checksums. The
//! leader's engine decides on its speculative state and appends; an entry committed by a
//! quorum is durable, and every node folds committed entries into its core's state (the
//! state machine).
//!
//! - [`types`]: openraft's type configuration for hale, and the entry payload.
//! - [`control`]: joining, and the status `hale cluster status` shows.
//! - [`durable`]: [`RaftLog`], the engine's `DurableLog` on the leader.
//! - [`elector`]: when a follower stands for election (Raft's timing, on openraft 0.9).
//! - [`local`]: nodes in one process on loopback, for tests and benchmarks.
//! - [`node`]: one node put together ([`node::open`]) and Raft's timing.
//! - [`network`]: the RPCs between nodes, over HTTP on each node's listener, under the
//!   cluster secret.

pub use openraft;

pub mod control;
pub mod durable;
pub mod elector;
pub mod local;
pub mod network;
pub mod node;
pub mod store;
pub mod types;

pub use durable::{Leadership, RaftLog, follow_leadership};
pub use store::{CommittedView, LogStore, RaftStoreError, StateMachine, StateMachineOptions};
pub use types::{Applied, Batch, NodeId, TypeConfig, WireRecord};
