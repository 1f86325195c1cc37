// out[out_offset + r] (+)= W[r, :] · x for one activation row: the weights
// stay in their quantized blocks and are decoded here. With F32_ACT = 0,
// quantized weights meet the activation quantized to 8 bits per 32-block
// (quantize.wgsl) in exact integer dot products, as in the CPU kernels:
// lane l of eight accumulates, block after block, scale · (integer dot of
// the block's four-quant group l) with a fused multiply-add; Q4_1 minimums
// are a separate eight-lane dot; the lanes meet in the fixed tree. (The CPU
// kernels sum each block's eight groups first, then scale: the two agree
// to float rounding.) With
// F32_ACT = 1, lane l decodes the same four weights of every block and
// dots them with the f32 activation.

override F32_ACT: u32 = 0u;
// One thread per lane of a row.
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

@group(0) @binding(3) var<storage, read> aq: array<u32>;
@group(0) @binding(4) var<storage, read> ad: array<f32>;
@group(0) @binding(5) var<storage, read> adsum: array<f32>;
@group(0) @binding(6) var<storage, read> x: array<f32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<uniform> shape: Shape;

var<workgroup> dots: array<array<f32, 8>, ROWS>;
var<workgroup> mins: array<array<f32, 8>, ROWS>;

// Lane `l` of row `r`: its integer group dot in every block, scaled.
fn quant_lane(r: u32, l: u32, nb: u32) -> f32 {
    var acc = 0.0;
    for (var b = 0u; b < nb; b++) {
        let blk = r * nb + b;
        var lane = 0;
        var scale = wd[blk] * ad[b];
        if KIND == KIND_Q8_0 || KIND == KIND_Q8_HALF {
            lane = dot4(w[blk * 8u + l], aq[b * 8u + l]);
            if KIND == KIND_Q8_HALF {
                scale = wd[2u * blk + l / 4u] * ad[b];
            }
        } else {
            // Lanes 0..3: low nibbles of word l (weights 4l..4l+3) with
            // activation word l; lanes 4..7: high nibbles of word l − 4
            // (weights 16 + …) with activation word l.
            let word = w[blk * 4u + l % 4u];
            let nibbles = select(word & 0x0F0F0F0Fu, (word >> 4u) & 0x0F0F0F0Fu, l >= 4u);
            let a = aq[b * 8u + l];
            lane = dot4(nibbles, a);
            if KIND == KIND_Q4_0 {
                lane -= 8 * dot4(0x01010101u, a);
            }
        }
        acc = fma(scale, f32(lane), acc);
    }
    return acc;
}

// The four quants of lane `l` of block `blk` (weights 4l..4l+3 of the
// block) and their scale.
fn lane_quants(blk: u32, l: u32) -> vec4<f32> {
    if KIND == KIND_Q8_0 || KIND == KIND_Q8_HALF {
        let q = bitcast<i32>(w[blk * 8u + l]);
        return vec4<f32>(vec4<i32>(extractBits(q, 0u, 8u), extractBits(q, 8u, 8u), extractBits(q, 16u, 8u), extractBits(q, 24u, 8u)));
    }
    let word = w[blk * 4u + l % 4u];
    let n = select(word & 0x0F0F0F0Fu, (word >> 4u) & 0x0F0F0F0Fu, l >= 4u);
    let q = vec4<f32>(vec4<u32>(n & 0xFFu, (n >> 8u) & 0xFFu, (n >> 16u) & 0xFFu, n >> 24u));
    if KIND == KIND_Q4_0 {
        return q - vec4<f32>(8.0);
    }
    return q;
}

// Lane `l` of row `r` against the f32 activation.
fn f32_lane(r: u32, l: u32, nb: u32) -> f32 {
    var acc = 0.0;
    for (var b = 0u; b < nb; b++) {
        let blk = r * nb + b;
        let c = b * 32u + 4u * l;
        let xs = vec4<f32>(x[c], x[c + 1u], x[c + 2u], x[c + 3u]);
        var scale = wd[blk];
        if KIND == KIND_Q8_HALF {
            scale = wd[2u * blk + l / 4u];
        }
        acc += scale * dot(lane_quants(blk, l), xs);
        if KIND == KIND_Q4_1 {
            acc += wm[blk] * (xs.x + xs.y + xs.z + xs.w);
        }
    }
    return acc;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let slot = lid / LANES;
    let r = flat_group(wid, nwg) * ROWS + slot;
    let l = lid % LANES;
    let nb = shape.cols / 32u;
    var acc = 0.0;
    var macc = 0.0;
    if r < shape.rows {
        if KIND == KIND_F32 {
            for (var c = l; c < shape.cols; c += LANES) {
                acc += weight(r, c, shape.cols) * x[c];
            }
        } else if F32_ACT == 1u {
            acc = f32_lane(r, l, nb);
        } else {
            acc = quant_lane(r, l, nb);
            if KIND == KIND_Q4_1 {
                for (var b = l; b < nb; b += LANES) {
                    macc += wm[r * nb + b] * adsum[b];
                }
            }
        }
    }
    dots[slot][l] = acc;
    mins[slot][l] = macc;
    workgroupBarrier();
    if l == 0u && r < shape.rows {
        let s = reduce8(dots[slot]) + reduce8(mins[slot]);
        let o = shape.out_offset + r;
        if shape.accumulate == 1u {
            out[o] = out[o] + s;
        } else {
            out[o] = s;
        }
    }
}
