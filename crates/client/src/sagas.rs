//! Sagas through the client: definitions, instances, retry and cancel.
//!
//! Reads, registering a definition (the same text again is a replay), and disabling, enabling
//! or deleting one (a repeat finds it so already) are retried like every call that is safe to
//! repeat. Retrying and cancelling an instance are sent once: a
//! repeat after a lost answer would fail on the first attempt's effect. Answers are the
//! generated messages of [`crate::proto`].

use skald_core::Result;
use skald_proto::v1 as pb;
use skald_proto::v1::sagas_client::SagasClient;
use tonic::transport::Channel;

use crate::{Client, MAX_MESSAGE, convert};

impl Client {
    fn sagas(&self) -> SagasClient<Channel> {
        SagasClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE)
    }

    /// Registers a saga definition (YAML or JSON text). The same text again is a replay
    /// (`replayed` in the answer); an invalid one is [`skald_core::Error::InvalidSaga`] listing every
    /// problem with its line and column.
    pub async fn register_saga(&self, definition: &str) -> Result<pb::RegisterSagaResponse> {
        let message = pb::RegisterSagaRequest {
            definition: definition.to_owned(),
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.register(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Every saga definition this caller may see, with versions and instance counts.
    pub async fn saga_definitions(&self) -> Result<Vec<pb::SagaDefinitionSummary>> {
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(pb::ListSagaDefinitionsRequest {});
            async move { sagas.list_definitions(request).await }
        })
        .await
        .map(|r| r.into_inner().definitions)
    }

    /// The definition `name` (the newest version unless `version` is given), as JSON.
    pub async fn saga_definition(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<pb::SagaDefinition> {
        let message = pb::GetSagaDefinitionRequest {
            name: name.to_owned(),
            version,
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.get_definition(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Saga instances, newest first: only those in `state` and of `definition` when given,
    /// at most `limit` (1 to 1000; 0 means 1000).
    pub async fn saga_instances(
        &self,
        state: Option<pb::SagaState>,
        definition: Option<&str>,
        limit: u32,
    ) -> Result<Vec<pb::SagaInstanceSummary>> {
        let message = pb::ListSagaInstancesRequest {
            state: state.unwrap_or(pb::SagaState::Unspecified) as i32,
            definition: definition.unwrap_or_default().to_owned(),
            limit,
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.list_instances(request).await }
        })
        .await
        .map(|r| r.into_inner().instances)
    }

    /// One saga instance with its whole history.
    pub async fn saga_instance(&self, saga_id: &str) -> Result<pb::SagaInstance> {
        let message = pb::GetSagaInstanceRequest {
            saga_id: saga_id.to_owned(),
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.get_instance(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Stops definition `name`'s triggers from starting instances; those started run to their
    /// end. `changed` is false when it was disabled already (a retry after a lost answer
    /// reports the first attempt's change that way).
    pub async fn disable_saga(&self, name: &str) -> Result<pb::ChangeSagaResponse> {
        let message = pb::ChangeSagaRequest {
            name: name.to_owned(),
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.disable(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Lets disabled definition `name`'s triggers start instances again, from now on.
    pub async fn enable_saga(&self, name: &str) -> Result<pb::ChangeSagaResponse> {
        let message = pb::ChangeSagaRequest {
            name: name.to_owned(),
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.enable(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Deletes definition `name`: no longer listed, starts nothing, its instances' histories
    /// stay. [`skald_core::Error::SagaConflict`] while an instance of it is running,
    /// compensating or stuck.
    pub async fn delete_saga(&self, name: &str) -> Result<pb::ChangeSagaResponse> {
        let message = pb::ChangeSagaRequest {
            name: name.to_owned(),
        };
        self.retried(|| {
            let mut sagas = self.sagas();
            let request = self.unary(message.clone());
            async move { sagas.delete(request).await }
        })
        .await
        .map(tonic::Response::into_inner)
    }

    /// Resumes a stuck saga instance; [`skald_core::Error::SagaConflict`] when it is not stuck.
    pub async fn retry_saga(&self, saga_id: &str) -> Result<pb::SagaInstanceSummary> {
        let message = pb::RetrySagaRequest {
            saga_id: saga_id.to_owned(),
        };
        self.sagas()
            .retry(self.unary(message))
            .await
            .map(tonic::Response::into_inner)
            .map_err(convert::error)
    }

    /// Cancels a running saga instance, compensating what it did, with `reason` kept in its
    /// audit record; [`skald_core::Error::SagaConflict`] past its pivot or once it has ended.
    pub async fn cancel_saga(
        &self,
        saga_id: &str,
        reason: &str,
    ) -> Result<pb::SagaInstanceSummary> {
        let message = pb::CancelSagaRequest {
            saga_id: saga_id.to_owned(),
            reason: reason.to_owned(),
        };
        self.sagas()
            .cancel(self.unary(message))
            .await
            .map(tonic::Response::into_inner)
            .map_err(convert::error)
    }
}
