//! Persistent subscriptions (consumer groups) through the client.
//!
//! Reads of groups are retried like every call that is safe to repeat. Creating, changing and
//! deleting a group and replaying parked messages are sent once: a repeat after an answer that
//! was lost could fail on the first attempt's effect or do the work twice. A consumer is not
//! rejoined by itself: after an error, join again (what it had not acknowledged is delivered
//! again). Settings and answers are the generated messages of [`crate::proto`].

use std::collections::VecDeque;

use skald_core::{Error, ReadSource, RecordedEvent, Result};
use skald_proto::v1 as pb;
use skald_proto::v1::groups_client::GroupsClient;
use tonic::transport::Channel;

use crate::{Client, MAX_MESSAGE, Start, convert};

/// One message of a group: an event to handle, then acknowledge or nack by `ack_id`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMessage {
    /// What to pass to [`Consumer::ack`] or [`Consumer::nack`].
    pub ack_id: String,
    /// How many times it has been delivered, this time included.
    pub deliveries: u32,
    /// The event.
    pub event: RecordedEvent,
}

/// The server's answer to an ack or a nack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AckOutcome {
    /// Messages it applied to.
    pub done: u64,
    /// Ids that named no message held by this consumer: unknown, already acknowledged, or
    /// taken back after the group's message timeout.
    pub unknown: Vec<String>,
}

/// A member of a consumer group, holding at most its capacity of unacknowledged messages.
/// Dropping it hands what it holds back to the group, for the other consumers.
pub struct Consumer {
    group: String,
    requests: tokio::sync::mpsc::Sender<pb::ConsumeRequest>,
    responses: tonic::Streaming<pb::ConsumeResponse>,
    batches: VecDeque<Vec<GroupMessage>>,
}

impl Consumer {
    /// The next batch of messages, waiting for one when none is due; `None` once the server
    /// ended the call. A deleted group ends it with [`Error::GroupNotFound`], a stopping
    /// server with [`Error::Unavailable`]: join again to go on (what was not acknowledged is
    /// delivered again).
    pub async fn next(&mut self) -> Result<Option<Vec<GroupMessage>>> {
        loop {
            if let Some(batch) = self.batches.pop_front() {
                return Ok(Some(batch));
            }
            // An ack result with no ack waiting for it cannot come; it is passed over.
            if self.response().await?.is_none() {
                return Ok(None);
            }
        }
    }

    /// Acknowledges messages: they are done, and are not delivered again.
    pub async fn ack(&mut self, ack_ids: &[String]) -> Result<AckOutcome> {
        self.settle(pb::consume_request::Kind::Ack(pb::Ack {
            ack_ids: ack_ids.to_vec(),
        }))
        .await
    }

    /// Gives messages back: to be retried after the group's back-off, parked now, or skipped
    /// (counted as handled), with a reason kept beside parked ones.
    pub async fn nack(
        &mut self,
        ack_ids: &[String],
        action: pb::NackAction,
        reason: &str,
    ) -> Result<AckOutcome> {
        self.settle(pb::consume_request::Kind::Nack(pb::Nack {
            ack_ids: ack_ids.to_vec(),
            action: action as i32,
            reason: reason.to_owned(),
        }))
        .await
    }

    /// Sends an ack or nack and waits for its answer, keeping the batches that arrive first.
    async fn settle(&mut self, kind: pb::consume_request::Kind) -> Result<AckOutcome> {
        self.requests
            .send(pb::ConsumeRequest { kind: Some(kind) })
            .await
            .map_err(|_| self.ended())?;
        loop {
            match self.response().await? {
                Some(Some(result)) => return Ok(result),
                Some(None) => {}
                None => return Err(self.ended()),
            }
        }
    }

