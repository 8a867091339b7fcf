// Split-KV decoding (flash-decoding) for at most 16 queries per sequence against a long KV cache.
//
// The queries of one GQA group share their key/value head, so a block takes 16 packed rows
// (query i, query head h of the group: row = (h - first head) * Nq + i) of one (batch, KV head)
// and reads each key once for all of them. The keys are split across blocks (grid.x) so that a
// small batch still fills every SM; inside a block the warps split each shared-memory tile of
// keys (WARP_KEYS keys per warp), each warp keeping its own online softmax, and the warps' states
// are merged through shared memory at the end. K and V tiles stream through a STAGES-deep cp.async
// ring. With several splits each block writes its normalised partial output and LSE (float32),
// and `merge_splits` combines them by LSE; with one split the block writes the result directly.
//
// Grid: (splits, batch * KV heads, row blocks of 16).
#include "warp_attention.cuh"

namespace fd {

template <typename T, int D, int WARPS, int WARP_KEYS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(WARPS * 32)
flash_decode(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
             float* __restrict__ lse, float* __restrict__ partial_out, float* __restrict__ partial_lse,
             int64_t q_batch, int64_t q_head, int64_t q_row,
             int64_t k_batch, int64_t k_head, int64_t k_row,
             int64_t v_batch, int64_t v_head, int64_t v_row,
             int64_t o_batch, int64_t o_head, int64_t o_row,
             int batch_size, int seqlen_q, int seqlen_k, int heads_kv, int group, int keys_per_split,
             bool causal, float scale_log2) {
    constexpr int BLOCK_N = WARP_KEYS * WARPS;  // keys per tile
    constexpr int THREADS = WARPS * 32;
    constexpr uint32_t TILE_BYTES = BLOCK_N * D * sizeof(T);
    extern __shared__ __align__(128) unsigned char shared[];
    const uint32_t q_tile = smem_address(shared);              // (16, D)
    const uint32_t k_tiles = q_tile + 16 * D * sizeof(T);      // STAGES x (BLOCK_N, D)
    const uint32_t v_tiles = k_tiles + STAGES * TILE_BYTES;    // STAGES x (BLOCK_N, D)

    const int split = blockIdx.x, batch = blockIdx.y / heads_kv, head_kv = blockIdx.y % heads_kv;
    const int first_packed = blockIdx.z * 16;
    const int packed_rows = seqlen_q * group;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int heads_q = heads_kv * group;

    // Q: 16 packed rows gathered from their heads (rows past the group read as zeros).
    using QTile = SwizzledTile<D>;
    for (int c = threadIdx.x; c < 16 * QTile::CHUNKS; c += THREADS) {
        const int r = c / QTile::CHUNKS, chunk = c % QTile::CHUNKS, packed = first_packed + r;
        const bool valid = packed < packed_rows;
        const int head = head_kv * group + (valid ? packed / seqlen_q : 0), i = valid ? packed % seqlen_q : 0;
        copy16_async(q_tile + QTile::offset(r, chunk) * sizeof(T),
                     q + batch * q_batch + head * q_head + i * q_row + chunk * 8, valid);
    }
    commit_async();

    const int key_begin = split * keys_per_split;
    const int key_end = min(seqlen_k, key_begin + keys_per_split);
    const int tiles = max(0, (key_end - key_begin + BLOCK_N - 1) / BLOCK_N);
    k += batch * k_batch + head_kv * k_head + static_cast<int64_t>(key_begin) * k_row;
    v += batch * v_batch + head_kv * v_head + static_cast<int64_t>(key_begin) * v_row;
    // Prologue: the first STAGES - 1 tiles, one commit group each (empty past the last tile).
#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) {
        if (t < tiles) {
            load_tile_async<T, BLOCK_N, D, THREADS>(k_tiles + t * TILE_BYTES, k + t * BLOCK_N * k_row, k_row,
                                                    key_end - key_begin - t * BLOCK_N);
            load_tile_async<T, BLOCK_N, D, THREADS>(v_tiles + t * TILE_BYTES, v + t * BLOCK_N * v_row, v_row,
                                                    key_end - key_begin - t * BLOCK_N);
        }
        commit_async();
    }

    // This thread's two rows: the last key each may see (split end, causal limit).
    int row_limit[1][2];
    for (int i = 0; i < 2; ++i) {
        const int packed = first_packed + lane / 4 + 8 * i;
        const int query = packed % seqlen_q;
        row_limit[0][i] = key_end - 1;
        if (causal) row_limit[0][i] = min(row_limit[0][i], query + seqlen_k - seqlen_q);
    }
    float o[1][D / 8][4] = {};
    // This thread's fragment addresses: the block's 16 rows, this warp's keys of stage 0.
    const uint32_t q_base = a_operand_base<D>(q_tile, 0);
    const uint32_t k_base = b_operand_base<D>(k_tiles, warp * WARP_KEYS);
    const uint32_t v_base = bt_operand_base<D>(v_tiles, warp * WARP_KEYS);
    float row_max[1][2] = {{neg_inf(), neg_inf()}}, row_sum[1][2] = {{0.f, 0.f}};

