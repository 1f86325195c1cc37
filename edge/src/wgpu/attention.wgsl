// Causal attention of the new token (position step.pos) over the layer's
// cache slots 0..=pos, one workgroup per query head (grouped-query: head h
// reads KV head h / (n_heads / n_kv_heads)). Scores go through a scratch
// row per head, so the context length is bounded by memory, not by
// workgroup storage.

struct Attn {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
    // Scratch floats per head (the cache's capacity in positions).
    stride: u32,
    scale: f32,
}

@group(0) @binding(0) var<storage, read> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> kcache: array<f32>;
@group(0) @binding(2) var<storage, read> vcache: array<f32>;
@group(0) @binding(3) var<storage, read_write> scores: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;
@group(0) @binding(5) var<uniform> attn: Attn;
@group(0) @binding(6) var<uniform> step: Step;

var<workgroup> red: array<f32, 64>;

fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if lid < stride {
            red[lid] = max(red[lid], red[lid + stride]);
        }
    }
    workgroupBarrier();
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let h = flat_group(wid, nwg);
    // Padding workgroups of a 2-D grid (uniform per workgroup).
    if h >= attn.n_heads {
        return;
    }
    let hd = attn.head_dim;
    let kv_dim = attn.n_kv_heads * hd;
    let g = h / (attn.n_heads / attn.n_kv_heads);
    let visible = step.pos + 1u;
    let row = h * attn.stride;
    var m = -3.4028235e38;
    for (var j = lid; j < visible; j += 64u) {
        // kernels::dot_f32's order: eight lanes, then the fixed tree.
        var lanes: array<f32, 8>;
        for (var d = 0u; d < hd; d++) {
            lanes[d % 8u] += qkv[h * hd + d] * kcache[j * kv_dim + g * hd + d];
        }
        let s = reduce8(lanes) * attn.scale;
        scores[row + j] = s;
        m = max(m, s);
    }
    m = reduce_max(lid, m);
    for (var j = lid; j < visible; j += 64u) {
        scores[row + j] = exp(scores[row + j] - m);
    }
    storageBarrier();
    workgroupBarrier();
    // Summed in position order, as the CPU does.
    if lid == 0u {
        var sum = 0.0;
        for (var j = 0u; j < visible; j++) {
            sum += scores[row + j];
        }
        red[0] = sum;
    }
    workgroupBarrier();
    let sum = red[0];
    for (var d = lid; d < hd; d += 64u) {
        var o = 0.0;
        for (var j = 0u; j < visible; j++) {
            o += scores[row + j] / sum * vcache[j * kv_dim + g * hd + d];
        }
        out[h * hd + d] = o;
    }
}
