//! anycable-ds: a single-binary Durable Streams server with AnyCable's broadcast API and
//! on-disk history in sled.
//!
//! Module map (one concern each; see `docs/ARCHITECTURE.md`):
//! - [`config`]: layered settings;
//! - [`storage`]: the durable per-stream log (sled), group commit, retention, migrations;
//! - [`cluster`]: the log in NATS JetStream (cluster mode);
//! - [`meta`], [`writes`], [`forks`], [`framing`]: stream metadata, the write API's rules, forks,
//!   response bodies;
//! - [`offset`]: offset tokens;
//! - [`hub`]: per-stream notify map for live readers;
//! - [`auth`]: broadcast key, signed streams, JWT;
//! - [`ingest`]: broadcast body parsing;
//! - [`http`]: actix-web handlers;
//! - [`subscriptions`]: the reserved subscription API (webhooks, pull-wake);
//! - [`server`]: start-up and shutdown;
//! - [`metrics`], [`cursor`], [`streams`]: small helpers.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod cursor;
pub mod engine;
pub mod forks;
pub mod framing;
pub mod http;
pub mod hub;
pub mod ingest;
pub mod meta;
pub mod metrics;
pub mod offset;
pub mod query;
pub mod rpc;
pub mod server;
pub mod storage;
pub mod streams;
pub mod subscriptions;
pub mod write_parse;
pub mod writes;