    for (int t = 0; t < tiles; ++t) {
        // Refill the stage read in iteration t - 1 (which ended with a barrier) with tile
        // t + STAGES - 1, then wait for tile t.
        const int ahead = t + STAGES - 1;
        if (ahead < tiles) {
            const int stage = ahead % STAGES;
            load_tile_async<T, BLOCK_N, D, THREADS>(k_tiles + stage * TILE_BYTES, k + ahead * BLOCK_N * k_row, k_row,
                                                    key_end - key_begin - ahead * BLOCK_N);
            load_tile_async<T, BLOCK_N, D, THREADS>(v_tiles + stage * TILE_BYTES, v + ahead * BLOCK_N * v_row, v_row,
                                                    key_end - key_begin - ahead * BLOCK_N);
        }
        commit_async();
        wait_async<STAGES - 1>();
        __syncthreads();

        const int stage = t % STAGES;
        const int first_key = key_begin + t * BLOCK_N + warp * WARP_KEYS;  // this warp's keys
        float s[1][WARP_KEYS / 8][4];
        scores<T, D, WARP_KEYS, 1>(s, q_base, k_base + stage * TILE_BYTES);
        softmax_step<WARP_KEYS, D, 1, true>(s, o, row_max, row_sum, scale_log2, first_key, row_limit);
        accumulate_pv<T, WARP_KEYS, D, 1>(o, s, v_base + stage * TILE_BYTES);
        __syncthreads();
    }
    wait_async<0>();
    __syncthreads();  // the tiles' memory now holds the warps' states

    // Merge the warps: each writes its rows' max, sum and unnormalised output to shared memory.
    float* warp_out = reinterpret_cast<float*>(shared + 16 * D * sizeof(T));  // (WARPS, 16, D), over the rings
    float* warp_max = warp_out + WARPS * 16 * D;           // (WARPS, 16)
    float* warp_sum = warp_max + WARPS * 16;               // (WARPS, 16)
    for (int i = 0; i < 2; ++i) {
        const int r = lane / 4 + 8 * i;
        const float total = quad_sum(row_sum[0][i]);
        if (lane % 4 == 0) {
            warp_max[warp * 16 + r] = row_max[0][i] * scale_log2;  // log2 units, as the merge below uses
            warp_sum[warp * 16 + r] = total;
        }
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            const int col = nt * 8 + 2 * (lane % 4);
            warp_out[(warp * 16 + r) * D + col] = o[0][nt][2 * i];
            warp_out[(warp * 16 + r) * D + col + 1] = o[0][nt][2 * i + 1];
        }
    }
    __syncthreads();

    for (int e = threadIdx.x; e < 16 * D; e += THREADS) {
        const int r = e / D, col = e % D, packed = first_packed + r;
        if (packed >= packed_rows) continue;
        float top = neg_inf();
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, warp_max[w * 16 + r]);
        const float shift = top == neg_inf() ? 0.f : top;
        float total = 0.f, acc = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            const float weight = fast_exp2(warp_max[w * 16 + r] - shift);
            total += weight * warp_sum[w * 16 + r];
            acc += weight * warp_out[(w * 16 + r) * D + col];
        }
        const float value = total > 0.f ? acc / total : 0.f;
        const float row_lse = total > 0.f ? (shift + log2f(total)) * LN2 : neg_inf();
        const int head = head_kv * group + packed / seqlen_q, query = packed % seqlen_q;
        const int64_t lse_index = (static_cast<int64_t>(batch) * heads_q + head) * seqlen_q + query;
        if (SPLIT) {
            const int64_t rows = static_cast<int64_t>(batch_size) * heads_q * seqlen_q;
            partial_out[(split * rows + lse_index) * D + col] = value;
            if (col == 0) partial_lse[split * rows + lse_index] = row_lse;
        } else {
            out[batch * o_batch + head * o_head + query * o_row + col] = static_cast<T>(value);
            if (col == 0) lse[lse_index] = row_lse;
        }
    }
}

// Combine the splits' partial results of one row (block = D threads, grid = B * Hq * Nq rows):
// out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse). Rows no split saw get 0, -inf.
template <typename T, int D>
__global__ void __launch_bounds__(D)
merge_splits(const float* __restrict__ partial_out, const float* __restrict__ partial_lse, T* __restrict__ out,
             float* __restrict__ lse, int64_t o_batch, int64_t o_head, int64_t o_row, int splits, int heads_q,
             int seqlen_q, int64_t rows) {
    const int64_t row = blockIdx.x;
    const int col = threadIdx.x;
    float top = neg_inf();
    for (int s = 0; s < splits; ++s) top = fmaxf(top, partial_lse[s * rows + row]);
    const float shift = top == neg_inf() ? 0.f : top;
    float total = 0.f, acc = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float weight = __expf(partial_lse[s * rows + row] - shift);
        total += weight;
        acc += weight * partial_out[(s * rows + row) * D + col];
    }
    const int query = row % seqlen_q, head = (row / seqlen_q) % heads_q, batch = row / (seqlen_q * heads_q);
    out[batch * o_batch + head * o_head + query * o_row + col] = static_cast<T>(total > 0.f ? acc / total : 0.f);
    if (col == 0) lse[row] = total > 0.f ? shift + __logf(total) : neg_inf();
}

}  // namespace fd
