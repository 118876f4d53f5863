//! Unique usernames with dynamic consistency boundaries: no "usernames" aggregate that every
//! sign-up would contend on. Each decision reads only the events tagged with the username in
//! question (and with the user), and appends on the condition that none has arrived since.
//! A rename touches two boundaries at once, the old name and the new one, in one event.

use serde::{Deserialize, Serialize};
use skald_client::aggregate::{Decision, Event, decode, propose};
use skald_client::skald_core::{
    AppendRequest, AppendResult, Error, EventStore, EventType, ExpectedRevision, Query, QueryItem,
    StreamName, Tag,
};

/// The events of users. Each carries the tags `user:ID` and `username:NAME` (both names for a
/// rename), which is what the decisions query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data")]
pub enum UserEvent {
    /// A user signed up with a name.
    UserRegistered { user: String, username: String },
    /// A user gave up `from` for `to`.
    UsernameChanged {
        user: String,
        from: String,
        to: String,
    },
}

impl Event for UserEvent {}

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
    Store(#[from] Error),
}

/// The state a decision needs about one username and one user.
#[derive(Debug, Default)]
struct Facts {
    /// Who holds the username now.
    holder: Option<String>,
    /// The user's current name, when registered.
    current: Option<String>,
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

fn tag(kind: &str, value: &str) -> Tag {
    Tag::new(format!("{kind}:{value}")).expect("names are checked before they become tags")
}

/// Every user event about `username` or about `user`: the consistency boundary of one
/// decision, and nothing more.
fn boundary(user: Option<&str>, username: &str) -> Query {
    let types = vec![
        EventType::new("UserRegistered").expect("a valid type"),
        EventType::new("UsernameChanged").expect("a valid type"),
    ];
    let mut items = vec![QueryItem {
        types: types.clone(),
        tags: vec![tag("username", username)],
    }];
    if let Some(user) = user {
        items.push(QueryItem {
            types,
            tags: vec![tag("user", user)],
        });
    }
    Query { items }
}

async fn decide<S: EventStore>(
    store: &S,
    user: Option<&str>,
    username: &str,
) -> Result<Decision<Facts>, UsernameError> {
    let mut broken = None;
    let decision = Decision::build(
        store,
        boundary(user, username),
        Facts::default(),
        |mut facts, event| {
            match decode::<UserEvent>(event) {
                Ok(UserEvent::UserRegistered {
                    user: u,
                    username: n,
                }) => {
                    if n == username {
                        facts.holder = Some(u.clone());
                    }
                    if Some(u.as_str()) == user {
                        facts.current = Some(n);
                    }
                }
                Ok(UserEvent::UsernameChanged { user: u, from, to }) => {
                    if from == username {
                        facts.holder = None;
                    }
                    if to == username {
                        facts.holder = Some(u.clone());
                    }
                    if Some(u.as_str()) == user {
                        facts.current = Some(to);
                    }
                }
                Err(e) => broken = Some(e),
            }
            facts
        },
    )
    .await?;
    match broken {
        Some(e) => Err(UsernameError::Store(Error::invalid(e.to_string()))),
        None => Ok(decision),
    }
}

/// Decides with `choose` and appends its event on the decision's condition; when another
/// writer got in between, decides again (a few times) on what is stored then.
async fn decide_and_append<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
    choose: impl Fn(&Facts) -> Result<(UserEvent, Vec<Tag>), UsernameError>,
) -> Result<AppendResult, UsernameError> {
    check_name(username)?;
    for _ in 0..5 {
        let decision = decide(store, Some(user), username).await?;
        let (event, tags) = choose(&decision.state)?;
        let mut proposed =
            propose(&event).map_err(|e| UsernameError::Store(Error::invalid(e.to_string())))?;
        proposed.tags = tags;
        let appended = store
            .append(AppendRequest {
                stream: StreamName::new(format!("user-{user}"))?,
                expected: ExpectedRevision::Any,
                condition: Some(decision.condition()),
                events: vec![proposed],
            })
            .await;
        match appended {
            Err(Error::ConditionFailed { .. }) => continue,
            other => return Ok(other?),
        }
    }
    Err(UsernameError::Contended)
}

/// Registers `user` under `username`, unless either is taken.
pub async fn register<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
) -> Result<AppendResult, UsernameError> {
    check_user(user)?;
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
        Ok((
            UserEvent::UserRegistered {
                user: user.to_owned(),
                username: username.to_owned(),
            },
            vec![tag("user", user), tag("username", username)],
        ))
    })
    .await
}

/// Gives `user` the name `username`, freeing the old one, unless someone else holds it.
pub async fn rename<S: EventStore>(
    store: &S,
    user: &str,
    username: &str,
) -> Result<AppendResult, UsernameError> {
    check_user(user)?;
    decide_and_append(store, user, username, |facts| {
        let Some(from) = facts.current.clone() else {
            return Err(UsernameError::UnknownUser(user.to_owned()));
        };
        match &facts.holder {
            Some(by) => Err(UsernameError::Taken {
                username: username.to_owned(),
                by: by.clone(),
            }),
            None => Ok((
                UserEvent::UsernameChanged {
                    user: user.to_owned(),
                    from: from.clone(),
                    to: username.to_owned(),
                },
                vec![
                    tag("user", user),
                    tag("username", &from),
                    tag("username", username),
                ],
            )),
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
    let decision = decide(store, None, username).await?;
    Ok(decision.state.holder)
}
