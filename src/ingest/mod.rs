//! Ingest: Kafka records to rows and dead letters, exactly once. The consumer, decoding through
//! the contract, the batching rules, and the writer loop that commits through the table layer.

pub mod batch;
pub mod dead_letters;
pub mod decode;
pub mod kafka;
pub mod pipeline;
pub mod progress;
pub mod registry;
pub mod source;
