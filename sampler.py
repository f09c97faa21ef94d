"""Dynamic node sampling: Eq. 4-5 of the paper (Sections 3.3-3.5) and the sampling inside Eq. 8-9 (Section 4.1).

Every query pixel (y, x) reads K = ks * ks nodes: a ks x ks grid spaced `dilation` apart (one uniform sampling
rate of Eq. 3), each node moved by a predicted walk (Eq. 4) and read with the bilinear sampler rho (Eq. 5).

    sample(x, offsets)              the sampled nodes themselves: the readable definition of rho
    aggregate(x, offsets, weights)  sum over nodes of weight * node per channel group: Eq. 5's message, Eq. 9's attn . v
    dot(q, x, offsets, groups)      q . node per channel group: Eq. 9's q . k
    attention(qkv, walks, ...)      DGMN2's whole attention (Eq. 8-9 with Fig. 4b's relative positions), one op
    WalkPredictor                   Eq. 4: walks predicted from the uniformly sampled neighbourhood

Symbols, used throughout: B batch, C channels, H x W the map, N = H W tokens, G channel groups (D = C / G channels
each, a head's), Go walk groups, K nodes per query. Offsets are (B, 2K Go, H, W) in torchvision.ops.deform_conv2d's
layout: channels [2K o, 2K (o + 1)) walk the o-th of Go equal chunks of the C channels (DGMN2: one walk per head,
Go = G; DGMN: one walk, Go = 1), and within a walk channel 2k is dy and 2k + 1 is dx of node k = ks * i + j, which
sits at (y + (i - ks // 2) * dilation + dy, x + (j - ks // 2) * dilation + dx). A point is read bilinearly from its
four neighbours; neighbours outside the map read zero (the DCN v1 semantics of the authors' release, equal to
F.grid_sample(padding_mode="zeros", align_corners=False)). A NaN or infinite walk reads NaN, on both paths, so that a
NaN check or a GradScaler sees it. Half inputs are computed in float32 (coordinates, bilinear weights, sums) and
returned in their own dtype.

Two paths compute the same functions:
  - the torch reference below, a few lines each: the specification, and the fallback;
  - sampler_cuda.cu, the default wherever it builds (nvcc for CUDA tensors, the host C++ compiler for CPU tensors;
    built on first use and cached): aggregate and dot are fused and never write the (B, C, K, H, W) nodes, and feature
    maps are read channels-last with any pixel strides, so DGMN2's q, k and v are read in place from its Linear;
    attention is one op forward and one backward, its logits and softmax in registers.
`with backend("torch" | "kernel" | "auto")` chooses, and the environment variable DGMN_SAMPLER sets the same choice
for a whole run ("kernel" makes a failed build an error instead of a fallback); `which_path(device_type)` says which
path runs. `python sampler.py` benchmarks the paths at DGMN2-Tiny's and DGMN's shapes.
"""

import contextlib
import functools
import itertools
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import register_flop_formula

# ----------------------------------------------------------------------------------------------------------------
# Checks: one ValueError that names the argument and the shape it should have


def _kernel_size(offsets, offset_groups):
    """ks of the ks x ks grid that (B, 2K Go, H, W) offsets walk, K = ks * ks with ks odd; None if there is none."""
    per_walk = offsets.shape[1] // (2 * offset_groups) if offsets.dim() == 4 else 0
    ks = math.isqrt(per_walk)
    return ks if ks % 2 == 1 and offsets.shape[1] == 2 * ks * ks * offset_groups else None


