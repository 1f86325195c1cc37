// x = row `step.token` of the embedding table, dequantized. A table split
// into row ranges (storage binding limit) runs once per range; only the
// range holding the token writes.

struct Range {
    row0: u32,
    rows: u32,
    cols: u32,
}

@group(0) @binding(3) var<storage, read_write> x: array<f32>;
@group(0) @binding(4) var<uniform> range: Range;
@group(0) @binding(5) var<uniform> step: Step;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let c = flat_group(wid, nwg) * 64u + lid;
    if step.token < range.row0 || step.token >= range.row0 + range.rows || c >= range.cols {
        return;
    }
    x[c] = weight(step.token - range.row0, c, range.cols);
}
