//! x
pub mod ids;
pub mod ring;
pub mod store;
