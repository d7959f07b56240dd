// The batched updater's CPU kernels (seal/multilora.py), compiled once per checkout (seal/kernels/__init__.py):
// - lora_linear: a frozen linear layer plus LoRA adapters on runs of its input's rows, as one autograd node;
// - lora_linear_stacked: a decoding step's rows through their adapters stacked side by side, without gradients;
// - token_losses: next-token cross-entropy through the frozen output projection, and its gradient;
// - swiglu: silu(gate) * up in bf16 and its backward, one pass over the activations each way (AVX-512);
// - packed_attention: rotary embedding and attention of a packed training pass in bf16, one node (AVX-512);
// - rms_norm: Llama's RMSNorm of float32 rows handed on in bf16, one pass each way (AVX-512);
// - decode_layer: a Llama decoder layer for a prompt or a decoding step, each row its own adapters (bf16, AVX-512).
// - transposed_copy: a bf16 frozen weight transposed on all threads, for the backward's layout (AVX-512).
//
// lora_linear
//
// seal.multilora.MultiLoraLinear computes, for each run of consecutive rows routed to one adapter slot,
//     out = x W^T (+ bias) + scaling * (x A^T) B^T
// With PyTorch's own operations that is about a dozen autograd nodes, casts and views per layer and pass, each
// with its dispatch and Python overhead; on a CPU, at the few tokens of SEAL's one-sequence steps, that
// overhead costs more than the arithmetic. Here the forward and its backward are written out once in C++:
// one node per layer, and the backward runs without Python's lock, so lanes (threads) do not wait on it.
//
// Arithmetic in the compute dtype of `weight` (bf16 under autocast, float32 otherwise), as autocast has it:
// - the frozen product x W^T, through oneDNN's packed weight when `frozen` holds one;
// - each run's adapter products, with A and (scaling B) cast to the compute dtype, the second one added to
//   the frozen product inside the matrix product (addmm_): no scaled copy of the output, no separate sum
//   (with the frozen weight laid out by laid_weight, inside its tiles, before the one rounding: Fold);
// - gradients for x (if needed; its terms summed in the compute dtype, then cast once) and for each run's A
//   and B (float32, the adapters' dtype); none for W.
// In bf16, where oneDNN's micro-kernel is offered (AMX) or the CPU has AVX-512 BF16, each run's six adapter
// products go through it (or a kernel of our own) instead of at::mm (see "Adapter products through oneDNN's
// micro-kernel" below).
// `frozen` holds [W, bias], [W, bias, W packed] (a forward only: decoding, scoring) or [W, bias, W packed,
// W^T packed].
// On memory-bound CPUs every pass over an activation costs about as much as a small product, so the scaling
// goes on the adapters' small matrices rather than on [tokens, features] tensors.
// Without packed weights the results equal PyTorch's autograd of the same operations: in float32 bit for bit
// (a scaling of 2, LoRA's usual alpha = 2 rank, is exact), in bf16 within one rounding (tests/test_kernels.py).
#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>
#if __has_include(<ATen/native/CPUBlas.h>)
#include <ATen/native/CPUBlas.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#if defined(__x86_64__)
#include <immintrin.h>
extern "C" __m512 Sleef_expf16_u10(__m512);  // the vectorised exp libtorch_cpu exports (ATen's own)
#endif

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// AVX-512 helpers: bf16 to float32 and back, 16 at a time.

bool avx512_available() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

#if defined(__x86_64__)
#define SEAL_AVX512 __attribute__((target("avx512f,avx512bw")))

SEAL_AVX512 inline __m512 widen(const c10::BFloat16* p) {
  auto half = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

SEAL_AVX512 inline __m512 widen(const c10::BFloat16* p, __mmask16 m) {  // the lanes of m from p; zeros elsewhere
  const auto half = _mm512_castsi512_si256(_mm512_maskz_loadu_epi16(static_cast<__mmask32>(m), p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

// The bf16 bits of 16 float32 values, rounded to nearest even (a NaN stays a NaN), in the low half of each
// 32-bit lane.
SEAL_AVX512 inline __m512i bf16_bits(__m512 v) {
  auto bits = _mm512_castps_si512(v);
  auto odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  auto rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_srli_epi32(rounded, 16);
}

SEAL_AVX512 inline void narrow(c10::BFloat16* p, __m512 v) {  // 16 float32 values to bf16 at p
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}

SEAL_AVX512 inline __mmask16 lanes_left(int64_t left) {  // the first min(left, 16) lanes
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}
#endif

at::Tensor own_product(const at::Tensor& x, const at::Tensor& laid, const c10::optional<at::Tensor>& added = {});

// x times a frozen weight laid out once: by oneDNN (a 2-D tensor) or by laid_weight (1-D, no bias).
at::Tensor packed_product(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  if (packed.dim() == 1) {
    TORCH_CHECK(!bias, "a weight laid out by laid_weight is multiplied without a bias");
    return own_product(x, packed);
  }
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                                         c10::string_view, c10::List<c10::optional<at::Scalar>>,
                                         c10::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", c10::List<c10::optional<at::Scalar>>(), c10::nullopt);
}

// Adapter products through oneDNN's micro-kernel
//
// A run's adapter products are small ([tokens, 576] x [576, 32], [tokens, 32] x [32, 1536], and their
// gradients), and through at::mm a bf16 product of those sizes costs about 30 us on an AMX Xeon whatever its
// size: the oneDNN primitive around it, not the arithmetic. With the casts of A and B to bf16 and of their
// gradients back, a run of 42 tokens cost 400-500 us a layer of q's sizes, forward and backward. Where PyTorch
// exposes oneDNN's batch-reduce GEMM micro-kernel for bf16 (the one its CPU flash attention uses) and the CPU
// wants right-hand matrices laid out for it (AMX, AVX-512 BF16), a bf16 run goes through it instead: each
// right-hand matrix is laid out here, cast and scaled on the way, straight from the float32 adapter or the bf16
// activation, and each block of at most 64 of its columns is one call of a kernel that oneDNN generates once per
// shape and thread. Products accumulate in float32, as oneDNN's do, and the results are rounded to bf16 where
// at::mm's were (x A^T, the gradient of x A^T, the outputs); A's and B's gradients stay in float32, the
// adapters' dtype, where at::mm rounded them to bf16 first.
#if defined(__x86_64__) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define SEAL_BRGEMM 1
namespace cpublas = at::native::cpublas;
#endif

std::atomic<bool> brgemm_wanted{true};  // tests turn it off to compare with at::mm

// Where oneDNN's micro-kernel is not offered for bf16 (PyTorch offers it where the CPU has AMX), a CPU with
// AVX-512 BF16 (AMD Zen 4, Intel Cooper Lake) computes the same products with a kernel of its own below
// (`dot_columns`): the layout and the rounding are the same, only the instructions differ.
bool onednn_micro_kernel() {
#ifdef SEAL_BRGEMM
  static const bool packs = avx512_available() && cpublas::could_pack(at::kBFloat16);
  return packs;
#else
  return false;
#endif
}

bool avx512_bf16_available() {
#if defined(__x86_64__) && defined(SEAL_BRGEMM)
  return avx512_available() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool brgemm_available() {
  static const bool available = onednn_micro_kernel() || avx512_bf16_available();
  return available;
}

std::atomic<bool> own_wanted{false};  // tests turn it on to run our kernel where oneDNN's is offered too

void set_own_products(bool wanted) { own_wanted = wanted; }
bool onednn_products() { return onednn_micro_kernel() && !(own_wanted && avx512_bf16_available()); }

void set_brgemm(bool wanted) { brgemm_wanted = wanted; }
bool brgemm_in_use() { return brgemm_wanted && brgemm_available(); }

// Whether a run of an adapter of `rank` on a [in -> out] layer goes through the micro-kernel: bf16, and sizes
// its layout takes (columns in blocks of 16).
bool brgemm_fits(at::ScalarType dtype, int64_t in, int64_t out, int64_t rank) {
  return dtype == at::kBFloat16 && in % 16 == 0 && out % 16 == 0 && rank % 16 == 0 && brgemm_in_use();
}

#ifdef SEAL_BRGEMM
using Bf16 = c10::BFloat16;
constexpr int64_t kBlock = 64;  // the widest block of columns the layout takes

int64_t even(int64_t k) { return k + (k & 1); }

// Scratch memory, left uninitialised (every element is written before it is read).
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

SEAL_AVX512 inline __m512 load16(const float* p, __m512 scale) { return _mm512_mul_ps(_mm512_loadu_ps(p), scale); }
SEAL_AVX512 inline __m512 load16(const Bf16* p, __m512 scale) { return _mm512_mul_ps(widen(p), scale); }

// 32 consecutive values from p (the last 16 zeros unless `both`), times scale, as 16 words of two bf16: word q
// holds values 2q (low half) and 2q + 1.
template <typename T>
SEAL_AVX512 inline __m512i pair_words(const T* p, __m512 scale, bool both) {
  const auto low = bf16_bits(load16(p, scale));
  const auto high = both ? bf16_bits(load16(p + 16, scale)) : _mm512_setzero_si512();
  const auto even_lanes = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const auto odd_lanes = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_or_si512(_mm512_permutex2var_epi32(low, even_lanes, high),
                         _mm512_slli_epi32(_mm512_permutex2var_epi32(low, odd_lanes, high), 16));
}

// A 16 x 16 matrix of 32-bit lanes, r[i] its row i, transposed in place.
SEAL_AVX512 inline void transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// A right-hand matrix [k, n] laid out for the micro-kernel, in bf16: its rows in pairs (k padded to even with a
// row of zeros), its columns in blocks of at most 64; block j0 (width w) at even(k) * j0, element (i, j0 + j) at
// (i / 2) * 2w + 2j + i % 2, so that each pair is one 32-bit word. From `src` (float32 or bf16) times `scale`:
// element (i, j) at src[i * step + j] (`src` the matrix) or, `transposed`, at src[j * step + i] (`src` its
// transpose, k % 16 == 0). n % 16 == 0.
// lay_out_into writes the blocks of columns [j_begin, j_end) (on blocks' bounds) into `out`.
template <typename T>
SEAL_AVX512 void lay_out_into(const T* src, int64_t step, bool transposed, int64_t k, int64_t n, float scale,
                              Bf16* out, int64_t j_begin, int64_t j_end) {
  const int64_t ke = even(k);
  auto* words = reinterpret_cast<uint32_t*>(out);
  const auto factor = _mm512_set1_ps(scale);
  // 16-bit lanes 0..15 of one row and 16..31 of the next as 16 words of a pair each
  const auto kInterleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                            22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += kBlock) {
    const int64_t w = std::min(kBlock, n - j0);
    uint32_t* block = words + ke * j0 / 2;
    if (transposed) {  // 16 columns of the matrix are 16 rows of src, whose pairs are adjacent there
      for (int64_t j = 0; j < w; j += 16) {
        for (int64_t i = 0; i < k; i += 32) {
          const bool both = i + 16 < k;
          __m512i r[16];
          for (int t = 0; t < 16; ++t) r[t] = pair_words(src + (j0 + j + t) * step + i, factor, both);
          transpose16(r);  // r[q]: the pair of rows i + 2q, i + 2q + 1 across the 16 columns
          for (int64_t q = 0; q < (both ? 16 : 8); ++q) _mm512_storeu_si512(block + (i / 2 + q) * w + j, r[q]);
        }
      }
      continue;
    }
    if constexpr (std::is_same_v<T, Bf16>) {
      if (scale == 1.0f) {  // bf16 as it is: each pair of rows interleaved, no rounding to do
        for (int64_t i = 0; i < ke; i += 2) {
          for (int64_t j = 0; j < w; j += 16) {
            const auto low = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i * step + j0 + j));
            const auto high = i + 1 < k ? _mm256_loadu_si256(
                                              reinterpret_cast<const __m256i*>(src + (i + 1) * step + j0 + j))
                                        : _mm256_setzero_si256();
            const auto both = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
            _mm512_storeu_si512(block + (i / 2) * w + j, _mm512_permutexvar_epi16(kInterleave, both));
          }
        }
        continue;
      }
    }
    for (int64_t i = 0; i < ke; i += 2) {
      for (int64_t j = 0; j < w; j += 16) {
        const auto low = bf16_bits(load16(src + i * step + j0 + j, factor));
        const auto high =
            i + 1 < k ? bf16_bits(load16(src + (i + 1) * step + j0 + j, factor)) : _mm512_setzero_si512();
        _mm512_storeu_si512(block + (i / 2) * w + j, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
      }
    }
  }
}

template <typename T>
SEAL_AVX512 std::unique_ptr<Bf16[]> lay_out(const T* src, int64_t step, bool transposed, int64_t k, int64_t n,
                                            float scale) {
  auto out = scratch<Bf16>(even(k) * n);
  lay_out_into(src, step, transposed, k, n, scale, out.get(), 0, n);
  return out;
}

// The micro-kernel's products on AVX-512 BF16 without oneDNN's: c [R, 16 V] float32 (row stride ldc) = R rows
// of a (row stride lda) times a block of V x 16 columns laid out by lay_out (`pairs` words a column, w columns
// a pair). Each step takes one pair of a's columns: a row's pair broadcast to every lane, times the block's
// pair row, summed into float32 by one vdpbf16ps per 16 columns (products exact, sums rounded as oneDNN's).
#define SEAL_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))
#define SEAL_UNROLL _Pragma("GCC unroll 32")  // the sums must stay in registers

// The next block of a product, fetched from memory a line (64 bytes) each step of a tile's loop while the rows
// go by, so that the block after this one is in cache when its tiles start (a weight comes from memory once a
// pass; the hardware's prefetcher starts again at each 4 kB page).
struct Ahead {
  const char* at = nullptr;
  int64_t lines = 0;
};

// The sums go to c (float32, row stride ldc), after those already there with `add`, or, with `out`, rounded to
// bf16 into out (row stride ldo).
template <int R, int V>
SEAL_AVX512_BF16 void dot_tile(const Bf16* a, int64_t lda, const uint32_t* block, int64_t pairs, int64_t w,
                               float* c, int64_t ldc, bool add, Bf16* out, int64_t ldo, Ahead ahead) {
  __m512 sums[R][V];
  SEAL_UNROLL for (int r = 0; r < R; ++r)
    SEAL_UNROLL for (int v = 0; v < V; ++v) sums[r][v] = add ? _mm512_loadu_ps(c + r * ldc + 16 * v)
                                                              : _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    if (q < ahead.lines) _mm_prefetch(ahead.at + 64 * q, _MM_HINT_T0);  // T1 measured slower
    __m512bh columns[V];
    SEAL_UNROLL for (int v = 0; v < V; ++v) columns[v] = (__m512bh)_mm512_loadu_si512(block + q * w + 16 * v);
    SEAL_UNROLL for (int r = 0; r < R; ++r) {
      uint32_t word;
      std::memcpy(&word, a + r * lda + 2 * q, sizeof(word));
      const auto row = (__m512bh)_mm512_set1_epi32(static_cast<int>(word));
      SEAL_UNROLL for (int v = 0; v < V; ++v) sums[r][v] = _mm512_dpbf16_ps(sums[r][v], row, columns[v]);
    }
  }
  if (out) {
    SEAL_UNROLL for (int r = 0; r < R; ++r)
      SEAL_UNROLL for (int v = 0; v < V; ++v) narrow(out + r * ldo + 16 * v, sums[r][v]);
    return;
  }
  SEAL_UNROLL for (int r = 0; r < R; ++r)
    SEAL_UNROLL for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, sums[r][v]);
}

// `rows` (1..R) rows through dot_tile<rows, V>.
template <int V, int R>
SEAL_AVX512_BF16 void dot_rows(int64_t rows, const Bf16* a, int64_t lda, const uint32_t* block, int64_t pairs,
                               int64_t w, float* c, int64_t ldc, bool add, Bf16* out, int64_t ldo, Ahead ahead) {
  if constexpr (R > 1) {
    if (rows < R) return dot_rows<V, R - 1>(rows, a, lda, block, pairs, w, c, ldc, add, out, ldo, ahead);
  }
  dot_tile<R, V>(a, lda, block, pairs, w, c, ldc, add, out, ldo, ahead);
}

// A block of V x 16 columns: as many rows at a time as 24 of the 32 vector registers hold sums for, and the
// inner size in chunks of kChunk pairs (the block's chunk, at most 128 kB, stays in the core's cache while
// the rows go by). With `out`, the last chunk's sums are rounded into it; c then holds the earlier chunks'
// (unused if there is one chunk).
constexpr int64_t kChunk = 512;

// The first chunk (as dot_block reads it first) of the block at column j of a matrix laid out by lay_out (ke
// rows), its columns ending at `end`; nothing past them.
inline Ahead block_at(const Bf16* laid, int64_t ke, int64_t j, int64_t end) {
  if (j >= end) return {};
  return {reinterpret_cast<const char*>(laid + ke * j), std::min(ke / 2, kChunk) * std::min(kBlock, end - j) * 4 / 64};
}

template <int V>
SEAL_AVX512_BF16 void dot_block(const Bf16* a, int64_t lda, int64_t m, const uint32_t* block, int64_t pairs,
                                float* c, int64_t ldc, Bf16* out, int64_t ldo, Ahead next, bool add = false) {
  constexpr int64_t kRows = 24 / V;
  for (int64_t q0 = 0; q0 < pairs; q0 += kChunk) {
    const int64_t chunk = std::min(kChunk, pairs - q0);
    Bf16* last = q0 + chunk == pairs ? out : nullptr;
    // what comes next from memory: this block's next chunk, else the first chunk of `next`
    const int64_t following = std::min(kChunk, pairs - q0 - chunk);
    Ahead fetch = following > 0 ? Ahead{reinterpret_cast<const char*>(block + (q0 + chunk) * 16 * V), following * V}
                                : next;
    for (int64_t i = 0; i < m; i += kRows) {
      const Ahead ahead{fetch.at, std::min(chunk, fetch.lines)};
      fetch.at += 64 * ahead.lines;
      fetch.lines -= ahead.lines;
      dot_rows<V, kRows>(std::min(kRows, m - i), a + i * lda + 2 * q0, lda, block + q0 * 16 * V, chunk, 16 * V,
                         c + i * ldc, ldc, add || q0 > 0, last ? last + i * ldo : nullptr, ldo, ahead);
    }
  }
}

// dot_block for a block of w columns (16, 32, 48 or 64).
SEAL_AVX512_BF16 void dot_width(int64_t w, const Bf16* a, int64_t lda, int64_t m, const uint32_t* block,
                                int64_t pairs, float* c, int64_t ldc, Bf16* out, int64_t ldo, Ahead next, bool add) {
  switch (w / 16) {
    case 1: return dot_block<1>(a, lda, m, block, pairs, c, ldc, out, ldo, next, add);
    case 2: return dot_block<2>(a, lda, m, block, pairs, c, ldc, out, ldo, next, add);
    case 3: return dot_block<3>(a, lda, m, block, pairs, c, ldc, out, ldo, next, add);
    default: return dot_block<4>(a, lda, m, block, pairs, c, ldc, out, ldo, next, add);
  }
}

// Columns [j0, j1) of a [m, ke] bf16 (row stride lda) times a matrix laid out by lay_out, j0 and j1 on the
// layout's blocks of 64 (j1 = n for the last): into c [m, n] float32 (row stride ldc) or, with `out`, rounded
// into out [m, n] bf16 (row stride ldo; c then only holds partial sums where ke > 2 kChunk).
// `next`: a block to fetch while the last block's rows go by (see Ahead). With `add`, the sums go on from those
// in c.
SEAL_AVX512_BF16 void dot_columns(const Bf16* a, int64_t lda, int64_t m, const Bf16* laid, int64_t ke, int64_t j0,
                                  int64_t j1, float* c, int64_t ldc, Bf16* out = nullptr, int64_t ldo = 0,
                                  Ahead next = {}, bool add = false) {
  for (; j0 < j1; j0 += kBlock) {
    const auto* block = reinterpret_cast<const uint32_t*>(laid + ke * j0);
    Bf16* o = out ? out + j0 : nullptr;
    const Ahead ahead = j0 + kBlock < j1 ? block_at(laid, ke, j0 + kBlock, j1) : next;
    dot_width(std::min(kBlock, j1 - j0), a, lda, m, block, ke / 2, c + j0, ldc, o, ldo, ahead, add);
  }
}

// c [m, n] float32 (row stride ldc) = a [m, ke] bf16 (row stride lda) times a matrix laid out by lay_out.
void brgemm_product(const Bf16* a, int64_t lda, int64_t m, const Bf16* laid, int64_t ke, int64_t n, float* c,
                    int64_t ldc) {
  if (!onednn_products()) return dot_columns(a, lda, m, laid, ke, 0, n, c, ldc);
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t w = std::min(kBlock, n - j0);
    cpublas::brgemm(m, w, ke, lda, w, ldc, false, a, laid + ke * j0, c + j0, true);
  }
}

