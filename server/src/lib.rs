//! The verification server: sessions and their KV memory, the batch runner,
//! the gRPC service, auth and metrics (see DESIGN.md).

pub mod admission;
pub mod auth;
pub mod batcher;
pub mod config;
pub mod engine;
mod error;
pub mod kv_budget;
pub mod listen;
pub mod metrics;
pub mod prefix_cache;
pub mod process;
pub mod profile;
pub mod service;
mod session;
pub mod validate;
pub mod wisp;

pub use error::ServeError;
pub use session::{new_acceptance, prompt_per_token, round_demand, tokens_left, work_deadline, HandedOff, Pace, RecentLengths, TypicalRound};
