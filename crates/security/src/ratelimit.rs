//! Token buckets per key (a principal's name, a client address).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// `rate` requests per second on average, up to `burst` at once.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub rate: f64,
    pub burst: f64,
}

impl Bucket {
    pub fn validate(&self, key: &str) -> Result<(), String> {
        let sane =
            self.rate > 0.0 && self.rate.is_finite() && self.burst >= 1.0 && self.burst.is_finite();
        if !sane {
            return Err(format!(
                "[rate_limit] {key}: rate must be above 0 and burst at least 1"
            ));
        }
        Ok(())
    }
}

/// `[rate_limit]`: both off unless set.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub per_principal: Option<Bucket>,
    pub per_address: Option<Bucket>,
}

const SHARDS: usize = 16;
/// Buckets idle this long are full again and are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(300);

/// Buckets by key, in shards so that unrelated callers rarely share a lock.
pub struct Limiter<K> {
    bucket: Bucket,
    shards: Vec<Mutex<Shard<K>>>,
}

struct Shard<K> {
    tokens: HashMap<K, (f64, Instant)>,
    swept: Instant,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub fn new(bucket: Bucket) -> Self {
        Self {
            bucket,
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        tokens: HashMap::new(),
                        swept: Instant::now(),
                    })
                })
                .collect(),
        }
    }

    /// Takes one token for `key`: `Ok` or `Err(wait until one is there)`.
    pub fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let index = (fixed_hash(key) as usize) % SHARDS;
        let mut shard = self.shards[index].lock().expect("limiter lock");
        if now.duration_since(shard.swept) > FORGET_AFTER {
            let burst = self.bucket.burst;
            let rate = self.bucket.rate;
            shard.tokens.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
            shard.swept = now;
        }
        let (tokens, at) = shard
            .tokens
            .entry(key.clone())
            .or_insert((self.bucket.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.bucket.rate)
            .min(self.bucket.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.bucket.rate))
        }
    }

    /// Returns a token taken for `key` (up to the burst).
    pub fn give_back(&self, key: &K) {
        let index = (fixed_hash(key) as usize) % SHARDS;
        let mut shard = self.shards[index].lock().expect("limiter lock");
        if let Some((tokens, _)) = shard.tokens.get_mut(key) {
            *tokens = (*tokens + 1.0).min(self.bucket.burst);
        }
    }
}

fn fixed_hash<K: Hash>(key: &K) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = Limiter::new(Bucket {
            rate: 10.0,
            burst: 3.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            limiter.take(&"a", t0).unwrap();
        }
        let wait = limiter.take(&"a", t0).unwrap_err();
        assert!(
            wait <= Duration::from_millis(100) && wait > Duration::ZERO,
            "{wait:?}"
        );
        // Another key has its own bucket.
        limiter.take(&"b", t0).unwrap();
        // A tenth of a second later there is one token again.
        limiter.take(&"a", t0 + Duration::from_millis(100)).unwrap();
        assert!(limiter.take(&"a", t0 + Duration::from_millis(100)).is_err());
    }
}
