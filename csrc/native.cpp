// stable_diffusion._native: CPU kernels that MLX lacks, as MLX primitives with an eval_cpu.
//
// bf16_product: bfloat16 linear layers and convolutions with float32 accumulation through the
// CPU's bfloat16 dot-product instruction (AVX512_BF16) or its tile product (AMX), where MLX's CPU
// backend has only a scalar loop for bfloat16 products; f32_product: the same in float32 through
// AVX-512 FMA, for the 3x3 convolutions, whose nine taps a BLAS takes as nine products (gemm.h).
//
// group_norm: PyTorch's GroupNorm on channels-last maps, optionally followed by SiLU and written
// inside a zero border (the padding of the 3x3 convolution that follows), on all cores, where
// MLX's CPU backend would take several single-threaded passes (see group_norm.h).
//
// read_tensor: one tensor of a safetensors file, read with pread on all cores and converted on the
// way to the dtype and layout the networks hold (channels last, or packed for bf16_product), so
// that loading neither copies the file nor holds a float32 copy of a weight.
//
// flash_attention: softmax(q k^T scale + mask) v without the score matrix. Each task takes a tile
// of query rows of one head through all key tiles with an online softmax (running maximum and
// sum, Milakov and Gimelshein 2018; Dao et al. 2022), in float32, on all cores.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#if defined(__linux__)
#include <sched.h>
#include <sys/syscall.h>
#endif
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <cctype>
#include <cerrno>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"
#include "mlx/types/half_types.h"
#include "mlx/version.h"

#include "flash_attention.h"
#include "gemm.h"
#include "group_norm.h"
#include "pool.h"

namespace nb = nanobind;
namespace mx = mlx::core;
using namespace nb::literals;

