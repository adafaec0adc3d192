//! The prefork supervisor (being assembled; see the crate docs once complete).

pub mod config;
pub mod listener;
pub mod policy;
pub mod scoreboard;
mod sys;
