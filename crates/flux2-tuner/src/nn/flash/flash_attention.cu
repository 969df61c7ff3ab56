// Fused attention softmax(q k^T * scale) v without mask, forward and backward, in the style of
// FlashAttention-2: bf16 inputs, f32 accumulation on bf16 tensor cores (WMMA 16x16x16), online
// softmax, the per-row logsumexp saved by the forward and used by the backward to recompute the
// probabilities. Mirrored step by step on the CPU by `tiled.rs` (same tiles, same update order,
// same bf16 rounding of P and dS), which the CPU tests check against the composed attention.
//
// Every operand of a tile product lives in shared memory (also the f32 accumulators), and the
// products go through one helper (`tile_product`): simple and checkable, at the price of shared
// memory traffic that a register-resident FA2 kernel avoids.
//
// Layouts: q, k, v, dO are [b, h, l, d] with arbitrary element strides for b, h, l and unit stride
// in d; out is written as [b, l, h, d] (what the DiT needs next, so no transpose); logsumexp,
// delta are [b * h, l] f32; the backward writes dq (accumulated atomically), dk, dv as f32
// [b * h, l, d]. The head dim d is padded with zeros to DP (16, 32, 64 or 128).

#include <cuda_bf16.h>
#include <mma.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

#define WARPS 4
#define THREADS (WARPS * 32)
#define FORWARD_BLOCK_Q 64
#define FORWARD_BLOCK_K 64
#define BACKWARD_BLOCK_Q 32
#define BACKWARD_BLOCK_K 32
// Row paddings: keep every 16x16 tile 32-byte aligned (WMMA) and spread shared-memory banks.
#define PAD_BF16 8
#define PAD_F32 4

// Carves 128-byte aligned buffers out of dynamic shared memory (sizes as in cuda.rs).
struct SharedCarver {
    char *next;
    __device__ explicit SharedCarver(char *base) : next(base) {}
    template <typename T> __device__ T *take(int count) {
        T *result = reinterpret_cast<T *>(next);
        next += ((count * (int)sizeof(T) + 127) / 128) * 128;
        return result;
    }
};

template <typename Layout> struct IsRowMajor;
template <> struct IsRowMajor<wmma::row_major> { static const bool value = true; };
template <> struct IsRowMajor<wmma::col_major> { static const bool value = false; };

// c[M x N] (f32, row-major, ldc) = (accumulate ? c : 0) + a[M x K] * b[K x N], with a and b bf16
// in shared memory. A row-major a has element (m, k) at a[m * lda + k], a column-major one at
// a[k * lda + m] (so a row-major matrix read column-major is its transpose); same for b.
// The warps share the 16x16 output tiles. Callers synchronise before and after.
template <int M, int N, int K, typename LayoutA, typename LayoutB>
__device__ void tile_product(const bf16 *a, int lda, const bf16 *b, int ldb, float *c, int ldc,
                             bool accumulate) {
    const int warp = threadIdx.x / 32;
    const int tiles_n = N / 16;
    for (int tile = warp; tile < (M / 16) * tiles_n; tile += WARPS) {
        const int tm = tile / tiles_n, tn = tile % tiles_n;
        float *c_tile = c + tm * 16 * ldc + tn * 16;
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) {
            wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
        } else {
            wmma::fill_fragment(acc, 0.0f);
        }
#pragma unroll
        for (int kk = 0; kk < K / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, LayoutA> fa;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, LayoutB> fb;
            const bf16 *a_tile = IsRowMajor<LayoutA>::value ? a + tm * 16 * lda + kk * 16
                                                            : a + kk * 16 * lda + tm * 16;
            const bf16 *b_tile = IsRowMajor<LayoutB>::value ? b + kk * 16 * ldb + tn * 16
                                                            : b + tn * 16 * ldb + kk * 16;
            wmma::load_matrix_sync(fa, a_tile, lda);
            wmma::load_matrix_sync(fb, b_tile, ldb);
            wmma::mma_sync(acc, fa, fb, acc);
        }
        wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
    }
}

