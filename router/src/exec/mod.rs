//! Running a plan: statements on shard connections as row cursors ([`cursor`]), scatter-gather
//! merging of their results ([`merge`]) and the two-phase commit of cross-shard transactions
//! ([`twophase`]).

pub mod cursor;
pub mod merge;
pub mod twophase;
