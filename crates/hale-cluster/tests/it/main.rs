//! hale-cluster's integration tests: real SQLite files and snapshot files in temporary
//! data directories.

mod replication;
mod store_log;
mod store_state_machine;
mod store_suite;
mod support;
