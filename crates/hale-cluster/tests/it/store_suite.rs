//! openraft's own storage test suite, against the SQLite log and the state machine.

use crate::support::data_dir;
use hale_cluster::{LogStore, NodeId, StateMachine, StateMachineOptions, TypeConfig};
use hale_store::DataDir;
use openraft::testing::{StoreBuilder, Suite};
use openraft::{ErrorSubject, ErrorVerb, StorageError, StorageIOError};

/// Makes a fresh data directory for every store the suite asks for.
struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, (tempfile::TempDir, DataDir)> for Builder {
    async fn build(&self) -> Result<((tempfile::TempDir, DataDir), LogStore, StateMachine), StorageError<NodeId>> {
        let (temporary, dir) = data_dir();
        let failed = |error| StorageError::from(StorageIOError::new(ErrorSubject::Store, ErrorVerb::Read, &error));
        let log = LogStore::open(&dir).map_err(failed)?;
        let state_machine = StateMachine::open(&dir, StateMachineOptions::default()).map_err(failed)?;
        Ok(((temporary, dir), log, state_machine))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).expect("openraft's storage suite");
}
