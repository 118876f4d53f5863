//! Saga definitions: their shape (the same in YAML and JSON), validation with line and column,
//! and the settings each step runs with. The format is in `docs/sagas.md`.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use skald_core::{Category, EventType, Query, QueryItem, RecordedEvent, StreamName, Tag};

use crate::template::{self, EVENT_FIELDS, SAGA_FIELDS, Template};
use crate::yaml::{self, Location};

/// Most steps in one saga.
pub const MAX_STEPS: usize = 64;
/// Longest definition or step name.
pub const MAX_NAME: usize = 64;
/// Longest timeout or back-off a definition may ask for.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Most attempts a step may ask for (a `retriable` step has no limit).
pub const MAX_ATTEMPTS: u32 = 1000;

/// A whole definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SagaDefinition {
    /// `[a-z0-9-]`, starting with a letter or digit.
    pub name: String,
    /// 1 or more. A new version applies to instances started after it is registered.
    pub version: u32,
    /// Which events start an instance.
    pub trigger: Trigger,
    /// JSON pointer into the trigger event whose value identifies the instance.
    pub correlation_key: String,
    /// Settings for every step that does not set its own.
    #[serde(default, skip_serializing_if = "StepSettings::is_empty")]
    pub defaults: StepSettings,
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The streams a trigger or an await can match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach<'a> {
    /// The streams of one category (`c` and `c-...`).
    Category(&'a str),
    /// Any stream (types only, or a DCB query).
    Anything,
}

impl SagaDefinition {
    /// What the saga reads, with where in the definition: the trigger, then each await (action
    /// or compensation).
    pub fn reads(&self) -> Vec<(String, Reach<'_>)> {
        fn reach<'d>(category: &'d Option<String>, query: &Option<Vec<QueryItem>>) -> Reach<'d> {
            match (category, query) {
                (Some(c), None) => Reach::Category(c.as_str()),
                _ => Reach::Anything,
            }
        }
        let mut out = vec![(
            "the trigger".to_owned(),
            reach(&self.trigger.category, &self.trigger.query),
        )];
        for (step, action) in self.actions() {
            if let Action::Await(wait) = action {
                out.push((
                    format!("the await of step {step}"),
                    reach(&wait.category, &wait.query),
                ));
            }
        }
        out
    }

    /// The stream templates of its appends, with where in the definition.
    pub fn appended_streams(&self) -> Vec<(String, &str)> {
        self.actions()
            .filter_map(|(step, action)| match action {
                Action::Append(append) => {
                    Some((format!("the append of step {step}"), append.stream.as_str()))
                }
                _ => None,
            })
            .collect()
    }

    /// Every action and compensation, with its step's name.
    fn actions(&self) -> impl Iterator<Item = (&str, &Action)> {
        self.steps.iter().flat_map(|step| {
            std::iter::once(&step.action)
                .chain(step.compensation.as_ref())
                .map(move |action| (step.name.as_str(), action))
        })
    }

    /// The index of the first pivot or retriable step: once it has run, nothing before it is
    /// undone (every step after it is retriable, which validation ensures).
    pub fn point_of_no_return(&self) -> Option<usize> {
        self.steps.iter().position(|s| s.pivot || s.retriable)
    }
}

/// Events that match a category and/or types, or a DCB query.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    /// Only events of streams in this category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only events of these types (any, when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// A DCB query instead of category and types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Vec<QueryItem>>,
}

/// Timeout and retries, for one step or as defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepSettings {
    /// Per attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
    /// How failures are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

impl StepSettings {
    fn is_empty(&self) -> bool {
        self.timeout.is_none() && self.retry.is_none()
    }
}

/// A retry policy as written; unset fields come from the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Attempts in all, the first included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// The wait before the second attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_backoff: Option<Span>,
    /// The longest wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<Span>,
    /// Each wait is this many times the one before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multiplier: Option<f64>,
    /// Each wait varies by up to this share, up or down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<f64>,
    /// Which failures are retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<Vec<RetryOn>>,
}

/// A kind of failure that is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    /// The attempt timed out.
    Timeout,
    /// The target could not be reached.
    Connection,
    /// Any 5xx answer.
    ServerErrors,
    /// Any 4xx answer.
    ClientErrors,
    /// This status code.
    Status(u16),
}

impl Serialize for RetryOn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Timeout => s.serialize_str("timeout"),
            Self::Connection => s.serialize_str("connection"),
            Self::ServerErrors => s.serialize_str("5xx"),
            Self::ClientErrors => s.serialize_str("4xx"),
            Self::Status(code) => s.serialize_u16(*code),
        }
    }
}