// Rows [start, start + ROWS) of one head of a strided [b, h, l, d] tensor into shared memory as
// [ROWS][DP + PAD_BF16], zeros past `length` and past `head_dim`.
template <int ROWS, int DP>
__device__ void load_rows(bf16 *dst, const bf16 *src, long long row_stride, int start, int length,
                          int head_dim) {
    const bf16 zero = __float2bfloat16(0.0f);
    for (int index = threadIdx.x; index < ROWS * DP; index += THREADS) {
        const int r = index / DP, j = index % DP;
        const int row = start + r;
        dst[r * (DP + PAD_BF16) + j] =
            (row < length && j < head_dim) ? src[row * row_stride + j] : zero;
    }
}

__device__ float warp_max(float value) {
    for (int offset = 16; offset > 0; offset /= 2)
        value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}

__device__ float warp_sum(float value) {
    for (int offset = 16; offset > 0; offset /= 2)
        value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}

// Grid: (query tiles, b * h). One thread block owns FORWARD_BLOCK_Q query rows of one head and
// walks all keys in tiles of FORWARD_BLOCK_K.
template <int DP>
__device__ void forward(const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *logsumexp,
                        int heads, int queries, int keys, int head_dim, float scale,
                        long long q_batch, long long q_head, long long q_row, long long k_batch,
                        long long k_head, long long k_row, long long v_batch, long long v_head,
                        long long v_row) {
    const int BQ = FORWARD_BLOCK_Q, BK = FORWARD_BLOCK_K;
    const int LD = DP + PAD_BF16, LDS = BK + PAD_F32, LDP = BK + PAD_BF16, LDO = DP + PAD_F32;
    extern __shared__ __align__(128) char shared[];
    SharedCarver carver(shared);
    bf16 *q_tile = carver.take<bf16>(BQ * LD);
    bf16 *k_tile = carver.take<bf16>(BK * LD);
    bf16 *v_tile = carver.take<bf16>(BK * LD);
    float *scores = carver.take<float>(BQ * LDS);
    bf16 *probabilities = carver.take<bf16>(BQ * LDP);
    float *accumulator = carver.take<float>(BQ * LDO);
    float *row_max = carver.take<float>(BQ);
    float *row_sum = carver.take<float>(BQ);

    const int bh = blockIdx.y, batch = bh / heads, head = bh % heads;
    const int q_start = blockIdx.x * BQ;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    q += batch * q_batch + head * q_head;
    k += batch * k_batch + head * k_head;
    v += batch * v_batch + head * v_head;

    load_rows<BQ, DP>(q_tile, q, q_row, q_start, queries, head_dim);
    for (int index = threadIdx.x; index < BQ * LDO; index += THREADS) accumulator[index] = 0.0f;
    for (int r = threadIdx.x; r < BQ; r += THREADS) {
        row_max[r] = -INFINITY;
        row_sum[r] = 0.0f;
    }
    for (int k_start = 0; k_start < keys; k_start += BK) {
        __syncthreads();  // the previous tile's products are done with k_tile, v_tile
        load_rows<BK, DP>(k_tile, k, k_row, k_start, keys, head_dim);
        load_rows<BK, DP>(v_tile, v, v_row, k_start, keys, head_dim);
        __syncthreads();
        // S = Q K^T (K row-major [BK][LD] read column-major is K^T).
        tile_product<BQ, BK, DP, wmma::row_major, wmma::col_major>(q_tile, LD, k_tile, LD, scores,
                                                                   LDS, false);
        __syncthreads();
        // Online softmax, one warp per row: new maximum, correction of the old sums and of the
        // accumulator, probabilities (the sum in f32, the product with V in bf16).
        for (int r = warp; r < BQ; r += WARPS) {
            float *s = scores + r * LDS;
            float block_max = -INFINITY;
            for (int c = lane; c < BK; c += 32) {
                const float value = (k_start + c < keys) ? s[c] * scale : -INFINITY;
                s[c] = value;
                block_max = fmaxf(block_max, value);
            }
            block_max = warp_max(block_max);
            const float old_max = row_max[r];
            const float new_max = fmaxf(old_max, block_max);
            const float correction = expf(old_max - new_max);
            float block_sum = 0.0f;
            for (int c = lane; c < BK; c += 32) {
                const float p = expf(s[c] - new_max);
                block_sum += p;
                probabilities[r * LDP + c] = __float2bfloat16(p);
            }
            block_sum = warp_sum(block_sum);
            for (int j = lane; j < DP; j += 32) accumulator[r * LDO + j] *= correction;
            __syncwarp();
            if (lane == 0) {
                row_sum[r] = row_sum[r] * correction + block_sum;
                row_max[r] = new_max;
            }
        }
        __syncthreads();
        // O += P V.
        tile_product<BQ, DP, BK, wmma::row_major, wmma::row_major>(probabilities, LDP, v_tile, LD,
                                                                   accumulator, LDO, true);
    }
    __syncthreads();
    for (int index = threadIdx.x; index < BQ * DP; index += THREADS) {
        const int r = index / DP, j = index % DP;
        const int row = q_start + r;
        if (row < queries && j < head_dim) {
            const long long at = (((long long)batch * queries + row) * heads + head) * head_dim + j;
            out[at] = __float2bfloat16(accumulator[r * LDO + j] / row_sum[r]);
        }
    }
    for (int r = threadIdx.x; r < BQ; r += THREADS) {
        const int row = q_start + r;
        if (row < queries) logsumexp[(long long)bh * queries + row] = row_max[r] + logf(row_sum[r]);
    }
}