// Hands back what oneDNN's micro-kernel holds on this thread (AMX's tile configuration); nothing to do without it.
void release_micro_kernel() {
  if (onednn_products()) cpublas::brgemm_release(true);
}

// out [m, n] (bf16, row stride ldo) = c rounded, or with `add` out + c rounded once. n % 16 == 0.
SEAL_AVX512 void round_rows(const float* c, int64_t m, int64_t n, Bf16* out, int64_t ldo, bool add) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; j += 16) {
      auto v = _mm512_loadu_ps(c + i * n + j);
      if (add) v = _mm512_add_ps(v, widen(out + i * ldo + j));
      narrow(out + i * ldo + j, v);
    }
  }
}

// out [n, m] float32 = scale c^T for c [m, n]; m and n multiples of 16.
SEAL_AVX512 void transpose_scaled(const float* c, int64_t m, int64_t n, float scale, float* out) {
  const auto factor = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < m; i += 16) {
    for (int64_t j = 0; j < n; j += 16) {
      __m512i r[16];
      for (int t = 0; t < 16; ++t) r[t] = _mm512_castps_si512(load16(c + (i + t) * n + j, factor));
      transpose16(r);
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(out + (j + q) * m + i, r[q]);
    }
  }
}

// src [m, n] bf16 (row stride lds) transposed, [n, even(m)] with a column of zeros if m is odd; n % 16 == 0.
// 32 rows by 16 columns at a time: each pair of rows as 16 words of two bf16 (the pair of one column in each
// word), the 16 x 16 words transposed, so that a column's 32 values land in one store.
SEAL_AVX512 inline __m512i words16(const Bf16* p, bool present) {  // 16 bf16 from p in 32-bit lanes, or zeros
  if (!present) return _mm512_setzero_si512();
  return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

SEAL_AVX512 void transpose_into(const Bf16* src, int64_t lds, int64_t m, int64_t n, Bf16* out) {
  const int64_t me = even(m);
  auto* words = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; j += 16) {
    for (int64_t i = 0; i < me; i += 32) {
      __m512i r[16];
      for (int64_t q = 0; q < 16; ++q) {
        const int64_t a = i + 2 * q, b = a + 1;
        r[q] = _mm512_or_si512(words16(src + std::min(a, m - 1) * lds + j, a < m),
                               _mm512_slli_epi32(words16(src + std::min(b, m - 1) * lds + j, b < m), 16));
      }
      transpose16(r);  // r[t]: column j + t's values of rows i .. i + 31, in pairs
      const auto keep = lanes_left((me - i) / 2);
      for (int t = 0; t < 16; ++t) _mm512_mask_storeu_epi32(words + ((j + t) * me + i) / 2, keep, r[t]);
    }
  }
}

SEAL_AVX512 std::unique_ptr<Bf16[]> transposed(const Bf16* src, int64_t lds, int64_t m, int64_t n) {
  auto out = scratch<Bf16>(n * even(m));
  transpose_into(src, lds, m, n, out.get());
  return out;
}

// Runs' adapter terms folded into a frozen product laid out by laid_weight (`folded_product`): a run's rows
// [start, start + rows) get h (bf16 [rows, ke], contiguous) times `laid` (laid out by lay_out: ke rows, the
// product's columns; ke is the rank, a multiple of 16) added to their float32 sums, which are then rounded to
// bf16 once. Otherwise the frozen product and the term are each rounded, then added and rounded again, in a
// pass over [rows, columns] of float32 sums and bf16 outputs; folded, the term's 16 pairs of products go on
// in the frozen product's tiles, and the result is the nearest bf16 to the sum. `kept` holds what the folds
// point to.
struct Fold {
  int64_t start, rows;
  const Bf16* h;
  const Bf16* laid;
  int64_t ke;
};

struct Folding {
  std::vector<Fold> folds;
  std::vector<std::unique_ptr<Bf16[]>> kept;
  void add(int64_t start, int64_t rows, std::unique_ptr<Bf16[]> h, std::unique_ptr<Bf16[]> laid, int64_t ke) {
    folds.push_back({start, rows, h.get(), laid.get(), ke});
    kept.push_back(std::move(h));
    kept.push_back(std::move(laid));
  }
};

// One run's forward in bf16: out_rows += (part A^T) (scaling B)^T; returns part A^T (bf16, for the backward).
// part [L, in] and out_rows [L, out] bf16 with contiguous rows; a [rank, in] and b [out, rank] contiguous.
// With `folding`, the second product is left to the frozen product (Fold; `out` columns, the run's rows from
// `start`) and out_rows is not used.
template <typename T>
at::Tensor brgemm_forward(const at::Tensor& part, const T* a, const T* b, int64_t rank, double scaling,
                          at::Tensor& out_rows, Folding* folding = nullptr, int64_t start = 0, int64_t out = 0) {
  const int64_t rows = part.size(0), in = part.size(1);
  if (!folding) out = out_rows.size(1);
  auto c = scratch<float>(rows * (folding ? rank : std::max(rank, out)));
  brgemm_product(part.data_ptr<Bf16>(), part.stride(0), rows, lay_out(a, in, true, in, rank, 1.0f).get(), in, rank,
                 c.get(), rank);
  auto h = at::empty({rows, rank}, part.options());
  round_rows(c.get(), rows, rank, h.data_ptr<Bf16>(), rank, false);
  auto laid_b = lay_out(b, rank, true, rank, out, static_cast<float>(scaling));
  if (folding) {
    folding->folds.push_back({start, rows, h.data_ptr<Bf16>(), laid_b.get(), rank});  // h: kept by the caller
    folding->kept.push_back(std::move(laid_b));
  } else {
    brgemm_product(h.data_ptr<Bf16>(), rank, rows, laid_b.get(), rank, out, c.get(), out);
    round_rows(c.get(), rows, out, out_rows.data_ptr<Bf16>(), out_rows.stride(0), true);
  }
  release_micro_kernel();
  return h;
}

