// Symmetric 8-bit quantization of each 32-block of an activation row, the
// same arithmetic as model::kernels::quantize_activations: d = max|v|/127,
// q = round-half-even(v / d), dsum = d · Σq.

struct Len {
    n: u32,
}

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> aq: array<u32>;
@group(0) @binding(2) var<storage, read_write> ad: array<f32>;
@group(0) @binding(3) var<storage, read_write> adsum: array<f32>;
@group(0) @binding(4) var<uniform> len: Len;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let b = flat_group(wid, nwg) * 64u + lid;
    if b * 32u >= len.n {
        return;
    }
    var amax = 0.0;
    for (var i = 0u; i < 32u; i++) {
        amax = max(amax, abs(x[b * 32u + i]));
    }
    let d = amax / 127.0;
    var inv = 0.0;
    if d > 0.0 {
        inv = 1.0 / d;
    }
    var sum = 0;
    for (var k = 0u; k < 8u; k++) {
        var word = 0u;
        for (var j = 0u; j < 4u; j++) {
            // WGSL's round() is round-half-to-even, like the CPU's.
            let q = i32(round(x[b * 32u + k * 4u + j] * inv));
            sum += q;
            word |= (bitcast<u32>(q) & 0xFFu) << (8u * j);
        }
        aq[b * 8u + k] = word;
    }
    ad[b] = d;
    adsum[b] = d * f32(sum);
}