impl<'de> Deserialize<'de> for RetryOn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        match &value {
            Value::String(s) => match s.as_str() {
                "timeout" => Ok(Self::Timeout),
                "connection" => Ok(Self::Connection),
                "5xx" => Ok(Self::ServerErrors),
                "4xx" => Ok(Self::ClientErrors),
                _ => Err(serde::de::Error::custom(format!(
                    "retryOn {s:?} is not one of timeout, connection, 5xx, 4xx or a status code"
                ))),
            },
            Value::Number(n) => match n.as_u64() {
                Some(code @ 100..=599) => Ok(Self::Status(code as u16)),
                _ => Err(serde::de::Error::custom(format!(
                    "retryOn {n} is not an HTTP status code (100 to 599)"
                ))),
            },
            other => Err(serde::de::Error::custom(format!(
                "retryOn {other} is not one of timeout, connection, 5xx, 4xx or a status code"
            ))),
        }
    }
}

/// A duration written as text (`500ms`, `10s`, `2m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span(pub Duration);

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(self.0).to_string())
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let duration = humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a duration such as 500ms, 10s or 2m: {e}"
            ))
        })?;
        if duration.is_zero() || duration > MAX_DURATION {
            return Err(serde::de::Error::custom(format!(
                "{text:?} must be more than zero and at most 24h"
            )));
        }
        Ok(Self(duration))
    }
}

/// One step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// `[a-z0-9-]`; unique in the saga; templates name it as `steps.NAME`.
    pub name: String,
    /// What the step does.
    pub action: Action,
    /// What undoes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<Action>,
    /// The point of no return.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pivot: bool,
    /// Retried until it succeeds; never compensated.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retriable: bool,
    /// Per attempt; overrides the definition's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Span>,
    /// How failures are retried; overrides the definition's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
}

impl Step {
    /// Whether the step's compensation reads the step's own output (`steps.NAME.output...`):
    /// such a compensation cannot run for a step whose outcome is unknown until the output is
    /// learned, by sending the action again with its idempotency key.
    pub fn compensation_reads_own_output(&self) -> bool {
        let Some(compensation) = &self.compensation else {
            return false;
        };
        let mut strings = Vec::new();
        match compensation {
            Action::Http(http) => {
                strings.push((String::new(), http.url.clone()));
                strings.extend(http.headers.values().map(|v| (String::new(), v.clone())));
                if let Some(body) = &http.body {
                    template::strings_in(body, String::new(), &mut strings);
                }
            }
            Action::Append(append) => {
                strings.push((String::new(), append.stream.clone()));
                strings.extend(append.tags.iter().map(|t| (String::new(), t.clone())));
                template::strings_in(&append.data, String::new(), &mut strings);
            }
            Action::Await(_) => {}
        }
        strings.iter().any(|(_, text)| {
            Template::parse(text).is_ok_and(|t| {
                t.paths().any(|path| {
                    path.first().is_some_and(|p| p == "steps")
                        && path.get(1).is_some_and(|p| *p == self.name)
                })
            })
        })
    }
}

/// What a step (or its compensation) does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Action {
    /// Call an HTTP service.
    Http(HttpAction),
    /// Append an event.
    Append(AppendAction),
    /// Wait for an event.
    Await(AwaitAction),
}

impl Action {
    /// `http`, `append` or `await`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Append(_) => "append",
            Self::Await(_) => "await",
        }
    }
}

/// An HTTP call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpAction {
    /// GET, POST, PUT, PATCH, DELETE.
    pub method: String,
    /// An `http://` URL template.
    pub url: String,
    /// Header templates.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// A JSON body template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
    /// Statuses that mean success; any 2xx when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_status: Option<Vec<u16>>,
}

/// An append of one event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendAction {
    /// Stream name template.
    pub stream: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// JSON data template.
    #[serde(default)]
    pub data: Value,
    /// Tag templates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A wait for an event that answers the saga.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AwaitAction {
    /// Only events of streams in this category.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Only events of these types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// A DCB query instead of category and types.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<Vec<QueryItem>>,
    /// JSON pointer into the awaited event whose value must equal the correlation key;
    /// the saga's `correlationKey` pointer when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<String>,
    /// The whole wait.
    pub timeout: Span,
}

/// One validation problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, in the text.
    pub location: Location,
    /// The JSON pointer of the node.
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.pointer.is_empty() {
            "/"
        } else {
            &self.pointer
        };
        write!(f, "{} ({at}): {}", self.location, self.message)
    }
}

