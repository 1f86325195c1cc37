// On-GPU top-k and softmax statistics of the logits, so a step reads back
// K values and indices plus four numbers instead of the whole vocabulary.
//
// `chunks`: workgroup c takes logits [c·chunk, (c+1)·chunk) and selects its
// K largest by K rounds of "best element ranked after the previous winner"
// (order: larger value first, equal values by lower index: the CPU
// argmax's tie rule), plus the chunk's max m, Σexp(l − m), Σexp(l − m)·l
// and Σl. `merge` (one workgroup) does the same over the chunks' winners
// and combines the statistics: max, Z = Σexp(l − max), Σexp(l − max)·l, Σl,
// from which top-1 probability, exact entropy and logit spread follow.

override K: u32;
const THREADS: u32 = 256u;
const NONE: u32 = 0xFFFFFFFFu;
const NEG_INF: f32 = -3.4028235e38;

struct TopkShape {
    // Logits in all.
    n: u32,
    chunk: u32,
    n_chunks: u32,
}

@group(0) @binding(0) var<storage, read> logits: array<f32>;
@group(0) @binding(1) var<storage, read_write> cand_val: array<f32>;
@group(0) @binding(2) var<storage, read_write> cand_idx: array<u32>;
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;
// K values (f32 bits), K indices, then the four statistics (f32 bits).
@group(0) @binding(4) var<storage, read_write> result: array<u32>;
@group(0) @binding(5) var<uniform> shape: TopkShape;

var<workgroup> best_val: array<f32, THREADS>;
var<workgroup> best_idx: array<u32, THREADS>;
var<workgroup> red: array<f32, THREADS>;

fn ranks_before(v: f32, i: u32, w: f32, j: u32) -> bool {
    return v > w || (v == w && i < j);
}

// Reduces (best_val, best_idx) to slot 0; every thread returns the winner.
fn reduce_best(lid: u32, v: f32, i: u32) -> vec2<u32> {
    best_val[lid] = v;
    best_idx[lid] = i;
    for (var stride = THREADS / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if lid < stride && ranks_before(best_val[lid + stride], best_idx[lid + stride], best_val[lid], best_idx[lid]) {
            best_val[lid] = best_val[lid + stride];
            best_idx[lid] = best_idx[lid + stride];
        }
    }
    workgroupBarrier();
    let r = vec2<u32>(bitcast<u32>(best_val[0]), best_idx[0]);
    workgroupBarrier();
    return r;
}

fn reduce(lid: u32, v: f32, is_max: bool) -> f32 {
    red[lid] = v;
    for (var stride = THREADS / 2u; stride > 0u; stride >>= 1u) {
        workgroupBarrier();
        if lid < stride {
            if is_max {
                red[lid] = max(red[lid], red[lid + stride]);
            } else {
                red[lid] += red[lid + stride];
            }
        }
    }
    workgroupBarrier();
    let r = red[0];
    workgroupBarrier();
    return r;
}

@compute @workgroup_size(256)
fn chunks(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg);
    // Uniform per workgroup: every thread returns or none does.
    if c >= shape.n_chunks {
        return;
    }
    let start = c * shape.chunk;
    let end = min(start + shape.chunk, shape.n);
    var m = NEG_INF;
    var lsum = 0.0;
    for (var i = start + lid; i < end; i += THREADS) {
        m = max(m, logits[i]);
        lsum += logits[i];
    }
    m = reduce(lid, m, true);
    var z = 0.0;
    var zl = 0.0;
    for (var i = start + lid; i < end; i += THREADS) {
        let e = exp(logits[i] - m);
        z += e;
        zl += e * logits[i];
    }
    z = reduce(lid, z, false);
    zl = reduce(lid, zl, false);
    lsum = reduce(lid, lsum, false);
    if lid == 0u {
        stats[c * 4u] = m;
        stats[c * 4u + 1u] = z;
        stats[c * 4u + 2u] = zl;
        stats[c * 4u + 3u] = lsum;
    }
    var prev_val = 3.4028235e38;
    var prev_idx = NONE;
    var first = true;
    for (var round = 0u; round < K; round++) {
        var bv = NEG_INF;
        var bi = NONE;
        for (var i = start + lid; i < end; i += THREADS) {
            let v = logits[i];
            if (first || ranks_before(prev_val, prev_idx, v, i)) && ranks_before(v, i, bv, bi) {
                bv = v;
                bi = i;
            }
        }
        let win = reduce_best(lid, bv, bi);
        prev_val = bitcast<f32>(win.x);
        prev_idx = win.y;
        first = false;
        if lid == 0u {
            cand_val[c * K + round] = prev_val;
            cand_idx[c * K + round] = prev_idx;
        }
    }
}

@compute @workgroup_size(256)
fn merge(@builtin(local_invocation_index) lid: u32) {
    let n = shape.n_chunks * K;
    var prev_val = 3.4028235e38;
    var prev_idx = NONE;
    var first = true;
    for (var round = 0u; round < K; round++) {
        var bv = NEG_INF;
        var bi = NONE;
        for (var i = lid; i < n; i += THREADS) {
            let v = cand_val[i];
            let t = cand_idx[i];
            if t != NONE && (first || ranks_before(prev_val, prev_idx, v, t)) && ranks_before(v, t, bv, bi) {
                bv = v;
                bi = t;
            }
        }
        let win = reduce_best(lid, bv, bi);
        prev_val = bitcast<f32>(win.x);
        prev_idx = win.y;
        first = false;
        if lid == 0u {
            result[round] = win.x;
            result[K + round] = win.y;
        }
    }
    if lid == 0u {
        var m = NEG_INF;
        for (var c = 0u; c < shape.n_chunks; c++) {
            m = max(m, stats[c * 4u]);
        }
        var z = 0.0;
        var zl = 0.0;
        var lsum = 0.0;
        for (var c = 0u; c < shape.n_chunks; c++) {
            let f = exp(stats[c * 4u] - m);
            z += stats[c * 4u + 1u] * f;
            zl += stats[c * 4u + 2u] * f;
            lsum += stats[c * 4u + 3u];
        }
        result[2u * K] = bitcast<u32>(m);
        result[2u * K + 1u] = bitcast<u32>(z);
        result[2u * K + 2u] = bitcast<u32>(zl);
        result[2u * K + 3u] = bitcast<u32>(lsum);
    }
}
