//! RFC 9457 problem details. Every error the API returns is built here, and each kind of
//! error maps to exactly one `type` and status.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use skald_core::Error;

/// An API error, rendered as `application/problem+json`.
#[derive(Debug)]
pub struct Problem {
    status: StatusCode,
    kind: &'static str,
    title: &'static str,
    detail: String,
    extensions: Map<String, Value>,
    headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl Problem {
    pub(crate) fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: String,
    ) -> Self {
        Self {
            status,
            kind,
            title,
            detail,
            extensions: Map::new(),
            headers: Vec::new(),
        }
    }

    /// 401: no credentials, or ones that were refused; `detail` says which and why.
    pub fn unauthenticated(reason: &str, detail: String) -> Self {
        let mut p = Self::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "Unauthenticated",
            detail,
        )
        .with("reason", json!(reason));
        p.headers.push((
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"skald\""),
        ));
        p
    }

    /// 403: the caller is known but no rule lets it do this.
    pub fn forbidden(detail: String) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", "Forbidden", detail)
    }

    /// 429 with `Retry-After` in whole seconds (at least 1).
    pub fn rate_limited(scope: &str, wait: std::time::Duration) -> Self {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let seconds = seconds.max(1);
        let mut p = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("the rate limit per {scope} is exhausted; retry in {seconds} s"),
        )
        .with("retryAfter", json!(seconds));
        p.headers.push((
            header::RETRY_AFTER,
            HeaderValue::from_str(&seconds.to_string()).expect("digits"),
        ));
        p
    }

    /// 404 for an API key id that does not exist.
    pub fn key_not_found(detail: String) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "api-key-not-found",
            "API key not found",
            detail,
        )
    }

    pub(crate) fn with(mut self, key: &str, value: Value) -> Self {
        self.extensions.insert(key.to_owned(), value);
        self
    }

    /// 400: input that cannot be parsed; `detail` says what and where.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail.into(),
        )
    }

    /// 404 for a route that does not exist.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            format!("no resource at {path}; see GET /v1/openapi.json for the API"),
        )
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method-not-allowed",
            "Method not allowed",
            format!("{method} is not allowed on {path}; see GET /v1/openapi.json"),
        )
    }

    /// 413 for a body over the configured limit.
    pub fn too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            format!("the request body is over the limit of {limit} bytes"),
        )
        .with("limit", json!(limit))
    }

    /// 415 for an append whose body is not JSON.
    pub fn unsupported_media_type(got: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!(
                "Content-Type {got:?} is not accepted; send application/json or \
                 application/cloudevents-batch+json"
            ),
        )
    }

    /// 503 from `GET /health/ready`: why the store cannot take appends now.
    pub fn not_ready(reason: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not-ready",
            "Not ready",
            reason,
        )
    }

    /// A subscriber that read nothing for `stall` while events waited, ended so that it
    /// holds nothing up; it resumes by subscribing again after the last event it read.
    pub fn subscriber_stalled(stall: std::time::Duration) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "subscriber-stalled",
            "Subscriber stalled",
            format!(
                "the subscriber read nothing for {} ms while events waited; resubscribe from \
                 the last position + 1",
                stall.as_millis()
            ),
        )
        .with("stallTimeoutMs", json!(stall.as_millis() as u64))
    }

    /// The status code.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The problem as a gRPC status: the code for its kind, the detail as the message, and a
    /// `google.rpc.ErrorInfo` (domain `skald`, reason the kind) whose metadata holds the type
    /// URI, the title and each extension member (strings as they are, other JSON as text).
    pub fn to_grpc_status(&self) -> tonic::Status {
        use tonic::Code;
        let code = match self.kind {
            "wrong-expected-revision" | "append-condition-failed" => Code::Aborted,
            "event-id-reused" | "group-exists" => Code::AlreadyExists,
            "saga-conflict" => Code::FailedPrecondition,
            "storage-full" | "rate-limited" | "payload-too-large" | "subscriber-stalled" => {
                Code::ResourceExhausted
            }
            "corruption" => Code::DataLoss,
            _ => match self.status.as_u16() {
                400 | 415 | 422 => Code::InvalidArgument,
                401 => Code::Unauthenticated,
                403 => Code::PermissionDenied,
                404 => Code::NotFound,
                405 => Code::Unimplemented,
                503 => Code::Unavailable,
                _ => Code::Internal,
            },
        };
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(
            "type".to_owned(),
            format!("urn:skald:problem:{}", self.kind),
        );
        metadata.insert("title".to_owned(), self.title.to_owned());
        for (key, value) in &self.extensions {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            metadata.insert(key.clone(), text);
        }
        let details = tonic_types::ErrorDetails::with_error_info(self.kind, "skald", metadata);
        <tonic::Status as tonic_types::StatusExt>::with_error_details(
            code,
            self.detail.clone(),
            details,
        )
    }

    /// The problem as a JSON object.
    pub fn to_json(&self) -> Value {
        let mut body = Map::new();
        body.insert(
            "type".into(),
            json!(format!("urn:skald:problem:{}", self.kind)),
        );
        body.insert("title".into(), json!(self.title));
        body.insert("status".into(), json!(self.status.as_u16()));
        body.insert("detail".into(), json!(self.detail));
        body.extend(self.extensions.clone());
        Value::Object(body)
    }
}

