//! The PostgreSQL store against a real PostgreSQL server started for the test.
#![allow(clippy::unwrap_used)]

mod support {
    pub mod pg;
}

use palaver_node::store::Store;
use palaver_node::store::conformance;
use palaver_node::store::postgres::PostgresStore;
use std::sync::Arc;

#[tokio::test]
async fn conformance_suite() {
    let pg = support::pg::TestPostgres::start();
    let store = Arc::new(PostgresStore::connect(&pg.database(), 8).await.unwrap());
    conformance::run_all(store.clone()).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn concurrent_starts_migrate_once_and_data_survives_reconnect() {
    let pg = support::pg::TestPostgres::start();
    let url = pg.database();
    let (a, b, c) = tokio::join!(
        PostgresStore::connect(&url, 2),
        PostgresStore::connect(&url, 2),
        PostgresStore::connect(&url, 2),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let room = conformance::seed_room(&a, 41).await;
    conformance::append_n(&b, room, 1, 25).await;
    a.close().await.unwrap();
    b.close().await.unwrap();
    let page = c.history(room, &Default::default(), 100).await.unwrap();
    assert_eq!(page.messages.len(), 25);
    drop(c);
    let again = PostgresStore::connect(&url, 2).await.unwrap();
    assert_eq!(again.room(room).await.unwrap().unwrap().last_seq, 25);
}