// One run's backward in bf16, from gr (the output's gradient, [L, out]): A's gradient [rank, in] and B's
// [out, rank] in float32, and dx_rows += (gr scaling B) A if dx_rows is defined, or, with `folding`, that
// product left to the frozen product of the input's gradient (Fold, the run's rows from `start`).
template <typename T>
std::pair<at::Tensor, at::Tensor> brgemm_backward(const at::Tensor& gr, const at::Tensor& part, const at::Tensor& h,
                                                  const T* a, const T* b, double scaling, at::Tensor dx_rows,
                                                  Folding* folding = nullptr, int64_t start = 0) {
  const int64_t rows = part.size(0), in = part.size(1), rank = h.size(1), out = gr.size(1);
  const int64_t re = even(rows);
  const float s = static_cast<float>(scaling);
  auto c = scratch<float>(std::max(rows, rank) * std::max(in, out));
  // dh = gr (scaling B), rounded to bf16: d(loss)/d(part A^T)
  brgemm_product(gr.data_ptr<Bf16>(), gr.stride(0), rows, lay_out(b, rank, false, out, rank, s).get(), out, rank,
                 c.get(), rank);
  auto dh = scratch<Bf16>(rows * rank);
  round_rows(c.get(), rows, rank, dh.get(), rank, false);
  // B's gradient: scaling gr^T h, the transpose of h^T gr
  brgemm_product(transposed(h.data_ptr<Bf16>(), rank, rows, rank).get(), re, rank,
                 lay_out(gr.data_ptr<Bf16>(), gr.stride(0), false, rows, out, 1.0f).get(), re, out, c.get(), out);
  auto db = at::empty({out, rank}, part.options().dtype(at::kFloat));
  transpose_scaled(c.get(), rank, out, s, db.data_ptr<float>());
  // A's gradient: dh^T part
  auto da = at::empty({rank, in}, db.options());
  brgemm_product(transposed(dh.get(), rank, rows, rank).get(), re, rank,
                 lay_out(part.data_ptr<Bf16>(), part.stride(0), false, rows, in, 1.0f).get(), re, in,
                 da.data_ptr<float>(), in);
  if (folding) {
    folding->add(start, rows, std::move(dh), lay_out(a, in, false, rank, in, 1.0f), rank);
  } else if (dx_rows.defined()) {
    brgemm_product(dh.get(), rank, rows, lay_out(a, in, false, rank, in, 1.0f).get(), rank, in, c.get(), in);
    round_rows(c.get(), rows, in, dx_rows.data_ptr<Bf16>(), dx_rows.stride(0), true);
  }
  release_micro_kernel();
  return {da, db};
}

// Frozen weights through our own products
//
// On this 2-core AMD EPYC (AVX-512 BF16, no AMX) the kernel above multiplies by a frozen weight laid out once
// faster than oneDNN's packed product does at SEAL's few tokens a pass (one thread, weights from memory, 40
// rows: 206-225 GFLOP/s against 173-182; 200 rows: 220-228 against 208-219). And its sums do not depend on
// the number of threads: each block of 64 output columns is summed by one thread in one order, where oneDNN
// may split a product's inner size between threads. So on such CPUs `laid_weight` lays each bf16 frozen weight
// out once per `train` (a 1-D tensor, which tells `packed_product` whose layout it is), W^T for the forward
// and W for the input's gradient, and `own_product` multiplies by it, the columns' blocks shared between
// torch's threads.
bool own_frozen_products() { return avx512_bf16_available() && !onednn_micro_kernel(); }

at::Tensor laid_weight(const at::Tensor& w, bool backward) {
  TORCH_CHECK(own_frozen_products() && w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 16 == 0 &&
                  w.size(1) % 16 == 0,
              "laid_weight: a bf16 [out, in] weight, sizes multiples of 16, on a CPU with AVX-512 BF16");
  auto src = w.contiguous();
  const int64_t out = src.size(0), in = src.size(1), k = backward ? out : in, n = backward ? in : out;
  auto laid = at::empty({k * n}, src.options());
  const auto* sp = src.data_ptr<Bf16>();
  auto* lp = laid.data_ptr<Bf16>();
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    lay_out_into(sp, in, !backward, k, n, 1.0f, lp, b0 * kBlock, std::min(n, b1 * kBlock));
  });
  return laid;
}

// The order in which a pass multiplies by the laid-out weights (set_product_order): each one's successor, whose
// first chunk own_product fetches while its own last block's rows go by (the first block of a product would
// otherwise wait for memory).
std::mutex order_mutex;
std::shared_ptr<const std::unordered_map<const void*, Ahead>> product_order;

void set_product_order(std::vector<at::Tensor> laid, std::vector<int64_t> inner) {
  TORCH_CHECK(laid.size() == inner.size(), "set_product_order: one inner size per laid-out weight");
  auto next = std::make_shared<std::unordered_map<const void*, Ahead>>();
  for (size_t i = 0; i + 1 < laid.size(); ++i) {
    const auto& after = laid[i + 1];
    TORCH_CHECK(after.dim() == 1 && after.scalar_type() == at::kBFloat16 && after.numel() % inner[i + 1] == 0,
                "set_product_order: weights laid out by laid_weight, and their inner sizes");
    const int64_t n = after.numel() / inner[i + 1];
    (*next)[laid[i].data_ptr()] = block_at(after.data_ptr<Bf16>(), inner[i + 1], 0, n);
  }
  std::lock_guard<std::mutex> lock(order_mutex);
  product_order = std::move(next);
}

Ahead successor(const void* laid) {
  std::shared_ptr<const std::unordered_map<const void*, Ahead>> order;
  {
    std::lock_guard<std::mutex> lock(order_mutex);
    order = product_order;
  }
  if (!order) return {};
  const auto it = order->find(laid);
  return it == order->end() ? Ahead{} : it->second;
}

// x times the laid-out weight, rounded to bf16; with `added`, added + that, the sum rounded once (as oneDNN's
// "add" product rounds it); with `folds` (not with `added`), each run's adapter term added to its rows' sums
// before they are rounded (Fold).
at::Tensor folded_product(const at::Tensor& x, const at::Tensor& laid, const c10::optional<at::Tensor>& added,
                          const std::vector<Fold>& folds) {
  const int64_t m = x.size(0), k = x.size(1), n = laid.numel() / k;
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.is_contiguous() && k % 16 == 0 && laid.numel() == k * n,
              "own_product: contiguous bf16 rows whose size matches the laid-out weight's");
  TORCH_CHECK(!added || (added->scalar_type() == at::kBFloat16 && added->size(0) == m && added->size(1) == n),
              "own_product: what is added must be bf16 [rows, out]");
  TORCH_CHECK(!added || folds.empty(), "own_product: runs' terms are folded in without `added`");
  std::vector<Fold> runs(folds);
  std::sort(runs.begin(), runs.end(), [](const Fold& p, const Fold& q) { return p.start < q.start; });
  std::vector<std::pair<int64_t, int64_t>> alone;  // rows that no fold covers: their sums rounded as they are
  int64_t row = 0;
  for (const auto& f : runs) {
    TORCH_CHECK(f.start >= row && f.start + f.rows <= m, "own_product: folds on rows of their own");
    if (f.start > row) alone.emplace_back(row, f.start);
    row = f.start + f.rows;
  }
  if (row < m && !folds.empty()) alone.emplace_back(row, m);
  auto out = added ? added->contiguous().clone() : at::empty({m, n}, x.options());
  const auto* xp = x.data_ptr<Bf16>();
  const auto* lp = laid.data_ptr<Bf16>();
  auto* op = out.data_ptr<Bf16>();
  const Ahead following = successor(lp);
  at::parallel_for(0, (n + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    // float32 sums: all of them to add onto `added`, else the partial ones over a long inner size
    auto c = scratch<float>(added || !folds.empty() || k > 2 * kChunk ? m * kBlock : 0);
    const int64_t end = std::min(n, b1 * kBlock);
    for (int64_t j0 = b0 * kBlock; j0 < end; j0 += kBlock) {
      const int64_t w = std::min(kBlock, n - j0);
      // this thread's next block, fetched while this one's rows go by; after the last, the next weight's
      const Ahead next = j0 + w < end ? block_at(lp, k, j0 + w, end) : end == n ? following : Ahead{};
      if (!folds.empty()) {  // the frozen sums, then each run's term on its rows' and the rounding
        dot_columns(xp, k, m, lp + k * j0, k, 0, w, c.get(), w, nullptr, 0, next);
        for (const auto& f : runs)
          dot_columns(f.h, f.ke, f.rows, f.laid + f.ke * j0, f.ke, 0, w, c.get() + f.start * w, w,
                      op + f.start * n + j0, n, {}, true);
        for (const auto& [begin, stop] : alone)
          round_rows(c.get() + begin * w, stop - begin, w, op + begin * n + j0, n, false);
        continue;
      }
      if (!added) {
        dot_columns(xp, k, m, lp + k * j0, k, 0, w, c.get(), kBlock, op + j0, n, next);
        continue;
      }
      dot_columns(xp, k, m, lp + k * j0, k, 0, w, c.get(), w, nullptr, 0, next);
      round_rows(c.get(), m, w, op + j0, n, true);
    }
  });
  return out;
}

at::Tensor own_product(const at::Tensor& x, const at::Tensor& laid, const c10::optional<at::Tensor>& added) {
  return folded_product(x, laid, added, {});
}
#else
bool own_frozen_products() { return false; }
at::Tensor laid_weight(const at::Tensor&, bool) { TORCH_CHECK(false, "laid_weight: not built with this torch"); }
void set_product_order(std::vector<at::Tensor>, std::vector<int64_t>) {}  // nothing is laid out here
at::Tensor own_product(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&) {
  TORCH_CHECK(false, "own_product: not built with this torch");
}
#endif

constexpr int64_t kFewRows = 16;

// frozen: [weight, bias], [weight, bias, W packed] or [weight, bias, W packed, W^T packed]; an absent bias is
// an empty tensor. The forward, its output shaped as x with the last size W's; with `saved`, each run's input,
// x A^T, and A and B as multiplied go there for the backward.
// The frozen product x W^T (+ bias) of rows xc in the compute dtype.
at::Tensor frozen_out(const at::Tensor& xc, at::TensorList frozen) {
  const auto& weight = frozen[0];
  c10::optional<at::Tensor> bias;
  if (frozen[1].numel()) bias = frozen[1].to(weight.scalar_type());
  if (frozen.size() >= 3) return packed_product(xc, frozen[2], bias);
  return bias ? at::addmm(*bias, xc, weight.t()) : at::mm(xc, weight.t());
}

// x's rows in the compute dtype, and their frozen product.
std::pair<at::Tensor, at::Tensor> frozen_product(const at::Tensor& x, at::TensorList frozen) {
  auto xc = x.reshape({-1, x.size(-1)}).to(frozen[0].scalar_type()).contiguous();
  return {xc, frozen_out(xc, frozen)};
}

at::Tensor shaped_as(const at::Tensor& out, const at::Tensor& x) {
  auto shape = x.sizes().vec();
  shape.back() = out.size(-1);
  return out.view(shape);
}

// Whether the runs of a layer's adapters `a` and `b` (`in` inputs, `out` outputs, computed in `dtype`) go through
// the micro-kernel (brgemm_forward and brgemm_backward): all of them or none, so that the backward knows from one
// flag.
bool micro_runs(at::ScalarType dtype, int64_t in, int64_t out, at::TensorList a, at::TensorList b) {
  if (a.empty() || !brgemm_fits(dtype, in, out, a[0].size(0))) return false;
  for (size_t r = 0; r < a.size(); ++r) {
    const auto type = a[r].scalar_type();
    if ((type != at::kFloat && type != at::kBFloat16) || b[r].scalar_type() != type || !a[r].is_contiguous() ||
        !b[r].is_contiguous() || a[r].size(0) != a[0].size(0))
      return false;
  }
  return true;
}

// Whether a frozen weight is laid out by laid_weight (`frozen` [W, no bias, W^T laid out, ...]): the runs' terms
// are then folded into its product (Fold).
bool folds_into(at::TensorList frozen) { return frozen.size() >= 3 && frozen[2].dim() == 1 && !frozen[1].numel(); }

// The forward; with `saved`, each run's input, x A^T, and A and B as multiplied (or, through the micro-kernel, A
// and B themselves) go there for the backward, and *micro says which.
at::Tensor compute(const at::Tensor& x, at::TensorList frozen, at::TensorList a, at::TensorList b,
                   const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths, double scaling,
                   std::vector<at::Tensor>* saved, bool* micro = nullptr) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto dtype = frozen[0].scalar_type();
  auto xc = x.reshape({-1, x.size(-1)}).to(dtype).contiguous();
  const int64_t n = frozen[0].size(0);
  const bool through_micro = micro_runs(dtype, xc.size(1), n, a, b);
  if (micro) *micro = through_micro;
