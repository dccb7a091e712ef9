//! Who is who, as the dialects that name people need it: a per-gateway cache of user profiles
//! by id and of user ids by username, filled from the node's `user` lookup.
//!
//! The type-tagged dialect shows senders by username and is addressed by username; the
//! event/data dialect shows a `sender` object. Encoding an event must not cost a node round
//! trip per recipient, so lookups are cached for [`TTL`] (a renamed user shows the new name
//! within that time) and the cache is bounded (cleared whole when it outgrows [`MAX`], the
//! simplest bound that cannot grow without limit).

use crate::server::App;
use dashmap::DashMap;
use schema::{Command, Error, Profile, Reply, User, UserId};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a looked-up profile is trusted.
pub const TTL: Duration = Duration::from_secs(60);

/// Entries kept per map before the map is cleared.
pub const MAX: usize = 100_000;

/// The cache.
#[derive(Default)]
pub struct People {
    by_id: DashMap<UserId, (Instant, Arc<User>)>,
    by_name: DashMap<String, (Instant, UserId)>,
}

impl People {
    /// Remembers a profile seen on a connect (fresher than any lookup).
    pub fn remember(&self, profile: &Profile) {
        let now = Instant::now();
        let user = User {
            profile: profile.clone(),
            created_at: 0,
            updated_at: 0,
            last_seen: None,
        };
        if let Some(name) = &profile.username {
            self.insert_name(name.clone(), profile.id.clone(), now);
        }
        self.insert_id(Arc::new(user), now);
    }

    /// The user `id`, looked up on behalf of `asker` when not cached. `None`: no such user (or
    /// the node could not say; the caller shows what it has).
    pub async fn user(&self, app: &App, asker: &UserId, id: &UserId) -> Option<Arc<User>> {
        if let Some(e) = self.by_id.get(id)
            && e.0.elapsed() < TTL
        {
            return Some(e.1.clone());
        }
        let cmd = Command::User {
            id: Some(id.clone()),
            username: None,
        };
        match app.node.execute(asker, cmd).await {
            Ok(Reply::User { user, .. }) => Some(self.store(user)),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(%id, error = %e, "user lookup failed");
                None
            }
        }
    }

    /// The user whose username is `name`, looked up on behalf of `asker` when not cached.
    pub async fn by_username(
        &self,
        app: &App,
        asker: &UserId,
        name: &str,
    ) -> Result<Arc<User>, Error> {
        if let Some(e) = self.by_name.get(name)
            && e.0.elapsed() < TTL
            && let Some(u) = self.by_id.get(&e.1)
            && u.0.elapsed() < TTL
        {
            return Ok(u.1.clone());
        }
        let cmd = Command::User {
            id: None,
            username: Some(name.to_owned()),
        };
        match app.node.execute(asker, cmd).await? {
            Reply::User { user, .. } => Ok(self.store(user)),
            other => Err(Error::internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// A user's username, or their id when they have none.
    pub async fn username(&self, app: &App, asker: &UserId, id: &UserId) -> String {
        self.user(app, asker, id)
            .await
            .and_then(|u| u.profile.username.clone())
            .unwrap_or_else(|| id.to_string())
    }

    fn store(&self, user: User) -> Arc<User> {
        let now = Instant::now();
        let user = Arc::new(user);
        if let Some(name) = &user.profile.username {
            self.insert_name(name.clone(), user.profile.id.clone(), now);
        }
        self.insert_id(user.clone(), now);
        user
    }

    fn insert_id(&self, user: Arc<User>, now: Instant) {
        if self.by_id.len() >= MAX {
            self.by_id.clear();
        }
        self.by_id.insert(user.profile.id.clone(), (now, user));
    }

    fn insert_name(&self, name: String, id: UserId, now: Instant) {
        if self.by_name.len() >= MAX {
            self.by_name.clear();
        }
        self.by_name.insert(name, (now, id));
    }
}