// Grid: (key tiles, b * h). One thread block owns BACKWARD_BLOCK_K key rows of one head,
// accumulates their dK, dV over all query tiles and adds each query tile's dQ share atomically.
template <int DP>
__device__ void backward(const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *grad_out,
                         const float *logsumexp, const float *delta, float *q_grad, float *k_grad,
                         float *v_grad, int heads, int queries, int keys, int head_dim,
                         float scale, long long q_batch, long long q_head, long long q_row,
                         long long k_batch, long long k_head, long long k_row, long long v_batch,
                         long long v_head, long long v_row, long long g_batch, long long g_head,
                         long long g_row) {
    const int BQ = BACKWARD_BLOCK_Q, BK = BACKWARD_BLOCK_K;
    const int LD = DP + PAD_BF16, LDF = DP + PAD_F32, LDS = BK + PAD_F32, LDP = BK + PAD_BF16;
    extern __shared__ __align__(128) char shared[];
    SharedCarver carver(shared);
    bf16 *k_tile = carver.take<bf16>(BK * LD);
    bf16 *v_tile = carver.take<bf16>(BK * LD);
    float *k_acc = carver.take<float>(BK * LDF);
    float *v_acc = carver.take<float>(BK * LDF);
    bf16 *q_tile = carver.take<bf16>(BQ * LD);
    bf16 *g_tile = carver.take<bf16>(BQ * LD);
    float *scores = carver.take<float>(BQ * LDS);
    float *p_grad = carver.take<float>(BQ * LDS);
    bf16 *probabilities = carver.take<bf16>(BQ * LDP);
    bf16 *s_grad = carver.take<bf16>(BQ * LDP);
    float *q_part = carver.take<float>(BQ * LDF);
    float *row_lse = carver.take<float>(BQ);
    float *row_delta = carver.take<float>(BQ);

    const int bh = blockIdx.y, batch = bh / heads, head = bh % heads;
    const int k_start = blockIdx.x * BK;
    q += batch * q_batch + head * q_head;
    k += batch * k_batch + head * k_head;
    v += batch * v_batch + head * v_head;
    grad_out += batch * g_batch + head * g_head;
    logsumexp += (long long)bh * queries;
    delta += (long long)bh * queries;
    q_grad += (long long)bh * queries * head_dim;
    k_grad += (long long)bh * keys * head_dim;
    v_grad += (long long)bh * keys * head_dim;

    load_rows<BK, DP>(k_tile, k, k_row, k_start, keys, head_dim);
    load_rows<BK, DP>(v_tile, v, v_row, k_start, keys, head_dim);
    for (int index = threadIdx.x; index < BK * LDF; index += THREADS) {
        k_acc[index] = 0.0f;
        v_acc[index] = 0.0f;
    }
    for (int q_start = 0; q_start < queries; q_start += BQ) {
        __syncthreads();  // the previous query tile is done with q_tile, g_tile, q_part
        load_rows<BQ, DP>(q_tile, q, q_row, q_start, queries, head_dim);
        load_rows<BQ, DP>(g_tile, grad_out, g_row, q_start, queries, head_dim);
        for (int r = threadIdx.x; r < BQ; r += THREADS) {
            const int row = q_start + r;
            // An infinite logsumexp makes the padding rows' probabilities zero.
            row_lse[r] = row < queries ? logsumexp[row] : INFINITY;
            row_delta[r] = row < queries ? delta[row] : 0.0f;
        }
        __syncthreads();
        // S = Q K^T, dP = dO V^T.
        tile_product<BQ, BK, DP, wmma::row_major, wmma::col_major>(q_tile, LD, k_tile, LD, scores,
                                                                   LDS, false);
        tile_product<BQ, BK, DP, wmma::row_major, wmma::col_major>(g_tile, LD, v_tile, LD, p_grad,
                                                                   LDS, false);
        __syncthreads();
        // P = exp(S scale - lse), dS = P (dP - delta), both rounded to bf16 for the products.
        for (int index = threadIdx.x; index < BQ * BK; index += THREADS) {
            const int r = index / BK, c = index % BK;
            const float p =
                (k_start + c < keys) ? expf(scores[r * LDS + c] * scale - row_lse[r]) : 0.0f;
            probabilities[r * LDP + c] = __float2bfloat16(p);
            s_grad[r * LDP + c] = __float2bfloat16(p * (p_grad[r * LDS + c] - row_delta[r]));
        }
        __syncthreads();
        // dV += P^T dO, dK += dS^T Q (P, dS row-major [BQ][BK] read column-major are P^T, dS^T),
        // dQ share = dS K.
        tile_product<BK, DP, BQ, wmma::col_major, wmma::row_major>(probabilities, LDP, g_tile, LD,
                                                                   v_acc, LDF, true);
        tile_product<BK, DP, BQ, wmma::col_major, wmma::row_major>(s_grad, LDP, q_tile, LD, k_acc,
                                                                   LDF, true);
        tile_product<BQ, DP, BK, wmma::row_major, wmma::row_major>(s_grad, LDP, k_tile, LD, q_part,
                                                                   LDF, false);
        __syncthreads();
        for (int index = threadIdx.x; index < BQ * DP; index += THREADS) {
            const int r = index / DP, j = index % DP;
            const int row = q_start + r;
            if (row < queries && j < head_dim)
                atomicAdd(q_grad + (long long)row * head_dim + j, q_part[r * LDF + j] * scale);
        }
    }
    __syncthreads();
    for (int index = threadIdx.x; index < BK * DP; index += THREADS) {
        const int c = index / DP, j = index % DP;
        const int key = k_start + c;
        if (key < keys && j < head_dim) {
            k_grad[(long long)key * head_dim + j] = k_acc[c * LDF + j] * scale;
            v_grad[(long long)key * head_dim + j] = v_acc[c * LDF + j];
        }
    }
}