#ifdef SEAL_BRGEMM
  // every run through the micro-kernel and the weight laid out here: the frozen product last, the runs' folded in
  const bool fold = through_micro && folds_into(frozen) &&
                    std::all_of(lengths.begin(), lengths.end(), [&](int64_t l) { return saved || l > kFewRows; });
  Folding folding;
#else
  const bool fold = false;
#endif
  at::Tensor out = fold ? at::Tensor() : frozen_out(xc, frozen);
  at::Tensor x_few, delta_few;  // without a backward: runs of a few rows, through adapters in their own dtype
  for (size_t r = 0; r < a.size(); ++r) {
    auto part = xc.narrow(0, starts[r], lengths[r]);
#ifdef SEAL_BRGEMM
    if (through_micro && (saved || lengths[r] > kFewRows)) {
      auto rows = fold ? at::Tensor() : out.narrow(0, starts[r], lengths[r]);
      Folding* into = fold ? &folding : nullptr;
      const int64_t rank = a[r].size(0);
      auto h = a[r].scalar_type() == at::kFloat
                   ? brgemm_forward(part, a[r].data_ptr<float>(), b[r].data_ptr<float>(), rank, scaling, rows,
                                    into, starts[r], n)
                   : brgemm_forward(part, a[r].data_ptr<Bf16>(), b[r].data_ptr<Bf16>(), rank, scaling, rows,
                                    into, starts[r], n);
      if (saved) saved->insert(saved->end(), {part, h, a[r], b[r]});
      continue;
    }
#endif
    if (!saved && lengths[r] <= kFewRows) {
      // A decoding step's run: oneDNN's bf16 product of an adapter's sizes costs 15-30 us whatever the
      // rows, float32's 3-15 at 1-5 rows. Its share goes into one float32 sum for all such runs, added at
      // the end: a few operations a run instead of a dozen.
      if (!x_few.defined()) {
        x_few = xc.to(a[r].scalar_type());
        delta_few = at::zeros({xc.size(0), n}, x_few.options());
      }
      auto h = at::mm(x_few.narrow(0, starts[r], lengths[r]), a[r].to(x_few.scalar_type()).t());
      auto target = delta_few.narrow(0, starts[r], lengths[r]);
      at::mm_out(target, h, b[r].to(x_few.scalar_type()).t());
      continue;
    }
    auto ar = a[r].to(dtype), br = at::mul(b[r], scaling).to(dtype);
    auto h = at::mm(part, ar.t());
    out.narrow(0, starts[r], lengths[r]).addmm_(h, br.t());
    if (saved) saved->insert(saved->end(), {part, h, ar, br});
  }
#ifdef SEAL_BRGEMM
  if (fold) out = folded_product(xc, frozen[2], c10::nullopt, folding.folds);
#endif
  if (delta_few.defined()) out.add_(delta_few, scaling);
  return shaped_as(out, x);
}

// A decoding step of rows routed to several adapters, without gradients: the adapters' A matrices stacked
// [slots x rank, in] and their B matrices [out, slots x rank], each row's columns of the other slots zeroed by
// `mask` [rows, slots x rank]: out = x W^T (+ bias) + scaling ((x A^T) * mask) B^T, the adapters' part in
// their dtype (float32). Two products a layer whatever the number of adapters, where runs cost two each.
at::Tensor lora_linear_stacked(const at::Tensor& x, std::vector<at::Tensor> frozen, const at::Tensor& a,
                               const at::Tensor& b, const at::Tensor& mask, double scaling) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "lora_linear_stacked has no backward: call it without gradients");
  TORCH_CHECK(frozen.size() >= 2 && frozen.size() <= 4, "frozen: [weight, bias], then packed, then packed^T");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  auto [xc, out] = frozen_product(x, frozen);
  auto h = at::mm(xc.to(a.scalar_type()), a.t()).mul_(mask.reshape({xc.size(0), -1}));
  out.add_(at::mm(h, b.t()), scaling);
  return shaped_as(out, x);
}

struct LoraLinear : public torch::autograd::Function<LoraLinear> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList frozen, at::TensorList a,
                            at::TensorList b, std::vector<int64_t> starts, std::vector<int64_t> lengths,
                            double scaling) {
    TORCH_CHECK(frozen.size() != 3, "a weight packed without its transpose has no backward: pass W^T packed too");
    std::vector<at::Tensor> saved;
    bool micro = false;
    auto out = compute(x, frozen, a, b, starts, lengths, scaling, &saved, &micro);
    ctx->saved_data["micro"] = micro;
    const bool packed = frozen.size() == 4;
    ctx->saved_data["weight"] = packed ? frozen[3] : frozen[0];
    ctx->saved_data["packed"] = packed;
    ctx->saved_data["frozen"] = static_cast<int64_t>(frozen.size());
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["starts"] = starts;
    ctx->saved_data["lengths"] = lengths;
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["x_dtype"] = x.scalar_type();
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto weight = ctx->saved_data["weight"].toTensor();
    const bool packed = ctx->saved_data["packed"].toBool();
    const auto saved = ctx->saved_data["saved"].toTensorVector();
    const auto starts = ctx->saved_data["starts"].toIntVector();
    const auto lengths = ctx->saved_data["lengths"].toIntVector();
    const double scaling = ctx->saved_data["scaling"].toDouble();
    const auto x_dtype = ctx->saved_data["x_dtype"].toScalarType();
    const auto x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const size_t runs = starts.size();
    const bool micro = ctx->saved_data["micro"].toBool();
    auto g = grads[0].reshape({-1, grads[0].size(-1)});
    if (micro) g = g.contiguous();
    const bool need_x = ctx->needs_input_grad(0);
    // the input's gradient through W laid out here: the runs' terms folded into its product, which comes last
    const bool fold = micro && need_x && packed && weight.dim() == 1;
    at::Tensor dx;
    if (need_x && !fold) {
      dx = packed ? packed_product(g.contiguous(), weight, c10::nullopt) : at::mm(g, weight);
    }
    variable_list da(runs), db(runs);
#ifdef SEAL_BRGEMM
    Folding folding;
#endif
    for (size_t r = 0; r < runs; ++r) {
      const auto &part = saved[4 * r], &h = saved[4 * r + 1], &ar = saved[4 * r + 2], &br = saved[4 * r + 3];
      auto gr = g.narrow(0, starts[r], lengths[r]);
#ifdef SEAL_BRGEMM
      if (micro) {
        auto dx_rows = need_x && !fold ? dx.narrow(0, starts[r], lengths[r]) : at::Tensor();
        Folding* into = fold ? &folding : nullptr;
        std::tie(da[r], db[r]) = ar.scalar_type() == at::kFloat
                                     ? brgemm_backward(gr, part, h, ar.data_ptr<float>(), br.data_ptr<float>(),
                                                       scaling, dx_rows, into, starts[r])
                                     : brgemm_backward(gr, part, h, ar.data_ptr<Bf16>(), br.data_ptr<Bf16>(),
                                                       scaling, dx_rows, into, starts[r]);
        continue;
      }
#endif
      auto dh = at::mm(gr, br);  // br is scaling B: dh is d(loss)/d(x A^T) already
      db[r] = at::mm(gr.t(), h).to(at::kFloat).mul_(scaling);
      da[r] = at::mm(dh.t(), part).to(at::kFloat);
      if (need_x) dx.narrow(0, starts[r], lengths[r]).addmm_(dh, ar);
    }
#ifdef SEAL_BRGEMM
    if (fold) dx = folded_product(g, weight, c10::nullopt, folding.folds);
#endif
    if (need_x) dx = dx.to(x_dtype);
    variable_list out{need_x ? dx.view(x_sizes) : at::Tensor()};
    out.resize(1 + ctx->saved_data["frozen"].toInt());  // the frozen tensors get no gradient
    out.insert(out.end(), da.begin(), da.end());
    out.insert(out.end(), db.begin(), db.end());
    out.resize(out.size() + 3);  // starts, lengths, scaling
    return out;
  }
};

at::Tensor lora_linear(const at::Tensor& x, std::vector<at::Tensor> frozen, std::vector<at::Tensor> a,
                       std::vector<at::Tensor> b, std::vector<int64_t> starts, std::vector<int64_t> lengths,
                       double scaling) {
  TORCH_CHECK(frozen.size() >= 2 && frozen.size() <= 4, "frozen: [weight, bias], then packed, then packed^T");
  TORCH_CHECK(a.size() == b.size() && a.size() == starts.size() && a.size() == lengths.size(),
              "one A, one B, one start and one length per run");
  if (!at::GradMode::is_enabled()) {  // decoding, scoring: no node, nothing saved
    return compute(x, frozen, a, b, starts, lengths, scaling, nullptr);
  }
  // As TensorLists, so that autograd sees their tensors as the node's inputs (a std::vector it would not).
  return LoraLinear::apply(x, at::TensorList(frozen), at::TensorList(a), at::TensorList(b), starts, lengths,
                           scaling);
}

// token_losses
//
// The loss of each row of `hidden` [tokens, features] predicting `targets` through the frozen output
// projection, and the loss's gradient with respect to `hidden`, (softmax - onehot) W, computed in the same pass
// (seal.multilora.TokenLosses scales it in backward). `frozen` is laid out as lora_linear's: [W, no bias] in
// the compute dtype, then W and W^T packed by oneDNN if it lays them out. A chunk of rows at a time, the logits of
// the chunk (in the compute dtype) are turned into probabilities one row at a time in float32, the row (200 kB
// for a 50k vocabulary) staying in the core's cache, and written back in place: one read and one write of the
// logits where whole-chunk float32 operations (cast, logsumexp, subtract, exp, cast back) each pass over
// [chunk, vocabulary] floats in memory.

#if defined(__x86_64__)
// One token of token_losses, in place: its bf16 logits [0, n) become the gradient of its loss with respect to
// them, softmax - onehot(target), rounded to bf16 once; `row` (n floats) is scratch. Returns the loss,
// -log p(target), or logsumexp - logit(target) where p is too small for float32 to hold it well (or not
// finite). Three passes over the row in the core's cache: widen and find the largest, exponentiate and sum,
// scale and narrow.
SEAL_AVX512 float loss_row(c10::BFloat16* logits, float* row, int64_t n, int64_t target) {
  const float own = static_cast<float>(logits[target]);
  auto top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < n; j += 16) {
    const auto m = lanes_left(n - j);
    const auto x = widen(logits + j, m);
    _mm512_mask_storeu_ps(row + j, m, x);
    top = _mm512_mask_max_ps(top, m, top, x);
  }
  const float most = _mm512_reduce_max_ps(top);
  const auto shift = _mm512_set1_ps(most);
  auto total = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const auto m = lanes_left(n - j);
    const auto e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), shift));
    total = _mm512_mask_add_ps(total, m, total, e);
    _mm512_mask_storeu_ps(row + j, m, e);
  }
  const float sum = _mm512_reduce_add_ps(total), inverse = 1.0f / sum;
  const auto scale = _mm512_set1_ps(inverse);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) narrow(logits + j, _mm512_mul_ps(_mm512_loadu_ps(row + j), scale));
  for (; j < n; ++j) logits[j] = c10::BFloat16(row[j] * inverse);
  const float p = row[target] * inverse;
  logits[target] = c10::BFloat16(p - 1.0f);
  return std::isnormal(p) ? -std::log(p) : most + std::log(sum) - own;
}
#endif

constexpr int64_t kLossGrain = 8;  // tokens a thread takes at least (each a pass over the vocabulary)

// The losses of a chunk's tokens, each through loss_row, the tokens shared between torch's threads: `logits`
// [rows, vocabulary] bf16 and contiguous (rewritten in place), target_of and loss from the chunk's first token.
void loss_rows(at::Tensor& logits, const int64_t* target_of, float* loss) {
#if defined(__x86_64__)
  const int64_t vocabulary = logits.size(1);
  auto* first = logits.data_ptr<c10::BFloat16>();
  at::parallel_for(0, logits.size(0), kLossGrain, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buffer(new float[vocabulary]);
    for (int64_t i = begin; i < end; ++i)
      loss[i] = loss_row(first + i * vocabulary, buffer.get(), vocabulary, target_of[i]);
  });
#else
  TORCH_CHECK(false, "loss_rows: AVX-512 only");
#endif
}

