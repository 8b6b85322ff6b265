//! The running service: one writer per table, background maintenance, health and metrics, and
//! the operator's decision to accept lost offsets.

pub mod accept;
pub mod app;
pub mod background;
pub mod health;
pub mod telemetry;
