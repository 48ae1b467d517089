// A CPU kernel for y = x @ W with W stored as packed integer codes (docs/packed-format.md),
// registered with XLA through its FFI (paretoq_jax/kernels/__init__.py builds and loads it).
//
//   y[b, o] = (max(scale[o], eps) / n) * (mult * acc[b, o] + offset * sum_i x[b, i])
//   acc[b, o] = sum_i x[b, i] * u[i, o]
//
// u are the stored unsigned codes: the quantizer's W = a (k + z) / n with k = mult u + kmin
// gives offset = kmin + z (quant/packed_linear.py, the same formula). The packed array is
// uint8 (P, R, out): byte plane p, byte row r, output column o (contiguous). A plane of a
// bit field of width w holds 8 / w slabs; bits w*j.. of byte r are the code of input row
// (g * 8/w + j) * R + r (g: the plane's index within its field). Base 3 stores 5 slabs as the
// digits of one byte. Layout "int8" is one plane of signed int8 codes (the int8 LM head).
//
// Each output column block is vectorized across columns (GCC/Clang vector extensions: AVX-512
// or AVX2 from -march=native): load the bytes of a byte row, widen them to 32-bit lanes, peel
// each slab's field off with a shift and a mask, convert to float and multiply-add with the
// broadcast activation of that slab's input row. Activations are copied once per call into
// per-plane slab order and pre-multiplied by the field's power of two (exact). The columns are
// split across a small persistent thread pool.

#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <sched.h>
#include <string>
#include <string_view>
#include <thread>
#include <unistd.h>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kAccRegs = 20;  // accumulator registers out of 32
#else
constexpr int kLanes = 8;
constexpr int kAccRegs = 9;  // of 16 (AVX2): the rest hold codes, a product term, masks
#endif

constexpr int kMaxRows = 8;  // batch rows per register block (one activation chunk)

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));
typedef uint8_t vu8 __attribute__((vector_size(kLanes)));
typedef int8_t vs8 __attribute__((vector_size(kLanes)));


// Code kinds: a bit field of width 1, 2 or 4; base-3 digits; signed int8.
enum Kind { kW1 = 1, kW2 = 2, kW4 = 4, kBase3 = 3, kInt8 = 8 };

constexpr int slabs_of(int kind) {
  return kind == kBase3 ? 5 : kind == kInt8 ? 1 : 8 / kind;
}

// Column vectors per block for `rows` batch rows: as many as the accumulators allow (<= 4).
constexpr int vectors_for(int rows) { return std::min(4, std::max(1, kAccRegs / rows)); }

struct Plane {
  int kind;          // Kind
  int64_t x_offset;  // this plane's first float in a chunk of the activation copy
};

// Activations are copied per chunk of kMaxRows batch rows as (plane, byte row r, slab j,
// kMaxRows rows): the values a byte row multiplies are contiguous, at compile-time offsets.
struct Problem {
  const float* xs;     // activation chunks, each xs_chunk floats
  int64_t xs_chunk;
  const uint8_t* packed;
  int64_t rows;        // R: byte rows per plane
  int64_t out;         // output columns (the packed array's last axis)
  std::vector<Plane> planes;
  int64_t batch;
};

// kLanes bytes at p, zero- (or for int8 sign-) extended to 32-bit lanes. Intrinsics where
// they exist: GCC 12 turns a generic byte-vector conversion into scalar inserts.
inline vi widen(const uint8_t* p, int kind) {
#if defined(__AVX512F__)
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return (vi)(kind == kInt8 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b));
#elif defined(__AVX2__)
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return (vi)(kind == kInt8 ? _mm256_cvtepi8_epi32(b) : _mm256_cvtepu8_epi32(b));
#else
  if (kind == kInt8) {
    vs8 b;
    std::memcpy(&b, p, sizeof(b));
    return __builtin_convertvector(b, vi);
  }
  vu8 b;
  std::memcpy(&b, p, sizeof(b));
  return __builtin_convertvector(b, vi);
#endif
}

