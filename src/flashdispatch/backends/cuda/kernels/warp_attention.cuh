// One warp's share of FlashAttention-2's inner loop: M_TILES x 16 query rows against a slice of a
// key tile in shared memory. Scores S = Q K^T and the product P V run on the tensor cores (mma
// m16n8k16); each K or V fragment read from shared memory feeds all M_TILES row tiles, so more
// rows per warp means fewer shared-memory reads per product. The online softmax keeps, per row,
// the running max (in raw-score units) and sum. In each 16-row tile a thread holds rows
// g = lane / 4 and g + 8 (index 0 and 1 of the [2] arrays below).
#pragma once

#include "common.cuh"

namespace fd {

// A thread's ldmatrix base addresses in swizzled tiles of row length COLS (see
// SwizzledTile::chunk_address), for tiles at shared address `tile` and a first row that is a
// multiple of 8. A operand (query rows): lanes 0..15 give rows +0..15 at chunk 0, lanes 16..31
// the same rows at chunk 1. B operand (key rows of K): lanes 0..7 keys +0..7 at chunk 0, lanes
// 8..15 the same keys at chunk 1, lanes 16..31 keys +8..15 likewise. Transposed B operand (key
// rows of V): lanes 0..15 keys +0..15 at chunk 0, lanes 16..31 at chunk 1.
template <int COLS>
__device__ __forceinline__ uint32_t a_operand_base(uint32_t tile, int first_row) {
    const int lane = threadIdx.x % 32;
    return SwizzledTile<COLS>::base_address(tile, first_row + lane % 16, lane / 16);
}

template <int COLS>
__device__ __forceinline__ uint32_t b_operand_base(uint32_t tile, int first_key) {
    const int lane = threadIdx.x % 32;
    return SwizzledTile<COLS>::base_address(tile, first_key + lane % 8 + (lane / 16) * 8, (lane / 8) % 2);
}

template <int COLS>
__device__ __forceinline__ uint32_t bt_operand_base(uint32_t tile, int first_key) {
    const int lane = threadIdx.x % 32;
    return SwizzledTile<COLS>::base_address(tile, first_key + lane % 16, lane / 16);
}

// s[m][n-tile][4] = Q K^T (raw scores): M_TILES x 16 query rows from the A operand base `q_base`
// against KEYS keys from the B operand base `k_base`, both in (rows x D) swizzled tiles.
template <typename T, int D, int KEYS, int M_TILES>
__device__ __forceinline__ void scores(float s[M_TILES][KEYS / 8][4], uint32_t q_base, uint32_t k_base) {
    using Tile = SwizzledTile<D>;
#pragma unroll
    for (int m = 0; m < M_TILES; ++m)
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) s[m][nt][0] = s[m][nt][1] = s[m][nt][2] = s[m][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
        // A fragments: rows +0..7 and +8..15 at dims +0..7, then at dims +8..15.
        uint32_t a[M_TILES][4];
#pragma unroll
        for (int m = 0; m < M_TILES; ++m)
            ldmatrix_x4(a[m], Tile::chunk_address(q_base, 2 * ks) + 16 * m * Tile::ROW_BYTES);
        // B fragments (keys +0..7 at dims +0..7 and +8..15, then keys +8..15 likewise), S_GROUP
        // pairs of key tiles at a time, then their products: the loads' latencies overlap instead
        // of each product waiting for its own load.
        constexpr int S_GROUP = KEYS / 16 < 2 ? KEYS / 16 : 2;
#pragma unroll
        for (int nt0 = 0; nt0 < KEYS / 8; nt0 += 2 * S_GROUP) {
            uint32_t b[S_GROUP][4];
#pragma unroll
            for (int g = 0; g < S_GROUP; ++g)
                ldmatrix_x4(b[g], Tile::chunk_address(k_base, 2 * ks) + (nt0 + 2 * g) * 8 * Tile::ROW_BYTES);
#pragma unroll
            for (int g = 0; g < S_GROUP; ++g) {
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    mma16816<T>(s[m][nt0 + 2 * g], a[m], b[g]);
                    mma16816<T>(s[m][nt0 + 2 * g + 1], a[m], b[g] + 2);
                }
            }
        }
    }
}

