// sampler_cuda.cu: the kernels behind sampler.py. Bilinear sampling of walked nodes (rho of Eq. 5,
// Section 3.3) fused with the contraction that follows it:
//   aggregate  out[c]    = sum_k weights[g(c), k] * node_k[c]   (Eq. 5's message, Eq. 9's attn . v)
//   dot        logits[k] = sum_{c in g} q[c] * node_k[c]         (Eq. 9's q . k; sample() is dot with q = 1, G = C)
// and one backward for both, since each is the bilinear form L = sum_{k, c in g} u[k] * v[c] * node_k[c].
// Neither ever writes the (B, C, K, H, W) sampled nodes.
//
// One source, two builds. nvcc compiles it for the GPU. The host C++ compiler compiles the same file
// (sampler.py passes it as C++), where a CPU loop stands in for the thread grid and atomics become plain
// adds, so the per-element code below, everything but the launch, is tested against the torch reference
// path on machines without a GPU.
//
// Symbols: B batch, C channels, H x W map, G groups of C / G channels, K = ks * ks nodes per query.
// Node k = ks * i + j of query (y, x) sits at (y + (i - ks / 2) * dilation + dy_k, x + (j - ks / 2) * dilation + dx_k),
// with dy_k, dx_k in channels 2k, 2k + 1 of the offsets (torchvision.ops.deform_conv2d's layout).
// Neighbours outside the map read zero (DCN v1 semantics). Half inputs are read as float: coordinates,
// bilinear weights and sums are in at::opmath_type (float, or double for double inputs).
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <cmath>
#include <limits>

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#define HD __host__ __device__
#define UNROLL _Pragma("unroll")
#else
#define HD
#define UNROLL
#endif

// A strided tensor: t(i, j, ...) is data[i * stride[0] + j * stride[1] + ...], any layout, broadcasts included.
template <typename T, int N>
struct Strided {
  T* data;
  int64_t stride[N];

  explicit Strided(const at::Tensor& t) : data(t.data_ptr<T>()) {
    TORCH_CHECK(t.dim() == N, "expected a ", N, "-d tensor");
    for (int d = 0; d < N; ++d) stride[d] = t.stride(d);
  }
  template <typename... I>
  HD T& operator()(I... index) const {
    static_assert(sizeof...(I) == N, "one index per dimension");
    int64_t at = 0, d = 0;
    ((at += static_cast<int64_t>(index) * stride[d++]), ...);
    return data[at];
  }
};

// ------------------------------------------------------------------------------------------------
// Geometry and work items

struct Geometry {
  int64_t B, C, H, W, G, ks, dilation;
  HD int64_t K() const { return ks * ks; }
  HD int64_t group_channels() const { return C / G; }
};

// One work item (one GPU thread) is one query pixel (b, y, x) with one channel group g. Items are numbered
// ((b * G + g) * H + y) * W + x, so neighbouring threads hold neighbouring pixels.
struct Item {
  int64_t b, g, y, x;
};

HD inline Item item(const Geometry& s, int64_t i) {
  Item q;
  q.x = i % s.W;
  i /= s.W;
  q.y = i % s.H;
  i /= s.H;
  q.g = i % s.G;
  q.b = i / s.G;
  return q;
}

// ------------------------------------------------------------------------------------------------
// rho of Eq. 5 at one node

HD inline float floor_(float v) { return floorf(v); }
HD inline double floor_(double v) { return floor(v); }

// The four neighbours of a point (py, px): neighbour n = 2 * down + right, with its bilinear weight w and
// the derivatives of w along y and x. Neighbours outside the map are flagged and skipped: they read 0.
template <typename acc_t>
struct Neighbours {
  int64_t y[4], x[4];
  acc_t w[4], dw_dy[4], dw_dx[4];
  bool inside[4];
};

template <typename acc_t>
HD Neighbours<acc_t> neighbours(acc_t py, acc_t px, int64_t H, int64_t W) {
  Neighbours<acc_t> n;
  const acc_t top = floor_(py), left = floor_(px);
  const acc_t fy = py - top, fx = px - left;  // weights of the lower and the right neighbours
  UNROLL
  for (int i = 0; i < 4; ++i) {
    const int down = i / 2, right = i % 2;
    const acc_t ny = top + down, nx = left + right;
    // Compared as floats: a walk can land far outside int64, or be NaN (then all four read 0).
    n.inside[i] = ny >= 0 && ny < H && nx >= 0 && nx < W;
    n.y[i] = n.inside[i] ? static_cast<int64_t>(ny) : 0;
    n.x[i] = n.inside[i] ? static_cast<int64_t>(nx) : 0;
    const acc_t wy = down ? fy : 1 - fy, wx = right ? fx : 1 - fx;
    n.w[i] = wy * wx;
    n.dw_dy[i] = down ? wx : -wx;
    n.dw_dx[i] = right ? wy : -wy;
  }
  return n;
}

