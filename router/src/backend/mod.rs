//! The shard side: one backend connection's raw protocol ([`connection`]), the per-shard pools
//! ([`pool`]) and query cancellation on the shards ([`cancel`]).

pub mod cancel;
pub mod connection;
pub mod pool;
