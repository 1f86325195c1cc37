//! Kernel-only throughput: `matmul_micro ROWS COLS M ITERS` on random Q4_1 weights.
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tandem_model::kernels::QMatrix;
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (rows, cols, m, iters) = (a[0], a[1], a[2], a[3]);
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    let mat = QMatrix::from_qtensor("w", &QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap();
    let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = || rayon::scope(|_| { for _ in 0..iters { std::hint::black_box(mat.matmul(&x, m)); } });
    run();
    let t = std::time::Instant::now();
    run();
    let s = t.elapsed().as_secs_f64();
    println!("{rows}x{cols} M={m}: {:.3} ms/iter, {:.1} GMAC/s, {:.1} GB/s weights", s * 1e3 / iters as f64, (rows * cols * m * iters) as f64 / s / 1e9, (mat.bytes() * iters) as f64 / s / 1e9);
}