def _check(x, offsets, dilation, offset_groups, weights=None, q=None, groups=None):
    """Validate the inputs of sample/aggregate/dot."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, H, W) tensor, got {x.dtype} of shape {tuple(x.shape)}")
    B, C, H, W = x.shape
    if not (isinstance(offset_groups, int) and offset_groups > 0):
        raise ValueError(f"offset_groups must be a positive int, got {offset_groups!r}")
    ks = _kernel_size(offsets, offset_groups)
    if offsets.dim() != 4 or (offsets.shape[0], *offsets.shape[2:]) != (B, H, W) or ks is None:
        raise ValueError(f"offsets must have shape (B, 2K Go, H, W) = ({B}, 2K x {offset_groups}, {H}, {W}) with "
                         f"K = ks * ks for an odd ks (2K = 18 for 3x3), got {tuple(offsets.shape)}")
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
        groups = G
    if q is not None:
        if q.shape != x.shape or q.dtype != x.dtype:
            raise ValueError(f"q must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                             f"got {tuple(q.shape)} {q.dtype}")
        if not (isinstance(groups, int) and groups > 0 and C % groups == 0):
            raise ValueError(f"groups must be a positive int dividing C = {C}, got {groups!r}")
    if (groups or C) % offset_groups:
        raise ValueError(f"offset_groups = {offset_groups} must divide the {groups or C} "
                         f"{'groups' if groups else 'channels'}: a walk is shared by whole groups")


# ----------------------------------------------------------------------------------------------------------------
# The torch reference path: the specification


def _node_positions(offsets, dilation):
    """Rows and columns of every node: (B, 2K, H, W) walks -> two (B, K, H, W) maps.

    The ks x ks grid around each pixel (Eq. 3's uniform sampling at rate `dilation`) moved by the walks (Eq. 4)."""
    _, _, H, W = offsets.shape
    ks = _kernel_size(offsets, 1)
    step = (torch.arange(ks, device=offsets.device) - ks // 2) * dilation  # (ks,) grid steps around the query
    i, j = torch.meshgrid(step, step, indexing="ij")                      # (ks, ks) row, column step of node ks*i+j
    dy, dx = rearrange(offsets, "b (k yx) h w -> yx b k h w", yx=2)       # each (B, K, H, W)
    rows = torch.arange(H, device=offsets.device)[:, None] + rearrange(i, "i j -> (i j) 1 1") + dy
    cols = torch.arange(W, device=offsets.device)[None, :] + rearrange(j, "i j -> (i j) 1 1") + dx
    return rows, cols


def _sample(x, offsets, dilation, offset_groups):
    """rho of Eq. 5 at every node: (B, C, H, W), (B, 2K Go, H, W) -> (B, C, K, H, W), in x's dtype."""
    x = rearrange(x, "b (o c) h w -> (b o) c h w", o=offset_groups)  # each walk group's channels an image of its own
    offsets = rearrange(offsets, "b (o k) h w -> (b o) k h w", o=offset_groups)  # (B Go, 2K, H, W)
    _, C, H, W = x.shape
    rows, cols = _node_positions(offsets, dilation)                          # each (B Go, K, H, W)
    finite = rows.isfinite() & cols.isfinite()
    rows, cols = rows.where(finite, -2), cols.where(finite, -2)              # NaN below instead of a wild index
    # A ring of zeros around the map: a neighbour outside it reads 0 once its index is clamped onto the ring.
    padded = rearrange(F.pad(x, (1, 1, 1, 1)), "b c h w -> b c (h w)")      # (B Go, C / Go, (H + 2) (W + 2))
    top, left = rows.floor(), cols.floor()
    nodes = 0
    for r, wr in ((top, 1 - (rows - top)), (top + 1, rows - top)):          # upper and lower neighbour rows
        for c, wc in ((left, 1 - (cols - left)), (left + 1, cols - left)):  # left and right neighbour columns
            index = (r.clamp(-1, H).long() + 1) * (W + 2) + c.clamp(-1, W).long() + 1            # (B Go, K, H, W)
            index = rearrange(index, "b k h w -> b 1 (k h w)").expand(-1, C, -1)                # (B Go, C, K H W)
            read = rearrange(padded.gather(2, index), "b c (k h w) -> b c k h w", h=H, w=W)   # (B Go, C, K, H, W)
            nodes = nodes + read * (wr * wc)[:, None]                  # weights (B Go, 1, K, H, W) over C / Go
    nodes = nodes.masked_fill(~finite[:, None], math.nan)
    return rearrange(nodes, "(b o) c k h w -> b (o c) k h w", o=offset_groups)


def _aggregate_reference(x, offsets, weights, dilation, offset_groups):
    """(B, C, H, W), (B, 2K Go, H, W), (B, G, K, H, W) -> (B, C, H, W)"""
    G = weights.shape[1]
    nodes = rearrange(_sample(x, offsets, dilation, offset_groups), "b (g c) k h w -> b g c k h w", g=G)
    out = torch.einsum("bgckhw,bgkhw->bgchw", nodes, weights)
    return rearrange(out, "b g c h w -> b (g c) h w")


def _dot_reference(q, x, offsets, groups, dilation, offset_groups):
    """(B, C, H, W), (B, C, H, W), (B, 2K Go, H, W) -> (B, G, K, H, W)"""
    nodes = rearrange(_sample(x, offsets, dilation, offset_groups), "b (g c) k h w -> b g c k h w", g=groups)
    return torch.einsum("bgchw,bgckhw->bgkhw", rearrange(q, "b (g c) h w -> b g c h w", g=groups), nodes)


def _slot_rows(length, nodes, device):
    """(length, K) row indices into a (length + K - 1, D) relative-position table: entry [p, s] is s + length - 1 - p,
    the row of slot s at position p along that axis."""
    return torch.arange(nodes, device=device)[None, :] + length - 1 - torch.arange(length, device=device)[:, None]


def _relative_logits(q, width, height):
    """Fig. 4b's relative-position logits by its symmetric rule (dgmn2.RelativePosition's default), tables at the
    map's size: q (B, G, D, H, W), width (W + K - 1, D), height (H + K - 1, D) -> (B, G, K, H, W)."""
    H, W = q.shape[-2:]
    K = width.shape[0] - W + 1
    return torch.einsum("bgdhw,wkd->bgkhw", q, width[_slot_rows(W, K, q.device)]) + \
        torch.einsum("bgdhw,hkd->bgkhw", q, height[_slot_rows(H, K, q.device)])  # each table (side, K, D)


def _attention_composed(qkv, walks, width, height, size, heads, scale):
    """attention() from its parts: dot, the scale, the relative-position logits, the softmax and aggregate, each on
    the path chosen (the reference's parts: the specification)."""
    H = size[0]
    q, k, v = rearrange(qkv, "b (h w) (three c) -> three b c h w", three=3, h=H)    # views, each (B, C, H, W)
    offsets = rearrange(walks, "b (h w) g o -> b (g o) h w", h=H)                   # (B, 2K G, H, W)
    width, height = width.to(q.dtype), height.to(q.dtype)  # einsum takes one dtype (the fused op: float32 tables)
    logits = dot(q, k, offsets, heads, offset_groups=heads) * scale + \
        _relative_logits(rearrange(q, "b (g d) h w -> b g d h w", g=heads), width, height)  # (B, G, K, H, W)
    out = aggregate(v, offsets, logits.softmax(dim=2), offset_groups=heads)          # (B, C, H, W)
    return rearrange(out, "b c h w -> b (h w) c")


def _no_autocast(device):
    """A context with autocast off on this device (the meta device has no autocast: nothing to turn off)."""
    return torch.autocast(device.type, enabled=False) if torch.amp.is_autocast_available(device.type) \
        else contextlib.nullcontext()


def _in_float(fn, *args, dtype):
    """Run a reference function in float32 (float64 stays) with autocast off; return its result in `dtype`."""
    compute = torch.promote_types(dtype, torch.float32)
    with _no_autocast(next(a for a in args if isinstance(a, torch.Tensor)).device):
        out = fn(*(a.to(compute) if isinstance(a, torch.Tensor) else a for a in args))
    return out.to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# The kernel path: sampler_cuda.cu, built on first use, registered as torch.library custom ops

_SOURCE = Path(__file__).with_name("sampler_cuda.cu")


@functools.cache
def _extension(device_type):
    """The compiled kernels' ops for 'cuda' (nvcc) or 'cpu' (the same source compiled as C++ by the host compiler):
    torch.ops.dgmn_sampler_cuda or torch.ops.dgmn_sampler_host[_avx2 | _avx512], each with aggregate, dot, backward,
    attention and attention_backward."""
    import logging
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns "No CUDA runtime is found" on machines without a GPU
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    if device_type == "cuda":
        # --split-compile=0: the device compiler's passes on every core (sm_90 alone on two cores: 157 s against
        # 219 s on one, every kernel's registers and spills unchanged)
        cpp_extension.load(name="dgmn_sampler_cuda", sources=[str(_SOURCE)], extra_cflags=["-O3"],
                           extra_cuda_cflags=["-O3", "--split-compile=0"], is_python_module=False)
        return torch.ops.dgmn_sampler_cuda
    if device_type == "cpu":
        # load_inline compiles the .cu as C++ and hashes its text, so an edited sampler_cuda.cu is rebuilt; the file
        # includes what it needs (torch/extension.h would triple the build time). ATen's parallel_for is inlined
        # from its OpenMP header: without -fopenmp it would run on one thread. The vector instructions are those
        # torch itself dispatches to on this CPU (AVX2 with FMA, or AVX-512), named in the build so that a machine
        # sharing the home directory but not the CPU builds its own; not -march=native, which names no set.
        isa = torch.backends.cpu.get_cpu_capability()
        vector_flags = {"AVX2": ["-mavx2", "-mfma"], "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw",
                                                                "-mavx512vl", "-mavx512dq"]}.get(isa, [])
        name = f"dgmn_sampler_host_{isa.lower()}" if vector_flags else "dgmn_sampler_host"
        cpp_extension.load_inline(name=name, cpp_sources=[_SOURCE.read_text()],
                                  extra_cflags=["-O3", "-fopenmp", *vector_flags], extra_ldflags=["-fopenmp"],
                                  is_python_module=False, no_implicit_headers=True)
        return getattr(torch.ops, name)
    raise ValueError(f"the sampler's kernels run on CUDA or CPU tensors, got {device_type}")


@functools.cache
def _build(device_type):
    if device_type not in ("cpu", "cuda"):
        return False  # the meta device (shapes, FLOP counts) and others: the reference
    if device_type == "cuda" and not torch.cuda.is_available():
        return False  # no GPU to build for (nvcc would fail on the architecture list)
    try:
        _extension(device_type)
        return True
    except Exception as error:  # a failed build is a slower run, not a failed one
        warnings.warn(f"sampler.py: could not build {_SOURCE.name} for {device_type} ({type(error).__name__}: "
                      f"{error}); using the torch reference path")
        return False


# torch.compile calls this while tracing instead of tracing into the build, and keeps its answer as a constant.
@torch.compiler.assume_constant_result
def _kernel_builds(device_type: str) -> bool:
    """Whether the kernels build (or are already built) for this device type; built once, on first call."""
    return _build(device_type)


def _unused_namespace(base="dgmn_sampler"):
    """The custom ops' namespace: base, or base_1, base_2, ... for a second copy of this file in the process (a
    project's vendored copy, importlib.reload). Defining an op again would replace the first copy's, whose torch
    library is then destroyed under it: that has crashed the process."""
    for n in itertools.count():
        name = f"{base}_{n}" if n else base
        if not hasattr(getattr(torch.ops, name), "aggregate"):
            return name


_OPS = _unused_namespace()


@torch.library.custom_op(f"{_OPS}::aggregate", mutates_args=())
def _aggregate_kernel(x: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor, offset_groups: int,
                      dilation: int) -> torch.Tensor:
    return _extension(x.device.type).aggregate(x, offsets, weights, offset_groups, dilation)


@torch.library.custom_op(f"{_OPS}::dot", mutates_args=())
def _dot_kernel(q: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor, groups: int, offset_groups: int,
                dilation: int) -> torch.Tensor:
    return _extension(x.device.type).dot(q, x, offsets, groups, offset_groups, dilation)


@torch.library.custom_op(f"{_OPS}::backward", mutates_args=())
def _backward_kernel(x: torch.Tensor, offsets: torch.Tensor, u: torch.Tensor, v: torch.Tensor, offset_groups: int,
                     dilation: int, need_x: bool, need_offsets: bool,
                     need_u: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of L = sum_k sum_{c in g} u[k] v[c] node_k[c] (both ops are this form): x, offsets and u, each
    empty unless asked for."""
    return tuple(_extension(x.device.type).backward(x, offsets, u, v, offset_groups, dilation, need_x, need_offsets,
                                                    need_u))


# The fakes give torch.compile the kernels' exact output layouts: feature maps channels-last, per-query tensors
# (B, G, K, H, W) laid out (B, H, W, G, K), offset gradients channels-last.
def _per_query(x, groups, per_unit, dtype):
    B, _, H, W = x.shape
    empty = torch.empty(B, H, W, groups, per_unit, dtype=dtype, device=x.device)
    return empty.permute(0, 3, 4, 1, 2)  # (B, H, W, G, K) -> (B, G, K, H, W), keeping the layout


def _channels_last(shape, like):
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=torch.channels_last)


@_aggregate_kernel.register_fake
def _(x, offsets, weights, offset_groups, dilation):
    return _channels_last(x.shape, x)


@_dot_kernel.register_fake
def _(q, x, offsets, groups, offset_groups, dilation):
    return _per_query(x, groups, offsets.shape[1] // (2 * offset_groups), x.dtype)


@_backward_kernel.register_fake
def _(x, offsets, u, v, offset_groups, dilation, need_x, need_offsets, need_u):
    grad_x = _channels_last(x.shape, x) if need_x else x.new_empty(0)
    grad_offsets = _channels_last(offsets.shape, offsets) if need_offsets else offsets.new_empty(0)
    grad_u = _per_query(x, u.shape[1], u.shape[2], u.dtype) if need_u else u.new_empty(0)
    return grad_x, grad_offsets, grad_u


def _aggregate_setup(ctx, inputs, output):
    x, offsets, weights, ctx.offset_groups, ctx.dilation = inputs
    ctx.save_for_backward(x, offsets, weights)


def _aggregate_backward(ctx, grad):
    x, offsets, weights = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    grads = _backward_kernel(x, offsets, weights, grad, ctx.offset_groups, ctx.dilation, *need)
    return *(g if n else None for g, n in zip(grads, need)), None, None


def _dot_setup(ctx, inputs, output):
    q, x, offsets, _, ctx.offset_groups, ctx.dilation = inputs
    ctx.save_for_backward(q, x, offsets)


def _dot_backward(ctx, grad):
    q, x, offsets = ctx.saved_tensors
    need_q, need_x, need_offsets = ctx.needs_input_grad[:3]
    grad_x = grad_offsets = None
    if need_x or need_offsets:
        grad_x, grad_offsets, _ = _backward_kernel(x, offsets, grad, q, ctx.offset_groups, ctx.dilation, need_x,
                                                   need_offsets, False)
    # d/dq of sum_k grad[k] q . node_k is sum_k grad[k] node_k: aggregate itself.
    grad_q = _aggregate_kernel(x, offsets, grad, ctx.offset_groups, ctx.dilation) if need_q else None
    return grad_q, grad_x if need_x else None, grad_offsets if need_offsets else None, None, None, None


def _no_double_backward(ctx, *grads):
    raise RuntimeError("sampler.py: the kernel path has no double backward (gradients of gradients); "
                       "use `with sampler.backend('torch'):` for those")


_aggregate_kernel.register_autograd(_aggregate_backward, setup_context=_aggregate_setup)
_dot_kernel.register_autograd(_dot_backward, setup_context=_dot_setup)
_backward_kernel.register_autograd(_no_double_backward)


# FlopCounterMode counts the fused ops' products as it counts the reference path's einsum (2 FLOPs per multiply-add:
# one per sampled element and channel); the bilinear reads themselves (4 multiply-adds per sampled element and
# channel) are left out, as FlopCounterMode leaves out F.grid_sample. The backward kernels have no formula: a backward
# counts only what it computes with counted ops (on the composed path dot's grad q through aggregate and the tables'
# einsums; nothing of the fused attention's).
@register_flop_formula(getattr(torch.ops, _OPS).aggregate)
def _aggregate_flops(x_shape, offsets_shape, weights_shape, offset_groups, dilation, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape) * weights_shape[2]


@register_flop_formula(getattr(torch.ops, _OPS).dot)
def _dot_flops(q_shape, x_shape, offsets_shape, groups, offset_groups, dilation, out_shape=None, **kwargs):
    return 2 * math.prod(x_shape) * (offsets_shape[1] // (2 * offset_groups))


# The fused attention: one op forward, one backward (sampler_cuda.cu's Attention and AttentionBackward). Its forward
# saves p (B, N, G, K), the softmax in float32 (float64 for float64 inputs); its backward returns the gradients of
# qkv, the walks and the two tables, these stacked (width's rows, then height's): an op's outputs may not share
# memory, and the kernel sums both tables in one tensor.
ATTENTION_NODES = 9  # the fused op's K, a compile-time constant in the kernel: the 3 x 3 grid


@torch.library.custom_op(f"{_OPS}::attention", mutates_args=())
def _attention_kernel(qkv: torch.Tensor, walks: torch.Tensor, width: torch.Tensor, height: torch.Tensor, rows: int,
                      heads: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(_extension(qkv.device.type).attention(qkv, walks, width, height, rows, heads, scale))


@torch.library.custom_op(f"{_OPS}::attention_backward", mutates_args=())
def _attention_backward_kernel(qkv: torch.Tensor, walks: torch.Tensor, width: torch.Tensor, height: torch.Tensor,
                               probs: torch.Tensor, grad: torch.Tensor, rows: int, heads: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(_extension(qkv.device.type).attention_backward(qkv, walks, width, height, probs, grad, rows, heads,
                                                                scale))


@_attention_kernel.register_fake
def _(qkv, walks, width, height, rows, heads, scale):
    B, N, C3 = qkv.shape
    return qkv.new_empty(B, N, C3 // 3), qkv.new_empty(B, N, heads, ATTENTION_NODES, dtype=width.dtype)


@_attention_backward_kernel.register_fake
def _(qkv, walks, width, height, probs, grad, rows, heads, scale):
    tables = width.new_empty(len(width) + len(height), width.shape[1])  # both tables' gradients, stacked
    return qkv.new_empty(qkv.shape), walks.new_empty(walks.shape), tables


def _attention_setup(ctx, inputs, output):
    qkv, walks, width, height, ctx.rows, ctx.heads, ctx.scale = inputs
    ctx.save_for_backward(qkv, walks, width, height, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # p's gradient, always None, would otherwise be a tensor of zeros (a GPU launch)


def _attention_backward(ctx, grad, _):
    if grad is None:  # out took no part in what is differentiated
        return (None,) * 7
    qkv, walks, width, height, probs = ctx.saved_tensors
    grad_qkv, grad_walks, grad_tables = _attention_backward_kernel(qkv, walks, width, height, probs, grad, ctx.rows,
                                                                   ctx.heads, ctx.scale)
    return grad_qkv, grad_walks, *grad_tables.split([len(width), len(height)]), None, None, None


_attention_kernel.register_autograd(_attention_backward, setup_context=_attention_setup)
_attention_backward_kernel.register_autograd(_no_double_backward)


@register_flop_formula(getattr(torch.ops, _OPS).attention)
def _attention_flops(qkv_shape, walks_shape, width_shape, height_shape, rows, heads, scale, out_shape=None,
                     **kwargs):
    """As the composed path counts: q . k, attn . v and the two relative-position products, each 2 B N C K."""
    B, N, C3 = qkv_shape
    return 4 * 2 * B * N * (C3 // 3) * ATTENTION_NODES


def sampled_multiply_adds(flop_counts):
    """The multiply-adds among the sampler ops' FLOPs that read a sampled node (one bilinear read of one channel
    each), from FlopCounterMode.get_flop_counts()["Global"]: all of aggregate's and dot's, half of attention's (its
    relative-position products read the tables)."""
    share = {"aggregate": 1, "dot": 1, "attention": 2}  # FLOPs per sampled multiply-add is 2 x this
    return sum(flops // (2 * share[str(op).split(".")[-1]]) for op, flops in flop_counts.items()
               if str(op).split(".")[0] == _OPS)


# ----------------------------------------------------------------------------------------------------------------
# Choosing the path

_BACKENDS = ("auto", "torch", "kernel")
_backend = os.environ.get("DGMN_SAMPLER", "auto")  # the run's default; `backend` changes it inside a block
if _backend not in _BACKENDS:
    raise ValueError(f"the environment variable DGMN_SAMPLER must be one of {_BACKENDS}, got {_backend!r}")


@contextlib.contextmanager
def backend(name):
    """Choose the path inside a `with` block: "auto" (the kernel wherever it builds, else the reference with one
    warning), "torch" (the reference everywhere) or "kernel" (the kernel everywhere)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous


def which_path(device_type):
    """"kernel" or "torch": the path the sampler's functions take now for tensors of this device type ("cpu",
    "cuda", "meta"); under "auto" this builds the kernels if they are not built yet."""
    if _backend == "auto":
        return "kernel" if _kernel_builds(device_type) else "torch"
    return _backend


def _use_kernel(x):
    return which_path(x.device.type) == "kernel"


# ----------------------------------------------------------------------------------------------------------------
# The public functions


def sample(x, offsets, dilation=1, offset_groups=1):
    """rho of Eq. 5: the K walked nodes of every query.

    x (B, C, H, W), offsets (B, 2K Go, H, W) with Go dividing C -> (B, C, K, H, W) (on the kernel path laid out
    (B, H, W, C, K): use .reshape, not .view)."""
    _check(x, offsets, dilation, offset_groups)
    if not _use_kernel(x):
        return _in_float(_sample, x, offsets, dilation, offset_groups, dtype=x.dtype)
    ones = torch.ones_like(x, memory_format=torch.channels_last)
    return _dot_kernel(ones, x, offsets, x.shape[1], offset_groups, dilation)  # dot with q = 1, a group per channel


def aggregate(x, offsets, weights, dilation=1, offset_groups=1):
    """Eq. 5's message / Eq. 9's attn . v: out[:, c] = sum_k weights[:, c // (C / G), k] * sample(x)[:, c, k].

    x (B, C, H, W), offsets (B, 2K Go, H, W), weights (B, G, K, H, W) with Go | G | C -> (B, C, H, W)."""
    _check(x, offsets, dilation, offset_groups, weights=weights)
    if _use_kernel(x):
        return _aggregate_kernel(x, offsets, weights, offset_groups, dilation)
    return _in_float(_aggregate_reference, x, offsets, weights, dilation, offset_groups, dtype=x.dtype)