// Fold a block of raw scores into the running softmax: masks (when MASKED) keys past the row's
// limit row_limit[m][i] (causal limit or the end of the keys), turns s into P in place and
// rescales the output accumulator o. The slice's keys start at `first_key`. The running max
// row_max is kept in raw-score units and the scale (scale_log2 > 0, so it preserves order) is
// applied inside exp2's argument, one FFMA per score, as FlashAttention does.
template <int KEYS, int DV, int M_TILES, bool MASKED>
__device__ __forceinline__ void softmax_step(float s[M_TILES][KEYS / 8][4], float o[M_TILES][DV / 8][4],
                                             float row_max[M_TILES][2], float row_sum[M_TILES][2], float scale_log2,
                                             int first_key, const int row_limit[M_TILES][2]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 0; m < M_TILES; ++m) {
        float block_max[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int nt = 0; nt < KEYS / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                if (MASKED) {
                    const int key = first_key + nt * 8 + 2 * (lane % 4) + (e % 2);
                    if (key > row_limit[m][e / 2]) s[m][nt][e] = neg_inf();
                }
                block_max[e / 2] = fmaxf(block_max[e / 2], s[m][nt][e]);
            }
        }
        float rescale[2], shift[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float new_max = fmaxf(row_max[m][i], quad_max(block_max[i]));
            // A row with no visible key yet keeps max -inf: shift by 0 so exp2 gives 0, not NaN.
            // Unfused products: an unchanged max gives a rescale of exactly 1.
            shift[i] = new_max == neg_inf() ? 0.f : __fmul_rn(new_max, scale_log2);
            rescale[i] = fast_exp2(__fmul_rn(row_max[m][i], scale_log2) - shift[i]);
            row_max[m][i] = new_max;
            row_sum[m][i] *= rescale[i];
        }
        // Once the running maxima settle, most blocks change no row's max: the warp then skips
        // rescaling its output (a multiply by exactly 1 per element).
        if (__any_sync(0xffffffff, rescale[0] != 1.f || rescale[1] != 1.f)) {
#pragma unroll
            for (int nt = 0; nt < DV / 8; ++nt) {
#pragma unroll
                for (int e = 0; e < 4; ++e) o[m][nt][e] *= rescale[e / 2];
            }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < KEYS / 8; ++nt) {
                s[m][nt][2 * i] = fast_exp2(fmaf(s[m][nt][2 * i], scale_log2, -shift[i]));
                s[m][nt][2 * i + 1] = fast_exp2(fmaf(s[m][nt][2 * i + 1], scale_log2, -shift[i]));
                sum += s[m][nt][2 * i] + s[m][nt][2 * i + 1];
            }
            row_sum[m][i] += sum;  // this thread's columns; summed over the quad at the end
        }
    }
}

// o += P V for KEYS keys from the transposed B operand base `v_base` in a swizzled (keys x DV)
// V tile; P is the softmax step's s, whose C fragments of two adjacent n-tiles form one A fragment.
template <typename T, int KEYS, int DV, int M_TILES>
__device__ __forceinline__ void accumulate_pv(float o[M_TILES][DV / 8][4], const float p[M_TILES][KEYS / 8][4],
                                              uint32_t v_base) {
    using Tile = SwizzledTile<DV>;
#pragma unroll
    for (int ks = 0; ks < KEYS / 16; ++ks) {
        uint32_t a[M_TILES][4];
#pragma unroll
        for (int m = 0; m < M_TILES; ++m) {
            a[m][0] = pack2<T>(p[m][2 * ks][0], p[m][2 * ks][1]);
            a[m][1] = pack2<T>(p[m][2 * ks][2], p[m][2 * ks][3]);
            a[m][2] = pack2<T>(p[m][2 * ks + 1][0], p[m][2 * ks + 1][1]);
            a[m][3] = pack2<T>(p[m][2 * ks + 1][2], p[m][2 * ks + 1][3]);
        }
        // B fragments (transposed): keys +0..7 and +8..15 at dims +0..7, then at dims +8..15;
        // loaded PV_GROUP pairs of output tiles at a time, then used, as in `scores`.
        constexpr int PV_GROUP = 2;
#pragma unroll
        for (int nt0 = 0; nt0 < DV / 8; nt0 += 2 * PV_GROUP) {
            uint32_t b[PV_GROUP][4];
#pragma unroll
            for (int g = 0; g < PV_GROUP; ++g)
                ldmatrix_x4_trans(b[g], Tile::chunk_address(v_base, nt0 + 2 * g) + 16 * ks * Tile::ROW_BYTES);
#pragma unroll
            for (int g = 0; g < PV_GROUP; ++g) {
#pragma unroll
                for (int m = 0; m < M_TILES; ++m) {
                    mma16816<T>(o[m][nt0 + 2 * g], a[m], b[g]);
                    mma16816<T>(o[m][nt0 + 2 * g + 1], a[m], b[g] + 2);
                }
            }
        }
    }
}

}  // namespace fd