#define FORWARD_KERNEL(DP)                                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_forward_##DP(                     \
        const bf16 *q, const bf16 *k, const bf16 *v, bf16 *out, float *logsumexp, int heads,      \
        int queries, int keys, int head_dim, float scale, long long q_batch, long long q_head,    \
        long long q_row, long long k_batch, long long k_head, long long k_row, long long v_batch, \
        long long v_head, long long v_row) {                                                      \
        forward<DP>(q, k, v, out, logsumexp, heads, queries, keys, head_dim, scale, q_batch,      \
                    q_head, q_row, k_batch, k_head, k_row, v_batch, v_head, v_row);               \
    }

#define BACKWARD_KERNEL(DP)                                                                        \
    extern "C" __global__ void __launch_bounds__(THREADS) flash_backward_##DP(                    \
        const bf16 *q, const bf16 *k, const bf16 *v, const bf16 *grad_out,                        \
        const float *logsumexp, const float *delta, float *q_grad, float *k_grad, float *v_grad,  \
        int heads, int queries, int keys, int head_dim, float scale, long long q_batch,           \
        long long q_head, long long q_row, long long k_batch, long long k_head, long long k_row,   \
        long long v_batch, long long v_head, long long v_row, long long g_batch,                  \
        long long g_head, long long g_row) {                                                      \
        backward<DP>(q, k, v, grad_out, logsumexp, delta, q_grad, k_grad, v_grad, heads, queries, \
                     keys, head_dim, scale, q_batch, q_head, q_row, k_batch, k_head, k_row,       \
                     v_batch, v_head, v_row, g_batch, g_head, g_row);                             \
    }

FORWARD_KERNEL(16)
FORWARD_KERNEL(32)
FORWARD_KERNEL(64)
FORWARD_KERNEL(128)
BACKWARD_KERNEL(16)
BACKWARD_KERNEL(32)
BACKWARD_KERNEL(64)
BACKWARD_KERNEL(128)
