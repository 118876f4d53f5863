//! The tutorial of `docs/client.md`, run: every code block of its tutorial is a part of this
//! file (a test checks that the document quotes it word for word), and the test runs them
//! against a server, as a user would.

mod support;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// --- tutorial: events ---
use serde::{Deserialize, Serialize};
use skald_client::aggregate::{Aggregate, CommandKey, Event, Repository};

/// What happens to a library book. Each variant is a stored event type; the `#[tag]` field
/// tags every event with `book:<id>`, for DCB queries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
enum BookEvent {
    Added {
        #[tag]
        book: String,
        title: String,
    },
    Lent {
        #[tag]
        book: String,
        #[tag]
        member: String,
    },
    Returned {
        #[tag]
        book: String,
        #[tag]
        member: String,
    },
}
// --- end ---

// --- tutorial: aggregate ---
/// A book: its stream decides adding and returning it. (Lending crosses books, so it is a
/// DCB decision, below.)
#[derive(Default)]
struct Book {
    id: Option<String>,
    lent_to: Option<String>,
}

enum BookCommand {
    Add { book: String, title: String },
    Return,
}

#[derive(Debug, PartialEq, thiserror::Error)]
enum BookError {
    #[error("the book is not in the catalogue")]
    Unknown,
    #[error("the book is out, lent to {0}")]
    Out(String),
    #[error("the book is not lent")]
    NotLent,
    #[error("{0} has 3 books out already")]
    AtLimit(String),
}

impl Aggregate for Book {
    type Event = BookEvent;
    type Command = BookCommand;
    type Error = BookError;

    fn stream(id: &str) -> String {
        format!("book-{id}")
    }

    fn apply(&mut self, event: &BookEvent) {
        match event {
            BookEvent::Added { book, .. } => self.id = Some(book.clone()),
            BookEvent::Lent { member, .. } => self.lent_to = Some(member.clone()),
            BookEvent::Returned { .. } => self.lent_to = None,
        }
    }

    fn decide(&self, command: &BookCommand) -> Result<Vec<BookEvent>, BookError> {
        let Some(book) = self.id.clone() else {
            return match command {
                BookCommand::Add { book, title } => Ok(vec![BookEvent::Added {
                    book: book.clone(),
                    title: title.clone(),
                }]),
                _ => Err(BookError::Unknown),
            };
        };
        match command {
            BookCommand::Add { .. } => Ok(Vec::new()), // added already: nothing to do
            BookCommand::Return => match &self.lent_to {
                Some(member) => Ok(vec![BookEvent::Returned {
                    book,
                    member: member.clone(),
                }]),
                None => Err(BookError::NotLent),
            },
        }
    }
}
// --- end ---

// --- tutorial: projection ---
use skald_client::aggregate::Envelope;
use skald_client::projection::{Projection, Projector};
use skald_client::skald_core::{Category, Position, ReadSource};

/// Loans per member, with the checkpoint kept beside them: one mutex stands for the read
/// model's database, and each `apply` is one transaction.
#[derive(Clone, Default)]
struct Loans {
    db: Arc<Mutex<LoansDb>>,
}

#[derive(Clone, Default)]
struct LoansDb {
    members: BTreeMap<String, i64>,
    checkpoint: Option<Position>,
}

#[derive(Debug, thiserror::Error)]
#[error("another projector moved the checkpoint")]
struct Moved;

impl Projection for Loans {
    type Event = BookEvent;
    type Error = Moved;

    fn source(&self) -> ReadSource {
        ReadSource::Category(Category::new("book").unwrap())
    }

    async fn checkpoint(&mut self) -> Result<Option<Position>, Moved> {
        Ok(self.db.lock().unwrap().checkpoint)
    }

    async fn apply(
        &mut self,
        events: &[Envelope<BookEvent>],
        previous: Option<Position>,
        checkpoint: Position,
    ) -> Result<(), Moved> {
        let mut db = self.db.lock().unwrap();
        if db.checkpoint != previous {
            return Err(Moved); // compare-and-set: another runner applied these
        }
        for e in events {
            match &e.event {
                BookEvent::Lent { member, .. } => {
                    *db.members.entry(member.clone()).or_default() += 1
                }
                BookEvent::Returned { member, .. } => {
                    *db.members.entry(member.clone()).or_default() -= 1
                }
                BookEvent::Added { .. } => {}
            }
        }
        db.checkpoint = Some(checkpoint);
        Ok(())
    }

    async fn reset(&mut self) -> Result<(), Moved> {
        *self.db.lock().unwrap() = Default::default();
        Ok(())
    }
}
// --- end ---