namespace sd_native {

int64_t scratch_floats(int64_t d_padded) {
  return kQueryRows * (2 * d_padded + kKeys + kDepthStep) + 2 * kQueryRows;
}

namespace {

struct Isa {
  const char* name;
  TaskFn task;
  const NormKernels* norm;
};

// The kernels this CPU can run, fastest first.
std::vector<Isa> available_isas() {
  std::vector<Isa> isas;
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    isas.push_back({"avx512", flash_task_avx512, &norm_kernels_avx512});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    isas.push_back({"avx2", flash_task_avx2, &norm_kernels_avx2});
#endif
  isas.push_back({"generic", flash_task_generic, &norm_kernels_generic});
  return isas;
}

const std::vector<Isa>& isas() {
  static const std::vector<Isa> found = available_isas();
  return found;
}

const Isa& pick_isa(const std::string& name) {
  if (name.empty()) return isas().front();
  for (const Isa& isa : isas())
    if (name == isa.name) return isa;
  throw std::invalid_argument("kernel '" + name + "' is not available on this CPU");
}

// The cores this process may run on (taskset, cgroup cpusets), not all the machine's.
int thread_count() {
  static const int count = [] {
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
#endif
    const unsigned n = std::thread::hardware_concurrency();
    return n == 0 ? 1 : static_cast<int>(n);
  }();
  return count;
}

// Runs body(worker) for workers 0 .. workers - 1 (at most one per task and core) on the pool's
// threads, worker 0 on this one; all on this thread when the pool is taken.
inline void run_workers(int64_t tasks, int workers, const std::function<void(int)>& body) {
  workers = static_cast<int>(std::min<int64_t>({workers, tasks, thread_count()}));
  if (workers <= 1 || !worker_pool(thread_count()).run(workers, body)) body(0);
}

// Runs f(i, worker) for i in [0, n) on all cores; tasks are taken in order from a shared counter.
template <class F>
void parallel_for(int64_t n, int workers, F&& f) {
  std::atomic<int64_t> next{0};
  run_workers(n, workers, [&](int worker) {
    for (int64_t i = next++; i < n; i = next++) f(i, worker);
  });
}

// parallel_for for the AMX kernels (tiles = true): each worker loads the tile configuration before
// its first task and releases the tiles after its last, per call: worker 0 is the stream's thread,
// where another library may have loaded its own configuration since, and a thread that keeps the
// tiles has 8 KB more to save at each context switch.
template <class F>
void parallel_for_tiles(int64_t n, int workers, bool tiles, F&& f) {
#if defined(__x86_64__)
  if (tiles) {
    std::atomic<int64_t> next{0};
    run_workers(n, workers, [&](int worker) {
      bool configured = false;
      for (int64_t i = next++; i < n; i = next++) {
        if (!configured) {
          amx_configure();
          configured = true;
        }
        f(i, worker);
      }
      if (configured) amx_release();
    });
    return;
  }
#endif
  parallel_for(n, workers, f);
}

// A primitive's eval_cpu starts here: `out` gets its buffer, and the stream's encoder holds the
// inputs and the output until the work it dispatches has run.
mx::cpu::CommandEncoder& prepare(mx::Stream stream, const std::vector<mx::array>& inputs, mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& x : inputs) encoder.set_input_array(x);
  encoder.set_output_array(out);
  return encoder;
}

struct Buffer {  // MLX's allocator, so that the buffers come from (and return to) its cache
  explicit Buffer(int64_t floats) : data_(mx::allocator::malloc(floats * sizeof(float))) {}
  float* data() { return static_cast<float*>(data_.buffer().raw_ptr()); }
  mx::allocator::Data data_;
};

void strides4(const mx::array& x, int64_t* out) {
  for (int i = 0; i < 4; ++i) out[i] = x.shape(i) == 1 ? 0 : x.strides()[i];
}

// Everything a run needs, taken from the evaluated arrays on the caller's thread: the kernel's
// arguments (FlashArgs, float32; FlashAmxArgs, bfloat16 bits as T = uint16_t) and K and V as given.
template <class Args, class T>
struct FlashProblem {
  Args a;
  const T* k;
  const T* v;
  int64_t k_strides[4], v_strides[4];
  TaskFn task;  // the float32 kernel; unused by the AMX one
};
using Problem = FlashProblem<FlashArgs, float>;
using AmxProblem = FlashProblem<FlashAmxArgs, uint16_t>;

// d is padded to a multiple of `depth` (kDepthStep, kAmxDepthStep), keys go in tiles of `keys_per_tile`.
template <class Args, class T>
FlashProblem<Args, T> describe(const mx::array& q, const mx::array& k, const mx::array& v, const mx::array* mask,
                               mx::array& out, float scale, int64_t depth, int64_t keys_per_tile, TaskFn task) {
  FlashProblem<Args, T> p{};
  Args& a = p.a;
  a.batch = q.shape(0);
  a.heads = q.shape(1);
  a.q_len = q.shape(2);
  a.d = q.shape(3);
  a.k_len = k.shape(2);
  a.d_padded = (a.d + depth - 1) / depth * depth;
  a.q_scale = scale * 1.4426950408889634f;
  a.q = q.data<T>();
  a.out = out.data<T>();
  strides4(q, a.q_strides);
  if (mask != nullptr) {
    a.mask = mask->data<float>();
    strides4(*mask, a.mask_strides);
  }
  a.key_tiles = (a.k_len + keys_per_tile - 1) / keys_per_tile;
  p.k = k.data<T>();
  p.v = v.data<T>();
  strides4(k, p.k_strides);
  strides4(v, p.v_strides);
  p.task = task;
  return p;
}

void run_flash(Problem p) {
  FlashArgs& a = p.a;
  const int64_t heads = a.batch * a.heads;
  const int64_t tile_floats = kKeys * a.d_padded;
  const int workers = thread_count();

  // 1. K transposed and V as rows, per key tile, zero-padded: read once, not once per query tile.
  Buffer k_packed(heads * a.key_tiles * tile_floats), v_packed(heads * a.key_tiles * tile_floats);
  const int64_t* ks = p.k_strides;
  const int64_t* vs = p.v_strides;
  float* kp_all = k_packed.data();
  float* vp_all = v_packed.data();
  parallel_for(heads * a.key_tiles, workers, [&](int64_t i, int) {
    const int64_t bh = i / a.key_tiles, kt = i % a.key_tiles;
    const int64_t b = bh / a.heads, h = bh % a.heads, k0 = kt * kKeys;
    const int64_t keys = std::min(kKeys, a.k_len - k0);
    float* kp = kp_all + i * tile_floats;  // (dp, kKeys), rows >= d unused
    float* vp = vp_all + i * tile_floats;  // (kKeys, dp)
    std::fill(kp, kp + tile_floats, 0.0f);
    std::fill(vp, vp + tile_floats, 0.0f);
    for (int64_t j = 0; j < keys; ++j) {
      const float* kr = p.k + b * ks[0] + h * ks[1] + (k0 + j) * ks[2];
      const float* vr = p.v + b * vs[0] + h * vs[1] + (k0 + j) * vs[2];
      for (int64_t c = 0; c < a.d; ++c) {
        kp[c * kKeys + j] = kr[c * ks[3]];
        vp[j * a.d_padded + c] = vr[c * vs[3]];
      }
    }
  });
  a.k_packed = kp_all;
  a.v_packed = vp_all;

  // 2. Query tiles, each through every key tile.
  const int64_t query_tiles = (a.q_len + kQueryRows - 1) / kQueryRows;
  const int64_t scratch = (scratch_floats(a.d_padded) + 15) / 16 * 16;
  Buffer scratch_all(scratch * workers);
  float* sp = scratch_all.data();
  parallel_for(heads * query_tiles, workers, [&](int64_t i, int worker) {
    p.task(a, i / query_tiles, i % query_tiles, sp + worker * scratch);
  });
}

void run_flash_amx(AmxProblem p) {
#if defined(__x86_64__)
  FlashAmxArgs& a = p.a;
  const int64_t heads = a.batch * a.heads, dp = a.d_padded;
  const int64_t tile_words = kAmxKeys * dp;
  const int workers = thread_count();

  // 1. K and V per key tile in the pairs the tile product takes, zero-padded: K's depth in pairs
  // (dp / 2, kAmxKeys, 2), V's keys in pairs (kAmxKeys / 2, dp, 2).
  mx::allocator::Data packed = mx::allocator::malloc(2 * heads * a.key_tiles * tile_words * sizeof(uint16_t));
  uint16_t* kp_all = static_cast<uint16_t*>(packed.buffer().raw_ptr());
  uint16_t* vp_all = kp_all + heads * a.key_tiles * tile_words;
  const int64_t* ks = p.k_strides;
  const int64_t* vs = p.v_strides;
  parallel_for(heads * a.key_tiles, workers, [&](int64_t i, int) {
    const int64_t bh = i / a.key_tiles, kt = i % a.key_tiles;
    const int64_t b = bh / a.heads, h = bh % a.heads, k0 = kt * kAmxKeys;
    const int64_t keys = std::min(kAmxKeys, a.k_len - k0);
    uint16_t* kp = kp_all + i * tile_words;
    uint16_t* vp = vp_all + i * tile_words;
    std::fill(kp, kp + tile_words, uint16_t{0});
    std::fill(vp, vp + tile_words, uint16_t{0});
    for (int64_t j = 0; j < keys; ++j) {
      const uint16_t* kr = p.k + b * ks[0] + h * ks[1] + (k0 + j) * ks[2];
      const uint16_t* vr = p.v + b * vs[0] + h * vs[1] + (k0 + j) * vs[2];
      for (int64_t c = 0; c < a.d; ++c) {
        kp[(c / 2) * kAmxKeys * 2 + j * 2 + c % 2] = kr[c * ks[3]];
        vp[(j / 2) * dp * 2 + c * 2 + j % 2] = vr[c * vs[3]];
      }
    }
  });
  a.k_packed = kp_all;
  a.v_packed = vp_all;

  // 2. Query tiles, each through every key tile, on threads with the tile configuration loaded.
  const int64_t query_tiles = (a.q_len + kAmxQueryRows - 1) / kAmxQueryRows;
  const int64_t scratch = (amx_scratch_bytes(dp) + 63) / 64 * 64;
  mx::allocator::Data scratch_all = mx::allocator::malloc(scratch * workers + 64);
  char* sp = static_cast<char*>(scratch_all.buffer().raw_ptr());
  sp += (64 - reinterpret_cast<uintptr_t>(sp) % 64) % 64;
  parallel_for_tiles(heads * query_tiles, workers, true, [&](int64_t i, int worker) {
    flash_task_amx(a, i / query_tiles, i % query_tiles, sp + worker * scratch);
  });
#endif
}

class FlashAttention : public mx::UnaryPrimitive {
 public:
  // task: the float32 kernel; null for the bfloat16 one on AMX tiles.
  FlashAttention(mx::Stream stream, float scale, bool has_mask, TaskFn task)
      : mx::UnaryPrimitive(stream), scale_(scale), has_mask_(has_mask), task_(task) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array* mask = has_mask_ ? &inputs[3] : nullptr;
    // MLX holds the input buffers until the dispatched task has run.
    if (task_ == nullptr)
      encoder.dispatch([problem = describe<FlashAmxArgs, uint16_t>(inputs[0], inputs[1], inputs[2], mask, out, scale_,
                                                                   kAmxDepthStep, kAmxKeys, nullptr)]() { run_flash_amx(problem); });
    else
      encoder.dispatch([problem = describe<FlashArgs, float>(inputs[0], inputs[1], inputs[2], mask, out, scale_,
                                                             kDepthStep, kKeys, task_)]() { run_flash(problem); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("FlashAttention runs on the CPU only; on a GPU use mx.fast.scaled_dot_product_attention");
  }

  const char* name() const override { return "FlashAttention"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const FlashAttention&>(other);
    return scale_ == o.scale_ && has_mask_ == o.has_mask_ && task_ == o.task_;
  }

 private:
  float scale_;
  bool has_mask_;
  TaskFn task_;
};

bool amx_in_use();

mx::array flash_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                          const std::optional<mx::array>& mask, const std::string& isa) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4)
    throw std::invalid_argument("flash_attention: q, k and v must be (batch, heads, length, dims)");
  const mx::Dtype dtype = q.dtype();
  if ((dtype != mx::float32 && dtype != mx::bfloat16) || k.dtype() != dtype || v.dtype() != dtype)
    throw std::invalid_argument("flash_attention: q, k and v must be all float32 or all bfloat16");
  if (k.shape() != v.shape() || q.shape(0) != k.shape(0) || q.shape(1) != k.shape(1) ||
      q.shape(3) != k.shape(3))
    throw std::invalid_argument("flash_attention: k and v must be (batch, heads, keys, dims) like q");
  TaskFn task = nullptr;
  if (dtype == mx::bfloat16) {
    if (!amx_in_use() || !(isa.empty() || isa == "amx"))
      throw std::invalid_argument("flash_attention: bfloat16 needs the amx kernel (bf16_kernels()), not here");
  } else {
    task = pick_isa(isa).task;
  }
  std::vector<mx::array> inputs = {q, k, v};
  if (mask.has_value()) {
    if (mask->dtype() != mx::float32)
      throw std::invalid_argument("flash_attention: the mask must be additive float32");
    inputs.push_back(mx::broadcast_to(*mask, {q.shape(0), q.shape(1), q.shape(2), k.shape(2)}));
  }
  const auto stream = mx::default_stream(mx::Device::cpu);
  return mx::array(q.shape(), dtype, std::make_shared<FlashAttention>(stream, scale, mask.has_value(), task),
                   std::move(inputs));
}

// A (channels,) parameter as the kernels read it: float32 and contiguous. astype returns a strided
// or broadcast view (a slice of a larger tensor, broadcast_to of a scalar) unchanged when it is
// float32 already, and reading channels floats from its start read the wrong values, or past the
// end of its buffer.
mx::array per_channel(const mx::array& p) { return mx::contiguous(mx::astype(p, mx::float32)); }