impl From<Error> for Problem {
    fn from(e: Error) -> Self {
        let detail = e.to_string();
        match e {
            Error::InvalidEvent { reason } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-event",
                "Invalid event",
                reason,
            ),
            Error::WrongExpectedRevision {
                stream,
                expected,
                actual,
            } => Self::new(
                StatusCode::CONFLICT,
                "wrong-expected-revision",
                "Wrong expected revision",
                detail,
            )
            .with("stream", json!(stream))
            .with("expectedRevision", json!(expected))
            .with("actualRevision", json!(actual)),
            Error::ConditionFailed { position } => Self::new(
                StatusCode::CONFLICT,
                "append-condition-failed",
                "Append condition failed",
                detail,
            )
            .with("position", json!(position)),
            Error::IdReused {
                id,
                position,
                stream,
                ..
            } => {
                let p = Self::new(
                    StatusCode::CONFLICT,
                    "event-id-reused",
                    "Event id reused",
                    detail,
                )
                .with("id", json!(id))
                .with("position", json!(position));
                match stream {
                    Some(stream) => p.with("stream", json!(stream)),
                    None => p,
                }
            }
            Error::StreamNotFound(stream) => Self::new(
                StatusCode::NOT_FOUND,
                "stream-not-found",
                "Stream not found",
                detail,
            )
            .with("stream", json!(stream)),
            Error::GroupNotFound(name) => Self::new(
                StatusCode::NOT_FOUND,
                "group-not-found",
                "Group not found",
                format!("{detail}; GET /v1/groups lists the groups"),
            )
            .with("group", json!(name)),
            Error::GroupExists(name) => {
                Self::new(StatusCode::CONFLICT, "group-exists", "Group exists", detail)
                    .with("group", json!(name))
            }
            Error::SagaNotFound(_) => Self::new(
                StatusCode::NOT_FOUND,
                "saga-not-found",
                "Saga not found",
                detail,
            ),
            Error::InvalidSaga(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid-saga-definition",
                "Invalid saga definition",
                detail,
            ),
            Error::SagaConflict(_) => Self::new(
                StatusCode::CONFLICT,
                "saga-conflict",
                "Saga conflict",
                detail,
            ),
            Error::StorageFull(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage-full",
                "Storage full",
                format!("{detail}; nothing of this request was stored"),
            ),
            Error::Unavailable(_) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Unavailable",
                detail,
            ),
            Error::Corruption { .. } => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corruption",
                "Stored data is corrupt",
                detail,
            ),
            Error::Io(_) => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage-error",
                "Storage error",
                detail,
            ),
            // Raised by clients of a server, about their own settings.
            Error::InvalidConfig(_) => Self::malformed(detail),
            // Raised by clients of a server; a server relaying one answers as that server did.
            Error::Refused { kind, detail } => match kind.as_str() {
                "forbidden" => Self::forbidden(detail),
                "rate-limited" => {
                    Self::rate_limited("principal", std::time::Duration::from_secs(1))
                }
                _ => Self::unauthenticated("refused", detail),
            },
        }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = self.to_json().to_string();
        let mut response = (self.status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skald_core::{EventId, ExpectedRevision, Position, StreamName};

    #[test]
    fn each_error_kind_has_one_type_and_status() {
        let stream = StreamName::new("s-1").unwrap();
        let cases = [
            (Error::invalid("x"), 422, "invalid-event"),
            (
                Error::WrongExpectedRevision {
                    stream: stream.clone(),
                    expected: ExpectedRevision::NoStream,
                    actual: None,
                },
                409,
                "wrong-expected-revision",
            ),
            (
                Error::ConditionFailed {
                    position: Position(3),
                },
                409,
                "append-condition-failed",
            ),
            (
                Error::IdReused {
                    id: EventId::generate(),
                    position: Position(1),
                    reason: "r".into(),
                    stream: None,
                },
                409,
                "event-id-reused",
            ),
            (Error::StreamNotFound(stream), 404, "stream-not-found"),
            (Error::GroupNotFound("g".into()), 404, "group-not-found"),
            (Error::GroupExists("g".into()), 409, "group-exists"),
            (Error::SagaNotFound("s".into()), 404, "saga-not-found"),
            (
                Error::InvalidSaga("s".into()),
                422,
                "invalid-saga-definition",
            ),
            (Error::SagaConflict("s".into()), 409, "saga-conflict"),
            (Error::StorageFull("disk".into()), 503, "storage-full"),
            (Error::Unavailable("closing".into()), 503, "unavailable"),
            (
                Error::Corruption {
                    file: "f".into(),
                    offset: 8,
                    reason: "crc".into(),
                },
                500,
                "corruption",
            ),
            (Error::Io("eio".into()), 500, "storage-error"),
        ];
        for (error, status, kind) in cases {
            let p = Problem::from(error).to_json();
            assert_eq!(p["status"], status);
            assert_eq!(p["type"], format!("urn:skald:problem:{kind}"));
        }
        let full = Problem::from(Error::StorageFull("no room".into())).to_json();
        assert!(
            full["detail"]
                .as_str()
                .unwrap()
                .contains("nothing of this request was stored")
        );
        let corrupt = Problem::from(Error::Corruption {
            file: "seg".into(),
            offset: 77,
            reason: "crc".into(),
        })
        .to_json();
        assert!(
            corrupt["detail"]
                .as_str()
                .unwrap()
                .contains("seg at offset 77")
        );
    }
}
