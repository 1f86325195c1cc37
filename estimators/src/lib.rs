//! Pure estimators for Tandem's scheduler: no clocks, no I/O; time and
//! measurements are passed in, so the live server and the simulator run the
//! same code.

mod acceptance;
mod counters;
mod verify_time;

pub use acceptance::AcceptanceEstimator;
pub use counters::{CounterWeights, ServiceGap, TenantCounters};
pub use verify_time::{BatchShape, IdlePenalty, MeasuredOn, Roofline, UpperBound, VerifyTimeCalibration, VerifyTimeEstimator, VerifyTimeProfile};
