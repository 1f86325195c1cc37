// Rotates adjacent pairs of every Q and K head by the position's angles
// (GGUF's interleaved llama layout), then stores K and V in the layer's
// cache slot `step.pos`, rounded to half precision as the CPU cache holds
// them (kept as f32 here). Q is rotated in place in the fused QKV row.

fn half_round(x: f32) -> f32 {
    return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x;
}

struct Heads {
    n_heads: u32,
    n_kv_heads: u32,
    head_dim: u32,
}

@group(0) @binding(0) var<storage, read_write> qkv: array<f32>;
@group(0) @binding(1) var<storage, read> rope_cos: array<f32>;
@group(0) @binding(2) var<storage, read> rope_sin: array<f32>;
@group(0) @binding(3) var<storage, read_write> kcache: array<f32>;
@group(0) @binding(4) var<storage, read_write> vcache: array<f32>;
@group(0) @binding(5) var<uniform> heads: Heads;
@group(0) @binding(6) var<uniform> step: Step;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let t = flat_group(wid, nwg) * 64u + lid;
    let half = heads.head_dim / 2u;
    let q_dim = heads.n_heads * heads.head_dim;
    let kv_dim = heads.n_kv_heads * heads.head_dim;
    let slot = step.pos * kv_dim;
    if t < kv_dim {
        vcache[slot + t] = half_round(qkv[q_dim + kv_dim + t]);
    }
    if t >= (heads.n_heads + heads.n_kv_heads) * half {
        return;
    }
    let head = t / half;
    let i = t % half;
    let c = rope_cos[step.pos * half + i];
    let s = rope_sin[step.pos * half + i];
    // Q heads then K heads: contiguous in the fused row.
    let at = head * heads.head_dim + 2u * i;
    let a = qkv[at];
    let b = qkv[at + 1u];
    let ra = a * c - b * s;
    let rb = a * s + b * c;
    if head < heads.n_heads {
        qkv[at] = ra;
        qkv[at + 1u] = rb;
    } else {
        let k = at - q_dim;
        kcache[slot + k] = half_round(ra);
        kcache[slot + k + 1u] = half_round(rb);
    }
}
