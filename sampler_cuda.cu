// sampler_cuda.cu: the kernels behind sampler.py. Bilinear sampling of walked nodes (rho of Eq. 5,
// Section 3.3) fused with the contraction that follows it (Eq. 5's message, Eq. 9's q . k and attn . v):
//   aggregate  out[c]    = sum_k weights[g(c), k] * node_k[c]
//   dot        logits[k] = sum_{c in g} q[c] * node_k[c]         (sample() is dot with q = 1 and G = C)
//   backward   of L = sum_{k, c in g} u[k] v[c] node_k[c], the form of both: grad_x, grad_offsets, grad_u
//              (the remaining gradient, sum_k u[k] node_k[c], is aggregate itself: sampler.py calls it).
//   attention  DGMN2's whole attention (Eq. 8-9 with Fig. 4b's relative positions) per query and head, the logits
//              and the softmax in registers, and attention_backward, its gradients in one pass.
// None of them writes the (B, C, K, H, W) sampled nodes.
//
// Symbols: B batch, C channels, H x W map, G channel groups of C / G channels (a weight or a logit per group and
// node), Go walk groups (Go divides G: channels [o C / Go, (o + 1) C / Go) follow walk o), K = ks * ks nodes.
// Node k = ks * i + j of query (y, x) in walk group o sits at
//   (y + (i - ks / 2) * dilation + dy, x + (j - ks / 2) * dilation + dx),  dy, dx = offsets[2 (o K + k) + {0, 1}]
// (torchvision.ops.deform_conv2d's layout). Neighbours outside the map read zero (DCN v1 semantics); a node whose
// walk is NaN or infinite reads NaN. Half inputs are read as float: coordinates, bilinear weights and sums are in
// at::opmath_type (float, or double for double inputs), and gradients are accumulated in it and cast once.
//
// Work. A unit is one query pixel (b, y, x) with one channel group g; units are numbered ((b H + y) W + x) G + g,
// so neighbouring units hold the groups of one pixel, then neighbouring pixels. Feature maps are read
// channels-last, (B, H, W, C) in memory with any pixel strides (a slice of nn.Linear's tokens is read in place).
//   GPU:  a unit is L lanes (a power of two up to a warp); a lane owns runs of R consecutive channels (16 bytes,
//         one vector load, where alignment and C / G allow; else R = 1), its runs L R apart. Consecutive threads
//         thus read consecutive addresses; a query's walks and weights are read once per lane (by aggregate, once
//         per run: its K is a run-time value, its nodes are not held); sums over a group are warp-shuffle
//         reductions; grad_x is scattered with float atomics on consecutive addresses (the fused attention's
//         backward sums a block's tile of queries and its halo in shared memory first: see Tile).
//   Host: the same source compiled as C++ (sampler.py passes it as such). A unit is one lane that walks its group
//         in runs of up to kHostRun channels (whose loops the compiler vectorises); a shuffle reduction becomes the
//         lane's own sum, and the threads of the backward own whole (image, group) strips, so that its scatter
//         needs no atomics and is deterministic.
// Only the headers in use (not torch/extension.h, which takes most of the build's time).
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef __CUDACC__
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#define HD __host__ __device__
#define UNROLL _Pragma("unroll")
#define CHANNELS _Pragma("unroll")
#else
// Loops over the channels of a run are vectorised on the host (OpenMP simd: no dependence from one channel to the
// next).
#define HD
#define UNROLL
#define CHANNELS _Pragma("omp simd")
#if defined(__GNUC__) && !defined(__clang__)
// Keep short runs' zeroing and copies as vector stores: GCC would call memset and memcpy for them, slowly.
#pragma GCC optimize("no-tree-loop-distribute-patterns")
#endif
#endif

constexpr int kHostRun = 64;  // channels a host lane reads at once (a DGMN2 head)
constexpr int kThreads = 256;  // GPU threads a block, a multiple of the warp
constexpr int kWarp = 32;  // the most lanes a unit gets on the GPU: its shuffles stay within a warp
constexpr int kVectorBytes = 16;  // a GPU vector load or store (128 bits): a run of 4 floats or 8 halves
constexpr int64_t kResidentThreads = 2048;  // threads a multiprocessor holds at once (sm_80, sm_90)

// ------------------------------------------------------------------------------------------------
// Tensors

// A (B, C, H, W) feature map whose channels are contiguous: channel c of pixel (b, y, x) is at
// data[b * sb + y * sy + x * sx + c]. A map of an undefined tensor is null (a gradient nobody asked for).
template <typename T, typename index_t>
struct Map {
  T* __restrict__ data = nullptr;
  index_t sb = 0, sy = 0, sx = 0;

  Map() = default;
  explicit Map(const at::Tensor& t)
      : data(t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr),
        sb(t.defined() ? t.stride(0) : 0), sy(t.defined() ? t.stride(2) : 0), sx(t.defined() ? t.stride(3) : 0) {}
  HD T* at(index_t b, index_t y, index_t x) const { return data + b * sb + y * sy + x * sx; }
};

// A tensor of any strides (broadcasts included): t(i, j, ...) is data[i * stride[0] + j * stride[1] + ...].
template <typename T, int N, typename index_t>
struct Strided {
  T* __restrict__ data = nullptr;
  index_t stride[N] = {};

  Strided() = default;
  explicit Strided(const at::Tensor& t) : data(t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr) {
    for (int d = 0; d < N && t.defined(); ++d) stride[d] = t.stride(d);
  }
  template <typename... I>
  HD T& operator()(I... index) const {
    static_assert(sizeof...(I) == N, "one index per dimension");
    index_t at = 0;
    int d = 0;
    ((at += static_cast<index_t>(index) * stride[d++]), ...);
    return data[at];
  }
};

// ------------------------------------------------------------------------------------------------
// Geometry and units

template <typename index_t>
struct Geometry {
  index_t B, C, H, W, G, Go, ks, dilation;
  HD index_t K() const { return ks * ks; }
  HD index_t group_channels() const { return C / G; }
  HD index_t units() const { return B * H * W * G; }
};

template <typename index_t>
struct Unit {
  index_t b, y, x, g, o;  // o: the walk group of channel group g
};

template <typename index_t>
HD inline Unit<index_t> unit(const Geometry<index_t>& s, index_t i) {
  Unit<index_t> u;
  u.g = i % s.G;
  i /= s.G;
  u.x = i % s.W;
  i /= s.W;
  u.y = i % s.H;
  u.b = i / s.H;
  u.o = u.g / (s.G / s.Go);
  return u;
}

// ------------------------------------------------------------------------------------------------
// rho of Eq. 5 at one node

