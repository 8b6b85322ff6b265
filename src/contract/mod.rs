//! The contract: what a row must be. Table schemas, where each column is found in an upstream
//! shape, the labels a column allows, the promises a value keeps, and the dead-letter table's
//! shape. Knows no Kafka and no Delta; every other layer builds on it.

pub mod dead_letters;
pub mod deletions;
pub mod labels;
pub mod mapping;
pub mod schema;
pub mod values;