/// Everything wrong with a definition (at most [`MAX_PROBLEMS`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid(pub Vec<Problem>);

/// Most problems reported at once.
pub const MAX_PROBLEMS: usize = 20;

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Parses and validates a definition from YAML or JSON text.
pub fn parse(text: &str) -> Result<SagaDefinition, Invalid> {
    let doc = yaml::parse(text).map_err(|(location, message)| {
        Invalid(vec![Problem {
            location,
            pointer: String::new(),
            message,
        }])
    })?;
    let definition: SagaDefinition =
        serde_path_to_error::deserialize(doc.value.clone()).map_err(|e| {
            let pointer = pointer_of(e.path());
            Invalid(vec![Problem {
                location: doc.locate(&pointer),
                message: e.into_inner().to_string(),
                pointer,
            }])
        })?;
    let problems = validate(&definition);
    if problems.is_empty() {
        Ok(definition)
    } else {
        Err(Invalid(
            problems
                .into_iter()
                .take(MAX_PROBLEMS)
                .map(|(pointer, message)| Problem {
                    location: doc.locate(&pointer),
                    pointer,
                    message,
                })
                .collect(),
        ))
    }
}

fn pointer_of(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("/{index}")),
            Segment::Map { key } => out.push_str(&format!("/{}", yaml::escape(key))),
            Segment::Enum { variant } => out.push_str(&format!("/{}", yaml::escape(variant))),
            Segment::Unknown => {}
        }
    }
    out
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
}

/// Checks everything serde cannot: names, pointers, the pivot rules, templates, URLs. Returns
/// `(pointer, message)` pairs.
pub fn validate(def: &SagaDefinition) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let mut problem = |pointer: String, message: String| problems.push((pointer, message));
    if !valid_name(&def.name) {
        problem(
            "/name".into(),
            format!(
                "name {:?} must be 1 to {MAX_NAME} of a-z, 0-9 and '-'",
                def.name
            ),
        );
    }
    if def.version == 0 {
        problem("/version".into(), "version must be 1 or more".into());
    }
    check_selection(
        "/trigger",
        def.trigger.category.as_deref(),
        &def.trigger.types,
        def.trigger.query.as_deref(),
        &mut problem,
    );
    check_pointer("/correlationKey", &def.correlation_key, &mut problem);
    check_retry("/defaults", def.defaults.retry.as_ref(), &mut problem);
    if def.steps.is_empty() || def.steps.len() > MAX_STEPS {
        problem(
            "/steps".into(),
            format!(
                "a saga has 1 to {MAX_STEPS} steps; this one has {}",
                def.steps.len()
            ),
        );
    }
    check_self_trigger(def, &mut problem);
    let mut seen = HashSet::new();
    let mut point_of_no_return: Option<&str> = None;
    for (i, step) in def.steps.iter().enumerate() {
        let at = format!("/steps/{i}");
        if !valid_name(&step.name) {
            problem(
                format!("{at}/name"),
                format!(
                    "step name {:?} must be 1 to {MAX_NAME} of a-z, 0-9 and '-'",
                    step.name
                ),
            );
        }
        if !seen.insert(step.name.as_str()) {
            problem(
                format!("{at}/name"),
                format!("step name {:?} is used twice", step.name),
            );
        }
        check_retry(&at, step.retry.as_ref(), &mut problem);
        let earlier: Vec<&str> = def.steps[..i].iter().map(|s| s.name.as_str()).collect();
        check_action(
            &format!("{at}/action"),
            &step.action,
            &earlier,
            &mut problem,
        );
        if let Some(compensation) = &step.compensation {
            let mut visible = earlier.clone();
            visible.push(&step.name);
            check_action(
                &format!("{at}/compensation"),
                compensation,
                &visible,
                &mut problem,
            );
            if matches!(compensation, Action::Await(_)) {
                problem(
                    format!("{at}/compensation"),
                    "a compensation cannot be an await; it must undo something".into(),
                );
            }
        }
        let is_await = matches!(step.action, Action::Await(_));
        if step.pivot && step.retriable {
            problem(
                at.clone(),
                "a step is either the pivot or retriable, not both".into(),
            );
        }
        if (step.pivot || step.retriable || is_await) && step.compensation.is_some() {
            problem(
                format!("{at}/compensation"),
                format!(
                    "step {:?} is {} and is never compensated; remove its compensation",
                    step.name,
                    if step.pivot {
                        "the pivot"
                    } else if step.retriable {
                        "retriable"
                    } else {
                        "an await"
                    }
                ),
            );
        }
        if let Some(before) = point_of_no_return {
            if !step.retriable {
                problem(
                    at.clone(),
                    format!(
                        "step {:?} comes after {before:?}, past the point of no return, so it \
                         cannot be undone: mark it `retriable: true`",
                        step.name
                    ),
                );
            }
        } else if !step.pivot && !step.retriable && !is_await && step.compensation.is_none() {
            problem(
                at.clone(),
                format!(
                    "step {:?} has no compensation; every step before the pivot needs one \
                     (or mark it `pivot: true` or `retriable: true`)",
                    step.name
                ),
            );
        }
        if step.pivot && point_of_no_return.is_none() {
            point_of_no_return = Some(&step.name);
        } else if step.pivot {
            problem(format!("{at}/pivot"), "a saga has at most one pivot".into());
        }
        if step.retriable && point_of_no_return.is_none() {
            point_of_no_return = Some(&step.name);
        }
    }
    problems
}