HD inline float floor_(float v) { return floorf(v); }
HD inline double floor_(double v) { return floor(v); }
template <typename T>
HD inline bool finite_(T v) {
#ifdef __CUDA_ARCH__
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// The four neighbours of a node: neighbour i = 2 * down + right, with its bilinear weight w and the derivatives of
// w along y and x. Neighbours outside the map are flagged: they read 0. A non-finite walk flags them all and the
// node reads NaN, so that a NaN check downstream sees it.
template <typename acc_t, typename index_t>
struct Node {
  index_t y[4], x[4];
  acc_t w[4], dw_dy[4], dw_dx[4];
  bool inside[4];
  bool finite;
};

// Node k of unit u, walked by (dy, dx): the ks x ks grid spaced `dilation` apart (Eq. 3's uniform sampling) moved by
// its walk (Eq. 4). KS: ks as a compile-time constant (its divisions become multiplications), or 0 for s.ks.
template <int KS = 0, typename acc_t, typename index_t>
HD inline Node<acc_t, index_t> node(const Geometry<index_t>& s, const Unit<index_t>& u, index_t k, acc_t dy, acc_t dx) {
  const index_t ks = KS ? KS : s.ks, half = ks / 2;
  const acc_t py = static_cast<acc_t>(u.y + (k / ks - half) * s.dilation) + dy;
  const acc_t px = static_cast<acc_t>(u.x + (k % ks - half) * s.dilation) + dx;
  Node<acc_t, index_t> n;
  n.finite = finite_(py) && finite_(px);
  const acc_t top = floor_(py), left = floor_(px);
  const acc_t fy = py - top, fx = px - left;  // the weights of the lower and the right neighbours
  UNROLL
  for (int i = 0; i < 4; ++i) {
    const int down = i / 2, right = i % 2;
    const acc_t ny = top + down, nx = left + right;
    // Compared as floats: a walk can land far outside the index type.
    n.inside[i] = n.finite && ny >= 0 && ny < s.H && nx >= 0 && nx < s.W;
    n.y[i] = n.inside[i] ? static_cast<index_t>(ny) : 0;
    n.x[i] = n.inside[i] ? static_cast<index_t>(nx) : 0;
    const acc_t wy = down ? fy : 1 - fy, wx = right ? fx : 1 - fx;
    n.w[i] = wy * wx;
    n.dw_dy[i] = down ? wx : -wx;
    n.dw_dx[i] = right ? wy : -wy;
  }
  return n;
}

// The same, walked by offsets (B, 2K Go, H, W).
template <typename acc_t, typename index_t>
HD inline Node<acc_t, index_t> node(const Geometry<index_t>& s, const Strided<const acc_t, 4, index_t>& offsets,
                                    const Unit<index_t>& u, index_t k) {
  const index_t walk = 2 * (u.o * s.K() + k);
  return node(s, u, k, offsets(u.b, walk, u.y, u.x), offsets(u.b, walk + 1, u.y, u.x));
}

// ------------------------------------------------------------------------------------------------
// Runs: up to R consecutive channels of one pixel, held by one lane. On the GPU a run is exactly R channels, R a
// compile-time `count` (std::integral_constant); on the host `count` is an int, so that the last run of a group
// may be shorter and the loops over a run's channels are vectorised whatever its length.

template <typename T, int R>
struct alignas(sizeof(T) * R) Vector {
  T v[R];
};

// Calls f(j, value) for j in [0, count), value = p[j] as acc_t. GPU: one 16-byte load when the run is 16 bytes (its
// alignment is checked at launch). Host: one vectorised loop, so f must not carry anything from one j to the next.
template <int R, typename acc_t, typename T, typename Count, typename F>
HD inline void each(const T* p, Count count, const F& f) {
#ifdef __CUDA_ARCH__
  if constexpr (R * sizeof(T) == kVectorBytes) {
    const Vector<T, R> run = *reinterpret_cast<const Vector<T, R>*>(p);
    CHANNELS
    for (int j = 0; j < R; ++j) f(j, static_cast<acc_t>(run.v[j]));
  } else
#endif
  {
    CHANNELS
    for (int j = 0; j < count; ++j) f(j, static_cast<acc_t>(p[j]));
  }
}

// sum_j a[j] * b[j] over j < count, on the host: in 16 partial sums (one AVX-512 or two AVX2 vectors of floats),
// added up at the end. a and b are pointers or register arrays.
template <typename acc_t, typename A, typename B>
inline acc_t host_inner(const A& a, const B& b, int count) {
  constexpr int kPartialSums = 16;
  acc_t part[kPartialSums] = {};
  int j0 = 0;
  for (; j0 + kPartialSums <= count; j0 += kPartialSums)
    for (int j = 0; j < kPartialSums; ++j) part[j] += static_cast<acc_t>(a[j0 + j]) * static_cast<acc_t>(b[j0 + j]);
  for (int j = 0; j0 + j < count; ++j) part[j] += static_cast<acc_t>(a[j0 + j]) * static_cast<acc_t>(b[j0 + j]);
  CHANNELS
  for (int j = 0; j < 4; ++j) part[j] = (part[j] + part[j + 4]) + (part[j + 8] + part[j + 12]);
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// sum_j a[j] * b[j] over a run. GPU: in registers, after one vector load of each where it fits.
template <int R, typename acc_t, typename T, typename Count>
HD inline acc_t inner(const T* a, const T* b, Count count) {
#ifdef __CUDA_ARCH__
  acc_t values[R], sum = 0;
  each<R, acc_t>(b, count, [&](int j, acc_t value) { values[j] = value; });
  each<R, acc_t>(a, count, [&](int j, acc_t value) { sum += value * values[j]; });
  return sum;
#else
  return host_inner<acc_t>(a, b, count);
#endif
}

// The same with a run already held in registers.
template <int R, typename acc_t, typename T, typename Count>
HD inline acc_t inner(const acc_t (&held)[R], const T* b, Count count) {
#ifdef __CUDA_ARCH__
  acc_t sum = 0;
  each<R, acc_t>(b, count, [&](int j, acc_t value) { sum += held[j] * value; });
  return sum;
#else
  return host_inner<acc_t>(held, b, count);
#endif
}

// The same with both runs in registers.
template <int R, typename acc_t, typename Count>
HD inline acc_t inner_held(const acc_t (&a)[R], const acc_t (&b)[R], Count count) {
#ifdef __CUDA_ARCH__
  acc_t sum = 0;
  UNROLL
  for (int j = 0; j < R; ++j) sum += a[j] * b[j];
  return sum;
#else
  return host_inner<acc_t>(a, b, count);
#endif
}

// a[0, count) = 0, in a vectorised loop on the host (where `= {}` would be a slow memset call for a short run).
template <int R, typename acc_t, typename Count>
HD inline void zero(acc_t (&a)[R], Count count) {
  CHANNELS
  for (int j = 0; j < count; ++j) a[j] = 0;
}

template <int R, typename T, typename acc_t, typename Count>
HD inline void store(T* p, const acc_t (&in)[R], Count count) {
#ifdef __CUDA_ARCH__
  if constexpr (R * sizeof(T) == kVectorBytes) {
    Vector<T, R> run;
    CHANNELS
    for (int j = 0; j < R; ++j) run.v[j] = static_cast<T>(in[j]);
    *reinterpret_cast<Vector<T, R>*>(p) = run;
  } else
#endif
  {
    CHANNELS
    for (int j = 0; j < count; ++j) p[j] = static_cast<T>(in[j]);
  }
}

// to[j] += scale * v[j] over a run, where other lanes may add to the same place: float atomics on the GPU (one
// 16-byte atomic per four floats on Hopper and newer), plain adds on the host, whose threads own disjoint strips.
template <int R, typename acc_t, typename T, typename Count>
HD inline void scatter(acc_t* to, acc_t scale, const T* v, Count count) {
#ifdef __CUDA_ARCH__
  acc_t add[R];
  each<R, acc_t>(v, count, [&](int j, acc_t value) { add[j] = scale * value; });
#if __CUDA_ARCH__ >= 900
  if constexpr (std::is_same_v<acc_t, float> && R % 4 == 0) {
    UNROLL
    for (int j = 0; j < R; j += 4)
      atomicAdd(reinterpret_cast<float4*>(to + j), make_float4(add[j], add[j + 1], add[j + 2], add[j + 3]));
  } else
#endif
  {
    UNROLL
    for (int j = 0; j < R; ++j) atomicAdd(to + j, add[j]);
  }
#else
  each<R, acc_t>(v, count, [&](int j, acc_t value) { to[j] += scale * value; });
#endif
}

// acc += scale * rho(x, n) over the run at channel c: the bilinear read of a run of channels at one node.
template <int R, typename scalar_t, typename acc_t, typename index_t, typename Count>
HD inline void gather(acc_t (&acc)[R], const Map<const scalar_t, index_t>& x, index_t b,
                      const Node<acc_t, index_t>& n, index_t c, acc_t scale, Count count) {
  if (!n.finite) {
    CHANNELS
    for (int j = 0; j < count; ++j) acc[j] += scale * static_cast<acc_t>(NAN);
    return;
  }
  UNROLL
  for (int i = 0; i < 4; ++i) {
    if (!n.inside[i]) continue;
    const acc_t w = scale * n.w[i];
    each<R, acc_t>(x.at(b, n.y[i], n.x[i]) + c, count, [&](int j, acc_t value) { acc[j] += w * value; });
  }
}

// Calls f(count, c) for the runs of one lane in the channels [begin, end). GPU: runs of R channels from
// begin + lane R, lanes R apart (R divides end - begin). Host: the only lane, runs of up to R channels.
template <int R, typename index_t, typename F>
HD inline void for_runs(index_t begin, index_t end, int lane, int lanes, const F& f) {
#ifdef __CUDA_ARCH__
  for (index_t c = begin + lane * R; c < end; c += lanes * R) f(std::integral_constant<int, R>(), c);
#else
  (void)lane, (void)lanes;
  for (index_t c = begin; c < end; c += R) f(static_cast<int>(std::min<index_t>(R, end - c)), c);
#endif
}

// The sum of v over the lanes of a unit: a butterfly of warp shuffles within the unit's aligned segment of `lanes`
// threads (every lane gets the total). On the host a unit is one lane, whose own sum is the total.
template <typename T>
HD inline T lane_sum(T v, int lanes) {
#ifdef __CUDA_ARCH__
  const unsigned segment =
      lanes == kWarp ? 0xffffffffu : ((1u << lanes) - 1) << (threadIdx.x & (kWarp - 1) & ~(lanes - 1));
  for (int m = lanes / 2; m > 0; m /= 2) v += __shfl_xor_sync(segment, v, m);
#else
  (void)lanes;
#endif
  return v;
}

// The same with the unit's lane count L a compile-time constant: the shuffle mask and the butterfly unroll.
template <int L, typename T>
HD inline T lane_sum(T v) {
#ifdef __CUDA_ARCH__
  constexpr unsigned kLanes = L == kWarp ? 0xffffffffu : (1u << L) - 1;
  const unsigned segment = kLanes << (threadIdx.x & (kWarp - 1) & ~(L - 1));
  UNROLL
  for (int m = L / 2; m > 0; m /= 2) v += __shfl_xor_sync(segment, v, m);
#endif
  return v;
}

// ------------------------------------------------------------------------------------------------
// Forward: aggregate and dot, one lane of one unit each call

// out[b, c, y, x] = sum_k weights[b, g, k, y, x] * node_k[c] for the channels c of group g.
template <typename scalar_t, typename index_t>
struct Aggregate {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry<index_t> s;
  Map<const scalar_t, index_t> x;
  Strided<const acc_t, 4, index_t> offsets;
  Strided<const acc_t, 5, index_t> weights;
  Map<scalar_t, index_t> out;

  template <int R, int L>  // L: unused, the lane count is a run-time value here
  HD void operator()(index_t i, int lane, int lanes) const {
    const Unit<index_t> u = unit(s, i);
    const index_t begin = u.g * s.group_channels();
    for_runs<R>(begin, begin + s.group_channels(), lane, lanes, [&](auto count, index_t c) {
      acc_t sum[R];
      zero(sum, count);
      for (index_t k = 0; k < s.K(); ++k)
        gather(sum, x, u.b, node(s, offsets, u, k), c, weights(u.b, u.g, k, u.y, u.x), count);
      store(out.at(u.b, u.y, u.x) + c, sum, count);
    });
  }
};

// logits[b, g, k, y, x] = sum_{c in g} q[b, c, y, x] * node_k[c].
template <typename scalar_t, typename index_t>
struct Dot {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry<index_t> s;
  Map<const scalar_t, index_t> q, x;
  Strided<const acc_t, 4, index_t> offsets;
  Strided<scalar_t, 5, index_t> logits;

  template <int R, int L>  // L: unused, the lane count is a run-time value here
  HD void operator()(index_t i, int lane, int lanes) const {
    const Unit<index_t> u = unit(s, i);
    const index_t begin = u.g * s.group_channels();
    for (index_t k = 0; k < s.K(); ++k) {
      const Node<acc_t, index_t> n = node(s, offsets, u, k);
      acc_t part = n.finite ? 0 : static_cast<acc_t>(NAN);  // q . node_k = sum_n w_n (q . x_n)
      for_runs<R>(begin, begin + s.group_channels(), lane, lanes, [&](auto count, index_t c) {
        const scalar_t* qc = q.at(u.b, u.y, u.x) + c;
        UNROLL
        for (int nb = 0; nb < 4; ++nb)
          if (n.inside[nb]) part += n.w[nb] * inner<R, acc_t>(qc, x.at(u.b, n.y[nb], n.x[nb]) + c, count);
      });
      part = lane_sum(part, lanes);
      if (lane == k % lanes) logits(u.b, u.g, k, u.y, u.x) = static_cast<scalar_t>(part);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Backward of L = sum_k sum_{c in g} u[k] v[c] node_k[c]:
//   aggregate: u = weights, v = grad of out  -> grad_x, grad_offsets, grad_u = grad of the weights
//   dot:       u = grad of logits, v = q     -> grad_x, grad_offsets (grad of q: aggregate(x, offsets, u))
// With t_n = sum_{c in g} v[c] x_n[c] at the four neighbours n of node k (node_k = sum_n w_n x_n):
//   dL/du[k] = sum_n w_n t_n,  dL/d(dy_k) = u[k] sum_n (dw_n / dy) t_n (likewise dx_k),  dL/dx_n[c] += u[k] w_n v[c].
// Each unit writes its own walk gradients (B, G, 2K, H, W); with Go < G, backward() below sums a walk's groups.

template <typename scalar_t, typename index_t>
struct Backward {
  using acc_t = at::opmath_type<scalar_t>;
  Geometry<index_t> s;
  Map<const scalar_t, index_t> x, v;
  Strided<const acc_t, 4, index_t> offsets;
  Strided<const acc_t, 5, index_t> u;
  Map<acc_t, index_t> grad_x;               // scattered into (zeroed first); null when not asked for
  Strided<acc_t, 5, index_t> grad_offsets;  // (B, G, 2K, H, W); null when not asked for
  Strided<acc_t, 5, index_t> grad_u;        // (B, G, K, H, W); null when not asked for

  template <int R, int L>  // L: unused, the lane count is a run-time value here
  HD void operator()(index_t i, int lane, int lanes) const {
    const Unit<index_t> p = unit(s, i);
    const index_t begin = p.g * s.group_channels();
    const bool walks_or_u = grad_offsets.data != nullptr || grad_u.data != nullptr;
    for (index_t k = 0; k < s.K(); ++k) {
      const Node<acc_t, index_t> n = node(s, offsets, p, k);
      const acc_t uk = u(p.b, p.g, k, p.y, p.x);
      acc_t gu = 0, gy = 0, gx = 0;  // this lane's parts of sum_n {w_n, dw_n / dy, dw_n / dx} t_n
      for_runs<R>(begin, begin + s.group_channels(), lane, lanes, [&](auto count, index_t c) {
        const scalar_t* vc = v.at(p.b, p.y, p.x) + c;
        UNROLL
        for (int nb = 0; nb < 4; ++nb) {
          if (!n.inside[nb]) continue;
          const scalar_t* xn = x.at(p.b, n.y[nb], n.x[nb]) + c;
          if (walks_or_u) {
            const acc_t t = inner<R, acc_t>(vc, xn, count);  // sum_c v[c] x_n[c] over the run
            gu += n.w[nb] * t;
            gy += n.dw_dy[nb] * t;
            gx += n.dw_dx[nb] * t;
          }
          if (grad_x.data != nullptr) scatter<R>(grad_x.at(p.b, n.y[nb], n.x[nb]) + c, uk * n.w[nb], vc, count);
        }
      });
      if (!walks_or_u) continue;
      gu = lane_sum(gu, lanes);
      gy = lane_sum(gy, lanes);
      gx = lane_sum(gx, lanes);
      if (lane != k % lanes) continue;
      if (grad_offsets.data != nullptr) {
        grad_offsets(p.b, p.g, 2 * k, p.y, p.x) = uk * gy;
        grad_offsets(p.b, p.g, 2 * k + 1, p.y, p.x) = uk * gx;
      }
      // A non-finite walk's node reads NaN: so does the gradient of its weight (its position gets none, like x).
      if (grad_u.data != nullptr) grad_u(p.b, p.g, k, p.y, p.x) = n.finite ? gu : static_cast<acc_t>(NAN);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// DGMN2's attention, fused: Eq. 8-9 with Fig. 4b's relative positions (the symmetric rule). Per query (b, y, x) and
// head g, with K = kAttentionNodes nodes and the tables Rw (W + K - 1, D), Rh (H + K - 1, D):
//   logit_k = scale q . node_k(k) + q . Rw[k + W-1 - x] + q . Rh[k + H-1 - y],  p = softmax_k(logit),
//   out     = sum_k p_k node_k(v)
// q, k and v are the three C-channel thirds of nn.Linear's (B, N, 3C) qkv and are read in place; the walks
// (B, N, G, 2K), a walk per head, are read in their own dtype. Logits and the softmax stay in acc_t registers: only p
// is written (acc_t, for the backward). A lane holds one run of its head (the entry points check that the head fits
// its L lanes), so q is loaded once. Corners of zero bilinear weight are skipped (at zero walks, three of four).

constexpr int kAttentionSide = 3, kAttentionNodes = kAttentionSide * kAttentionSide;  // K: the node loops unroll

HD inline float exp_(float v) { return expf(v); }
HD inline double exp_(double v) { return exp(v); }

// The run of a head's channels [begin, end) that one lane holds. GPU: R channels from begin + lane R (none for the
// lanes past the end). Host: the whole head, at most kHostRun channels.
template <typename index_t, typename Count>
struct Run {
  index_t c;
  bool active;
  Count count;
};

// Calls f(run) with the lane's run. On the host a head of exactly R channels gets a compile-time count, so that its
// channel loops have a known trip count (no remainder).
template <int R, typename index_t, typename F>
HD inline void with_lane_run(index_t begin, index_t end, int lane, const F& f) {
#ifdef __CUDA_ARCH__
  const index_t c = begin + lane * R;
  f(Run<index_t, std::integral_constant<int, R>>{c, c < end, {}});
#else
  (void)lane;
  if (end - begin == R) return f(Run<index_t, std::integral_constant<int, R>>{begin, true, {}});
  f(Run<index_t, int>{begin, begin < end, static_cast<int>(end - begin)});
#endif
}

// Calls op.head<R, L>(u, begin, run, lane, more...) for unit i: its query and head, the head's first channel, the
// lane's run.
template <int R, int L, typename Op, typename index_t, typename... More>
HD inline void for_head(const Op& op, index_t i, int lane, const More&... more) {
  const Unit<index_t> u = unit(op.s, i);
  const index_t begin = u.g * op.s.group_channels();
  with_lane_run<R>(begin, begin + op.s.group_channels(), lane,
                   [&](const auto& run) { op.template head<R, L>(u, begin, run, lane, more...); });
}

// What the forward and the backward read: the geometry (C channels a third, G = Go heads), the thirds of qkv, the
// walks and the tables.
template <typename scalar_t, typename index_t>
struct AttentionInputs {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int K = kAttentionNodes;
  Geometry<index_t> s;
  Map<const scalar_t, index_t> q, k, v;
  Strided<const scalar_t, 4, index_t> walks;       // (B, N, G, 2K)
  Strided<const acc_t, 2, index_t> width, height;  // (W + K - 1, D), (H + K - 1, D)
  acc_t scale;

  HD index_t pixel(const Unit<index_t>& u) const { return u.y * s.W + u.x; }
  HD Node<acc_t, index_t> walked(const Unit<index_t>& u, int n) const {
    const index_t i = pixel(u);
    return node<kAttentionSide>(s, u, static_cast<index_t>(n), static_cast<acc_t>(walks(u.b, i, u.g, 2 * n)),
                                static_cast<acc_t>(walks(u.b, i, u.g, 2 * n + 1)));
  }
  // The rows of slot n's relative-position vectors at query u, offset to channel d of the head.
  HD const acc_t* width_row(const Unit<index_t>& u, int n, index_t d) const { return &width(n + s.W - 1 - u.x, d); }
  HD const acc_t* height_row(const Unit<index_t>& u, int n, index_t d) const { return &height(n + s.H - 1 - u.y, d); }
};

template <typename scalar_t, typename index_t>
struct Attention : AttentionInputs<scalar_t, index_t> {
  using Base = AttentionInputs<scalar_t, index_t>;
  using typename Base::acc_t;
  using Base::K;
  Map<scalar_t, index_t> out;        // (B, N, C)
  Strided<acc_t, 4, index_t> probs;  // (B, N, G, K)

  template <int R, int L>
  HD void operator()(index_t i, int lane, int) const { for_head<R, L>(*this, i, lane); }

  template <int R, int L, typename LaneRun>
  HD void head(const Unit<index_t>& u, index_t begin, const LaneRun& run, int lane) const {
    const auto& a = static_cast<const Base&>(*this);
    acc_t q[R], p[K];
    if (run.active) each<R, acc_t>(a.q.at(u.b, u.y, u.x) + run.c, run.count, [&](int j, acc_t value) { q[j] = value; });
    UNROLL
    for (int n = 0; n < K; ++n) {
      p[n] = 0;
      if (!run.active) continue;
      // logit_n = q . m with m = scale node_n(k) + Rw row + Rh row: one inner product per node, not one per term.
      const Node<acc_t, index_t> nd = a.walked(u, n);
      const acc_t* rw = a.width_row(u, n, run.c - begin);
      const acc_t* rh = a.height_row(u, n, run.c - begin);
      acc_t m[R];
      CHANNELS
      for (int j = 0; j < run.count; ++j) m[j] = rw[j] + rh[j];
      UNROLL
      for (int nb = 0; nb < 4; ++nb) {
        if (!nd.inside[nb] || nd.w[nb] == 0) continue;
        const acc_t w = a.scale * nd.w[nb];
        each<R, acc_t>(a.k.at(u.b, nd.y[nb], nd.x[nb]) + run.c, run.count,
                       [&](int j, acc_t value) { m[j] += w * value; });
      }
      p[n] = nd.finite ? inner_held(q, m, run.count) : static_cast<acc_t>(NAN);
    }
    // The softmax over the K logits, in registers; a NaN logit (a non-finite walk) makes the query's p NaN.
    acc_t top = -static_cast<acc_t>(INFINITY), total = 0;
    UNROLL
    for (int n = 0; n < K; ++n) {
      p[n] = lane_sum<L>(p[n]);
      top = p[n] > top ? p[n] : top;
    }
    UNROLL
    for (int n = 0; n < K; ++n) total += (p[n] = exp_(p[n] - top));
    UNROLL
    for (int n = 0; n < K; ++n) {
      p[n] /= total;
      if (lane == n % L) probs(u.b, a.pixel(u), u.g, n) = p[n];
    }
    if (!run.active) return;
    acc_t sum[R];
    zero(sum, run.count);
    UNROLL
    for (int n = 0; n < K; ++n) {
      const Node<acc_t, index_t> nd = a.walked(u, n);
      if (!nd.finite) {
        CHANNELS
        for (int j = 0; j < run.count; ++j) sum[j] += static_cast<acc_t>(NAN);
      }
      UNROLL
      for (int nb = 0; nb < 4; ++nb) {
        if (!nd.inside[nb] || nd.w[nb] == 0) continue;
        const acc_t w = p[n] * nd.w[nb];
        each<R, acc_t>(a.v.at(u.b, nd.y[nb], nd.x[nb]) + run.c, run.count,
                       [&](int j, acc_t value) { sum[j] += w * value; });
      }
    }
    store(out.at(u.b, u.y, u.x) + run.c, sum, run.count);
  }
};

// Tiles: where the fused backward sums the gradients of k and v and of the tables. A tile is Rows x Cols query
// pixels of one image and one head, and a halo of kHalo pixels around them: as far as their nodes' corners reach while
// walks are shorter than a pixel (a node sits a pixel from its query, its corners one more). What lands in the haloed
// tile is summed in a buffer (GPU: the block's shared memory, by shared-memory atomics; host: the thread's own) and
// added to the maps once the tile is done; what lands beyond it goes to the maps directly. On the GPU a query's head
// thus takes 2 (Rows + 2 kHalo) (Cols + 2 kHalo) / (Rows Cols) global atomics a channel (6 for 4 x 8; 16-byte atomics
// on Hopper) where it took up to 72 (9 nodes, 4 corners, k and v). The tile's queries read Cols + K - 1 rows of the
// width table and Rows + K - 1 of the height table: their gradients are summed beside, and added to the tables' once
// a tile (GPU: one table for all blocks, by atomics; host: one a strip, summed once the strips are done).
constexpr int kHalo = 2;

// The rows of a tile of `units` query pixels, the largest power of two whose square fits: 4 x 8 for 32, 8 x 8 for 64.
constexpr int tile_rows(int units) {
  int rows = 1;
  while (4 * rows * rows <= units) rows *= 2;
  return rows;
}

// A tile of Units query pixels: its rows and columns, and the sums it holds for heads of D channels.
template <int Units>
struct TileShape {
  static constexpr int rows = tile_rows(Units), cols = Units / rows;
  static constexpr int64_t sums(int64_t channels) {
    return (2 * (rows + 2 * kHalo) * (cols + 2 * kHalo) + cols + rows + 2 * (kAttentionNodes - 1)) * channels;
  }
};

template <typename acc_t, typename index_t>
struct Tile {
  index_t b, g, y0, x0;  // image, head, the first query pixel
  index_t rows, cols;    // the haloed tile: (Rows + 2 kHalo) x (Cols + 2 kHalo) pixels
  index_t width_base, height_base;  // the first row of each table that the tile's sums hold (below 0 at the edge)
  index_t channels;      // D
  acc_t* sums;           // (2, rows, cols, D): k's, then v's; then (Cols + K - 1 + Rows + K - 1, D): the tables'

  HD index_t maps_size() const { return 2 * rows * cols * channels; }
  HD index_t width_rows() const { return cols - 2 * kHalo + kAttentionNodes - 1; }
  HD index_t table_rows() const { return width_rows() + rows - 2 * kHalo + kAttentionNodes - 1; }
  HD index_t size() const { return maps_size() + table_rows() * channels; }
  // Where channel d of the head of k (which = 0) or v (1) at pixel (y, x) is summed, or -1 beyond the halo.
  HD index_t slot(int which, index_t y, index_t x, index_t d) const {
    const index_t ty = y - y0 + kHalo, tx = x - x0 + kHalo;
    if (ty < 0 || ty >= rows || tx < 0 || tx >= cols) return -1;
    return ((which * rows + ty) * cols + tx) * channels + d;
  }
  // Where channel d of row `row` of the width (height = false) or height table is summed: a row a query of the tile
  // reads.
  HD index_t table_slot(bool height, index_t row, index_t d) const {
    const index_t local = height ? width_rows() + row - height_base : row - width_base;
    return maps_size() + local * channels + d;
  }
};

// The tiles of a geometry, numbered ((b Ty + ty) Tx + tx) G + g (the heads of one place are neighbours).
template <int Rows, int Cols, typename index_t>
HD inline index_t tiles_per_image(const Geometry<index_t>& s) {
  return (s.H + Rows - 1) / Rows * ((s.W + Cols - 1) / Cols);
}

template <int Rows, int Cols, typename acc_t, typename index_t>
HD inline Tile<acc_t, index_t> tile_of(const Geometry<index_t>& s, index_t t, acc_t* sums) {
  const index_t across = (s.W + Cols - 1) / Cols, down = (s.H + Rows - 1) / Rows;
  Tile<acc_t, index_t> tl;
  tl.g = t % s.G;
  t /= s.G;
  tl.x0 = t % across * Cols;
  t /= across;
  tl.y0 = t % down * Rows;
  tl.b = t / down;
  tl.rows = Rows + 2 * kHalo;
  tl.cols = Cols + 2 * kHalo;
  tl.width_base = s.W - tl.x0 - Cols;  // slot n of query x reads row n + W - 1 - x: x0 + Cols - 1 reads the first
  tl.height_base = s.H - tl.y0 - Rows;
  tl.channels = s.group_channels();
  tl.sums = sums;
  return tl;
}

// Calls op<R, L>(i, lane, t) for unit q of tile t (row-major); units past the map's edge do nothing.
template <int R, int L, int Cols, typename Op, typename T>
HD inline void tile_unit(const Op& op, const T& t, int q, int lane) {
  const auto y = t.y0 + q / Cols, x = t.x0 + q % Cols;
  if (y < op.s.H && x < op.s.W)
    op.template operator()<R, L>(((t.b * op.s.H + y) * op.s.W + x) * op.s.G + t.g, lane, t);
}

// to[j] += scale * v[j] over a run of a tile's sums: shared-memory atomics on the GPU (a block's lanes share the
// tile), plain adds on the host.
template <int R, typename acc_t, typename T, typename Count>
HD inline void scatter_tile(acc_t* to, acc_t scale, const T* v, Count count) {
#ifdef __CUDA_ARCH__
  each<R, acc_t>(v, count, [&](int j, acc_t value) { atomicAdd(to + j, scale * value); });
#else
  scatter<R>(to, scale, v, count);
#endif
}

// The backward, in one pass over the nodes that gathers k and v once. With g the gradient of out, dp_k = g . node_k(v),
// t = sum_k p_k dp_k, dS_k = p_k (dp_k - t) (the logits' gradient) and M_k = scale node_k(k) + Rw row + Rh row:
//   grad q = sum_k dS_k M_k = sum_k p_k dp_k M_k - t sum_k p_k M_k    (two register sums, known before dS is)
//   grad k at neighbour n of node k += dS_k scale w_n q,   grad v there += p_k w_n g
//   grad dy_k = dS_k scale sum_n (dw_n / dy) (q . k_n) + p_k sum_n (dw_n / dy) (g . v_n)   (likewise dx)
//   grad Rw[k + W-1 - x] += dS_k q,   grad Rh[k + H-1 - y] += dS_k q
// grad q is written in qkv's dtype into its third of grad qkv, the walks' gradients in theirs; k's and v's and the
// tables' are summed in acc_t, in the unit's tile (above) and then the maps and tables (GPU: float atomics; host:
// each thread owns whole (image, head) strips and a table of its own for each of them).
template <typename scalar_t, typename index_t>
struct AttentionBackward : AttentionInputs<scalar_t, index_t> {
  using Base = AttentionInputs<scalar_t, index_t>;
  using typename Base::acc_t;
  using Base::K;
  Strided<const acc_t, 4, index_t> probs;          // (B, N, G, K)
  Map<const scalar_t, index_t> grad_out;            // (B, N, C)
  Map<scalar_t, index_t> grad_q;                    // written
  Map<acc_t, index_t> grad_k, grad_v;               // scattered into (zeroed first)
  Strided<acc_t, 3, index_t> grad_width, grad_height;  // (1, W + K - 1, D), (1, H + K - 1, D), zeroed (GPU);
                                                       // host: (B G, ..., D), a table a strip
  Strided<scalar_t, 4, index_t> grad_walks;           // (B, N, G, 2K)
  bool wide_flush;  // whether the k and v maps and the tables take 16-byte runs of float (GPU)

  template <int R, int L>
  HD void operator()(index_t i, int lane, const Tile<acc_t, index_t>& t) const { for_head<R, L>(*this, i, lane, t); }

  // The gradient of k (which = 0) or v (1) at channel c of pixel (y, x) += scale * from, over a run: into the tile's
  // sums, or beyond its halo into the map.
  template <int R, typename Count>
  HD void add(const Tile<acc_t, index_t>& t, int which, index_t y, index_t x, index_t c, acc_t scale,
              const scalar_t* from, Count count) const {
    const index_t slot = t.slot(which, y, x, c - t.g * t.channels);
    if (slot >= 0) return scatter_tile<R>(t.sums + slot, scale, from, count);
    scatter<R>((which ? grad_v : grad_k).at(t.b, y, x) + c, scale, from, count);
  }

  // Adds a tile's sums to the maps and tables: thread `thread` of `threads` takes runs of 4 channels (one 16-byte
  // atomic on Hopper, see scatter) where they allow, else single channels (GPU); the host's one thread takes a
  // pixel's head (a table row) at a time.
  HD void flush(const Tile<acc_t, index_t>& t, int thread, int threads) const {
#ifdef __CUDA_ARCH__
    if (wide_flush) return flush_runs<4>(t, thread, threads, std::integral_constant<int, 4>());
    flush_runs<1>(t, thread, threads, std::integral_constant<int, 1>());
#else
    if (t.channels > 0)  // heads of no channels have nothing to add, and a run of none would divide by zero
      flush_runs<kHostRun>(t, thread, threads, static_cast<int>(t.channels));
#endif
  }

  template <int R, typename Count>
  HD void flush_runs(const Tile<acc_t, index_t>& t, int thread, int threads, Count count) const {
    const index_t runs = t.channels / count, pixels = t.rows * t.cols;
    for (index_t i = thread; i < 2 * pixels * runs; i += threads) {
      const index_t slot = i / runs, d = i % runs * count;  // slot: which * pixels + ty * cols + tx
      const index_t y = t.y0 - kHalo + slot % pixels / t.cols, x = t.x0 - kHalo + slot % t.cols;
      if (y < 0 || y >= this->s.H || x < 0 || x >= this->s.W) continue;  // nothing lands off the map
      acc_t* sums = t.sums + slot * t.channels + d;
      scatter<R>((slot < pixels ? grad_k : grad_v).at(t.b, y, x) + t.g * t.channels + d, static_cast<acc_t>(1), sums,
                 count);
#ifndef __CUDA_ARCH__
      CHANNELS
      for (int j = 0; j < count; ++j) sums[j] = 0;  // the host's buffer serves the strip's next tile
#endif
    }
#ifdef __CUDA_ARCH__
    const index_t table = 0;
#else
    const index_t table = t.b * this->s.G + t.g;  // the strip's own
#endif
    const index_t width_rows = t.width_rows();
    for (index_t i = thread; i < t.table_rows() * runs; i += threads) {
      const index_t local = i / runs, d = i % runs * count;
      const bool height = local >= width_rows;
      const index_t row = height ? local - width_rows + t.height_base : local + t.width_base;
      if (row < 0) continue;  // before the table: a tile past the map's edge has no queries there
      acc_t* sums = t.sums + t.maps_size() + local * t.channels + d;
      scatter<R>(&(height ? grad_height : grad_width)(table, row, d), static_cast<acc_t>(1), sums, count);
#ifndef __CUDA_ARCH__
      CHANNELS
      for (int j = 0; j < count; ++j) sums[j] = 0;
#endif
    }
  }

  template <int R, int L, typename LaneRun>
  HD void head(const Unit<index_t>& u, index_t begin, const LaneRun& run, int lane,
               const Tile<acc_t, index_t>& tile) const {
    const auto& a = static_cast<const Base&>(*this);
    const index_t pixel = a.pixel(u);
    const scalar_t* q_at = a.q.at(u.b, u.y, u.x) + run.c;
    const scalar_t* g_at = grad_out.at(u.b, u.y, u.x) + run.c;
    acc_t q[R], g[R], pdm[R], pm[R];  // q, g, sum_k p_k dp_k M_k, sum_k p_k M_k
    acc_t p[K], dp[K], qk_dy[K], qk_dx[K], gv_dy[K], gv_dx[K];  // this lane's parts of the sums over n above
    if (run.active) {
      each<R, acc_t>(q_at, run.count, [&](int j, acc_t value) { q[j] = value; });
      each<R, acc_t>(g_at, run.count, [&](int j, acc_t value) { g[j] = value; });
      zero(pdm, run.count);
      zero(pm, run.count);
    }
    UNROLL
    for (int n = 0; n < K; ++n) {
      p[n] = probs(u.b, pixel, u.g, n);
      acc_t part = 0, m[R];
      qk_dy[n] = qk_dx[n] = gv_dy[n] = gv_dx[n] = 0;
      if (run.active) {
        const Node<acc_t, index_t> nd = a.walked(u, n);
        part = nd.finite ? 0 : static_cast<acc_t>(NAN);
        zero(m, run.count);
        UNROLL
        for (int nb = 0; nb < 4; ++nb) {
          if (!nd.inside[nb]) continue;
          const scalar_t* kn = a.k.at(u.b, nd.y[nb], nd.x[nb]) + run.c;
          const scalar_t* vn = a.v.at(u.b, nd.y[nb], nd.x[nb]) + run.c;
          const acc_t gv = inner<R, acc_t>(g, vn, run.count), qk = inner<R, acc_t>(q, kn, run.count);
          part += nd.w[nb] * gv;
          gv_dy[n] += nd.dw_dy[nb] * gv;
          gv_dx[n] += nd.dw_dx[nb] * gv;
          qk_dy[n] += nd.dw_dy[nb] * qk;
          qk_dx[n] += nd.dw_dx[nb] * qk;
          if (nd.w[nb] == 0) continue;
          const acc_t w = a.scale * nd.w[nb];
          each<R, acc_t>(kn, run.count, [&](int j, acc_t value) { m[j] += w * value; });
          add<R>(tile, 1, nd.y[nb], nd.x[nb], run.c, p[n] * nd.w[nb], g_at, run.count);
        }
        const acc_t* rw = a.width_row(u, n, run.c - begin);
        const acc_t* rh = a.height_row(u, n, run.c - begin);
        CHANNELS
        for (int j = 0; j < run.count; ++j) m[j] += rw[j] + rh[j];
      }
      dp[n] = lane_sum<L>(part);
      if (!run.active) continue;
      const acc_t pd = p[n] * dp[n];
      CHANNELS
      for (int j = 0; j < run.count; ++j) {
        pdm[j] += pd * m[j];
        pm[j] += p[n] * m[j];
      }
    }
    acc_t t = 0;
    UNROLL
    for (int n = 0; n < K; ++n) t += p[n] * dp[n];
    // Where the gradients of the table rows that slot 0 reads are summed (slot n's: n rows on).
    acc_t* const width_sums = tile.sums + tile.table_slot(false, a.s.W - 1 - u.x, run.c - begin);
    acc_t* const height_sums = tile.sums + tile.table_slot(true, a.s.H - 1 - u.y, run.c - begin);
    if (run.active) {
      acc_t gq[R];
      CHANNELS
      for (int j = 0; j < run.count; ++j) gq[j] = pdm[j] - t * pm[j];
      store(grad_q.at(u.b, u.y, u.x) + run.c, gq, run.count);
    }
    UNROLL
    for (int n = 0; n < K; ++n) {
      const acc_t ds = p[n] * (dp[n] - t);
      // dS and p are the same on every lane: the walk gradients' lane sums are taken once, after weighting. Idle lanes
      // add 0 (not 0 times a dS that may be infinite).
      const acc_t dy = lane_sum<L>(run.active ? ds * a.scale * qk_dy[n] + p[n] * gv_dy[n] : 0);
      const acc_t dx = lane_sum<L>(run.active ? ds * a.scale * qk_dx[n] + p[n] * gv_dx[n] : 0);
      if (lane == n % L) {
        grad_walks(u.b, pixel, u.g, 2 * n) = static_cast<scalar_t>(dy);
        grad_walks(u.b, pixel, u.g, 2 * n + 1) = static_cast<scalar_t>(dx);
      }
      if (!run.active || ds == 0) continue;
      scatter_tile<R>(width_sums + n * tile.channels, ds, q_at, run.count);  // the rows slot n reads += dS_n q
      scatter_tile<R>(height_sums + n * tile.channels, ds, q_at, run.count);
      const Node<acc_t, index_t> nd = a.walked(u, n);
      UNROLL
      for (int nb = 0; nb < 4; ++nb)
        if (nd.inside[nb] && nd.w[nb] != 0)
          add<R>(tile, 0, nd.y[nb], nd.x[nb], run.c, ds * a.scale * nd.w[nb], q_at, run.count);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Launch

// How a unit's channels are split over threads on the GPU: `lanes` threads, runs of `run` channels.
struct Split {
  int run, lanes;
};

#ifdef __CUDACC__
// L: the lanes of a unit as a compile-time constant, or 0 for the run-time 1 << lanes_log2.
template <int R, int L, typename Op>
__global__ void __launch_bounds__(kThreads) each_lane(Op op, int64_t units, int lanes_log2) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t i = t >> lanes_log2;
  if (i >= units) return;  // a unit's lanes are one aligned segment of a warp: they leave together
  const int lanes = L ? L : 1 << lanes_log2;
  op.template operator()<R, L>(static_cast<decltype(op.s.B)>(i), static_cast<int>(t & (lanes - 1)), lanes);
}

template <int R, int L, typename Op>
void launch(const Op& op, int64_t units, int lanes) {
  int lanes_log2 = 0;
  while ((1 << lanes_log2) < lanes) ++lanes_log2;
  const int64_t blocks = (units * lanes + kThreads - 1) / kThreads;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "sampler_cuda.cu: the problem is too large for one launch");
  each_lane<R, L><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(op, units,
                                                                                                     lanes_log2);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int N>
using Int = std::integral_constant<int, N>;

// Calls f(Int<R>(), Int<L>()) with the fused attention's run and lane count as compile-time constants: L is 8, 16 or
// 32 (vector runs: the fewest of those that hold a head, DGMN2's 64 channels taking 8 lanes in bf16, 16 in float32;
// single channels: a warp). Fewer choices than every power of two keep the build short; a narrower head leaves lanes
// idle.
template <int VectorRun, typename F>
void with_fixed_lanes(Split split, const F& f) {
  if (split.run != VectorRun) return f(Int<1>(), Int<kWarp>());
  if (split.lanes > 16) return f(Int<VectorRun>(), Int<kWarp>());
  if (split.lanes > 8) return f(Int<VectorRun>(), Int<16>());
  f(Int<VectorRun>(), Int<8>());
}

// The fused backward: a block a tile of kThreads / L query pixels, its sums in shared memory. Every thread zeroes,
// waits, runs its unit, waits and flushes: no thread leaves early, the barriers need them all.
template <int R, int L, typename Op>
__global__ void __launch_bounds__(kThreads) each_tile(Op op) {
  using acc_t = typename Op::acc_t;
  constexpr int rows = TileShape<kThreads / L>::rows, cols = TileShape<kThreads / L>::cols;
  extern __shared__ __align__(kVectorBytes) unsigned char shared[];
  using index_t = decltype(op.s.B);
  const auto t = tile_of<rows, cols>(op.s, static_cast<index_t>(blockIdx.x), reinterpret_cast<acc_t*>(shared));
  for (index_t j = threadIdx.x; j < t.size(); j += kThreads) t.sums[j] = 0;
  __syncthreads();
  tile_unit<R, L, cols>(op, t, threadIdx.x / L, threadIdx.x % L);
  __syncthreads();
  op.flush(t, threadIdx.x, kThreads);
}

template <int R, int L, typename Op>
void launch_tiles(const Op& op) {
  using Shape = TileShape<kThreads / L>;
  const int64_t blocks = op.s.B * op.s.G * tiles_per_image<Shape::rows, Shape::cols>(op.s);
  // 55 KB for a 64-channel head at 8 lanes (half types, float sums), 59 KB at 32 (double): over the 48 KB a block
  // gets unasked, so the kernel asks for it.
  const size_t bytes = Shape::sums(op.s.group_channels()) * sizeof(typename Op::acc_t);
  int most = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, c10::cuda::current_device()));
  TORCH_CHECK(bytes <= static_cast<size_t>(most), "sampler_cuda.cu: a tile of ", op.s.group_channels(),
              "-channel heads is too large");
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "sampler_cuda.cu: the problem is too large for one launch");
  C10_CUDA_CHECK(cudaFuncSetAttribute(each_tile<R, L, Op>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  each_tile<R, L><<<static_cast<unsigned>(blocks), kThreads, bytes, c10::cuda::getCurrentCUDAStream()>>>(op);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}
#endif

// Runs every lane of every unit. With `strips` (the backwards), host threads take whole strips of one image and one
// group each, so that no two threads scatter to the same place. FixedLanes: the fused attention's launch.
template <int VectorRun, bool FixedLanes = false, typename Op>
void run(const Op& op, Split split, bool strips) {
  const int64_t units = op.s.units();
  if (units == 0) return;
#ifdef __CUDACC__
  if constexpr (FixedLanes)
    with_fixed_lanes<VectorRun>(split, [&](auto r, auto l) { launch<r.value, l.value>(op, units, l); });
  else if (split.run == VectorRun) launch<VectorRun, 0>(op, units, split.lanes);
  else launch<1, 0>(op, units, split.lanes);
#else
  (void)split;
  constexpr int64_t kHostGrain = 64;  // units a host thread takes at least
  if (!strips) {
    at::parallel_for(0, units, kHostGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) op.template operator()<kHostRun, 1>(i, 0, 1);
    });
    return;
  }
  const int64_t B = op.s.B, G = op.s.G, pixels = op.s.H * op.s.W;
  at::parallel_for(0, B * G, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t strip = lo; strip < hi; ++strip) {
      const int64_t b = strip / G, g = strip % G;
      for (int64_t pixel = 0; pixel < pixels; ++pixel)
        op.template operator()<kHostRun, 1>((b * pixels + pixel) * G + g, 0, 1);
    }
  });
#endif
}

// Runs every tile of the fused backward (see Tile): on the GPU a block a tile; on the host, threads take whole strips
// of one image and one head, their tiles in turn, so that no two threads add to the same place (a buffer a thread,
// zeroed once: the flush zeroes what it adds; the tables' gradients a strip's own).
template <int VectorRun, typename Op>
void run_tiles(const Op& op, Split split) {
  if (op.s.units() == 0) return;
#ifdef __CUDACC__
  with_fixed_lanes<VectorRun>(split, [&](auto r, auto l) { launch_tiles<r.value, l.value>(op); });
#else
  (void)split;
  using acc_t = typename Op::acc_t;
  // Tiles of 16 x 16: the host has no contention to avoid, only the tiles' halos to add up (1.6 times a tile).
  using Shape = TileShape<256>;
  constexpr int rows = Shape::rows, cols = Shape::cols;
  const int64_t G = op.s.G, per_image = tiles_per_image<rows, cols>(op.s);
  at::parallel_for(0, op.s.B * G, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> sums(Shape::sums(op.s.group_channels()));
    for (int64_t strip = lo; strip < hi; ++strip) {
      const int64_t b = strip / G, g = strip % G;
      for (int64_t place = 0; place < per_image; ++place) {
        const auto t = tile_of<rows, cols>(op.s, (b * per_image + place) * G + g, sums.data());
        for (int q = 0; q < rows * cols; ++q) tile_unit<kHostRun, 1, cols>(op, t, q, 0);
        op.flush(t, 0, 1);
      }
    }
  });
#endif
}

// ------------------------------------------------------------------------------------------------
// Entry points: every tensor's device, dtype and shape checked with a one-line message (sampler.py checks first,
// with the user's names; these guard direct calls of torch.ops.dgmn_sampler_host.* and dgmn_sampler_cuda.*).

#ifdef __CUDACC__
constexpr bool kCuda = true;
#else
constexpr bool kCuda = false;
#endif

static void check_device(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK(kCuda ? t.is_cuda() : t.is_cpu(), "sampler_cuda.cu: ", name, " is on ", t.device(), ", this build takes ",
              kCuda ? "CUDA" : "CPU", " tensors");
  TORCH_CHECK(t.device() == x.device(), "sampler_cuda.cu: ", name, " is on ", t.device(), " but x is on ", x.device());
}

static void check_dims(const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  TORCH_CHECK(t.sizes() == sizes, "sampler_cuda.cu: ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// The geometry of x (B, C, H, W) walked by offsets (B, 2 K Go, H, W) in G groups.
static Geometry<int64_t> geometry(const at::Tensor& x, const at::Tensor& offsets, int64_t groups, int64_t walk_groups,
                                  int64_t dilation) {
  TORCH_CHECK(x.dim() == 4 && at::isFloatingType(x.scalar_type()),
              "sampler_cuda.cu: x must be a floating-point (B, C, H, W) tensor, got ", x.scalar_type(), " ", x.sizes());
  check_device("x", x, x);
  check_device("offsets", offsets, x);
  TORCH_CHECK(offsets.dim() == 4 && at::isFloatingType(offsets.scalar_type()),
              "sampler_cuda.cu: offsets must be a floating-point (B, 2K Go, H, W) tensor, got ", offsets.scalar_type(),
              " ", offsets.sizes());
  TORCH_CHECK(walk_groups > 0 && groups > 0 && groups % walk_groups == 0 && x.size(1) % groups == 0,
              "sampler_cuda.cu: walk groups (", walk_groups, ") must divide groups (", groups,
              "), which must divide the channels (", x.size(1), ")");
  const int64_t per_walk = offsets.size(1) / (2 * walk_groups);
  const int64_t ks = static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(per_walk))));
  TORCH_CHECK(offsets.size(1) == 2 * ks * ks * walk_groups && ks % 2 == 1,
              "sampler_cuda.cu: offsets must have 2 K Go channels with K = ks * ks, ks odd, Go = ", walk_groups,
              ", got ", offsets.size(1));
  check_dims("offsets", offsets, {x.size(0), offsets.size(1), x.size(2), x.size(3)});
  TORCH_CHECK(dilation > 0, "sampler_cuda.cu: dilation must be positive, got ", dilation);
  return Geometry<int64_t>{x.size(0), x.size(1), x.size(2), x.size(3), groups, walk_groups, ks, dilation};
}

static void check_like_x(const char* name, const at::Tensor& t, const at::Tensor& x) {
  check_device(name, t, x);
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "sampler_cuda.cu: ", name, " must be ", x.scalar_type(),
              " like x, got ", t.scalar_type());
  check_dims(name, t, x.sizes());
}

static void check_per_query(const char* name, const at::Tensor& t, const at::Tensor& x, const Geometry<int64_t>& s) {
  check_device(name, t, x);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "sampler_cuda.cu: ", name, " must be floating point, got ",
              t.scalar_type());
  check_dims(name, t, {s.B, s.G, s.K(), s.H, s.W});
}

static at::ScalarType acc_type(const at::Tensor& x) { return at::toOpMathType(x.scalar_type()); }

// Feature maps are read with contiguous channels; any other layout is copied once to channels-last.
static at::Tensor channels_contiguous(const at::Tensor& t) {
  return t.size(1) == 1 || t.stride(1) == 1 ? t : t.contiguous(at::MemoryFormat::ChannelsLast);
}

static at::Tensor empty_channels_last(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return at::empty(sizes, options.memory_format(at::MemoryFormat::ChannelsLast));
}

// A per-query tensor (B, G, K, H, W) laid out (B, H, W, G, K) in memory: a unit's K values are contiguous.
static at::Tensor empty_per_query(const Geometry<int64_t>& s, int64_t per_unit, const at::TensorOptions& options) {
  return at::empty({s.B, s.H, s.W, s.G, per_unit}, options).permute({0, 3, 4, 1, 2});
}

// Whether every map can be read in runs of `vector` elements (16 bytes): the group's channels divide into runs, and
// every pointer and every stride but the contiguous channels' is a multiple of a run.
static bool vector_aligned(int vector, int64_t group_channels, std::initializer_list<at::Tensor> maps) {
  bool aligned = group_channels % vector == 0;
  for (const at::Tensor& t : maps) {
    aligned = aligned && reinterpret_cast<std::uintptr_t>(t.data_ptr()) % kVectorBytes == 0;
    for (int64_t d = 0; d < t.dim(); ++d)
      aligned = aligned && (t.size(d) == 1 || t.stride(d) == 1 || t.stride(d) % vector == 0);
  }
  return aligned;
}

// The lanes for a group of channels in runs of `run`: the fewest (a power of two) that cover it, up to a warp.
static int lanes_for(int run, int64_t group_channels) {
  int lanes = 1;
  while (lanes < kWarp && lanes * run < group_channels) lanes *= 2;
  return lanes;
}

// The GPU's split of a unit's channels: runs of 16 bytes where every map's pointer and pixel strides allow it and
// the group's channels divide into runs, else single channels; lanes for the runs, up to a warp. A problem too
// small to fill the GPU with vector lanes takes single channels and more lanes.
template <typename scalar_t>
static Split split(const Geometry<int64_t>& s, std::initializer_list<at::Tensor> maps) {
  if (!kCuda) return {kHostRun, 1};
  constexpr int vector = kVectorBytes / sizeof(scalar_t);
  int run = vector_aligned(vector, s.group_channels(), maps) ? vector : 1;
#ifdef __CUDACC__
  int processors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&processors, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  if (run > 1 && s.units() * lanes_for(run, s.group_channels()) < processors * kResidentThreads) run = 1;
#endif
  return {run, lanes_for(run, s.group_channels())};
}

// Whether every element offset of these tensors, every thread index and every grid position fits in 32 bits.
static bool fits_int32(const Geometry<int64_t>& s, std::initializer_list<at::Tensor> tensors) {
  int64_t largest = std::max(s.units() * kWarp, s.ks / 2 * s.dilation + std::max(s.H, s.W));
  for (const at::Tensor& t : tensors) {
    if (!t.defined()) continue;
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * std::abs(t.stride(d));
    largest = std::max(largest, last + 1);
  }
  return largest < std::numeric_limits<int32_t>::max();
}

// Calls f(index_t()) with 32-bit indices on the GPU where everything fits, 64-bit ones otherwise and on the host.
template <typename F>
static void with_index_type(bool fits, const F& f) {
#ifdef __CUDACC__
  if (fits) return f(int32_t());
#endif
  (void)fits;
  f(int64_t());
}

template <typename index_t>
static Geometry<index_t> narrow(const Geometry<int64_t>& s) {
  return Geometry<index_t>{static_cast<index_t>(s.B),  static_cast<index_t>(s.C),  static_cast<index_t>(s.H),
                           static_cast<index_t>(s.W),  static_cast<index_t>(s.G),  static_cast<index_t>(s.Go),
                           static_cast<index_t>(s.ks), static_cast<index_t>(s.dilation)};
}

// Runs kernel Op<scalar_t, index_t> on the dtype of x, built by make(Op<...>{}) from the tensors.
#define DGMN_DISPATCH(x, fits, VECTOR_RUN, ...)                                                          \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (x).scalar_type(), "dgmn_sampler", [&] {    \
    with_index_type(fits, [&](auto index) {                                                              \
      using index_t = decltype(index);                                                                   \
      using acc_t = at::opmath_type<scalar_t>;                                                           \
      constexpr int VECTOR_RUN = kVectorBytes / sizeof(scalar_t);                                        \
      __VA_ARGS__                                                                                        \
    });                                                                                                  \
  })

