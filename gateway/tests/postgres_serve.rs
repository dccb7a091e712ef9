//! `palaver serve` on the PostgreSQL store instead of the embedded one.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../node/tests/support/pg.rs"]
mod pg;

use common::*;
use serde_json::json;

#[tokio::test]
async fn serve_runs_on_postgres_and_history_outlives_the_process() {
    let pg = pg::TestPostgres::start();
    let url = pg.database();
    let s = TestServer::start_with(|b| b.postgres_url = Some(url.clone())).await;
    let mut a = s.connect("1").await;
    let mut b = s.connect("2").await;
    let d = a.ok("open_direct", json!({"user": "2"})).await;
    let room = d["room"]["id"].as_u64().unwrap();
    b.event_named("room_joined").await;
    for i in 0..5 {
        a.ok(
            "send",
            json!({"room": room, "text": format!("pg {i}"), "client_ref": format!("p{i}")}),
        )
        .await;
    }
    assert_eq!(b.event_named("message").await["seq"], 1);
    s.shutdown().await;
    // A new process on the same database (and a different, empty data dir).
    let s = TestServer::start_with(|b| b.postgres_url = Some(url.clone())).await;
    let mut b = s.connect("2").await;
    let h = b.ok("history", json!({"room": room})).await;
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, vec!["pg 4", "pg 3", "pg 2", "pg 1", "pg 0"]);
    let r = b
        .ok(
            "send",
            json!({"room": room, "text": "again", "client_ref": "p0-other"}),
        )
        .await;
    assert_eq!(r["message"]["seq"], 6);
    s.shutdown().await;
}