fn check_selection(
    at: &str,
    category: Option<&str>,
    types: &[String],
    query: Option<&[QueryItem]>,
    problem: &mut impl FnMut(String, String),
) {
    if let Some(category) = category {
        if let Err(e) = Category::new(category) {
            problem(format!("{at}/category"), e.to_string());
        } else if category.starts_with('$') {
            problem(
                format!("{at}/category"),
                "system categories cannot be selected".into(),
            );
        }
    }
    for (i, t) in types.iter().enumerate() {
        if let Err(e) = EventType::new(t.as_str()) {
            problem(format!("{at}/types/{i}"), e.to_string());
        }
    }
    match query {
        Some(items) => {
            if category.is_some() || !types.is_empty() {
                problem(
                    format!("{at}/query"),
                    "give either a query or category and types, not both".into(),
                );
            }
            if let Err(e) = Query::new(items.to_vec()) {
                problem(format!("{at}/query"), e.to_string());
            }
        }
        None if category.is_none() && types.is_empty() => problem(
            at.into(),
            "select events by `category`, `types` or `query`; selecting every event is not allowed"
                .into(),
        ),
        None => {}
    }
}

fn check_pointer(at: &str, pointer: &str, problem: &mut impl FnMut(String, String)) {
    let first = pointer
        .strip_prefix('/')
        .map(|p| p.split('/').next().unwrap_or(""));
    match first {
        Some(field) if EVENT_FIELDS.contains(&field) => {}
        _ => problem(
            at.into(),
            format!(
                "{pointer:?} must be a JSON pointer into the event, such as /data/orderId; \
                 its first part is one of {}",
                EVENT_FIELDS.join(", ")
            ),
        ),
    }
}

fn check_retry(at: &str, retry: Option<&RetrySpec>, problem: &mut impl FnMut(String, String)) {
    let Some(retry) = retry else { return };
    let at = format!("{at}/retry");
    if let Some(n) = retry.max_attempts
        && (n == 0 || n > MAX_ATTEMPTS)
    {
        problem(
            format!("{at}/maxAttempts"),
            format!("maxAttempts must be 1 to {MAX_ATTEMPTS}"),
        );
    }
    if let Some(m) = retry.multiplier
        && !(1.0..=10.0).contains(&m)
    {
        problem(
            format!("{at}/multiplier"),
            "multiplier must be from 1 to 10".into(),
        );
    }
    if let Some(j) = retry.jitter
        && !(0.0..=1.0).contains(&j)
    {
        problem(format!("{at}/jitter"), "jitter must be from 0 to 1".into());
    }
    if let (Some(a), Some(b)) = (retry.initial_backoff, retry.max_backoff)
        && a.0 > b.0
    {
        problem(
            format!("{at}/maxBackoff"),
            "maxBackoff must be at least initialBackoff".into(),
        );
    }
}

