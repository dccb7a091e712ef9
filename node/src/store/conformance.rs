//! The store conformance suite: one set of behavioural checks every backend must pass.
//!
//! A backend's tests call [`run_all`] on a fresh, empty store. The checks panic on failure (this is
//! test support compiled into the library so that every backend, in any crate, can run it).
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use super::{NewRoom, RoomPatch, RoomWrite, Store, StoreError};
use schema::{
    DeadLetter, Device, Event, HistoryQuery, Media, Member, Message, MessageBody, MessageId,
    Notification, Platform, Profile, PushJob, Role, Room, RoomId, RoomKind, Upload, UserId,
};
use std::sync::Arc;

fn uid(s: &str) -> UserId {
    UserId::parse(s).unwrap()
}

pub(crate) fn profile(id: &str, name: &str) -> Profile {
    Profile {
        id: uid(id),
        username: Some(format!("{name}-handle")),
        name: Some(name.to_owned()),
        avatar: None,
        language: None,
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
        avatar: None,
        public: false,
    }
}

fn member(u: &str, role: Role) -> Member {
    Member {
        user: uid(u),
        role,
        joined_at: 1_000,
        online: None,
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
    let mut m = Message::new(
        MessageId(room.0 * 100_000 + seq),
        room,
        seq,
        uid(sender),
        MessageBody::Text {
            text: format!("message {seq}"),
        },
        2_000 + seq as i64,
    );
    m.client_ref = client_ref.map(str::to_owned);
    m
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
    usernames(&*store).await;
    direct_lookup(&*store).await;
    message_changes(&*store).await;
    membership(&*store).await;
    resume(&*store).await;
    read_markers(&*store).await;
    unread(&*store).await;
    friendships(&*store).await;
    blocks(&*store).await;
    presence_audiences(&*store).await;
    pending(&*store).await;
    uploads(&*store).await;
    media_posts(&*store).await;
    devices(&*store).await;
    mutes(&*store).await;
    dead_letters(&*store).await;
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
    // A preferred language is stored when a connect says it ...
    let with_lang = Profile {
        language: Some("pt-BR".into()),
        ..profile("415", "Anne")
    };
    let u = store.upsert_user(&with_lang, 50).await.unwrap();
    assert_eq!(u.profile.language.as_deref(), Some("pt-BR"));
    assert_eq!(u.updated_at, 50);
    // ... and kept by a connect that does not (the other dialects), which changes nothing else.
    let kept = store
        .upsert_user(&profile("415", "Anne"), 60)
        .await
        .unwrap();
    assert_eq!(kept.profile.language.as_deref(), Some("pt-BR"));
    assert_eq!(kept.updated_at, 50);
    // A new name keeps it too; a new language replaces it.
    let renamed = store
        .upsert_user(&profile("415", "Anna"), 70)
        .await
        .unwrap();
    assert_eq!(renamed.profile.language.as_deref(), Some("pt-BR"));
    // (Back to "Anne", which the next checks expect.)
    let english = Profile {
        language: Some("en".into()),
        ..profile("415", "Anne")
    };
    let u = store.upsert_user(&english, 80).await.unwrap();
    assert_eq!(u.profile.language.as_deref(), Some("en"));
    let read = store.user(&uid("415")).await.unwrap().unwrap();
    assert_eq!(read.profile.language.as_deref(), Some("en"));
}

async fn rooms(store: &dyn Store) {
    assert_eq!(store.room(RoomId(5)).await.unwrap(), None);
    let r = seed_room(store, 5).await;
    let stored = store.room(r).await.unwrap().unwrap();
    assert_eq!(stored.kind, RoomKind::Group);
    assert_eq!(stored.last_seq, 0);
    let members = store.members(r).await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(store.member_count_up_to(r, 10).await.unwrap(), 2);
    assert_eq!(store.member_count_up_to(r, 1).await.unwrap(), 1);
    assert_eq!(store.member_count_up_to(RoomId(404), 10).await.unwrap(), 0);
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
        ..Default::default()
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
    assert!(matches!(dup, Err(StoreError::DuplicateRef(_))), "{dup:?}");
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

/// A message id of the test data: `room * 100_000 + seq`.
fn mid(room: RoomId, seq: u64) -> MessageId {
    MessageId(room.0 * 100_000 + seq)
}

/// Applies new messages (and nothing else) as one write at time `at`.
async fn write_new(store: &dyn Store, room: RoomId, messages: Vec<Message>, at: i64) {
    let last = messages.iter().max_by_key(|m| m.seq).unwrap();
    let write = RoomWrite {
        last_seq: last.seq,
        last_message_id: Some(last.id),
        at,
        ..RoomWrite::default()
    };
    store
        .apply_room(
            room,
            RoomWrite {
                new_messages: messages,
                ..write
            },
        )
        .await
        .unwrap();
}

/// The room's position as stored.
async fn position(store: &dyn Store, room: RoomId) -> (u64, Option<MessageId>) {
    let r = store.room(room).await.unwrap().unwrap();
    (r.last_seq, r.last_message_id)
}

fn position_of(list: &[schema::RoomSummary], room: RoomId) -> usize {
    list.iter().position(|s| s.room.id == room).unwrap()
}

async fn usernames(store: &dyn Store) {
    // `users` renamed 415 from Ann to Anne.
    let found = store
        .user_by_username("Anne-handle")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.profile.id, uid("415"));
    assert_eq!(store.user_by_username("Ann-handle").await.unwrap(), None);
    assert_eq!(store.user_by_username("anne-handle").await.unwrap(), None);
    assert_eq!(store.user_by_username("Anne").await.unwrap(), None);
    // A username two users carry: the most recently updated one.
    store
        .upsert_user(&profile("u-old", "Dup"), 100)
        .await
        .unwrap();
    store
        .upsert_user(&profile("u-new", "Dup"), 200)
        .await
        .unwrap();
    let dup = store.user_by_username("Dup-handle").await.unwrap().unwrap();
    assert_eq!(dup.profile.id, uid("u-new"));
}

async fn direct_lookup(store: &dyn Store) {
    assert_eq!(
        store.direct_room(&uid("e1"), &uid("e2")).await.unwrap(),
        None
    );
    let (created, was_created) = store
        .get_or_create_direct(NewRoom {
            room: room(30, RoomKind::Direct, "e1"),
            members: vec![member("e1", Role::Member), member("e2", Role::Member)],
        })
        .await
        .unwrap();
    assert!(was_created);
    assert_eq!(created.id, RoomId(30));
    for (x, y) in [("e1", "e2"), ("e2", "e1")] {
        assert_eq!(
            store.direct_room(&uid(x), &uid(y)).await.unwrap(),
            Some(RoomId(30))
        );
    }
    assert_eq!(
        store.direct_room(&uid("e1"), &uid("e3")).await.unwrap(),
        None
    );
    // Creating again returns the stored room.
    let (again, was_created) = store
        .get_or_create_direct(NewRoom {
            room: room(31, RoomKind::Direct, "e2"),
            members: vec![member("e2", Role::Member), member("e1", Role::Member)],
        })
        .await
        .unwrap();
    assert!(!was_created);
    assert_eq!(again.id, RoomId(30));
}

/// Edits, tombstones and reactions rewrite a message in place, visible through every read.
async fn message_changes(store: &dyn Store) {
    let r = seed_room(store, 20).await;
    let first = msg(r, 1, "a", Some("c-1"));
    let mut image = msg(r, 2, "b", None);
    image.body = MessageBody::Image(Media {
        media: "/uploads/p.webp".into(),
        caption: Some("look".into()),
        duration: None,
        size: None,
    });
    let mut reply = msg(r, 3, "b", None);
    reply.reply_to = Some(first.id);
    write_new(
        store,
        r,
        vec![first.clone(), image.clone(), reply.clone()],
        2_003,
    )
    .await;
    assert_eq!(
        store.message(r, reply.id).await.unwrap().as_ref(),
        Some(&reply)
    );
    assert_eq!(
        store.message(r, image.id).await.unwrap().as_ref(),
        Some(&image)
    );
    assert_eq!(store.message(r, mid(r, 99)).await.unwrap(), None);
    assert_eq!(store.message(RoomId(999), first.id).await.unwrap(), None);

    let mut edited = first.clone();
    edited.body = MessageBody::Text {
        text: "edited".into(),
    };
    edited.edited_at = Some(5_000);
    let mut deleted = image.clone();
    deleted.body = MessageBody::Deleted {};
    deleted.deleted_at = Some(5_001);
    let mut reacted = reply.clone();
    reacted
        .reactions
        .insert("+1".into(), vec![uid("b"), uid("a")]);
    reacted.reactions.insert("🎉".into(), vec![uid("a")]);
    store
        .apply_room(
            r,
            RoomWrite {
                changed_messages: vec![edited.clone(), deleted.clone(), reacted.clone()],
                log: vec![
                    (
                        4,
                        Event::MessageEdited {
                            seq: 4,
                            message: edited.clone(),
                        },
                    ),
                    (
                        5,
                        Event::MessageDeleted {
                            seq: 5,
                            room: r,
                            message_id: deleted.id,
                            by: uid("b"),
                        },
                    ),
                    (
                        6,
                        Event::Reaction {
                            seq: 6,
                            message: reacted.clone(),
                            user: uid("a"),
                            emoji: "🎉".into(),
                            added: true,
                        },
                    ),
                ],
                last_seq: 6,
                last_message_id: Some(reply.id),
                at: 9_999,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    for m in [&edited, &deleted, &reacted] {
        assert_eq!(store.message(r, m.id).await.unwrap().as_ref(), Some(m));
    }
    let page = store
        .history(r, &HistoryQuery::default(), 10)
        .await
        .unwrap();
    assert_eq!(
        page.messages,
        vec![reacted.clone(), deleted.clone(), edited.clone()]
    );
    assert_eq!(
        store.messages_after_seq(r, 0, 10).await.unwrap(),
        vec![edited.clone(), deleted.clone(), reacted.clone()]
    );
    // The client_ref survives a rewrite.
    let by_ref = store
        .messages_by_client_ref(r, vec![(uid("a"), "c-1".into())])
        .await
        .unwrap();
    assert_eq!(by_ref, vec![edited.clone()]);
    assert_eq!(position(store, r).await, (6, Some(reply.id)));
    let list = store.rooms_of(&uid("b")).await.unwrap();
    let summary = &list[position_of(&list, r)];
    assert_eq!(summary.last_message.as_ref(), Some(&reacted));
    assert_eq!(summary.room.last_seq, 6);

    // Only new messages move a room in the chat list: room 21 was active at 3000, room 20 at
    // 2003 (its change-only write at 9999 does not count).
    let other = seed_room(store, 21).await;
    write_new(store, other, vec![msg(other, 1, "a", None)], 3_000).await;
    let list = store.rooms_of(&uid("b")).await.unwrap();
    assert!(position_of(&list, other) < position_of(&list, r));
    write_new(store, r, vec![msg(r, 7, "a", None)], 4_000).await;
    let list = store.rooms_of(&uid("b")).await.unwrap();
    assert!(position_of(&list, r) < position_of(&list, other));
    assert_eq!(position(store, r).await, (7, Some(mid(r, 7))));

    // A write repeating a stored client_ref fails whole: no message, rewrite, log entry or
    // position of it is stored.
    let mut again = edited.clone();
    again.body = MessageBody::Text {
        text: "never".into(),
    };
    let dup = store
        .apply_room(
            r,
            RoomWrite {
                new_messages: vec![msg(r, 8, "b", None), msg(r, 9, "a", Some("c-1"))],
                changed_messages: vec![again],
                log: vec![(
                    10,
                    Event::MemberUpdated {
                        seq: 10,
                        room: r,
                        member: member("b", Role::Admin),
                    },
                )],
                upsert_members: vec![member("b", Role::Admin)],
                last_seq: 10,
                last_message_id: Some(mid(r, 9)),
                at: 6_000,
                ..RoomWrite::default()
            },
        )
        .await;
    assert!(matches!(dup, Err(StoreError::DuplicateRef(_))), "{dup:?}");
    assert_eq!(
        store.message(r, edited.id).await.unwrap().as_ref(),
        Some(&edited)
    );
    assert_eq!(store.message(r, mid(r, 8)).await.unwrap(), None);
    assert!(store.room_log(r, 6, 10).await.unwrap().is_empty());
    assert_eq!(position(store, r).await, (7, Some(mid(r, 7))));
    let roles: Vec<_> = store
        .members(r)
        .await
        .unwrap()
        .iter()
        .map(|m| m.role)
        .collect();
    assert_eq!(roles, vec![Role::Owner, Role::Member]);
}

/// Membership and group changes through `apply_room`.
async fn membership(store: &dyn Store) {
    let r = seed_room(store, 22).await;
    let c = Member {
        joined_at: 3_000,
        ..member("c2", Role::Member)
    };
    store
        .apply_room(
            r,
            RoomWrite {
                upsert_members: vec![c.clone()],
                log: vec![(
                    1,
                    Event::MemberJoined {
                        seq: 1,
                        room: r,
                        member: c.clone(),
                        by: uid("a"),
                    },
                )],
                last_seq: 1,
                at: 3_000,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    let members = store.members(r).await.unwrap();
    assert_eq!(members.len(), 3);
    assert_eq!(members.last(), Some(&c));
    assert_eq!(store.room_ids_of(&uid("c2")).await.unwrap(), vec![r]);
    // A write without messages leaves an empty room without a newest message.
    assert_eq!(position(store, r).await, (1, None));
    let list = store.rooms_of(&uid("c2")).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].last_message, None);
    assert_eq!(list[0].members.len(), 3);

    // A role change keeps the member's joined_at.
    let promoted = Member {
        joined_at: 9_000,
        ..member("c2", Role::Admin)
    };
    store
        .apply_room(
            r,
            RoomWrite {
                upsert_members: vec![promoted.clone()],
                log: vec![(
                    2,
                    Event::MemberUpdated {
                        seq: 2,
                        room: r,
                        member: promoted.clone(),
                    },
                )],
                last_seq: 2,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    let members = store.members(r).await.unwrap();
    let stored = members.iter().find(|m| m.user == uid("c2")).unwrap();
    assert_eq!((stored.role, stored.joined_at), (Role::Admin, 3_000));
    assert_eq!(members.len(), 3);

    // Removal drops the member, the room from the member's rooms and the member's read marker.
    write_new(store, r, vec![msg(r, 3, "a", None)], 3_100).await;
    store
        .set_read_marker(r, &uid("c2"), mid(r, 3))
        .await
        .unwrap();
    store
        .set_read_marker(r, &uid("b"), mid(r, 3))
        .await
        .unwrap();
    store
        .apply_room(
            r,
            RoomWrite {
                remove_members: vec![uid("c2")],
                log: vec![(
                    4,
                    Event::MemberLeft {
                        seq: 4,
                        room: r,
                        user: uid("c2"),
                        by: uid("c2"),
                    },
                )],
                last_seq: 4,
                last_message_id: Some(mid(r, 3)),
                at: 3_200,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    let users: Vec<_> = store
        .members(r)
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.user)
        .collect();
    assert_eq!(users, vec![uid("a"), uid("b")]);
    assert!(store.room_ids_of(&uid("c2")).await.unwrap().is_empty());
    assert!(store.rooms_of(&uid("c2")).await.unwrap().is_empty());
    assert_eq!(store.read_marker(r, &uid("c2")).await.unwrap(), None);
    assert_eq!(
        store.read_marker(r, &uid("b")).await.unwrap(),
        Some(mid(r, 3))
    );
    assert_eq!(position(store, r).await, (4, Some(mid(r, 3))));
    // Rejoining starts with no marker, and a new marker counts.
    store
        .apply_room(
            r,
            RoomWrite {
                upsert_members: vec![member("c2", Role::Member)],
                log: vec![(
                    5,
                    Event::MemberJoined {
                        seq: 5,
                        room: r,
                        member: member("c2", Role::Member),
                        by: uid("a"),
                    },
                )],
                last_seq: 5,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.read_marker(r, &uid("c2")).await.unwrap(), None);
    store
        .set_read_marker(r, &uid("c2"), mid(r, 3))
        .await
        .unwrap();
    assert_eq!(
        store.read_marker(r, &uid("c2")).await.unwrap(),
        Some(mid(r, 3))
    );

    // A group's name, avatar and visibility.
    let patch = RoomPatch {
        name: Some("renamed".into()),
        avatar: Some("/uploads/g.png".into()),
        public: true,
    };
    let mut updated = store.room(r).await.unwrap().unwrap();
    updated.name = patch.name.clone();
    updated.avatar = patch.avatar.clone();
    updated.public = true;
    updated.last_seq = 6;
    store
        .apply_room(
            r,
            RoomWrite {
                patch: Some(patch),
                log: vec![(
                    6,
                    Event::RoomUpdated {
                        seq: 6,
                        room: updated.clone(),
                    },
                )],
                last_seq: 6,
                last_message_id: Some(mid(r, 3)),
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(store.room(r).await.unwrap().as_ref(), Some(&updated));
    let list = store.rooms_of(&uid("c2")).await.unwrap();
    assert_eq!(list[0].room, updated);
    let log = store.room_log(r, 0, 100).await.unwrap();
    assert_eq!(
        log.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2, 4, 5, 6]
    );
    assert_eq!(
        log[4].1,
        Event::RoomUpdated {
            seq: 6,
            room: updated
        }
    );

    // A room created with an avatar and public reads back so.
    let mut public = room(23, RoomKind::Group, "a");
    public.avatar = Some("/uploads/h.png".into());
    public.public = true;
    store
        .create_room(NewRoom {
            room: public.clone(),
            members: vec![member("a", Role::Owner)],
        })
        .await
        .unwrap();
    assert_eq!(store.room(public.id).await.unwrap(), Some(public));
}

/// What a resuming session reads: messages and logged events after a sequence number.
async fn resume(store: &dyn Store) {
    let r = seed_room(store, 24).await;
    append_n(store, r, 1, 5).await;
    let mut edited = msg(r, 2, "b", None);
    edited.edited_at = Some(7_000);
    let e6 = Event::MessageEdited {
        seq: 6,
        message: edited.clone(),
    };
    let e7 = Event::MessageDeleted {
        seq: 7,
        room: r,
        message_id: mid(r, 4),
        by: uid("a"),
    };
    let mut gone = msg(r, 4, "b", None);
    gone.body = MessageBody::Deleted {};
    gone.deleted_at = Some(7_001);
    store
        .apply_room(
            r,
            RoomWrite {
                changed_messages: vec![edited, gone],
                log: vec![(6, e6.clone()), (7, e7.clone())],
                last_seq: 7,
                last_message_id: Some(mid(r, 5)),
                at: 7_001,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    append_n(store, r, 8, 3).await;
    let e11 = Event::MemberUpdated {
        seq: 11,
        room: r,
        member: member("b", Role::Admin),
    };
    let e12 = Event::MemberLeft {
        seq: 12,
        room: r,
        user: uid("b"),
        by: uid("a"),
    };
    store
        .apply_room(
            r,
            RoomWrite {
                upsert_members: vec![member("b", Role::Admin)],
                remove_members: vec![uid("b")],
                log: vec![(11, e11.clone()), (12, e12.clone())],
                last_seq: 12,
                last_message_id: Some(mid(r, 10)),
                at: 8_000,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(position(store, r).await, (12, Some(mid(r, 10))));
    assert_eq!(store.members(r).await.unwrap().len(), 1);

    let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
    let after = |s, l| store.messages_after_seq(r, s, l);
    assert_eq!(
        seqs(after(0, 100).await.unwrap()),
        vec![1, 2, 3, 4, 5, 8, 9, 10]
    );
    assert_eq!(seqs(after(3, 2).await.unwrap()), vec![4, 5]);
    assert_eq!(seqs(after(5, 2).await.unwrap()), vec![8, 9]);
    assert_eq!(seqs(after(6, 100).await.unwrap()), vec![8, 9, 10]);
    assert_eq!(seqs(after(9, 100).await.unwrap()), vec![10]);
    assert!(after(10, 100).await.unwrap().is_empty());
    assert!(after(0, 0).await.unwrap().is_empty());
    assert!(
        store
            .messages_after_seq(RoomId(998), 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Messages read back as they now are (the tombstone included).
    let all = after(0, 100).await.unwrap();
    assert_eq!(all[3].body, MessageBody::Deleted {});
    assert_eq!(all[1].edited_at, Some(7_000));

    let log = |s, l| store.room_log(r, s, l);
    assert_eq!(
        log(0, 100).await.unwrap(),
        vec![
            (6, e6.clone()),
            (7, e7.clone()),
            (11, e11.clone()),
            (12, e12.clone())
        ]
    );
    assert_eq!(log(6, 2).await.unwrap(), vec![(7, e7), (11, e11)]);
    assert_eq!(log(11, 100).await.unwrap(), vec![(12, e12)]);
    assert!(log(12, 100).await.unwrap().is_empty());
    assert!(log(0, 0).await.unwrap().is_empty());
    assert!(store.room_log(RoomId(998), 0, 10).await.unwrap().is_empty());
}

async fn read_markers(store: &dyn Store) {
    let r = seed_room(store, 25).await;
    append_n(store, r, 1, 5).await;
    assert_eq!(store.read_marker(r, &uid("b")).await.unwrap(), None);
    store
        .set_read_marker(r, &uid("b"), mid(r, 3))
        .await
        .unwrap();
    assert_eq!(
        store.read_marker(r, &uid("b")).await.unwrap(),
        Some(mid(r, 3))
    );
    // Never backwards.
    store
        .set_read_marker(r, &uid("b"), mid(r, 2))
        .await
        .unwrap();
    store
        .set_read_marker(r, &uid("b"), mid(r, 3))
        .await
        .unwrap();
    assert_eq!(
        store.read_marker(r, &uid("b")).await.unwrap(),
        Some(mid(r, 3))
    );
    store
        .set_read_marker(r, &uid("b"), mid(r, 5))
        .await
        .unwrap();
    assert_eq!(
        store.read_marker(r, &uid("b")).await.unwrap(),
        Some(mid(r, 5))
    );
    store
        .set_read_marker(r, &uid("b"), mid(r, 1))
        .await
        .unwrap();
    assert_eq!(
        store.read_marker(r, &uid("b")).await.unwrap(),
        Some(mid(r, 5))
    );
    // Per user and per room.
    assert_eq!(store.read_marker(r, &uid("a")).await.unwrap(), None);
    assert_eq!(
        store.read_marker(RoomId(20), &uid("b")).await.unwrap(),
        None
    );
}

async fn unread(store: &dyn Store) {
    let r = seed_room(store, 26).await;
    let count = |u: &'static str, after: Option<u64>, cap| async move {
        store
            .unread_count(r, &uid(u), after.map(|s| mid(r, s)), cap)
            .await
    };
    assert_eq!(count("b", None, 100).await.unwrap(), 0);
    // Odd seqs are a's, even seqs b's.
    append_n(store, r, 1, 5).await;
    let mut gone = msg(r, 3, "a", None);
    gone.body = MessageBody::Deleted {};
    gone.deleted_at = Some(6_000);
    store
        .apply_room(
            r,
            RoomWrite {
                changed_messages: vec![gone],
                log: vec![(
                    6,
                    Event::MessageDeleted {
                        seq: 6,
                        room: r,
                        message_id: mid(r, 3),
                        by: uid("a"),
                    },
                )],
                last_seq: 6,
                last_message_id: Some(mid(r, 5)),
                at: 6_000,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    let later: Vec<Message> = (7..=10)
        .map(|s| msg(r, s, if s % 2 == 0 { "b" } else { "a" }, None))
        .collect();
    write_new(store, r, later, 6_100).await;
    // b: a's 1, 5, 7, 9 (3 is deleted); a: b's 2, 4, 8, 10.
    assert_eq!(count("b", None, 100).await.unwrap(), 4);
    assert_eq!(count("a", None, 100).await.unwrap(), 4);
    assert_eq!(count("c", None, 100).await.unwrap(), 8);
    assert_eq!(count("b", Some(1), 100).await.unwrap(), 3);
    assert_eq!(count("b", Some(2), 100).await.unwrap(), 3);
    assert_eq!(count("b", Some(5), 100).await.unwrap(), 2);
    assert_eq!(count("b", Some(9), 100).await.unwrap(), 0);
    assert_eq!(count("a", Some(9), 100).await.unwrap(), 1);
    assert_eq!(count("b", Some(10), 100).await.unwrap(), 0);
    // Capped.
    assert_eq!(count("b", None, 3).await.unwrap(), 3);
    assert_eq!(count("c", None, 5).await.unwrap(), 5);
    assert_eq!(count("b", None, 0).await.unwrap(), 0);
    // With the stored marker.
    store
        .set_read_marker(r, &uid("b"), mid(r, 7))
        .await
        .unwrap();
    let marker = store.read_marker(r, &uid("b")).await.unwrap();
    assert_eq!(
        store.unread_count(r, &uid("b"), marker, 100).await.unwrap(),
        1
    );
    assert_eq!(
        store
            .unread_count(RoomId(997), &uid("b"), None, 100)
            .await
            .unwrap(),
        0
    );
}

async fn friendships(store: &dyn Store) {
    use schema::{Friendship, FriendshipStatus};
    let f = |req: &str, addr: &str, status, created_at, updated_at| Friendship {
        requester: uid(req),
        addressee: uid(addr),
        status,
        created_at,
        updated_at,
    };
    assert_eq!(
        store.friendship(&uid("f1"), &uid("f2")).await.unwrap(),
        None
    );
    assert!(store.friendships_of(&uid("f1")).await.unwrap().is_empty());
    let asked = f("f1", "f2", FriendshipStatus::Pending, 100, 100);
    store.put_friendship(&asked).await.unwrap();
    for (x, y) in [("f1", "f2"), ("f2", "f1")] {
        assert_eq!(
            store.friendship(&uid(x), &uid(y)).await.unwrap().as_ref(),
            Some(&asked)
        );
    }
    let accepted = f("f1", "f2", FriendshipStatus::Accepted, 100, 200);
    store.put_friendship(&accepted).await.unwrap();
    assert_eq!(
        store
            .friendship(&uid("f2"), &uid("f1"))
            .await
            .unwrap()
            .as_ref(),
        Some(&accepted)
    );
    // One row per pair, whoever asks: asking the other way replaces it.
    let reversed = f("f2", "f1", FriendshipStatus::Pending, 300, 300);
    store.put_friendship(&reversed).await.unwrap();
    assert_eq!(
        store
            .friendship(&uid("f1"), &uid("f2"))
            .await
            .unwrap()
            .as_ref(),
        Some(&reversed)
    );
    let other = f("f3", "f1", FriendshipStatus::Blocked, 400, 500);
    store.put_friendship(&other).await.unwrap();
    let sorted = |mut v: Vec<Friendship>| {
        v.sort_by(|a, b| (&a.requester, &a.addressee).cmp(&(&b.requester, &b.addressee)));
        v
    };
    assert_eq!(
        sorted(store.friendships_of(&uid("f1")).await.unwrap()),
        vec![reversed.clone(), other.clone()]
    );
    assert_eq!(
        store.friendships_of(&uid("f2")).await.unwrap(),
        vec![reversed]
    );
    assert_eq!(
        store.friendships_of(&uid("f3")).await.unwrap(),
        vec![other.clone()]
    );
    // Deleting from either side.
    store
        .delete_friendship(&uid("f1"), &uid("f2"))
        .await
        .unwrap();
    assert_eq!(
        store.friendship(&uid("f2"), &uid("f1")).await.unwrap(),
        None
    );
    assert!(store.friendships_of(&uid("f2")).await.unwrap().is_empty());
    assert_eq!(store.friendships_of(&uid("f1")).await.unwrap(), vec![other]);
    store
        .delete_friendship(&uid("f1"), &uid("f3"))
        .await
        .unwrap();
    assert!(store.friendships_of(&uid("f3")).await.unwrap().is_empty());
    // Deleting what is not there is no error.
    store
        .delete_friendship(&uid("f1"), &uid("f9"))
        .await
        .unwrap();
}

async fn blocks(store: &dyn Store) {
    let of = |u: &'static str| async move {
        let mut v = store.blocks_of(&uid(u)).await.unwrap();
        v.sort();
        v
    };
    let pair = |a: &str, b: &str| (uid(a), uid(b));
    assert!(of("g1").await.is_empty());
    store.set_block(&uid("g1"), &uid("g2"), true).await.unwrap();
    assert_eq!(of("g1").await, vec![pair("g1", "g2")]);
    assert_eq!(of("g2").await, vec![pair("g1", "g2")]);
    // Both directions, each its own block; setting twice keeps one.
    store.set_block(&uid("g2"), &uid("g1"), true).await.unwrap();
    store.set_block(&uid("g2"), &uid("g1"), true).await.unwrap();
    assert_eq!(of("g1").await, vec![pair("g1", "g2"), pair("g2", "g1")]);
    assert_eq!(of("g2").await, vec![pair("g1", "g2"), pair("g2", "g1")]);
    store
        .set_block(&uid("g1"), &uid("g2"), false)
        .await
        .unwrap();
    assert_eq!(of("g1").await, vec![pair("g2", "g1")]);
    assert_eq!(of("g2").await, vec![pair("g2", "g1")]);
    store
        .set_block(&uid("g2"), &uid("g1"), false)
        .await
        .unwrap();
    assert!(of("g1").await.is_empty() && of("g2").await.is_empty());
    // Lifting a block that is not there is no error.
    store
        .set_block(&uid("g3"), &uid("g1"), false)
        .await
        .unwrap();
    assert!(of("g3").await.is_empty());
}

/// Who hears a user's presence: accepted friends (only), direct peers, members of small
/// groups (up to and including the limit), not of bigger ones, never the user, never anyone
/// with a block between them either way; sorted, each once.
async fn presence_audiences(store: &dyn Store) {
    use schema::{Friendship, FriendshipStatus};
    let ids = |v: &[&str]| v.iter().map(|u| uid(u)).collect::<Vec<_>>();
    // The backend's own answer, checked against the one composed of the other reads (the
    // trait's default) every time.
    let audience = |u: &'static str, max: usize| async move {
        let own = store.presence_audience(&uid(u), max).await.unwrap();
        let parts = super::presence_audience_by_parts(store, &uid(u), max)
            .await
            .unwrap();
        assert_eq!(own, parts, "presence audience of {u} (groups up to {max})");
        own
    };
    assert!(audience("pa", 3).await.is_empty());
    let friend = |other: &str, status| Friendship {
        requester: uid("pa"),
        addressee: uid(other),
        status,
        created_at: 1,
        updated_at: 1,
    };
    store
        .put_friendship(&friend("pf1", FriendshipStatus::Accepted))
        .await
        .unwrap();
    store
        .put_friendship(&friend("pf2", FriendshipStatus::Pending))
        .await
        .unwrap();
    // Asked the other way round: still a friend of pa's.
    store
        .put_friendship(&Friendship {
            requester: uid("pf3"),
            addressee: uid("pa"),
            status: FriendshipStatus::Accepted,
            created_at: 1,
            updated_at: 1,
        })
        .await
        .unwrap();
    assert_eq!(audience("pa", 3).await, ids(&["pf1", "pf3"]));
    assert_eq!(audience("pf3", 3).await, ids(&["pa"]));
    let with = |id: u64, kind, users: &[&str]| NewRoom {
        room: room(id, kind, users[0]),
        members: users
            .iter()
            .enumerate()
            .map(|(i, u)| member(u, if i == 0 { Role::Owner } else { Role::Member }))
            .collect(),
    };
    store
        .get_or_create_direct(with(60, RoomKind::Direct, &["pa", "pd"]))
        .await
        .unwrap();
    for new in [
        // Three members: at the limit of 3, heard.
        with(61, RoomKind::Group, &["ps1", "pa", "ps2"]),
        // Four: over it, not heard.
        with(62, RoomKind::Group, &["pa", "pb1", "pb2", "pb3"]),
        // A friend in a small group: once.
        with(63, RoomKind::Group, &["pa", "pf1"]),
        // Not pa's.
        with(64, RoomKind::Group, &["ps1", "px"]),
    ] {
        store.create_room(new).await.unwrap();
    }
    assert_eq!(
        audience("pa", 3).await,
        ids(&["pd", "pf1", "pf3", "ps1", "ps2"])
    );
    // A bigger limit takes the bigger group in; 0 leaves only friends and direct peers.
    assert_eq!(
        audience("pa", 4).await,
        ids(&["pb1", "pb2", "pb3", "pd", "pf1", "pf3", "ps1", "ps2"])
    );
    assert_eq!(audience("pa", 0).await, ids(&["pd", "pf1", "pf3"]));
    assert_eq!(audience("ps1", 3).await, ids(&["pa", "ps2", "px"]));
    // Blocks, either way, take people out of it whatever else they are.
    store
        .set_block(&uid("pa"), &uid("ps2"), true)
        .await
        .unwrap();
    store
        .set_block(&uid("pf1"), &uid("pa"), true)
        .await
        .unwrap();
    store.set_block(&uid("pd"), &uid("pa"), true).await.unwrap();
    assert_eq!(audience("pa", 3).await, ids(&["pf3", "ps1"]));
    assert_eq!(audience("ps2", 3).await, ids(&["ps1"]));
    store
        .set_block(&uid("pd"), &uid("pa"), false)
        .await
        .unwrap();
    assert_eq!(audience("pa", 3).await, ids(&["pd", "pf3", "ps1"]));
}

async fn pending(store: &dyn Store) {
    let n = |i: u64| Notification {
        room: RoomId(27),
        message_id: MessageId(2_700_000 + i),
        seq: i,
        sender: uid("a"),
        preview: format!("message {i}"),
        created_at: 2_000 + i as i64,
    };
    // Messages 1 to 8 of room 27, from `a`: what the notifications are of.
    let room = seed_room(store, 27).await;
    store
        .append_messages(room, (1..=8).map(|s| msg(room, s, "a", None)).collect())
        .await
        .unwrap();
    assert!(store.take_pending(&uid("p1")).await.unwrap().is_empty());
    store.add_pending(Vec::new(), 3).await.unwrap();
    store
        .add_pending(
            vec![(uid("p1"), n(1)), (uid("p2"), n(2)), (uid("p1"), n(3))],
            5,
        )
        .await
        .unwrap();
    assert_eq!(
        store.take_pending(&uid("p1")).await.unwrap(),
        vec![n(1), n(3)]
    );
    assert!(store.take_pending(&uid("p1")).await.unwrap().is_empty());
    assert_eq!(store.take_pending(&uid("p2")).await.unwrap(), vec![n(2)]);
    // At most `cap` per user, the oldest dropped, within one call and across calls.
    store
        .add_pending((1..=4).map(|i| (uid("p1"), n(i))).collect(), 3)
        .await
        .unwrap();
    assert_eq!(
        store.take_pending(&uid("p1")).await.unwrap(),
        vec![n(2), n(3), n(4)]
    );
    for i in 5..=7 {
        store.add_pending(vec![(uid("p1"), n(i))], 2).await.unwrap();
    }
    store.add_pending(vec![(uid("p3"), n(8))], 2).await.unwrap();
    assert_eq!(
        store.take_pending(&uid("p1")).await.unwrap(),
        vec![n(6), n(7)]
    );
    assert_eq!(store.take_pending(&uid("p3")).await.unwrap(), vec![n(8)]);
    // Taken as the messages are then: an edit shows, a deleted message is left out.
    store
        .add_pending((1..=3).map(|i| (uid("p4"), n(i))).collect(), 5)
        .await
        .unwrap();
    let mut edited = msg(room, 2, "a", None);
    edited.body = MessageBody::Text {
        text: "message 2, edited".into(),
    };
    edited.edited_at = Some(3_000);
    let mut deleted = msg(room, 3, "a", None);
    deleted.body = MessageBody::Deleted {};
    deleted.deleted_at = Some(3_001);
    store
        .apply_room(
            room,
            RoomWrite {
                changed_messages: vec![edited, deleted],
                last_seq: 8,
                last_message_id: Some(mid(room, 8)),
                at: 3_001,
                ..RoomWrite::default()
            },
        )
        .await
        .unwrap();
    let mut n2 = n(2);
    n2.preview = "message 2, edited".into();
    assert_eq!(
        store.take_pending(&uid("p4")).await.unwrap(),
        vec![n(1), n2]
    );
}

/// `len` bytes of incompressible printable text (a long key must not rely on compression to fit
/// an index).
fn noise(len: usize) -> String {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'!' + (x % 94) as u8)
        })
        .collect()
}

fn upload(path: &str, by: &str, at: i64) -> Upload {
    Upload {
        path: path.to_owned(),
        uploader: uid(by),
        kind: "image".into(),
        size: 123_456,
        content_type: "image/webp".into(),
        created_at: at,
    }
}

async fn uploads(store: &dyn Store) {
    let path = "/uploads/2024/05/abc.webp";
    assert_eq!(store.upload(path).await.unwrap(), None);
    let first = upload(path, "up-a", 100);
    store.add_upload(&first).await.unwrap();
    assert_eq!(store.upload(path).await.unwrap(), Some(first.clone()));
    // The same path again changes nothing (neither uploader nor anything else).
    let mut other = upload(path, "up-b", 200);
    other.kind = "file".into();
    other.size = 1;
    other.content_type = "application/octet-stream".into();
    store.add_upload(&other).await.unwrap();
    assert_eq!(store.upload(path).await.unwrap(), Some(first.clone()));
    // Another path is another upload; sizes above 2^32 survive; paths match exactly.
    let mut big = upload("/uploads/2024/05/big.mp4", "up-b", 300);
    big.kind = "video".into();
    big.size = 5_000_000_000;
    big.content_type = "video/mp4".into();
    store.add_upload(&big).await.unwrap();
    assert_eq!(store.upload(&big.path).await.unwrap(), Some(big));
    assert_eq!(store.upload(path).await.unwrap(), Some(first));
    assert_eq!(
        store.upload("/uploads/2024/05/ABC.webp").await.unwrap(),
        None
    );
    assert_eq!(store.upload("/uploads/2024/05/abc").await.unwrap(), None);
}

async fn media_posts(store: &dyn Store) {
    let path = "/uploads/2024/05/posted.webp";
    assert_eq!(store.media_rooms(path).await.unwrap(), Vec::<RoomId>::new());
    store.add_media_post(path, RoomId(905)).await.unwrap();
    store.add_media_post(path, RoomId(17)).await.unwrap();
    // Idempotent: posting it again in a room adds nothing.
    store.add_media_post(path, RoomId(905)).await.unwrap();
    store.add_media_post(path, RoomId(300)).await.unwrap();
    assert_eq!(
        store.media_rooms(path).await.unwrap(),
        vec![RoomId(17), RoomId(300), RoomId(905)]
    );
    // Other paths are separate.
    store
        .add_media_post("/uploads/2024/05/other.webp", RoomId(1))
        .await
        .unwrap();
    assert_eq!(
        store
            .media_rooms("/uploads/2024/05/other.webp")
            .await
            .unwrap(),
        vec![RoomId(1)]
    );
    assert_eq!(store.media_rooms(path).await.unwrap().len(), 3);
    // A path is taken from message content and may be long: it still works.
    let long = format!("/uploads/{}", noise(8_000));
    store.add_media_post(&long, RoomId(5)).await.unwrap();
    store.add_media_post(&long, RoomId(5)).await.unwrap();
    assert_eq!(store.media_rooms(&long).await.unwrap(), vec![RoomId(5)]);
}

fn device(user: &str, token: &str, platform: Platform, at: i64) -> Device {
    Device {
        user: uid(user),
        platform,
        token: token.to_owned(),
        device_id: None,
        created_at: at,
    }
}

async fn devices(store: &dyn Store) {
    let (ann, bob) = (uid("dev-ann"), uid("dev-bob"));
    assert_eq!(store.devices_of(&ann).await.unwrap(), Vec::<Device>::new());
    // Registered out of order: read back oldest registration first.
    let mut phone = device("dev-ann", "tok-phone", Platform::Fcm, 200);
    phone.device_id = Some("phone-uid-1".into());
    let tablet = device("dev-ann", "tok-tablet", Platform::Fcm, 100);
    let hook = device("dev-ann", "tok-hook", Platform::Webhook, 300);
    store.add_device(&phone).await.unwrap();
    store.add_device(&hook).await.unwrap();
    store.add_device(&tablet).await.unwrap();
    assert_eq!(
        store.devices_of(&ann).await.unwrap(),
        vec![tablet.clone(), phone.clone(), hook.clone()]
    );
    // The same token again by the same user replaces the registration (no duplicate).
    let mut phone2 = device("dev-ann", "tok-phone", Platform::Fcm, 400);
    phone2.device_id = Some("phone-uid-2".into());
    store.add_device(&phone2).await.unwrap();
    assert_eq!(
        store.devices_of(&ann).await.unwrap(),
        vec![tablet.clone(), hook.clone(), phone2.clone()]
    );
    // A long token (FCM tokens reach a few hundred bytes; the limit is 4096) round-trips.
    let long = noise(4096);
    let bob_long = device("dev-bob", &long, Platform::Fcm, 50);
    store.add_device(&bob_long).await.unwrap();
    // The token registered by another user moves to them.
    let moved = device("dev-bob", "tok-hook", Platform::Fcm, 500);
    store.add_device(&moved).await.unwrap();
    assert_eq!(
        store.devices_of(&ann).await.unwrap(),
        vec![tablet.clone(), phone2.clone()]
    );
    assert_eq!(
        store.devices_of(&bob).await.unwrap(),
        vec![bob_long.clone(), moved.clone()]
    );
    // remove_device: only the caller's own token.
    assert!(!store.remove_device(&ann, "tok-hook").await.unwrap());
    assert!(!store.remove_device(&ann, "no-such-token").await.unwrap());
    assert_eq!(
        store.devices_of(&bob).await.unwrap(),
        vec![bob_long.clone(), moved.clone()]
    );
    assert!(store.remove_device(&ann, "tok-tablet").await.unwrap());
    assert!(!store.remove_device(&ann, "tok-tablet").await.unwrap());
    assert_eq!(store.devices_of(&ann).await.unwrap(), vec![phone2.clone()]);
    // remove_device_token: whoever owns it; unknown tokens are fine.
    store.remove_device_token("tok-hook").await.unwrap();
    store.remove_device_token("tok-hook").await.unwrap();
    store.remove_device_token(&long).await.unwrap();
    assert_eq!(store.devices_of(&bob).await.unwrap(), Vec::<Device>::new());
    assert_eq!(store.devices_of(&ann).await.unwrap(), vec![phone2.clone()]);
    // A removed token can be registered again.
    store.add_device(&tablet).await.unwrap();
    assert_eq!(store.devices_of(&ann).await.unwrap(), vec![tablet, phone2]);
}

async fn mutes(store: &dyn Store) {
    let room = RoomId(4321);
    assert_eq!(store.muted_in(room).await.unwrap(), Vec::<UserId>::new());
    store.set_muted(room, &uid("mute-z"), true).await.unwrap();
    store.set_muted(room, &uid("mute-a"), true).await.unwrap();
    store.set_muted(room, &uid("mute-m"), true).await.unwrap();
    // Idempotent both ways.
    store.set_muted(room, &uid("mute-a"), true).await.unwrap();
    store.set_muted(room, &uid("mute-q"), false).await.unwrap();
    store
        .set_muted(RoomId(4322), &uid("mute-b"), true)
        .await
        .unwrap();
    assert_eq!(
        store.muted_in(room).await.unwrap(),
        vec![uid("mute-a"), uid("mute-m"), uid("mute-z")]
    );
    store.set_muted(room, &uid("mute-m"), false).await.unwrap();
    store.set_muted(room, &uid("mute-m"), false).await.unwrap();
    assert_eq!(
        store.muted_in(room).await.unwrap(),
        vec![uid("mute-a"), uid("mute-z")]
    );
    assert_eq!(
        store.muted_in(RoomId(4322)).await.unwrap(),
        vec![uid("mute-b")]
    );
    // Muting again after an unmute works.
    store.set_muted(room, &uid("mute-m"), true).await.unwrap();
    assert_eq!(store.muted_in(room).await.unwrap().len(), 3);
}

fn dead_letter(n: u64, at: i64) -> DeadLetter {
    DeadLetter {
        job: PushJob {
            user: uid("dl-user"),
            room: RoomId(77),
            message: MessageId(7_700_000 + n),
            sender: uid("dl-sender"),
            preview: format!("preview {n} \u{e9}\u{1f600}"),
            kind: if n.is_multiple_of(2) { "image" } else { "text" }.into(),
            room_name: n.is_multiple_of(2).then(|| "the group".to_owned()),
            collapse_key: "room-77".into(),
            created_at: at - 10,
            traceparent: None,
        },
        device_token: (!n.is_multiple_of(3)).then(|| format!("dl-token-{n}")),
        provider: if n.is_multiple_of(2) {
            "fcm"
        } else {
            "webhook"
        }
        .into(),
        reason: format!("reason {n}: 503 Service Unavailable"),
        attempts: u32::try_from(n).unwrap() + 1,
        at,
    }
}

async fn dead_letters(store: &dyn Store) {
    assert_eq!(
        store.dead_letters(10).await.unwrap(),
        Vec::<DeadLetter>::new()
    );
    // Given up out of time order, with two at the same instant.
    let letters = [
        dead_letter(1, 5_000),
        dead_letter(2, 7_000),
        dead_letter(3, 6_000),
        dead_letter(4, 7_000),
        dead_letter(5, 1_000),
    ];
    for l in &letters {
        store.add_dead_letter(l).await.unwrap();
    }
    let [l1, l2, l3, l4, l5] = letters;
    // Newest first; ties by insertion order (the later one first).
    assert_eq!(
        store.dead_letters(10).await.unwrap(),
        vec![l4.clone(), l2.clone(), l3.clone(), l1.clone(), l5]
    );
    assert_eq!(store.dead_letters(3).await.unwrap(), vec![l4, l2, l3]);
    assert_eq!(
        store.dead_letters(0).await.unwrap(),
        Vec::<DeadLetter>::new()
    );
}
