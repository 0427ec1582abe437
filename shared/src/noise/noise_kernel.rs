//! The CubeCL kernel that adds seed noise to a weight tensor on a GPU (or any CubeCL runtime):
//! ChaCha8 written out in CubeCL, so the keystream is generated where the weights live and never
//! crosses the bus. It must produce exactly the words `rand_chacha` produces on the host; the
//! tests in `tests/backends.rs` compare the two bit for bit.
//!
//! One unit computes one 64-byte ChaCha block, the 16 words that hold 32 binomial values or 512
//! Rademacher values, and adds every term's contribution to those elements in term order.

use cubecl::prelude::*;

/// Elements one ChaCha block (16 words) covers for binomial noise.
pub(crate) const BINOMIAL_PER_BLOCK: usize = 32;
/// Elements one ChaCha block covers for Rademacher noise.
pub(crate) const RADEMACHER_PER_BLOCK: usize = 512;

#[cube]
fn rotate_left(value: u32, #[comptime] bits: u32) -> u32 {
    (value << bits) | (value >> comptime!(32 - bits))
}

/// ChaCha's quarter round on words `a, b, c, d` of the working state.
#[cube]
fn quarter_round(
    x: &mut Array<u32>,
    #[comptime] a: usize,
    #[comptime] b: usize,
    #[comptime] c: usize,
    #[comptime] d: usize,
) {
    x[a] += x[b];
    x[d] = rotate_left(x[d] ^ x[a], 16u32);
    x[c] += x[d];
    x[b] = rotate_left(x[b] ^ x[c], 12u32);
    x[a] += x[b];
    x[d] = rotate_left(x[d] ^ x[a], 8u32);
    x[c] += x[d];
    x[b] = rotate_left(x[b] ^ x[c], 7u32);
}

/// Writes block `counter` of the ChaCha8 keystream into `x`: the key is the 64-bit seed followed
/// by 24 zero bytes, the 64-bit nonce is the stream, as `rand_chacha` lays them out.
#[cube]
fn chacha8_block(
    x: &mut Array<u32>,
    seed_lo: u32,
    seed_hi: u32,
    counter: u32,
    stream_lo: u32,
    stream_hi: u32,
) {
    // "expand 32-byte k"
    x[0] = 0x6170_7865u32;
    x[1] = 0x3320_646Eu32;
    x[2] = 0x7962_2D32u32;
    x[3] = 0x6B20_6574u32;
    x[4] = seed_lo;
    x[5] = seed_hi;
    #[unroll]
    for i in 6..12 {
        x[i] = 0u32;
    }
    x[12] = counter;
    x[13] = 0u32;
    x[14] = stream_lo;
    x[15] = stream_hi;

    #[unroll]
    for _ in 0..4 {
        quarter_round(x, 0usize, 4usize, 8usize, 12usize);
        quarter_round(x, 1usize, 5usize, 9usize, 13usize);
        quarter_round(x, 2usize, 6usize, 10usize, 14usize);
        quarter_round(x, 3usize, 7usize, 11usize, 15usize);
        quarter_round(x, 0usize, 5usize, 10usize, 15usize);
        quarter_round(x, 1usize, 6usize, 11usize, 12usize);
        quarter_round(x, 2usize, 7usize, 8usize, 13usize);
        quarter_round(x, 3usize, 4usize, 9usize, 14usize);
    }

    // Adding the input back; the zero key words and counter high word add nothing.
    x[0] += 0x6170_7865u32;
    x[1] += 0x3320_646Eu32;
    x[2] += 0x7962_2D32u32;
    x[3] += 0x6B20_6574u32;
    x[4] += seed_lo;
    x[5] += seed_hi;
    x[12] += counter;
    x[14] += stream_lo;
    x[15] += stream_hi;
}

/// `weight[e] += c_k · z(seed_k, stream, e)` for every term `k` in order, one unit per block.
///
/// `seed_limbs` holds each term's 64-bit seed as four 16-bit limbs, least significant first:
/// every integer type a backend may store them in holds them exactly. The coefficients arrive
/// truncated to 21 significant bits, so `c · z` is exact and a fused multiply-add, which GPU
/// compilers may form on their own, cannot change a result.
#[cube(launch)]
pub(crate) fn add_seed_noise_kernel<I: Int>(
    weight: &mut Tensor<f32>,
    seed_limbs: &Tensor<I>,
    coefficients: &Tensor<f32>,
    stream_lo: u32,
    stream_hi: u32,
    #[comptime] rademacher: bool,
    #[define(I)] _limb_type: ElemType,
) {
    let block = ABSOLUTE_POS;
    let per_block = comptime![if rademacher {
        RADEMACHER_PER_BLOCK
    } else {
        BINOMIAL_PER_BLOCK
    }];
    let len = weight.len();
    let first = block * per_block;
    if first >= len {
        terminate!();
    }

    let mut x = Array::<u32>::new(16usize);
    for k in 0..coefficients.len() {
        let limb = 4 * k;
        let seed_lo =
            u32::cast_from(seed_limbs[limb]) | (u32::cast_from(seed_limbs[limb + 1]) << 16u32);
        let seed_hi =
            u32::cast_from(seed_limbs[limb + 2]) | (u32::cast_from(seed_limbs[limb + 3]) << 16u32);
        let c = coefficients[k];
        chacha8_block(&mut x, seed_lo, seed_hi, block as u32, stream_lo, stream_hi);

        if comptime![rademacher] {
            #[unroll]
            for j in 0..16 {
                let word = x[j];
                for bit in 0..32u32 {
                    let e = first + j * 32 + bit as usize;
                    if e < len {
                        // Bit set: +1, clear: -1.
                        let z = f32::cast_from(((word >> bit) & 1u32) * 2u32) - 1.0f32;
                        weight[e] += c * z;
                    }
                }
            }
        } else {
            #[unroll]
            for j in 0..16 {
                let word = x[j];
                let e = first + j * 2;
                if e < len {
                    let z = (f32::cast_from((word & 0xFFFFu32).count_ones()) - 8.0f32) * 0.5f32;
                    weight[e] += c * z;
                }
                if e + 1 < len {
                    let z = (f32::cast_from((word >> 16u32).count_ones()) - 8.0f32) * 0.5f32;
                    weight[e + 1] += c * z;
                }
            }
        }
    }
}