// acc[NB][NV] += the products of one plane over all byte rows, for columns at `col`
// (`stride` bytes between byte rows).
template <int KIND, int NB, int NV>
inline void plane_block(vf (&acc)[NB][NV], const uint8_t* plane, int64_t stride, int64_t rows,
                        const float* xs) {
  constexpr int K = slabs_of(KIND);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = plane + r * stride;
    const float* xr = xs + r * K * kMaxRows;
    vi v[NV];
    for (int n = 0; n < NV; ++n) v[n] = widen(row + n * kLanes, KIND);
    for (int j = 0; j < K; ++j) {
      for (int n = 0; n < NV; ++n) {
        vi d;
        if constexpr (KIND == kBase3) {
          const vi q = (v[n] * 171) >> 9;  // v / 3, exact for 0 <= v < 256
          d = v[n] - q * 3;
          v[n] = q;
        } else if constexpr (KIND == kInt8) {
          d = v[n];
        } else {
          d = (v[n] >> (KIND * j)) & ((1 << KIND) - 1);
        }
        const vf u = __builtin_convertvector(d, vf);
        for (int b = 0; b < NB; ++b) acc[b][n] += xr[j * kMaxRows + b] * u;
      }
    }
  }
}

// acc (NB rows, NV vectors of columns starting at `col`) over every plane; written to `dst`
// (NB x NV*kLanes floats, row-major).
template <int NB>
void column_block(const Problem& pb, const uint8_t* packed, int64_t stride, int64_t col,
                  const float* xs, float* dst) {
  constexpr int NV = vectors_for(NB);
  vf acc[NB][NV];
  for (int b = 0; b < NB; ++b)
    for (int n = 0; n < NV; ++n) acc[b][n] = vf{};
  const int64_t plane_bytes = pb.rows * stride;
  for (size_t p = 0; p < pb.planes.size(); ++p) {
    const uint8_t* plane = packed + p * plane_bytes + col;
    const float* x = xs + pb.planes[p].x_offset;
    switch (pb.planes[p].kind) {
      case kW1: plane_block<kW1, NB, NV>(acc, plane, stride, pb.rows, x); break;
      case kW2: plane_block<kW2, NB, NV>(acc, plane, stride, pb.rows, x); break;
      case kW4: plane_block<kW4, NB, NV>(acc, plane, stride, pb.rows, x); break;
      case kBase3: plane_block<kBase3, NB, NV>(acc, plane, stride, pb.rows, x); break;
      case kInt8: plane_block<kInt8, NB, NV>(acc, plane, stride, pb.rows, x); break;
    }
  }
  for (int b = 0; b < NB; ++b)
    for (int n = 0; n < NV; ++n) std::memcpy(dst + (b * NV + n) * kLanes, &acc[b][n], sizeof(vf));
}

using BlockFn = void (*)(const Problem&, const uint8_t*, int64_t, int64_t, const float*, float*);
constexpr BlockFn kBlocks[kMaxRows + 1] = {nullptr,          column_block<1>, column_block<2>,
                                           column_block<3>,  column_block<4>, column_block<5>,
                                           column_block<6>,  column_block<7>, column_block<8>};
constexpr int kWidest = 4 * kLanes;  // widest column block

// acc (B, out) for output columns [c0, c1); c1 - c0 a multiple of the block width except at
// the very end of the matrix, whose last partial block runs on a zero-padded copy.
void compute_columns(const Problem& pb, int64_t c0, int64_t c1, float* acc) {
  std::vector<uint8_t> tail;
  float buf[kMaxRows * kWidest];
  // Column blocks of the widest width (shared by every batch chunk, so a block's bytes are
  // read from memory once and stay in cache for the other chunks), split for narrower ones.
  for (int64_t cb = c0; cb < c1; cb += kWidest) {
    const int64_t cb_end = std::min<int64_t>(cb + kWidest, c1);
    for (int64_t b0 = 0; b0 < pb.batch; b0 += kMaxRows) {
      const int nb = static_cast<int>(std::min<int64_t>(kMaxRows, pb.batch - b0));
      const int width = vectors_for(nb) * kLanes;
      const float* xs = pb.xs + (b0 / kMaxRows) * pb.xs_chunk;
      for (int64_t c = cb; c < cb_end; c += width) {
        const int64_t w = std::min<int64_t>(width, cb_end - c);
        if (w == width && c + width <= pb.out) {
          kBlocks[nb](pb, pb.packed, pb.out, c, xs, buf);
        } else {  // partial block: copy its columns of every byte row, zero-padded
          const int64_t lines = static_cast<int64_t>(pb.planes.size()) * pb.rows;
          tail.assign(lines * width, 0);
          for (int64_t l = 0; l < lines; ++l)
            std::memcpy(tail.data() + l * width, pb.packed + l * pb.out + c, w);
          kBlocks[nb](pb, tail.data(), width, 0, xs, buf);
        }
        for (int b = 0; b < nb; ++b)
          std::memcpy(acc + (b0 + b) * pb.out + c, buf + b * width, w * sizeof(float));
      }
    }
  }
}

