"""Dynamic node sampling: Eq. 4-5 of the paper (Sections 3.3-3.5) and the sampling inside Eq. 8-9 (Section 4.1).

Every query pixel (y, x) reads K = ks * ks nodes: a ks x ks grid spaced `dilation` apart (one uniform sampling
rate of Eq. 3), each node moved by a predicted walk (Eq. 4) and read with the bilinear sampler rho (Eq. 5).

    sample(x, offsets)              the sampled nodes themselves: the readable definition of rho
    aggregate(x, offsets, weights)  sum over nodes of weight * node per channel group: Eq. 5's message, Eq. 9's attn . v
    dot(q, x, offsets, groups)      q . node per channel group: Eq. 9's q . k
    WalkPredictor                   Eq. 4: walks predicted from the uniformly sampled neighbourhood

Symbols, used throughout: B batch, C channels, H x W the map, G channel groups (C / G channels each), K nodes
per query. Offsets are (B, 2K, H, W) in torchvision.ops.deform_conv2d's layout: channel 2k is dy and 2k + 1 is dx
of node k = ks * i + j, which sits at (y + (i - ks // 2) * dilation + dy, x + (j - ks // 2) * dilation + dx).
A point is read bilinearly from its four neighbours; neighbours outside the map read zero (the DCN v1
semantics of the authors' release, equal to F.grid_sample(padding_mode="zeros", align_corners=False)).
Half inputs are computed in float32 (coordinates, bilinear weights, sums) and returned in their own dtype.

Two paths compute the same functions:
  - the torch reference below, a few lines each: the specification, used on CPU;
  - sampler_cuda.cu, built on first use and used for CUDA tensors: aggregate and dot are fused, never writing the
    (B, C, K, H, W) nodes. The same source compiled as C++ runs on CPU under `with backend("kernel")`, which
    is how the tests check the kernel's arithmetic without a GPU.
`python sampler.py` benchmarks the two paths at DGMN2-Tiny's and DGMN's shapes.
"""

import contextlib
import functools
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import register_flop_formula

# ----------------------------------------------------------------------------------------------------------------
# Checks: one ValueError that names the argument and the shape it should have


