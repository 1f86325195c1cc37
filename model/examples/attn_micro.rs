//! Attention-only throughput: `attn_micro CONTEXT TOKENS ITERS`.
use half::f16;
use tandem_model::kernels::{attend, KvView, RunRows, Scoring, KEY_BLOCK};
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).map(|s| s.parse().unwrap()).collect();
    let (ctx, n, iters) = (a[0], a[1], a[2]);
    let (hd, group) = (64, 3);
    let visible = ctx + n;
    let keys: Vec<f16> = (0..visible.div_ceil(KEY_BLOCK) * KEY_BLOCK * hd).map(|i| f16::from_f32((i as f32 * 0.37).sin())).collect();
    let values: Vec<f16> = (0..visible * hd).map(|i| f16::from_f32((i as f32 * 0.11).cos())).collect();
    let q: Vec<f32> = (0..n * group * hd).map(|i| (i as f32 * 0.7).sin()).collect();
    let kv = KvView { keys: &keys, values: &values, head_dim: hd };
    let mut out = vec![0f32; q.len()];
    for _ in 0..iters / 10 {
        attend(&q, RunRows { group, first_row: 0, first_visible: ctx + 1 }, &kv, Scoring::plain(0.125), false, &mut out);
    }
    let t = std::time::Instant::now();
    for _ in 0..iters {
        attend(&q, RunRows { group, first_row: 0, first_visible: ctx + 1 }, &kv, Scoring::plain(0.125), false, &mut out);
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    let fmas = (n * group) as f64 * (ctx + n) as f64 * hd as f64 * 2.0 / 16.0;
    println!("ctx {ctx} × {n} tokens: {:.1} µs, {:.2} G vector FMA/s", s * 1e6, fmas / s / 1e9);
}