def dot(q, x, offsets, groups=1, dilation=1, offset_groups=1):
    """Eq. 9's q . k: per group of C / G channels, the inner product of q with every node of x.

    q, x (B, C, H, W), offsets (B, 2K Go, H, W) -> (B, G, K, H, W), G = groups with Go | G | C."""
    _check(x, offsets, dilation, offset_groups, q=q, groups=groups)
    if _use_kernel(x):
        return _dot_kernel(q, x, offsets, groups, offset_groups, dilation)
    return _in_float(_dot_reference, q, x, offsets, groups, dilation, offset_groups, dtype=x.dtype)


def _check_attention(qkv, walks, width, height, size, heads):
    """Validate the inputs of attention()."""
    H, W = size
    if not (isinstance(heads, int) and heads > 0):
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if qkv.dim() != 3 or not qkv.is_floating_point() or qkv.shape[1] != H * W or qkv.shape[2] % (3 * heads):
        raise ValueError(f"qkv must be a floating-point (B, N, 3C) tensor with N = H W = {H} x {W} and C divided by "
                         f"{heads} heads, got {qkv.dtype} of shape {tuple(qkv.shape)}")
    B, N, D = qkv.shape[0], qkv.shape[1], qkv.shape[2] // (3 * heads)
    ks = math.isqrt(walks.shape[-1] // 2) if walks.dim() == 4 else 0
    if walks.dim() != 4 or tuple(walks.shape[:3]) != (B, N, heads) or walks.shape[-1] != 2 * ks * ks or ks % 2 == 0 \
            or not walks.is_floating_point():
        raise ValueError(f"walks must be a floating-point (B, N, G, 2K) tensor = ({B}, {N}, {heads}, 2K) with K = ks "
                         f"* ks for an odd ks, got {walks.dtype} of shape {tuple(walks.shape)}")
    K = ks * ks
    for name, table, side in (("width", width, W), ("height", height, H)):
        if tuple(table.shape) != (side + K - 1, D) or not table.is_floating_point():
            raise ValueError(f"{name} must be a floating-point ({side + K - 1}, {D}) table (side + K - 1, D), "
                             f"got {table.dtype} of shape {tuple(table.shape)}")
    for name, t in (("walks", walks), ("width", width), ("height", height)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}: all inputs must be on one device")


def _fused(qkv, walks, heads):
    """Whether the fused op takes these inputs: K = 9 and a head of at most 32 channels or a multiple of 8 up to 64
    (it holds a head in one warp of 16-byte runs); others run composed."""
    D = qkv.shape[-1] // (3 * heads)
    return walks.shape[-1] == 2 * ATTENTION_NODES and (D <= 32 or (D <= 64 and D % 8 == 0))


def attention(qkv, walks, width, height, size, heads, scale):
    """DGMN2's attention: Eq. 9 with Fig. 4b's relative positions (dgmn2.RelativePosition's symmetric rule), per head
    over the K walked nodes of its keys and values:
        out = sum_k softmax_k(scale q . node_k(k) + q . width[k + W-1 - x] + q . height[k + H-1 - y]) node_k(v)
    qkv (B, N, 3C) as nn.Linear wrote it (q, k, v its thirds, C = G D, N = H W), walks (B, N, G, 2K) a walk per head,
    width (W + K - 1, D), height (H + K - 1, D) the tables at this size, size (H, W) -> (B, N, C).

    On the kernel path one fused op (K = 9, see _fused): the logits and the softmax stay in float32 registers and,
    besides its inputs, only p is saved (float32; float64 for float64 inputs); its backward is one pass too, the
    tables' gradients included.
    Elsewhere, and on the torch path, the composed computation: dot, the relative-position einsums, softmax,
    aggregate."""
    _check_attention(qkv, walks, width, height, size, heads)
    if not (_use_kernel(qkv) and _fused(qkv, walks, heads)):
        return _attention_composed(qkv, walks, width, height, size, heads, scale)
    dtype = torch.promote_types(qkv.dtype, walks.dtype)  # the kernel reads both in one dtype
    tables = [t.to(torch.promote_types(dtype, torch.float32)).contiguous() for t in (width, height)]
    out, _ = _attention_kernel(qkv.to(dtype), walks.to(dtype), *tables, size[0], heads, float(scale))
    return out.to(qkv.dtype)


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
# Benchmark: python sampler.py [--batch N] [--dtype D] [--repeats N]

HEAD_DIM, K_NODES = 64, ATTENTION_NODES
TINY_STAGES = [(56, 1), (28, 2), (14, 5), (7, 8)]  # DGMN2-Tiny at 224 x 224: map side and heads per stage
DGMN_SETTING = dict(channels=512, side=97, groups=4, dilation=24)  # Cityscapes, a large rate (Table 2: 1 to 36)
DGMN_WALK_SCALE = 8                                # walks of a few pixels, like a trained model's at that rate
PATHS = ("torch", "grid_sample", "kernel", "fused")  # the reference, the peers' way, the kernels, DGMN2's one op


def _dgmn_batch(batch):
    return max(batch // 8, 1)  # Cityscapes' batch 8 against the DGMN2 rows' 64 (the benchmark's default)


def _grid_sample_nodes(x, offsets, dilation, offset_groups):
    """The nodes as the peers sample them (DAT; the pure-PyTorch MSDeformAttn of HF transformers): one F.grid_sample of
    all K nodes, walk groups folded into the batch, in float32 as autocast runs it (coordinates in a half type would
    be off by a fraction of a pixel). (B, C, H, W), (B, 2K Go, H, W) -> (B Go, C / Go, K, H, W) in float32."""
    _, _, H, W = x.shape
    walks = rearrange(offsets.float(), "b (o k) h w -> (b o) k h w", o=offset_groups)  # (B Go, 2K, H, W)
    rows, cols = _node_positions(walks, dilation)                                    # each (B Go, K, H, W)
    grid = torch.stack([(2 * cols + 1) / W - 1, (2 * rows + 1) / H - 1], dim=-1)   # (B Go, K, H, W, 2), x first
    nodes = F.grid_sample(rearrange(x.float(), "b (o c) h w -> (b o) c h w", o=offset_groups),
                          rearrange(grid, "n k h w xy -> n (k h) w xy"), mode="bilinear",
                          padding_mode="zeros", align_corners=False)                 # (B Go, C / Go, K H, W)
    return rearrange(nodes, "n c (k h) w -> n c k h w", h=H)


def _attention(path, q, k, v, offsets, width, height, heads):
    """DGMN2's sampled attention as its layer computes it (Eq. 8-9 with Fig. 4b's relative positions), a walk per
    head: q, k, v (B, C, H, W), offsets (B, 2K G, H, W), tables (side + K - 1, D) -> (B, C, H, W)."""
    queries = rearrange(q, "b (g d) h w -> b g d h w", g=heads)                        # (B, G, D, H, W)
    rel = _relative_logits(queries, width, height)                                     # (B, G, K, H, W)
    if path == "grid_sample":
        keys, values = (rearrange(_grid_sample_nodes(t, offsets, 1, heads), "(b g) d k h w -> b g d k h w", g=heads)
                        for t in (k, v))                                                # each (B, G, D, K, H, W)
        attn = (torch.einsum("bgdhw,bgdkhw->bgkhw", queries, keys) * HEAD_DIM ** -0.5 + rel).softmax(dim=2)
        return rearrange(torch.einsum("bgkhw,bgdkhw->bgdhw", attn, values), "b g d h w -> b (g d) h w")
    with backend(path):
        attn = (dot(q, k, offsets, heads, offset_groups=heads) * HEAD_DIM ** -0.5 + rel).softmax(dim=2)
        return aggregate(v, offsets, attn, offset_groups=heads)


def _message(path, x, offsets, weights, dilation):
    """DGMN's message of one rate (Eq. 5-7 without the transforms), one walk for G filter groups."""
    if path == "grid_sample":
        nodes = rearrange(_grid_sample_nodes(x, offsets, dilation, 1), "b (g c) k h w -> b g c k h w",
                          g=weights.shape[1])
        return rearrange(torch.einsum("bgckhw,bgkhw->bgchw", nodes, weights), "b g c h w -> b (g c) h w")
    with backend(path):
        return aggregate(x, offsets, weights, dilation)


def _cases(batch, dtype, device):
    """(name, function of (path, *inputs), leaf inputs, bytes of the feature maps, walks, weights and tables that a
    fused forward and backward must read and write at least, the paths to time). Half types run as the models run
    them: under autocast, the Linears' outputs (q, k, v, walks) in that type, the tables and the softmax's attention
    weights in float32."""
    size = torch.finfo(dtype).bits // 8
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    for stage, (side, heads) in enumerate(TINY_STAGES, 1):
        C = heads * HEAD_DIM
        qkv = torch.randn(batch, side, side, 3 * C, dtype=dtype, device=device, requires_grad=True)  # the Linear's
        walks = torch.randn(batch, side, side, heads, 2 * K_NODES, dtype=dtype, device=device, requires_grad=True)
        tables = [(torch.randn(side + K_NODES - 1, HEAD_DIM, device=device) * HEAD_DIM ** -0.5).requires_grad_()
                  for _ in ("width", "height")]

        def layer_attention(path, qkv, walks, width, height, heads=heads):
            with autocast:
                if path == "fused":
                    with backend("kernel"):
                        out = attention(rearrange(qkv, "b h w c -> b (h w) c"),
                                        rearrange(walks, "b h w g o -> b (h w) g o"), width, height, qkv.shape[1:3],
                                        heads, HEAD_DIM ** -0.5)  # (B, N, C)
                    return rearrange(out, "b (h w) c -> b c h w", w=qkv.shape[2])
                q, k, v = rearrange(qkv, "b h w (three c) -> three b c h w", three=3)  # views, each (B, C, H, W)
                return _attention(path, q, k, v, rearrange(walks, "b h w g o -> b (g o) h w"), width, height, heads)

        features, walk_bytes = batch * side * side * C * size, walks.numel() * size
        table_bytes = sum(t.numel() * t.element_size() for t in tables)
        # forward: q, k, v, walks, tables in, out; backward: those and grad out in, their five grads out
        moved = 2 * (4 * features + walk_bytes + table_bytes) + (3 * features + walk_bytes + table_bytes)
        yield (f"DGMN2-T stage {stage}: {side}x{side}x({heads}x{HEAD_DIM})", layer_attention, (qkv, walks, *tables),
               moved, PATHS)
    B, (C, side, G, dilation) = _dgmn_batch(batch), DGMN_SETTING.values()
    x = torch.randn(B, C, side, side, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    offsets = DGMN_WALK_SCALE * torch.randn(B, 2 * K_NODES, side, side, dtype=dtype, device=device)
    weights = torch.randn(B, G, K_NODES, side, side, device=device).softmax(dim=2)  # float32, as under autocast
    features, walk_bytes = x.numel() * size, offsets.numel() * size
    weight_bytes = weights.numel() * weights.element_size()
    # forward: x, offsets, weights in, out; backward: those and grad out in, their three grads out
    moved = 2 * (2 * features + walk_bytes + weight_bytes) + (features + walk_bytes + weight_bytes)

    def message(path, x, offsets, weights):
        with autocast:
            return _message(path, x, offsets, weights, dilation)

    yield (f"DGMN: {side}x{side}x{C}, G = {G}, dilation {dilation}", message,
           tuple(t.requires_grad_() for t in (x, offsets, weights)), moved, PATHS[:3])  # no fused op for DGMN


@contextlib.contextmanager
def _quiet_stderr():
    """Send the process's stderr to /dev/null for a while: the CPU profiler prints start and stop lines there."""
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _measure(fn, device, repeats):
    """Median seconds of fn() and its peak memory above what was allocated before. CUDA: the allocator's peak.
    CPU: the running sum of the profiler's allocation and free records (every aten op, those inside the kernels'
    C++ too), taken in a separate call so that profiling does not slow the timed ones."""
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
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        fn()
    records = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    return statistics.median(times), max(itertools.accumulate(bytes_ for _, bytes_ in records))


def _copy_bandwidth(device, size=2 ** 30):
    """Bytes a device-to-device copy moves per second (read and write counted), measured: the bandwidth bound."""
    import time
    source, target = (torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2))
    target.copy_(source)
    torch.cuda.synchronize()
    copies, start = 10, time.perf_counter()
    for _ in range(copies):
        target.copy_(source)
    torch.cuda.synchronize()
    return copies * 2 * size / (time.perf_counter() - start)


def _benchmark():
    import argparse
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description="The reference, the grid_sample way, the composed kernels and (for "
                                                 "DGMN2) the fused attention op at DGMN2-Tiny's and DGMN's shapes: "
                                                 "time and memory, forward and backward.")
    parser.add_argument("--batch", type=int, default=64 if cuda else 8,
                        help="images (DGMN2 rows; the DGMN row uses batch / 8); default 64 on CUDA, 8 on CPU")
    parser.add_argument("--dtype", default="bfloat16" if cuda else "float32",
                        choices=["float32", "bfloat16", "float16"], help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row (the median is printed)")
    args = parser.parse_args()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, args.dtype)
    where = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    bandwidth = _copy_bandwidth(device) if cuda else None
    print(f"{where}, {args.dtype}{' under autocast' if dtype != torch.float32 else ''}, batch {args.batch} (DGMN "
          f"row: {_dgmn_batch(args.batch)}); median of {args.repeats}; peak memory above the inputs" +
          (f"; bandwidth bound: the least bytes of a fused forward and backward over the measured device-to-device "
           f"copy, {bandwidth / 1e12:.2f} TB/s" if cuda else "") + "\n")
    print("| shape | path | forward ms | fwd+bwd ms | fwd peak MB | fwd+bwd peak MB |" +
          (" least MB moved | bound ms | fwd+bwd / bound |" if cuda else ""))
    print("|---|---|---|---|---|---|" + ("---|---|---|" if cuda else ""))
    summary = []
    for name, fn, inputs, moved, paths in _cases(args.batch, dtype, device):
        grad = torch.randn_like(fn("torch", *inputs))
        measured = {}
        for path in paths:
            with torch.no_grad():
                fwd, fwd_mem = _measure(lambda: fn(path, *inputs), device, args.repeats)
            both, both_mem = _measure(lambda: torch.autograd.grad(fn(path, *inputs), inputs, grad), device,
                                      args.repeats)
            measured[path] = both, both_mem
            row = f"| {name} | {path} | {fwd * 1e3:.2f} | {both * 1e3:.2f} | {fwd_mem / 2**20:.0f} | " \
                  f"{both_mem / 2**20:.0f} |"
            if cuda:
                row += f" {moved / 2**20:.0f} | {moved / bandwidth * 1e3:.3f} | {both * bandwidth / moved:.1f}x |"
            print(row, flush=True)
        (ref_t, _), (peer_t, peer_m), (ker_t, ker_m) = (measured[p] for p in PATHS[:3])
        best_t, best_m = measured.get("fused", measured["kernel"])
        bound = f" ({best_t * bandwidth / moved:.1f}x the bandwidth bound)" if cuda else ""
        head = f"kernel path fwd+bwd {ker_t * 1e3:.2f} ms{bound}"
        if "fused" in measured:
            head = f"fused op fwd+bwd {best_t * 1e3:.2f} ms{bound}, {ker_t / best_t:.2f}x faster than the composed " \
                   f"kernel path ({ker_t * 1e3:.2f} ms)"
        summary.append(f"{name}: {head}, {ref_t / best_t:.1f}x faster than the torch reference, {peer_t / best_t:.1f}x "
                       f"faster than grid_sample with {peer_m / max(best_m, 1):.1f}x less memory")
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    _benchmark()
