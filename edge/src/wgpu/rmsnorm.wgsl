// out = x / sqrt(mean(x²) + eps) · gain, one row, one workgroup.

struct Norm {
    n: u32,
    eps: f32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> gain: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<uniform> norm: Norm;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) lid: u32) {
    var s = 0.0;
    for (var i = lid; i < norm.n; i += 256u) {
        s += x[i] * x[i];
    }
    partial[lid] = s;
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
    }
    workgroupBarrier();
    let scale = 1.0 / sqrt(partial[0] / f32(norm.n) + norm.eps);
    for (var i = lid; i < norm.n; i += 256u) {
        out[i] = x[i] * scale * gain[i];
    }
}