struct NormProblem {
  NormArgs a;
  int64_t batch, groups;
  float eps;
  const float* weight;
  const float* bias;
  int64_t pad_bottom;
  const NormKernels* kernels;
};

void run_group_norm(NormProblem p) {
  const NormArgs& a = p.a;
  const int64_t rows = p.batch * a.height, channels = a.channels, per_group = channels / p.groups;
  const int workers = thread_count();
  const double count = static_cast<double>(a.height) * a.width * per_group;
  Buffer partial(rows * channels), mean(p.batch * channels), scale(p.batch * channels), shift(p.batch * channels);
  float* rows_sums = partial.data();
  float* means = mean.data();
  float* scales = scale.data();
  float* shifts = shift.data();
  // Per row sums, added up over the rows and the group's channels in double, in a fixed order.
  auto group_totals = [&](int64_t b, std::vector<double>& totals) {
    totals.assign(p.groups, 0.0);
    for (int64_t h = 0; h < a.height; ++h) {
      const float* s = rows_sums + (b * a.height + h) * channels;
      for (int64_t c = 0; c < channels; ++c) totals[c / per_group] += s[c];
    }
  };
  std::vector<double> totals;
  parallel_for(rows, workers, [&](int64_t i, int) {
    p.kernels->sums(a, i / a.height, i % a.height, rows_sums + i * channels);
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    group_totals(b, totals);
    for (int64_t c = 0; c < channels; ++c) means[b * channels + c] = static_cast<float>(totals[c / per_group] / count);
  }
  parallel_for(rows, workers, [&](int64_t i, int) {
    const int64_t b = i / a.height;
    p.kernels->squares(a, b, i % a.height, means + b * channels, rows_sums + i * channels);
  });
  for (int64_t b = 0; b < p.batch; ++b) {
    group_totals(b, totals);
    for (int64_t c = 0; c < channels; ++c) {
      const double inv = 1.0 / std::sqrt(totals[c / per_group] / count + p.eps);
      const double s = p.weight[c] * inv;
      scales[b * channels + c] = static_cast<float>(s);
      shifts[b * channels + c] = static_cast<float>(p.bias[c] - means[b * channels + c] * s);
    }
  }
  // The border rows above and below; each row's task writes its own left and right border.
  const int64_t item = a.bf16 ? 2 : 4;
  for (int64_t b = 0; b < p.batch; ++b) {
    char* image = static_cast<char*>(a.out) + b * a.out_image * item;
    std::memset(image, 0, a.pad_top * a.out_row * item);
    std::memset(image + (a.pad_top + a.height) * a.out_row * item, 0, p.pad_bottom * a.out_row * item);
  }
  parallel_for(rows, workers, [&](int64_t i, int) {
    const int64_t b = i / a.height;
    p.kernels->apply(a, b, i % a.height, scales + b * channels, shifts + b * channels);
  });
}

class GroupNorm : public mx::UnaryPrimitive {
 public:
  GroupNorm(mx::Stream stream, int64_t groups, float eps, bool silu, std::vector<int64_t> pad, const Isa& isa)
      : mx::UnaryPrimitive(stream), groups_(groups), eps_(eps), silu_(silu), pad_(std::move(pad)), isa_(isa) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array& x = inputs[0];
    NormProblem p{};
    NormArgs& a = p.a;
    a.bf16 = x.dtype() == mx::bfloat16;
    a.x = a.bf16 ? static_cast<const void*>(x.data<uint16_t>()) : static_cast<const void*>(x.data<float>());
    a.out = a.bf16 ? static_cast<void*>(out.data<uint16_t>()) : static_cast<void*>(out.data<float>());
    a.silu = silu_;
    a.height = x.shape(1);
    a.width = x.shape(2);
    a.channels = x.shape(3);
    for (int i = 0; i < 4; ++i) a.x_strides[i] = x.strides()[i];
    a.pad_top = pad_[0];
    a.pad_left = pad_[2];
    a.pad_right = pad_[3];
    a.out_row = out.shape(2) * a.channels;
    a.out_image = out.shape(1) * a.out_row;
    p.batch = x.shape(0);
    p.groups = groups_;
    p.eps = eps_;
    p.weight = inputs[1].data<float>();
    p.bias = inputs[2].data<float>();
    p.pad_bottom = pad_[1];
    p.kernels = isa_.norm;
    encoder.dispatch([problem = p]() { run_group_norm(problem); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("GroupNorm runs on the CPU only");
  }

  const char* name() const override { return "GroupNorm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const GroupNorm&>(other);
    return groups_ == o.groups_ && eps_ == o.eps_ && silu_ == o.silu_ && pad_ == o.pad_ && isa_.norm == o.isa_.norm;
  }

 private:
  int64_t groups_;
  float eps_;
  bool silu_;
  std::vector<int64_t> pad_;
  Isa isa_;
};

mx::array group_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, int64_t groups, float eps,
                     bool silu, const std::vector<int64_t>& pad, const std::string& isa) {
  if (x.ndim() != 4 || (x.dtype() != mx::float32 && x.dtype() != mx::bfloat16))
    throw std::invalid_argument("group_norm: x must be (batch, height, width, channels), float32 or bfloat16");
  const int channels = x.shape(3);
  if (groups <= 0 || channels % groups != 0)
    throw std::invalid_argument("group_norm: the channels must split into the groups evenly");
  if (weight.ndim() != 1 || weight.shape(0) != channels || bias.ndim() != 1 || bias.shape(0) != channels)
    throw std::invalid_argument("group_norm: weight and bias must be (channels,)");
  if (pad.size() != 4 || *std::min_element(pad.begin(), pad.end()) < 0)
    throw std::invalid_argument("group_norm: pad is (top, bottom, left, right), each >= 0");
  const mx::Shape shape = {x.shape(0), static_cast<int>(x.shape(1) + pad[0] + pad[1]),
                           static_cast<int>(x.shape(2) + pad[2] + pad[3]), channels};
  return mx::array(shape, x.dtype(),
                   std::make_shared<GroupNorm>(mx::default_stream(mx::Device::cpu), groups, eps, silu, pad, pick_isa(isa)),
                   {x, per_channel(weight), per_channel(bias)});
}

// Layer norm, GEGLU and GELU: row kernels (group_norm.h) over the rows, in runs of rows per task.
class RowOp : public mx::UnaryPrimitive {
 public:
  enum Kind { kLayerNorm, kGeglu, kGelu };

  RowOp(mx::Stream stream, Kind kind, float eps, const Isa& isa)
      : mx::UnaryPrimitive(stream), kind_(kind), eps_(eps), isa_(isa) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array& x = inputs[0];
    RowArgs a{};
    a.bf16 = x.dtype() == mx::bfloat16;
    a.x = a.bf16 ? static_cast<const void*>(x.data<uint16_t>()) : static_cast<const void*>(x.data<float>());
    a.out = a.bf16 ? static_cast<void*>(out.data<uint16_t>()) : static_cast<void*>(out.data<float>());
    a.channels = out.shape(-1);
    a.x_row = x.shape(-1);
    if (kind_ == kLayerNorm) {
      a.weight = inputs[1].data<float>();
      a.bias = inputs[2].data<float>();
      a.eps = eps_;
    }
    const int64_t rows = a.channels == 0 ? 0 : out.size() / a.channels;
    const auto row_fn = kind_ == kLayerNorm ? isa_.norm->layer_norm : kind_ == kGeglu ? isa_.norm->geglu : isa_.norm->gelu;
    encoder.dispatch([a, rows, row_fn]() {
      constexpr int64_t kRun = 32;  // rows per task: the shared counter is taken once per run
      parallel_for((rows + kRun - 1) / kRun, thread_count(), [&](int64_t i, int) {
        for (int64_t r = i * kRun; r < std::min(rows, (i + 1) * kRun); ++r) row_fn(a, r);
      });
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("RowOp runs on the CPU only");
  }

  const char* name() const override { return kind_ == kLayerNorm ? "LayerNorm" : kind_ == kGeglu ? "Geglu" : "Gelu"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RowOp&>(other);
    return kind_ == o.kind_ && eps_ == o.eps_ && isa_.norm == o.isa_.norm;
  }

 private:
  Kind kind_;
  float eps_;
  Isa isa_;
};

void require_rows(const char* what, const mx::array& x) {
  if (x.ndim() < 1 || (x.dtype() != mx::float32 && x.dtype() != mx::bfloat16))
    throw std::invalid_argument(std::string(what) + ": x must be float32 or bfloat16, with at least one axis");
}

mx::array layer_norm(const mx::array& x, const mx::array& weight, const mx::array& bias, float eps,
                     const std::string& isa) {
  require_rows("layer_norm", x);
  const int channels = x.shape(-1);
  if (weight.ndim() != 1 || weight.shape(0) != channels || bias.ndim() != 1 || bias.shape(0) != channels)
    throw std::invalid_argument("layer_norm: weight and bias must be (channels,), the last axis of x");
  return mx::array(x.shape(), x.dtype(),
                   std::make_shared<RowOp>(mx::default_stream(mx::Device::cpu), RowOp::kLayerNorm, eps, pick_isa(isa)),
                   {mx::contiguous(x), per_channel(weight), per_channel(bias)});
}

mx::array gelu(const mx::array& x, const std::string& isa) {
  if (x.ndim() == 0) return mx::reshape(gelu(mx::reshape(x, {1}), isa), {});  // a scalar: a row of one
  require_rows("gelu", x);
  return mx::array(x.shape(), x.dtype(),
                   std::make_shared<RowOp>(mx::default_stream(mx::Device::cpu), RowOp::kGelu, 0.0f, pick_isa(isa)),
                   {mx::contiguous(x)});
}

mx::array geglu(const mx::array& x, const std::string& isa) {
  require_rows("geglu", x);
  if (x.shape(-1) % 2 != 0) throw std::invalid_argument("geglu: the last axis of x must hold two halves");
  mx::Shape shape = x.shape();
  shape.back() /= 2;
  return mx::array(shape, x.dtype(),
                   std::make_shared<RowOp>(mx::default_stream(mx::Device::cpu), RowOp::kGeglu, 0.0f, pick_isa(isa)),
                   {mx::contiguous(x)});
}

bool has_bf16_dot() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

// AMX's tile instructions: the CPU's (CPUID leaf 7: EDX bit 24 AMX-TILE, bit 22 AMX-BF16), and
// Linux's permission to use the 8 KB tile state, which a process must ask for once (since Linux
// 5.16; without it the first tile instruction faults). Asked for at most once, on first use.
bool amx_usable() {
  static const bool usable = [] {
#if defined(__x86_64__) && defined(__linux__)
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 22)))
      return false;
    constexpr long kGetPermission = 0x1022, kRequestPermission = 0x1023;  // ARCH_{GET,REQ}_XCOMP_PERM
    constexpr int kTileData = 18;                                          // XFEATURE_XTILEDATA
    if (syscall(SYS_arch_prctl, kRequestPermission, kTileData) != 0) return false;
    unsigned long permitted = 0;
    return syscall(SYS_arch_prctl, kGetPermission, &permitted) == 0 && (permitted & (1ul << kTileData));
#else
    return false;
#endif
  }();
  return usable;
}

