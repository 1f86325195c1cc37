// On-GPU top-k and softmax statistics of the logits, so a step reads back
// K values and indices plus four numbers instead of the whole vocabulary.
//
// Order: larger value first, equal values by lower index (the CPU argmax's
// tie rule). `chunks`: workgroup c bitonic-sorts logits [c·CHUNK,
// (c+1)·CHUNK) in workgroup memory and keeps its first K, plus the chunk's
// max m, Σexp(l − m), Σexp(l − m)·l and Σl. `merge` (one workgroup) selects
// the K best of the chunks' winners by K rounds of "best candidate ranked
// after the previous winner" and combines the statistics: max,
// Z = Σexp(l − max), Σexp(l − max)·l, Σl, from which top-1 probability,
// exact entropy and logit spread follow.

override K: u32;
const THREADS: u32 = 256u;
// Logits per `chunks` workgroup (TOPK_CHUNK in engine.rs).
const CHUNK: u32 = 1024u;
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
var<workgroup> sort_val: array<f32, CHUNK>;
var<workgroup> sort_idx: array<u32, CHUNK>;

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
    for (var e = lid; e < CHUNK; e += THREADS) {
        let i = start + e;
        if i < end {
            sort_val[e] = logits[i];
            sort_idx[e] = i;
        } else {
            sort_val[e] = NEG_INF;
            sort_idx[e] = NONE;
        }
    }
    workgroupBarrier();
    // Bitonic sort, best first: 55 stages of CHUNK / 2 compare-exchanges.
    for (var k = 2u; k <= CHUNK; k <<= 1u) {
        for (var j = k >> 1u; j > 0u; j >>= 1u) {
            for (var t = lid; t < CHUNK / 2u; t += THREADS) {
                let i = (t / j) * 2u * j + t % j;
                let p = i + j;
                let best_first = (i & k) == 0u;
                if ranks_before(sort_val[i], sort_idx[i], sort_val[p], sort_idx[p]) != best_first {
                    let v = sort_val[i];
                    let x = sort_idx[i];
                    sort_val[i] = sort_val[p];
                    sort_idx[i] = sort_idx[p];
                    sort_val[p] = v;
                    sort_idx[p] = x;
                }
            }
            workgroupBarrier();
        }
    }
    for (var r = lid; r < K; r += THREADS) {
        cand_val[c * K + r] = sort_val[r];
        cand_idx[c * K + r] = sort_idx[r];
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
