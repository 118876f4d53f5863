//! A bank account on Skald: the aggregate that decides deposits and withdrawals, and a SQLite
//! projection of every account's balance, kept exactly once by storing its checkpoint in the
//! same transaction as the balances, with a compare-and-set, so that a second projector on the
//! same database stops instead of counting events twice.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use skald_client::aggregate::{Aggregate, Envelope, Event};
use skald_client::projection::Projection;
use skald_client::skald_core::{Category, Position, ReadSource};

/// What happens to an account. Stored with the variant's name as the event type.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
pub enum AccountEvent {
    /// The account was opened for `owner`.
    Opened { owner: String },
    /// Money came in.
    Deposited { amount: u64 },
    /// Money went out.
    Withdrawn { amount: u64 },
}

/// What can be asked of an account.
#[derive(Clone, Debug)]
pub enum AccountCommand {
    /// Open it for an owner.
    Open { owner: String },
    /// Put money in.
    Deposit { amount: u64 },
    /// Take money out; never more than the balance.
    Withdraw { amount: u64 },
}

/// Why an account turns a command down.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AccountError {
    #[error("the account does not exist: open it first")]
    NotOpen,
    #[error("the account is open already")]
    AlreadyOpen,
    #[error("an amount must be more than 0")]
    ZeroAmount,
    #[error("the balance is {balance}, less than the {asked} asked for")]
    Insufficient { balance: u64, asked: u64 },
}

/// The state a decision needs: whether the account is open, and its balance.
#[derive(Debug, Default)]
pub struct Account {
    open: bool,
    balance: u64,
}

impl Aggregate for Account {
    type Event = AccountEvent;
    type Command = AccountCommand;
    type Error = AccountError;

    fn stream(id: &str) -> String {
        format!("account-{id}")
    }

    fn apply(&mut self, event: &AccountEvent) {
        match event {
            AccountEvent::Opened { .. } => self.open = true,
            AccountEvent::Deposited { amount } => self.balance += amount,
            AccountEvent::Withdrawn { amount } => self.balance -= amount,
        }
    }

    fn decide(&self, command: &AccountCommand) -> Result<Vec<AccountEvent>, AccountError> {
        match command {
            AccountCommand::Open { owner } if !self.open => Ok(vec![AccountEvent::Opened {
                owner: owner.clone(),
            }]),
            AccountCommand::Open { .. } => Err(AccountError::AlreadyOpen),
            _ if !self.open => Err(AccountError::NotOpen),
            AccountCommand::Deposit { amount: 0 } | AccountCommand::Withdraw { amount: 0 } => {
                Err(AccountError::ZeroAmount)
            }
            AccountCommand::Deposit { amount } => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw { amount } if *amount > self.balance => {
                Err(AccountError::Insufficient {
                    balance: self.balance,
                    asked: *amount,
                })
            }
            AccountCommand::Withdraw { amount } => {
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
        }
    }
}

/// Why the read model failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadModelError {
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stream {0} is not an account's")]
    NotAnAccount(String),
    /// Another projector committed since this batch was read: nothing of it is kept.
    #[error(
        "another projector moved the read model's checkpoint (expected {expected}); this one \
         stops so that no event is applied twice"
    )]
    Superseded { expected: String },
}

/// One account as the read model has it.
#[derive(Debug, PartialEq, Eq)]
pub struct Balance {
    pub owner: String,
    pub balance: u64,
    /// Deposits and withdrawals applied to it.
    pub movements: u64,
}

/// The balances of every account, in a SQLite file, with the position of the last event
/// applied in the same file.
pub struct Balances {
    db: Connection,
}