// Node k of query q: the ks x ks grid spaced `dilation` apart (Eq. 3's uniform sampling) moved by its walk (Eq. 4).
template <typename acc_t>
HD Neighbours<acc_t> node(const Geometry& s, const Strided<acc_t, 4>& offsets, const Item& q, int64_t k) {
  const int64_t half = s.ks / 2;
  const acc_t py = static_cast<acc_t>(q.y + (k / s.ks - half) * s.dilation) + offsets(q.b, 2 * k, q.y, q.x);
  const acc_t px = static_cast<acc_t>(q.x + (k % s.ks - half) * s.dilation) + offsets(q.b, 2 * k + 1, q.y, q.x);
  return neighbours(py, px, s.H, s.W);
}

// Channel c of image b read bilinearly at a node.
template <typename scalar_t, typename acc_t>
HD acc_t read(const Strided<scalar_t, 4>& x, int64_t b, int64_t c, const Neighbours<acc_t>& n) {
  acc_t v = 0;
  UNROLL
  for (int i = 0; i < 4; ++i)
    if (n.inside[i]) v += n.w[i] * static_cast<acc_t>(x(b, c, n.y[i], n.x[i]));
  return v;
}

template <typename T>
HD inline void atomic_add(T* p, T v) {
#ifdef __CUDA_ARCH__
  atomicAdd(p, v);
#else
  *p += v;  // the host loop gives each thread a whole image (backward) or writes no shared output (forward)
#endif
}

// Channels a thread accumulates at once, in registers.
constexpr int CHUNK = 8;

// ------------------------------------------------------------------------------------------------
// Forward: aggregate and dot, one item each

// out[b, c, y, x] = sum_k weights[b, g, k, y, x] * node_k[c] for the channels c of group g.
template <typename scalar_t, typename acc_t>
struct AggregateForward {
  Geometry s;
  Strided<scalar_t, 4> x;
  Strided<acc_t, 4> offsets;
  Strided<acc_t, 5> weights;
  Strided<scalar_t, 4> out;

  HD void operator()(int64_t i) const {
    const Item q = item(s, i);
    const int64_t end = (q.g + 1) * s.group_channels();
    for (int64_t c0 = q.g * s.group_channels(); c0 < end; c0 += CHUNK) {
      acc_t sum[CHUNK] = {};
      for (int64_t k = 0; k < s.K(); ++k) {
        const Neighbours<acc_t> n = node(s, offsets, q, k);
        const acc_t w = weights(q.b, q.g, k, q.y, q.x);
        UNROLL
        for (int j = 0; j < CHUNK; ++j)
          if (c0 + j < end) sum[j] += w * read(x, q.b, c0 + j, n);
      }
      UNROLL
      for (int j = 0; j < CHUNK; ++j)
        if (c0 + j < end) out(q.b, c0 + j, q.y, q.x) = static_cast<scalar_t>(sum[j]);
    }
  }
};

// logits[b, g, k, y, x] = sum_{c in g} q[b, c, y, x] * node_k[c].
template <typename scalar_t, typename acc_t>
struct DotForward {
  Geometry s;
  Strided<scalar_t, 4> q, x;
  Strided<acc_t, 4> offsets;
  Strided<scalar_t, 5> logits;

