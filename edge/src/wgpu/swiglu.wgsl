// gated = silu(gate) · up over the fused [gate | up] row.

struct Ffn {
    n: u32,
}

@group(0) @binding(0) var<storage, read> gate_up: array<f32>;
@group(0) @binding(1) var<storage, read_write> gated: array<f32>;
@group(0) @binding(2) var<uniform> ffn: Ffn;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = flat_group(wid, nwg) * 64u + lid;
    if i >= ffn.n {
        return;
    }
    let g = gate_up[i];
    gated[i] = g / (1.0 + exp(-g)) * gate_up[ffn.n + i];
}
