//! Benchmark harness. `kernels` measures the model's batched forward passes
//! against candle's stock kernels in the same run; `estimator` the
//! verification-time estimator on real batches; `live` whole policies with
//! real servers and emulated edges; `sim` the same policies at scale in a
//! discrete-event simulation; `paper` the standard configuration end to end.

pub mod estimator;
pub mod kernels;
pub mod live;
pub mod paper;
pub mod plots;
pub mod progress;
pub mod prompts;
pub mod real_draft;
pub mod report;
pub mod sim;
pub mod train_draft;