using GemmTask = void (*)(const GemmArgs&, int64_t, int64_t, int64_t, int64_t);

struct ProductKernel {
  const char* name;
  GemmTask task;
  bool tiles;  // AMX: the tile configuration is loaded on each worker thread
  // Bytes of packed weights a group of panels may hold (run_gemm), 0 for no groups: measured for
  // the float32 kernel only (512 KB, on a 2-core Ice Lake: 1.25 MB of L2 per core).
  int64_t group_bytes = 0;
  // The most rows of one task: kGemmRows, or kTaskRows for a product of few rows (run_gemm),
  // measured for the float32 kernel only.
  int64_t task_rows = kGemmRows;
};

// The bfloat16 product kernels this CPU can run, fastest first; SD_AMX=0 (off, false, no) leaves
// AMX out, to compare the two.
const std::vector<ProductKernel>& bf16_kernel_list() {
  static const std::vector<ProductKernel> kernels = [] {
    std::vector<ProductKernel> found;
#if defined(__x86_64__)
    if (!has_bf16_dot()) return found;
    const char* env = std::getenv("SD_AMX");
    std::string amx = env == nullptr ? "" : env;
    std::transform(amx.begin(), amx.end(), amx.begin(), [](unsigned char c) { return std::tolower(c); });
    const bool off = amx == "0" || amx == "off" || amx == "false" || amx == "no";
    // The AMX kernel's epilogue is AVX-512 BF16 code, so it needs has_bf16_dot() too (every AMX
    // CPU has it).
    if (!off && amx_usable()) found.push_back({"amx", gemm_bf16_task_amx, true});
    found.push_back({"avx512_bf16", gemm_bf16_task_avx512bf16, false});
#endif
    return found;
  }();
  return kernels;
}

// The kernel of `kernels` named `name` (the first for ""), else ValueError: "<what> products: <none>"
// where the list is empty.
const ProductKernel& pick_kernel(const std::vector<ProductKernel>& kernels, const std::string& name,
                                 const std::string& what, const std::string& none) {
  if (kernels.empty()) throw std::invalid_argument(what + " products: " + none);
  if (name.empty()) return kernels.front();
  for (const ProductKernel& k : kernels)
    if (name == k.name) return k;
  throw std::invalid_argument(what + " product kernel '" + name + "' is not available here");
}

std::vector<std::string> product_kernel_names(const std::vector<ProductKernel>& kernels) {
  std::vector<std::string> names;
  for (const ProductKernel& k : kernels) names.emplace_back(k.name);
  return names;
}

const ProductKernel& pick_bf16_kernel(const std::string& name) {
  return pick_kernel(bf16_kernel_list(), name, "bf16", "this CPU has no AVX512_BF16");
}

// Whether the bfloat16 products use AMX: then attention in bfloat16 does too.
bool amx_in_use() { return !bf16_kernel_list().empty() && bf16_kernel_list().front().tiles; }

std::vector<std::string> bf16_kernel_names() { return product_kernel_names(bf16_kernel_list()); }

// n rows of `words` 32-bit words (row j at src + j * stride bytes) into columns of a panel's tap:
// word q of row j to dst[q * kGemmCols + j]. In blocks of 16 words, so that each row's 64 bytes
// are read once and 16 rows' words then fill whole cache lines of the panel.
void words_to_panel(const char* src, int64_t stride, int64_t n, int64_t words, uint32_t* dst) {
  constexpr int64_t kBlock = 16;
  for (int64_t q0 = 0; q0 < words; q0 += kBlock) {
    const int64_t qn = std::min(kBlock, words - q0);
    for (int64_t j = 0; j < n; ++j) {
      uint32_t block[kBlock];
      std::memcpy(block, src + j * stride + q0 * 4, qn * 4);
      for (int64_t q = 0; q < qn; ++q) dst[(q0 + q) * kGemmCols + j] = block[q];
    }
  }
}

// w (O, T, words) of 32-bit words (a bfloat16 channel pair, or a float32 channel) into the
// kernels' panels, (panels, T, words, kGemmCols), zero past O.
void pack_weights(const char* w, int64_t out_channels, int64_t taps, int64_t words, uint32_t* packed) {
  const int64_t panels = (out_channels + kGemmCols - 1) / kGemmCols;
  const int64_t panel_words = taps * words * kGemmCols;
  parallel_for(panels * taps, thread_count(), [&](int64_t i, int) {
    const int64_t panel = i / taps, t = i % taps;
    uint32_t* dst = packed + panel * panel_words + t * words * kGemmCols;
    const int64_t valid = std::min(kGemmCols, out_channels - panel * kGemmCols);
    if (valid < kGemmCols) std::fill(dst, dst + words * kGemmCols, 0u);
    words_to_panel(w + (panel * kGemmCols * taps + t) * words * 4, taps * words * 4, valid, words, dst);
  });
}

