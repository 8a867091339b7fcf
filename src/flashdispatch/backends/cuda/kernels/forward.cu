// FlashAttention-2 forward on the tensor cores (mma.sync m16n8k16, ldmatrix, cp.async double
// buffering), for sm_80 and later.
//
// One thread block: BLOCK_M = 16 * M_TILES * WARPS query rows of one (batch, query head); each warp
// owns 16 * M_TILES rows and walks the key blocks (BLOCK_N keys) in shared memory, with S, P and
// its output rows in registers (float32); every K and V fragment it reads from shared memory feeds
// its M_TILES row tiles. The next block's K and V tiles load (cp.async) while this block is
// computed; two barriers per block. Causal attention aligns bottom-right (query i sees keys
// j <= i + Nk - Nq): key blocks past a row block's last visible key are never loaded, and only the
// blocks that straddle the diagonal or the end of the keys pay for masking.
//
// Grid: (batch * query heads, query blocks); heads vary fastest, so that under a causal mask the
// longest query blocks of every head start first (query blocks first measured the same without a
// mask and 10% slower with one). Writes out (B, Hq, Nq, D) through its strides and
// lse (B, Hq, Nq) float32 contiguous, natural log; a row with no visible key gets 0 and -inf.
#include "warp_attention.cuh"

namespace fd {

template <typename T, int D, int WARPS, int M_TILES, int BLOCK_N, bool CAUSAL>
__global__ void __launch_bounds__(WARPS * 32)
flash_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
              float* __restrict__ lse,
              int64_t q_batch, int64_t q_head, int64_t q_row,
              int64_t k_batch, int64_t k_head, int64_t k_row,
              int64_t v_batch, int64_t v_head, int64_t v_row,
              int64_t o_batch, int64_t o_head, int64_t o_row,
              int seqlen_q, int seqlen_k, int heads_q, int group, float scale_log2) {
    constexpr int BLOCK_M = 16 * M_TILES * WARPS;
    constexpr int THREADS = WARPS * 32;
    constexpr uint32_t TILE_BYTES = BLOCK_N * D * sizeof(T);
    extern __shared__ __align__(128) unsigned char shared[];
    const uint32_t q_tile = smem_address(shared);                 // (BLOCK_M, D)
    const uint32_t k_tiles = q_tile + BLOCK_M * D * sizeof(T);    // 2 x (BLOCK_N, D)
    const uint32_t v_tiles = k_tiles + 2 * TILE_BYTES;            // 2 x (BLOCK_N, D)

    const int batch = blockIdx.x / heads_q, head = blockIdx.x % heads_q, head_kv = head / group;
    // Query blocks in reverse: under a causal mask the last ones see the most keys, and starting
    // the longest blocks first leaves the short ones to fill the tail of the grid.
    const int m_block = CAUSAL ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
    const int first_row = m_block * BLOCK_M;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    q += batch * q_batch + head * q_head + first_row * q_row;
    k += batch * k_batch + head_kv * k_head;
    v += batch * v_batch + head_kv * v_head;

    // Keys this block may see: all, or up to the last row's causal limit.
    const int offset = seqlen_k - seqlen_q;  // bottom-right alignment
    int key_end = seqlen_k;
    if (CAUSAL) key_end = max(0, min(seqlen_k, first_row + BLOCK_M + offset));
    const int blocks = (key_end + BLOCK_N - 1) / BLOCK_N;
    // Blocks before this one need no mask for any row of the block (causal: wholly left of the
    // first row's limit, and wholly inside the keys).
    int unmasked_blocks = seqlen_k / BLOCK_N;
    if (CAUSAL) unmasked_blocks = min(unmasked_blocks, max(0, (first_row + offset + 1) / BLOCK_N));

    // One commit group per key block (its K and V), after Q's.
    load_tile_async<T, BLOCK_M, D, THREADS>(q_tile, q, q_row, seqlen_q - first_row);
    if (blocks > 0) {
        load_tile_async<T, BLOCK_N, D, THREADS>(k_tiles, k, k_row, key_end);
        load_tile_async<T, BLOCK_N, D, THREADS>(v_tiles, v, v_row, key_end);
    }
    commit_async();

    const int warp_row = warp * 16 * M_TILES;  // this warp's first row in the block
    int row_limit[M_TILES][2];
    for (int m = 0; m < M_TILES; ++m)
        for (int i = 0; i < 2; ++i) {
            const int row = first_row + warp_row + 16 * m + lane / 4 + 8 * i;
            row_limit[m][i] = CAUSAL ? min(row + offset, key_end - 1) : key_end - 1;
        }
    float o[M_TILES][D / 8][4] = {};
    float row_max[M_TILES][2], row_sum[M_TILES][2];
    for (int m = 0; m < M_TILES; ++m) row_max[m][0] = row_max[m][1] = neg_inf(), row_sum[m][0] = row_sum[m][1] = 0.f;

    // This thread's fragment addresses in the first stage; the second is TILE_BYTES further.
    const uint32_t q_base = a_operand_base<D>(q_tile, warp_row);
    const uint32_t k_base = b_operand_base<D>(k_tiles, 0);
    const uint32_t v_base = bt_operand_base<D>(v_tiles, 0);
    const T* k_next = k + BLOCK_N * k_row;  // the next block's first key and value
    const T* v_next = v + BLOCK_N * v_row;

    for (int j = 0; j < blocks; ++j) {
        const uint32_t stage = (j % 2) * TILE_BYTES, other = TILE_BYTES - stage;
        // Wait for this block's K and V, then start the next block's into the other stage (last
        // read in iteration j - 1, which ended with a barrier); it loads under this block's work.
        // Whole tiles skip the per-row bounds checks.
        wait_async<0>();
        __syncthreads();
        const int next_rows = key_end - (j + 1) * BLOCK_N;
        if (next_rows >= BLOCK_N) {
            load_tile_async<T, BLOCK_N, D, THREADS, false>(k_tiles + other, k_next, k_row);
            load_tile_async<T, BLOCK_N, D, THREADS, false>(v_tiles + other, v_next, v_row);
        } else if (next_rows > 0) {
            load_tile_async<T, BLOCK_N, D, THREADS>(k_tiles + other, k_next, k_row, next_rows);
            load_tile_async<T, BLOCK_N, D, THREADS>(v_tiles + other, v_next, v_row, next_rows);
        }
        commit_async();
        k_next += BLOCK_N * k_row;
        v_next += BLOCK_N * v_row;

        float s[M_TILES][BLOCK_N / 8][4];
        scores<T, D, BLOCK_N, M_TILES>(s, q_base, k_base + stage);
        if (j < unmasked_blocks) {
            softmax_step<BLOCK_N, D, M_TILES, false>(s, o, row_max, row_sum, scale_log2, j * BLOCK_N, row_limit);
        } else {
            softmax_step<BLOCK_N, D, M_TILES, true>(s, o, row_max, row_sum, scale_log2, j * BLOCK_N, row_limit);
        }
        accumulate_pv<T, BLOCK_N, D, M_TILES>(o, s, v_base + stage);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }

    // Normalise and write this thread's rows.
    for (int m = 0; m < M_TILES; ++m) {
        for (int i = 0; i < 2; ++i) {
            const int row = first_row + warp_row + 16 * m + lane / 4 + 8 * i;
            const float total = quad_sum(row_sum[m][i]);
            if (row >= seqlen_q) continue;
            const float inverse = total > 0.f ? 1.f / total : 0.f;
            T* dst = out + batch * o_batch + head * o_head + row * o_row + 2 * (lane % 4);
#pragma unroll
            for (int nt = 0; nt < D / 8; ++nt) {
                *reinterpret_cast<uint32_t*>(dst + nt * 8) =
                    pack2<T>(o[m][nt][2 * i] * inverse, o[m][nt][2 * i + 1] * inverse);
            }
            if (lane % 4 == 0) {
                lse[(static_cast<int64_t>(batch) * heads_q + head) * seqlen_q + row] =
                    total > 0.f ? (row_max[m][i] * scale_log2 + log2f(total)) * LN2 : neg_inf();
            }
        }
    }
}

}  // namespace fd
