//! The security suite: the authorization matrix, tokens of every kind of wrong, revoked and
//! expired keys, rate limits, TLS and mTLS with certificate rotation, the audit trail, and a
//! scan of the server's logs for secrets. It runs the real `skald` binary (`docs/security.md`).

#[path = "../../crates/cli/tests/support/mod.rs"]
mod support;

mod common;
mod grpc;
mod held;
mod limits;
mod matrix;
mod oracles;
mod revocation;
mod sagas;
mod tokens;
mod transport;
