//! The shard side: one backend connection's raw protocol ([`connection`]), the per-shard pools
//! ([`pool`]) query cancellation on the shards ([`cancel`]) and TLS to them ([`tls`]).

pub mod cancel;
pub mod connection;
pub mod pool;
pub mod tls;
