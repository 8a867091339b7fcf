// One warp's share of FlashAttention-2's inner loop: 16 query rows against a slice of a key tile
// in shared memory. Scores S = Q K^T and the product P V run on the tensor cores (mma m16n8k16);
// the online softmax keeps, per row, the running max (log2 domain, scale folded in) and sum.
// Each thread holds rows g = lane / 4 and g + 8 of the warp's 16 (index 0 and 1 below).
#pragma once

#include "common.cuh"

namespace fd {

// Q's A fragments for all of D, read once from a swizzled (rows x D) shared tile: q[k-step][4].
template <int D>
__device__ __forceinline__ void load_q_fragments(uint32_t q[D / 16][4], const void* tile, int first_row) {
    using Tile = SwizzledTile<D>;
    const int lane = threadIdx.x % 32;
    const int row = first_row + lane % 16;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        const int chunk = ks * 2 + lane / 16;
        ldmatrix_x4(q[ks], smem_address(static_cast<const uint16_t*>(tile) + Tile::offset(row, chunk)));
    }
}

// s[n-tile][4] = Q K^T for the KEYS keys from `first_key` of a swizzled (keys x D) K tile.
template <typename T, int D, int KEYS>
__device__ __forceinline__ void scores(float s[KEYS / 8][4], const uint32_t q[D / 16][4], const T* k_tile,
                                       int first_key) {
    using Tile = SwizzledTile<D>;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; nt += 2) {
            // Matrices: keys +0..7 at dims +0..7 and +8..15, then keys +8..15 likewise.
            const int key = first_key + nt * 8 + lane % 8 + (lane / 16) * 8;
            const int chunk = ks * 2 + (lane / 8) % 2;
            uint32_t b[4];
            ldmatrix_x4(b, smem_address(k_tile + Tile::offset(key, chunk)));
            mma16816<T>(s[nt], q[ks], b);
            mma16816<T>(s[nt + 1], q[ks], b + 2);
        }
    }
}

// Fold a block of raw scores into the running softmax: masks (key index >= key_end, or past the
// causal limit of the row, when MASKED), scales into the log2 domain, turns s into P in place,
// rescales the output accumulator o. Keys of this slice start at `first_key` (global index).
// row_limit[i]: the last key row i may see (causal; key_end - 1 otherwise).
template <int KEYS, int DV, bool MASKED>
__device__ __forceinline__ void softmax_step(float s[KEYS / 8][4], float o[DV / 8][4], float row_max[2],
                                             float row_sum[2], float scale_log2, int first_key,
                                             const int row_limit[2]) {
    const int lane = threadIdx.x % 32;
    float block_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int nt = 0; nt < KEYS / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float x = s[nt][e] * scale_log2;
            if (MASKED) {
                const int key = first_key + nt * 8 + 2 * (lane % 4) + (e % 2);
                if (key > row_limit[e / 2]) x = neg_inf();
            }
            s[nt][e] = x;
            block_max[e / 2] = fmaxf(block_max[e / 2], x);
        }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const float new_max = fmaxf(row_max[i], quad_max(block_max[i]));
        // A row with no visible key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
        const float shift = new_max == neg_inf() ? 0.f : new_max;
        const float rescale = exp2f(row_max[i] - shift);
        row_max[i] = new_max;
        row_sum[i] *= rescale;
#pragma unroll
        for (int nt = 0; nt < DV / 8; ++nt) {
            o[nt][2 * i] *= rescale;
            o[nt][2 * i + 1] *= rescale;
        }
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) {
            s[nt][2 * i] = exp2f(s[nt][2 * i] - shift);
            s[nt][2 * i + 1] = exp2f(s[nt][2 * i + 1] - shift);
            sum += s[nt][2 * i] + s[nt][2 * i + 1];
        }
        row_sum[i] += sum;  // this thread's columns; summed over the quad at the end
    }
}

// o += P V for the KEYS keys from `first_key` of a swizzled (keys x DV) V tile; P is the softmax
// step's s, whose C fragments of two adjacent n-tiles form one A fragment.
template <typename T, int KEYS, int DV>
__device__ __forceinline__ void accumulate_pv(float o[DV / 8][4], const float p[KEYS / 8][4], const T* v_tile,
                                              int first_key) {
    using Tile = SwizzledTile<DV>;
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < KEYS / 16; ++ks) {
        const uint32_t a[4] = {pack2<T>(p[2 * ks][0], p[2 * ks][1]), pack2<T>(p[2 * ks][2], p[2 * ks][3]),
                               pack2<T>(p[2 * ks + 1][0], p[2 * ks + 1][1]),
                               pack2<T>(p[2 * ks + 1][2], p[2 * ks + 1][3])};
#pragma unroll
        for (int nt = 0; nt < DV / 8; nt += 2) {
            // Matrices (transposed): keys +0..7 and +8..15 at dims +0..7, then at dims +8..15.
            const int key = first_key + ks * 16 + lane % 8 + ((lane / 8) % 2) * 8;
            const int chunk = nt + lane / 16;
            uint32_t b[4];
            ldmatrix_x4_trans(b, smem_address(v_tile + Tile::offset(key, chunk)));
            mma16816<T>(o[nt], a, b);
            mma16816<T>(o[nt + 1], a, b + 2);
        }
    }
}

}  // namespace fd