// --- tutorial: process manager ---
use skald_client::aggregate::CommandError;
use skald_client::process::{Dispatch, Failure, ProcessManager, ProcessRunner};
use skald_client::skald_core::EventStore;

/// Reminds a member to return a book after its third loan in a row; one instance per member.
struct Reminders;

#[derive(Clone, Default, Serialize, Deserialize)]
struct Member {
    out: u32,
    reminded: bool,
}

#[derive(Debug, Serialize)]
struct Remind {
    member: String,
}

impl ProcessManager for Reminders {
    type Event = BookEvent;
    type State = Member;
    type Command = Remind;

    fn name(&self) -> &str {
        "reminders"
    }

    fn source(&self) -> ReadSource {
        ReadSource::Category(Category::new("book").unwrap())
    }

    fn instance(&self, e: &Envelope<BookEvent>) -> Option<String> {
        match &e.event {
            BookEvent::Lent { member, .. } | BookEvent::Returned { member, .. } => {
                Some(member.clone())
            }
            BookEvent::Added { .. } => None,
        }
    }

    fn react(&self, member: &mut Member, e: &Envelope<BookEvent>) -> Vec<Remind> {
        match &e.event {
            BookEvent::Lent { member: who, .. } => {
                member.out += 1;
                if member.out >= 3 && !member.reminded {
                    member.reminded = true;
                    return vec![Remind {
                        member: who.clone(),
                    }];
                }
            }
            BookEvent::Returned { .. } => member.out = member.out.saturating_sub(1),
            BookEvent::Added { .. } => {}
        }
        Vec::new()
    }
}

/// Sends reminders by appending them to the member's stream, once per key.
struct Mailer<S> {
    store: S,
}

impl<S: EventStore> Dispatch<Remind> for Mailer<S> {
    type Error = CommandError<std::convert::Infallible>;

    async fn send(&self, remind: &Remind, key: &CommandKey) -> Result<(), Self::Error> {
        let mut event = skald_client::aggregate::propose(&MemberEvent::Reminded {})
            .map_err(CommandError::Codec)?;
        event.id = key.event_id(0); // the same id each time: a repeat is not sent twice
        self.store
            .append(skald_client::skald_core::AppendRequest {
                stream: skald_client::skald_core::StreamName::new(format!(
                    "member-{}",
                    remind.member
                ))
                .map_err(CommandError::Store)?,
                expected: skald_client::skald_core::ExpectedRevision::Any,
                condition: None,
                events: vec![event],
            })
            .await
            .map(|_| ())
            .map_err(CommandError::Store)
    }

    fn on_failure(&self, error: &Self::Error) -> Failure {
        Failure::of_command(error) // retry what may pass later, park what never will
    }
}

#[derive(Serialize, Deserialize, Event)]
#[serde(tag = "type", content = "data")]
enum MemberEvent {
    Reminded {},
}
// --- end ---

// --- tutorial: decision ---
use skald_client::aggregate::{CodecError, DecideError, Decider, StateQuery, tag};
use skald_client::skald_core::{Query, StreamName};

/// What lending `book` to `member` depends on: whether the book is there and in, and how many
/// books the member has out. Its boundary is every event tagged with the book or with the
/// member, across all the books' streams.
struct Loan {
    book: String,
    member: String,
    added: bool,
    lent_to: Option<String>,
    out: u32,
}

impl StateQuery for Loan {
    type Event = BookEvent;
    type Error = std::convert::Infallible;

    fn query(&self) -> Result<Query, CodecError> {
        Ok(Query {
            items: vec![
                BookEvent::query_item(vec![tag("book", &self.book)?]),
                BookEvent::query_item(vec![tag("member", &self.member)?]),
            ],
        })
    }

    fn fold(&mut self, e: Envelope<BookEvent>) -> Result<(), Self::Error> {
        match e.event {
            BookEvent::Added { book, .. } => self.added |= book == self.book,
            BookEvent::Lent { book, member } => {
                if book == self.book {
                    self.lent_to = Some(member.clone());
                }
                if member == self.member {
                    self.out += 1;
                }
            }
            BookEvent::Returned { book, member } => {
                if book == self.book {
                    self.lent_to = None;
                }
                if member == self.member {
                    self.out -= 1;
                }
            }
        }
        Ok(())
    }
}