template <typename T, typename index_t>
using In = Map<const T, index_t>;

// (B, C, H, W), (B, 2K Go, H, W), (B, G, K, H, W) -> (B, C, H, W) channels-last
at::Tensor aggregate(const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& weights_in,
                     int64_t walk_groups, int64_t dilation) {
  const Geometry<int64_t> s =
      geometry(x_in, offsets_in, weights_in.dim() == 5 ? weights_in.size(1) : 0, walk_groups, dilation);
  check_per_query("weights", weights_in, x_in, s);
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = channels_contiguous(x_in);
  const at::Tensor offsets = offsets_in.to(acc_type(x)), weights = weights_in.to(acc_type(x));
  at::Tensor out = empty_channels_last(x.sizes(), x.options());
  DGMN_DISPATCH(x, fits_int32(s, {x, offsets, weights, out}), vector, {
    const Aggregate<scalar_t, index_t> kernel{narrow<index_t>(s), In<scalar_t, index_t>(x),
                                              Strided<const acc_t, 4, index_t>(offsets),
                                              Strided<const acc_t, 5, index_t>(weights), Map<scalar_t, index_t>(out)};
    run<vector>(kernel, split<scalar_t>(s, {x, out}), false);
  });
  return out;
}

// (B, C, H, W), (B, C, H, W), (B, 2K Go, H, W) -> (B, G, K, H, W), laid out (B, H, W, G, K)
at::Tensor dot(const at::Tensor& q_in, const at::Tensor& x_in, const at::Tensor& offsets_in, int64_t groups,
               int64_t walk_groups, int64_t dilation) {
  const Geometry<int64_t> s = geometry(x_in, offsets_in, groups, walk_groups, dilation);
  check_like_x("q", q_in, x_in);
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = channels_contiguous(x_in), q = channels_contiguous(q_in);
  const at::Tensor offsets = offsets_in.to(acc_type(x));
  at::Tensor logits = empty_per_query(s, s.K(), x.options());
  DGMN_DISPATCH(x, fits_int32(s, {q, x, offsets, logits}), vector, {
    const Dot<scalar_t, index_t> kernel{narrow<index_t>(s), In<scalar_t, index_t>(q), In<scalar_t, index_t>(x),
                                        Strided<const acc_t, 4, index_t>(offsets),
                                        Strided<scalar_t, 5, index_t>(logits)};
    run<vector>(kernel, split<scalar_t>(s, {q, x}), false);
  });
  return logits;
}