// w (O, T, C), bfloat16 or float32, packed for the products (pack_weights).
class ProductPack : public mx::UnaryPrimitive {
 public:
  explicit ProductPack(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array& w = inputs[0];
    encoder.dispatch([w = w.data<char>(), o = w.shape(0), t = w.shape(1), words = w.shape(2) * w.itemsize() / 4,
                      packed = out.data<uint32_t>()]() { pack_weights(w, o, t, words, packed); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("ProductPack runs on the CPU only");
  }

  const char* name() const override { return "ProductPack"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

struct GemmProblem {
  GemmArgs a;
  std::vector<int64_t> offsets;
  const ProductKernel* kernel;
  int64_t weight_bytes;
};

void run_gemm(GemmProblem p) {
  GemmArgs& a = p.a;
  a.offsets = p.offsets.data();
  const int64_t panels = (a.out_channels + kGemmCols - 1) / kGemmCols;
  if (panels == 0) return;  // no outputs
  const int workers = thread_count();
  // Tasks in row-block order take every panel's weights for one block of rows, which stays in the
  // cache: right where the weights fit in L2 (a UNet's layers). With few row blocks (the text
  // encoder's 154 rows: 2 blocks, a layer's weights up to 8 MB), the blocks of one panel go
  // together instead, so that the weights stream from memory once, not once per block; and where
  // the kernel takes them all in one task and there are panels enough to share out, they are one.
  const bool by_panel = a.batch * ((a.rows + kGemmRows - 1) / kGemmRows) <= 2 * workers;
  const int64_t block_rows = by_panel && a.rows <= p.kernel->task_rows && panels >= 4 * workers ? a.rows : kGemmRows;
  const int64_t row_blocks = (a.rows + block_rows - 1) / block_rows;
  const int64_t blocks = a.batch * row_blocks;
  // Otherwise, with a budget (group_bytes), the panels go in groups whose weights fit it: every
  // block of rows takes one group's panels before the next group starts, so that a layer whose
  // weights are larger than the cache (a UNet's 640 x 5120 feed-forward, 13 MB in float32) reads
  // them from memory once per group rather than once per block. A group is at least one panel.
  const int64_t group = p.kernel->group_bytes > 0
                            ? std::clamp<int64_t>(p.kernel->group_bytes / std::max<int64_t>(1, p.weight_bytes / panels), 1, panels)
                            : panels;
  parallel_for_tiles(blocks * panels, workers, p.kernel->tiles, [&](int64_t i, int) {
    int64_t panel, block;
    if (by_panel) {
      panel = i / blocks, block = i % blocks;
    } else {
      const int64_t first = i / (blocks * group) * group, size = std::min(group, panels - first);
      const int64_t j = i - first * blocks;  // within the group: blocks x size tasks
      panel = first + j % size, block = j / size;
    }
    const int64_t m0 = block % row_blocks * block_rows;
    p.kernel->task(a, block / row_blocks, m0, std::min(a.rows, m0 + block_rows), panel);
  });
}

// A product of x (bfloat16 or float32) with weights packed by ProductPack, out in x's dtype.
class Product : public mx::UnaryPrimitive {
 public:
  Product(mx::Stream stream, std::vector<int64_t> offsets, int64_t rows, int64_t out_channels, bool has_bias,
              int64_t row_period, int64_t row_valid, bool has_addend, const ProductKernel& kernel)
      : mx::UnaryPrimitive(stream),
        offsets_(std::move(offsets)),
        rows_(rows),
        out_channels_(out_channels),
        has_bias_(has_bias),
        row_period_(row_period),
        row_valid_(row_valid),
        has_addend_(has_addend),
        kernel_(&kernel) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    const mx::array& x = inputs[0];
    const mx::array& packed = inputs[1];
    GemmProblem p{};
    p.a.x = x.data<char>();
    p.a.w_packed = packed.data<char>();
    p.a.bias = has_bias_ ? inputs[2].data<float>() : nullptr;
    p.a.addend = has_addend_ ? inputs.back().data<char>() : nullptr;
    p.a.out = out.data<char>();
    p.a.row_period = row_period_;
    p.a.row_valid = row_valid_;
    p.a.out_rows = out.shape(1);
    p.a.batch = x.shape(0);
    p.a.positions = x.shape(1);
    p.a.channels = x.shape(2);
    p.a.rows = rows_;
    p.a.out_channels = out_channels_;
    p.a.taps = packed.shape(1);
    p.offsets = offsets_;
    p.kernel = kernel_;
    p.weight_bytes = packed.nbytes();
    encoder.dispatch([problem = std::move(p)]() { run_gemm(problem); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("Product runs on the CPU only");
  }

  const char* name() const override { return "Product"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const Product&>(other);
    return offsets_ == o.offsets_ && rows_ == o.rows_ && out_channels_ == o.out_channels_ &&
           has_bias_ == o.has_bias_ && row_period_ == o.row_period_ && row_valid_ == o.row_valid_ &&
           has_addend_ == o.has_addend_ && kernel_ == o.kernel_;
  }

 private:
  std::vector<int64_t> offsets_;
  int64_t rows_;
  int64_t out_channels_;
  bool has_bias_;
  int64_t row_period_, row_valid_;
  bool has_addend_;
  const ProductKernel* kernel_;  // bf16_kernel_list()'s or f32_kernel_list()'s, which live as long as the process
};

void require_bf16_dot() {
  if (!has_bf16_dot()) throw std::invalid_argument("bf16 products: this CPU has no AVX512_BF16");
}

mx::array pack(const mx::array& w) {
  const int panels = (w.shape(0) + kGemmCols - 1) / kGemmCols;
  const int words = static_cast<int>(w.shape(2) * w.itemsize() / 4);
  const bool bf16 = w.dtype() == mx::bfloat16;
  // bfloat16: (panels, T, C / 2, kGemmCols x 2) uint16; float32: (panels, T, C, kGemmCols) float32.
  return mx::array({panels, w.shape(1), words, static_cast<int>(bf16 ? 2 * kGemmCols : kGemmCols)},
                   bf16 ? mx::uint16 : mx::float32,
                   std::make_shared<ProductPack>(mx::default_stream(mx::Device::cpu)), {mx::contiguous(w)});
}

mx::array bf16_pack(const mx::array& w) {
  require_bf16_dot();
  if (w.ndim() != 3 || w.dtype() != mx::bfloat16 || w.shape(2) % 2 != 0)
    throw std::invalid_argument("bf16_pack: w must be (out, taps, channels) bfloat16 with channels even");
  return pack(w);
}

// The float32 product kernels this CPU can run, fastest first: AVX-512's, AVX2's (16 registers
// of 8 floats). Layers take them (has_f32_products) only with AVX-512: AVX2's kernel is even with
// OpenBLAS's Haswell kernels in a whole UNet call, on an Ice Lake held to AVX2 (0.99-1.04x) and on
// an AVX2 Zen 3 (0.93-1.14x, within the VM's noise); f32_product(kernel="avx2") runs it there.
const std::vector<ProductKernel>& f32_kernel_list() {
  static const std::vector<ProductKernel> kernels = [] {
    std::vector<ProductKernel> found;
#if defined(__x86_64__)
    for (const Isa& isa : isas()) {
      const std::string name = isa.name;
      if (name == "avx512") found.push_back({"avx512", gemm_f32_task_avx512, false, 512 << 10, kTaskRows});
      if (name == "avx2") found.push_back({"avx2", gemm_f32_task_avx2, false, 512 << 10, kTaskRows});
    }
#endif
    return found;
  }();
  return kernels;
}

bool has_f32_products() {
  const auto& kernels = f32_kernel_list();
  return !kernels.empty() && std::string(kernels.front().name) == "avx512";
}

const ProductKernel& pick_f32_kernel(const std::string& name) {
  return pick_kernel(f32_kernel_list(), name, "f32", "this CPU has neither AVX-512 nor AVX2");
}

std::vector<std::string> f32_kernel_names() { return product_kernel_names(f32_kernel_list()); }

mx::array f32_pack(const mx::array& w) {
  pick_f32_kernel("");
  if (w.ndim() != 3 || w.dtype() != mx::float32)
    throw std::invalid_argument("f32_pack: w must be (out, taps, channels) float32");
  return pack(w);
}

// x (B, positions, C) times weights packed by bf16_pack or f32_pack (x's dtype).
mx::array product(const std::string& what, const ProductKernel& chosen, const mx::array& x, const mx::array& packed,
                  int64_t out_channels, const std::optional<mx::array>& bias, const std::vector<int64_t>& offsets,
                  int64_t rows, int64_t row_period, int64_t row_valid, const std::optional<mx::array>& addend) {
  const bool bf16 = x.dtype() == mx::bfloat16;
  const std::string dtype = bf16 ? "bfloat16" : "float32";
  const auto fail = [&](const std::string& why) { throw std::invalid_argument(what + ": " + why); };
  if (x.ndim() != 3) fail("x must be (batch, positions, channels) " + dtype);
  if (out_channels < 0 || out_channels > std::numeric_limits<int32_t>::max())
    fail("out_channels must be 0 or more, and less than 2**31");
  // The kernels write each output on the last pass over the channels of the last tap.
  if (x.shape(2) == 0 || offsets.empty()) fail("x needs at least one channel, and the weights one tap");
  if (rows < 1) fail("rows must be at least 1");
  if (packed.ndim() != 4 || packed.dtype() != (bf16 ? mx::uint16 : mx::float32) ||
      packed.shape(3) != (bf16 ? 2 : 1) * kGemmCols || packed.shape(0) != (out_channels + kGemmCols - 1) / kGemmCols)
    fail(std::string("the weights must come from ") + (bf16 ? "bf16_pack" : "f32_pack") + ", for out_channels outputs");
  if (x.shape(2) != (bf16 ? 2 : 1) * packed.shape(2)) fail("x and the weights must have the same number of channels");
  if (static_cast<int64_t>(offsets.size()) != packed.shape(1)) fail("one row offset per tap of the weights");
  for (int64_t off : offsets)
    if (off < 0 || off > x.shape(1) - rows) fail("a tap's rows run past the input's positions");
  std::vector<mx::array> inputs = {mx::contiguous(x), mx::contiguous(packed)};
  if (bias.has_value()) {
    if (bias->ndim() != 1 || bias->shape(0) != out_channels) fail("bias must be (out_channels,)");
    inputs.push_back(per_channel(*bias));
  }
  if (row_period == 0 && row_valid != 0) fail("row_valid needs a row_period");
  if (row_period == 0) row_period = row_valid = rows;
  if (row_period < 1 || row_valid < 1 || row_valid > row_period || rows % row_period != 0)
    fail("rows must be whole periods, 0 < row_valid <= row_period");
  const int out_rows = static_cast<int>(rows / row_period * row_valid);
  const mx::Shape shape = {x.shape(0), out_rows, static_cast<int>(out_channels)};
  if (addend.has_value()) {
    if (addend->shape() != shape || addend->dtype() != x.dtype()) fail("addend must be " + dtype + " of the output's shape");
    inputs.push_back(mx::contiguous(*addend));
  }
  return mx::array(shape, x.dtype(),
                   std::make_shared<Product>(mx::default_stream(mx::Device::cpu), offsets, rows, out_channels,
                                             bias.has_value(), row_period, row_valid, addend.has_value(), chosen),
                   std::move(inputs));
}

mx::array bf16_product(const mx::array& x, const mx::array& packed, int64_t out_channels,
                       const std::optional<mx::array>& bias, const std::vector<int64_t>& offsets, int64_t rows,
                       int64_t row_period, int64_t row_valid, const std::optional<mx::array>& addend,
                       const std::string& kernel) {
  const ProductKernel& chosen = pick_bf16_kernel(kernel);
  if (x.dtype() != mx::bfloat16)
    throw std::invalid_argument("bf16_product: x must be (batch, positions, channels) bfloat16");
  return product("bf16_product", chosen, x, packed, out_channels, bias, offsets, rows, row_period, row_valid, addend);
}

mx::array f32_product(const mx::array& x, const mx::array& packed, int64_t out_channels,
                      const std::optional<mx::array>& bias, const std::vector<int64_t>& offsets, int64_t rows,
                      int64_t row_period, int64_t row_valid, const std::optional<mx::array>& addend,
                      const std::string& kernel) {
  const ProductKernel& chosen = pick_f32_kernel(kernel);
  if (x.dtype() != mx::float32)
    throw std::invalid_argument("f32_product: x must be (batch, positions, channels) float32");
  return product("f32_product", chosen, x, packed, out_channels, bias, offsets, rows, row_period, row_valid,
                 addend);
}

// --- reading tensors from safetensors files ---

enum class Layout { plain, channels_last, packed };

// float32 bits -> bfloat16 bits, rounded to nearest even, every NaN to 0x7FC0: MLX's astype,
// written without a branch so that the loop vectorises.
inline uint16_t bf16_bits(uint32_t u) {
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
}

// float16 bits -> float32 bits, exact: the exponent is rebiased by a multiplication by 2^112,
// which also turns subnormal halves into normal floats; infinities and NaNs are set apart.
inline uint32_t f32_bits_of_f16(uint16_t h) {
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &magnitude, sizeof f);
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if (magnitude >= (0x7C00u << 13)) bits = magnitude | 0x7F800000u;
  return (static_cast<uint32_t>(h & 0x8000u) << 16) | bits;
}

// n values of dtype `from` -> dtype `to` (float32, float16 or bfloat16), as MLX's astype does it.
void convert(const char* src, mx::Dtype from, char* dst, mx::Dtype to, int64_t n) {
  if (from == to) {
    std::memcpy(dst, src, n * from.size());
    return;
  }
  constexpr int64_t kBlock = 2048;
  uint32_t block[kBlock];
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t m = std::min(kBlock, n - i0);
    const uint32_t* bits = block;
    if (from == mx::float32) {
      bits = reinterpret_cast<const uint32_t*>(src) + i0;
    } else if (from == mx::bfloat16) {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(src) + i0;
      for (int64_t i = 0; i < m; ++i) block[i] = static_cast<uint32_t>(in[i]) << 16;
    } else {
      const uint16_t* in = reinterpret_cast<const uint16_t*>(src) + i0;
      for (int64_t i = 0; i < m; ++i) block[i] = f32_bits_of_f16(in[i]);
    }
    if (to == mx::float32) {
      std::memcpy(reinterpret_cast<uint32_t*>(dst) + i0, bits, m * sizeof(uint32_t));
    } else if (to == mx::bfloat16) {
      uint16_t* out = reinterpret_cast<uint16_t*>(dst) + i0;
      for (int64_t i = 0; i < m; ++i) out[i] = bf16_bits(bits[i]);
    } else {  // float16: MLX's own conversion, one value at a time (no CPU run computes in it)
      uint16_t* out = reinterpret_cast<uint16_t*>(dst) + i0;
      for (int64_t i = 0; i < m; ++i) {
        float f;
        std::memcpy(&f, bits + i, sizeof f);
        const mx::float16_t h = static_cast<mx::float16_t>(f);
        std::memcpy(out + i, &h, sizeof(uint16_t));
      }
    }
  }
}

// A tensor as the file holds it, (rows, channels, taps) row-major: a convolution's (O, C, kh kw),
// a linear layer's (O, C, 1); a plain tensor is (elements, 1, 1).
struct ReadSpec {
  std::string path;
  int64_t offset;  // of the tensor's first byte in the file
  mx::Dtype from, to;
  int64_t rows, channels, taps;
  Layout layout;
};

class File {
 public:
  explicit File(const std::string& path) : fd_(::open(path.c_str(), O_RDONLY | O_CLOEXEC)) {
    if (fd_ < 0) throw std::runtime_error("read_tensor: cannot open " + path + ": " + std::strerror(errno));
  }
  ~File() { ::close(fd_); }
  File(const File&) = delete;
  File& operator=(const File&) = delete;

  int64_t size() const {
    struct stat st;
    return ::fstat(fd_, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
  }

  void read(char* dst, int64_t bytes, int64_t offset) const {
    while (bytes > 0) {
      const ssize_t got = ::pread(fd_, dst, static_cast<size_t>(std::min<int64_t>(bytes, 1 << 30)), offset);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) throw std::runtime_error("read_tensor: the file ended or failed while reading");
      dst += got;
      bytes -= got;
      offset += got;
    }
  }

 private:
  int fd_;
};

// Source rows [r0, r1) of a (rows, channels, taps) tensor, converted, written channels last:
// out[o, t, c] = w[o, c, t].
void channels_last_rows(const char* converted, int64_t r0, int64_t r1, const ReadSpec& s, char* out) {
  const int64_t row = s.channels * s.taps, size = s.to.size();
  for (int64_t o = r0; o < r1; ++o) {
    const char* src = converted + (o - r0) * row * size;
    char* dst = out + o * row * size;
    for (int64_t c = 0; c < s.channels; ++c)
      for (int64_t t = 0; t < s.taps; ++t)
        std::memcpy(dst + (t * s.channels + c) * size, src + (c * s.taps + t) * size, size);
  }
}

// Rows [j0, j0 + n) of panel `panel` (kGemmCols outputs) of the bf16_pack layout, from their
// converted values w in (n, channels, taps) order: words of two channels at (tap, pair, row).
// `scratch` holds n rows once. An odd channel count (the VAE's RGB input) gets a zero channel.
void pack_rows(const uint16_t* w, int64_t n, int64_t j0, int64_t panel, const ReadSpec& s, uint16_t* scratch,
               uint16_t* packed) {
  const int64_t channels = s.channels, taps = s.taps, pairs = (channels + 1) / 2;
  auto* dst = reinterpret_cast<uint32_t*>(packed) + panel * taps * pairs * kGemmCols;
  if (channels % 2) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t q = 0; q < pairs; ++q)
        for (int64_t t = 0; t < taps; ++t) {
          const uint32_t low = w[(j * channels + 2 * q) * taps + t];
          const uint32_t high = 2 * q + 1 < channels ? w[(j * channels + 2 * q + 1) * taps + t] : 0u;
          dst[(t * pairs + q) * kGemmCols + j0 + j] = low | high << 16;
        }
    return;
  }
  // 1. Taps first, (n, taps, channels): a tap's channel pairs are then adjacent words.
  const uint16_t* rows = w;
  if (taps > 1) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t c = 0; c < channels; ++c)
        for (int64_t t = 0; t < taps; ++t)
          scratch[(j * taps + t) * channels + c] = w[(j * channels + c) * taps + t];
    rows = scratch;
  }
  // 2. Each tap's pairs into the panel's columns j0 ..
  for (int64_t t = 0; t < taps; ++t)
    words_to_panel(reinterpret_cast<const char*>(rows + t * channels), taps * channels * 2, n, pairs,
                   dst + t * pairs * kGemmCols + j0);
}

