//! Benchmark harness. `kernels` measures the model's batched forward passes
//! against candle's stock kernels in the same run; `estimator` the
//! verification-time estimator on real batches; `live` whole policies with
//! real servers and emulated edges (the simulator is to come).

pub mod estimator;
pub mod kernels;
pub mod live;
pub mod prompts;