// The backward above: grad_x (B, C, H, W) channels-last, grad_offsets (B, 2K Go, H, W) channels-last and grad_u
// (B, G, K, H, W) laid out (B, H, W, G, K), each in its input's dtype; those not asked for are empty.
std::vector<at::Tensor> backward(const at::Tensor& x_in, const at::Tensor& offsets_in, const at::Tensor& u_in,
                                 const at::Tensor& v_in, int64_t walk_groups, int64_t dilation, bool need_x,
                                 bool need_offsets, bool need_u) {
  const Geometry<int64_t> s = geometry(x_in, offsets_in, u_in.dim() == 5 ? u_in.size(1) : 0, walk_groups, dilation);
  check_per_query("u", u_in, x_in, s);
  check_like_x("v", v_in, x_in);
  if (kCuda && need_x)  // float atomics add in an order that varies from run to run
    at::globalContext().alertNotDeterministic("dgmn_sampler::backward (the sampler's kernel path on CUDA)");
  const at::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = channels_contiguous(x_in), v = channels_contiguous(v_in);
  const auto acc = x.options().dtype(acc_type(x));
  const at::Tensor offsets = offsets_in.to(acc_type(x)), u = u_in.to(acc_type(x));
  const at::Tensor grad_x = need_x ? empty_channels_last(x.sizes(), acc).zero_() : at::Tensor();
  const at::Tensor grad_walks = need_offsets ? empty_per_query(s, 2 * s.K(), acc) : at::Tensor();  // per group
  const at::Tensor grad_u = need_u ? empty_per_query(s, s.K(), acc) : at::Tensor();
  if (need_x || need_offsets || need_u) {
    DGMN_DISPATCH(x, fits_int32(s, {x, v, offsets, u, grad_x, grad_walks, grad_u}), vector, {
      const Backward<scalar_t, index_t> kernel{
          narrow<index_t>(s),           In<scalar_t, index_t>(x),         In<scalar_t, index_t>(v),
          Strided<const acc_t, 4, index_t>(offsets), Strided<const acc_t, 5, index_t>(u), Map<acc_t, index_t>(grad_x),
          Strided<acc_t, 5, index_t>(grad_walks),    Strided<acc_t, 5, index_t>(grad_u)};
      run<vector>(kernel, split<scalar_t>(s, {x, v}), true);
    });
  }
  const auto empty = [](const at::Tensor& like) { return at::empty({0}, like.options()); };
  at::Tensor grad_offsets = empty(offsets_in);
  if (need_offsets) {
    // (B, G, 2K, H, W) laid out (B, H, W, G, 2K) -> summed over the G / Go groups of each walk -> (B, 2K Go, H, W)
    at::Tensor walks = grad_walks.permute({0, 3, 4, 1, 2});  // (B, H, W, G, 2K), contiguous
    if (s.G != s.Go) walks = walks.reshape({s.B, s.H, s.W, s.Go, s.G / s.Go, 2 * s.K()}).sum(4);
    grad_offsets = walks.reshape({s.B, s.H, s.W, 2 * s.K() * s.Go}).permute({0, 3, 1, 2}).to(offsets_in.scalar_type());
  }
  return {need_x ? grad_x.to(x_in.scalar_type()) : empty(x_in), grad_offsets,
          need_u ? grad_u.to(u_in.scalar_type()) : empty(u_in)};
}

