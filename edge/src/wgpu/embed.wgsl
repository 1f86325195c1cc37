// x = row `step.token` of the embedding table, dequantized. A table split
// into row ranges (storage binding limit) runs once per range; only the
// range holding the token writes.

override KIND: u32;

struct Range {
    row0: u32,
    rows: u32,
    cols: u32,
}

@group(0) @binding(0) var<storage, read> w: array<u32>;
@group(0) @binding(1) var<storage, read> wd: array<f32>;
@group(0) @binding(2) var<storage, read> wm: array<f32>;
@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<uniform> range: Range;
@group(0) @binding(5) var<uniform> step: Step;

fn byte_at(word_index: u32, byte: u32) -> u32 {
    return (w[word_index] >> (8u * byte)) & 0xFFu;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg) * 64u + lid;
    if step.token < range.row0 || step.token >= range.row0 + range.rows || c >= range.cols {
        return;
    }
    let r = step.token - range.row0;
    if KIND == KIND_F32 {
        x[c] = bitcast<f32>(w[r * range.cols + c]);
        return;
    }
    let blk = r * (range.cols / 32u) + c / 32u;
    let i = c % 32u;
    if KIND == KIND_Q8_0 || KIND == KIND_Q8_HALF {
        let q = f32(extractBits(bitcast<i32>(byte_at(blk * 8u + i / 4u, i % 4u)), 0u, 8u));
        if KIND == KIND_Q8_HALF {
            x[c] = wd[2u * blk + i / 16u] * q;
        } else {
            x[c] = wd[blk] * q;
        }
        return;
    }
    let j = i % 16u;
    let byte = byte_at(blk * 4u + j / 4u, j % 4u);
    let q = f32(select(byte & 0xFu, byte >> 4u, i >= 16u));
    if KIND == KIND_Q4_0 {
        x[c] = wd[blk] * (q - 8.0);
    } else {
        x[c] = wd[blk] * q + wm[blk];
    }
}
