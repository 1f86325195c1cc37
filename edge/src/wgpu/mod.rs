//! The wgpu draft backend: a llama-family draft forward in WGSL compute
//! kernels (Vulkan, Metal, DX12; Mesa's lavapipe without a GPU).
//!
//! Weights stay in their GGUF blocks on the GPU (Q4_0, Q4_1, Q8_0, Q4_K /
//! Q6_K as converted by the CPU kernels, f16/f32 as f32) and are decoded
//! inside the matmul, against f32 activations by default or 8-bit ones
//! with the CPU kernels' integer dot products ([`Activations`]). The KV cache lives on the
//! GPU. Each token is one command submission; only the top-64 logits and
//! four softmax statistics of the last token are read back.

mod draft;
mod engine;
mod gpu;

/// The device limits type [`WgpuOptions::limits`] takes.
pub use ::wgpu::Limits;
pub use draft::{build_draft, wgpu_draft, WgpuDraft};
pub use engine::{Activations, TopLogits, WgpuModel, WgpuOptions};