std::vector<at::Tensor> token_losses(const at::Tensor& hidden, std::vector<at::Tensor> frozen,
                                     const at::Tensor& targets, int64_t chunk) {
  TORCH_CHECK(frozen.size() == 2 || frozen.size() == 4, "frozen: [W, bias], then W packed and W^T packed");
  TORCH_CHECK(frozen[1].numel() == 0, "token_losses: an output projection with a bias is not plain");
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  const auto& weight = frozen[0];
  const bool packed = frozen.size() == 4;
  const int64_t tokens = hidden.size(0), vocabulary = weight.size(0);
  auto losses = at::empty({tokens}, hidden.options().dtype(at::kFloat));
  auto grads = at::empty_like(hidden);
  at::Tensor row, probs;  // the PyTorch path's float32 rows, made when first needed
  const auto target = targets.to(at::kLong).contiguous();
  TORCH_CHECK(target.numel() == 0 || (target.min().item<int64_t>() >= 0 && target.max().item<int64_t>() < vocabulary),
              "token_losses: a target outside the vocabulary");
  const int64_t* target_of = target.data_ptr<int64_t>();
  // Under bf16 on an AVX-512 CPU each token's softmax is one call of loss_row, the tokens shared between threads;
  // else three of PyTorch's operations a token.
  const bool own_rows = weight.scalar_type() == at::kBFloat16 && avx512_available();
  float* loss = losses.data_ptr<float>();
  for (int64_t start = 0; start < tokens; start += chunk) {
    const int64_t rows = std::min(chunk, tokens - start);
    auto h = hidden.narrow(0, start, rows).to(weight.scalar_type()).contiguous();
    auto logits = packed ? packed_product(h, frozen[2], c10::nullopt) : at::mm(h, weight.t());
    if (own_rows && logits.is_contiguous()) {
      loss_rows(logits, target_of + start, loss + start);
    } else {
      if (!row.defined()) row = at::empty({vocabulary}, losses.options()), probs = at::empty_like(row);
      float* prob = probs.data_ptr<float>();
      for (int64_t i = 0; i < rows; ++i) {
        auto logit = logits[i];
        row.copy_(logit);
        at::_softmax_out(probs, row, 0, false);
        const int64_t k = target_of[start + i];
        const float p = prob[k];
        // -log p, unless p is too small for float32 to hold it well (or not finite): then from the logits.
        loss[start + i] = std::isnormal(p) ? -std::log(p) : (at::logsumexp(row, 0) - row[k]).item<float>();
        prob[k] = p - 1.0f;
        logit.copy_(probs);
      }
    }
    grads.narrow(0, start, rows)
        .copy_(packed ? packed_product(logits, frozen[3], c10::nullopt) : at::mm(logits, weight));
  }
  return {losses, grads};
}

// swiglu
//
// The gated MLP's silu(gate) * up, for bf16 gate and up, as one autograd node: the forward reads both once and
// writes the product, saving gate and up; the backward reads the incoming gradient, gate and up once and writes
// both gradients. PyTorch's operations make five passes forward and backward (silu, mul; mul, mul,
// silu_backward) and save silu(gate) as well; on a CPU that reads memory at a few GB/s a core, each pass over a
// [tokens, 1536] activation costs about what a small product does. The arithmetic is in float32, rounded to
// bf16 once per result (PyTorch's rounds silu(gate) too). AVX-512 only: callers check `avx512_available`.

#if defined(__x86_64__)
SEAL_AVX512 inline __m512 sigmoid(__m512 x) {
  const auto one = _mm512_set1_ps(1.0f);
  return _mm512_div_ps(one, _mm512_add_ps(one, Sleef_expf16_u10(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// h = silu(g) u over [begin, end), 16 at a time; the tail in scalars.
SEAL_AVX512 void swiglu_forward_range(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* h,
                                      int64_t begin, int64_t end) {
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const auto x = widen(g + i);
    narrow(h + i, _mm512_mul_ps(_mm512_mul_ps(x, sigmoid(x)), widen(u + i)));
  }
  for (; i < end; ++i) {
    const float x = g[i];
    h[i] = x / (1.0f + std::exp(-x)) * static_cast<float>(u[i]);
  }
}

// du = dh silu(g), dg = dh u sigmoid(g) (1 + g (1 - sigmoid(g))) over [begin, end).
SEAL_AVX512 void swiglu_backward_range(const c10::BFloat16* dh, const c10::BFloat16* g, const c10::BFloat16* u,
                                       c10::BFloat16* dg, c10::BFloat16* du, int64_t begin, int64_t end) {
  const auto one = _mm512_set1_ps(1.0f);
  int64_t i = begin;
  for (; i + 16 <= end; i += 16) {
    const auto x = widen(g + i), d = widen(dh + i), s = sigmoid(x);
    narrow(du + i, _mm512_mul_ps(d, _mm512_mul_ps(x, s)));
    const auto slope = _mm512_mul_ps(s, _mm512_add_ps(one, _mm512_mul_ps(x, _mm512_sub_ps(one, s))));
    narrow(dg + i, _mm512_mul_ps(_mm512_mul_ps(d, widen(u + i)), slope));
  }
  for (; i < end; ++i) {
    const float x = g[i], d = dh[i], s = 1.0f / (1.0f + std::exp(-x));
    du[i] = d * x * s;
    dg[i] = d * static_cast<float>(u[i]) * s * (1.0f + x * (1.0f - s));
  }
}
#endif

constexpr int64_t kGrain = 16384;  // elements a thread takes at least

struct Swiglu : public torch::autograd::Function<Swiglu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(avx512_available(), "swiglu needs AVX-512");
    TORCH_CHECK(gate.scalar_type() == at::kBFloat16 && up.scalar_type() == at::kBFloat16, "swiglu is for bf16");
    TORCH_CHECK(gate.sizes() == up.sizes(), "gate and up must have one shape");
    auto g = gate.contiguous(), u = up.contiguous();
    auto h = at::empty_like(g);
#if defined(__x86_64__)
    const auto *gp = g.data_ptr<c10::BFloat16>(), *upp = u.data_ptr<c10::BFloat16>();
    auto* hp = h.data_ptr<c10::BFloat16>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_forward_range(gp, upp, hp, begin, end);
    });
#endif
    ctx->save_for_backward({g, u});
    return h;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &g = saved[0], &u = saved[1];
    auto dh = grads[0].to(at::kBFloat16).contiguous();
    auto dg = at::empty_like(g), du = at::empty_like(u);
#if defined(__x86_64__)
    const auto *dhp = dh.data_ptr<c10::BFloat16>(), *gp = g.data_ptr<c10::BFloat16>();
    const auto* upp = u.data_ptr<c10::BFloat16>();
    auto *dgp = dg.data_ptr<c10::BFloat16>(), *dup = du.data_ptr<c10::BFloat16>();
    at::parallel_for(0, g.numel(), kGrain, [&](int64_t begin, int64_t end) {
      swiglu_backward_range(dhp, gp, upp, dgp, dup, begin, end);
    });
#endif
    return {dg, du};
  }
};

at::Tensor swiglu(const at::Tensor& gate, const at::Tensor& up) { return Swiglu::apply(gate, up); }

// packed_attention
//
// One Llama-style attention of a packed training pass under bf16 autocast (seal.multilora.fused_attentions),
// from the outputs of the q, k and v projections to the input of the output projection, as one autograd node:
// the rotary embedding, the scores, each query's softmax over the keys of its own row up to itself, the weighted
// sum of the values; and the backward. PyTorch's operations for the same (transformers' rotary embedding, then
// seal.attention's batched products) make about thirty nodes, casts, transposes and masks a layer, most of them
// a pass over the activations. And where those products cover the whole pass, masked, these go row by row of the
// pass (a segment of tokens that attend only among themselves): a pass of two rows of equal length does half
// the arithmetic. The numbers are autocast's for those operations: the rotation in float32 from the bf16
// projections and rounded to bf16; products of bf16 matrices (float32 sums, bf16 results); the softmax and its
// gradient in float32 from bf16 and rounded to bf16.
// A key/value head's query heads lie side by side: [kv heads, T x groups, width], where groups is the number of
// query heads a key/value head serves, with token t's j-th query head at row t x groups + j. For a row of the
// pass of n tokens from token s, a key/value head's scores and probabilities are [n x groups, n], with token t's
// j-th query head at row (t - s) x groups + j.
// `starts[t]` is the first token of t's row: t attends to keys starts[t]..t. AVX-512 only
// (`avx512_available`); a head's width must be even.
// Where the adapters' products go through oneDNN's micro-kernel (`brgemm_in_use`) and a head's width is a
// multiple of 16, so do the attention's six products a row and key/value head, in place of at::bmm and the copies
// around it: the row's keys and values copied with zero rows up to a multiple of 16 keys, the probabilities
// [n x groups, n rounded up to 16] (zeros after each query's last key), the float32 sums rounded to bf16 where
// at::bmm's results were. The bench's update, paired: 17.53-19.14 s against 18.11-20.31 (benchmarks/README.md).

#if defined(__x86_64__)
// out = x cos + rotate_half(x) sin over one head of 2 half features, from bf16 x and float32 cos and sin, in
// float32, rounded to bf16.
SEAL_AVX512 inline void rotate(const c10::BFloat16* x, const float* c, const float* s, c10::BFloat16* out,
                               int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const auto lo = widen(x + i), hi = widen(x + half + i);
    narrow(out + i, _mm512_sub_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(c + i)),
                                  _mm512_mul_ps(hi, _mm512_loadu_ps(s + i))));
    narrow(out + half + i, _mm512_add_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(c + half + i)),
                                         _mm512_mul_ps(lo, _mm512_loadu_ps(s + half + i))));
  }
  for (; i < half; ++i) {
    const float lo = x[i], hi = x[half + i];
    out[i] = lo * c[i] - hi * s[i];
    out[half + i] = hi * c[half + i] + lo * s[half + i];
  }
}

// x's gradient through `rotate`, from the gradient d of its output, in float32, rounded to bf16.
SEAL_AVX512 inline void unrotate(const c10::BFloat16* d, const float* c, const float* s, c10::BFloat16* out,
                                 int64_t half) {
  int64_t i = 0;
  for (; i + 16 <= half; i += 16) {
    const auto lo = widen(d + i), hi = widen(d + half + i);
    narrow(out + i, _mm512_add_ps(_mm512_mul_ps(lo, _mm512_loadu_ps(c + i)),
                                  _mm512_mul_ps(hi, _mm512_loadu_ps(s + half + i))));
    narrow(out + half + i, _mm512_sub_ps(_mm512_mul_ps(hi, _mm512_loadu_ps(c + half + i)),
                                         _mm512_mul_ps(lo, _mm512_loadu_ps(s + i))));
  }
  for (; i < half; ++i) {
    const float lo = d[i], hi = d[half + i];
    out[i] = lo * c[i] + hi * s[half + i];
    out[half + i] = hi * c[half + i] - lo * s[i];
  }
}

// `values` (float32, in `row`'s lanes [0, count)) to bf16 in out[0, count), and zeros in out[count, length).
SEAL_AVX512 void narrow_row(const float* row, c10::BFloat16* out, int64_t count, int64_t length) {
  int64_t j = 0;
  for (; j + 16 <= count; j += 16) narrow(out + j, _mm512_loadu_ps(row + j));
  for (; j < count; ++j) out[j] = c10::BFloat16(row[j]);
  std::fill(out + count, out + length, c10::BFloat16(0.0f));
}

// One query's probabilities p[0, length): the softmax of `scaling` times its scores over keys [0, last], zero
// after; `row` (float32, length floats) is scratch.
SEAL_AVX512 void softmax_row(const c10::BFloat16* scores, c10::BFloat16* p, float* row, int64_t length,
                             int64_t last, float scaling) {
  const auto scale = _mm512_set1_ps(scaling);
  auto top = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j <= last; j += 16) {
    const auto m = lanes_left(last + 1 - j);
    top = _mm512_mask_max_ps(top, m, top, _mm512_mul_ps(widen(scores + j, m), scale));
  }
  const auto most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  auto total = _mm512_setzero_ps();
  for (int64_t j = 0; j <= last; j += 16) {
    const auto m = lanes_left(last + 1 - j);
    const auto e = Sleef_expf16_u10(_mm512_sub_ps(_mm512_mul_ps(widen(scores + j, m), scale), most));
    total = _mm512_mask_add_ps(total, m, total, e);
    _mm512_mask_storeu_ps(row + j, m, e);
  }
  const auto inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j <= last; j += 16) {
    const auto m = lanes_left(last + 1 - j);
    _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inverse));
  }
  narrow_row(row, p, last + 1, length);
}

// The scores' gradient for one query, `scaling` p (dp - sum(dp p)) over keys [0, last], zero after; `row`
// (float32, length floats) is scratch.
SEAL_AVX512 void softmax_backward_row(const c10::BFloat16* dp, const c10::BFloat16* p, c10::BFloat16* ds, float* row,
                                      int64_t length, int64_t last, float scaling) {
  auto dot = _mm512_setzero_ps();
  for (int64_t j = 0; j <= last; j += 16) {
    const auto m = lanes_left(last + 1 - j);
    dot = _mm512_add_ps(dot, _mm512_mul_ps(widen(dp + j, m), widen(p + j, m)));
  }
  const auto d = _mm512_set1_ps(_mm512_reduce_add_ps(dot)), scale = _mm512_set1_ps(scaling);
  for (int64_t j = 0; j <= last; j += 16) {
    const auto m = lanes_left(last + 1 - j);
    const auto g = _mm512_mul_ps(widen(p + j, m), _mm512_sub_ps(widen(dp + j, m), d));
    _mm512_mask_storeu_ps(row + j, m, _mm512_mul_ps(g, scale));
  }
  narrow_row(row, ds, last + 1, length);
}
#endif

constexpr int64_t kRowGrain = 16;  // rows a thread takes at least

struct Segment {
  int64_t start, end;
};

std::vector<Segment> segments_of(const at::Tensor& first) {
  const int64_t* fp = first.data_ptr<int64_t>();
  std::vector<Segment> segments;
  for (int64_t t = 0; t < first.size(0); ++t) {
    if (fp[t] == t) segments.push_back({t, t + 1});
    TORCH_CHECK(!segments.empty() && fp[t] == segments.back().start,
                "packed_attention: starts[t] must be the first token of t's row");
    segments.back().end = t + 1;
  }
  return segments;
}

