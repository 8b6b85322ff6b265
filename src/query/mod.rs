//! Reading the tables: the DataFusion SQL shell, Trino registration, and the exactly-once audit.

pub mod audit;
pub mod library;
pub mod sql;
pub mod trino;