def _kernel_size(offsets):
    """ks of the ks x ks grid that (B, 2K, H, W) offsets walk, K = ks * ks with ks odd; None if there is none."""
    ks = math.isqrt(offsets.shape[1] // 2) if offsets.dim() == 4 else 0
    return ks if ks % 2 == 1 and offsets.shape[1] == 2 * ks * ks else None


def _check(x, offsets, dilation, weights=None, q=None, groups=None):
    """Validate the inputs of sample/aggregate/dot."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    ks = _kernel_size(offsets)
    if offsets.dim() != 4 or (offsets.shape[0], *offsets.shape[2:]) != (B, H, W) or ks is None:
        raise ValueError(f"offsets must have shape (B, 2K, H, W) = ({B}, 2K, {H}, {W}) with K = ks * ks for an odd "
                         f"ks (2K = 18 for 3x3), got {tuple(offsets.shape)}")
    if not offsets.is_floating_point():
        raise ValueError(f"offsets must be floating point, got {offsets.dtype}")
    if not (isinstance(dilation, int) and dilation > 0):
        raise ValueError(f"dilation must be a positive int, got {dilation!r}")
    for name, t in {"offsets": offsets, "weights": weights, "q": q}.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all inputs must be on one device")
    if weights is not None:
        G, K = weights.shape[1] if weights.dim() == 5 else 0, ks * ks
        if weights.dim() != 5 or G == 0 or C % G or tuple(weights.shape) != (B, G, K, H, W):
            raise ValueError(f"weights must have shape (B, G, K, H, W) = ({B}, G, {K}, {H}, {W}) with G dividing "
                             f"C = {C}, got {tuple(weights.shape)}")
        if not weights.is_floating_point():
            raise ValueError(f"weights must be floating point, got {weights.dtype}")
    if q is not None:
        if q.shape != x.shape or q.dtype != x.dtype:
            raise ValueError(f"q must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"got {tuple(q.shape)} {q.dtype}")
        if not (isinstance(groups, int) and groups > 0 and C % groups == 0):
            raise ValueError(f"groups must be a positive int dividing C = {C}, got {groups!r}")


# ----------------------------------------------------------------------------------------------------------------
# The torch reference path: the specification


def _node_positions(offsets, dilation):
    """Rows and columns of every node: (B, 2K, H, W) walks -> two (B, K, H, W) maps.

    The ks x ks grid around each pixel (Eq. 3's uniform sampling at rate `dilation`) moved by the walks (Eq. 4)."""
    _, _, H, W = offsets.shape
    ks = _kernel_size(offsets)
    step = (torch.arange(ks, device=offsets.device) - ks // 2) * dilation  # (ks,) grid steps around the query
    i, j = torch.meshgrid(step, step, indexing="ij")                      # (ks, ks) row, column step of node ks*i+j
    dy, dx = rearrange(offsets, "b (k yx) h w -> yx b k h w", yx=2)       # each (B, K, H, W)
    rows = torch.arange(H, device=offsets.device)[:, None] + rearrange(i, "i j -> (i j) 1 1") + dy
    cols = torch.arange(W, device=offsets.device)[None, :] + rearrange(j, "i j -> (i j) 1 1") + dx
    return rows, cols


def _sample(x, offsets, dilation):
    """rho of Eq. 5 at every node: (B, C, H, W), (B, 2K, H, W) -> (B, C, K, H, W), in x's dtype."""
    B, C, H, W = x.shape
    rows, cols = _node_positions(offsets, dilation)                          # each (B, K, H, W)
    # A ring of zeros around the map: a neighbour outside it reads 0 once its index is clamped onto the ring.
    padded = rearrange(F.pad(x, (1, 1, 1, 1)), "b c h w -> b c (h w)")      # (B, C, (H + 2) (W + 2))
    top, left = rows.floor(), cols.floor()
    nodes = 0
    for r, wr in ((top, 1 - (rows - top)), (top + 1, rows - top)):          # upper and lower neighbour rows
        for c, wc in ((left, 1 - (cols - left)), (left + 1, cols - left)):  # left and right neighbour columns
            index = (r.clamp(-1, H).long() + 1) * (W + 2) + c.clamp(-1, W).long() + 1            # (B, K, H, W)
            index = rearrange(index, "b k h w -> b 1 (k h w)").expand(-1, C, -1)                # (B, C, K H W)
            read = rearrange(padded.gather(2, index), "b c (k h w) -> b c k h w", h=H, w=W)   # (B, C, K, H, W)
            nodes = nodes + read * (wr * wc)[:, None]
    return nodes


def _aggregate_reference(x, offsets, weights, dilation):
    """(B, C, H, W), (B, 2K, H, W), (B, G, K, H, W) -> (B, C, H, W)"""
    G = weights.shape[1]
    nodes = rearrange(_sample(x, offsets, dilation), "b (g c) k h w -> b g c k h w", g=G)
    out = torch.einsum("bgckhw,bgkhw->bgchw", nodes, weights)
    return rearrange(out, "b g c h w -> b (g c) h w")


def _dot_reference(q, x, offsets, groups, dilation):
    """(B, C, H, W), (B, C, H, W), (B, 2K, H, W) -> (B, G, K, H, W)"""
    nodes = rearrange(_sample(x, offsets, dilation), "b (g c) k h w -> b g c k h w", g=groups)
    return torch.einsum("bgchw,bgckhw->bgkhw", rearrange(q, "b (g c) h w -> b g c h w", g=groups), nodes)


def _in_float(fn, *args, dtype):
    """Run a reference function in float32 (float64 stays) with autocast off; return its result in `dtype`."""
    compute = torch.promote_types(dtype, torch.float32)
    device = next(a for a in args if isinstance(a, torch.Tensor)).device
    no_autocast = torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) \
        else contextlib.nullcontext()  # the meta device has no autocast
    with no_autocast:
        out = fn(*(a.to(compute) if isinstance(a, torch.Tensor) else a for a in args))
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The kernel path: sampler_cuda.cu, built on first use, registered as torch.library custom ops

_SOURCE = Path(__file__).with_name("sampler_cuda.cu")


@functools.cache
def _extension(device_type):
    """The compiled kernels for 'cuda' (nvcc) or 'cpu' (the same source compiled as C++ by the host compiler)."""
    from torch.utils import cpp_extension
    if device_type == "cuda":
        return cpp_extension.load(name="dgmn_sampler_cuda", sources=[str(_SOURCE)], extra_cflags=["-O3"],
                                  extra_cuda_cflags=["-O3"])
    if device_type == "cpu":
        # load_inline hashes the text it is given, so an edited sampler_cuda.cu is rebuilt. ATen's parallel_for is
        # inlined from its OpenMP header: without -fopenmp it would run on one thread.
        return cpp_extension.load_inline(name="dgmn_sampler_host", cpp_sources=[_SOURCE.read_text()],
                                         extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    raise ValueError(f"the sampler's kernels run on CUDA or CPU tensors, got {device_type}")


@functools.cache
def _cuda_kernel_builds():
    try:
        _extension("cuda")
        return True
    except Exception as error:  # a failed build is a slower run, not a failed one
        warnings.warn(f"sampler.py: could not build {_SOURCE.name} ({type(error).__name__}: {error}); "
                      "using the torch reference path")
        return False


@torch.library.custom_op("dgmn_sampler::aggregate", mutates_args=())
def _aggregate_kernel(x: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, dilation: int) -> torch.Tensor:
    return _extension(x.device.type).aggregate(x, offsets, weights, dilation)


@torch.library.custom_op("dgmn_sampler::dot", mutates_args=())
def _dot_kernel(q: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, groups: int, dilation: int) -> torch.Tensor:
    return _extension(x.device.type).dot(q, x, offsets, groups, dilation)


@torch.library.custom_op("dgmn_sampler::backward", mutates_args=())
def _backward_kernel(x: torch.Tensor, offsets: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dilation: int,
                     need_u: bool, need_v: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of L = sum_k sum_{c in g} u[k] v[c] node_k[c] (both ops are this form): x, offsets, u, v."""
    return tuple(_extension(x.device.type).backward(x, offsets, u, v, dilation, need_u, need_v))


# The fakes give torch.compile the kernels' exact output layouts: feature maps channels-last, the rest contiguous.
@_aggregate_kernel.register_fake
def _(x, offsets, weights, dilation):
    return torch.empty_like(x, memory_format=torch.channels_last)


@_dot_kernel.register_fake
def _(q, x, offsets, groups, dilation):
    B, _, H, W = x.shape
    return x.new_empty(B, groups, offsets.shape[1] // 2, H, W)


@_backward_kernel.register_fake
def _(x, offsets, u, v, dilation, need_u, need_v):
    grad_u = torch.empty_like(u, memory_format=torch.contiguous_format) if need_u else u.new_empty(0, 0, 0, 0, 0)
    grad_v = torch.empty_like(v, memory_format=torch.channels_last) if need_v else v.new_empty(0, 0, 0, 0)
    return (torch.empty_like(x, memory_format=torch.channels_last),
            torch.empty_like(offsets, memory_format=torch.contiguous_format), grad_u, grad_v)


def _aggregate_setup(ctx, inputs, output):
    x, offsets, weights, ctx.dilation = inputs
    ctx.save_for_backward(x, offsets, weights)


def _aggregate_backward(ctx, grad):
    x, offsets, weights = ctx.saved_tensors
    need_weights = ctx.needs_input_grad[2]
    grad_x, grad_offsets, grad_weights, _ = _backward_kernel(x, offsets, weights, grad, ctx.dilation, need_weights,
                                                             False)
    return grad_x, grad_offsets, grad_weights if need_weights else None, None


def _dot_setup(ctx, inputs, output):
    q, x, offsets, _, ctx.dilation = inputs
    ctx.save_for_backward(q, x, offsets)


def _dot_backward(ctx, grad):
    q, x, offsets = ctx.saved_tensors
    need_q = ctx.needs_input_grad[0]
    grad_x, grad_offsets, _, grad_q = _backward_kernel(x, offsets, grad, q, ctx.dilation, False, need_q)
    return grad_q if need_q else None, grad_x, grad_offsets, None, None


_aggregate_kernel.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)
_dot_kernel.register_autograd(_dot_backward, setup_context=_dot_setup)


# FlopCounterMode counts the fused ops' products as it counts the reference path's einsum (2 FLOPs per multiply-add:
# one per sampled element and channel); the bilinear reads themselves (4 multiply-adds per sampled element and
# channel) are left out, as FlopCounterMode leaves out F.grid_sample. Backward is not counted.
@register_flop_formula(torch.ops.dgmn_sampler.aggregate)
def _aggregate_flops(x_shape, offsets_shape, weights_shape, dilation, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape) * (offsets_shape[1] // 2)


@register_flop_formula(torch.ops.dgmn_sampler.dot)
def _dot_flops(q_shape, x_shape, offsets_shape, groups, dilation, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape) * (offsets_shape[1] // 2)


# ----------------------------------------------------------------------------------------------------------------
# Choosing the path

_BACKENDS = ("auto", "torch", "kernel")
_backend = "auto"


@contextlib.contextmanager
def backend(name):
    """Choose the path inside a `with` block: "auto" (the kernel for CUDA tensors, the reference otherwise),
    "torch" (the reference everywhere) or "kernel" (the kernel everywhere, on CPU its host-compiled build)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def _use_kernel(x):
    if _backend == "auto":
        return x.is_cuda and _cuda_kernel_builds()
    return _backend == "kernel"


# ----------------------------------------------------------------------------------------------------------------
# The public functions


def sample(x, offsets, dilation=1):
    """rho of Eq. 5: the K walked nodes of every query. x (B, C, H, W), offsets (B, 2K, H, W) -> (B, C, K, H, W)."""
    _check(x, offsets, dilation)
    if not _use_kernel(x):
        return _in_float(_sample, x, offsets, dilation, dtype=x.dtype)
    B, C, H, W = x.shape
    ones = x.new_ones(()).expand(B, C, H, W)  # sample is dot with q = 1 and a group per channel
    return _dot_kernel(ones, x, offsets, C, dilation)  # (B, G = C, K, H, W)


def aggregate(x, offsets, weights, dilation=1):
    """Eq. 5's message / Eq. 9's attn . v: out[:, c] = sum_k weights[:, c // (C / G), k] * sample(x)[:, c, k].

    x (B, C, H, W), offsets (B, 2K, H, W), weights (B, G, K, H, W) with G dividing C -> (B, C, H, W)."""
    _check(x, offsets, dilation, weights=weights)
    if _use_kernel(x):
        return _aggregate_kernel(x, offsets, weights, dilation)
    return _in_float(_aggregate_reference, x, offsets, weights, dilation, dtype=x.dtype)


def dot(q, x, offsets, groups=1, dilation=1):
    """Eq. 9's q . k: per group of C / G channels, the inner product of q with every node of x.

    q, x (B, C, H, W), offsets (B, 2K, H, W) -> (B, G, K, H, W), G = groups dividing C."""
    _check(x, offsets, dilation, q=q, groups=groups)
    if _use_kernel(x):
        return _dot_kernel(q, x, offsets, groups, dilation)
    return _in_float(_dot_reference, q, x, offsets, groups, dilation, dtype=x.dtype)


class WalkPredictor(nn.Conv2d):
    """Eq. 4: the walks of the K nodes uniformly sampled at one rate, predicted from those nodes.

    A ks x ks convolution dilated by the rate reads exactly the uniformly sampled neighbourhood v_i^q of each pixel;
    its 2K outputs are the offsets, in the layout sample/aggregate/dot take. Zero-initialised, so training starts
    from uniform sampling. x (B, C, H, W) -> offsets (B, 2K, H, W).
    It has Eq. 4's bias b, which the authors' DGMN release (lzrobots/dgmn) leaves out."""

    def __init__(self, channels, dilation=1, kernel_size=3):
        super().__init__(channels, 2 * kernel_size ** 2, kernel_size, padding=dilation * (kernel_size // 2),
                         dilation=dilation)

    def reset_parameters(self):
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: python sampler.py [--batch N] [--dtype bfloat16]

HEAD_DIM, K_NODES = 64, 9
TINY_STAGES = [(56, 1), (28, 2), (14, 5), (7, 8)]  # DGMN2-Tiny at 224 x 224: map side and heads per stage
HBM_BYTES_PER_S = 3.0e12                           # H100 device memory, measured copy (kernels.md)
DGMN_SETTING = dict(channels=512, side=97, groups=4, dilation=24)  # Cityscapes, the largest rate (Table 2)
DGMN_WALK_SCALE = 8                                # walks of a few pixels, like a trained model's at that rate


def _dgmn_batch(batch):
    return max(batch // 8, 1)  # Cityscapes' batch 8 against ImageNet's 64


def _attention(q, k, v, offsets):
    """DGMN2's sampled attention (Eq. 8-9, relative positions left out): heads folded into the batch."""
    attn = (dot(q, k, offsets) * HEAD_DIM ** -0.5).softmax(dim=2)  # (B, 1, K, H, W)
    return aggregate(v, offsets, attn)


def _cases(batch, dtype, device):
    """(name, function, inputs, bytes the fused kernels must at least move forward and backward, or None)."""
    def leaf(t):
        return t.to(device).requires_grad_()

    size = torch.finfo(dtype).bits // 8
    for stage, (side, heads) in enumerate(TINY_STAGES, 1):
        q, k, v = (leaf(torch.randn(batch * heads, HEAD_DIM, side, side, dtype=dtype)) for _ in range(3))
        offsets = leaf(torch.randn(batch * heads, 2 * K_NODES, side, side, dtype=dtype))
        features, walks = q.numel() * size, offsets.numel() * size
        # forward: read q, k, v, offsets, write out; backward: read them and grad out, write their four grads
        moved = (4 * features + walks) + (4 * features + walks) + (3 * features + walks)
        yield (f"DGMN2-T stage {stage}: {side}x{side}x({heads}x{HEAD_DIM}), aggregate+dot", _attention,
               (q, k, v, offsets), moved)
    B, (C, side, G, dilation) = _dgmn_batch(batch), DGMN_SETTING.values()
    x = leaf(torch.randn(B, C, side, side, dtype=dtype))
    offsets = leaf(DGMN_WALK_SCALE * torch.randn(B, 2 * K_NODES, side, side, dtype=dtype))
    weights = leaf(torch.randn(B, G, K_NODES, side, side).softmax(dim=2))  # float32, as softmax gives under autocast
    yield f"DGMN: {side}x{side}x{C}, G = {G}, dilation {dilation}, aggregate", \
        functools.partial(aggregate, dilation=dilation), (x, offsets, weights), None


def _measure(fn, device, repeats):
    """Median seconds of fn() and its peak memory above what was allocated before. CUDA: the allocator's peak.
    CPU: the running sum of the profiler's allocation and free records (every aten op, those inside the kernels'
    C++ too), taken in a separate call so that profiling does not slow the timed ones."""
    import itertools
    import statistics
    import time
    fn()  # warm up: builds and loads the kernels, fills caches
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        return statistics.median(times), torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    return statistics.median(times), max(itertools.accumulate(bytes_ for _, bytes_ in records))


def _benchmark():
    import argparse
    parser = argparse.ArgumentParser(description="Reference vs kernel path at DGMN2-Tiny's and DGMN's shapes.")
    parser.add_argument("--batch", type=int, default=64, help="images (DGMN2 rows; the DGMN row uses batch / 8)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}, {args.dtype}, batch {args.batch} (DGMN row: {_dgmn_batch(args.batch)}); median of "
          f"{args.repeats}; peak memory above the inputs\n")
    cuda = device == "cuda"
    print("| shape | path | forward ms | fwd+bwd ms | fwd peak MB | fwd+bwd peak MB |" +
          (" fwd+bwd / bandwidth bound |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|" if cuda else ""))
    for name, fn, inputs, moved in _cases(args.batch, dtype, device):
        for path in ("torch", "kernel"):
            with backend(path):
                with torch.no_grad():
                    fwd, fwd_mem = _measure(lambda: fn(*inputs), device, args.repeats)
                grad = torch.randn_like(fn(*inputs))
                both, both_mem = _measure(lambda: torch.autograd.grad(fn(*inputs), inputs, grad), device, args.repeats)
            row = f"| {name} | {path} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | {fwd_mem / 2**20:.0f} | " \
                  f"{both_mem / 2**20:.0f} |"
            if cuda:
                row += f" {both * HBM_BYTES_PER_S / moved:.1f}x |" if moved else " |"
            print(row)


if __name__ == "__main__":
    _benchmark()