// ---- a small persistent thread pool (a kernel call is ~10-500 us: no thread per call) ----

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool;  // never destroyed: no join of sleeping workers at exit
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(i) for i in [0, n) on up to size() threads; inline when the pool is busy (XLA may run
  // two independent custom calls at once) or after a fork.
  void run(int n, const std::function<void(int)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (n <= 1 || workers_.empty() || !busy.owns_lock() || getpid() != pid_) {
      for (int i = 0; i < n; ++i) fn(i);
      return;
    }
    uint64_t gen;
    {
      std::lock_guard<std::mutex> lock(m_);
      task_.store(&fn, std::memory_order_relaxed);
      n_tasks_.store(n, std::memory_order_relaxed);
      pending_.store(n, std::memory_order_relaxed);
      gen = (state_.load(std::memory_order_relaxed) >> 32) + 1;
      state_.store(gen << 32, std::memory_order_release);  // publishes the task
    }
    cv_.notify_all();
    work(gen);
    while (pending_.load(std::memory_order_acquire) > 0) pause();
  }

 private:
  Pool() : pid_(getpid()) {
    int n = 0;
    if (const char* env = std::getenv("PARETOQ_KERNEL_THREADS")) n = std::atoi(env);
    if (n <= 0) {
      cpu_set_t set;
      n = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set)
                                                      : std::thread::hardware_concurrency();
    }
    for (int i = 1; i < std::max(1, n); ++i) workers_.emplace_back([this] { loop(); });
  }
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  // Take task indices of generation `gen` until none are left. The index and the generation
  // share one atomic word, so a worker that wakes late never takes a task of the next call.
  void work(uint64_t gen) {
    uint64_t s = state_.load(std::memory_order_acquire);
    while ((s >> 32) == gen && static_cast<int>(s & 0xffffffffu) < n_tasks_.load()) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) {
        (*task_.load())(static_cast<int>(s & 0xffffffffu));
        pending_.fetch_sub(1, std::memory_order_release);
        s = state_.load(std::memory_order_acquire);
      }
    }
  }
  void loop() {
    uint64_t seen = state_.load() >> 32;
    for (;;) {
      // Spin a little (decode calls follow each other within microseconds), then sleep.
      auto current = [&] { return state_.load(std::memory_order_acquire) >> 32; };
      for (int s = 0; s < 4000 && current() == seen; ++s) pause();
      if (current() == seen) {
        std::unique_lock<std::mutex> lock(m_);
        cv_.wait(lock, [&] { return current() != seen; });
      }
      seen = current();
      work(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> state_{0};  // generation << 32 | next task index
  std::atomic<int> n_tasks_{0}, pending_{0};
  std::atomic<const std::function<void(int)>*> task_{nullptr};
  pid_t pid_;
};

// Field widths of a layout name: "1", "2", "4", "2,1" (3 bits), "base3", "int8".
bool parse_layout(std::string_view layout, std::vector<int>* kinds, int* slabs) {
  kinds->clear();
  if (layout == "base3") {
    kinds->push_back(kBase3);
    *slabs = 5;
    return true;
  }
  if (layout == "int8") {
    kinds->push_back(kInt8);
    *slabs = 1;
    return true;
  }
  *slabs = 8;
  for (size_t i = 0; i < layout.size(); i += 2) {
    const int w = layout[i] - '0';
    if ((w != 1 && w != 2 && w != 4) || (i + 1 < layout.size() && layout[i + 1] != ','))
      return false;
    for (int g = 0; g < w; ++g) kinds->push_back(w);  // a field of width w fills w planes
  }
  return !kinds->empty();
}

ffi::Error PackedLinearImpl(ffi::Buffer<ffi::F32> x, ffi::AnyBuffer packed,
                            ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> layer,
                            ffi::ResultBuffer<ffi::F32> y,
                            std::string_view layout, int64_t in_features, float mult,
                            float offset, float n, float eps) {
  std::vector<int> kinds;
  int n_slabs = 0;
  if (!parse_layout(layout, &kinds, &n_slabs))
    return ffi::Error::InvalidArgument("packed_linear: unknown layout " + std::string(layout));
  const bool int8 = kinds[0] == kInt8;
  if (packed.element_type() != (int8 ? ffi::DataType::S8 : ffi::DataType::U8))
    return ffi::Error::InvalidArgument("packed_linear: codes must be uint8 (int8 for int8)");
  const auto xd = x.dimensions(), pd = packed.dimensions();
  if (xd.size() != 2 || (pd.size() != 3 && pd.size() != 4) || xd[1] != in_features ||
      layer.element_count() != 1)
    return ffi::Error::InvalidArgument(
        "packed_linear: x must be (B, in), packed (P, R, out) or (L, P, R, out), layer a scalar");
  // Stacked codes (L, P, R, out) with scales (L, out): the product of layer `layer` only, read
  // in place (a slice taken in XLA would be copied into its own buffer first).
  const int64_t n_layers = pd.size() == 4 ? pd[0] : 1, at = pd.size() == 4 ? *layer.typed_data() : 0;
  const size_t d0 = pd.size() - 3;
  const int64_t batch = xd[0], planes = pd[d0], rows = pd[d0 + 1], out = pd[d0 + 2];
  if (planes != static_cast<int64_t>(kinds.size()) || rows * n_slabs < in_features ||
      scale.element_count() != static_cast<size_t>(n_layers * out) ||
      y->element_count() != batch * out)
    return ffi::Error::InvalidArgument("packed_linear: shapes do not match the layout");
  if (at < 0 || at >= n_layers)
    return ffi::Error::InvalidArgument("packed_linear: layer index out of range");

  // Activations in chunks of kMaxRows batch rows (Problem), times the power of two of the
  // plane's field (its bit offset in u); input rows past in_features are 0.
  Problem pb;
  pb.packed = static_cast<const uint8_t*>(packed.untyped_data()) + at * planes * rows * out;
  pb.rows = rows;
  pb.out = out;
  pb.batch = batch;
  int64_t width = 0;
  for (int k : kinds) {
    pb.planes.push_back({k, width});
    width += slabs_of(k) * rows * kMaxRows;
  }
  pb.xs_chunk = width;
  thread_local std::vector<float> xs_buf, x_sum;
  xs_buf.assign((batch + kMaxRows - 1) / kMaxRows * width, 0.f);
  x_sum.assign(batch, 0.f);
  const float* xin = x.typed_data();
  for (int64_t b = 0; b < batch; ++b) {
    const float* xb = xin + b * in_features;
    float s = 0.f;
    for (int64_t i = 0; i < in_features; ++i) s += xb[i];
    x_sum[b] = s;
    float* chunk = xs_buf.data() + (b / kMaxRows) * width + b % kMaxRows;
    size_t p = 0;
    int shift = 0;
    while (p < kinds.size()) {
      const int kind = kinds[p];
      const int field = (kind == kBase3 || kind == kInt8) ? 1 : kind;  // planes in the field
      for (int g = 0; g < field; ++g, ++p) {
        const int k = slabs_of(kind);
        float* dst = chunk + pb.planes[p].x_offset;
        const float pow2 = static_cast<float>(1 << shift);  // exact: a power of two
        for (int j = 0; j < k; ++j) {
          const int64_t first = static_cast<int64_t>(g * k + j) * rows;
          const int64_t n_r = std::min<int64_t>(rows, in_features - first);
          for (int64_t r = 0; r < n_r; ++r) dst[(r * k + j) * kMaxRows] = xb[first + r] * pow2;
        }
      }
      shift += field;
    }
  }
  pb.xs = xs_buf.data();

  // Column ranges per task: whole blocks of the widest block width, a few tasks per thread
  // so that the threads that run (on a loaded machine some wait) take the work between them.
  float* acc = y->typed_data();
  Pool& pool = Pool::get();
  const int64_t blocks = (out + kWidest - 1) / kWidest;
  const int tasks = static_cast<int>(std::min<int64_t>(blocks, 4 * pool.size()));
  pool.run(tasks, [&](int t) {
    const int64_t c0 = blocks * t / tasks * kWidest;
    const int64_t c1 = std::min(out, blocks * (t + 1) / tasks * kWidest);
    compute_columns(pb, c0, c1, acc);
  });

  const float* a = scale.typed_data() + at * out;
  for (int64_t b = 0; b < batch; ++b) {
    float* yb = acc + b * out;
    const float off = offset * x_sum[b];
    for (int64_t o = 0; o < out; ++o) yb[o] = (std::max(a[o], eps) / n) * (mult * yb[o] + off);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PareToQPackedLinear, PackedLinearImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<std::string_view>("layout")
                                  .Attr<int64_t>("in_features")
                                  .Attr<float>("mult")
                                  .Attr<float>("offset")
                                  .Attr<float>("n")
                                  .Attr<float>("eps"));