fn check_action(
    at: &str,
    action: &Action,
    steps: &[&str],
    problem: &mut impl FnMut(String, String),
) {
    let mut strings = Vec::new();
    match action {
        Action::Http(http) => {
            let at = format!("{at}/http");
            if !["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&http.method.as_str()) {
                problem(
                    format!("{at}/method"),
                    format!(
                        "method {:?} is not one of GET, POST, PUT, PATCH, DELETE",
                        http.method
                    ),
                );
            }
            match Template::parse(&http.url) {
                Ok(t) => {
                    let checked = check_url(&t.with_placeholder("x"))
                        .and_then(|()| check_url_target_is_fixed(&http.url));
                    if let Err(why) = checked {
                        problem(format!("{at}/url"), format!("url {:?} {why}", http.url));
                    }
                }
                Err(e) => problem(format!("{at}/url"), e),
            }
            strings.push((format!("{at}/url"), http.url.clone()));
            for (name, value) in &http.headers {
                let pointer = format!("{at}/headers/{}", yaml::escape(name));
                if hyper::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    problem(
                        pointer.clone(),
                        format!("{name:?} is not a valid header name"),
                    );
                }
                strings.push((pointer, value.clone()));
            }
            if let Some(body) = &http.body {
                template::strings_in(body, format!("{at}/body"), &mut strings);
            }
            for (i, code) in http.success_status.iter().flatten().enumerate() {
                if !(100..=599).contains(code) {
                    problem(
                        format!("{at}/successStatus/{i}"),
                        format!("{code} is not an HTTP status"),
                    );
                }
            }
        }
        Action::Append(append) => {
            let at = format!("{at}/append");
            match Template::parse(&append.stream) {
                Ok(t) => {
                    if let Err(e) = StreamName::new(t.with_placeholder("x")) {
                        problem(format!("{at}/stream"), e.to_string());
                    }
                }
                Err(e) => problem(format!("{at}/stream"), e),
            }
            strings.push((format!("{at}/stream"), append.stream.clone()));
            if let Err(e) = EventType::new(append.event_type.as_str()) {
                problem(format!("{at}/type"), e.to_string());
            }
            template::strings_in(&append.data, format!("{at}/data"), &mut strings);
            for (i, tag) in append.tags.iter().enumerate() {
                match Template::parse(tag).map(|t| Tag::new(t.with_placeholder("x"))) {
                    Ok(Ok(_)) => strings.push((format!("{at}/tags/{i}"), tag.clone())),
                    Ok(Err(e)) => problem(format!("{at}/tags/{i}"), e.to_string()),
                    Err(e) => problem(format!("{at}/tags/{i}"), e),
                }
            }
        }
        Action::Await(wait) => {
            let at = format!("{at}/await");
            check_selection(
                &at,
                wait.category.as_deref(),
                &wait.types,
                wait.query.as_deref(),
                problem,
            );
            if let Some(pointer) = &wait.correlation {
                check_pointer(&format!("{at}/correlation"), pointer, problem);
            }
        }
    }
    for (pointer, text) in strings {
        match Template::parse(&text) {
            Ok(t) => {
                for path in t.paths() {
                    if let Err(why) = check_path(path, steps) {
                        problem(pointer.clone(), why);
                    }
                }
            }
            Err(e) => problem(pointer, e),
        }
    }
}

/// Refuses an append that can write an event the saga's own trigger matches: each instance
/// would start another, without end. "Can" is judged from the templates' text alone, so a
/// stream whose category depends on a template counts as matching.
fn check_self_trigger(def: &SagaDefinition, problem: &mut impl FnMut(String, String)) {
    for (i, step) in def.steps.iter().enumerate() {
        let phases = [
            ("action", Some(&step.action)),
            ("compensation", step.compensation.as_ref()),
        ];
        for (phase, action) in phases {
            if let Some(Action::Append(append)) = action
                && could_trigger(&def.trigger, append)
            {
                problem(
                    format!("/steps/{i}/{phase}/append"),
                    format!(
                        "this append can write an event the saga's own trigger matches (type \
                         {:?} to stream {:?}): each instance would start another without end; \
                         append another type, or to a stream the trigger cannot match",
                        append.event_type, append.stream
                    ),
                );
            }
        }
    }
}

/// Whether an event written by `append` can match `trigger`.
fn could_trigger(trigger: &Trigger, append: &AppendAction) -> bool {
    if let Some(items) = &trigger.query {
        return items.iter().any(|item| {
            let typed =
                item.types.is_empty() || item.types.iter().any(|t| t.as_str() == append.event_type);
            typed
                && item.tags.iter().all(|tag| {
                    append
                        .tags
                        .iter()
                        .any(|template| could_render(template, tag.as_str()))
                })
        });
    }
    let typed = trigger.types.is_empty() || trigger.types.contains(&append.event_type);
    let categorized = trigger
        .category
        .as_deref()
        .is_none_or(|c| could_be_in_category(&append.stream, c));
    typed && categorized
}

/// Whether a stream name template can render a name of `category` (the part before the first
/// `-`, or the whole name without one).
fn could_be_in_category(stream: &str, category: &str) -> bool {
    let Ok(template) = Template::parse(stream) else {
        return false;
    };
    let pieces = template.pieces();
    let templated = pieces.iter().any(Option::is_none);
    let prefix = match pieces.first() {
        Some(Some(text)) => *text,
        _ => "",
    };
    match prefix.find('-') {
        Some(dash) if dash > 0 => &prefix[..dash] == category,
        _ if !templated => prefix == category,
        // The category ends inside a template's value: it may be this one.
        _ => category.starts_with(prefix),
    }
}

