//! Circuit breakers, one per target `host:port`, shared by every saga.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Breaker thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", default, deny_unknown_fields)]
pub struct BreakerSettings {
    /// Consecutive failures that open a closed breaker.
    pub failure_threshold: u32,
    /// How long an open breaker fails calls before letting one through.
    #[serde(with = "humantime_serde_compat")]
    pub open_for: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_for: Duration::from_secs(10),
        }
    }
}

/// `open_for = "10s"` in TOML.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("{text:?} is not a duration such as 10s: {e}"))
        })
    }
}

/// A breaker's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail at once until the instant.
    Open,
    /// One trial call is allowed; its outcome closes or reopens the breaker.
    HalfOpen,
}

impl BreakerState {
    /// `closed`, `open` or `half-open`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug)]
struct Breaker {
    state: BreakerState,
    failures: u32,
    open_until: Instant,
    trial_in_flight: bool,
}

/// Why a call may not go through.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected {
    /// When the breaker will let a trial call through.
    pub retry_in: Duration,
}

/// Every breaker. Hosts are few (one per target service), so the map is not bounded further
/// than by the definitions' URLs.
#[derive(Debug, Default)]
pub struct Breakers {
    settings: BreakerSettings,
    hosts: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    /// Breakers with these thresholds.
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// Asks to call `host`. `Ok` lets the call through; its outcome must then be reported
    /// with [`Breakers::record`].
    pub fn admit(&self, host: &str) -> Result<(), Rejected> {
        let now = Instant::now();
        let mut hosts = self.hosts.lock().expect("breakers lock");
        let breaker = hosts.entry(host.to_owned()).or_insert(Breaker {
            state: BreakerState::Closed,
            failures: 0,
            open_until: now,
            trial_in_flight: false,
        });
        match breaker.state {
            BreakerState::Closed => Ok(()),
            BreakerState::Open if now >= breaker.open_until => {
                breaker.state = BreakerState::HalfOpen;
                breaker.trial_in_flight = true;
                Ok(())
            }
            BreakerState::Open => Err(Rejected {
                retry_in: breaker.open_until - now,
            }),
            BreakerState::HalfOpen if !breaker.trial_in_flight => {
                breaker.trial_in_flight = true;
                Ok(())
            }
            BreakerState::HalfOpen => Err(Rejected {
                retry_in: Duration::from_millis(100),
            }),
        }
    }

    /// Reports the outcome of an admitted call: `healthy` is false for connection failures,
    /// timeouts and 5xx answers.
    pub fn record(&self, host: &str, healthy: bool) {
        let now = Instant::now();
        let mut hosts = self.hosts.lock().expect("breakers lock");
        let Some(breaker) = hosts.get_mut(host) else {
            return;
        };
        breaker.trial_in_flight = false;
        if healthy {
            breaker.state = BreakerState::Closed;
            breaker.failures = 0;
            return;
        }
        breaker.failures += 1;
        let trips = breaker.state == BreakerState::HalfOpen
            || breaker.failures >= self.settings.failure_threshold;
        if trips {
            if breaker.state != BreakerState::Open {
                tracing::warn!(
                    host,
                    failures = breaker.failures,
                    "circuit breaker opens for {:?}",
                    self.settings.open_for
                );
            }
            breaker.state = BreakerState::Open;
            breaker.open_until = now + self.settings.open_for;
        }
    }

    /// Each host's state, for metrics and tests.
    pub fn states(&self) -> Vec<(String, BreakerState)> {
        let hosts = self.hosts.lock().expect("breakers lock");
        let mut out: Vec<_> = hosts.iter().map(|(h, b)| (h.clone(), b.state)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_half_opens_and_closes() {
        let b = Breakers::new(BreakerSettings {
            failure_threshold: 2,
            open_for: Duration::from_secs(5),
        });
        b.admit("h").unwrap();
        b.record("h", false);
        b.admit("h").unwrap();
        b.record("h", false);
        assert_eq!(b.states()[0].1, BreakerState::Open);
        assert!(b.admit("h").is_err());
        tokio::time::advance(Duration::from_secs(6)).await;
        b.admit("h").unwrap();
        assert_eq!(b.states()[0].1, BreakerState::HalfOpen);
        assert!(b.admit("h").is_err(), "one trial at a time");
        b.record("h", false);
        assert_eq!(
            b.states()[0].1,
            BreakerState::Open,
            "a failed trial reopens"
        );
        tokio::time::advance(Duration::from_secs(6)).await;
        b.admit("h").unwrap();
        b.record("h", true);
        assert_eq!(b.states()[0].1, BreakerState::Closed);
        b.admit("h").unwrap();
    }
}