// `each(t, h, row, query)` for every token t: for each query head h (query true), with row its row in the
// products' layout [kv heads, T x groups, width]; then for each key/value head h, with row its row in
// [kv heads, T, width]. Tokens are shared out between torch's threads.
template <typename Each>
void by_token(int64_t length, int64_t heads, int64_t kv_heads, const Each& each) {
  const int64_t groups = heads / kv_heads;
  at::parallel_for(0, length, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t h = 0; h < heads; ++h) each(t, h, ((h / groups) * length + t) * groups + h % groups, true);
      for (int64_t h = 0; h < kv_heads; ++h) each(t, h, h * length + t, false);
    }
  });
}

#ifdef SEAL_BRGEMM
// Whether the attention's products go through the micro-kernel: bf16 heads of a width its layout takes.
bool micro_attention(int64_t width) { return width % 16 == 0 && brgemm_in_use(); }

inline int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// rows [n, width] of one head from src (row stride width) in a [padded, width] copy, zeros after row n.
std::unique_ptr<Bf16[]> padded_rows(const Bf16* src, int64_t n, int64_t padded, int64_t width) {
  auto out = scratch<Bf16>(padded * width);
  std::copy(src, src + n * width, out.get());
  std::fill(out.get() + n * width, out.get() + padded * width, Bf16(0.0f));
  return out;
}

// out [n, width] bf16 (row stride width) = the first n columns of c [width, padded] float32, transposed, rounded.
SEAL_AVX512 void round_transposed(const float* c, int64_t width, int64_t padded, int64_t n, Bf16* out) {
  auto t = scratch<float>(padded * width);
  transpose_scaled(c, width, padded, 1.0f, t.get());
  round_rows(t.get(), n, width, out, width, false);
}

// One row of the pass (n tokens) and one key/value head through the micro-kernel, forward: the
// scores q k^T rounded to bf16, each query's softmax (probs [rows, padded], zeros after its last key), and
// out = probs v rounded to bf16. padded = n rounded up to 16: the keys and values are copied with zero rows
// after n, the layout's columns come in blocks of 16.
SEAL_AVX512 void micro_attention_forward(const Bf16* qh, const Bf16* kh, const Bf16* vh, Bf16* probs, Bf16* out,
                                         int64_t n, int64_t groups, int64_t width, float scale) {
  const int64_t rows = n * groups, padded = round16(n);
  const auto keys = padded_rows(kh, n, padded, width), values = padded_rows(vh, n, padded, width);
  auto c = scratch<float>(rows * std::max(padded, width));
  brgemm_product(qh, width, rows, lay_out(keys.get(), width, true, width, padded, 1.0f).get(), width, padded,
                 c.get(), padded);
  auto scores = scratch<Bf16>(rows * padded);
  round_rows(c.get(), rows, padded, scores.get(), padded, false);
  std::vector<float> row(padded);
  for (int64_t i = 0; i < rows; ++i)
    softmax_row(scores.get() + i * padded, probs + i * padded, row.data(), padded, i / groups, scale);
  brgemm_product(probs, padded, rows, lay_out(values.get(), width, false, padded, width, 1.0f).get(), padded,
                 width, c.get(), width);
  round_rows(c.get(), rows, width, out, width, false);
}

// Its backward, from dout [rows, width]: dq [rows, width], dk and dv [n, width], bf16.
SEAL_AVX512 void micro_attention_backward(const Bf16* qh, const Bf16* kh, const Bf16* vh, const Bf16* probs,
                                          const Bf16* dout, Bf16* dq, Bf16* dk, Bf16* dv, int64_t n, int64_t groups,
                                          int64_t width, float scale) {
  const int64_t rows = n * groups, padded = round16(n), re = even(rows);
  const auto keys = padded_rows(kh, n, padded, width), values = padded_rows(vh, n, padded, width);
  auto c = scratch<float>(std::max(rows, width) * std::max(padded, width));
  // dp = dout v^T, rounded; ds = the softmax's backward
  brgemm_product(dout, width, rows, lay_out(values.get(), width, true, width, padded, 1.0f).get(), width, padded,
                 c.get(), padded);
  auto dp = scratch<Bf16>(rows * padded), ds = scratch<Bf16>(rows * padded);
  round_rows(c.get(), rows, padded, dp.get(), padded, false);
  std::vector<float> row(padded);
  for (int64_t i = 0; i < rows; ++i)
    softmax_backward_row(dp.get() + i * padded, probs + i * padded, ds.get() + i * padded, row.data(), padded,
                         i / groups, scale);
  // dq = ds k
  brgemm_product(ds.get(), padded, rows, lay_out(keys.get(), width, false, padded, width, 1.0f).get(), padded,
                 width, c.get(), width);
  round_rows(c.get(), rows, width, dq, width, false);
  // dk = ds^T q, as (q^T ds)^T; dv = probs^T dout, as (dout^T probs)^T
  brgemm_product(transposed(qh, width, rows, width).get(), re, width,
                 lay_out(ds.get(), padded, false, rows, padded, 1.0f).get(), re, padded, c.get(), padded);
  round_transposed(c.get(), width, padded, n, dk);
  brgemm_product(transposed(dout, width, rows, width).get(), re, width,
                 lay_out(probs, padded, false, rows, padded, 1.0f).get(), re, padded, c.get(), padded);
  round_transposed(c.get(), width, padded, n, dv);
}
#endif

struct PackedAttention : public torch::autograd::Function<PackedAttention> {
  // q [.., T, heads x width], k and v [.., T, kv heads x width] bf16; cos and sin [.., T, width] float32;
  // starts [T] int64. Returns [.., T, heads x width] bf16.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& starts, int64_t heads,
                            double scaling) {
    TORCH_CHECK(avx512_available(), "packed_attention needs AVX-512");
    TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                    v.scalar_type() == at::kBFloat16,
                "packed_attention: q, k and v must be bf16");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "packed_attention: cos and sin must be float32");
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const int64_t length = starts.size(0), width = cos.size(-1), half = width / 2;
    const int64_t kv_heads = k.size(-1) / width, groups = heads / kv_heads;
    TORCH_CHECK(width % 2 == 0 && q.size(-1) == heads * width && heads % kv_heads == 0 &&
                    q.numel() == length * heads * width && k.sizes() == v.sizes() &&
                    k.numel() == length * kv_heads * width && cos.numel() == length * width &&
                    sin.numel() == length * width,
                "packed_attention: shapes do not agree");
    auto qc = q.contiguous(), kc = k.contiguous();
    auto c = cos.reshape({length, width}).contiguous(), s = sin.reshape({length, width}).contiguous();
    auto first = starts.to(at::kLong).contiguous();
    const auto segments = segments_of(first);
    auto qr = at::empty({kv_heads, length * groups, width}, qc.options());
    auto kr = at::empty({kv_heads, length, width}, qc.options());
    auto vt = v.reshape({length, kv_heads, width}).transpose(0, 1).contiguous();
    auto out = at::empty({kv_heads, length * groups, width}, qc.options());
    std::vector<at::Tensor> saved{qr, kr, vt, c, s, first};
#if defined(__x86_64__)
    const auto *qp = qc.data_ptr<c10::BFloat16>(), *kp = kc.data_ptr<c10::BFloat16>();
    const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
    auto *qrp = qr.data_ptr<c10::BFloat16>(), *krp = kr.data_ptr<c10::BFloat16>();
    by_token(length, heads, kv_heads, [&](int64_t t, int64_t h, int64_t row, bool query) {
      const auto* x = query ? qp + (t * heads + h) * width : kp + (t * kv_heads + h) * width;
      rotate(x, cp + t * width, sp + t * width, (query ? qrp : krp) + row * width, half);
    });
    const float scale = static_cast<float>(scaling);
#ifdef SEAL_BRGEMM
    const bool micro = micro_attention(width);
#else
    const bool micro = false;
#endif
    ctx->saved_data["micro"] = micro;
#ifdef SEAL_BRGEMM
    if (micro) {
      const auto *vp = vt.data_ptr<c10::BFloat16>();
      auto* op = out.data_ptr<c10::BFloat16>();
      for (const auto& seg : segments) {
        const int64_t size = seg.end - seg.start, rows = size * groups, padded = round16(size);
        auto probs = at::empty({kv_heads, rows, padded}, qc.options());
        auto* pp = probs.data_ptr<c10::BFloat16>();
        at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
          for (int64_t h = begin; h < end; ++h) {
            const int64_t q0 = (h * length + seg.start) * groups * width, k0 = (h * length + seg.start) * width;
            micro_attention_forward(qrp + q0, krp + k0, vp + k0, pp + h * rows * padded, op + q0, size, groups,
                                    width, scale);
          }
          release_micro_kernel();
        });
        saved.push_back(probs);
      }
    }
#endif
    for (size_t n = 0; !micro && n < segments.size(); ++n) {
      const auto& seg = segments[n];
      const int64_t size = seg.end - seg.start, rows = size * groups;
      const auto scores =
          at::bmm(qr.narrow(1, seg.start * groups, rows), kr.narrow(1, seg.start, size).transpose(1, 2));
      auto probs = at::empty_like(scores);
      const auto* scp = scores.data_ptr<c10::BFloat16>();
      auto* pp = probs.data_ptr<c10::BFloat16>();
      at::parallel_for(0, kv_heads * rows, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(size);
        for (int64_t i = begin; i < end; ++i)
          softmax_row(scp + i * size, pp + i * size, scratch.data(), size, (i % rows) / groups, scale);
      });
      out.narrow(1, seg.start * groups, rows).copy_(at::bmm(probs, vt.narrow(1, seg.start, size)));
      saved.push_back(probs);
    }
#endif
    ctx->save_for_backward(saved);
    ctx->saved_data["scaling"] = scaling;
    // [kv heads, T, query heads, width] -> [T, heads x width], shaped as q.
    return out.view({kv_heads, length, groups, width}).transpose(0, 1).reshape(q.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto saved = ctx->get_saved_variables();
    const auto &qr = saved[0], &kr = saved[1], &vt = saved[2], &c = saved[3], &s = saved[4], &first = saved[5];
    const float scale = static_cast<float>(ctx->saved_data["scaling"].toDouble());
    const int64_t kv_heads = kr.size(0), length = kr.size(1), width = kr.size(2), half = width / 2;
    const int64_t groups = qr.size(1) / length, heads = kv_heads * groups;
    const auto& grad = grads[0];
    const auto segments = segments_of(first);
    // The output's gradient laid out as the products' rows.
    auto dout = grad.to(at::kBFloat16).reshape({length, kv_heads, groups * width}).transpose(0, 1).contiguous()
                    .view({kv_heads, length * groups, width});
    auto dqr = at::empty_like(qr), dkr = at::empty_like(kr), dv = at::empty_like(vt);
    auto dq = at::empty({length, heads * width}, dout.options());
    auto dk = at::empty({length, kv_heads * width}, dout.options());
    const bool micro = ctx->saved_data["micro"].toBool();
#if defined(__x86_64__)
#ifdef SEAL_BRGEMM
    if (micro) {
      const auto *qp = qr.data_ptr<c10::BFloat16>(), *kp = kr.data_ptr<c10::BFloat16>();
      const auto *vp = vt.data_ptr<c10::BFloat16>(), *dp = dout.data_ptr<c10::BFloat16>();
      auto *dqp = dqr.data_ptr<c10::BFloat16>(), *dkp = dkr.data_ptr<c10::BFloat16>();
      auto* dvp = dv.data_ptr<c10::BFloat16>();
      for (size_t n = 0; n < segments.size(); ++n) {
        const auto& seg = segments[n];
        const int64_t size = seg.end - seg.start, rows = size * groups, padded = round16(size);
        const auto* pp = saved[6 + n].data_ptr<c10::BFloat16>();
        at::parallel_for(0, kv_heads, 1, [&](int64_t begin, int64_t end) {
          for (int64_t h = begin; h < end; ++h) {
            const int64_t q0 = (h * length + seg.start) * groups * width, k0 = (h * length + seg.start) * width;
            micro_attention_backward(qp + q0, kp + k0, vp + k0, pp + h * rows * padded, dp + q0, dqp + q0,
                                     dkp + k0, dvp + k0, size, groups, width, scale);
          }
          release_micro_kernel();
        });
      }
    }
#endif
    for (size_t n = 0; !micro && n < segments.size(); ++n) {
      const auto& seg = segments[n];
      const auto& probs = saved[6 + n];
      const int64_t size = seg.end - seg.start, rows = size * groups;
      const auto d_seg = dout.narrow(1, seg.start * groups, rows), v_seg = vt.narrow(1, seg.start, size);
      const auto dp = at::bmm(d_seg, v_seg.transpose(1, 2));
      auto ds = at::empty_like(dp);
      const auto *dpp = dp.data_ptr<c10::BFloat16>(), *pp = probs.data_ptr<c10::BFloat16>();
      auto* dsp = ds.data_ptr<c10::BFloat16>();
      at::parallel_for(0, kv_heads * rows, kRowGrain, [&](int64_t begin, int64_t end) {
        std::vector<float> scratch(size);
        for (int64_t i = begin; i < end; ++i)
          softmax_backward_row(dpp + i * size, pp + i * size, dsp + i * size, scratch.data(), size,
                               (i % rows) / groups, scale);
      });
      dqr.narrow(1, seg.start * groups, rows).copy_(at::bmm(ds, kr.narrow(1, seg.start, size)));
      dkr.narrow(1, seg.start, size).copy_(at::bmm(ds.transpose(1, 2), qr.narrow(1, seg.start * groups, rows)));
      dv.narrow(1, seg.start, size).copy_(at::bmm(probs.transpose(1, 2), d_seg));
    }
    const auto *dqrp = dqr.data_ptr<c10::BFloat16>(), *dkrp = dkr.data_ptr<c10::BFloat16>();
    const float *cp = c.data_ptr<float>(), *sp = s.data_ptr<float>();
    auto *dqp = dq.data_ptr<c10::BFloat16>(), *dkp = dk.data_ptr<c10::BFloat16>();
    by_token(length, heads, kv_heads, [&](int64_t t, int64_t h, int64_t row, bool query) {
      auto* out = query ? dqp + (t * heads + h) * width : dkp + (t * kv_heads + h) * width;
      unrotate((query ? dqrp : dkrp) + row * width, cp + t * width, sp + t * width, out, half);
    });
#endif
    auto shaped = [&](const at::Tensor& g) {
      auto shape = grad.sizes().vec();
      shape.back() = g.size(-1);
      return g.view(shape);
    };
    auto dv_rows = dv.transpose(0, 1).reshape({length, kv_heads * width});
    return {shaped(dq), shaped(dk), shaped(dv_rows), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor packed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                            const at::Tensor& sin, const at::Tensor& starts, int64_t heads, double scaling) {
  return PackedAttention::apply(q, k, v, cos, sin, starts, heads, scaling);
}

// rms_norm
//
// Llama's RMSNorm of float32 rows with a frozen float32 weight, handed on in bf16 (seal.multilora's
// NormInComputeDtype, whose numbers these are: x / sqrt(mean(x^2) + eps) * weight in float32, rounded once), as
// one autograd node: a pass over the row each way, each row in the core's cache, where PyTorch's operations make
// five passes over the activations forward and seven backward. The sum of squares is taken 16 lanes at a time,
// so the norms may differ from PyTorch's in the last bit of float32. Saves x and each row's 1 / rms. AVX-512 only.

#if defined(__x86_64__)
SEAL_AVX512 void rms_norm_rows(const float* x, const float* w, c10::BFloat16* out, float* rstd, int64_t begin,
                               int64_t end, int64_t width, float eps) {
  for (int64_t r = begin; r < end; ++r) {
    const float* row = x + r * width;
    auto squares = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
      const auto v = _mm512_maskz_loadu_ps(lanes_left(width - j), row + j);
      squares = _mm512_add_ps(squares, _mm512_mul_ps(v, v));
    }
    const float inverse = 1.0f / std::sqrt(_mm512_reduce_add_ps(squares) / static_cast<float>(width) + eps);
    rstd[r] = inverse;
    const auto scale = _mm512_set1_ps(inverse);
    int64_t j = 0;
    for (; j + 16 <= width; j += 16)
      narrow(out + r * width + j,
             _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row + j), scale), _mm512_loadu_ps(w + j)));
    for (; j < width; ++j) out[r * width + j] = row[j] * inverse * w[j];
  }
}

