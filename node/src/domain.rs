//! The node's operations that are not one room's: chat lists, friendships and blocks, user
//! lookup, replay, presence fan-out and online state. Room rules live in [`crate::room`].

use crate::ring::RingKey;
use crate::room::RoomMsg;
use crate::{Node, cluster, public};
use schema::{
    Chat, Error, ErrorCode, Event, FriendAction, FriendView, Friendship, FriendshipStatus,
    HistoryQuery, Member, Reply, RoomId, RoomKind, UserId,
};
use std::collections::{HashMap, HashSet};

/// Largest chat list page.
const CHATS_MAX_LIMIT: u32 = 200;

impl Node {
    /// Tells new members about the room (and subscribes their gateways) and former members that
    /// they left.
    pub(crate) async fn membership_changed(
        &self,
        room: RoomId,
        joined: &[UserId],
        left: &[UserId],
    ) {
        // Only members with a session somewhere are told; the summary (every member) is built
        // only for them: members added in bulk to a big group are mostly offline, and building
        // it for each batch made adding members quadratic in the group's size.
        let online = if joined.is_empty() {
            Default::default()
        } else {
            self.gateways_of_users(joined).await
        };
        if !online.is_empty() {
            match self.ctx.store.room(room).await {
                Ok(Some(r)) => match self.summary(r).await {
                    Ok(summary) => self.announce_at(&summary, online).await,
                    Err(e) => tracing::warn!(%room, error = %e, "cannot announce new members"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!(%room, error = %e, "cannot announce new members"),
            }
        }
        if !left.is_empty() {
            self.deliver_to_users(left, Event::RoomLeft { room }).await;
        }
    }

    /// Online state of `users`, asking their owners.
    pub(crate) async fn online_of(&self, users: &[UserId]) -> HashMap<UserId, bool> {
        let mut out = HashMap::new();
        let mut remote: HashMap<schema::NodeId, Vec<UserId>> = HashMap::new();
        let ring = self.ring();
        for u in users {
            let key = RingKey::User(u.clone());
            match (self.peers.get(), ring.owner(&key)) {
                (Some(_), Some(owner)) if owner != &self.ctx.config.node_id => {
                    remote.entry(owner.clone()).or_default().push(u.clone());
                }
                _ => {
                    out.insert(u.clone(), self.ctx.sessions.is_online(u));
                }
            }
        }
        if let Some(peers) = self.peers.get() {
            for (_, group) in remote {
                let Some(first) = group.first() else {
                    continue;
                };
                let key = RingKey::User(first.clone());
                let req = cluster::wire::NodeRequest::Online {
                    users: group.clone(),
                };
                match peers.call(&key, req, true).await {
                    Ok(cluster::wire::NodeResponse::Online { online }) => {
                        out.extend(group.into_iter().zip(online));
                    }
                    Ok(other) => tracing::warn!(?other, "unexpected answer to online"),
                    Err(e) => tracing::warn!(error = %e, "cannot learn online state"),
                }
            }
        }
        out
    }

    /// Online state of users this node owns (the cluster service answers peers with it).
    pub fn local_online(&self, users: &[UserId]) -> Vec<bool> {
        users
            .iter()
            .map(|u| self.ctx.sessions.is_online(u))
            .collect()
    }

    /// Fills the online state of `members` as `caller` may see it: hidden (`false`) for anyone
    /// with a block between them and the caller.
    pub(crate) async fn fill_online(&self, caller: &UserId, members: &mut [Member]) {
        let users: Vec<UserId> = members.iter().map(|m| m.user.clone()).collect();
        let online = self.online_of(&users).await;
        let hidden = match self.blocked_with(caller).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(%caller, error = %e, "cannot read blocks; hiding online state");
                users.iter().filter(|u| *u != caller).cloned().collect()
            }
        };
        for m in members {
            let seen = !hidden.contains(&m.user) && online.get(&m.user).copied().unwrap_or(false);
            m.online = Some(seen);
        }
    }

