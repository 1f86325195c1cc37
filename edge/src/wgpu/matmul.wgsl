// out[out_offset + r] (+)= W[r, :] · x for one activation row: the weights
// stay in their quantized blocks and are decoded here. Quantized weights
// meet the activation quantized to 8 bits per 32-block (quantize.wgsl),
// exactly as the CPU kernels do, so both backends round the same way.

override KIND: u32;
// Threads sharing one output row (each takes every LANES-th block).
const LANES: u32 = 8u;
// Output rows per workgroup.
const ROWS: u32 = 8u;

struct Shape {
    rows: u32,
    cols: u32,
    out_offset: u32,
    // 1: add to what `out` holds (residual connections); 0: overwrite.
    accumulate: u32,
}

// Quant words, or f32 bits for KIND_F32.
@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> wd: array<f32>;
@group(0) @binding(2) var<storage, read> wm: array<f32>;
@group(0) @binding(3) var<storage, read> aq: array<u32>;
@group(0) @binding(4) var<storage, read> ad: array<f32>;
@group(0) @binding(5) var<storage, read> adsum: array<f32>;
@group(0) @binding(6) var<storage, read> x: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<uniform> shape: Shape;

var<workgroup> partial: array<f32, 64>;

fn block_dot(r: u32, b: u32, nb: u32) -> f32 {
    let blk = r * nb + b;
    if KIND == KIND_F32 {
        var s = 0.0;
        for (var i = 0u; i < 32u; i++) {
            let c = b * 32u + i;
            s += bitcast<f32>(w[r * shape.cols + c]) * x[c];
        }
        return s;
    }
    if KIND == KIND_Q8_0 || KIND == KIND_Q8_HALF {
        var lo = 0;
        var hi = 0;
        for (var k = 0u; k < 4u; k++) {
            lo += dot4(w[blk * 8u + k], aq[b * 8u + k]);
            hi += dot4(w[blk * 8u + 4u + k], aq[b * 8u + 4u + k]);
        }
        if KIND == KIND_Q8_HALF {
            return wd[2u * blk] * ad[b] * f32(lo) + wd[2u * blk + 1u] * ad[b] * f32(hi);
        }
        return wd[blk] * ad[b] * f32(lo + hi);
    }
    // 4-bit: byte j holds weight j (low nibble) and weight 16 + j (high).
    var s = 0;
    var asum = 0;
    for (var k = 0u; k < 4u; k++) {
        let q = w[blk * 4u + k];
        s += dot4(q & 0x0F0F0F0Fu, aq[b * 8u + k]) + dot4((q >> 4u) & 0x0F0F0F0Fu, aq[b * 8u + 4u + k]);
        asum += dot4(0x01010101u, aq[b * 8u + k]) + dot4(0x01010101u, aq[b * 8u + 4u + k]);
    }
    if KIND == KIND_Q4_0 {
        return wd[blk] * ad[b] * f32(s - 8 * asum);
    }
    return wd[blk] * ad[b] * f32(s) + wm[blk] * adsum[b];
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let r = flat_group(wid, nwg) * ROWS + lid / LANES;
    let lane = lid % LANES;
    let nb = shape.cols / 32u;
    var acc = 0.0;
    if r < shape.rows {
        for (var b = lane; b < nb; b += LANES) {
            acc += block_dot(r, b, nb);
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    if lane == 0u && r < shape.rows {
        var s = 0.0;
        for (var i = 0u; i < LANES; i++) {
            s += partial[lid + i];
        }
        let o = shape.out_offset + r;
        if shape.accumulate == 1u {
            out[o] = out[o] + s;
        } else {
            out[o] = s;
        }
    }
}
