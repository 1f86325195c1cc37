// Shared by every kernel (prepended to each source).

// What changes per token, written once per step with `queue.write_buffer`.
struct Step {
    // Token fed at this step.
    token: u32,
    // Its position in the sequence (= KV cache slots filled before it).
    pos: u32,
}

// Workgroups are laid out on a 2-D grid when one dimension would pass the
// adapter's `max_compute_workgroups_per_dimension`; this is the linear id.
fn flat_group(wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return wid.y * nwg.x + wid.x;
}

// Weight block formats (the kernels' layout of model::kernels::QMatrix).
const KIND_Q4_0: u32 = 0u;
const KIND_Q4_1: u32 = 1u;
const KIND_Q8_0: u32 = 2u;
// Q6_K converted at load: 8-bit quants, one scale per 16 weights.
const KIND_Q8_HALF: u32 = 3u;
const KIND_F32: u32 = 4u;

// Dot product of four signed bytes packed in each word. A 4-bit quant
// (0..15) read as a signed byte is itself, so nibble words use it too.
fn dot4(a: u32, b: u32) -> i32 {
    let x = bitcast<i32>(a);
    let y = bitcast<i32>(b);
    return extractBits(x, 0u, 8u) * extractBits(y, 0u, 8u)
         + extractBits(x, 8u, 8u) * extractBits(y, 8u, 8u)
         + extractBits(x, 16u, 8u) * extractBits(y, 16u, 8u)
         + extractBits(x, 24u, 8u) * extractBits(y, 24u, 8u);
}

// The CPU kernels' fixed reduction tree over eight lanes (kernels::reduce8):
// matching it (and each lane's order) keeps results equal to the CPU's up
// to the rounding of exp, so 8-bit activation quants rarely flip.
fn reduce8(a: array<f32, 8>) -> f32 {
    return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}