    /// The events of `room` after `after_seq`, or a resync when too far behind.
    pub(crate) async fn replay(
        &self,
        caller: &UserId,
        room: RoomId,
        after_seq: u64,
    ) -> Result<Reply, Error> {
        self.call_room(room, |reply| RoomMsg::Authorize {
            user: caller.clone(),
            reply,
        })
        .await??;
        let store = &self.ctx.store;
        let current = store
            .room(room)
            .await?
            .ok_or_else(|| Error::not_found(format!("room {room} does not exist")))?;
        let last_seq = current.last_seq;
        if after_seq >= last_seq {
            return Ok(Reply::Replay {
                events: Vec::new(),
                resync: false,
                last_seq,
            });
        }
        let max = self.ctx.config.replay_max;
        if last_seq - after_seq > u64::from(max) {
            return Ok(Reply::Replay {
                events: Vec::new(),
                resync: true,
                last_seq,
            });
        }
        let messages = store.messages_after_seq(room, after_seq, max).await?;
        let log = store.room_log(room, after_seq, max).await?;
        let mut events: Vec<(u64, Event)> = messages
            .into_iter()
            .map(|m| (m.seq, Event::Message { message: public(m) }))
            .chain(log)
            .collect();
        events.sort_by_key(|(s, _)| *s);
        Ok(Reply::Replay {
            events: events.into_iter().map(|(_, e)| e).collect(),
            resync: false,
            last_seq,
        })
    }

    /// The history of the direct room of the caller and `peer`.
    pub(crate) async fn direct_history(
        &self,
        caller: &UserId,
        peer: UserId,
        query: HistoryQuery,
    ) -> Result<Reply, Error> {
        let limit = self.history_limit(&query)?;
        let Some(room) = self.ctx.store.direct_room(caller, &peer).await? else {
            return Ok(Reply::History {
                messages: Vec::new(),
                has_more: false,
            });
        };
        // A direct room's members never change; the store answers without the room's actor,
        // which may live on another node.
        let members = self.ctx.store.members(room).await?;
        if !members.iter().any(|m| &m.user == caller) {
            return Err(Error::not_member(room));
        }
        let page = self.history_page(room, query, limit).await?;
        Ok(Reply::History {
            messages: page.messages.into_iter().map(public).collect(),
            has_more: page.has_more,
        })
    }

    /// Users with a block between them and `user`, either way.
    async fn blocked_with(&self, user: &UserId) -> Result<HashSet<UserId>, Error> {
        Ok(self
            .ctx
            .store
            .blocks_of(user)
            .await?
            .into_iter()
            .map(|(a, b)| if &a == user { b } else { a })
            .collect())
    }

    /// The friendship status of a pair as clients see it: `blocked` when either blocks.
    async fn pair_status(
        &self,
        a: &UserId,
        b: &UserId,
    ) -> Result<(Option<Friendship>, Option<FriendshipStatus>), Error> {
        let blocked = self.blocked_with(a).await?.contains(b);
        let f = self.ctx.store.friendship(a, b).await?;
        let status = if blocked {
            Some(FriendshipStatus::Blocked)
        } else {
            f.as_ref().map(|f| f.status)
        };
        Ok((f, status))
    }