// The fused attention's inputs, checked: qkv (B, N, 3C) with N = H W, walks (B, N, G, 2K) of qkv's dtype with
// K = kAttentionNodes, tables (W + K - 1, D) and (H + K - 1, D) in qkv's opmath type. Returns the geometry.
static Geometry<int64_t> attention_geometry(const at::Tensor& qkv, const at::Tensor& walks, const at::Tensor& width,
                                            const at::Tensor& height, int64_t rows, int64_t heads) {
  TORCH_CHECK(qkv.dim() == 3 && at::isFloatingType(qkv.scalar_type()) && qkv.size(2) % 3 == 0,
              "sampler_cuda.cu: qkv must be a floating-point (B, N, 3C) tensor, got ", qkv.scalar_type(), " ",
              qkv.sizes());
  const int64_t B = qkv.size(0), N = qkv.size(1), C = qkv.size(2) / 3, K = kAttentionNodes;
  TORCH_CHECK(rows > 0 && N % rows == 0, "sampler_cuda.cu: ", rows, " rows do not divide the ", N, " tokens");
  TORCH_CHECK(heads > 0 && C % heads == 0, "sampler_cuda.cu: ", heads, " heads do not divide C = ", C);
  const int64_t H = rows, W = N / rows, D = C / heads;
  TORCH_CHECK(D <= kHostRun, "sampler_cuda.cu: the fused attention takes heads of at most ", kHostRun,
              " channels, got ", D);
  check_device("qkv", qkv, qkv);
  check_device("walks", walks, qkv);
  check_device("width", width, qkv);
  check_device("height", height, qkv);
  check_dims("walks", walks, {B, N, heads, 2 * K});
  TORCH_CHECK(walks.scalar_type() == qkv.scalar_type(), "sampler_cuda.cu: walks must be ", qkv.scalar_type(),
              " like qkv, got ", walks.scalar_type());
  check_dims("width", width, {W + K - 1, D});
  check_dims("height", height, {H + K - 1, D});
  for (const at::Tensor& t : {width, height})
    TORCH_CHECK(t.scalar_type() == acc_type(qkv) && t.stride(1) == 1, "sampler_cuda.cu: the tables must be ",
                acc_type(qkv), " with contiguous rows, got ", t.scalar_type(), " with strides ", t.strides());
  return Geometry<int64_t>{B, C, H, W, heads, heads, kAttentionSide, 1};
}

