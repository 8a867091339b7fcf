// Split-KV decoding (flash-decoding) for at most 16 queries per sequence against a long KV cache.
//
// The queries of one GQA group share their key/value head, so a block takes 16 packed rows
// (query i, query head h of the group: row = (h - first head) * Nq + i) of one (batch, KV head)
// and reads each key once for all of them. The keys are split across blocks (grid.x) so that a
// small batch still fills every SM; inside a block the warps split each shared-memory tile of
// keys (WARP_KEYS keys per warp), each warp keeping its own online softmax, and the warps' states
// are merged through shared memory at the end. K and V tiles stream through a STAGES-deep cp.async
// ring. With several splits each block writes its normalised partial output and LSE (float32),
// and the last split of a row block to finish combines them by LSE (split_counters, one int per
// (batch, KV head, row block), zero between launches, reset by the merging block); with one split
// the block writes the result directly.
//
// Grid: (splits, batch * KV heads, row blocks of 16).
#include "warp_attention.cuh"

namespace fd {

template <typename T, int D, int WARPS, int WARP_KEYS, int STAGES, bool SPLIT>
__global__ void __launch_bounds__(WARPS * 32)
flash_decode(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
             float* __restrict__ lse, float* __restrict__ partial_out, float* __restrict__ partial_lse,
             int* __restrict__ split_counters,
             int64_t q_batch, int64_t q_head, int64_t q_row,
             int64_t k_batch, int64_t k_head, int64_t k_row,
             int64_t v_batch, int64_t v_head, int64_t v_row,
             int64_t o_batch, int64_t o_head, int64_t o_row,
             int batch_size, int seqlen_q, int seqlen_k, int heads_kv, int group, int keys_per_split,
             bool causal, float scale_log2) {
    constexpr int BLOCK_N = WARP_KEYS * WARPS;  // keys per tile
    constexpr int THREADS = WARPS * 32;
    constexpr uint32_t Q_BYTES = 16 * D * sizeof(T), TILE_BYTES = BLOCK_N * D * sizeof(T);
    using QTile = SwizzledTile<D>;
    extern __shared__ __align__(128) unsigned char shared[];
    const uint32_t q_tile = smem_address(shared);              // (16, D)
    const uint32_t k_tiles = q_tile + Q_BYTES;                 // STAGES x (BLOCK_N, D)
    const uint32_t v_tiles = k_tiles + STAGES * TILE_BYTES;    // STAGES x (BLOCK_N, D)
    // The warps' states at the end (float32, over the rings): outputs, maxima, sums, weights, row LSEs.
    float* warp_out = reinterpret_cast<float*>(shared + Q_BYTES);  // (WARPS, 16, D)
    float* warp_max = warp_out + WARPS * 16 * D;  // (WARPS, 16)
    float* warp_sum = warp_max + WARPS * 16;      // (WARPS, 16)
    float* weights = warp_sum + WARPS * 16;       // (WARPS, 16)
    float* row_lses = weights + WARPS * 16;       // (16)

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int heads_q = heads_kv * group, packed_rows = seqlen_q * group;
    struct Item {  // this block's work
        int split, batch, head_kv, first_packed, key_begin, key_end;
    } it;
    it.split = blockIdx.x;
    it.batch = blockIdx.y / heads_kv;
    it.head_kv = blockIdx.y % heads_kv;
    it.first_packed = blockIdx.z * 16;
    it.key_begin = it.split * keys_per_split;
    it.key_end = min(seqlen_k, it.key_begin + keys_per_split);
    const int splits = gridDim.x;
    const int tiles = (it.key_end - it.key_begin + BLOCK_N - 1) / BLOCK_N;
    k += it.batch * k_batch + it.head_kv * k_head + static_cast<int64_t>(it.key_begin) * k_row;
    v += it.batch * v_batch + it.head_kv * v_head + static_cast<int64_t>(it.key_begin) * v_row;

    // Q: 16 packed rows gathered from their heads (rows past the group read as zeros).
    for (int c = threadIdx.x; c < 16 * QTile::CHUNKS; c += THREADS) {
        const int r = c / QTile::CHUNKS, chunk = c % QTile::CHUNKS, packed = it.first_packed + r;
        const bool valid = packed < packed_rows;
        const int head = it.head_kv * group + (valid ? packed / seqlen_q : 0), i = valid ? packed % seqlen_q : 0;
        copy16_async(q_tile + QTile::offset(r, chunk) * sizeof(T),
                     q + it.batch * q_batch + head * q_head + i * q_row + chunk * 8, valid);
    }
    commit_async();

    // Issue the loads of tile t into its stage (one commit group, empty past the last tile).
    auto load = [&](int t) {
        const int rows = it.key_end - it.key_begin - t * BLOCK_N;
        const uint32_t stage = (t % STAGES) * TILE_BYTES;
        if (rows >= BLOCK_N) {  // a whole tile: no per-row bounds checks
            load_tile_async<T, BLOCK_N, D, THREADS, false>(k_tiles + stage, k + t * BLOCK_N * k_row, k_row);
            load_tile_async<T, BLOCK_N, D, THREADS, false>(v_tiles + stage, v + t * BLOCK_N * v_row, v_row);
        } else if (rows > 0) {
            load_tile_async<T, BLOCK_N, D, THREADS>(k_tiles + stage, k + t * BLOCK_N * k_row, k_row, rows);
            load_tile_async<T, BLOCK_N, D, THREADS>(v_tiles + stage, v + t * BLOCK_N * v_row, v_row, rows);
        }
        commit_async();
    };

    // This thread's two rows: the last key each may see (split end, causal limit); keys up to
    // unmasked_limit are visible to every row, so only later ones need a mask.
    int row_limit[1][2];
    for (int i = 0; i < 2; ++i) {
        const int query = (it.first_packed + lane / 4 + 8 * i) % seqlen_q;
        row_limit[0][i] = causal ? min(it.key_end - 1, query + seqlen_k - seqlen_q) : it.key_end - 1;
    }
    const int unmasked_limit = min(it.key_end - 1, causal ? seqlen_k - seqlen_q : seqlen_k);
    float o[1][D / 8][4] = {};
    float row_max[1][2] = {{neg_inf(), neg_inf()}}, row_sum[1][2] = {{0.f, 0.f}};
    // This thread's fragment addresses: the block's 16 rows, this warp's keys of stage 0.
    const uint32_t q_base = a_operand_base<D>(q_tile, 0);
    const uint32_t k_base = b_operand_base<D>(k_tiles, warp * WARP_KEYS);
    const uint32_t v_base = bt_operand_base<D>(v_tiles, warp * WARP_KEYS);

#pragma unroll
    for (int t = 0; t < STAGES - 1; ++t) load(t);
    for (int t = 0; t < tiles; ++t) {
        // Refill the stage read in iteration t - 1 (which ended with a barrier), then wait for tile t.
        load(t + STAGES - 1);
        wait_async<STAGES - 1>();
        __syncthreads();
        const int first_key = it.key_begin + t * BLOCK_N + warp * WARP_KEYS;  // this warp's keys
        const uint32_t stage = (t % STAGES) * TILE_BYTES;
        float s[1][WARP_KEYS / 8][4];
        scores<T, D, WARP_KEYS, 1>(s, q_base, k_base + stage);
        if (first_key + WARP_KEYS - 1 <= unmasked_limit) {
            softmax_step<WARP_KEYS, D, 1, false>(s, o, row_max, row_sum, scale_log2, first_key, row_limit);
        } else {
            softmax_step<WARP_KEYS, D, 1, true>(s, o, row_max, row_sum, scale_log2, first_key, row_limit);
        }
        accumulate_pv<T, WARP_KEYS, D, 1>(o, s, v_base + stage);
        __syncthreads();  // every warp is done with this stage before it is refilled
    }
    wait_async<0>();
    __syncthreads();  // the rings' memory now takes the warps' states

    // Merge the warps: each writes its valid rows' max (log2 units), sum and unnormalised output;
    // one thread per row turns the maxima into weights (the row's 1 / sum folded in) and the
    // row's LSE; every output element is then a weighted sum.
    const int valid_rows = min(16, packed_rows - it.first_packed);
    for (int i = 0; i < 2; ++i) {
        const int r = lane / 4 + 8 * i;
        const float total = quad_sum(row_sum[0][i]);
        if (r >= valid_rows) continue;
        if (lane % 4 == 0) {
            warp_max[warp * 16 + r] = row_max[0][i] * scale_log2;
            warp_sum[warp * 16 + r] = total;
        }
#pragma unroll
        for (int nt = 0; nt < D / 8; ++nt) {
            const int col = nt * 8 + 2 * (lane % 4);
            *reinterpret_cast<float2*>(warp_out + (warp * 16 + r) * D + col) =
                make_float2(o[0][nt][2 * i], o[0][nt][2 * i + 1]);
        }
    }
    __syncthreads();
    if (threadIdx.x < valid_rows) {
        const int r = threadIdx.x;
        float top = neg_inf();
        for (int u = 0; u < WARPS; ++u) top = fmaxf(top, warp_max[u * 16 + r]);
        const float shift = top == neg_inf() ? 0.f : top;
        float total = 0.f;
        for (int u = 0; u < WARPS; ++u) total += fast_exp2(warp_max[u * 16 + r] - shift) * warp_sum[u * 16 + r];
        const float inverse = total > 0.f ? 1.f / total : 0.f;
        for (int u = 0; u < WARPS; ++u) weights[u * 16 + r] = fast_exp2(warp_max[u * 16 + r] - shift) * inverse;
        row_lses[r] = total > 0.f ? (shift + log2f(total)) * LN2 : neg_inf();
    }
    __syncthreads();
    const int64_t rows = static_cast<int64_t>(batch_size) * heads_q * seqlen_q;
    for (int e = threadIdx.x; e < valid_rows * D; e += THREADS) {
        const int r = e / D, col = e % D, packed = it.first_packed + r;
        float value = 0.f;
#pragma unroll
        for (int u = 0; u < WARPS; ++u) value += weights[u * 16 + r] * warp_out[(u * 16 + r) * D + col];
        const int head = it.head_kv * group + packed / seqlen_q, query = packed % seqlen_q;
        const int64_t row = (static_cast<int64_t>(it.batch) * heads_q + head) * seqlen_q + query;
        if (SPLIT) {
            partial_out[(it.split * rows + row) * D + col] = value;
            if (col == 0) partial_lse[it.split * rows + row] = row_lses[r];
        } else {
            out[it.batch * o_batch + head * o_head + query * o_row + col] = static_cast<T>(value);
            if (col == 0) lse[row] = row_lses[r];
        }
    }
    if (SPLIT) {
        // The last split of these rows to finish merges every split's partial result:
        // each publishes its partials, then counts itself in; the one that brings the
        // count to `splits` reads them all back and resets the counter.
        __threadfence();
        __syncthreads();  // every thread's partials are visible before the block counts itself in
        int last = 0;
        if (threadIdx.x == 0) {
            int* counter = split_counters + blockIdx.y * gridDim.z + blockIdx.z;
            last = atomicAdd(counter, 1) == splits - 1;
            if (last) *counter = 0;
        }
        if (__syncthreads_or(last)) {
            __threadfence();
            for (int e = threadIdx.x; e < valid_rows * D; e += THREADS) {
                const int r = e / D, col = e % D, packed = it.first_packed + r;
                const int head = it.head_kv * group + packed / seqlen_q, query = packed % seqlen_q;
                const int64_t row = (static_cast<int64_t>(it.batch) * heads_q + head) * seqlen_q + query;
                // out = sum_s w_s out_s / sum_s w_s with w_s = exp(lse_s - max lse); rows no
                // split saw get 0 and -inf. Branch-free unrolled loops, so the loads overlap.
                float top = neg_inf();
#pragma unroll 4
                for (int sp = 0; sp < splits; ++sp) top = fmaxf(top, __ldcg(partial_lse + sp * rows + row));
                const float shift = top == neg_inf() ? 0.f : top;
                float total = 0.f, acc = 0.f;
#pragma unroll 4
                for (int sp = 0; sp < splits; ++sp) {
                    const float weight = __expf(__ldcg(partial_lse + sp * rows + row) - shift);
                    total += weight;
                    acc += weight * __ldcg(partial_out + (sp * rows + row) * D + col);
                }
                out[it.batch * o_batch + head * o_head + query * o_row + col] =
                    static_cast<T>(total > 0.f ? acc / total : 0.f);
                if (col == 0) lse[row] = total > 0.f ? shift + __logf(total) : neg_inf();
            }
        }
    }
}

}  // namespace fd