    /// The caller's chat list.
    pub(crate) async fn chats(
        &self,
        caller: &UserId,
        direct_only: bool,
        skip: u32,
        limit: Option<u32>,
    ) -> Result<Reply, Error> {
        let limit = match limit {
            None => self.ctx.config.chats_default_limit,
            Some(0) => return Err(Error::invalid("limit must be at least 1")),
            Some(n) => n.min(CHATS_MAX_LIMIT),
        } as usize;
        let store = &self.ctx.store;
        let mut rooms = store.rooms_of(caller).await?;
        if direct_only {
            rooms.retain(|r| r.room.kind == RoomKind::Direct);
        }
        let has_more = rooms.len() > skip as usize + limit;
        let page: Vec<_> = rooms.into_iter().skip(skip as usize).take(limit).collect();
        let blocked = self.blocked_with(caller).await?;
        let peers: Vec<UserId> = page
            .iter()
            .filter(|r| r.room.kind == RoomKind::Direct)
            .filter_map(|r| {
                r.members
                    .iter()
                    .find(|m| &m.user != caller)
                    .map(|m| m.user.clone())
            })
            .collect();
        let online = self.online_of(&peers).await;
        let mut chats = Vec::with_capacity(page.len());
        for s in page {
            let role = s
                .members
                .iter()
                .find(|m| &m.user == caller)
                .map_or(schema::Role::Member, |m| m.role);
            let read_up_to = store.read_marker(s.room.id, caller).await?;
            let unread = store
                .unread_count(s.room.id, caller, read_up_to, self.ctx.config.unread_cap)
                .await?;
            let (mut peer, mut peer_online, mut friendship) = (None, None, None);
            if s.room.kind == RoomKind::Direct
                && let Some(other) = s.members.iter().find(|m| &m.user != caller)
            {
                let is_blocked = blocked.contains(&other.user);
                peer = store.user(&other.user).await?;
                peer_online =
                    Some(!is_blocked && online.get(&other.user).copied().unwrap_or(false));
                friendship = if is_blocked {
                    Some(FriendshipStatus::Blocked)
                } else {
                    store
                        .friendship(caller, &other.user)
                        .await?
                        .map(|f| f.status)
                };
            }
            chats.push(Chat {
                member_count: u32::try_from(s.members.len()).unwrap_or(u32::MAX),
                room: s.room,
                role,
                peer,
                peer_online,
                friendship,
                last_message: s.last_message.map(public),
                unread,
                read_up_to,
            });
        }
        Ok(Reply::Chats { chats, has_more })
    }

    /// Changes a friendship. One pair's changes run one at a time on this node (the command is
    /// routed by the pair, see `remote::command_key`).
    pub(crate) async fn friend(
        &self,
        caller: &UserId,
        peer: UserId,
        action: FriendAction,
    ) -> Result<Reply, Error> {
        if &peer == caller {
            return Err(Error::invalid("you cannot befriend or block yourself"));
        }
        let store = &self.ctx.store;
        if store.user(&peer).await?.is_none() {
            return Err(Error::not_found(format!("user {peer} not found")));
        }
        let key = crate::store::direct_key(caller, &peer);
        let lock = self.ctx.pair_locks.entry(key.clone()).or_default().clone();
        let guard = lock.lock().await;
        let res = self.friend_locked(caller, &peer, action).await;
        drop(guard);
        drop(lock);
        self.ctx
            .pair_locks
            .remove_if(&key, |_, l| std::sync::Arc::strong_count(l) == 1);
        let (_, changed, block_changed) = res?;
        let i_block = store
            .blocks_of(caller)
            .await?
            .iter()
            .any(|(a, b)| a == caller && b == &peer);
        let (shown, status) = self.pair_status(caller, &peer).await?;
        if changed || block_changed {
            let mut visible = shown.clone();
            if let (Some(f), Some(st)) = (visible.as_mut(), status) {
                f.status = st;
            }
            let ev = Event::Friendship {
                friendship: visible,
                users: [caller.clone(), peer.clone()],
            };
            self.deliver_to_users(&[caller.clone(), peer.clone()], ev)
                .await;
        }
        if block_changed && let Some(room) = store.direct_room(caller, &peer).await? {
            self.reload_room(room).await;
        }
        let mut friendship = shown;
        if let (Some(f), Some(st)) = (friendship.as_mut(), status) {
            f.status = st;
        }
        Ok(Reply::Friendship {
            friendship,
            blocked: i_block,
        })
    }

