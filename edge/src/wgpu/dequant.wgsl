// Weight decoding, prepended to the kernels that read weight matrices
// (embed.wgsl, matmul.wgsl). Bindings 0..2 are the matrix.

// Block format of the bound matrix (KIND_* in common.wgsl).
override KIND: u32;

// Quant words, or f32 bits for KIND_F32.
@group(0) @binding(0) var<storage, read> w: array<u32>;
// Scales: one per block, two for KIND_Q8_HALF.
@group(0) @binding(1) var<storage, read> wd: array<f32>;
// KIND_Q4_1 minimums, one per block.
@group(0) @binding(2) var<storage, read> wm: array<f32>;

fn weight_byte(word_index: u32, byte: u32) -> u32 {
    return (w[word_index] >> (8u * byte)) & 0xFFu;
}

// Weight (r, c) of a row-major matrix with `cols` columns, computed as
// model::kernels::QMatrix::dequantize_row does.
fn weight(r: u32, c: u32, cols: u32) -> f32 {
    if KIND == KIND_F32 {
        return bitcast<f32>(w[r * cols + c]);
    }
    let blk = r * (cols / 32u) + c / 32u;
    let i = c % 32u;
    if KIND == KIND_Q8_0 || KIND == KIND_Q8_HALF {
        let q = f32(extractBits(bitcast<i32>(weight_byte(blk * 8u + i / 4u, i % 4u)), 0u, 8u));
        if KIND == KIND_Q8_HALF {
            return wd[2u * blk + i / 16u] * q;
        }
        return wd[blk] * q;
    }
    // 4-bit: byte j holds weight j (low nibble) and weight 16 + j (high).
    let j = i % 16u;
    let byte = weight_byte(blk * 4u + j / 4u, j % 4u);
    let q = f32(select(byte & 0xFu, byte >> 4u, i >= 16u));
    if KIND == KIND_Q4_0 {
        return wd[blk] * (q - 8.0);
    }
    return wd[blk] * q + wm[blk];
}