/// Whether a tag template can render `value`.
fn could_render(template: &str, value: &str) -> bool {
    let Ok(template) = Template::parse(template) else {
        return false;
    };
    let pieces = template.pieces();
    if pieces.iter().all(Option::is_some) {
        return pieces.iter().flatten().copied().collect::<String>() == value;
    }
    let prefix = match pieces.first() {
        Some(Some(text)) => *text,
        _ => "",
    };
    value.starts_with(prefix)
}

/// Templates may not choose where a step connects: none in the scheme, host or port.
fn check_url_target_is_fixed(url: &str) -> Result<(), String> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    if url[..end].contains("{{") {
        return Err(
            "has a template in its scheme, host or port: a step connects to a fixed target \
             (templates may go in the path, the query, the headers and the body)"
                .into(),
        );
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(())
}

fn check_path(path: &[String], steps: &[&str]) -> Result<(), String> {
    let whole = path.join(".");
    match path.first().map(String::as_str) {
        Some("saga") => match path.get(1) {
            Some(f) if SAGA_FIELDS.contains(&f.as_str()) && path.len() == 2 => Ok(()),
            _ => Err(format!(
                "template {{{{{whole}}}}}: saga has only {}",
                SAGA_FIELDS.join(", ")
            )),
        },
        Some("trigger") => match path.get(1) {
            Some(f) if EVENT_FIELDS.contains(&f.as_str()) => Ok(()),
            _ => Err(format!(
                "template {{{{{whole}}}}}: the trigger event has only {}",
                EVENT_FIELDS.join(", ")
            )),
        },
        Some("steps") => match (path.get(1), path.get(2)) {
            (Some(step), Some(output)) if steps.contains(&step.as_str()) && output == "output" => {
                Ok(())
            }
            (Some(step), _) if !steps.contains(&step.as_str()) => Err(format!(
                "template {{{{{whole}}}}} names step {step:?}, which does not run before this \
                 point{}",
                if steps.is_empty() {
                    String::new()
                } else {
                    format!(" (these do: {})", steps.join(", "))
                }
            )),
            _ => Err(format!(
                "template {{{{{whole}}}}}: a step is read as steps.NAME.output"
            )),
        },
        _ => Err(format!(
            "template {{{{{whole}}}}} must start with saga, trigger or steps"
        )),
    }
}

/// The effective settings of one step.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Per attempt (for an await: the whole wait).
    pub timeout: Duration,
    /// Attempts in all; `None` for retriable steps (no limit).
    pub max_attempts: Option<u32>,
    /// First back-off.
    pub initial_backoff: Duration,
    /// Longest back-off.
    pub max_backoff: Duration,
    /// Growth per attempt.
    pub multiplier: f64,
    /// Random share, up or down.
    pub jitter: f64,
    /// Failures that are retried.
    pub retry_on: Vec<RetryOn>,
}

/// Failures retried when a definition does not say.
pub const DEFAULT_RETRY_ON: &[RetryOn] = &[
    RetryOn::Timeout,
    RetryOn::Connection,
    RetryOn::ServerErrors,
    RetryOn::Status(429),
    RetryOn::Status(408),
];

impl Policy {
    /// The settings `step` runs with, from the step, the defaults and the built-in values.
    pub fn of(def: &SagaDefinition, step: &Step) -> Self {
        let own = step.retry.as_ref();
        let defaults = def.defaults.retry.as_ref();
        macro_rules! pick {
            ($field:ident) => {
                own.and_then(|r| r.$field.clone())
                    .or_else(|| defaults.and_then(|r| r.$field.clone()))
            };
        }
        let timeout = match &step.action {
            Action::Await(wait) => wait.timeout.0,
            _ => step
                .timeout
                .or(def.defaults.timeout)
                .map_or(Duration::from_secs(10), |s| s.0),
        };
        Self {
            timeout,
            max_attempts: (!step.retriable).then(|| pick!(max_attempts).unwrap_or(3)),
            initial_backoff: pick!(initial_backoff).map_or(Duration::from_millis(200), |s| s.0),
            max_backoff: pick!(max_backoff).map_or(Duration::from_secs(10), |s| s.0),
            multiplier: pick!(multiplier).unwrap_or(2.0),
            jitter: pick!(jitter).unwrap_or(0.2),
            retry_on: pick!(retry_on).unwrap_or_else(|| DEFAULT_RETRY_ON.to_vec()),
        }
    }