    /// Applies a friendship action; answers the friendship after it, whether it changed and
    /// whether a block changed.
    async fn friend_locked(
        &self,
        caller: &UserId,
        peer: &UserId,
        action: FriendAction,
    ) -> Result<(Option<Friendship>, bool, bool), Error> {
        let store = &self.ctx.store;
        let now = crate::ids::unix_ms();
        let current = store.friendship(caller, peer).await?;
        let blocked = self.blocked_with(caller).await?.contains(peer);
        let conflict = |m: &str| Error::new(ErrorCode::Conflict, m.to_owned());
        let put = |f: Friendship| async move {
            store.put_friendship(&f).await?;
            Ok::<_, Error>((Some(f), true, false))
        };
        match action {
            FriendAction::Request => {
                if blocked {
                    return Err(crate::room::blocked_error());
                }
                match current {
                    None => {
                        put(Friendship {
                            requester: caller.clone(),
                            addressee: peer.clone(),
                            status: FriendshipStatus::Pending,
                            created_at: now,
                            updated_at: now,
                        })
                        .await
                    }
                    Some(mut f) => match f.status {
                        // They asked me already: asking back accepts.
                        FriendshipStatus::Pending if &f.addressee == caller => {
                            f.status = FriendshipStatus::Accepted;
                            f.updated_at = now;
                            put(f).await
                        }
                        FriendshipStatus::Rejected => {
                            f.requester = caller.clone();
                            f.addressee = peer.clone();
                            f.status = FriendshipStatus::Pending;
                            f.updated_at = now;
                            put(f).await
                        }
                        _ => Ok((Some(f), false, false)),
                    },
                }
            }
            FriendAction::Accept | FriendAction::Reject => {
                let Some(mut f) = current else {
                    return Err(Error::not_found(format!("no friend request from {peer}")));
                };
                if f.status != FriendshipStatus::Pending || &f.addressee != caller {
                    return Err(conflict(
                        "there is no pending request from this user to you",
                    ));
                }
                if blocked && action == FriendAction::Accept {
                    return Err(crate::room::blocked_error());
                }
                f.status = if action == FriendAction::Accept {
                    FriendshipStatus::Accepted
                } else {
                    FriendshipStatus::Rejected
                };
                f.updated_at = now;
                put(f).await
            }
            FriendAction::Cancel => {
                let Some(f) = current else {
                    return Err(Error::not_found(format!("no friendship with {peer}")));
                };
                let mine = match f.status {
                    FriendshipStatus::Pending | FriendshipStatus::Rejected => {
                        &f.requester == caller
                    }
                    FriendshipStatus::Accepted => true,
                    FriendshipStatus::Blocked => false,
                };
                if !mine {
                    return Err(conflict(
                        "only the requester can withdraw a request; reject it instead",
                    ));
                }
                store.delete_friendship(caller, peer).await?;
                Ok((None, true, false))
            }
            FriendAction::Block | FriendAction::Unblock => {
                let on = action == FriendAction::Block;
                let i_block = store
                    .blocks_of(caller)
                    .await?
                    .iter()
                    .any(|(a, b)| a == caller && b == peer);
                if i_block == on {
                    return Ok((current, false, false));
                }
                store.set_block(caller, peer, on).await?;
                Ok((current, false, true))
            }
        }
    }

    /// Makes the owner of `room` reread it from the store (a block changed).
    pub(crate) async fn reload_room(&self, room: RoomId) {
        let key = RingKey::Room(room);
        match self.peers.get() {
            Some(peers) if !self.owns(&key) => {
                let req = cluster::wire::NodeRequest::ReloadRoom { room };
                if let Err(e) = peers.call(&key, req, true).await {
                    tracing::warn!(%room, error = %e, "cannot reload the room at its owner");
                }
            }
            _ => self.reload_local_room(room),
        }
    }

