//! The ScyllaDB store against a real cluster, when one is reachable.
//!
//! ScyllaDB and Cassandra cannot be installed on this project's machines, so this suite runs only
//! where `PALAVER_TEST_SCYLLA_NODES` names a cluster (`host:port,...`); it creates a fresh keyspace
//! (`palaver_test_<pid>`, replication factor 1), migrates it and runs the shared conformance suite.
#![allow(clippy::unwrap_used)]

use palaver_node::store::scylla::{ScyllaConfig, ScyllaStore, migrate};
use palaver_node::store::{Store, conformance};
use std::sync::Arc;

#[tokio::test]
async fn conformance_suite_on_a_real_cluster() {
    let Ok(nodes) = std::env::var("PALAVER_TEST_SCYLLA_NODES") else {
        println!("PALAVER_TEST_SCYLLA_NODES is not set: the ScyllaDB suite did not run");
        return;
    };
    let config = ScyllaConfig {
        nodes: nodes.split(',').map(str::to_owned).collect(),
        keyspace: format!("palaver_test_{}", std::process::id()),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let latest = schema::CQL_MIGRATIONS.last().unwrap().0;
    assert_eq!(migrate(&config).await.unwrap(), latest);
    // Migrating again is a no-op.
    assert_eq!(migrate(&config).await.unwrap(), latest);
    let store = Arc::new(ScyllaStore::connect(&config).await.unwrap());
    conformance::run_all(store.clone()).await;
    store.close().await.unwrap();
}
