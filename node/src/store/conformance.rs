//! The store conformance suite: one set of behavioural checks every backend must pass.
//!
//! A backend's tests call [`run_all`] on a fresh, empty store. The checks panic on failure (this is
//! test support compiled into the library so that every backend, in any crate, can run it).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use super::{NewRoom, Store, StoreError};
use schema::{
    HistoryQuery, Member, Message, MessageBody, MessageId, Profile, Role, Room, RoomId, RoomKind,
    UserId,
};
use std::sync::Arc;

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

fn profile(id: &str, name: &str) -> Profile {
    Profile {
        id: uid(id),
        username: Some(format!("{name}-handle")),
        name: Some(name.to_owned()),
        avatar: None,
    }
}

fn room(id: u64, kind: RoomKind, by: &str) -> Room {
    Room {
        id: RoomId(id),
        kind,
        name: (kind == RoomKind::Group).then(|| format!("group {id}")),
        created_by: uid(by),
        created_at: 1_000,
        last_seq: 0,
        last_message_id: None,
    }
}

fn member(u: &str, role: Role) -> Member {
    Member {
        user: uid(u),
        role,
        joined_at: 1_000,
    }
}

/// Creates group room `id` with members `a` (owner) and `b`.
pub async fn seed_room(store: &dyn Store, id: u64) -> RoomId {
    store
        .create_room(NewRoom {
            room: room(id, RoomKind::Group, "a"),
            members: vec![member("a", Role::Owner), member("b", Role::Member)],
        })
        .await
        .unwrap();
    RoomId(id)
}

/// The message with sequence `seq` in `room`, as the test data defines it.
pub fn msg(room: RoomId, seq: u64, sender: &str, client_ref: Option<&str>) -> Message {
    Message {
        id: MessageId(room.0 * 100_000 + seq),
        room,
        seq,
        sender: uid(sender),
        body: MessageBody::Text {
            text: format!("message {seq}"),
        },
        client_ref: client_ref.map(str::to_owned),
        created_at: 2_000 + seq as i64,
    }
}

/// Appends messages `first..first+n` of `room`, alternating senders `a` and `b`.
pub async fn append_n(store: &dyn Store, room: RoomId, first: u64, n: u64) {
    let batch = (first..first + n)
        .map(|s| msg(room, s, if s % 2 == 0 { "b" } else { "a" }, None))
        .collect();
    store.append_messages(room, batch).await.unwrap();
}

/// Runs every check.
pub async fn run_all(store: Arc<dyn Store>) {
    users(&*store).await;
    rooms(&*store).await;
    direct_rooms(store.clone()).await;
    history(&*store).await;
    idempotency(&*store).await;
}

async fn users(store: &dyn Store) {
    assert_eq!(store.user(&uid("nobody")).await.unwrap(), None);
    let u = store.upsert_user(&profile("415", "Ann"), 10).await.unwrap();
    assert_eq!(u.profile.name.as_deref(), Some("Ann"));
    assert_eq!((u.created_at, u.updated_at, u.last_seen), (10, 10, None));
    // Same profile again: nothing changes.
    let same = store.upsert_user(&profile("415", "Ann"), 20).await.unwrap();
    assert_eq!(same.updated_at, 10);
    // New claims refresh the profile but keep created_at.
    let renamed = store
        .upsert_user(&profile("415", "Anne"), 30)
        .await
        .unwrap();
    assert_eq!(renamed.profile.name.as_deref(), Some("Anne"));
    assert_eq!((renamed.created_at, renamed.updated_at), (10, 30));
    store.set_last_seen(&uid("415"), 40).await.unwrap();
    let read = store.user(&uid("415")).await.unwrap().unwrap();
    assert_eq!(read.last_seen, Some(40));
    assert_eq!(read.profile, renamed.profile);
}

async fn rooms(store: &dyn Store) {
    assert_eq!(store.room(RoomId(5)).await.unwrap(), None);
    let r = seed_room(store, 5).await;
    let stored = store.room(r).await.unwrap().unwrap();
    assert_eq!(stored.kind, RoomKind::Group);
    assert_eq!(stored.last_seq, 0);
    let members = store.members(r).await.unwrap();
    assert_eq!(members.len(), 2);
    assert!(
        members
            .iter()
            .any(|m| m.user == uid("a") && m.role == Role::Owner)
    );
    // Same id twice is refused.
    assert!(matches!(
        store
            .create_room(NewRoom {
                room: room(5, RoomKind::Group, "a"),
                members: vec![member("a", Role::Owner)],
            })
            .await,
        Err(StoreError::Conflict(_))
    ));
    // rooms_of: most recently active first, with the newest message.
    let r2 = seed_room(store, 6).await;
    append_n(store, r, 1, 3).await;
    let list = store.rooms_of(&uid("b")).await.unwrap();
    let ids: Vec<_> = list.iter().map(|s| s.room.id).collect();
    assert_eq!(ids, vec![r, r2]);
    assert_eq!(list[0].last_message.as_ref().map(|m| m.seq), Some(3));
    assert_eq!(list[0].room.last_seq, 3);
    assert_eq!(list[1].last_message, None);
    let mut ids = store.room_ids_of(&uid("a")).await.unwrap();
    ids.sort();
    assert_eq!(ids, vec![r, r2]);
    assert!(store.room_ids_of(&uid("c")).await.unwrap().is_empty());
}

