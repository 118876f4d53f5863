//! A bank account, the aggregate the client's tests share.

// Each test binary uses part of it.
#![allow(dead_code)]

use serde::{Deserialize, Serialize};
use serde_json::json;
use skald_client::aggregate::{Aggregate, Event, Upcaster};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
#[event(upcasters = upcasters)]
pub enum AccountEvent {
    Opened {
        owner: String,
    },
    /// Version 1 was `MoneyDeposited` with `cents`.
    #[event(version = 2)]
    Deposited {
        amount: u64,
    },
    Withdrawn {
        amount: u64,
    },
}

fn upcasters() -> Vec<Upcaster> {
    vec![Upcaster::new("MoneyDeposited", 1, |data| {
        ("Deposited".to_owned(), json!({"amount": data["cents"]}))
    })]
}

pub enum AccountCommand {
    Open { owner: String },
    Deposit(u64),
    Withdraw(u64),
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum AccountError {
    #[error("the account is not open")]
    NotOpen,
    #[error("the account is open already")]
    AlreadyOpen,
    #[error("the balance is {balance}, less than {asked}")]
    Insufficient { balance: u64, asked: u64 },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Account {
    pub open: bool,
    pub balance: u64,
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
            AccountCommand::Deposit(amount) => {
                Ok(vec![AccountEvent::Deposited { amount: *amount }])
            }
            AccountCommand::Withdraw(asked) if *asked > self.balance => {
                Err(AccountError::Insufficient {
                    balance: self.balance,
                    asked: *asked,
                })
            }
            AccountCommand::Withdraw(amount) => {
                Ok(vec![AccountEvent::Withdrawn { amount: *amount }])
            }
        }
    }
}
