//! Benchmark harness. `kernels` measures the model's batched forward passes
//! against candle's stock kernels in the same run; the live harness and the
//! simulator (DESIGN.md) build on it.

pub mod estimator;
pub mod kernels;