// A (B, N, C') token tensor's channels [first, first + C) as a map (B, C, H, W).
static at::Tensor as_map(const at::Tensor& tokens, int64_t first, const Geometry<int64_t>& s) {
  return tokens.unflatten(1, {s.H, s.W}).permute({0, 3, 1, 2}).narrow(1, first, s.C);
}

// The GPU's split of a head for the fused attention: 16-byte runs where the maps allow, one run a lane.
template <typename scalar_t>
static Split attention_split(const Geometry<int64_t>& s, std::initializer_list<at::Tensor> maps) {
  if (!kCuda) return {kHostRun, 1};
  constexpr int vector = kVectorBytes / sizeof(scalar_t);
  const bool aligned = vector_aligned(vector, s.group_channels(), maps);
  const int run = aligned ? vector : 1, lanes = lanes_for(run, s.group_channels());
  TORCH_CHECK(lanes * run >= s.group_channels(), "sampler_cuda.cu: the fused attention holds a head in one warp: ",
              s.group_channels(), " channels a head are too many", aligned ? "" : " for unaligned qkv");
  return {run, aligned ? lanes : kWarp};
}

// Channels contiguous (any token and image strides), else a copy. On the GPU also a view of heads wider than a warp
// of single channels that 16-byte runs cannot read (its pointer or a stride off their grid): the copy's can.
static at::Tensor tokens_contiguous(const at::Tensor& t, int64_t head) {
  const int vector = static_cast<int>(kVectorBytes / t.element_size());
  const bool unreadable = kCuda && head > kWarp && !vector_aligned(vector, head, {t});
  return t.stride(2) == 1 && !unreadable ? t : t.contiguous();
}

