//! Unique usernames with dynamic consistency boundaries: no "usernames" aggregate that every
//! sign-up would contend on. Each decision reads only the events tagged with the username in
//! question (and with the user), and appends on the condition that none has arrived since.
//! A rename touches two boundaries at once, the old name and the new one, in one event.

use std::convert::Infallible;

use serde::{Deserialize, Serialize};
use skald_client::aggregate::{
    CodecError, DecideError, Decider, Decision, Envelope, Event, StateQuery, tag,
};
use skald_client::skald_core::{AppendResult, Error, EventStore, Query, StreamName};

/// The events of users. Each carries the tags `user:ID` and `username:NAME` (both names for a
/// rename), from its `#[tag]` fields: what the decisions query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
pub enum UserEvent {
    /// A user signed up with a name.
    UserRegistered {
        #[tag]
        user: String,
        #[tag]
        username: String,
    },
    /// A user gave up `from` for `to`.
    UsernameChanged {
        #[tag]
        user: String,
        #[tag("username")]
        from: String,
        #[tag("username")]
        to: String,
    },
}

/// Why a sign-up or a rename was turned down.
#[derive(Debug, thiserror::Error)]
pub enum UsernameError {
    #[error("the username {username:?} is taken by user {by}")]
    Taken { username: String, by: String },
    #[error("user {0} is registered already")]
    UserExists(String),
    #[error("user {0} is not registered")]
    UnknownUser(String),
    #[error("a username is 3 to 32 characters of a-z, 0-9, '.', '_' and '-'; {0:?} is not one")]
    InvalidName(String),
    #[error("the decision kept being overtaken by other writers; try again")]
    Contended,
    #[error("a user id is 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'; {0:?} is not one")]
    InvalidUser(String),
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Store(#[from] Error),
}

impl From<DecideError<Infallible, UsernameError>> for UsernameError {
    fn from(e: DecideError<Infallible, UsernameError>) -> Self {
        match e {
            DecideError::Rejected(e) => e,
            DecideError::Fold(never) => match never {},
            DecideError::Codec(e) => Self::Codec(e),
            DecideError::Contended { .. } => Self::Contended,
            DecideError::Store(e) => Self::Store(e),
        }
    }
}

/// The state a decision needs about one username and, for a sign-up or a rename, one user:
/// its boundary is every user event about that username or that user, and nothing more.
#[derive(Debug, Default)]
struct Facts {
    username: String,
    user: Option<String>,
    /// Who holds the username now.
    holder: Option<String>,
    /// The user's current name, when registered.
    current: Option<String>,
}

impl Facts {
    fn of(user: Option<&str>, username: &str) -> Self {
        Self {
            username: username.to_owned(),
            user: user.map(str::to_owned),
            ..Self::default()
        }
    }
}

impl StateQuery for Facts {
    type Event = UserEvent;
    type Error = Infallible;

    fn query(&self) -> Result<Query, CodecError> {
        let mut items = vec![UserEvent::query_item(vec![tag(
            "username",
            &self.username,
        )?])];
        if let Some(user) = &self.user {
            items.push(UserEvent::query_item(vec![tag("user", user)?]));
        }
        Ok(Query { items })
    }

    fn fold(&mut self, event: Envelope<UserEvent>) -> Result<(), Infallible> {
        let is_user = |u: &str| self.user.as_deref() == Some(u);
        match event.event {
            UserEvent::UserRegistered { user, username } => {
                if is_user(&user) {
                    self.current = Some(username.clone());
                }
                if username == self.username {
                    self.holder = Some(user);
                }
            }
            UserEvent::UsernameChanged { user, from, to } => {
                if is_user(&user) {
                    self.current = Some(to.clone());
                }
                if from == self.username {
                    self.holder = None;
                }
                if to == self.username {
                    self.holder = Some(user);
                }
            }
        }
        Ok(())
    }
}

fn check_name(username: &str) -> Result<(), UsernameError> {
    let ok = (3..=32).contains(&username.len())
        && username
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(UsernameError::InvalidName(username.to_owned()))
    }
}

fn check_user(user: &str) -> Result<(), UsernameError> {
    let ok = (1..=64).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(UsernameError::InvalidUser(user.to_owned()))
    }
}

/// Decides with `choose` on the facts about `user` and `username`, and appends its event to
/// the user's stream on the decision's condition; when another writer got in between, decides
/// again (up to 5 times) on what is stored then.
async fn decide_and_append<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
    choose: impl Fn(&Facts) -> Result<UserEvent, UsernameError>,
) -> Result<AppendResult, UsernameError> {
    check_user(user)?;
    check_name(username)?;
    let appended = Decider::new(store)
        .execute(
            || Facts::of(Some(user), username),
            &StreamName::new(format!("user-{user}"))?,
            |facts| choose(facts).map(|event| vec![event]),
        )
        .await?;
    Ok(appended.expect("a decision that succeeds appends one event"))
}

/// Registers `user` under `username`, unless either is taken.
pub async fn register<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
) -> Result<AppendResult, UsernameError> {
    decide_and_append(store, user, username, |facts| {
        if facts.current.is_some() {
            return Err(UsernameError::UserExists(user.to_owned()));
        }
        if let Some(by) = &facts.holder {
            return Err(UsernameError::Taken {
                username: username.to_owned(),
                by: by.clone(),
            });
        }
        Ok(UserEvent::UserRegistered {
            user: user.to_owned(),
            username: username.to_owned(),
        })
    })
    .await
}

/// Gives `user` the name `username`, freeing the old one, unless someone else holds it.
pub async fn rename<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
) -> Result<AppendResult, UsernameError> {
    decide_and_append(store, user, username, |facts| {
        let Some(from) = facts.current.clone() else {
            return Err(UsernameError::UnknownUser(user.to_owned()));
        };
        match &facts.holder {
            Some(by) => Err(UsernameError::Taken {
                username: username.to_owned(),
                by: by.clone(),
            }),
            None => Ok(UserEvent::UsernameChanged {
                user: user.to_owned(),
                from,
                to: username.to_owned(),
            }),
        }
    })
    .await
}

/// Who holds `username` now, read from the events tagged with it.
pub async fn holder<S: EventStore>(
    store: &S,
    username: &str,
) -> Result<Option<String>, UsernameError> {
    check_name(username)?;
    let decision = Decision::fold(store, Facts::of(None, username)).await?;
    Ok(decision.state.holder)
}