void run_read(const ReadSpec& s, char* out) {
  const File file(s.path);
  const int64_t row = s.channels * s.taps;
  const int64_t in_size = s.from.size(), out_size = s.to.size();
  // Rows per task: a panel when packing (read 16 rows at a time), else about 64K values, so that
  // what is read stays in the core's cache while it is converted.
  constexpr int64_t kValues = 1 << 16, kPackRows = 16;
  const bool packing = s.layout == Layout::packed;
  const int64_t per_task = packing ? kGemmCols : std::max<int64_t>(1, kValues / std::max<int64_t>(row, 1));
  const int64_t tasks = (s.rows + per_task - 1) / per_task;
  const int workers = static_cast<int>(std::min<int64_t>(thread_count(), tasks));
  struct Scratch {
    std::vector<char> raw, converted, rows;
  };
  std::vector<Scratch> scratch(workers);
  parallel_for(tasks, workers, [&](int64_t i, int worker) {
    const int64_t r0 = i * per_task, r1 = std::min(s.rows, r0 + per_task);
    Scratch& b = scratch[worker];
    if (packing) {
      const int64_t panel_words = s.taps * ((s.channels + 1) / 2) * kGemmCols;
      auto* dst = reinterpret_cast<uint32_t*>(out) + i * panel_words;
      if (r1 - r0 < kGemmCols || s.channels % 2) std::fill(dst, dst + panel_words, 0u);
      for (int64_t g0 = r0; g0 < r1; g0 += kPackRows) {
        const int64_t n = std::min(kPackRows, r1 - g0) * row;
        b.raw.resize(n * in_size);
        b.converted.resize(n * sizeof(uint16_t));
        b.rows.resize(n * sizeof(uint16_t));
        file.read(b.raw.data(), n * in_size, s.offset + g0 * row * in_size);
        convert(b.raw.data(), s.from, b.converted.data(), s.to, n);
        pack_rows(reinterpret_cast<const uint16_t*>(b.converted.data()), n / row, g0 - r0, i, s,
                  reinterpret_cast<uint16_t*>(b.rows.data()), reinterpret_cast<uint16_t*>(out));
      }
      return;
    }
    const int64_t n = (r1 - r0) * row, offset = s.offset + r0 * row * in_size;
    if (s.layout == Layout::plain && s.from == s.to) {  // straight into place
      file.read(out + r0 * row * out_size, n * in_size, offset);
      return;
    }
    b.raw.resize(n * in_size);
    file.read(b.raw.data(), n * in_size, offset);
    if (s.layout == Layout::plain) {
      convert(b.raw.data(), s.from, out + r0 * row * out_size, s.to, n);
      return;
    }
    b.converted.resize(n * out_size);
    convert(b.raw.data(), s.from, b.converted.data(), s.to, n);
    channels_last_rows(b.converted.data(), r0, r1, s, out);
  });
}