// What both fused kernels read, from the checked tensors.
template <typename scalar_t, typename index_t>
static AttentionInputs<scalar_t, index_t> attention_inputs(const Geometry<int64_t>& s, const at::Tensor& qkv,
                                                           const at::Tensor& walks, const at::Tensor& width,
                                                           const at::Tensor& height, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  return {narrow<index_t>(s),
          In<scalar_t, index_t>(as_map(qkv, 0, s)),
          In<scalar_t, index_t>(as_map(qkv, s.C, s)),
          In<scalar_t, index_t>(as_map(qkv, 2 * s.C, s)),
          Strided<const scalar_t, 4, index_t>(walks),
          Strided<const acc_t, 2, index_t>(width),
          Strided<const acc_t, 2, index_t>(height),
          static_cast<acc_t>(scale)};
}

// qkv (B, N, 3C), walks (B, N, G, 2K), width (W + K - 1, D), height (H + K - 1, D) -> out (B, N, C) in qkv's dtype,
// p (B, N, G, K) in its opmath type.
std::vector<at::Tensor> attention(const at::Tensor& qkv_in, const at::Tensor& walks_in, const at::Tensor& width,
                                  const at::Tensor& height, int64_t rows, int64_t heads, double scale) {
  const Geometry<int64_t> s = attention_geometry(qkv_in, walks_in, width, height, rows, heads);
  const at::OptionalDeviceGuard guard(qkv_in.device());
  const at::Tensor qkv = tokens_contiguous(qkv_in, s.group_channels());
  at::Tensor out = at::empty({s.B, s.H * s.W, s.C}, qkv.options());
  at::Tensor probs = at::empty({s.B, s.H * s.W, s.G, kAttentionNodes}, qkv.options().dtype(acc_type(qkv)));
  DGMN_DISPATCH(qkv, fits_int32(s, {qkv, walks_in, width, height, out, probs}), vector, {
    const Attention<scalar_t, index_t> kernel{
        attention_inputs<scalar_t, index_t>(s, qkv, walks_in, width, height, scale),
        Map<scalar_t, index_t>(as_map(out, 0, s)), Strided<acc_t, 4, index_t>(probs)};
    run<vector, true>(kernel, attention_split<scalar_t>(s, {qkv, out}), false);
  });
  return {out, probs};
}