    /// Reads the next message of the call: a batch is queued (`Some(None)`), an ack result
    /// is returned (`Some(Some(..))`); `None` when the call ended.
    async fn response(&mut self) -> Result<Option<Option<AckOutcome>>> {
        let message = self.responses.message().await.map_err(convert::error)?;
        let Some(message) = message else {
            return Ok(None);
        };
        match message.kind {
            Some(pb::consume_response::Kind::Messages(batch)) => {
                let messages = batch
                    .messages
                    .into_iter()
                    .map(|m| {
                        let event = m.event.ok_or_else(|| {
                            Error::Io("the server sent a message without its event".into())
                        })?;
                        Ok(GroupMessage {
                            ack_id: m.ack_id,
                            deliveries: m.deliveries,
                            event: convert::recorded(event)?,
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.batches.push_back(messages);
                Ok(Some(None))
            }
            Some(pb::consume_response::Kind::AckResult(result)) => Ok(Some(Some(AckOutcome {
                done: result.done,
                unknown: result.unknown,
            }))),
            Some(pb::consume_response::Kind::Joined(_)) | None => Ok(Some(None)),
        }
    }

    fn ended(&self) -> Error {
        Error::Unavailable(format!(
            "the server ended this consumer's call to group {}",
            self.group
        ))
    }
}

impl Client {
    fn groups(&self) -> GroupsClient<Channel> {
        GroupsClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Creates the consumer group `name` over `source` (a stream, a category, the log
    /// optionally filtered), starting at `start`. Settings left out take their defaults.
    pub async fn create_group(
        &self,
        name: &str,
        source: &ReadSource,
        start: Start,
        settings: pb::GroupSettings,
    ) -> Result<pb::GroupInfo> {
        use pb::create_group_request::Start as P;
        let start = match start {
            Start::Beginning => P::At(pb::StartAt::Beginning as i32),
            Start::Now => P::At(pb::StartAt::Now as i32),
            Start::Position(p) => P::Position(p),
            Start::Revision(r) => P::Revision(r),
        };
        let message = pb::CreateGroupRequest {
            name: name.to_owned(),
            source: Some(convert::source(source)),
            start: Some(start),
            settings: Some(settings),
        };
        self.groups()
            .create(self.unary(message))
            .await
            .map(tonic::Response::into_inner)
            .map_err(convert::error)
    }

    /// The group `name`: its definition and state.
    pub async fn group(&self, name: &str) -> Result<pb::GroupInfo> {
        let message = pb::GetGroupRequest {
            name: name.to_owned(),
        };
        self.retried(|| {
            let mut groups = self.groups();
            let request = self.unary(message.clone());
            async move { groups.get(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Every group this caller may use.
    pub async fn list_groups(&self) -> Result<Vec<pb::GroupInfo>> {
        self.retried(|| {
            let mut groups = self.groups();
            let request = self.unary(pb::ListGroupsRequest {});
            async move { groups.list(request).await }
        })
        .await
        .map(|r| r.into_inner().groups)
    }

    /// Changes the settings given in `settings` and keeps the others.
    pub async fn update_group(
        &self,
        name: &str,
        settings: pb::GroupSettings,
    ) -> Result<pb::GroupInfo> {
        let message = pb::UpdateGroupRequest {
            name: name.to_owned(),
            settings: Some(settings),
        };
        self.groups()
            .update(self.unary(message))
            .await
            .map(tonic::Response::into_inner)
            .map_err(convert::error)
    }

    /// Deletes the group `name`; its consumers' calls end with [`Error::GroupNotFound`].
    pub async fn delete_group(&self, name: &str) -> Result<()> {
        let message = pb::DeleteGroupRequest {
            name: name.to_owned(),
        };
        self.groups()
            .delete(self.unary(message))
            .await
            .map(|_| ())
            .map_err(convert::error)
    }

    /// Delivers the group's parked messages again; returns how many.
    pub async fn replay_parked(&self, name: &str) -> Result<u64> {
        let message = pb::ReplayParkedRequest {
            name: name.to_owned(),
        };
        self.groups()
            .replay_parked(self.unary(message))
            .await
            .map(|r| r.into_inner().replaying)
            .map_err(convert::error)
    }

    /// Joins the group `group` as `consumer` (a name shown in its stats), holding at most
    /// `capacity` unacknowledged messages (0 means 100).
    pub async fn consume(&self, group: &str, consumer: &str, capacity: u32) -> Result<Consumer> {
        let (requests, outgoing) = tokio::sync::mpsc::channel(16);
        let join = pb::ConsumeRequest {
            kind: Some(pb::consume_request::Kind::Join(pb::Join {
                group: group.to_owned(),
                consumer: consumer.to_owned(),
                capacity,
            })),
        };
        requests
            .send(join)
            .await
            .map_err(|_| Error::Unavailable("the consumer's channel closed".into()))?;
        let outgoing = futures_util::stream::unfold(outgoing, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        let mut responses = self
            .groups()
            .consume(self.request(outgoing))
            .await
            .map_err(convert::error)?
            .into_inner();
        match responses.message().await.map_err(convert::error)? {
            Some(pb::ConsumeResponse {
                kind: Some(pb::consume_response::Kind::Joined(_)),
            }) => Ok(Consumer {
                group: group.to_owned(),
                requests,
                responses,
                batches: VecDeque::new(),
            }),
            _ => Err(Error::Io(format!(
                "the server did not answer the join of group {group} with Joined"
            ))),
        }
    }
}