// A weight's fresh buffer in 2 MB pages where the kernel offers them on request (transparent huge
// pages in "madvise" mode): the read faults its pages in 512 times less often.
void advise_huge_pages(char* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#endif
}

class ReadTensor : public mx::UnaryPrimitive {
 public:
  ReadTensor(mx::Stream stream, ReadSpec spec) : mx::UnaryPrimitive(stream), spec_(std::move(spec)) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto& encoder = prepare(stream(), inputs, out);
    advise_huge_pages(out.data<char>(), out.nbytes());
    encoder.dispatch([spec = spec_, out = out.data<char>()]() { run_read(spec, out); });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("ReadTensor runs on the CPU only");
  }

  const char* name() const override { return "ReadTensor"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    const ReadSpec& o = static_cast<const ReadTensor&>(other).spec_;
    return o.path == spec_.path && o.offset == spec_.offset && o.from == spec_.from && o.to == spec_.to &&
           o.rows == spec_.rows && o.channels == spec_.channels && o.taps == spec_.taps &&
           o.layout == spec_.layout;
  }

 private:
  ReadSpec spec_;
};

bool is_float(mx::Dtype d) { return d == mx::float32 || d == mx::float16 || d == mx::bfloat16; }

mx::array read_tensor(const std::string& path, int64_t offset, mx::Dtype source_dtype,
                      const std::vector<int>& source_shape, mx::Dtype dtype, const std::string& layout) {
  if (!is_float(source_dtype) || !is_float(dtype))
    throw std::invalid_argument("read_tensor: reads and converts float32, float16 and bfloat16 only");
  ReadSpec s{path, offset, source_dtype, dtype, 1, 1, 1, Layout::plain};
  int64_t count = 1;
  for (int d : source_shape) {
    if (d < 0) throw std::invalid_argument("read_tensor: negative dimension");
    count *= d;
  }
  mx::Shape shape(source_shape.begin(), source_shape.end());
  if (layout == "plain") {
    s.rows = count;
  } else {
    if (source_shape.size() < 2)
      throw std::invalid_argument("read_tensor: " + layout + " needs a (out, channels, ...) tensor");
    s.rows = source_shape[0];
    s.channels = source_shape[1];
    s.taps = s.rows * s.channels == 0 ? 0 : count / (s.rows * s.channels);
    if (layout == "channels_last") {
      if (source_shape.size() != 4) throw std::invalid_argument("read_tensor: channels_last needs (O, C, kh, kw)");
      s.layout = Layout::channels_last;
      shape = {source_shape[0], source_shape[2], source_shape[3], source_shape[1]};
    } else if (layout == "packed") {
      require_bf16_dot();
      if (dtype != mx::bfloat16) throw std::invalid_argument("read_tensor: packed weights are bfloat16");
      s.layout = Layout::packed;
      const int panels = static_cast<int>((s.rows + kGemmCols - 1) / kGemmCols);
      shape = {panels, static_cast<int>(s.taps), static_cast<int>((s.channels + 1) / 2), static_cast<int>(2 * kGemmCols)};
    } else {
      throw std::invalid_argument("read_tensor: layout must be plain, channels_last or packed");
    }
  }
  const int64_t size = File(path).size();
  if (offset < 0 || size < 0 || offset + count * source_dtype.size() > size)
    throw std::invalid_argument("read_tensor: " + path + " ends before the tensor's bytes (truncated)");
  return mx::array(shape, layout == "packed" ? mx::uint16 : dtype,
                   std::make_shared<ReadTensor>(mx::default_stream(mx::Device::cpu), std::move(s)), {});
}

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (const Isa& isa : isas()) names.emplace_back(isa.name);
  return names;
}

}  // namespace
}  // namespace sd_native