/// Lends `book` to `member`: the book must be in, and the member may have 3 books out. The
/// append fails if any event of the boundary arrived since it was read; then it is decided
/// again.
async fn lend<S: EventStore>(
    store: &S,
    book: &str,
    member: &str,
) -> Result<(), DecideError<std::convert::Infallible, BookError>> {
    Decider::new(store)
        .execute(
            || Loan {
                book: book.to_owned(),
                member: member.to_owned(),
                added: false,
                lent_to: None,
                out: 0,
            },
            &StreamName::new(format!("book-{book}")).unwrap(),
            |state| match state {
                Loan { added: false, .. } => Err(BookError::Unknown),
                Loan {
                    lent_to: Some(to), ..
                } => Err(BookError::Out(to.clone())),
                Loan { out: 3.., .. } => Err(BookError::AtLimit(member.to_owned())),
                _ => Ok(vec![BookEvent::Lent {
                    book: book.to_owned(),
                    member: member.to_owned(),
                }]),
            },
        )
        .await
        .map(|_| ())
}
// --- end ---

#[tokio::test]
async fn the_tutorial_runs() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server = support::serve(dir.path(), listener).await;

    // --- tutorial: connect ---
    let client = skald_client::Client::connect(&url).await.unwrap();
    // --- end ---

    // --- tutorial: commands ---
    let books = Repository::<_, Book>::new(&client);
    // A command that may be sent twice (a retry after a lost answer) carries a key.
    let key = CommandKey::new("catalogue/b1");
    let add = BookCommand::Add {
        book: "b1".into(),
        title: "Dune".into(),
    };
    books.execute_keyed("b1", &add, &key).await.unwrap();
    assert!(
        books
            .execute_keyed("b1", &add, &key)
            .await
            .unwrap()
            .is_none()
    ); // a repeat
    match books.execute("b1", &BookCommand::Return).await {
        Err(CommandError::Rejected(BookError::NotLent)) => {}
        other => panic!("{other:?}"),
    }
    // --- end ---
    for b in ["b2", "b3", "b4", "b5"] {
        books
            .execute(
                b,
                &BookCommand::Add {
                    book: b.into(),
                    title: b.into(),
                },
            )
            .await
            .unwrap();
    }

    // --- tutorial: lend ---
    lend(&client, "b1", "ada").await.unwrap();
    assert!(matches!(
        lend(&client, "b1", "bob").await,
        Err(DecideError::Rejected(BookError::Out(to))) if to == "ada"
    ));
    books.execute("b1", &BookCommand::Return).await.unwrap();
    for book in ["b2", "b3", "b4"] {
        lend(&client, book, "cy").await.unwrap();
    }
    assert!(matches!(
        lend(&client, "b5", "cy").await,
        Err(DecideError::Rejected(BookError::AtLimit(_)))
    ));
    // --- end ---
    // Two members racing for one book: one gets it.
    let (a, b) = tokio::join!(lend(&client, "b5", "dee"), lend(&client, "b5", "eve"));
    assert_eq!(
        [&a, &b].iter().filter(|r| r.is_ok()).count(),
        1,
        "{a:?} {b:?}"
    );

    // --- tutorial: run ---
    let loans = Loans::default();
    let mut projector = Projector::new(client.clone(), loans.clone());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let projecting = tokio::spawn(async move {
        projector
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    let mut reminders = ProcessRunner::load(
        client.clone(),
        Reminders,
        Mailer {
            store: client.clone(),
        },
    )
    .await
    .unwrap();
    reminders.catch_up().await.unwrap();
    // --- end ---

    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let members = loans.db.lock().unwrap().members.clone();
            if members.get("cy") == Some(&3)
                && members.get("ada") == Some(&0)
                && members.values().sum::<i64>() == 4
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the projection caught up");
    let _ = stop.send(());
    projecting.await.unwrap().unwrap();
    assert_eq!(reminders.state("cy").await.unwrap().unwrap().out, 3);
    let page = client
        .read(skald_client::skald_core::ReadRequest {
            source: ReadSource::Stream(StreamName::new("member-cy").unwrap()),
            from: None,
            direction: skald_client::skald_core::Direction::Forward,
            limit: 10,
        })
        .await
        .unwrap();
    assert_eq!(page.events.len(), 1, "one reminder");
    server.stop().await;
}

/// Every block the tutorial in `docs/client.md` shows is this file's, word for word.
#[test]
fn the_document_quotes_this_file() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/client.md"))
        .unwrap();
    // Compared line by line without indentation: the document dedents what is inside a fn.
    let trimmed = |text: &str| text.lines().map(str::trim).collect::<Vec<_>>().join("\n");
    let this = trimmed(include_str!("tutorial.rs"));
    let mut quoted = 0;
    for block in doc.split("```rust\n").skip(1) {
        let code = block.split("```").next().unwrap();
        if !code.starts_with("// tutorial") {
            continue;
        }
        let body = trimmed(code.split_once('\n').unwrap().1);
        assert!(this.contains(&body), "not in tests/tutorial.rs:\n{body}");
        quoted += 1;
    }
    assert!(quoted >= 8, "the tutorial quotes {quoted} blocks");
}