impl Balances {
    /// Opens (or creates) the read model in `path`.
    pub fn open(path: &Path) -> Result<Self, ReadModelError> {
        let db = Connection::open(path)?;
        // Another process may hold the database (a second projector, a query): wait for it,
        // from the first statement on (switching to WAL takes the database for a moment).
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every commit on disk before `apply` returns: a checkpoint is never ahead of what
        // survives a power cut. Two processes creating the database at once can find it busy
        // in ways SQLite does not wait out (the switch to WAL): then this is tried again.
        let mut tries = 0;
        loop {
            let created = db.execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 CREATE TABLE IF NOT EXISTS accounts (
                     id TEXT PRIMARY KEY,
                     owner TEXT NOT NULL,
                     balance INTEGER NOT NULL,
                     movements INTEGER NOT NULL
                 );
                 CREATE TABLE IF NOT EXISTS checkpoint (
                     projection TEXT PRIMARY KEY,
                     position INTEGER NOT NULL
                 );",
            );
            match created {
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                other => break other?,
            }
        }
        Ok(Self { db })
    }

    /// The balance query: the account `id`, or `None` when the model has not seen it opened.
    pub fn balance(&self, id: &str) -> Result<Option<Balance>, ReadModelError> {
        Ok(self
            .db
            .query_row(
                "SELECT owner, balance, movements FROM accounts WHERE id = ?1",
                params![id],
                |row| {
                    Ok(Balance {
                        owner: row.get(0)?,
                        balance: row.get::<_, i64>(1)? as u64,
                        movements: row.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()?)
    }

    /// The stored checkpoint.
    pub fn position(&self) -> Result<Option<Position>, ReadModelError> {
        Ok(self
            .db
            .query_row(
                "SELECT position FROM checkpoint WHERE projection = 'balances'",
                [],
                |row| row.get::<_, i64>(0),
            )
            .optional()?
            .map(|p| Position(p as u64)))
    }
}

impl Projection for Balances {
    type Event = AccountEvent;
    type Error = ReadModelError;

    fn source(&self) -> ReadSource {
        ReadSource::Category(Category::new("account").expect("a valid category"))
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, ReadModelError> {
        self.position()
    }

    async fn apply(
        &mut self,
        events: &[Envelope<AccountEvent>],
        previous: Option<Position>,
        checkpoint: Position,
    ) -> Result<(), ReadModelError> {
        // IMMEDIATE: the write lock is taken (waiting for another writer) before anything is
        // read, so the compare-and-set below sees the latest commit.
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Compare-and-set first: a second projector's batch rolls back here, untouched.
        let moved = match previous {
            Some(previous) => tx.execute(
                "UPDATE checkpoint SET position = ?1 WHERE projection = 'balances' AND position = ?2",
                params![checkpoint.0 as i64, previous.0 as i64],
            )?,
            None => tx.execute(
                "INSERT INTO checkpoint (projection, position) VALUES ('balances', ?1)
                 ON CONFLICT (projection) DO NOTHING",
                params![checkpoint.0 as i64],
            )?,
        };
        if moved != 1 {
            return Err(ReadModelError::Superseded {
                expected: previous.map_or("none".into(), |p| p.0.to_string()),
            });
        }
        for event in events {
            let stream = event.recorded.stream.as_str();
            let id = stream
                .strip_prefix("account-")
                .ok_or_else(|| ReadModelError::NotAnAccount(stream.to_owned()))?;
            let change = match &event.event {
                AccountEvent::Opened { owner } => {
                    tx.execute(
                        "INSERT INTO accounts (id, owner, balance, movements) VALUES (?1, ?2, 0, 0)
                         ON CONFLICT (id) DO UPDATE SET owner = excluded.owner",
                        params![id, owner],
                    )?;
                    continue;
                }
                AccountEvent::Deposited { amount } => *amount as i64,
                AccountEvent::Withdrawn { amount } => -(*amount as i64),
            };
            tx.execute(
                "UPDATE accounts SET balance = balance + ?2, movements = movements + 1
                 WHERE id = ?1",
                params![id, change],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), ReadModelError> {
        // IMMEDIATE: the write lock is taken (waiting for another writer) before anything is
        // read, so the compare-and-set below sees the latest commit.
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("DELETE FROM accounts", [])?;
        tx.execute("DELETE FROM checkpoint WHERE projection = 'balances'", [])?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skald_client::aggregate::given;

    fn opened() -> AccountEvent {
        AccountEvent::Opened {
            owner: "ada".into(),
        }
    }

    #[test]
    fn decisions() {
        given::<Account>([])
            .when(AccountCommand::Open {
                owner: "ada".into(),
            })
            .then(vec![opened()]);
        given::<Account>([opened()])
            .when(AccountCommand::Open {
                owner: "bob".into(),
            })
            .then_rejected(|e| assert_eq!(*e, AccountError::AlreadyOpen));
        given::<Account>([])
            .when(AccountCommand::Deposit { amount: 5 })
            .then_rejected(|e| assert_eq!(*e, AccountError::NotOpen));
        given::<Account>([opened()])
            .when(AccountCommand::Deposit { amount: 0 })
            .then_rejected(|e| assert_eq!(*e, AccountError::ZeroAmount));
        given::<Account>([opened(), AccountEvent::Deposited { amount: 30 }])
            .when(AccountCommand::Withdraw { amount: 30 })
            .then(vec![AccountEvent::Withdrawn { amount: 30 }]);
        given::<Account>([
            opened(),
            AccountEvent::Deposited { amount: 30 },
            AccountEvent::Withdrawn { amount: 10 },
        ])
        .when(AccountCommand::Withdraw { amount: 21 })
        .then_rejected(|e| {
            assert_eq!(
                *e,
                AccountError::Insufficient {
                    balance: 20,
                    asked: 21
                }
            )
        });
    }
}