// dx = (g - n mean(g n)) / rms, with g = grad weight and n = x / rms, in float32.
SEAL_AVX512 void rms_norm_backward_rows(const c10::BFloat16* grad, const float* x, const float* w, const float* rstd,
                                        float* dx, int64_t begin, int64_t end, int64_t width) {
  for (int64_t r = begin; r < end; ++r) {
    const float *row = x + r * width;
    const auto* g = grad + r * width;
    const auto scale = _mm512_set1_ps(rstd[r]);
    auto dot = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
      const auto m = lanes_left(width - j);
      const auto gw = _mm512_mul_ps(widen(g + j, m), _mm512_maskz_loadu_ps(m, w + j));
      dot = _mm512_add_ps(dot, _mm512_mul_ps(gw, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), scale)));
    }
    const auto mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / static_cast<float>(width));
    for (int64_t j = 0; j < width; j += 16) {
      const auto m = lanes_left(width - j);
      const auto gw = _mm512_mul_ps(widen(g + j, m), _mm512_maskz_loadu_ps(m, w + j));
      const auto n = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), scale);
      _mm512_mask_storeu_ps(dx + r * width + j, m, _mm512_mul_ps(_mm512_sub_ps(gw, _mm512_mul_ps(n, mean)), scale));
    }
  }
}
#endif

// The norm of contiguous float32 x by a contiguous float32 weight: (the bf16 output, each row's 1 / rms).
std::pair<at::Tensor, at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& w, double eps) {
  const int64_t width = w.size(0), rows = x.numel() / width;
  auto out = at::empty(x.sizes(), x.options().dtype(at::kBFloat16));
  auto rstd = at::empty({rows}, x.options());
#if defined(__x86_64__)
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  auto* op = out.data_ptr<c10::BFloat16>();
  float* rp = rstd.data_ptr<float>();
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    rms_norm_rows(xp, wp, op, rp, begin, end, width, static_cast<float>(eps));
  });
#endif
  return {out, rstd};
}

struct RmsNorm : public torch::autograd::Function<RmsNorm> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps) {
    TORCH_CHECK(avx512_available(), "rms_norm needs AVX-512");
    TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                "rms_norm: x and weight must be float32");
    TORCH_CHECK(weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: weight must be [x's last size]");
    auto xc = x.contiguous(), w = weight.contiguous();
    auto [out, rstd] = rms_norm_forward(xc, w, eps);
    ctx->save_for_backward({xc, w, rstd});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    const int64_t width = w.size(0), rows = x.numel() / width;
    auto grad = grads[0].to(at::kBFloat16).contiguous();
    auto dx = at::empty_like(x);
#if defined(__x86_64__)
    const auto* gp = grad.data_ptr<c10::BFloat16>();
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *rp = rstd.data_ptr<float>();
    float* dp = dx.data_ptr<float>();
    at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
      rms_norm_backward_rows(gp, xp, wp, rp, dp, begin, end, width);
    });
#endif
    return {dx, at::Tensor(), at::Tensor()};
  }
};

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  return RmsNorm::apply(x, weight, eps);
}

// decode_layer
//
// A Llama decoder layer for `n` new tokens of each of `rows` rows, every row through its own adapter, without
// gradients: seal.decoding's LlamaSteps under bf16 autocast on an AVX-512 CPU, for a prompt (n of its tokens,
// left-padded) or a decoding step (n = 1), from the residual stream in to the residual stream out in one call.
// LlamaSteps' PyTorch operations for a step are about forty a layer (views, casts, the rotary embedding's five,
// the cache's writes, SDPA's flash kernel, about 250 us a layer for 20 rows of one query), and on the 2-core CPU
// they cost about as much as the products: a step of 5 rows took about 70 ms, its frozen weights' products 15;
// the prompt's pass through transformers' forward took about 1 s for 20 rows. Here the products are oneDNN's
// calls of LlamaSteps (a group's frozen weights with its slots' A stacked under them, each row's own slot kept by
// `mask`, then the block-diagonal B added on), and the rest is written out: the norms (rms_norm's rows), the
// rotary embedding in float32 from the bf16 projections (packed_attention's `rotate`), the new keys and values
// written into the cache at positions t..t+n-1, each query head's attention over its row's allowed positions up
// to its own (scores, softmax and weighted sum in float32, rounded to bf16 once, where SDPA rounds the
// probabilities to bf16 first; zeros for a padding token that may attend to nothing), SwiGLU (swiglu's rows) and
// both residual sums in float32.

#if defined(__x86_64__)
// One query head: out = softmax(scaling q K^T) V over the positions p < length with allowed[p], K and V
// [length, width] of its key/value head; zeros if none is allowed. `scores` is float32 scratch of length rounded
// up to 16. width % 16 == 0.
SEAL_AVX512 void decode_attention_head(const Bf16* q, const Bf16* keys, const Bf16* values, const bool* allowed,
                                       int64_t length, int64_t width, float scaling, float* scores, Bf16* out) {
  auto top = _mm512_set1_ps(-INFINITY);
  for (int64_t p = 0; p < length; ++p) {
    float s = -INFINITY;
    if (allowed[p]) {
      auto dot = _mm512_setzero_ps();
      for (int64_t j = 0; j < width; j += 16)
        dot = _mm512_fmadd_ps(widen(q + j), widen(keys + p * width + j), dot);
      s = _mm512_reduce_add_ps(dot) * scaling;
    }
    scores[p] = s;
  }
  for (int64_t p = 0; p < length; p += 16) {
    const auto m = lanes_left(length - p);
    top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, scores + p));
  }
  const float highest = _mm512_reduce_max_ps(top);
  if (highest == -INFINITY) {
    std::fill(out, out + width, Bf16(0.0f));
    return;
  }
  // The allowed keys' weights are also packed, in key order, after `scores` (its second half), and summed
  // there 16 at a time: the same sum wherever the row's padding puts its keys in the cache (LlamaSteps
  // computes the prompts' shared first tokens apart).
  float* packed = scores + round16(length);
  int64_t count = 0;
  const auto most = _mm512_set1_ps(highest), none = _mm512_set1_ps(-INFINITY);
  for (int64_t p = 0; p < length; p += 16) {  // exp(-inf) = 0 where not allowed
    const auto m = lanes_left(length - p);
    const auto s = _mm512_maskz_loadu_ps(m, scores + p);
    const auto e = Sleef_expf16_u10(_mm512_sub_ps(s, most));
    _mm512_mask_storeu_ps(scores + p, m, e);
    const __mmask16 kept = _mm512_mask_cmp_ps_mask(m, s, none, _CMP_NEQ_OQ);
    _mm512_mask_compressstoreu_ps(packed + count, kept, e);
    count += __builtin_popcount(kept);
  }
  auto total = _mm512_setzero_ps();
  for (int64_t p = 0; p < count; p += 16)
    total = _mm512_add_ps(total, _mm512_maskz_loadu_ps(lanes_left(count - p), packed + p));
  const auto inverse = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int64_t j = 0; j < width; j += 16) {
    auto sum = _mm512_setzero_ps();
    for (int64_t p = 0; p < length; ++p)
      if (scores[p] != 0.0f) sum = _mm512_fmadd_ps(_mm512_set1_ps(scores[p]), widen(values + p * width + j), sum);
    narrow(out + j, _mm512_mul_ps(sum, inverse));
  }
}

// out = x + y over [begin, end), float32 x and bf16 y, begin and end multiples of 16.
SEAL_AVX512 void add_range(const float* x, const Bf16* y, float* out, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; i += 16)
    _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(x + i), widen(y + i)));
}
#endif

#ifdef SEAL_BRGEMM
// decode_group's adapter products where b is laid out by laid_weight ([parts x width, frozen]): each token reads
// only its row's own slot's columns of x A^T in each part (its mask's ones, one even span) and the matching rows of
// b, where the stacked product multiplies every slot's columns, the others zeroed, by all of b's rows. With 4 slots
// a token's adapter products are then a quarter of the stacked ones, and the rows of b that pair one part's
// columns with another part's outputs (zeros) are never read. Zero products add nothing to the float32 sums, so
// the result is bit for bit the stacked one. `bounds`: each part's first output column, then the frozen outputs'
// number. nullopt where the mask or the parts' bounds (multiples of the layout's blocks) do not allow it.
c10::optional<at::Tensor> own_slots_product(const at::Tensor& y, const at::Tensor& b, const at::Tensor& mask,
                                            const std::vector<int64_t>& bounds, int64_t n) {
  const int64_t tokens = y.size(0), columns = y.size(1), width = mask.size(1), rows = mask.size(0);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1, frozen = bounds.back(), inner = parts * width;
  if (columns != frozen + inner || b.numel() != inner * frozen || rows * n != tokens) return c10::nullopt;
  for (int64_t p = 1; p < parts; ++p)
    if (bounds[p] % kBlock) return c10::nullopt;
  struct Run {
    int64_t t0, t1, lo, hi;  // tokens [t0, t1), their slot's columns [lo, hi) of each part
  };
  std::vector<Run> runs;
  const auto* mp = mask.data_ptr<Bf16>();
  for (int64_t r = 0; r < rows; ++r) {
    const auto on = [&](int64_t j) { return static_cast<float>(mp[r * width + j]) != 0.0f; };
    int64_t lo = 0;
    while (lo < width && !on(lo)) ++lo;
    int64_t hi = lo;
    while (hi < width && on(hi)) ++hi;
    for (int64_t j = hi; j < width; ++j)
      if (on(j)) return c10::nullopt;
    if (lo % 2 || hi % 2) return c10::nullopt;
    if (lo == hi) continue;  // the base model: its outputs are the frozen ones
    if (!runs.empty() && runs.back().t1 == r * n && runs.back().lo == lo && runs.back().hi == hi)
      runs.back().t1 += n;
    else
      runs.push_back({r * n, (r + 1) * n, lo, hi});
  }
  auto out = y.narrow(1, 0, frozen).contiguous();
  const auto* yp = y.data_ptr<Bf16>();
  const auto* bp = b.data_ptr<Bf16>();
  auto* op = out.data_ptr<Bf16>();
  at::parallel_for(0, (frozen + kBlock - 1) / kBlock, 1, [&](int64_t b0, int64_t b1) {
    auto c = scratch<float>(tokens * kBlock);
    for (int64_t j0 = b0 * kBlock; j0 < std::min(frozen, b1 * kBlock); j0 += kBlock) {
      const int64_t w = std::min(kBlock, frozen - j0);
      const int64_t p = std::upper_bound(bounds.begin(), bounds.end(), j0) - bounds.begin() - 1;
      const auto* block = reinterpret_cast<const uint32_t*>(bp + inner * j0);
      for (const auto& run : runs) {
        const int64_t m = run.t1 - run.t0, first = p * width + run.lo, pairs = (run.hi - run.lo) / 2;
        dot_width(w, yp + run.t0 * columns + frozen + first, columns, m, block + (first / 2) * w, pairs, c.get(), w,
                  nullptr, 0, {}, false);
        round_rows(c.get(), m, w, op + run.t0 * frozen + j0, frozen, true);
      }
    }
  });
  return out;
}
#endif

