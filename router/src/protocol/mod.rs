//! The bottom layer: PostgreSQL protocol v3 messages, typed column values and COPY data, shared by
//! the client side (`frontend`) and the shard side (`backend`). Nothing here imports another layer.

pub mod copy_data;
pub mod messages;
pub mod values;