// The gradients of attention(): qkv's (B, N, 3C) in its dtype, the walks' (B, N, G, 2K) in theirs and the tables'
// in theirs (the opmath type), width's (W + K - 1, D) rows then height's (H + K - 1, D) in one tensor, from
// p (B, N, G, K) and the gradient of out (B, N, C).
std::vector<at::Tensor> attention_backward(const at::Tensor& qkv_in, const at::Tensor& walks_in,
                                           const at::Tensor& width, const at::Tensor& height,
                                           const at::Tensor& probs, const at::Tensor& grad_in, int64_t rows,
                                           int64_t heads, double scale) {
  const Geometry<int64_t> s = attention_geometry(qkv_in, walks_in, width, height, rows, heads);
  check_device("probs", probs, qkv_in);
  check_device("grad", grad_in, qkv_in);
  check_dims("probs", probs, {s.B, s.H * s.W, s.G, kAttentionNodes});
  check_dims("grad", grad_in, {s.B, s.H * s.W, s.C});
  TORCH_CHECK(probs.scalar_type() == acc_type(qkv_in) && grad_in.scalar_type() == qkv_in.scalar_type(),
              "sampler_cuda.cu: probs must be ", acc_type(qkv_in), " and grad ", qkv_in.scalar_type(), ", got ",
              probs.scalar_type(), " and ", grad_in.scalar_type());
  if (kCuda)  // float atomics add in an order that varies from run to run
    at::globalContext().alertNotDeterministic("dgmn_sampler::attention_backward (the fused attention on CUDA)");
  const at::OptionalDeviceGuard guard(qkv_in.device());
  const at::Tensor qkv = tokens_contiguous(qkv_in, s.group_channels());
  const at::Tensor grad = tokens_contiguous(grad_in, s.group_channels());
  const auto acc = qkv.options().dtype(acc_type(qkv));
  at::Tensor grad_qkv = at::empty({s.B, s.H * s.W, 3 * s.C}, qkv.options());
  // k's and v's gradients are scattered in acc_t: into grad qkv itself where that is its dtype, else into one buffer
  // cast into it once.
  const bool in_place = qkv.scalar_type() == acc_type(qkv);
  const at::Tensor kv =
      (in_place ? grad_qkv.narrow(2, s.C, 2 * s.C) : at::empty({s.B, s.H * s.W, 2 * s.C}, acc)).zero_();
  at::Tensor grad_walks = at::empty({s.B, s.H * s.W, s.G, 2 * kAttentionNodes}, walks_in.options());
  // All the GPU's blocks add to one pair of tables; each of the host's strips to a pair of its own, summed below in a
  // fixed order. Each pair is the width rows then the height rows of one tensor, zeroed by one fill.
  const int64_t tables = kCuda ? 1 : s.B * s.G, width_rows = width.size(0);
  const at::Tensor sums = at::empty({tables, width_rows + height.size(0), width.size(1)}, acc).zero_();
  const at::Tensor grad_width = sums.narrow(1, 0, width_rows), grad_height = sums.narrow(1, width_rows, height.size(0));
  DGMN_DISPATCH(qkv, fits_int32(s, {qkv, walks_in, width, height, probs, grad, grad_qkv, kv, grad_walks, grad_width,
                                    grad_height}), vector, {
    const AttentionBackward<scalar_t, index_t> kernel{
        attention_inputs<scalar_t, index_t>(s, qkv, walks_in, width, height, scale),
        Strided<const acc_t, 4, index_t>(probs),     In<scalar_t, index_t>(as_map(grad, 0, s)),
        Map<scalar_t, index_t>(as_map(grad_qkv, 0, s)), Map<acc_t, index_t>(as_map(kv, 0, s)),
        Map<acc_t, index_t>(as_map(kv, s.C, s)),     Strided<acc_t, 3, index_t>(grad_width),
        Strided<acc_t, 3, index_t>(grad_height),     Strided<scalar_t, 4, index_t>(grad_walks),
        std::is_same_v<acc_t, float> && vector_aligned(4, s.group_channels(), {kv, grad_width, grad_height})};
    run_tiles<vector>(kernel, attention_split<scalar_t>(s, {qkv, grad, grad_qkv, kv}));
  });
  if (!in_place) grad_qkv.narrow(2, s.C, 2 * s.C).copy_(kv);
  return {grad_qkv, grad_walks, tables == 1 ? sums.select(0, 0) : sums.sum(0)};
}

// The ops of this build: torch.ops.<extension name>.{aggregate, dot, backward, attention, attention_backward},
// called by sampler.py's custom ops.
TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  m.def("aggregate(Tensor x, Tensor offsets, Tensor weights, int walk_groups, int dilation) -> Tensor", &aggregate);
  m.def("dot(Tensor q, Tensor x, Tensor offsets, int groups, int walk_groups, int dilation) -> Tensor", &dot);
  m.def("backward(Tensor x, Tensor offsets, Tensor u, Tensor v, int walk_groups, int dilation, bool need_x, "
        "bool need_offsets, bool need_u) -> Tensor[]", &backward);
  m.def("attention(Tensor qkv, Tensor walks, Tensor width, Tensor height, int rows, int heads, float scale) -> "
        "Tensor[]", &attention);
  m.def("attention_backward(Tensor qkv, Tensor walks, Tensor width, Tensor height, Tensor probs, Tensor grad, "
        "int rows, int heads, float scale) -> Tensor[]", &attention_backward);
}