// A group's products for `h` [rows x n, in] (seal.decoding.Group): the frozen outputs plus each token's row's own
// adapters'. `weight` and `b` are laid out by oneDNN or by laid_weight; `parts` projections share them, each with
// mask's width of A rows, their outputs `split` (empty: equal parts).
at::Tensor decode_group(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& b, const at::Tensor& mask,
                        int64_t parts, int64_t n, const std::vector<int64_t>& split = {}) {
  static auto binary = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                           .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                             const c10::optional<at::Tensor>&, c10::string_view)>();
  auto y = packed_product(h, weight, c10::nullopt);
  const int64_t tokens = y.size(0), columns = y.size(1), width = mask.size(1), frozen = columns - parts * width;
#ifdef SEAL_BRGEMM
  if (b.dim() == 1) {
    std::vector<int64_t> bounds{0};
    for (int64_t p = 0; p < parts; ++p) bounds.push_back(bounds.back() + (split.empty() ? frozen / parts : split[p]));
    if (bounds.back() == frozen) {
      if (auto out = own_slots_product(y, b, mask, bounds, n)) return *out;
    }
  }
#endif
  auto hidden = at::empty({tokens, parts * width}, y.options());
  const auto *yp = y.data_ptr<Bf16>(), *mp = mask.data_ptr<Bf16>();
  auto* hp = hidden.data_ptr<Bf16>();
  for (int64_t i = 0; i < tokens; ++i) {  // the columns of the row's own slot in each part; zeros elsewhere
    const auto* keep = mp + (i / n) * width;
    for (int64_t p = 0; p < parts; ++p)
      for (int64_t j = 0; j < width; ++j)
        hp[(i * parts + p) * width + j] =
            static_cast<float>(keep[j]) != 0.0f ? yp[i * columns + frozen + p * width + j] : Bf16(0.0f);
  }
  if (b.dim() == 1) return own_product(hidden, b, y.narrow(1, 0, frozen));
  return binary.call(hidden, y.narrow(1, 0, frozen).contiguous(), b, c10::nullopt, "add");
}

at::Tensor decode_layer(const at::Tensor& x, const at::Tensor& norm_in, const at::Tensor& norm_post, double eps,
                        std::vector<at::Tensor> groups, const at::Tensor& mask, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& keys, const at::Tensor& values,
                        const at::Tensor& allowed, int64_t t, int64_t heads, double scaling) {
  TORCH_CHECK(avx512_available(), "decode_layer needs AVX-512");
  TORCH_CHECK(groups.size() == 8, "decode_layer: groups must be the weight and B of qkv, o, gate_up and down");
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous() && values.is_contiguous() && keys.sizes() == values.sizes() &&
                  keys.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16,
              "decode_layer: keys and values must be bf16 [rows, kv_heads, capacity, head_dim], contiguous");
  const int64_t rows = keys.size(0), kv_heads = keys.size(1), capacity = keys.size(2), width = keys.size(3);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && x.size(0) % rows == 0,
              "decode_layer: x must be float32 [rows x n, hidden]");
  const int64_t tokens = x.size(0), n = tokens / rows, hidden_size = x.size(1), half = width / 2;
  TORCH_CHECK(width % 16 == 0 && hidden_size % 16 == 0 && heads % kv_heads == 0 && t + n <= capacity,
              "decode_layer: head_dim and hidden size must be multiples of 16, and t + n within the cache");
  TORCH_CHECK(mask.scalar_type() == at::kBFloat16 && mask.is_contiguous() && mask.dim() == 2 && mask.size(0) == rows,
              "decode_layer: mask must be bf16 [rows, width]");
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.is_contiguous() && allowed.dim() == 2 &&
                  allowed.size(0) == rows && allowed.size(1) == capacity,
              "decode_layer: allowed must be bool [rows, capacity]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == tokens * width && sin.numel() == tokens * width,
              "decode_layer: cos and sin must be float32 [rows x n, head_dim]");
  TORCH_CHECK(norm_in.scalar_type() == at::kFloat && norm_post.scalar_type() == at::kFloat &&
                  norm_in.is_contiguous() && norm_post.is_contiguous() && norm_in.numel() == hidden_size &&
                  norm_post.numel() == hidden_size,
              "decode_layer: the norms' weights must be float32 [hidden]");
  auto out = at::empty_like(x);
#if defined(__x86_64__)
  const auto by_token = [&](const auto& each) {
    at::parallel_for(0, tokens, kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) each(i);
    });
  };
  const auto norm = [&](const at::Tensor& in, const at::Tensor& weight) {
    return rms_norm_forward(in, weight, eps).first;
  };
  const auto residual = [&](const float* in, const at::Tensor& y) {
    const auto* yp = y.data_ptr<Bf16>();
    auto* op = out.data_ptr<float>();
    by_token([&](int64_t i) { add_range(in, yp, op, i * hidden_size, (i + 1) * hidden_size); });
  };
  auto qkv = decode_group(norm(x, norm_in), groups[0], groups[1], mask, 3, n,
                          {heads * width, kv_heads * width, kv_heads * width});
  const int64_t qkv_width = qkv.size(1);
  TORCH_CHECK(qkv_width == (heads + 2 * kv_heads) * width, "decode_layer: q, k and v do not match the heads");
  auto q = at::empty({tokens, heads, width}, qkv.options());
  auto attended = at::empty({tokens, heads * width}, qkv.options());
  const auto* qkvp = qkv.data_ptr<Bf16>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  auto *qp = q.data_ptr<Bf16>(), *kp = keys.data_ptr<Bf16>(), *vp = values.data_ptr<Bf16>();
  by_token([&](int64_t i) {  // the rotated queries; the new key (rotated) and value into the cache
    const int64_t r = i / n, position = t + i % n;
    const auto* row = qkvp + i * qkv_width;
    const float *c = cp + i * width, *s = sp + i * width;
    for (int64_t h = 0; h < heads; ++h) rotate(row + h * width, c, s, qp + (i * heads + h) * width, half);
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t cell = ((r * kv_heads + h) * capacity + position) * width;
      rotate(row + (heads + h) * width, c, s, kp + cell, half);
      std::copy(row + (heads + kv_heads + h) * width, row + (heads + kv_heads + h + 1) * width, vp + cell);
    }
  });
  const bool* ap = allowed.data_ptr<bool>();
  auto* op = attended.data_ptr<Bf16>();
  const int64_t serves = heads / kv_heads;  // query heads a key/value head serves
  at::parallel_for(0, tokens * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(2 * round16(t + n));  // the weights, then the allowed ones packed
    for (int64_t j = begin; j < end; ++j) {
      const int64_t i = j / heads, r = i / n, length = t + i % n + 1;
      const int64_t kv = (r * kv_heads + (j % heads) / serves) * capacity * width;
      decode_attention_head(qp + j * width, kp + kv, vp + kv, ap + r * capacity, length, width,
                            static_cast<float>(scaling), scores.data(), op + j * width);
    }
  });
  residual(x.data_ptr<float>(), decode_group(attended, groups[2], groups[3], mask, 1, n));
  auto gate_up = decode_group(norm(out, norm_post), groups[4], groups[5], mask, 2, n);
  const int64_t inner = gate_up.size(1) / 2;
  auto product = at::empty({tokens, inner}, gate_up.options());
  const auto* gp = gate_up.data_ptr<Bf16>();
  auto* pp = product.data_ptr<Bf16>();
  by_token([&](int64_t i) {
    swiglu_forward_range(gp + 2 * i * inner, gp + (2 * i + 1) * inner, pp + i * inner, 0, inner);
  });
  residual(out.data_ptr<float>(), decode_group(product, groups[6], groups[7], mask, 1, n));
#endif
  return out;
}

// A bf16 matrix [m, n] transposed into a new tensor [n, m] (m even, n % 16 == 0), its columns shared between
// torch's threads 16 at a time, through `transpose_into`'s 32 x 16 tiles.
at::Tensor transposed_copy(const at::Tensor& w) {
  TORCH_CHECK(avx512_available() && w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 2 == 0 &&
                  w.size(1) % 16 == 0,
              "transposed_copy: a bf16 [m, n] matrix, m even and n a multiple of 16, on an AVX-512 CPU");
  auto src = w.contiguous();
  const int64_t m = src.size(0), n = src.size(1);
  auto out = at::empty({n, m}, src.options());
#ifdef SEAL_BRGEMM
  const auto* sp = src.data_ptr<Bf16>();
  auto* op = out.data_ptr<Bf16>();
  at::parallel_for(0, n / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) transpose_into(sp + b * 16, n, m, 16, op + b * 16 * m);  // [16, m]
  });
#endif
  return out;
}

// How many of torch's threads an at::parallel_for of this extension runs on, given as many items as threads.
int64_t parallel_threads() {
  std::vector<char> ran(at::get_num_threads(), 0);
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { ran[at::get_thread_num()] = 1; });
  return std::count(ran.begin(), ran.end(), 1);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lora_linear", &lora_linear,
        "x W^T + bias + scaling (x A^T) B^T on runs of rows: one autograd node, or none without gradients",
        py::call_guard<py::gil_scoped_release>());
  m.def("lora_linear_stacked", &lora_linear_stacked,
        "x W^T + bias + scaling ((x A^T) * mask) B^T with stacked adapters, without gradients",
        py::call_guard<py::gil_scoped_release>());
  m.def("set_brgemm", &set_brgemm,
        "turn the adapters' and the attention's products through oneDNN's micro-kernel on or off");
  m.def("set_own_products", &set_own_products,
        "on a CPU with AVX-512 BF16, compute the micro-kernel's products with our own kernel even where oneDNN's "
        "is offered (tests)");
  m.def("onednn_micro_kernel", &onednn_micro_kernel, "whether oneDNN's bf16 micro-kernel is offered (AMX)");
  m.def("avx512_bf16_available", &avx512_bf16_available, "whether this CPU runs our own micro-kernel (AVX-512 BF16)");
  m.def("brgemm_in_use", &brgemm_in_use,
        "whether the adapters' and the attention's bf16 products go through oneDNN's micro-kernel");
  m.def("parallel_threads", &parallel_threads, "how many of torch's threads this extension's parallel_for uses");
  m.def("avx512_available", &avx512_available,
        "whether this CPU runs swiglu, rms_norm and packed_attention (AVX-512)");
  m.def("swiglu", &swiglu, "silu(gate) * up for bf16 gate and up, one autograd node",
        py::call_guard<py::gil_scoped_release>());
  m.def("token_losses", &token_losses,
        "each row's cross-entropy through the frozen output projection, and its gradient for the rows",
        py::call_guard<py::gil_scoped_release>());
  m.def("rms_norm", &rms_norm, "Llama's RMSNorm of float32 rows with a frozen weight, handed on in bf16",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_layer", &decode_layer,
        "a Llama decoder layer for n new tokens a row through stacked adapters in bf16, writing the cache from t",
        py::call_guard<py::gil_scoped_release>());
  m.def("own_frozen_products", &own_frozen_products,
        "whether frozen bf16 weights are laid out by laid_weight here (AVX-512 BF16 without oneDNN's micro-kernel)");
  m.def("laid_weight", &laid_weight,
        "a bf16 [out, in] weight laid out for own_product: W^T for the forward, W (backward=True) for the input's "
        "gradient", py::call_guard<py::gil_scoped_release>());
  m.def("set_product_order", &set_product_order,
        "the weights laid out by laid_weight in the order a pass multiplies by them, and their inner sizes "
        "(each one's successor is fetched while its last block is multiplied); empty lists forget the order");
  m.def("laid_product", &own_product, "bf16 rows times a weight laid out by laid_weight (plus `added`), on torch's "
        "threads", py::arg("x"), py::arg("laid"), py::arg("added") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("transposed_copy", &transposed_copy, "a bf16 matrix transposed, on all of torch's threads");
  m.def("packed_attention", &packed_attention,
        "rotary embedding and attention of a packed pass for bf16 q, k, v: one autograd node",
        py::call_guard<py::gil_scoped_release>());
}
