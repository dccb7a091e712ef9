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

/// A flood's pending notifications are one row per user and room, extended in place by later
/// calls: 60 messages to two offline members in three calls leave two rows, and each member
/// takes the newest `cap` of them.
#[tokio::test]
async fn pending_notifications_are_runs_extended_in_place() {
    use schema::{Notification, UserId};
    let pg = support::pg::TestPostgres::start();
    let url = pg.database();
    let store = PostgresStore::connect(&url, 2).await.unwrap();
    let room = conformance::seed_room(&store, 43).await;
    conformance::append_n(&store, room, 1, 60).await;
    let note = |seq: u64| {
        let m = conformance::msg(
            room,
            seq,
            if seq.is_multiple_of(2) { "b" } else { "a" },
            None,
        );
        Notification {
            room,
            message_id: m.id,
            seq,
            sender: m.sender.clone(),
            preview: format!("message {seq}"),
            created_at: m.created_at,
        }
    };
    let (p1, p2) = (UserId::parse("p1").unwrap(), UserId::parse("p2").unwrap());
    for calls in [1..=20, 21..=40, 41..=60] {
        let items = calls
            .flat_map(|s| [(p1.clone(), note(s)), (p2.clone(), note(s))])
            .collect();
        store.add_pending(items, 25).await.unwrap();
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows: i64 = client
        .query_one("SELECT count(*) FROM pending_runs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 2, "one run per member");
    let want: Vec<Notification> = (36..=60).map(note).collect();
    assert_eq!(store.take_pending(&p1).await.unwrap(), want);
    assert_eq!(store.take_pending(&p2).await.unwrap(), want);
    store.close().await.unwrap();
}
