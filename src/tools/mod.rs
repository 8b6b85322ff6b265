//! Tools for people trying and measuring sluice: the demo, the benchmark, and realistic posts
//! generated and published to Kafka.

pub mod bench;
pub mod demo;
pub mod generator;
pub mod produce;
pub mod wire;