  HD void operator()(int64_t i) const {
    const Item p = item(s, i);
    const int64_t begin = p.g * s.group_channels(), end = begin + s.group_channels();
    for (int64_t k = 0; k < s.K(); ++k) {
      const Neighbours<acc_t> n = node(s, offsets, p, k);
      acc_t sum = 0;
      for (int64_t c = begin; c < end; ++c) sum += static_cast<acc_t>(q(p.b, c, p.y, p.x)) * read(x, p.b, c, n);
      logits(p.b, p.g, k, p.y, p.x) = static_cast<scalar_t>(sum);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Backward of L = sum_k sum_{c in g} u[k] * v[c] * node_k[c], one item each.
//   aggregate: u = weights, v = grad of out      -> grad_x, grad_offsets, grad_u = grad of weights
//   dot:       u = grad of logits, v = q         -> grad_x, grad_offsets, grad_v = grad of q
// With t_n = sum_c v[c] * x[c] at neighbour n of node k:
//   dL/du[k] = sum_n w_n t_n,  dL/dv[c] = sum_k u[k] node_k[c],  dL/dx[c] at n += u[k] w_n v[c],
//   dL/d(dy_k) = u[k] sum_n (dw_n/dy) t_n, and likewise for dx_k.

template <typename scalar_t, typename acc_t>
struct Backward {
  Geometry s;
  Strided<scalar_t, 4> x;
  Strided<acc_t, 4> offsets;
  Strided<acc_t, 5> u;
  Strided<scalar_t, 4> v;
  Strided<acc_t, 4> grad_x;        // scattered into, zeroed first
  Strided<acc_t, 5> grad_offsets;  // (B, G, 2K, H, W): per group, summed over groups afterwards; zeroed first
  Strided<acc_t, 5> grad_u;        // zeroed first; written when need_u
  Strided<scalar_t, 4> grad_v;     // written when need_v
  bool need_u, need_v;

  HD void operator()(int64_t i) const {
    const Item p = item(s, i);
    const int64_t end = (p.g + 1) * s.group_channels();
    for (int64_t c0 = p.g * s.group_channels(); c0 < end; c0 += CHUNK) {
      acc_t vc[CHUNK], gv[CHUNK] = {};
      UNROLL
      for (int j = 0; j < CHUNK; ++j) vc[j] = c0 + j < end ? static_cast<acc_t>(v(p.b, c0 + j, p.y, p.x)) : 0;
      for (int64_t k = 0; k < s.K(); ++k) {
        const Neighbours<acc_t> n = node(s, offsets, p, k);
        const acc_t uk = u(p.b, p.g, k, p.y, p.x);
        acc_t gu = 0, gy = 0, gx = 0;
        UNROLL
        for (int nb = 0; nb < 4; ++nb) {
          if (!n.inside[nb]) continue;
          acc_t t = 0;
          UNROLL
          for (int j = 0; j < CHUNK; ++j) {
            if (c0 + j >= end) continue;
            const acc_t xv = static_cast<acc_t>(x(p.b, c0 + j, n.y[nb], n.x[nb]));
            t += vc[j] * xv;
            gv[j] += uk * n.w[nb] * xv;
            atomic_add(&grad_x(p.b, c0 + j, n.y[nb], n.x[nb]), uk * n.w[nb] * vc[j]);
          }
          gu += n.w[nb] * t;
          gy += n.dw_dy[nb] * t;
          gx += n.dw_dx[nb] * t;
        }
        if (need_u) grad_u(p.b, p.g, k, p.y, p.x) += gu;
        grad_offsets(p.b, p.g, 2 * k, p.y, p.x) += uk * gy;
        grad_offsets(p.b, p.g, 2 * k + 1, p.y, p.x) += uk * gx;
      }
      if (need_v) {
        UNROLL
        for (int j = 0; j < CHUNK; ++j)
          if (c0 + j < end) grad_v(p.b, c0 + j, p.y, p.x) = static_cast<scalar_t>(gv[j]);
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Launch: a thread per item on the GPU; on the host, a parallel loop over `units` blocks of items, where
// items of different blocks never write the same memory.

#ifdef __CUDACC__
template <typename Op>
__global__ void each_item(Op op, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)
    op(i);
}
#endif

template <typename Op>
void run(const Op& op, int64_t units, int64_t items_per_unit) {
  const int64_t n = units * items_per_unit;
  if (n == 0) return;
#ifdef __CUDACC__
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, std::numeric_limits<int>::max());
  each_item<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(op, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  at::parallel_for(0, units, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo * items_per_unit; i < hi * items_per_unit; ++i) op(i);
  });
#endif
}

// ------------------------------------------------------------------------------------------------
// Entry points. sampler.py checks shapes with readable messages; these checks guard direct calls.

#ifdef __CUDACC__
constexpr bool kCuda = true;
#else
constexpr bool kCuda = false;
#endif

static Geometry geometry(const at::Tensor& x, const at::Tensor& offsets, int64_t groups, int64_t dilation) {
  TORCH_CHECK(x.dim() == 4 && offsets.dim() == 4, "x and offsets must be (B, C, H, W) and (B, 2K, H, W)");
  TORCH_CHECK(x.is_cuda() == kCuda, "this build of sampler_cuda.cu takes ", kCuda ? "CUDA" : "CPU", " tensors");
  const int64_t ks = static_cast<int64_t>(std::lround(std::sqrt(offsets.size(1) / 2.0)));
  TORCH_CHECK(offsets.size(1) == 2 * ks * ks && ks % 2 == 1, "offsets must have 2K channels, K = ks * ks, ks odd");
  TORCH_CHECK(offsets.size(0) == x.size(0) && offsets.size(2) == x.size(2) && offsets.size(3) == x.size(3),
              "offsets must be (B, 2K, H, W) for x of shape (B, C, H, W)");
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "groups must divide the channels");
  TORCH_CHECK(dilation > 0, "dilation must be positive");
  return Geometry{x.size(0), x.size(1), x.size(2), x.size(3), groups, ks, dilation};
}

static at::ScalarType acc_type(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

// Feature maps are read and written channels-last, (B, H, W, C) in memory, so the channels of a node are contiguous:
// the layout nn.Linear gives DGMN2's tokens (no copy then). Stride 0 (a broadcast) is left alone.
static at::Tensor channels_last(const at::Tensor& t) {
  return t.stride(1) <= 1 ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

static at::TensorOptions channels_last(const at::TensorOptions& options) {
  return options.memory_format(at::MemoryFormat::ChannelsLast);
}

// (B, C, H, W), (B, 2K, H, W), (B, G, K, H, W) -> (B, C, H, W)
at::Tensor aggregate(const at::Tensor& x_in, const at::Tensor& offsets, const at::Tensor& weights, int64_t dilation) {
  const Geometry s = geometry(x_in, offsets, weights.size(1), dilation);
  TORCH_CHECK(weights.dim() == 5 && weights.size(2) == s.K(), "weights must be (B, G, K, H, W)");
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = channels_last(x_in), off = offsets.to(acc_type(x)), w = weights.to(acc_type(x));
  at::Tensor out = at::empty(x.sizes(), channels_last(x.options()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aggregate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run(AggregateForward<scalar_t, acc_t>{s, Strided<scalar_t, 4>(x), Strided<acc_t, 4>(off),
                                          Strided<acc_t, 5>(w), Strided<scalar_t, 4>(out)},
        s.B * s.G * s.H, s.W);
  });
  return out;
}

// (B, C, H, W), (B, C, H, W), (B, 2K, H, W) -> (B, G, K, H, W)
at::Tensor dot(const at::Tensor& q_in, const at::Tensor& x_in, const at::Tensor& offsets, int64_t groups,
               int64_t dilation) {
  const Geometry s = geometry(x_in, offsets, groups, dilation);
  TORCH_CHECK(q_in.sizes() == x_in.sizes() && q_in.scalar_type() == x_in.scalar_type(), "q must be like x");
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor q = channels_last(q_in), x = channels_last(x_in), off = offsets.to(acc_type(x));
  at::Tensor logits = at::empty({s.B, s.G, s.K(), s.H, s.W}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dot", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run(DotForward<scalar_t, acc_t>{s, Strided<scalar_t, 4>(q), Strided<scalar_t, 4>(x),
                                    Strided<acc_t, 4>(off), Strided<scalar_t, 5>(logits)},
        s.B * s.G * s.H, s.W);
  });
  return logits;
}

// The backward of L = sum u[k] v[c] node_k[c] above: (grad_x, grad_offsets, grad_u, grad_v), each in the dtype
// of its input; grad_u and grad_v are empty unless asked for.
std::vector<at::Tensor> backward(const at::Tensor& x_in, const at::Tensor& offsets, const at::Tensor& u,
                                 const at::Tensor& v_in, int64_t dilation, bool need_u, bool need_v) {
  const Geometry s = geometry(x_in, offsets, u.size(1), dilation);
  TORCH_CHECK(u.dim() == 5 && u.size(2) == s.K(), "u must be (B, G, K, H, W)");
  TORCH_CHECK(v_in.sizes() == x_in.sizes() && v_in.scalar_type() == x_in.scalar_type(), "v must be like x");
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = channels_last(x_in), v = channels_last(v_in);
  const auto acc = x.options().dtype(acc_type(x));
  const at::Tensor off = offsets.to(acc_type(x)), uu = u.to(acc_type(x));
  at::Tensor grad_x = at::empty(x.sizes(), channels_last(acc)).zero_();  // at::zeros drops the memory format
  at::Tensor grad_offsets = at::zeros({s.B, s.G, 2 * s.K(), s.H, s.W}, acc);
  at::Tensor grad_u = need_u ? at::zeros(u.sizes(), acc) : at::empty({0, 0, 0, 0, 0}, acc);
  at::Tensor grad_v = need_v ? at::empty(v.sizes(), channels_last(v.options())) : at::empty({0, 0, 0, 0}, v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    run(Backward<scalar_t, acc_t>{s, Strided<scalar_t, 4>(x), Strided<acc_t, 4>(off),
                                  Strided<acc_t, 5>(uu), Strided<scalar_t, 4>(v),
                                  Strided<acc_t, 4>(grad_x), Strided<acc_t, 5>(grad_offsets),
                                  Strided<acc_t, 5>(grad_u), Strided<scalar_t, 4>(grad_v),
                                  need_u, need_v},
        s.B * s.G, s.H * s.W);  // host: groups of one image write disjoint channels, images disjoint memory
  });
  return {grad_x.to(x.scalar_type()), grad_offsets.sum(1).to(offsets.scalar_type()),
          grad_u.to(u.scalar_type()), grad_v};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("aggregate", &aggregate, "sum_k weights * node_k per group, (B, C, H, W)");
  m.def("dot", &dot, "q . node_k per group, (B, G, K, H, W)");
  m.def("backward", &backward, "backward of sum u[k] v[c] node_k[c]: grad_x, grad_offsets, grad_u, grad_v");
}