NB_MODULE(_native, m) {
  m.doc() = "Native CPU kernels for stable_diffusion, as MLX primitives.";
  m.attr("mlx_version") = std::to_string(MLX_VERSION_MAJOR) + "." + std::to_string(MLX_VERSION_MINOR) +
                          "." + std::to_string(MLX_VERSION_PATCH);
  m.def("kernels", &sd_native::kernel_names,
        "The flash attention kernels this CPU can run, fastest first (avx512, avx2, generic).");
  m.def("has_bf16_dot", &sd_native::has_bf16_dot,
        "Whether this CPU has AVX512_BF16's dot-product instruction, which bf16_product needs.");
  m.def("bf16_pack", &sd_native::bf16_pack, "w"_a,
        "w (out, taps, channels) bfloat16, channels even, packed for bf16_product (uint16 panels). Pack a "
        "layer's weights once and keep them: packing costs about as much as a small product.");
  m.def("bf16_product", &sd_native::bf16_product, "x"_a, "packed"_a, "out_channels"_a, "bias"_a = nb::none(),
        "offsets"_a, "rows"_a, "row_period"_a = 0, "row_valid"_a = 0, "addend"_a = nb::none(), "kernel"_a = "",
        "out[b, m, o] = bias[o] + sum over taps t and channels c of x[b, m + offsets[t], c] w[o, t, c] "
        "(+ addend[b, m, o]), bfloat16 in and out, float32 sums; x (batch, positions, channels), packed = "
        "bf16_pack(w). With row_period, of each run of row_period rows m only the first row_valid are "
        "kept (the output has rows / row_period * row_valid rows). kernel: one of bf16_kernels(), default "
        "the first. Needs has_bf16_dot().");
  m.def("has_f32_products", &sd_native::has_f32_products,
        "Whether the float32 layers take f32_product here (an AVX-512 CPU; with AVX2 only, it runs with "
        "kernel='avx2' but layers keep OpenBLAS).");
  m.def("f32_pack", &sd_native::f32_pack, "w"_a,
        "w (out, taps, channels) float32 packed for f32_product (float32 panels).");
  m.def("f32_product", &sd_native::f32_product, "x"_a, "packed"_a, "out_channels"_a, "bias"_a = nb::none(),
        "offsets"_a, "rows"_a, "row_period"_a = 0, "row_valid"_a = 0, "addend"_a = nb::none(), "kernel"_a = "",
        "bf16_product in float32: x, addend and out float32, packed = f32_pack(w), FMA. kernel: one of "
        "f32_kernels(), default the first. Needs has_f32_products().");
  m.def("f32_kernels", &sd_native::f32_kernel_names,
        "The float32 product kernels this CPU can run, fastest first: avx512, avx2; empty without them.");
  m.def("bf16_kernels", &sd_native::bf16_kernel_names,
        "The bfloat16 product kernels this CPU can run, fastest first: amx (where the CPU has AMX and Linux "
        "grants the tile state; not with SD_AMX=0), avx512_bf16; empty without AVX512_BF16.");
  m.def("group_norm", &sd_native::group_norm, "x"_a, "weight"_a, "bias"_a, "groups"_a, "eps"_a, "silu"_a = false,
        "pad"_a = std::vector<int64_t>{0, 0, 0, 0}, "kernel"_a = "",
        "PyTorch's GroupNorm of x (B, H, W, C), float32 or bfloat16, channels contiguous; statistics in "
        "float32 sums added in double; then SiLU if silu; the result written inside a zero border of "
        "pad = (top, bottom, left, right) pixels. kernel: one of kernels(), default the first.");
  m.def("layer_norm", &sd_native::layer_norm, "x"_a, "weight"_a, "bias"_a, "eps"_a, "kernel"_a = "",
        "(x - mean) / sqrt(variance + eps) weight + bias over the last axis of x (float32 or bfloat16; "
        "the statistics in float32), on all cores. kernel: one of kernels(), default the first.");
  m.def("gelu", &sd_native::gelu, "x"_a, "kernel"_a = "",
        "The exact (erf) GELU of x (float32 or bfloat16) as geglu's gate, on all cores. kernel: one of "
        "kernels(), default the first.");
  m.def("geglu", &sd_native::geglu, "x"_a, "kernel"_a = "",
        "h gelu(gate) for x = [h, gate] along its last axis (float32 or bfloat16), gelu the exact (erf) "
        "GELU to float32 rounding (ops.py's rational approximation), on all cores. kernel: one of "
        "kernels(), default the first.");
  m.def("read_tensor", &sd_native::read_tensor, "path"_a, "offset"_a, "source_dtype"_a, "source_shape"_a,
        "dtype"_a, "layout"_a = "plain",
        "A tensor of source_shape and source_dtype whose bytes start at offset in the file at path, read "
        "lazily (on all cores when evaluated) and converted to dtype as astype does. layout: plain (the "
        "source's shape), channels_last ((O, C, kh, kw) -> (O, kh, kw, C)) or packed (an (O, C, ...) weight "
        "as bf16_pack lays out (O, taps, C + C % 2); dtype bfloat16). Raises ValueError when the file is "
        "shorter than the tensor.");
  m.def("flash_attention", &sd_native::flash_attention, "q"_a, "k"_a, "v"_a, "scale"_a,
        "mask"_a = nb::none(), "kernel"_a = "",
        "softmax(q k^T scale + mask) v on the CPU without the score matrix. q (B, H, Lq, d), k and v "
        "(B, H, Lk, d), all float32, or all bfloat16 where bf16_kernels() starts with amx (AMX tiles, "
        "float32 scores and sums); mask additive in log2 units (scores times log2(e)), float32, "
        "broadcastable to (B, H, Lq, Lk). kernel: for float32 one of kernels(), default the first; for "
        "bfloat16 amx.");
}