    /// Makes the local actor of `room`, if running, reread it from the store.
    pub fn reload_local_room(&self, room: RoomId) {
        if let Some(actor) = self.rooms.get(&room)
            && actor.send_message(RoomMsg::Reload).is_err()
        {
            tracing::debug!(%room, "room actor stopped");
        }
    }

    /// The caller's friendships.
    pub(crate) async fn friendships(&self, caller: &UserId, all: bool) -> Result<Reply, Error> {
        let store = &self.ctx.store;
        let blocks = store.blocks_of(caller).await?;
        let blocked: HashSet<UserId> = blocks
            .iter()
            .map(|(a, b)| if a == caller { b.clone() } else { a.clone() })
            .collect();
        let mut list: Vec<Friendship> = store.friendships_of(caller).await?;
        for f in &mut list {
            if blocked.contains(f.other(caller)) {
                f.status = FriendshipStatus::Blocked;
            }
        }
        if all {
            // Blocks with no friendship row still show, as the blocker's entry.
            let listed: HashSet<UserId> = list.iter().map(|f| f.other(caller).clone()).collect();
            for (a, b) in &blocks {
                let other = if a == caller { b } else { a };
                if !listed.contains(other) && a == caller {
                    list.push(Friendship {
                        requester: a.clone(),
                        addressee: b.clone(),
                        status: FriendshipStatus::Blocked,
                        created_at: 0,
                        updated_at: 0,
                    });
                }
            }
        } else {
            list.retain(|f| f.status == FriendshipStatus::Accepted);
        }
        let others: Vec<UserId> = list.iter().map(|f| f.other(caller).clone()).collect();
        let online = self.online_of(&others).await;
        let mut friends = Vec::with_capacity(list.len());
        for f in list {
            let other = f.other(caller).clone();
            let Some(user) = store.user(&other).await? else {
                continue;
            };
            let room = store.direct_room(caller, &other).await?;
            friends.push(FriendView {
                online: !blocked.contains(&other) && online.get(&other).copied().unwrap_or(false),
                friendship: f,
                user,
                room,
            });
        }
        Ok(Reply::Friendships { friends })
    }

    /// A user by id or username.
    pub(crate) async fn lookup_user(
        &self,
        caller: &UserId,
        id: Option<UserId>,
        username: Option<String>,
    ) -> Result<Reply, Error> {
        let store = &self.ctx.store;
        let user = match (id, username) {
            (Some(id), None) => store.user(&id).await?,
            (None, Some(name)) => store.user_by_username(&name).await?,
            _ => return Err(Error::invalid("give exactly one of id and username")),
        }
        .ok_or_else(|| Error::not_found("user not found"))?;
        let hidden = self.blocked_with(caller).await?.contains(&user.profile.id);
        let online = !hidden
            && self
                .online_of(std::slice::from_ref(&user.profile.id))
                .await
                .get(&user.profile.id)
                .copied()
                .unwrap_or(false);
        let friendship = if &user.profile.id == caller {
            None
        } else {
            self.pair_status(caller, &user.profile.id).await?.1
        };
        Ok(Reply::User {
            user,
            online,
            friendship,
        })
    }

    /// Who hears about `user`'s presence (see [`crate::store::Store::presence_audience`]).
    async fn presence_audience(&self, user: &UserId) -> Result<Vec<UserId>, Error> {
        Ok(self
            .ctx
            .store
            .presence_audience(user, self.ctx.config.presence_group_max)
            .await?)
    }

    /// Tells `user`'s audience that the user came online or went offline.
    pub(crate) async fn presence_changed(
        &self,
        user: &UserId,
        online: bool,
        last_seen: Option<schema::Millis>,
    ) {
        match self.presence_audience(user).await {
            Ok(audience) if !audience.is_empty() => {
                let ev = Event::Presence {
                    user: user.clone(),
                    online,
                    last_seen,
                };
                self.deliver_to_users(&audience, ev).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(%user, error = %e, "presence not announced"),
        }
    }
}
