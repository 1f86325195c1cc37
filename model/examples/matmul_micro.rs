//! Kernel-only throughput: `matmul_micro ROWS COLS M ITERS [q4_1|q8_0|q6k]` on random weights (Q4_1 by default).
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tandem_model::kernels::QMatrix;
fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<usize> = args.iter().take(4).map(|s| s.parse().unwrap()).collect();
    let (rows, cols, m, iters) = (a[0], a[1], a[2], a[3]);
    let dtype = match args.get(4).map(String::as_str) {
        None | Some("q4_1") => GgmlDType::Q4_1,
        Some("q8_0") => GgmlDType::Q8_0,
        Some("q6k") => GgmlDType::Q6K,
        Some(other) => panic!("unknown type {other}"),
    };
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
    let mat = QMatrix::from_qtensor("w", &QTensor::quantize(&w, dtype).unwrap()).unwrap();
    let x: Vec<f32> = (0..m * cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = || {
        rayon::scope(|_| {
            for _ in 0..iters {
                std::hint::black_box(mat.matmul(&x, m));
            }
        })
    };
    run();
    let t = std::time::Instant::now();
    run();
    let s = t.elapsed().as_secs_f64();
    println!(
        "{rows}x{cols} M={m}: {:.3} ms/iter, {:.1} GMAC/s, {:.1} GB/s weights",
        s * 1e3 / iters as f64,
        (rows * cols * m * iters) as f64 / s / 1e9,
        (mat.bytes() * iters) as f64 / s / 1e9
    );
}
