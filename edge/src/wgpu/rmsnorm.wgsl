// out = x / sqrt(mean(x²) + eps) · gain, one row, one workgroup. The sum
// of squares runs in the CPU's order: lane l sums elements l, l + 8, …,
// then the fixed tree (kernels::dot_f32).

struct Norm {
    n: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> gain: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> norm: Norm;

var<workgroup> lanes: array<f32, 8>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    if lid < 8u {
        var s = 0.0;
        for (var i = lid; i < norm.n; i += 8u) {
            s += x[i] * x[i];
        }
        lanes[lid] = s;
    }
    workgroupBarrier();
    let scale = 1.0 / sqrt(reduce8(lanes) / f32(norm.n) + norm.eps);
    for (var i = lid; i < norm.n; i += 256u) {
        out[i] = x[i] * scale * gain[i];
    }
}