    /// The wait before attempt `attempt + 1`, given a random number in `[0, 1)`.
    pub fn backoff(&self, attempt: u32, random: f64) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64) as i32;
        let base = (self.initial_backoff.as_secs_f64() * self.multiplier.powi(exponent))
            .min(self.max_backoff.as_secs_f64());
        let factor = 1.0 + self.jitter * (2.0 * random - 1.0);
        Duration::from_secs_f64((base * factor).max(0.0))
    }
}

/// The JSON shape of an event that templates and pointers read (as the HTTP API shows it).
pub fn event_json(event: &RecordedEvent) -> Value {
    let data = if event.data.is_json() {
        serde_json::from_slice(event.data.bytes()).unwrap_or(Value::Null)
    } else {
        Value::String(String::from_utf8_lossy(event.data.bytes()).into_owned())
    };
    let metadata: Value =
        serde_json::from_str(event.metadata.as_str()).unwrap_or_else(|_| serde_json::json!({}));
    serde_json::json!({
        "id": event.id.to_string(),
        "stream": event.stream.as_str(),
        "type": event.event_type.as_str(),
        "source": event.source,
        "datacontenttype": event.data.content_type(),
        "data": data,
        "metadata": metadata,
        "tags": event.tags.iter().map(|t| t.as_str()).collect::<Vec<_>>(),
        "position": event.position.0,
        "revision": event.revision.0,
        "time": event.recorded_at.0,
    })
}

/// A selection of events (a trigger or an await), compiled for matching.
#[derive(Clone, Debug)]
pub struct Selection {
    category: Option<Category>,
    types: Vec<EventType>,
    query: Option<Query>,
}

impl Selection {
    /// Compiles a validated selection.
    pub fn new(category: Option<&str>, types: &[String], query: Option<&[QueryItem]>) -> Self {
        Self {
            category: category.map(|c| Category::from_stored(c.to_owned())),
            types: types
                .iter()
                .map(|t| EventType::from_stored(t.clone()))
                .collect(),
            query: query.map(|items| Query {
                items: items.to_vec(),
            }),
        }
    }

    /// Whether `event` is selected. System streams never are.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        if event.stream.is_system() {
            return false;
        }
        if let Some(query) = &self.query {
            return query.matches_event(event);
        }
        self.category
            .as_ref()
            .is_none_or(|c| event.stream.in_category(c))
            && (self.types.is_empty() || self.types.contains(&event.event_type))
    }

    /// The read source a subscription for this selection uses.
    pub fn read_source(&self) -> skald_core::ReadSource {
        use skald_core::ReadSource;
        match (&self.query, &self.category) {
            (Some(q), _) => ReadSource::Query(q.clone()),
            (None, Some(c)) => ReadSource::Category(c.clone()),
            (None, None) => ReadSource::All(skald_hub::filter_of(self.types.clone(), Vec::new())),
        }
    }
}