async fn direct_rooms(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let store = store.clone();
        // Both orders of the pair, each call with its own candidate id.
        let (x, y) = if i % 2 == 0 {
            ("d1", "d2")
        } else {
            ("d2", "d1")
        };
        tasks.push(tokio::spawn(async move {
            store
                .get_or_create_direct(NewRoom {
                    room: room(900 + i, RoomKind::Direct, x),
                    members: vec![member(x, Role::Member), member(y, Role::Member)],
                })
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let (room, was_created) = t.await.unwrap();
        created += usize::from(was_created);
        ids.insert(room.id);
    }
    assert_eq!(created, 1, "exactly one call creates the pair's room");
    assert_eq!(ids.len(), 1, "every call sees the same room");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(store.members(id).await.unwrap().len(), 2);
    assert_eq!(
        store.room(id).await.unwrap().unwrap().kind,
        RoomKind::Direct
    );
}

async fn history(store: &dyn Store) {
    let r = seed_room(store, 7).await;
    for chunk in 0..5 {
        append_n(store, r, chunk * 20 + 1, 20).await;
    }
    let id = |seq: u64| MessageId(r.0 * 100_000 + seq);
    let seqs = |p: &super::HistoryPage| p.messages.iter().map(|m| m.seq).collect::<Vec<_>>();

    let newest = store.history(r, &HistoryQuery::default(), 3).await.unwrap();
    assert_eq!(seqs(&newest), vec![100, 99, 98]);
    assert!(newest.has_more);

    let before = HistoryQuery {
        before: Some(id(98)),
        ..Default::default()
    };
    let p = store.history(r, &before, 2).await.unwrap();
    assert_eq!(seqs(&p), vec![97, 96]);

    let start = HistoryQuery {
        before: Some(id(3)),
        ..Default::default()
    };
    let p = store.history(r, &start, 10).await.unwrap();
    assert_eq!(seqs(&p), vec![2, 1]);
    assert!(!p.has_more);

    // `after` anchors the page at the cursor: no gap after the last seen message.
    let after = HistoryQuery {
        after: Some(id(10)),
        ..Default::default()
    };
    let p = store.history(r, &after, 3).await.unwrap();
    assert_eq!(seqs(&p), vec![13, 12, 11]);
    assert!(p.has_more);

    let tail = HistoryQuery {
        after: Some(id(98)),
        ..Default::default()
    };
    let p = store.history(r, &tail, 10).await.unwrap();
    assert_eq!(seqs(&p), vec![100, 99]);
    assert!(!p.has_more);

    let between = HistoryQuery {
        after: Some(id(50)),
        before: Some(id(54)),
        limit: None,
    };
    let p = store.history(r, &between, 10).await.unwrap();
    assert_eq!(seqs(&p), vec![53, 52, 51]);

    let empty = seed_room(store, 8).await;
    let p = store
        .history(empty, &HistoryQuery::default(), 10)
        .await
        .unwrap();
    assert!(p.messages.is_empty() && !p.has_more);

    let m = &newest.messages[0];
    assert_eq!(
        m,
        &msg(r, 100, "b", None),
        "a message reads back exactly as written"
    );
}

async fn idempotency(store: &dyn Store) {
    let r = seed_room(store, 9).await;
    store
        .append_messages(
            r,
            vec![msg(r, 1, "a", Some("ref-1")), msg(r, 2, "b", Some("ref-1"))],
        )
        .await
        .unwrap();
    let found = store
        .messages_by_client_ref(
            r,
            vec![
                (uid("a"), "ref-1".into()),
                (uid("b"), "ref-1".into()),
                (uid("a"), "nope".into()),
            ],
        )
        .await
        .unwrap();
    let mut seqs: Vec<_> = found.iter().map(|m| m.seq).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 2]);
    // A batch that repeats a stored (room, sender, client_ref) fails whole.
    let dup = store
        .append_messages(
            r,
            vec![msg(r, 3, "a", Some("ref-3")), msg(r, 4, "a", Some("ref-1"))],
        )
        .await;
    assert!(matches!(dup, Err(StoreError::Conflict(_))), "{dup:?}");
    let p = store
        .history(r, &HistoryQuery::default(), 10)
        .await
        .unwrap();
    assert_eq!(
        p.messages.len(),
        2,
        "nothing of the failed batch was stored"
    );
    assert_eq!(store.room(r).await.unwrap().unwrap().last_seq, 2);
}