/// The value at a JSON pointer of an event, as the text a correlation key is compared by.
pub fn key_at(event: &Value, pointer: &str) -> Option<String> {
    match event.pointer(pointer)? {
        Value::String(s) => Some(s.clone()),
        Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name: order
version: 1
trigger: {category: order, types: [OrderPlaced]}
correlationKey: /data/orderId
steps:
  - name: reserve
    action: {http: {method: POST, url: "http://127.0.0.1:1/r", body: {o: "{{trigger.data.orderId}}"}}}
    compensation: {http: {method: DELETE, url: "http://127.0.0.1:1/r/{{steps.reserve.output.id}}"}}
    retry: {maxAttempts: 5, initialBackoff: 100ms}
  - name: ship
    pivot: true
    action: {append: {stream: "ship-{{saga.correlationKey}}", type: Ship}}
  - name: notify
    retriable: true
    action: {http: {method: POST, url: "http://127.0.0.1:1/n"}}
"#;

    /// A one-step definition triggered by `trigger` whose pivot appends `append`.
    fn appending(trigger: &str, append: &str) -> String {
        format!(
            "name: loop\nversion: 1\ntrigger: {trigger}\ncorrelationKey: /data/id\nsteps:\n  - \
             name: again\n    pivot: true\n    action: {{append: {append}}}\n"
        )
    }

    #[test]
    fn an_append_its_own_trigger_can_match_is_refused() {
        let refused = [
            // The issue's loop: category loopy, appended to loopy-{{saga.id}}.
            (
                "{category: loopy}",
                r#"{stream: "loopy-{{saga.id}}", type: Again}"#,
            ),
            (
                "{category: loopy, types: [Again]}",
                r#"{stream: "loopy-1", type: Again}"#,
            ),
            (
                "{types: [Again]}",
                r#"{stream: "elsewhere-1", type: Again}"#,
            ),
            // The category is decided by a template's value: it may be this one.
            (
                "{category: loopy}",
                r#"{stream: "loop{{saga.id}}", type: Again}"#,
            ),
            (
                "{category: loopy}",
                r#"{stream: "{{saga.id}}", type: Again}"#,
            ),
            (
                "{query: [{types: [Again], tags: [\"k:1\"]}]}",
                r#"{stream: "x-1", type: Again, tags: ["k:{{saga.correlationKey}}"]}"#,
            ),
        ];
        for (trigger, append) in refused {
            let text = appending(trigger, append);
            let error = parse(&text).expect_err(&text).to_string();
            assert!(error.contains("own trigger matches"), "{text}: {error}");
        }
        let accepted = [
            (
                "{category: order, types: [OrderPlaced]}",
                r#"{stream: "order-{{saga.correlationKey}}", type: OrderConfirmed}"#,
            ),
            (
                "{category: loopy}",
                r#"{stream: "audit-{{saga.id}}", type: Again}"#,
            ),
            ("{category: loopy}", r#"{stream: "loopyx", type: Again}"#),
            ("{types: [Placed]}", r#"{stream: "any-1", type: Again}"#),
            (
                "{query: [{types: [Again], tags: [\"k:1\"]}]}",
                r#"{stream: "x-1", type: Again, tags: ["other:{{saga.correlationKey}}"]}"#,
            ),
        ];
        for (trigger, append) in accepted {
            let text = appending(trigger, append);
            parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        }
    }

    #[test]
    fn a_good_definition_parses_and_round_trips_through_json() {
        let def = parse(GOOD).unwrap();
        assert_eq!(def.steps.len(), 3);
        let json = serde_json::to_string(&def).unwrap();
        assert_eq!(parse(&json).unwrap(), def);
        let policy = Policy::of(&def, &def.steps[0]);
        assert_eq!(policy.max_attempts, Some(5));
        assert_eq!(policy.initial_backoff, Duration::from_millis(100));
        assert_eq!(Policy::of(&def, &def.steps[2]).max_attempts, None);
    }

    fn problems(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_missing_compensation_is_named_with_its_line() {
        let text = GOOD.replace(
            "    compensation: {http: {method: DELETE, url: \"http://127.0.0.1:1/r/{{steps.reserve.output.id}}\"}}\n",
            "",
        );
        let err = problems(&text);
        assert!(err.contains("line 7, column 5"), "{err}");
        assert!(err.contains("has no compensation"), "{err}");
    }

    #[test]
    fn bad_templates_durations_and_urls_are_located() {
        let err = problems(&GOOD.replace("steps.reserve.output.id", "steps.ship.output.id"));
        assert!(err.contains("line 9"), "{err}");
        assert!(err.contains("does not run before this point"), "{err}");
        let err = problems(&GOOD.replace("100ms", "soon"));
        assert!(
            err.contains("line 10") && err.contains("not a duration"),
            "{err}"
        );
        let err = problems(&GOOD.replace("http://127.0.0.1:1/n", "ftp://x/n"));
        assert!(
            err.contains("line 16, column 40") && err.contains("http://"),
            "{err}"
        );
        let err = problems(&GOOD.replace("{{saga.correlationKey}}", "{{saga.nope}}"));
        assert!(err.contains("saga has only"), "{err}");
        let err = problems(&GOOD.replace("    retriable: true\n", ""));
        assert!(err.contains("mark it `retriable: true`"), "{err}");
        let err = problems(
            &GOOD
                .replace("mxAttempts", "x")
                .replace("maxAttempts", "maxAttempt"),
        );
        assert!(
            err.contains("line 10") && err.contains("unknown field"),
            "{err}"
        );
        let err = problems(&GOOD.replace("/data/orderId", "data.orderId"));
        assert!(
            err.contains("line 5") && err.contains("JSON pointer"),
            "{err}"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let def = parse(GOOD).unwrap();
        let p = Policy::of(&def, &def.steps[0]);
        assert_eq!(p.backoff(1, 0.5), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(200));
        assert_eq!(p.backoff(30, 0.5), Duration::from_secs(10));
        assert!(p.backoff(1, 0.0) < Duration::from_millis(100));
    }
}
