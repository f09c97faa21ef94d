"""The test suite: python -m pytest test_all.py

One section per file. Tests check each computation against an independent one (F.unfold, F.grid_sample,
torchvision.ops.deform_conv2d, explicit indexing, finite differences) and the sampler's two paths against each
other. On CPU the sampler's kernel path is sampler_cuda.cu compiled by the host compiler; GPU tests skip
without a GPU.
"""

import argparse
import colorsys
import contextlib
import ctypes
import dataclasses
import functools
import io
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from einops import rearrange
from torch.optim.optimizer import register_optimizer_step_post_hook
from torchvision.ops import deform_conv2d
from torchvision.transforms import v2

import detection
import deformable_detr
import dgmn
import dgmn2
import matching
import sparse_rcnn
import sampler
import segmentation
import train_cityscapes
import train_imagenet

try:  # only train_coco.py and its tests need pycocotools (COCO evaluation): the model files' tests run without it
    import train_coco
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
except ModuleNotFoundError as missing:
    if missing.name != "pycocotools":
        raise
    train_coco = COCO = COCOeval = None

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
NEEDS_PYCOCOTOOLS = pytest.mark.skipif(train_coco is None, reason="train_coco.py needs pycocotools")
MODEL_FILES = ["sampler.py", "sampler_cuda.cu", "dgmn.py", "dgmn2.py", "segmentation.py", "detection.py",
               "deformable_detr.py", "sparse_rcnn.py", "matching.py"]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def parameter_count(module):
    return sum(p.numel() for p in module.parameters())


# ====================================================================================================================
# sampler.py: Eq. 4-5, the torch reference and the kernels


@pytest.fixture(params=["torch", "kernel"])
def path(request):
    """Each test taking `path` runs on the reference and on the kernel (on CPU, its host build)."""
    with sampler.backend(request.param):
        yield request.param


@pytest.fixture
def exact_cuda():
    """Float32 on the GPU without TF32 (cuDNN's convolutions use it by default), for comparisons at 1e-4."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def walks(B, K, H, W, spread=3, dtype=torch.float64, seed=0, device="cpu", groups=1):
    """Random walks (B, 2K groups, H, W) whose fractional parts lie in [0.1, 0.9]: nodes never sit on the integer
    kinks of bilinear interpolation, where finite differences would straddle two slopes."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randint(-spread, spread + 1, (B, 2 * K * groups, H, W), generator=g)
    return (whole + 0.1 + 0.8 * torch.rand(B, 2 * K * groups, H, W, generator=g)).to(dtype=dtype, device=device)


def grid_sample_nodes(x, offsets, dilation, offset_groups=1):
    """The nodes through F.grid_sample, one walk group and one node at a time: pixel p sits at (2p + 1) / size - 1.
    (B, C, H, W), (B, 2K Go, H, W) -> (B, C, K, H, W)."""
    _, _, H, W = x.shape
    ks = math.isqrt(offsets.shape[1] // (2 * offset_groups))
    ys = torch.arange(H, dtype=x.dtype).view(H, 1)
    xs = torch.arange(W, dtype=x.dtype).view(1, W)
    per_group = []
    for channels, walk in zip(x.chunk(offset_groups, dim=1), offsets.chunk(offset_groups, dim=1)):
        nodes = []
        for k in range(ks * ks):
            i, j = divmod(k, ks)
            py = ys + (i - ks // 2) * dilation + walk[:, 2 * k]
            px = xs + (j - ks // 2) * dilation + walk[:, 2 * k + 1]
            grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], dim=-1)  # (B, H, W, 2), x first
            nodes.append(F.grid_sample(channels, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
        per_group.append(torch.stack(nodes, dim=2))
    return torch.cat(per_group, dim=1)  # (B, C, K, H, W)


@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("dilation", [1, 2, 3])
def test_zero_offsets_equal_unfold(path, dilation, ks):
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    nodes = sampler.sample(x, torch.zeros(2, 2 * ks * ks, 5, 7, dtype=torch.float64), dilation)
    unfolded = F.unfold(x, ks, dilation=dilation, padding=dilation * (ks // 2)).view(2, 3, ks * ks, 5, 7)
    torch.testing.assert_close(nodes, unfolded, rtol=0, atol=0)


def test_integer_offsets_are_shifted_reads(path):
    B, C, H, W, dilation, margin = 2, 3, 6, 5, 2, 8
    x = torch.randn(B, C, H, W, dtype=torch.float64)
    shift = torch.randint(-3, 4, (B, 18, H, W))
    padded = F.pad(x, (margin,) * 4).permute(0, 2, 3, 1)  # (B, H + 2m, W + 2m, C), zeros around the map
    b, y, x_ = torch.arange(B).view(B, 1, 1), torch.arange(H).view(1, H, 1), torch.arange(W).view(1, 1, W)
    expected = torch.stack([padded[b, y + (k // 3 - 1) * dilation + shift[:, 2 * k] + margin,
                                   x_ + (k % 3 - 1) * dilation + shift[:, 2 * k + 1] + margin]
                            for k in range(9)], dim=1).permute(0, 4, 1, 2, 3)  # (B, C, K, H, W)
    torch.testing.assert_close(sampler.sample(x, shift.double(), dilation), expected, rtol=0, atol=0)


def test_far_outside_reads_zero(path):
    B, C, H, W, G = 2, 4, 5, 6, 2
    x, q = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W)
    sign = torch.randint(0, 2, (B, 18, H, W)) * 2 - 1
    offsets = (1000.5 * sign).float().requires_grad_()
    weights = torch.rand(B, G, 9, H, W)
    outputs = [sampler.sample(x, offsets), sampler.aggregate(x, offsets, weights), sampler.dot(q, x, offsets, G)]
    for out in outputs:
        assert out.abs().max() == 0
    grad_x, grad_offsets = torch.autograd.grad(sum(o.sum() for o in outputs), (x, offsets))
    assert grad_x.abs().max() == 0 and grad_offsets.abs().max() == 0


def test_a_non_finite_walk_reads_nan_at_its_query_only(path):
    """NaN and infinite walks give NaN where they are used, so that a NaN check sees them; nothing else changes."""
    B, C, H, W, G = 2, 8, 5, 6, 2
    x, q = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W)
    offsets = walks(B, 9, H, W, dtype=torch.float32, groups=G)
    weights = torch.rand(B, G, 9, H, W)
    clean = [sampler.aggregate(x, offsets, weights, offset_groups=G), sampler.dot(q, x, offsets, G, offset_groups=G)]
    broken = offsets.clone()
    broken[0, 2 * 9 + 2 * 4, 1, 2] = math.nan      # walk group 1, node 4, query (1, 2) of image 0: its dy
    broken[1, 1, 3, 0] = math.inf                  # walk group 0, node 0, query (3, 0) of image 1: its dx
    broken[1, 2 * 9 + 2 * 2 + 1, 0, 4] = math.nan  # walk group 1, node 2, query (0, 4) of image 1: its dx
    out = sampler.aggregate(x, broken, weights, offset_groups=G)
    logits = sampler.dot(q, x, broken, G, offset_groups=G)
    nan_out = torch.zeros_like(out, dtype=torch.bool)
    nan_out[0, 4:, 1, 2] = nan_out[1, :4, 3, 0] = nan_out[1, 4:, 0, 4] = True  # the walk group's channels there
    assert torch.equal(out.isnan(), nan_out)
    torch.testing.assert_close(out[~nan_out], clean[0][~nan_out])
    nan_logits = torch.zeros_like(logits, dtype=torch.bool)
    nan_logits[0, 1, 4, 1, 2] = nan_logits[1, 0, 0, 3, 0] = nan_logits[1, 1, 2, 0, 4] = True
    assert torch.equal(logits.isnan(), nan_logits)
    torch.testing.assert_close(logits[~nan_logits], clean[1][~nan_logits])
    broken.requires_grad_()
    gradients = torch.autograd.grad(sampler.aggregate(x, broken, weights, offset_groups=G).nansum(), (x, broken))
    assert all(g.isfinite().all() for g in gradients)  # no exception, no NaN, on either path


def test_a_non_finite_walk_gives_its_weights_a_nan_gradient(path):
    """The weight of a node whose walk is NaN or infinite gets a NaN gradient (the node reads NaN), and no other
    weight does: aggregate's weights' gradient is NaN exactly at that query's node, in the groups following the walk."""
    B, C, H, W, G, Go = 2, 8, 5, 6, 4, 2
    x, weights = torch.randn(B, C, H, W), torch.rand(B, G, 9, H, W, requires_grad=True)
    offsets = walks(B, 9, H, W, dtype=torch.float32, groups=Go)
    offsets[0, 2 * 9 + 2 * 4, 1, 2] = math.nan  # walk group 1, node 4, query (1, 2) of image 0: its dy
    offsets[1, 1, 3, 0] = math.inf              # walk group 0, node 0, query (3, 0) of image 1: its dx
    out = sampler.aggregate(x, offsets, weights, offset_groups=Go)
    grad, = torch.autograd.grad(out, weights, torch.randn(out.shape))
    nan = torch.zeros_like(grad, dtype=torch.bool)
    nan[0, 2:, 4, 1, 2] = nan[1, :2, 0, 3, 0] = True  # groups 2, 3 follow walk group 1; groups 0, 1 walk group 0
    assert torch.equal(grad.isnan(), nan)


@pytest.mark.parametrize("dilation", [1, 2])
def test_sample_matches_grid_sample(path, dilation):
    x = torch.randn(2, 6, 5, 6, dtype=torch.float64)
    for offset_groups in (1, 3):
        offsets = walks(2, 9, 5, 6, spread=4, groups=offset_groups)
        torch.testing.assert_close(sampler.sample(x, offsets, dilation, offset_groups),
                                   grid_sample_nodes(x, offsets, dilation, offset_groups))


def test_aggregate_with_a_fixed_kernel_matches_deform_conv2d(path):
    B, C, H, W, G, dilation = 2, 6, 5, 7, 3, 2
    x, offsets = torch.randn(B, C, H, W, dtype=torch.float64), walks(B, 9, H, W)
    kernel = torch.randn(G, 9, dtype=torch.float64)  # one 3x3 filter per group, the same at every pixel
    weights = kernel.view(1, G, 9, 1, 1).expand(B, G, 9, H, W)
    depthwise = kernel.repeat_interleave(C // G, dim=0).view(C, 1, 3, 3)
    expected = deform_conv2d(x, offsets, depthwise, padding=dilation, dilation=dilation)
    torch.testing.assert_close(sampler.aggregate(x, offsets, weights, dilation), expected)


@pytest.mark.parametrize("G, Go", [(3, 1), (3, 3), (4, 2)])
def test_aggregate_with_per_pixel_weights_matches_modulated_deform_conv2d(path, G, Go):
    """DCNv2 with Go offset groups: a walk and a per-pixel mask per offset group, here times a fixed filter per
    channel group, is aggregate with weights filter[g, k] * mask[o(g), k]."""
    B, C, H, W, dilation = 2, 12, 5, 7, 2
    x, offsets = torch.randn(B, C, H, W, dtype=torch.float64), walks(B, 9, H, W, groups=Go)
    mask, kernel = torch.randn(B, Go, 9, H, W, dtype=torch.float64), torch.randn(G, 9, dtype=torch.float64)
    weights = mask.repeat_interleave(G // Go, dim=1) * kernel.view(1, G, 9, 1, 1)  # (B, G, K, H, W)
    depthwise = kernel.repeat_interleave(C // G, dim=0).view(C, 1, 3, 3)
    expected = deform_conv2d(x, offsets, depthwise, padding=dilation, dilation=dilation, mask=mask.flatten(1, 2))
    torch.testing.assert_close(sampler.aggregate(x, offsets, weights, dilation, offset_groups=Go), expected)


@pytest.mark.parametrize("G, Go", [(3, 1), (6, 3)])
def test_dot_matches_grid_sample_inner_products(path, G, Go):
    B, C, H, W = 2, 12, 5, 7
    q, x = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    offsets = walks(B, 9, H, W, groups=Go)
    nodes = grid_sample_nodes(x, offsets, 1, Go).view(B, G, C // G, 9, H, W)
    expected = (q.view(B, G, C // G, 1, H, W) * nodes).sum(2)
    torch.testing.assert_close(sampler.dot(q, x, offsets, G, offset_groups=Go), expected)


@pytest.mark.parametrize("op", ["sample", "aggregate", "dot"])
@pytest.mark.parametrize("offset_groups", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_gradcheck(path, op, offset_groups):
    B, C, H, W, G, dilation = 1, 4, 4, 5, 2, 1  # a batch of one: 76 (one walk group) or 140 points on the border
    x, q = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    offsets = walks(B, 9, H, W, groups=offset_groups)
    weights = torch.randn(B, G, 9, H, W, dtype=torch.float64)
    rows, cols = sampler._node_positions(rearrange(offsets, "b (o k) h w -> (b o) k h w", o=offset_groups), dilation)
    on_border = ((rows > -1) & (rows < 0)) | ((rows > H - 1) & (rows < H)) | \
                ((cols > -1) & (cols < 0)) | ((cols > W - 1) & (cols < W))
    beyond = (rows <= -1) | (rows >= H) | (cols <= -1) | (cols >= W)
    assert on_border.any() and beyond.any() and (~beyond).any()
    call, inputs = {
        "sample": (lambda x, o: sampler.sample(x, o, dilation, offset_groups), (x, offsets)),
        "aggregate": (lambda x, o, w: sampler.aggregate(x, o, w, dilation, offset_groups), (x, offsets, weights)),
        "dot": (lambda q, x, o: sampler.dot(q, x, o, G, dilation, offset_groups), (q, x, offsets)),
    }[op]
    assert torch.autograd.gradcheck(call, tuple(t.requires_grad_() for t in inputs))


def outputs_and_grads(fn, inputs, seed=0):
    """fn(*inputs) and the gradients of a random projection of it with respect to every input."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16()  # exact in every dtype here
    return [out, *torch.autograd.grad(out, inputs, g.to(out.device, out.dtype))]


def odd_inputs(C, G, Go, dtype, device, layout):
    """Odd sizes, in one of several layouts: "strided" (x channels-last, q transposed, offsets and weights permuted:
    nothing contiguous), "views" (q, x as slices of one channels-last tensor, x starting one element in: unaligned
    for vector loads) or "broadcast" (x and weights expanded, with stride 0)."""
    B, H, W, K = 3, 7, 9, 9
    offsets = walks(B, K, H, W, dtype=dtype, device=device, seed=1, groups=Go)
    weights = torch.randn(B, H, W, G, K, dtype=dtype, device=device).permute(0, 3, 4, 1, 2)
    if layout == "strided":
        x = torch.randn(B, C, H, W, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
        q = torch.randn(B, C, W, H, dtype=dtype, device=device).transpose(2, 3)
        offsets = offsets.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert not any(t.is_contiguous() for t in (x, q, offsets, weights))
    elif layout == "views":
        tokens = torch.randn(B, H, W, 2 * C + 1, dtype=dtype, device=device)
        q, x = tokens[..., :C].permute(0, 3, 1, 2), tokens[..., C + 1:].permute(0, 3, 1, 2)
    else:
        x = torch.randn(1, C, H, W, dtype=dtype, device=device).expand(B, -1, -1, -1)
        q = torch.randn(B, C, H, W, dtype=dtype, device=device)
        weights = torch.randn(1, G, K, 1, 1, dtype=dtype, device=device).expand(B, -1, -1, H, W)
    return x, q, offsets, weights


def both_paths(fn, inputs):
    results = []
    for name in ("torch", "kernel"):
        with sampler.backend(name):
            results.append(outputs_and_grads(fn, inputs))
    return results


def every_function(x, q, offsets, weights, dilation, groups, offset_groups):
    """sample, aggregate and dot, each as (a function of its tensors, those tensors)."""
    return [(lambda x, o: sampler.sample(x, o, dilation, offset_groups), (x, offsets)),
            (lambda x, o, w: sampler.aggregate(x, o, w, dilation, offset_groups), (x, offsets, weights)),
            (lambda q, x, o: sampler.dot(q, x, o, groups, dilation, offset_groups), (q, x, offsets))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, G, Go", [(12, 1, 1), (12, 4, 2), (5, 5, 5), (6, 2, 2), (40, 2, 1), (144, 2, 2)])
@pytest.mark.parametrize("layout", ["strided", "views", "broadcast"])
def test_kernel_matches_reference(device, dtype, C, G, Go, layout):
    """Values and gradients of every function, C / G of 12, 3, 1 (G = C), 20 and 72 channels, walk groups."""
    x, q, offsets, weights = odd_inputs(C, G, Go, dtype, device, layout)
    for fn, inputs in every_function(x, q, offsets, weights, 2, G, Go):
        reference, kernel = both_paths(fn, inputs)
        for a, b in zip(kernel, reference):
            if dtype == torch.float64:
                torch.testing.assert_close(a, b)
            else:  # sums of up to 72 x 9 x 4 terms added in other orders (FMA, vector partial sums): within 16 ulps
                # of the tensor's largest (at 40 seeds, up to 1.1e-5 of values near 60, float32's fixed atol)
                torch.testing.assert_close(a, b, rtol=1.3e-6, atol=2e-6 * b.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks", [1, 5])
def test_kernel_matches_reference_at_other_kernel_sizes(device, ks):
    """The grids other than 3 x 3 (K = 1 and 25, dilation 3, two walk groups) at fractional walks: values and
    gradients in float64."""
    B, C, G, Go, H, W, K = 2, 8, 4, 2, 6, 7, ks * ks
    g = torch.Generator().manual_seed(ks)
    x, q = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(device) for _ in range(2))
    offsets = walks(B, K, H, W, seed=ks, groups=Go).to(device)
    weights = torch.randn(B, G, K, H, W, generator=g, dtype=torch.float64).to(device)
    for fn, inputs in every_function(x, q, offsets, weights, 3, G, Go):
        reference, kernel = both_paths(fn, inputs)
        for a, b in zip(kernel, reference):
            torch.testing.assert_close(a, b)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, shift", [(1, 0), (2, 0), (2, 1)])
def test_cuda_vector_lanes_match_reference(exact_cuda, dtype, G, shift):
    """A problem large enough for the GPU's 16-byte lanes (the small ones above take single channels), with q, k, v
    as slices of one token tensor like DGMN2's; shift 1 starts them one element in, off the 16-byte grid."""
    B, H, W, C = 16, 56, 56, 64
    tokens = torch.randn(B, H, W, 3 * C + shift, device="cuda", dtype=dtype)
    q, k, v = (tokens[..., shift + i * C:shift + (i + 1) * C].permute(0, 3, 1, 2) for i in range(3))
    offsets = (2 * torch.randn(B, H, W, G, 18, device="cuda")).to(dtype).flatten(3).permute(0, 3, 1, 2)
    assert q.data_ptr() % 16 == shift * tokens.element_size()

    def attention(q, k, v, offsets):
        attn = sampler.dot(q, k, offsets, G, offset_groups=G).float().softmax(dim=2)
        return sampler.aggregate(v, offsets, attn, offset_groups=G)

    reference, kernel = both_paths(attention, (q, k, v, offsets))
    scale = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(kernel, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=scale, atol=scale * b.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_round_once(path, device, dtype):
    """Half inputs are computed in float32 and rounded once: results and gradients equal the float32 computation
    on the same (rounded) inputs to within one rounding."""
    B, C, H, W, G = 2, 32, 6, 7, 2
    x, q = (torch.randn(B, C, H, W, device=device).to(dtype) for _ in range(2))
    offsets, weights = walks(B, 9, H, W, device=device).to(dtype), torch.rand(B, G, 9, H, W, device=device).to(dtype)
    calls = [(lambda x, o, w: sampler.aggregate(x, o, w), (x, offsets, weights)),
             (lambda q, x, o: sampler.dot(q, x, o, G), (q, x, offsets)),
             (lambda x, o: sampler.sample(x, o), (x, offsets))]
    eps = torch.finfo(dtype).eps
    for fn, inputs in calls:
        half = outputs_and_grads(fn, inputs)
        full = outputs_and_grads(fn, [t.float() for t in inputs])
        for h, f in zip(half, full):
            assert h.dtype == dtype
            torch.testing.assert_close(h.float(), f, rtol=eps, atol=eps * f.abs().max().item() / 64)


def test_float32_inputs_are_computed_in_float32_under_autocast(path):
    """The sampler turns an enclosing autocast off: float32 inputs under bf16 autocast give the float32 results (the
    reference's einsums would otherwise run in bf16: 2% off)."""
    B, C, H, W, G = 2, 32, 6, 7, 2
    x, q = torch.randn(B, C, H, W), torch.randn(B, C, H, W)
    offsets, weights = walks(B, 9, H, W, dtype=torch.float32), torch.rand(B, G, 9, H, W)
    calls = [lambda: sampler.aggregate(x, offsets, weights), lambda: sampler.dot(q, x, offsets, G)]
    for call in calls:
        plain = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(call(), plain, rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise_one_clear_error():
    x, q = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    offsets, weights = torch.zeros(2, 18, 5, 6), torch.rand(2, 2, 9, 5, 6)
    cases = [
        (lambda: sampler.sample(x[0], offsets), r"x must be a floating-point \(B, C, H, W\)"),
        (lambda: sampler.sample(x.long(), offsets), "x must be a floating-point"),
        (lambda: sampler.sample(x, offsets[:, :17]),
         r"offsets must have shape \(B, 2K Go, H, W\) = \(2, 2K x 1, 5, 6\)"),
        (lambda: sampler.sample(x, offsets[:, :8]), r"got \(2, 8, 5, 6\)"),  # K = 4: no odd square grid
        (lambda: sampler.sample(x, offsets[..., :5]), "offsets must have shape"),
        (lambda: sampler.sample(x, offsets, offset_groups=2), r"= \(2, 2K x 2, 5, 6\) .* got \(2, 18, 5, 6\)"),
        (lambda: sampler.sample(x, offsets.repeat(1, 3, 1, 1), offset_groups=3),
         "offset_groups = 3 must divide the 4 channels"),
        (lambda: sampler.sample(x, offsets, offset_groups=0), "offset_groups must be a positive int, got 0"),
        (lambda: sampler.sample(x, offsets, dilation=0), "dilation must be a positive int"),
        (lambda: sampler.sample(x, offsets.to("meta")), "offsets is on meta but x is on cpu"),
        (lambda: sampler.aggregate(x, offsets, weights[:, :, :8]), r"weights must have shape \(B, G, K, H, W\)"),
        (lambda: sampler.aggregate(x, offsets, torch.rand(2, 3, 9, 5, 6)), "G dividing C = 4"),
        (lambda: sampler.aggregate(x, offsets.repeat(1, 4, 1, 1), weights, offset_groups=4),
         "offset_groups = 4 must divide the 2 groups"),
        (lambda: sampler.dot(q[:, :3], x, offsets), "q must have x's shape"),
        (lambda: sampler.dot(q.double(), x, offsets), "q must have x's shape .* and dtype"),
        (lambda: sampler.dot(q, x, offsets, groups=3), "groups must be a positive int dividing C = 4"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="backend must be one of"):
        with sampler.backend("cudnn"):
            pass


def test_the_compiled_entry_points_check_every_tensor():
    """Direct calls of torch.ops.dgmn_sampler.* (no Python checks before them) get one line naming the tensor."""
    extension = sampler._extension("cpu")
    x, offsets, weights = torch.randn(2, 4, 5, 6), torch.zeros(2, 18, 5, 6), torch.rand(2, 2, 9, 5, 6)
    cases = [
        (lambda: extension.aggregate(x.to("meta"), offsets, weights, 1, 1), "x is on meta, this build takes CPU"),
        (lambda: extension.aggregate(x, offsets.to("meta"), weights, 1, 1), "offsets is on meta"),
        (lambda: extension.aggregate(x, offsets, weights.to("meta"), 1, 1), "weights is on meta"),
        (lambda: extension.aggregate(x, offsets, weights.long(), 1, 1), "weights must be floating point, got Long"),
        (lambda: extension.aggregate(x, offsets.int(), weights, 1, 1), "offsets must be a floating-point"),
        (lambda: extension.aggregate(x, offsets, weights[:, :, :, :4], 1, 1), r"weights must have shape \[2, 2, 9"),
        (lambda: extension.aggregate(x, offsets[:1], weights, 1, 1), r"offsets must have shape \[2, 18, 5, 6\]"),
        (lambda: extension.aggregate(x, offsets.repeat(1, 4, 1, 1), weights, 4, 1),
         r"walk groups \(4\) must divide groups \(2\)"),
        (lambda: extension.dot(x.double(), x, offsets, 2, 1, 1), "q must be Float like x, got Double"),
        (lambda: extension.dot(x[:, :2], x, offsets, 2, 1, 1), r"q must have shape \[2, 4, 5, 6\]"),
        (lambda: extension.backward(x, offsets, weights, x[:1], 1, 1, True, True, True), "v must have shape"),
        (lambda: extension.backward(x, offsets, weights, x, 1, 0, True, True, True), "dilation must be positive"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message) as error:
            call()
        assert "\n" not in str(error.value).strip()


def test_walk_predictor_starts_uniform_and_learns(path):
    walk = sampler.WalkPredictor(6, dilation=2).double()
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    offsets = walk(x)
    assert walk.weight.abs().max() == walk.bias.abs().max() == 0  # zeros, not whatever the memory held
    assert offsets.shape == (2, 18, 7, 8) and offsets.abs().max() == 0
    torch.testing.assert_close(sampler.sample(x, offsets, 2), F.unfold(x, 3, dilation=2, padding=2).view(2, 6, 9, 7, 8))
    sampler.aggregate(x, offsets, torch.rand(2, 3, 9, 7, 8, dtype=torch.float64), 2).square().sum().backward()
    assert walk.weight.grad.abs().max() > 0 and walk.bias.grad.abs().max() > 0


def test_custom_ops_pass_opcheck():
    B, C, H, W, G, Go = 2, 4, 5, 6, 2, 2
    x, q = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W, requires_grad=True)
    offsets = walks(B, 9, H, W, dtype=torch.float32, groups=Go).requires_grad_()
    weights = torch.rand(B, G, 9, H, W, requires_grad=True)
    for op, args in [(sampler._aggregate_kernel, (x, offsets, weights, Go, 1)),
                     (sampler._dot_kernel, (q, x, offsets, G, Go, 2)),
                     (sampler._backward_kernel, (x.detach(), offsets.detach(), weights.detach(), q.detach(), Go, 1,
                                                 True, True, True)),
                     (sampler._backward_kernel, (x.detach(), offsets.detach(), weights.detach(), q.detach(), Go, 1,
                                                 False, True, False))]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_double_backward_says_it_is_not_supported():
    x, offsets, weights = torch.randn(1, 2, 3, 4, requires_grad=True), walks(1, 9, 3, 4), torch.rand(1, 1, 9, 3, 4)
    with sampler.backend("kernel"):
        grad_x, = torch.autograd.grad(sampler.aggregate(x, offsets, weights).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="the kernel path has no double backward"):
            grad_x.sum().backward()
    with sampler.backend("torch"):  # the reference has one
        grad_x, = torch.autograd.grad(sampler.aggregate(x, offsets, weights).square().sum(), x, create_graph=True)
        grad_x.sum().backward()


def test_the_host_backward_is_deterministic():
    B, C, H, W = 2, 8, 6, 7
    inputs = torch.randn(B, C, H, W), torch.randn(B, C, H, W), walks(B, 9, H, W, dtype=torch.float32)
    torch.use_deterministic_algorithms(True)
    try:
        with sampler.backend("kernel"):
            first, second = (outputs_and_grads(lambda q, x, o: sampler.dot(q, x, o, 2), inputs) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_the_host_backward_scatters_without_losing_an_update():
    """Every walk ends on one of 3 pixels, so the whole backward scatters into them from every thread. Small
    non-negative integers in float64 make each sum exact in any order: a gradient equals the reference's exactly, run
    after run, unless two threads' read-modify-writes of one place interleave (an update lost)."""
    B, C, H, W, G, ks = 1, 64, 48, 48, 2, 3  # one image: every thread's share of it scatters into the same 3 pixels
    K = ks * ks
    g = torch.Generator().manual_seed(0)

    def integers(*shape):
        return torch.randint(0, 5, shape, generator=g).double()

    q, weights = integers(B, C, H, W), integers(B, G, K, H, W)
    targets = torch.tensor([[0, 0], [21, 37], [47, 5]])[torch.randint(0, 3, (B, K, H, W), generator=g)]
    grid = torch.stack(torch.meshgrid(torch.arange(ks) - ks // 2, torch.arange(ks) - ks // 2, indexing="ij"), -1)
    pixels = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1)  # (H, W, 2)
    offsets = targets - grid.view(K, 1, 1, 2) - pixels  # (B, K, H, W, 2): node k of every pixel lands on its target
    offsets = rearrange(offsets, "b k h w two -> b (k two) h w").double()  # (y, x) pairs, as the sampler reads them
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 4))  # more threads than cores interleave too
    try:
        for fn, out_shape in [(lambda x: sampler.aggregate(x, offsets, weights), (B, C, H, W)),
                              (lambda x: sampler.dot(q, x, offsets, groups=G), (B, G, K, H, W))]:
            x, grad_out, grads = integers(B, C, H, W), integers(*out_shape), []
            for name in ["torch"] + ["kernel"] * 8:
                with sampler.backend(name):
                    leaf = x.clone().requires_grad_()
                    grads.append(torch.autograd.grad(fn(leaf), leaf, grad_out)[0])
            assert grads[0].max() > 1000  # many updates landed on each target
            assert all(torch.equal(kernel, grads[0]) for kernel in grads[1:])
    finally:
        torch.set_num_threads(threads)


@CUDA
def test_deterministic_mode_refuses_the_cuda_atomics():
    x = torch.randn(2, 8, 6, 7, device="cuda", requires_grad=True)
    offsets, weights = walks(2, 9, 6, 7, dtype=torch.float32, device="cuda"), torch.rand(2, 1, 9, 6, 7, device="cuda")
    out = sampler.aggregate(x, offsets, weights)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="dgmn_sampler::backward .* does not have a deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.slow
def test_torch_compile_traces_the_sampler(path):
    B, C, H, W, G = 2, 8, 5, 6, 2

    def attention(q, k, v, offsets):
        return sampler.aggregate(v, offsets, sampler.dot(q, k, offsets, G, offset_groups=G).softmax(dim=2),
                                 offset_groups=G)

    inputs = [torch.randn(B, C, H, W) for _ in range(3)] + [walks(B, 9, H, W, dtype=torch.float32, groups=G)]
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    for a, b in zip(outputs_and_grads(compiled, inputs), outputs_and_grads(attention, inputs)):
        torch.testing.assert_close(a, b)


def test_the_kernel_is_the_default_where_it_builds():
    x = torch.randn(2, 4, 5, 6)
    assert sampler._use_kernel(x) and not sampler._use_kernel(x.to("meta"))
    with sampler.backend("torch"):
        assert not sampler._use_kernel(x)


@pytest.fixture
def failed_build(monkeypatch):
    """The kernels' build fails, as without a compiler; yields aggregate's inputs (x, offsets, weights)."""
    def no_compiler(device_type):
        raise RuntimeError("simulated compiler error")

    monkeypatch.setattr(sampler, "_extension", no_compiler)
    sampler._build.cache_clear()
    yield torch.randn(1, 2, 3, 4), walks(1, 9, 3, 4, dtype=torch.float32), torch.rand(1, 1, 9, 3, 4)
    sampler._build.cache_clear()


def test_a_failed_build_warns_once_and_falls_back(failed_build):
    with pytest.warns(UserWarning, match="could not build sampler_cuda.cu for cpu .*using the torch reference"):
        out = sampler.aggregate(*failed_build)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: the second call is silent
        torch.testing.assert_close(sampler.aggregate(*failed_build), out)
    with sampler.backend("torch"):
        torch.testing.assert_close(sampler.aggregate(*failed_build), out)


def test_asking_for_the_kernel_makes_a_failed_build_an_error(failed_build):
    """DGMN_SAMPLER=kernel (what .ci/gpu exports) and backend("kernel") never fall back: the build's error is raised,
    with no warning and no reference result."""
    with sampler.backend("kernel"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler.which_path("cpu") == "kernel"
        with pytest.raises(RuntimeError, match="simulated compiler error"):
            sampler.aggregate(*failed_build)
    assert sampler.which_path("meta") == "torch"


def test_no_gpu_no_cuda_build():
    """Asked about CUDA tensors on a machine without a GPU, "auto" answers the reference, builds nothing, warns of
    nothing."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with sampler.backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler.which_path("cuda") == "torch"


@pytest.mark.slow
def test_the_environment_chooses_the_path():
    runs = [subprocess.Popen([sys.executable, "-c", "import sampler; print(sampler.which_path('cpu'))"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent,
                             env={**os.environ, "DGMN_SAMPLER": value})
            for value in ("torch", "kernel", "fast")]  # side by side: each is mostly an import of torch
    paths = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        paths.append(out.strip() or err.strip().splitlines()[-1])
    assert paths == ["torch", "kernel", "ValueError: the environment variable DGMN_SAMPLER must be one of ('auto', "
                                        "'torch', 'kernel'), got 'fast'"]


def test_the_benchmark_relative_logits_are_the_models():
    """The sampler benchmark adds Fig. 4b's term as dgmn2.RelativePosition does (symmetric rule)."""
    rel = dgmn2.RelativePosition((5, 7), 4, 9)
    q = torch.randn(2, 3, 4, 5, 7)  # (B, G, D, H, W)
    torch.testing.assert_close(sampler._relative_logits(q, rel.width, rel.height), rel(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_benchmark_paths_compute_the_same_function(dtype, monkeypatch):
    """Each row of python sampler.py times one function three or four ways: the reference, grid_sample, the kernels
    and (DGMN2's rows) the fused op agree on outputs and gradients at DGMN2-Tiny's stage 4 (also under bf16 autocast,
    as the models run) and DGMN's row, its map shrunk (the dilation kept)."""
    monkeypatch.setitem(sampler.DGMN_SETTING, "channels", 128)
    monkeypatch.setitem(sampler.DGMN_SETTING, "side", 49)
    torch.manual_seed(0)
    cases = list(sampler._cases(1, dtype, "cpu"))
    for name, fn, inputs, moved, paths in cases[3:] if dtype == torch.float32 else cases[3:4]:  # bf16: attention
        assert paths == (sampler.PATHS if name.startswith("DGMN2") else sampler.PATHS[:3])  # DGMN: no fused op
        results = []
        for path in paths:
            out = fn(path, *inputs)
            results.append([out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out))))
        assert moved > sum(t.numel() * t.element_size() for t in inputs), name
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2  # relative to the norm: bf16 rounds q, k, v and out
        for path, other in zip(paths[1:], results[1:]):
            for i, (a, b) in enumerate(zip(other, results[0])):
                # grid_sample normalises the coordinates and back: a node within a rounding of a pixel's edge can
                # land on its other side and take that side's slope, so its walks' gradient is held to no tolerance
                # (under autocast, its bf16 products leave little of that gradient, a sum that mostly cancels).
                if not (path == "grid_sample" and i == 2):
                    assert (a.float() - b.float()).norm() <= tolerance * b.float().norm(), (name, path, i)


def _cuda_home():
    """A CUDA toolkit (bin/nvcc and its headers) of torch's CUDA major version, or None and the reason."""
    from torch.utils.cpp_extension import CUDA_HOME
    if torch.version.cuda is None:
        return None, "needs a CUDA build of torch"
    on_path = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda",
                  on_path and Path(on_path).resolve().parents[1]]
    homes = [Path(c) for c in candidates if c and (Path(c) / "bin" / "nvcc").exists()
             and (Path(c) / "include" / "cuda_runtime.h").exists()]
    if not homes:
        return None, "needs nvcc"
    version = subprocess.run([homes[0] / "bin" / "nvcc", "--version"], capture_output=True, text=True).stdout
    release = re.search(r"release (\d+)", version)
    if release is None or release.group(1) != torch.version.cuda.split(".")[0]:
        return None, f"nvcc in {homes[0]} is not of torch's CUDA major version ({torch.version.cuda})"
    return str(homes[0]), ""


NVCC_CHECK = """
import sys
import torch
from torch.utils import cpp_extension
cpp_extension.load(name="dgmn_sampler_nvcc_check", sources=[sys.argv[1]], build_directory=sys.argv[2],
                   extra_cuda_cflags=["-O0", "-Xcicc", "-O0", "-Xptxas", "-O0", "--split-compile=0"],
                   is_python_module=False)
ops = ("aggregate", "dot", "backward", "attention", "attention_backward")
sys.exit([op for op in ops if not hasattr(torch.ops.dgmn_sampler_nvcc_check, op)] or None)
"""


@pytest.fixture(scope="session", autouse=True)
def nvcc_check(request, tmp_path_factory):
    """test_nvcc_compiles_the_kernel's build, started with the session when that test is selected: it compiles for most
    of a minute, beside the first tests, which leave a core idle (the host build's compiler among them). -> (the
    process building, or None, and why not)"""
    if not any(item.originalname == "test_nvcc_compiles_the_kernel" for item in request.session.items):
        yield None, "not selected"
        return
    cuda_home, why = _cuda_home()
    if cuda_home is None:
        yield None, why
        return
    env = {**os.environ, "CUDA_HOME": cuda_home,
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    folder = tmp_path_factory.mktemp("nvcc")
    build = subprocess.Popen([sys.executable, "-c", NVCC_CHECK, str(sampler._SOURCE), str(folder)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    yield build, ""
    build.kill()  # when the session ends before the test
    build.communicate()


@pytest.mark.slow
def test_nvcc_compiles_the_kernel(nvcc_check):
    """The GPU build compiles and loads (without launching anything; every op registered), so CI catches errors in
    device code. Every phase runs (front end, cicc, ptxas, host compiler) but unoptimised: a compile error does not
    depend on the level, and the check takes a third of the time (33 s against 90 s here; the sampler's own build
    keeps -O3)."""
    build, why = nvcc_check
    if build is None:
        pytest.skip(why)
    output, _ = build.communicate(timeout=900)
    assert build.returncode == 0, output[-3000:]


def test_flop_counter_counts_both_paths_alike(path):
    """The fused ops count their products as the reference's einsum does: 2 FLOPs per sampled element and channel."""
    from torch.utils.flop_counter import FlopCounterMode
    B, C, H, W = 2, 8, 5, 6
    x, offsets = torch.randn(B, C, H, W), walks(B, 9, H, W, dtype=torch.float32, groups=2)
    with FlopCounterMode(display=False) as counter:
        sampler.aggregate(x, offsets, sampler.dot(x, x, offsets, groups=2, offset_groups=2), offset_groups=2)
    assert counter.get_total_flops() == 2 * (2 * B * C * 9 * H * W)


# --------------------------------------------------------------------------------------------------------------------
# sampler.attention: DGMN2's attention as one fused op


def attention_inputs(B, H, W, G, D, dtype=torch.float64, device="cpu", layout="contiguous", seed=0):
    """qkv (B, N, 3C), walks (B, N, G, 2K), width (W + K - 1, D), height (H + K - 1, D) for attention(). Layouts:
    "contiguous" (as the Linears write them), "strided" (qkv's tokens two apart, walks permuted), "unaligned" (qkv
    a slice of a wider tensor starting one element in: off the 16-byte grid of vector loads) and "padded" (qkv the
    first 3C channels of a wider tensor: its start on that grid, its tokens' stride off it)."""
    g = torch.Generator().manual_seed(seed)
    C, K = G * D, 9
    wider = {"strided": (2, 3 * C), "unaligned": (3 * C + 1,), "padded": (3 * C + 1,)}.get(layout, (3 * C,))
    qkv = torch.randn(B, H * W, *wider, generator=g, dtype=dtype).to(device)  # sliced there: .to() copies a slice
    walks_ = walks(B, K, H, W, dtype=dtype, seed=seed, groups=G)  # (B, 2K G, H, W)
    walks_ = rearrange(walks_, "b (g o) h w -> b (h w) g o", g=G).contiguous()
    if layout == "strided":
        qkv = qkv[:, :, 1]
        walks_ = walks_.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    elif layout == "unaligned":
        qkv = qkv[..., 1:]
    elif layout == "padded":
        qkv = qkv[..., :-1]
    tables = [torch.randn(side + K - 1, D, generator=g, dtype=dtype if dtype == torch.float64 else torch.float32)
              for side in (W, H)]
    return [qkv] + [t.to(device) for t in (walks_, *tables)]


def padded_attention(layout, *args):
    """attention(qkv, walks, width, height, *args) as a function of those four; in the "padded" layout its output is
    padded by a constant channel, so that its gradient reaches the backward padded too (a view, as cat's backward
    passes it on)."""
    def attention(*inputs):
        out = sampler.attention(*inputs, *args)
        return torch.cat([out, torch.zeros_like(out[..., :1])], -1) if layout == "padded" else out
    return attention


def test_attention_written_out(path):
    """sampler.attention against its docstring's formula, with the tests' own grid_sample nodes and loops over the
    relative-position slots: per head, softmax over the K nodes of scale q . node_k(k) + q . width[k + W-1 - x] +
    q . height[k + H-1 - y], weighing node_k(v)."""
    B, H, W, G, D, K, scale = 2, 5, 6, 2, 3, 9, 0.7
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H * W, 3 * G * D, dtype=torch.float64, generator=g)
    offsets = walks(B, K, H, W, groups=G)  # (B, 2K G, H, W)
    width, height = (torch.randn(n + K - 1, D, dtype=torch.float64, generator=g) for n in (W, H))
    out = sampler.attention(qkv, rearrange(offsets, "b (g o) h w -> b (h w) g o", g=G), width, height, (H, W), G,
                            scale)
    q, k, v = rearrange(qkv, "b (h w) (three c) -> three b c h w", three=3, h=H)  # each (B, G D, H, W)
    keys, values = (rearrange(grid_sample_nodes(t, offsets, 1, G), "b (g d) k h w -> b g d k h w", g=G) for t in (k, v))
    q = rearrange(q, "b (g d) h w -> b g d h w", g=G)
    logits = scale * torch.einsum("bgdhw,bgdkhw->bgkhw", q, keys)
    for y in range(H):
        for x in range(W):
            for s in range(K):
                logits[..., s, y, x] += q[..., y, x] @ width[s + W - 1 - x] + q[..., y, x] @ height[s + H - 1 - y]
    expected = torch.einsum("bgkhw,bgdkhw->bghwd", logits.softmax(dim=2), values)
    torch.testing.assert_close(out, rearrange(expected, "b g h w d -> b (h w) (g d)"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B, H, W, G, D", [(2, 5, 7, 2, 8), (1, 3, 1, 3, 5), (2, 6, 4, 1, 64), (1, 4, 5, 2, 24),
                                           (1, 5, 3, 1, 16), (1, 3, 4, 2, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "unaligned", "padded"])
def test_fused_attention_matches_the_composed_reference(device, B, H, W, G, D, layout):
    """The fused op against the specification (the reference's dot, scale, relative position, softmax, aggregate):
    values and every input's gradient in float64, at odd sizes, head dims 0 to 64, strided, unaligned and padded qkv
    (and gradient)."""
    inputs = attention_inputs(B, H, W, G, D, device=device, layout=layout)
    assert sampler._fused(inputs[0], inputs[1], G)
    reference, fused = both_paths(padded_attention(layout, (H, W), G, max(D, 1) ** -0.5), inputs)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spread", [0, 3])
def test_fused_attention_backward_sums_by_tile_and_beyond_its_halo(spread):
    """The backward sums k's and v's gradients per tile of queries and its halo (the corners of walks under a pixel
    long), then adds them to the map; corners beyond the halo go straight to the map; the table rows a tile's queries
    read are summed per tile too. A map of several tiles, ragged at its edges, with walks that stay near (spread 0)
    and walks of up to 4 pixels (3): the reference's gradients."""
    B, H, W, G, D = 1, 19, 21, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D)
    jumps = torch.randint(-spread, spread + 1, walks_.shape, generator=torch.Generator().manual_seed(1))
    walks_ = walks_ - walks_.round() + jumps  # under half a pixel, plus whole pixels

    def attention(*inputs):
        return sampler.attention(*inputs, (H, W), G, D ** -0.5)

    reference, fused = both_paths(attention, (qkv, walks_, width, height))
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_attention_host_backward_is_deterministic():
    """The host's backward gives each thread whole (image, head) strips, each with tables of its own, added in a fixed
    order once all are done: its gradients are bit-identical whatever the number of threads (several tiles a strip,
    four strips, float32, whose sums would differ in another order)."""
    B, H, W, G, D = 2, 19, 21, 2, 8
    inputs = attention_inputs(B, H, W, G, D, dtype=torch.float32)
    threads, results = torch.get_num_threads(), []
    try:
        for count in (1, 4, 3):
            torch.set_num_threads(count)
            with sampler.backend("kernel"):
                results.append(outputs_and_grads(lambda *t: sampler.attention(*t, (H, W), G, D ** -0.5), inputs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_fused_attention_gradcheck():
    B, H, W, G, D = 1, 4, 3, 2, 3
    inputs = [t.requires_grad_() for t in attention_inputs(B, H, W, G, D)]
    with sampler.backend("kernel"):
        assert torch.autograd.gradcheck(lambda *t: sampler.attention(*t, (H, W), G, 0.7), inputs)


def test_fused_attention_is_one_op_each_way():
    """Forward and backward of a layer's attention are one kernel call each (no dot, aggregate or sampler backward),
    and the backward zeroes only its sums: k's and v's (here in grad qkv itself) and both tables' (one tensor); no
    zero gradient for the saved probabilities. On the GPU each fill is a launch."""
    qkv, walks_, width, height = (t.requires_grad_() for t in attention_inputs(2, 5, 6, 2, 8, dtype=torch.float32))
    with sampler.backend("kernel"), torch.profiler.profile() as prof:
        sampler.attention(qkv, walks_, width, height, (5, 6), 2, 0.35).sum().backward()
    calls = [e.name.split("::")[-1] for e in prof.events() if e.name.startswith(sampler._OPS + "::")]
    assert sorted(calls) == ["attention", "attention_backward"]

    def in_attention(event):
        while event is not None and "attention" not in event.name:
            event = event.cpu_parent
        return event is not None

    assert sum(e.name == "aten::zero_" and in_attention(e) for e in prof.events()) == 2


def test_fused_attention_of_a_non_finite_walk_is_nan_at_its_query_only():
    B, H, W, G, D = 2, 4, 5, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D, dtype=torch.float32)
    broken = walks_.clone()
    broken[1, 7, 1, 4] = math.nan  # image 1, token 7, head 1, node 2's dy
    with sampler.backend("kernel"):
        clean, out = (sampler.attention(qkv, w, width, height, (H, W), G, 0.3) for w in (walks_, broken))
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[1, 7, D:] = True
    assert torch.equal(out.isnan(), nan)
    torch.testing.assert_close(out[~nan], clean[~nan])


def test_fused_attention_of_a_non_finite_walk_is_nan_off_the_map_too(path):
    """A query whose nodes all leave the map reads zeros; one NaN walk among them makes its head's output NaN (the
    node reads NaN, as the composed path's NaN logit and weights do), not the 0 of the other nodes."""
    B, H, W, G, D = 1, 4, 5, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D)
    far = torch.full_like(walks_, 1000.5)  # every node 1000 pixels off the map
    far[0, 7, 1, 4] = math.nan  # token 7, head 1, node 2's dy
    out = sampler.attention(qkv, far, width, height, (H, W), G, D ** -0.5)
    nan = torch.zeros_like(out, dtype=torch.bool)
    nan[0, 7, D:] = True
    assert torch.equal(out.isnan(), nan) and out[~nan].abs().max() == 0


def test_fused_attention_reads_qkv_and_a_gradient_of_any_strides():
    """qkv whose channels are not contiguous (a transposed tensor's) and the gradient of out.sum() (every stride 0):
    the fused op's values and gradients are the composed reference's."""
    B, H, W, G, D = 2, 5, 6, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D)
    qkv = qkv.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, 3C), channels N apart
    assert qkv.stride(2) != 1
    results = []
    for name in ("torch", "kernel"):
        with sampler.backend(name):
            leaves = [t.detach().requires_grad_() for t in (qkv, walks_, width, height)]
            out = sampler.attention(*leaves, (H, W), G, D ** -0.5)
            results.append([out, *torch.autograd.grad(out.sum(), leaves)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_fused_attention_softmax_is_shift_invariant_far_below_zero(path):
    """Adding one amount to all K logits of a query changes nothing: tables whose rows are all one vector r add
    q . r to every slot alike. With q . r below -3000, where exp underflows even float64, the output is still finite
    and that of zero tables (the softmax subtracts the largest logit, whatever its sign)."""
    B, H, W, G, D = 2, 5, 6, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D)
    C = G * D
    qkv[..., :C] = qkv[..., :C].abs() + 1  # q > 1: q . r < -3200 for r = 2 (-200, ..., -200)
    shifted = [torch.full_like(t, -200.0) for t in (width, height)]
    out = sampler.attention(qkv, walks_, *shifted, (H, W), G, D ** -0.5)
    plain = sampler.attention(qkv, walks_, *(torch.zeros_like(t) for t in shifted), (H, W), G, D ** -0.5)
    assert out.isfinite().all()
    torch.testing.assert_close(out, plain, rtol=1e-9, atol=1e-9)


def test_fused_attention_at_whole_pixel_walks():
    """Walks of whole pixels (zero, as a model's start, and integers): each node sits on a pixel, where three of its
    four corners have weight 0 but a slope along y or x. Values and gradients, the walks' (one-sided slopes towards
    the next row and column, as the reference's floor takes them) included, are the composed reference's."""
    B, H, W, G, D = 2, 5, 6, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D)
    walks_ = walks_.round()
    walks_[0] = 0
    reference, fused = both_paths(lambda *t: sampler.attention(*t, (H, W), G, D ** -0.5), (qkv, walks_, width, height))
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_attention_in_half_types_keeps_float32_logits(dtype):
    """Half qkv and walks, float32 tables as under autocast: the fused op computes in float32 and rounds the output
    once, so it equals the float32 op on the rounded inputs to within a rounding (rounding the logits would not);
    logits beyond fp16's range stay finite, where the composed path's fp16 logits overflow."""
    B, H, W, G, D = 2, 5, 6, 2, 16
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D, dtype=torch.float32)
    qkv, walks_ = (4 * qkv).to(dtype), walks_.to(dtype)  # logits of about +-16: rounding them would show

    def attention(qkv, walks_, width, height):
        return sampler.attention(qkv, walks_, width, height, (H, W), G, D ** -0.5)

    with sampler.backend("kernel"):
        half = outputs_and_grads(attention, (qkv, walks_, width, height))
        full = outputs_and_grads(attention, (qkv.float(), walks_.float(), width, height))
        eps = torch.finfo(dtype).eps
        for h, f in zip(half, full):
            torch.testing.assert_close(h.float(), f, rtol=2 * eps, atol=2 * eps * f.abs().max().item())
        loud = qkv * 80  # scaled logits of about +-10^5, beyond fp16's 65504
        assert attention(loud, walks_, width, height).isfinite().all()


def test_attention_backward_inside_autocast_and_tables_of_another_dtype():
    """A backward run inside the autocast block gives the gradients of one run outside it (the table gradients are
    summed in the kernel, in float32); bf16 qkv with float32 tables, without autocast, runs on both paths."""
    B, H, W, G, D = 2, 5, 6, 2, 16
    inputs = attention_inputs(B, H, W, G, D, dtype=torch.float32)

    def grads(backward_inside):
        leaves = [t.clone().requires_grad_() for t in inputs]
        with sampler.backend("kernel"), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sampler.attention(*leaves, (H, W), G, D ** -0.5).float().square().sum()
            if backward_inside:
                loss.backward()
        if not backward_inside:
            loss.backward()
        return [t.grad for t in leaves]

    for inside, outside in zip(grads(True), grads(False)):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    qkv, walks_, width, height = inputs
    half = []
    for path in ("torch", "kernel"):
        with sampler.backend(path):
            half.append(sampler.attention(qkv.bfloat16(), walks_.bfloat16(), width, height, (H, W), G, D ** -0.5))
    torch.testing.assert_close(half[0].float(), half[1].float(), rtol=0.05, atol=0.05)


def test_attention_names_a_bad_input():
    qkv, walks_, width, height = attention_inputs(1, 3, 4, 2, 4)
    cases = [((qkv[..., :-1], walks_, width, height), "qkv must be"),
             ((qkv, walks_[..., :-2], width, height), "walks must be"),
             ((qkv, walks_, width[:-1], height), "width must be"),
             ((qkv, walks_, width, height[:, :3]), "height must be")]
    for inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            sampler.attention(*inputs, (3, 4), 2, 0.5)
    with pytest.raises(ValueError, match="heads must be a positive int, got 0"):
        sampler.attention(qkv, walks_, width, height, (3, 4), 0, 0.5)


def test_flop_counter_counts_the_fused_attention_as_the_composed():
    from torch.utils.flop_counter import FlopCounterMode
    inputs = attention_inputs(2, 5, 6, 2, 8, dtype=torch.float32)
    counts = []
    for name in ("kernel", "torch"):
        with sampler.backend(name), FlopCounterMode(display=False) as counter:
            sampler.attention(*inputs, (5, 6), 2, 0.35)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 4 * 2 * (2 * 30 * 16 * 9)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G, layout", [(1, "contiguous"), (2, "contiguous"), (2, "unaligned"), (2, "padded")])
def test_cuda_fused_attention_matches_reference(exact_cuda, dtype, G, layout):
    """DGMN2's shapes on the GPU (16-byte lanes, compile-time lane counts; qkv and gradients that 16-byte runs cannot
    read, unaligned or padded, are copied once)."""
    B, H, W, D = 8, 28, 28, 64
    inputs = attention_inputs(B, H, W, G, D, dtype=dtype, device="cuda", layout=layout)
    reference, kernel = both_paths(padded_attention(layout, (H, W), G, D ** -0.5), inputs)
    scale = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(kernel, reference):
        torch.testing.assert_close(a.float(), b.float(), rtol=scale, atol=scale * b.abs().max().item())


@pytest.mark.parametrize("op", ["dot", "aggregate"])
def test_kernel_gradients_go_to_exactly_the_inputs_that_need_them(op):
    """For every subset of the inputs that requires grad (q, x, walks for dot; x, walks, weights for aggregate), the
    kernel path returns the reference's gradient for each of them: needs_input_grad is read per input."""
    B, C, H, W, G, Go = 2, 4, 4, 5, 2, 2
    g = torch.Generator().manual_seed(0)
    q, x = (torch.randn(B, C, H, W, generator=g, dtype=torch.float64) for _ in range(2))
    offsets, weights = walks(B, 9, H, W, groups=Go), torch.randn(B, G, 9, H, W, generator=g, dtype=torch.float64)
    call, inputs = {
        "dot": (lambda q, x, o: sampler.dot(q, x, o, G, offset_groups=Go), (q, x, offsets)),
        "aggregate": (lambda x, o, w: sampler.aggregate(x, o, w, offset_groups=Go), (x, offsets, weights)),
    }[op]
    for need in itertools.product([False, True], repeat=3):
        if not any(need):
            continue
        results = []
        for path in ("torch", "kernel"):
            leaves = [t.clone().requires_grad_(n) for t, n in zip(inputs, need)]
            with sampler.backend(path):
                out = call(*leaves)
            results.append(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], torch.ones_like(out)))
        for ref, ker in zip(*results):
            torch.testing.assert_close(ker, ref, msg=lambda m: f"{op} {need}: {m}")


def test_fused_attention_ops_pass_opcheck():
    """The fused attention op and its backward pass torch.library.opcheck (schema, autograd registration, the fake
    kernels' shapes, dtypes and strides against the real ones) on a map with H != W (the tables differ in rows) and
    half qkv with float32 tables as under autocast (p and the table gradients in float32); the sampler backward's
    fake too, for bf16 maps with float32 weights."""
    B, H, W, G, D = 2, 3, 5, 2, 8
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D, dtype=torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        q, w = qkv.to(dtype).requires_grad_(), walks_.to(dtype).requires_grad_()
        args = (q, w, width.clone().requires_grad_(), height.clone().requires_grad_(), H, G, D ** -0.5)
        results = torch.library.opcheck(sampler._attention_kernel, args)
        assert set(results.values()) == {"SUCCESS"}, (dtype, results)
        out, probs = sampler._attention_kernel(*args)
        assert not probs.requires_grad  # p is saved, not differentiated
        grad = torch.randn_like(out)
        results = torch.library.opcheck(sampler._attention_backward_kernel,
                                        (q.detach(), w.detach(), width, height, probs, grad, H, G, D ** -0.5))
        assert set(results.values()) == {"SUCCESS"}, (dtype, results)
    x, u, v = torch.randn(B, 4, H, W).bfloat16(), torch.rand(B, 2, 9, H, W), torch.randn(B, 4, H, W).bfloat16()
    results = torch.library.opcheck(sampler._backward_kernel, (x, walks(B, 9, H, W, dtype=torch.bfloat16), u, v, 1, 1,
                                                               True, True, True))
    assert set(results.values()) == {"SUCCESS"}, results


def test_meta_tensors_take_the_reference_without_a_build_or_a_warning():
    """Under "auto", meta tensors (FLOP counts, shape checks) take the reference path: nothing is built for them and
    nothing warns of a failed build."""
    sampler._build.cache_clear()  # a fresh answer, as in a new process
    with sampler.backend("auto"), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sampler.which_path("meta") == "torch"
        x = torch.empty(1, 4, 5, 6, device="meta")
        assert sampler.aggregate(x, torch.empty(1, 18, 5, 6, device="meta"),
                                 torch.empty(1, 2, 9, 5, 6, device="meta")).shape == (1, 4, 5, 6)


def test_backend_blocks_nest_and_restore_the_previous_choice():
    """`with backend(...)` restores the choice it found, not the default: after an inner block (left normally or by
    an exception) the outer block's path holds again, and after all blocks the run's default."""
    default = sampler._backend
    with sampler.backend("torch"):
        with sampler.backend("kernel"):
            assert sampler.which_path("cpu") == "kernel"
        assert sampler.which_path("cpu") == "torch"
        with pytest.raises(KeyError), sampler.backend("auto"):
            raise KeyError("inside")
        assert sampler.which_path("cpu") == "torch"
    assert sampler._backend == default


def test_fused_attention_of_half_qkv_and_float32_walks():
    """bf16 qkv with float32 walks: the fused op reads both in float32 (the walks are not rounded to bf16) and
    returns qkv's dtype, as the composed path does: exactly the float32 op's output rounded once."""
    B, H, W, G, D = 2, 5, 6, 2, 16
    qkv, walks_, width, height = attention_inputs(B, H, W, G, D, dtype=torch.float32)
    qkv = qkv.bfloat16()
    with sampler.backend("kernel"):
        out = sampler.attention(qkv, walks_, width, height, (H, W), G, D ** -0.5)
        full = sampler.attention(qkv.float(), walks_, width, height, (H, W), G, D ** -0.5)
    with sampler.backend("torch"):
        composed = sampler.attention(qkv, walks_, width, height, (H, W), G, D ** -0.5)
    assert out.dtype == composed.dtype == torch.bfloat16
    torch.testing.assert_close(out, full.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("D, K", [(36, 9), (8, 25)])
def test_attention_runs_composed_where_the_fused_op_does_not_apply(D, K):
    """The fused op holds K = 9 nodes and a head of at most 32 channels or a multiple of 8 up to 64; a head of 36
    channels (on a GPU, more than a warp of single channels) or a 5 x 5 grid runs composed on the kernel path (dot
    and aggregate, no fused op) and gives the reference's output."""
    B, H, W, G = 1, 4, 5, 2
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, H * W, 3 * G * D, generator=g, dtype=torch.float64)
    walks_ = rearrange(walks(B, K, H, W, groups=G), "b (g o) h w -> b (h w) g o", g=G)
    width, height = (torch.randn(side + K - 1, D, generator=g, dtype=torch.float64) for side in (W, H))
    assert sampler._fused(qkv, walks_, G) is False
    for fits in (32, 40):  # at most a warp of single channels; a multiple of 8 up to 64
        assert sampler._fused(torch.zeros(B, H * W, 3 * G * fits), walks_[..., :2 * sampler.ATTENTION_NODES], G)
    outs = []
    for path in ("torch", "kernel"):
        with sampler.backend(path), torch.profiler.profile() as prof:
            outs.append(sampler.attention(qkv, walks_, width, height, (H, W), G, D ** -0.5))
    calls = {e.name.split("::")[-1] for e in prof.events() if e.name.startswith(sampler._OPS + "::")}
    assert calls == {"dot", "aggregate"}
    torch.testing.assert_close(outs[1], outs[0])


def test_bad_weights_and_q_on_another_device_raise_one_clear_error():
    """The Python checks name integer weights and a q on another device (ValueError) before any kernel sees them."""
    x, q = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    offsets, weights = torch.zeros(2, 18, 5, 6), torch.rand(2, 2, 9, 5, 6)
    for path in ("torch", "kernel"):
        with sampler.backend(path):
            with pytest.raises(ValueError, match="weights must be floating point, got torch.int64"):
                sampler.aggregate(x, offsets, weights.long())
            with pytest.raises(ValueError, match="q is on meta but x is on cpu"):
                sampler.dot(q.to("meta"), x, offsets)


def test_attention_refuses_walks_of_an_even_grid():
    """Walks of a 4 x 4 grid (2K = 32: K a square, but not of an odd side) are refused by name, on both paths."""
    qkv, walks_, width, height = attention_inputs(1, 3, 4, 2, 4)
    even = torch.zeros(*walks_.shape[:3], 32, dtype=walks_.dtype)
    for path in ("torch", "kernel"):
        with sampler.backend(path), pytest.raises(ValueError, match=r"walks must be .* odd ks, got .*\(1, 12, 2, 32\)"):
            sampler.attention(qkv, even, width, height, (3, 4), 2, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_benchmark_counts_the_least_bytes_moved(dtype, monkeypatch):
    """python sampler.py's bandwidth bound, counted by hand. DGMN2 row: forward reads q, k, v, walks and both tables
    and writes out; backward reads them and out's gradient and writes the gradients of qkv, walks and tables. DGMN
    row: forward reads x, walks, weights and writes out; backward reads those and out's gradient and writes three
    gradients. Feature maps and walks in the run's dtype, tables and weights in float32."""
    monkeypatch.setattr(sampler, "TINY_STAGES", [(6, 2)])
    monkeypatch.setitem(sampler.DGMN_SETTING, "channels", 16)
    monkeypatch.setitem(sampler.DGMN_SETTING, "side", 7)
    size = torch.finfo(dtype).bits // 8
    B, side, G, D, K = 3, 6, 2, 64, 9
    feature, walk = B * side * side * G * D * size, B * side * side * G * 2 * K * size
    tables = 2 * (side + K - 1) * D * 4  # float32
    (_, _, _, dgmn2_moved, _), (_, _, _, dgmn_moved, _) = sampler._cases(B, dtype, "cpu")
    forward = 3 * feature + walk + tables + feature  # q, k, v, walks, tables in; out
    backward = forward + 3 * feature + walk + tables  # the same and out's gradient in; qkv's, walks', tables' out
    assert dgmn2_moved == forward + backward
    feature, walk, weights = 16 * 7 * 7 * size, 2 * K * 7 * 7 * size, 4 * K * 7 * 7 * 4  # batch max(3 // 8, 1) = 1
    forward = feature + walk + weights + feature  # x, walks, weights in; out
    assert dgmn_moved == forward + forward + (feature + walk + weights)  # backward: out's gradient in; three out


def test_the_benchmark_measures_the_median_after_a_warm_up_and_the_peak_memory(monkeypatch):
    """sampler._measure (CPU): one untimed warm-up call, then the median of `repeats` timed calls; the peak memory is
    the highest running total of the allocations and frees (here 4 MiB + 1 MiB held at once), not what is left."""
    clock, durations = [0.0], itertools.chain([100.0, 5.0, 1.0, 2.0], itertools.repeat(0.0))  # warm-up first
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)
        a = torch.ones(2 ** 20)  # 4 MiB
        b = torch.ones(2 ** 18)  # 1 MiB, with a
        del a, b
        c = torch.ones(2 ** 19)  # 2 MiB, alone
        del c

    seconds, peak = sampler._measure(fn, "cpu", 3)
    assert seconds == 2.0  # median of 5, 1, 2: the warm-up's 100 is not timed, the fastest is not taken
    assert peak == 5 * 2 ** 20
    # CUDA (faked): the same median; the allocator's peak above what was allocated after the warm-up
    durations = itertools.chain([100.0, 5.0, 1.0, 2.0], itertools.repeat(0.0))
    for name, value in [("synchronize", None), ("reset_peak_memory_stats", None), ("memory_allocated", 3 * 2 ** 20),
                        ("max_memory_allocated", 10 * 2 ** 20)]:
        monkeypatch.setattr(torch.cuda, name, lambda *args, value=value: value)
    assert sampler._measure(lambda: clock.__setitem__(0, clock[0] + next(durations)), "cuda", 3) == (2.0, 7 * 2 ** 20)


def test_the_benchmark_copy_bandwidth_counts_the_read_and_the_write(monkeypatch):
    """sampler._copy_bandwidth: 10 copies of `size` bytes, each reading and writing them, over the timed seconds."""
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    ticks = iter([1.0, 3.0])  # start, end
    monkeypatch.setattr(time, "perf_counter", lambda: next(ticks))
    assert sampler._copy_bandwidth("cpu", size=1024) == 10 * 2 * 1024 / 2.0


def test_the_benchmark_prints_its_rows_bounds_and_ratios(monkeypatch, capsys):
    """python sampler.py on a GPU, measurements faked: each row's times in ms, peaks in MiB, the least bytes moved in
    MiB, the bound (bytes over the measured copy bandwidth) and fwd+bwd over it; the summary's ratios of the fused
    op's fwd+bwd time against the kernel path's, the reference's and grid_sample's, and of grid_sample's memory."""
    moved, bandwidth = 2 ** 30, 2e12  # 1024 MiB at 2 TB/s: a bound of 0.537 ms
    measured = iter([(0.010, 2 ** 29), (0.040, 800 * 2 ** 20), (0.005, 2 ** 28), (0.020, 400 * 2 ** 20),
                     (0.001, 2 ** 27), (0.004, 100 * 2 ** 20), (0.0005, 2 ** 26), (0.002, 50 * 2 ** 20)])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Fake GPU")
    monkeypatch.setattr(sampler, "_copy_bandwidth", lambda device: bandwidth)
    monkeypatch.setattr(sampler, "_measure", lambda fn, device, repeats: next(measured))
    x = torch.ones(2, requires_grad=True)
    monkeypatch.setattr(sampler, "_cases", lambda batch, dtype, device: iter(
        [("case", lambda path, x: 2 * x, (x,), moved, sampler.PATHS)]))
    monkeypatch.setattr(sys, "argv", ["sampler.py"])
    sampler._benchmark()
    out = capsys.readouterr().out
    assert "bandwidth bound: the least bytes of a fused forward and backward over the measured device-to-device " \
           "copy, 2.00 TB/s" in out
    rows = [line for line in out.splitlines() if line.startswith("| case |")]
    assert rows == ["| case | torch | 10.00 | 40.00 | 512 | 800 | 1024 | 0.537 | 74.5x |",
                    "| case | grid_sample | 5.00 | 20.00 | 256 | 400 | 1024 | 0.537 | 37.3x |",
                    "| case | kernel | 1.00 | 4.00 | 128 | 100 | 1024 | 0.537 | 7.5x |",
                    "| case | fused | 0.50 | 2.00 | 64 | 50 | 1024 | 0.537 | 3.7x |"]
    assert out.splitlines()[-1] == (
        "case: fused op fwd+bwd 2.00 ms (3.7x the bandwidth bound), 2.00x faster than the composed kernel path "
        "(4.00 ms), 20.0x faster than the torch reference, 10.0x faster than grid_sample with 8.0x less memory")


# ====================================================================================================================
# dgmn.py: Eq. 1-7, Table 2, Section 5.1; the modules DGMN is compared with


def assert_paths_agree(module, x):
    """The module's output and every parameter's gradient agree between the sampler's reference and kernel paths."""
    results = []
    for name in ("torch", "kernel"):
        with sampler.backend(name):
            module.zero_grad()
            out = module(x)
            out.square().sum().backward()
            results.append([out] + [p.grad for p in module.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


DGMN_VARIANTS = {  # every switch of the module, at small sizes
    "full": lambda: dgmn.DGMN(8, rates=(1, 2)),
    "DA": lambda: dgmn.DGMN(8, rates=(1,), dynamic_weights=False, dynamic_sampling=False),
    "DA+DW": lambda: dgmn.DGMN(8, rates=(1,), dynamic_sampling=False),
    "DW+DS": lambda: dgmn.DGMN(8, rates=(1, 3), dynamic_affinity=False),
    "deformable message passing": lambda: dgmn.deformable_message_passing(8, rates=(2,)),
    "two groups, 5x5, T = 2": lambda: dgmn.DGMN(8, rates=(1, 2), groups=2, kernel_size=5, iterations=2),
    "release layout": lambda: dgmn.DGMN(8, rates=(1, 2), channel_transforms=False),
    "release layout, DA+DS": lambda: dgmn.DGMN(8, rates=(1, 2), dynamic_weights=False, channel_transforms=False),
}


@pytest.mark.parametrize("variant", DGMN_VARIANTS)
def test_every_dgmn_variant_trains_at_odd_sizes(variant):
    torch.manual_seed(0)
    module = DGMN_VARIANTS[variant]()
    for size in [(7, 9), (5, 4), (1, 1)]:
        module.zero_grad()
        x = torch.randn(2, 8, *size)
        out = module(x)
        assert out.shape == x.shape
        out.square().mean().backward()
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0 and p.grad.isfinite().all(), (size, name)


def test_dgmn_node_conv_is_a_deformable_convolution(path):
    torch.manual_seed(0)
    conv = dgmn.NodeConv(6, 5, dilation=2).double()
    x, offsets = torch.randn(2, 6, 7, 8, dtype=torch.float64), walks(2, 9, 7, 8)
    weight = rearrange(conv.per_node.weight, "(k o) c 1 1 -> o c k", k=9).reshape(5, 6, 3, 3)  # a 3x3 kernel
    torch.testing.assert_close(conv(x, offsets), deform_conv2d(x, offsets, weight, padding=2, dilation=2))
    torch.testing.assert_close(conv(x, torch.zeros_like(offsets)), F.conv2d(x, weight, padding=2, dilation=2))


def test_dgmn_without_dynamic_sampling_the_nodes_are_the_uniform_grid(path):
    torch.manual_seed(0)
    B, C, H, W, rate = 2, 8, 6, 7, 2
    message = dgmn.RateMessage(C, rate, groups=2, dynamic_sampling=False).double()
    h = torch.randn(B, C, H, W, dtype=torch.float64)
    offsets, weights, _ = message.graph(h)
    assert message.walk is None and offsets.abs().max() == 0
    nodes = F.unfold(h, 3, dilation=rate, padding=rate).view(B, 2, C // 2, 9, H, W)  # the uniform grid, per group
    expected = F.conv2d(torch.einsum("bgckhw,bgkhw->bgchw", nodes, weights).reshape(B, C, H, W),
                        message.transform.weight)
    torch.testing.assert_close(message(h), expected)


def test_dgmn_starts_with_unit_scales_and_node_convs_at_a_convs_scale():
    """beta_q and alpha start at 1 (the docstring's start); a node convolution's per-node weights start as the ks x ks
    conv they stand for, PyTorch's bound 1 / sqrt(K C) of its fan-in."""
    torch.manual_seed(0)
    module = dgmn.DGMN(8, rates=(1, 2, 3))
    assert torch.equal(module.beta.data, torch.ones(3)) and module.alpha.item() == 1
    assert torch.equal(dgmn.DGMN(8, rates=(1, 2), channel_transforms=False).beta.data, torch.ones(2))
    weight, bound = dgmn.NodeConv(64, 8, dilation=1).per_node.weight, 1 / math.sqrt(9 * 64)
    assert 0.95 * bound < weight.abs().max() <= bound


def test_dgmn_update_is_eq_2_iterated_from_the_observed_map():
    torch.manual_seed(0)
    module = dgmn.DGMN(8, rates=(1, 2), iterations=3)
    with torch.no_grad():
        module.alpha.fill_(0.7)
        module.beta.copy_(torch.tensor([0.5, 2.0]))
    f = torch.randn(2, 8, 5, 6)
    h = f
    for _ in range(3):  # h <- relu(f + alpha U(sum_q beta_q m_q(h)))
        messages = [message.transform(sampler.aggregate(h, *message.graph(h)[:2], message.rate))
                    for message in module.messages]
        h = F.relu(f + 0.7 * F.conv2d(0.5 * messages[0] + 2.0 * messages[1], module.update.weight))
    torch.testing.assert_close(module(f), h)
    assert (h == 0).any() and not (h < 0).any()


def test_dgmn_walks_are_predicted_from_the_uniform_grid_of_their_rate():
    """Eq. 4: the walks of rate q are a ks x ks conv (with bias) over the nodes uniformly sampled at that rate, i.e.
    dilated by q (against conv2d on a map whose grid at rate 3 differs from that at rate 1)."""
    torch.manual_seed(0)
    for rate, ks in [(3, 3), (2, 5)]:
        message = dgmn.RateMessage(8, rate, groups=2, kernel_size=ks).double()
        with torch.no_grad():
            message.walk.weight.normal_(0, 0.3)
            message.walk.bias.normal_(0, 1)
        h = torch.randn(2, 8, 7, 9, dtype=torch.float64)
        expected = F.conv2d(h, message.walk.weight, message.walk.bias, padding=rate * (ks // 2), dilation=rate)
        assert message.walk.weight.shape == (2 * ks * ks, 8, ks, ks)
        torch.testing.assert_close(message.graph(h)[0], expected)


def test_dgmn_filters_and_affinities_come_from_the_walked_nodes(path):
    """Eq. 6-7 against deform_conv2d on the same walks: filters from the first G K kernels, affinity logits from the
    last K, softmax over the K nodes; the node weights are their product."""
    torch.manual_seed(0)
    B, C, H, W, G, rate = 2, 8, 5, 6, 4, 3
    message = dgmn.RateMessage(C, rate, groups=G).double()
    with torch.no_grad():
        message.walk.weight.normal_(0, 0.5)  # walks of a few pixels
    h = torch.randn(B, C, H, W, dtype=torch.float64)
    offsets, weights, affinity = message.graph(h)
    assert offsets.abs().max() > 1
    kernels = rearrange(message.predict.per_node.weight, "(k o) c 1 1 -> o c k", k=9).reshape(-1, C, 3, 3)
    predicted = deform_conv2d(h, offsets, kernels, padding=rate, dilation=rate)  # (B, G K + K, H, W)
    filters = predicted[:, :G * 9].reshape(B, G, 9, H, W)
    expected_affinity = predicted[:, G * 9:].softmax(dim=1)[:, None]  # (B, 1, K, H, W)
    torch.testing.assert_close(affinity, expected_affinity)
    torch.testing.assert_close(affinity.sum(dim=2), torch.ones(B, 1, H, W, dtype=torch.float64))
    torch.testing.assert_close(weights, filters * expected_affinity)


def test_dgmn_table_2_counts():
    """The layout of official-dgmn.md: exactly its counts, within 1% of the paper's rounded ones."""
    expected = {"DGMN w/ DA": 565_760, "DGMN w/ DA+DW": 731_648, "DGMN w/ DA+DW+DS": 2_609_664}
    for name, row in dgmn.TABLE_2.items():
        cost = dgmn.added_cost(row.options)
        assert cost["params"] == expected[name]
        assert cost["macs"] == expected[name] * 97 * 97  # every counted convolution runs on the whole map
        assert abs(cost["params"] / 1e6 / row.params_m - 1) < 0.01 and abs(cost["macs"] / 1e9 / row.gflops - 1) < 0.01
    full = dgmn.added_cost(dgmn.TABLE_2["DGMN w/ DA+DW+DS"].options)
    assert full["walk_params"] == 5 * (18 * 512 * 9 + 18)  # Eq. 4's ks x ks convs with bias, one per rate


def test_python_dgmn_prints_table_2(capsys):
    """Each row against counts made here: the transforms and predictors by hand, every other parameter by counting
    the module's, the sampler's sums by FlopCounterMode over the torch reference (its batched products)."""
    from torch.utils.flop_counter import FlopCounterMode
    dgmn._table_2()
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| DGMN w/")]
    by_hand = {"DGMN w/ DA": 565_760, "DGMN w/ DA+DW": 731_648, "DGMN w/ DA+DW+DS": 2_609_664}
    assert [row[0][2:] for row in rows] == list(dgmn.TABLE_2) == list(by_hand)
    for row, (name, paper) in zip(rows, dgmn.TABLE_2.items()):
        with torch.device("meta"):
            module = dgmn.DGMN(512, **paper.options)
        with sampler.backend("torch"), FlopCounterMode(display=False) as counter:
            module(torch.empty(1, 512, 97, 97, device="meta"))
        sums = counter.get_flop_counts()["Global"][torch.ops.aten.bmm] // 2
        rates = len(paper.options["rates"]) if paper.options.get("dynamic_sampling", True) else 0
        walk_params, walk_macs = rates * (18 * 512 * 9 + 18), rates * 18 * 512 * 9 * 97 * 97  # a 3x3 conv per rate
        others = parameter_count(module) - by_hand[name] - walk_params
        assert row == [f"| {name}", f"{by_hand[name]:,}", f"+{paper.params_m}M", f"{by_hand[name] * 97 * 97 / 1e9:.3f}",
                       f"+{paper.gflops}", f"{walk_params / 1e6:.3f} / {walk_macs / 1e9:.3f}", str(others),
                       f"{sums / 1e9:.3f}", f"{paper.miou} |"]


def test_dgmn_affinity_alone_weighs_every_group_and_adds_no_filters():
    """Table 2's DA row: the affinities are the only node weights (Eq. 1's w is w^q); nothing else is learnt."""
    torch.manual_seed(0)
    message = dgmn.RateMessage(8, 2, groups=4, dynamic_weights=False, dynamic_sampling=False)
    offsets, weights, affinity = message.graph(torch.randn(2, 8, 5, 6))
    assert message.static_filters is None and weights.shape == (2, 4, 9, 5, 6)
    torch.testing.assert_close(weights, affinity.expand_as(weights))
    assert dgmn.added_cost(dgmn.TABLE_2["DGMN w/ DA"].options)["other_params"] == 2  # alpha and the one beta


def test_dgmn_release_layout_counts_and_update():
    """The release's layout: 2268 C parameters per module at four rates (walks 2K ks^2 C, predictors (G K + K) ks^2 C
    per rate), plus the walks' biases and the betas; no C x C map; h = f + sum_q beta_q m_q (no sigma: a BN-ReLU
    follows it in a ResNet block)."""
    C, rates = 512, dgmn.COCO_RATES
    with torch.device("meta"):
        module = dgmn.DGMN(C, rates=rates, channel_transforms=False)
    assert sum(p.numel() for p in module.parameters()) == 2268 * C + len(rates) * (18 + 1)
    assert module.update is None and module.alpha is None
    torch.manual_seed(0)
    module = detection.dgmn_module(8, (1, 3), 4)  # as the COCO models build it
    with torch.no_grad():
        module.beta.copy_(torch.tensor([0.5, 2.0]))
        for message in module.messages:
            message.walk.weight.normal_(0, 0.3)
    f = torch.randn(2, 8, 5, 6)
    messages = [sampler.aggregate(f, *message.graph(f)[:2], message.rate) for message in module.messages]
    torch.testing.assert_close(module(f), f + 0.5 * messages[0] + 2.0 * messages[1])


BASELINES = {  # the modules of Tables 2 and 3, at small sizes
    "non-local": lambda: dgmn.NonLocal(16),
    "global context": lambda: dgmn.GlobalContext(16, ratio=4),
    "criss-cross": lambda: dgmn.CrissCrossAttention(16),
    "deformable message passing": lambda: dgmn.deformable_message_passing(16, rates=(1, 2)),
}


@pytest.mark.parametrize("name", BASELINES)
def test_every_baseline_parameter_learns_in_two_steps(name):
    """Each starts as the identity or close to it (a zero-initialised last layer or scale), so some parameters get their
    first gradient at the second step; after two, every parameter has had one."""
    torch.manual_seed(0)
    module = BASELINES[name]()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    seen = set()
    for _ in range(2):
        x = torch.randn(2, 16, 7, 5)
        out = module(x)
        assert out.shape == x.shape
        optimizer.zero_grad()
        (out - x.flip(-1)).square().mean().backward()
        seen |= {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().max() > 0}
        optimizer.step()
    assert seen == {n for n, _ in module.named_parameters()}


def randomised(module):
    """module with every parameter and buffer random (the zero-initialised ones too), in eval mode, float64."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("running_var"):
                tensor.uniform_(0.5, 1.5)
            elif tensor.is_floating_point():
                tensor.normal_(0, 0.5)
    return module.double().eval()


def test_non_local_block_is_softmax_of_theta_phi_times_g():
    module = randomised(dgmn.NonLocal(8, inner_channels=3))
    x = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    theta, phi, g = (f(x).flatten(2) for f in (module.theta, module.phi, module.g))  # (B, 3, N)
    y = torch.softmax(theta.transpose(1, 2) @ phi / math.sqrt(3), dim=-1) @ g.transpose(1, 2)  # (B, N, 3)
    torch.testing.assert_close(module(x), x + module.out(y.transpose(1, 2).reshape(2, 3, 4, 5)))


def test_non_local_and_global_context_blocks_start_as_their_releases():
    """Wang et al.'s non-local block: theta, phi, g from N(0, 0.01^2), biases 0; GCNet's attention conv: Kaiming's
    normal start over its C inputs, std sqrt(2 / C). Both blocks start as the identity."""
    torch.manual_seed(0)
    non_local, context = dgmn.NonLocal(512), dgmn.GlobalContext(2048)
    for conv in (non_local.theta, non_local.phi, non_local.g):
        assert abs(conv.weight.std().item() / 0.01 - 1) < 0.01 and not conv.bias.any()  # 131,072 draws each
    assert abs(context.attention.weight.std().item() / math.sqrt(2 / 2048) - 1) < 0.1  # 2,048 draws
    x = torch.randn(1, 512, 3, 4)
    assert torch.equal(non_local.eval()(x), x) and torch.equal(dgmn.GlobalContext(512)(x), x)


def test_criss_cross_attention_is_a_loop_over_each_pixels_row_and_column():
    module = randomised(dgmn.CrissCrossAttention(16, recurrence=1))
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    q, k, v = module.query(x), module.key(x), module.value(x)
    expected = x.clone()
    for h in range(4):
        for w in range(5):
            others = [(h, j) for j in range(5)] + [(i, w) for i in range(4) if i != h]  # itself once
            logits = torch.stack([(q[:, :, h, w] * k[:, :, i, j]).sum(1) for i, j in others], dim=1)  # (B, H + W - 1)
            values = torch.stack([v[:, :, i, j] for i, j in others], dim=2)  # (B, C, H + W - 1)
            expected[:, :, h, w] += module.gamma * (values * logits.softmax(dim=1)[:, None]).sum(2)
    torch.testing.assert_close(module(x), expected)
    twice = dgmn.CrissCrossAttention(16, recurrence=2).double().eval()
    twice.load_state_dict(module.state_dict())
    torch.testing.assert_close(twice(x), module(module(x)))  # the recurrence shares the weights


def test_global_context_block_adds_one_pooled_context_everywhere():
    module = randomised(dgmn.GlobalContext(16, ratio=4))
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    weights = module.attention(x).flatten(2).softmax(dim=-1)  # (B, 1, N)
    context = (x.flatten(2) * weights).sum(-1)[..., None, None]  # (B, C, 1, 1)
    torch.testing.assert_close(module(x), x + module.transform(context))


def test_global_context_transform_is_conv_layernorm_relu_conv():
    """GCNet's transform (Cao et al., Fig. 4(d)): 1x1 conv to C / r, LayerNorm over those C / r channels, ReLU, 1x1 conv
    back; the context is the softmax-weighted mean of the positions. Against that computed here with plain tensors;
    r is the ratio passed, 16 by default."""
    module = randomised(dgmn.GlobalContext(16, ratio=4))
    x = torch.randn(2, 16, 3, 4, dtype=torch.float64)
    logits = torch.einsum("c,bcn->bn", module.attention.weight.flatten(), x.flatten(2))
    context = torch.einsum("bcn,bn->bc", x.flatten(2), logits.softmax(dim=1))  # (B, C)
    first, norm, _, last = module.transform
    t = context @ first.weight.flatten(1).T + first.bias  # (B, C / r)
    mean, var = t.mean(1, keepdim=True), t.var(1, unbiased=False, keepdim=True)
    t = (t - mean) / torch.sqrt(var + norm.eps) * norm.weight.flatten() + norm.bias.flatten()
    out = t.clamp(min=0) @ last.weight.flatten(1).T + last.bias  # (B, C)
    torch.testing.assert_close(module(x), x + out[..., None, None])
    C = 64  # GCNet's ratio 16 by default: a 4-channel bottleneck; attention C, convs with biases, LayerNorm 2 C / 16
    assert parameter_count(dgmn.GlobalContext(C)) == C + (C * 4 + 4) + 2 * 4 + (4 * C + C)


def test_criss_cross_attention_starts_as_the_identity_with_c_8_queries_and_keys():
    """CCNet: gamma starts at 0, so a new module (any recurrence) is the identity; queries and keys have C / 8 channels,
    values C (1x1 convs with biases): 2 (C C / 8 + C / 8) + C C + C + 1 parameters."""
    torch.manual_seed(0)
    C = 32
    module = dgmn.CrissCrossAttention(C)
    x = torch.randn(2, C, 4, 5)
    assert torch.equal(module(x), x)
    assert parameter_count(module) == 2 * (C * C // 8 + C // 8) + C * C + C + 1


def test_modulated_deform_conv_keeps_dilation_stride_and_groups():
    """DCNv2 at dilation 2, stride 2: padding "same" is dilation (ks // 2), and the offset-and-mask conv has the
    geometry of the main one (both against deform_conv2d and conv2d called here); replacing a grouped conv (ResNeXt)
    keeps its groups and computes it at masks 0.5."""
    torch.manual_seed(0)
    dcn = dgmn.ModulatedDeformConv(6, 4, stride=2, dilation=2)
    with torch.no_grad():
        dcn.offset_mask.weight.normal_(0, 0.3)
        dcn.offset_mask.bias.normal_(0, 1)
    x = torch.randn(2, 6, 9, 8)
    predicted = F.conv2d(x, dcn.offset_mask.weight, dcn.offset_mask.bias, stride=2, padding=2, dilation=2)
    offsets, masks = predicted[:, :18], predicted[:, 18:]
    expected = deform_conv2d(x, offsets, dcn.weight, stride=2, padding=2, dilation=2, mask=masks.sigmoid())
    assert expected.shape == (2, 4, 5, 4)
    torch.testing.assert_close(dcn(x), expected)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=True)
    replaced = dgmn.ModulatedDeformConv.replacing(conv)
    x = torch.randn(2, 8, 5, 7)
    assert replaced.groups == 2
    half = 0.5 * F.conv2d(x, conv.weight, padding=1, groups=2)  # masks sigmoid(0); the bias is not masked
    torch.testing.assert_close(replaced(x), half + conv.bias[:, None, None])


def test_insert_into_resnet_takes_dgmn_keywords_over_its_defaults():
    """insert_into_resnet's defaults (the release's layout, no sigma) give way to the keywords passed, and the rates
    passed are the modules' dilations; every 3x3 conv of the stage (two a basic block) and no other gets one."""
    from torchvision.models import resnet18
    with torch.device("meta"):
        model = dgmn.insert_into_resnet(resnet18(), stages=("C4",), rates=(1, 2), channel_transforms=True,
                                        nonlinearity=True)
    modules = [m for m in model.modules() if isinstance(m, dgmn.DGMN)]
    assert len(modules) == 4 and all(m.update is not None and isinstance(m.sigma, nn.ReLU) for m in modules)
    assert all([message.rate for message in m.messages] == [1, 2] for m in modules)
    assert [n for n, m in model.named_modules() if isinstance(m, dgmn.DGMN)] == [
        f"layer3.{b}.conv{c}.context" for b in (0, 1) for c in (1, 2)]


def test_deformable_message_passing_starts_with_taps_at_a_convs_scale():
    """Table 3's baseline: its static taps are drawn uniformly within 1 / sqrt(K) (a ks x ks conv's scale per channel
    group), the same for all pixels, and nothing else weighs the nodes."""
    torch.manual_seed(0)
    module = dgmn.deformable_message_passing(8, rates=(1,), groups=4, kernel_size=5)
    taps = module.messages[0].static_filters
    assert taps.shape == (4, 25) and 0.9 / 5 < taps.abs().max() <= 1 / 5
    assert module.messages[0].predict is None


def test_a_module_before_the_last_block_of_res4():
    from torchvision.models import resnet50
    torch.manual_seed(0)
    plain = resnet50().eval()
    model = dgmn.before_last_block(resnet50(), "C4", dgmn.NonLocal(1024)).eval()
    assert [name for name, _ in model.layer3.named_children()] == ["0", "1", "2", "3", "4", "context", "5"]
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(key.startswith("layer3.context.") for key in result.missing_keys)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # a new non-local block is the identity (BN weight 0)
        torch.testing.assert_close(model(x), plain(x))
    with pytest.raises(ValueError, match="stage 'C4' already has a module before its last block"):
        dgmn.before_last_block(model, "C4", nn.Identity())


@pytest.mark.parametrize("shape", [(2, 8, 7, 6), (1, 8, 1, 1), (2, 8, 3, 2)])
def test_kernel_and_reference_paths_agree_on_dgmn(shape):
    """Rates up to 36 on maps far smaller, channels-last input."""
    torch.manual_seed(0)
    module = dgmn.DGMN(8, rates=(1, 3, 36), iterations=2).double()
    with torch.no_grad():
        for message in module.messages:
            message.walk.weight.normal_(0, 0.3)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert_paths_agree(module, x)


def test_resnet50_with_dgmn_in_c5():
    from torchvision.models import resnet50
    torch.manual_seed(0)
    plain = resnet50().eval()
    model = dgmn.insert_into_resnet(resnet50(), stages=("C5",)).eval()
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and result.missing_keys
    assert all(".conv2.context." in key and key.startswith("layer4.") for key in result.missing_keys)
    modules = [m for m in model.modules() if isinstance(m, dgmn.DGMN)]
    assert len(modules) == 3 and not any(isinstance(m.sigma, nn.ReLU) for m in modules)  # one a bottleneck; BN follows
    assert all(parameter_count(m) == parameter_count(detection.dgmn_module(512, dgmn.COCO_RATES, 4)) for m in modules)
    torch.testing.assert_close(model.layer4[0].conv2.weight, plain.layer4[0].conv2.weight, rtol=0, atol=0)
    body = nn.Sequential(*list(model.children())[:-2])  # up to layer4
    with torch.no_grad():
        assert body(torch.randn(2, 3, 96, 160)).shape == (2, 2048, 3, 5)
    with pytest.raises(ValueError, match="stage 'C6': a ResNet has stages C2, C3, C4, C5"):
        dgmn.insert_into_resnet(resnet50(), stages=("C6",))
    with pytest.raises(ValueError, match="stage .C5. already has modules after its 3x3 convolutions"):
        dgmn.insert_into_resnet(model, stages=("C5",))
    frozen = resnet50()
    frozen.layer3.requires_grad_(False)
    assert not dgmn.insert_into_resnet(frozen, stages=("C4",)).layer3[0].conv2.weight.requires_grad


def test_dgmn_errors_are_one_line():
    cases = [(lambda: dgmn.DGMN(10, groups=4), "groups = 4 must be positive and divide channels = 10"),
             (lambda: dgmn.DGMN(8, groups=0), "groups = 0 must be positive"),
             (lambda: dgmn.DGMN(8, rates=(1, 0)), "rates must be positive ints"),
             (lambda: dgmn.DGMN(8, rates=(True,)), "rates must be positive ints"),
             (lambda: dgmn.DGMN(8, kernel_size=4), "kernel_size must be odd"),
             (lambda: dgmn.DGMN(8, kernel_size=-1), "kernel_size must be odd and positive"),
             (lambda: dgmn.DGMN(8)(torch.randn(2, 6, 5, 5)), r"DGMN takes \(B, 8, H, W\) maps, got \(2, 6, 5, 5\)"),
             (lambda: dgmn.NonLocal(1), "NonLocal: channels = 1 // 2 leaves its bottleneck empty"),
             (lambda: dgmn.GlobalContext(8), "GlobalContext: channels = 8 // 16 leaves its bottleneck empty; give "
                                             "it at least 16 channels"),
             (lambda: dgmn.CrissCrossAttention(4), "CrissCrossAttention: channels = 4 // 8 leaves")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


# ====================================================================================================================
# dgmn2.py: Eq. 8-9, Fig. 4, Tables 1 and 6; the model files in another project


class ReleaseAttention(nn.Module):
    """The release's attention, written from official-dgmn2.md under its parameter names, on F.grid_sample."""

    def __init__(self, dim, heads, side):
        super().__init__()
        self.heads, d = heads, dim // heads
        self.qkv, self.proj, self.conv_offset = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Linear(d, 18)
        self.pos_emb = nn.Module()
        self.pos_emb.rel_height = nn.Parameter(torch.randn(side + 8, d) * d ** -0.5)
        self.pos_emb.rel_width = nn.Parameter(torch.randn(side + 8, d) * d ** -0.5)

    def forward(self, x, H, W):
        (B, N, C), G = x.shape, self.heads
        d = C // G
        q, k, v = self.qkv(x).view(B, N, 3, G, d).permute(2, 0, 3, 4, 1).reshape(3, B * G, d, H, W)
        offsets = self.conv_offset(x.view(B, N, G, d)).permute(0, 2, 3, 1).reshape(B * G, 18, H, W)
        keys, values = grid_sample_nodes(k, offsets, 1), grid_sample_nodes(v, offsets, 1)  # (B G, d, 9, H, W)
        logits = (q[:, :, None] * keys).sum(1) * d ** -0.5  # (B G, 9, H, W)
        # rel(a, b, s) = q[a, b] . Rw[s + W - 1 - b] + q[b, a] . Rh[s + H - 1 - b], tables indexed after the product
        a, b, s = torch.arange(H).view(H, 1, 1), torch.arange(W).view(1, W, 1), torch.arange(9)
        by_width = torch.einsum("ndab,rd->nabr", q, self.pos_emb.rel_width)[:, a, b, s + W - 1 - b]
        by_height = torch.einsum("ndba,rd->nabr", q, self.pos_emb.rel_height)[:, a, b, s + H - 1 - b]
        attn = (logits + (by_width + by_height).permute(0, 3, 1, 2)).softmax(dim=1)
        out = (attn[:, None] * values).sum(2)  # (B G, d, H, W)
        return self.proj(out.reshape(B, G, d, N).permute(0, 3, 1, 2).reshape(B, N, C))


class ReleaseBlock(nn.Module):
    def __init__(self, dim, heads, ratio, side):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = ReleaseAttention(dim, heads, side)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, ratio * dim), nn.Linear(ratio * dim, dim)

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class ReleaseDGMN2(nn.Module):
    """DGMN2 as the release builds it (patch_embed1..4, block1..4), for a checkpoint in the release's format."""

    def __init__(self, depths, num_classes=1000, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), ratios=(8, 8, 4, 4)):
        super().__init__()
        stem = nn.Module()
        for n, (cin, cout, stride) in enumerate([(3, 32, 2), (32, 32, 1), (32, 64, 2)], 1):
            setattr(stem, f"conv{n}", nn.Conv2d(cin, cout, 3, stride, 1, bias=False))
            setattr(stem, f"norm{n}", nn.BatchNorm2d(cout))
        self.patch_embed1 = stem
        for s in range(1, 4):
            embed = nn.Module()
            embed.conv, embed.norm = nn.Conv2d(dims[s - 1], dims[s], 3, 2, 1, bias=False), nn.BatchNorm2d(dims[s])
            setattr(self, f"patch_embed{s + 1}", embed)
        for s in range(4):
            setattr(self, f"block{s + 1}", nn.ModuleList(ReleaseBlock(dims[s], heads[s], ratios[s], 224 // 4 // 2 ** s)
                                                         for _ in range(depths[s])))
        self.head = nn.Linear(dims[3], num_classes)

    def forward(self, x):
        for n in range(1, 4):
            x = F.relu(getattr(self.patch_embed1, f"norm{n}")(getattr(self.patch_embed1, f"conv{n}")(x)))
        for s in range(1, 5):
            if s > 1:
                embed = getattr(self, f"patch_embed{s}")
                x = F.relu(embed.norm(embed.conv(x)))
            B, C, H, W = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            for block in getattr(self, f"block{s}"):
                tokens = block(tokens, H, W)
            x = tokens.transpose(1, 2).reshape(B, C, H, W)
        return self.head(x.mean(dim=(2, 3)))


def release_tiny_checkpoint(seed=0):
    """A trained-looking release model: every tensor random (BN statistics too), walks of a few pixels."""
    torch.manual_seed(seed)
    release = ReleaseDGMN2(dgmn2.VARIANTS["tiny"].depths)
    with torch.no_grad():
        for name, tensor in release.state_dict().items():
            if "num_batches_tracked" in name:
                continue
            if "running_var" in name or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                tensor.uniform_(0.5, 1.5)
            elif "conv_offset.weight" in name:
                tensor.normal_(0, 0.3)
            elif "rel_" not in name and "embed" not in name:
                tensor.normal_(0, 0.05 if tensor.dim() > 1 else 0.1)
            elif "running_mean" in name or "norm" in name:
                tensor.normal_(0, 0.1).add_(1 if name.endswith("weight") else 0)
    return release.eval()


def test_parameter_counts_equal_the_release():
    expected = dict(tiny=12_101_464, small=20_968_360, medium=35_811_712, large=48_286_762)
    for name, count in expected.items():
        with torch.device("meta"):
            assert sum(p.numel() for p in dgmn2.build(name).parameters()) == count
            for output_stride in (8, 16):  # Section 6.3's stride-1 embeddings keep the parameters
                assert sum(p.numel() for p in dgmn2.build(name, output_stride=output_stride).parameters()) == count
        assert round(count / 1e6, 1) == dgmn2.VARIANTS[name].params_m


def macs_counted_here(model, shape):
    """Multiply-adds of a model built on the meta device, counted apart from dgmn2.model_macs: FlopCounterMode over
    the sampler's torch reference (its einsums), plus the bilinear reads counted here: each DGMN2 attention over N
    tokens of C channels samples K keys and K values per token and channel, 4 multiply-adds each. -> (total,
    bilinear)."""
    from torch.utils.flop_counter import FlopCounterMode
    tokens = []  # (B, N, C) of each attention's input
    hooks = [m.register_forward_pre_hook(lambda m, args: tokens.append(args[0].shape)) for m in model.modules()
             if isinstance(m, dgmn2.DGMN2Attention)]
    with sampler.backend("torch"), FlopCounterMode(display=False) as counter:
        model(torch.empty(shape, device="meta"))
    for hook in hooks:
        hook.remove()
    K = dgmn2.KERNEL_SIZE ** 2
    bilinear = sum(4 * 2 * B * N * K * C for B, N, C in tokens)  # keys and values
    return counter.get_total_flops() // 2 + bilinear, bilinear


def printed_and_counted(module, function, run):
    """What run() prints, and module.function(model)'s result for each model it was called with meanwhile (a table's
    counts, recorded as the table was made)."""
    counted, count = {}, getattr(module, function)
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(io.StringIO()) as out:
        patch.setattr(module, function, lambda model, *args: counted.setdefault(model, count(model, *args)))
        run()
    return out.getvalue(), counted


@pytest.fixture(scope="module")
def table_6_printed():
    """What python dgmn2.py prints (dgmn2._table_6), and dgmn2.count_macs' result for each variant."""
    return printed_and_counted(dgmn2, "count_macs", dgmn2._table_6)


@pytest.mark.parametrize("name", [v if v == "tiny" else pytest.param(v, marks=pytest.mark.slow)
                                  for v in dgmn2.VARIANTS])
def test_multiply_adds_within_3_percent_of_table_6_and_python_dgmn2_prints_them(table_6_printed, name):
    out, counted = table_6_printed
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| DGMN2-")]
    assert [row[0] for row in rows] == [f"| DGMN2-{v.capitalize()}" for v in dgmn2.VARIANTS]
    row, variant = rows[list(dgmn2.VARIANTS).index(name)], dgmn2.VARIANTS[name]
    with torch.device("meta"):
        model = dgmn2.build(name).eval()
    macs, bilinear = macs_counted_here(model, (1, 3, 224, 224))
    assert counted[name] == (macs, bilinear), name
    assert abs(macs / 1e9 / variant.gflops - 1) < 0.03, (name, macs)
    assert 0 < bilinear < 0.03 * macs
    assert row == [f"| DGMN2-{name.capitalize()}", f"{parameter_count(model) / 1e6:.3f}", str(variant.params_m),
                   f"{macs / 1e9:.3f}", str(variant.gflops), f"{bilinear / 1e9:.3f}", f"{variant.top1} |"]


def test_count_macs_counts_at_the_size_it_is_given():
    """dgmn2.count_macs(variant, size) (train_imagenet.py's log at --img-size) counts at size x size, batch 1: as
    counted apart here, and not 224's count."""
    with torch.device("meta"):
        model = dgmn2.build("tiny").eval()
    assert dgmn2.count_macs("tiny", 112) == macs_counted_here(model, (1, 3, 112, 112))
    assert dgmn2.count_macs("tiny", 112)[0] < dgmn2.count_macs("tiny")[0]


def test_checkpoint_round_trip_reproduces_the_release(tmp_path):
    release = release_tiny_checkpoint()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = release(images)
    path = tmp_path / "dgmn2_tiny.pth"
    optimizer = torch.optim.AdamW(release.parameters())
    torch.save({"model": release.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="dgmn2_tiny", lr=1e-3)}, path)  # what the release's script saves
    profiled = {**release.state_dict(), "total_ops": torch.zeros(1, dtype=torch.float64),
                "block1.0.attn.qkv.total_params": torch.zeros(1, dtype=torch.float64)}  # thop's counters
    for checkpoint in (path, str(path), release.state_dict(), profiled):  # wrapped under "model" on disk, or bare
        model = dgmn2.load_official(dgmn2.dgmn2_tiny(), checkpoint).eval()
        with torch.no_grad():
            assert (model(images) - expected).abs().max() <= 1e-4
    # The switch matters: the symmetric rule gives other logits from the same weights.
    for module in model.modules():
        if isinstance(module, dgmn2.RelativePosition):
            module.transposed = False
    with torch.no_grad():
        assert (model(images) - expected).abs().max() > 1e-2
    # A backbone takes everything but the classifier.
    backbone = dgmn2.load_official(dgmn2.dgmn2_tiny(num_classes=0, output_stride=8), path)
    torch.testing.assert_close(backbone.stages[3].layers[1].mlp.fc2.weight, model.stages[3].layers[1].mlp.fc2.weight)
    # A model built for another input size reads the tables resized, as it would resize them at run time.
    larger = dgmn2.load_official(dgmn2.dgmn2_tiny(img_size=256), path)
    table = release.state_dict()["block1.0.attn.pos_emb.rel_width"]
    torch.testing.assert_close(larger.stages[0].layers[0].attn.rel_pos.width,
                               F.interpolate(table[None, None], size=(64 + 8, 64), mode="bilinear")[0, 0])
    # The rule travels with our own state dict.
    reloaded = dgmn2.dgmn2_tiny()
    reloaded.load_state_dict(dgmn2.load_official(dgmn2.dgmn2_tiny(), path).state_dict())
    with torch.no_grad():
        assert (reloaded.eval()(images) - expected).abs().max() <= 1e-4


def test_every_state_dict_value_is_a_tensor_and_older_checkpoints_load():
    """The release rule is a bool buffer: safetensors and dtype loops take the state dict; a state dict saved when the
    rule was a Python bool under _extra_state still loads and keeps its rule."""
    model = dgmn2.load_official(dgmn2.dgmn2_tiny(), release_tiny_checkpoint().state_dict())
    state = model.state_dict()
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    halved = {name: value.half() if value.is_floating_point() else value for name, value in state.items()}
    fresh = dgmn2.dgmn2_tiny()
    fresh.load_state_dict(halved)
    assert all(m.transposed for m in fresh.modules() if isinstance(m, dgmn2.RelativePosition))
    older = {name.replace("release_rule", "_extra_state"): {"transposed": True} if name.endswith("release_rule")
             else value for name, value in state.items()}
    fresh = dgmn2.dgmn2_tiny()
    fresh.load_state_dict(older)
    rules = [m for m in fresh.modules() if isinstance(m, dgmn2.RelativePosition)]
    assert len(rules) == 8 and all(m.transposed and m.release_rule.item() for m in rules)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images), model.eval()(images))


@pytest.mark.slow
def test_the_model_files_work_copied_into_a_package(tmp_path):
    """A researcher copies the model files into myproject/models/: they import each other from there, and beside the
    repository's own copies in one process (each copy, and a reload, defining custom ops of its own); DGMN2-Tiny, a
    segmentation and a detection model run from the copies."""
    package = tmp_path / "myproject" / "models"
    package.mkdir(parents=True)
    for init in (tmp_path / "myproject" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    for name in MODEL_FILES:
        shutil.copy(Path(__file__).with_name(name), package / name)
    code = f"""
import importlib, sys
import torch
import dgmn2, sampler
sys.path.insert(0, {str(tmp_path)!r})
from myproject.models import detection, dgmn, dgmn2 as copied, matching, sampler as copied_sampler, segmentation
assert copied.sampler is copied_sampler is dgmn.sampler and copied_sampler is not sampler
assert segmentation.dgmn2 is detection.dgmn2 is copied and "train_coco" not in sys.modules
assert detection.deformable_detr.matching is detection.sparse_rcnn.matching is matching
assert matching.__name__ == "myproject.models.matching"
first = copied_sampler._OPS
importlib.reload(copied_sampler)
assert len({{sampler._OPS, first, copied_sampler._OPS}}) == 3  # each its own ops: redefining one has crashed
images = torch.randn(1, 3, 64, 64)
with torch.no_grad():
    print(tuple(segmentation.build("dgmn2-tiny-mla", num_classes=5).eval()(images).shape))
    detector = detection.build("retinanet-dgmn2-tiny", num_classes=3, min_size=64, max_size=64).eval()
    print(sorted(detector([images[0]])[0]))
for module in (dgmn2, copied):
    torch.manual_seed(0)
    model = module.dgmn2_tiny(num_classes=10).eval()
    with torch.no_grad():
        logits = model(images)
    print(module.__name__, tuple(logits.shape), "%.4f" % logits.sum().item(), sep="|")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    segmented, detected, *models = run.stdout.splitlines()
    assert segmented == "(1, 5, 64, 64)" and detected == "['boxes', 'labels', 'scores']"
    top, copy = (line.split("|") for line in models)
    assert (top[0], copy[0]) == ("dgmn2", "myproject.models.dgmn2") and top[1] == copy[1] == "(1, 10)"
    assert top[2] == copy[2]  # the same model from the same seed: the same logits


@pytest.mark.slow
def test_the_model_files_tests_run_without_pycocotools():
    """Only train_coco.py needs pycocotools: without it the suite still collects, the model files' tests run and the
    COCO script's tests skip, saying why."""
    chosen = "zero_offsets_equal_unfold and 3-1 or relative_position_rules or segmentation_imports or perfect_detect"
    code = ("import sys; sys.modules['pycocotools'] = None; import pytest; "  # None: importing it fails
            f"sys.exit(pytest.main(['test_all.py', '-q', '-rs', '-p', 'no:cacheprovider', '-k', {chosen!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"^\d+ passed, 1 skipped", run.stdout.splitlines()[-1])
    assert "SKIPPED [1] test_all.py" in run.stdout and "train_coco.py needs pycocotools" in run.stdout


def test_load_official_refuses_what_does_not_fit(tmp_path):
    release = ReleaseDGMN2(dgmn2.VARIANTS["tiny"].depths).state_dict()
    with pytest.raises(ValueError, match="missing") as error:
        dgmn2.load_official(dgmn2.dgmn2_small(), release)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"of another shape \(first: head.weight"):
        dgmn2.load_official(dgmn2.dgmn2_tiny(num_classes=10), release)
    with pytest.raises(ValueError, match=r"1 unexpected \(first: stages.0.layers.2.norm1.weight"):
        dgmn2.load_official(dgmn2.dgmn2_tiny(), {**release, "block1.2.norm1.weight": torch.ones(64)})
    with pytest.raises(ValueError, match="not the release's format: .* such as 'stages.0.embed.0.conv.weight'"):
        dgmn2.load_official(dgmn2.dgmn2_tiny(), dgmn2.dgmn2_tiny().state_dict())
    with pytest.raises(ValueError, match="checkpoint must be a path or a dict of tensors, got int"):
        dgmn2.load_official(dgmn2.dgmn2_tiny(), 3)
    with pytest.raises(ValueError, match="nowhere.pth: no such checkpoint file"):
        dgmn2.load_official(dgmn2.dgmn2_tiny(), tmp_path / "nowhere.pth")
    (tmp_path / "empty.pth").touch()
    (tmp_path / "notes.pth").write_text("hello")
    for name in ("empty.pth", "notes.pth"):
        with pytest.raises(ValueError, match=f"{name}: not a readable checkpoint"):
            dgmn2.load_official(dgmn2.dgmn2_tiny(), tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.txt: not a readable checkpoint") as error:
        dgmn2.load_official(dgmn2.dgmn2_tiny(), tmp_path / "notes.txt")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("built, H, W", [((5, 7), 5, 7), ((4, 4), 4, 4), ((6, 3), 5, 7)])
def test_relative_position_rules(built, H, W, transposed):
    """Both rules against explicit loops; a map of another size reads the tables resized to it."""
    D, K = 4, 9
    rel = dgmn2.RelativePosition(built, D, K).double()
    rel.transposed = transposed
    q = torch.randn(2, D, H, W, dtype=torch.float64)
    Rh, Rw = (F.interpolate(t[None, None], size=(n + K - 1, D), mode="bilinear", align_corners=False)[0, 0]
              for t, n in ((rel.height, H), (rel.width, W)))
    expected = torch.zeros(2, K, H, W, dtype=torch.float64)
    for a in range(H):
        for b in range(W):
            for s in range(K):
                expected[:, s, a, b] = q[:, :, a, b] @ Rw[s + W - 1 - b]
                if not transposed:
                    expected[:, s, a, b] += q[:, :, a, b] @ Rh[s + H - 1 - a]
    if transposed:  # the release's height logits: on the transposed (W x H) map, resized to H x W
        on_transposed = torch.zeros(2, K, W, H, dtype=torch.float64)
        for r in range(W):
            for c in range(H):
                for s in range(K):
                    on_transposed[:, s, r, c] = q[:, :, c, r] @ Rh[s + H - 1 - c]
        expected += F.interpolate(on_transposed, size=(H, W), mode="bilinear", align_corners=False)
    torch.testing.assert_close(rel(q), expected)
    torch.testing.assert_close(rel(q[1]), expected[1])  # q (D, H, W): no leading dimensions
    torch.testing.assert_close(rel(q[:, None]), expected[:, None])  # (B, G, D, H, W), as the attention calls it


def test_the_default_attention_equals_its_composition(path):
    """DGMN2Attention's default (the symmetric rule: one sampler.attention call) equals walks_and_weights' composition
    (dot, the scale, RelativePosition, the softmax), aggregate and the projection; the walks made large, so that a
    slip in the heads' walks or the scale shows."""
    torch.manual_seed(0)
    attention = dgmn2.DGMN2Attention(24, 3, (5, 7)).double()
    with torch.no_grad():
        attention.walk.weight.normal_(0, 0.5)
    x = torch.randn(2, 35, 24, dtype=torch.float64)
    v, offsets, weights = attention.walks_and_weights(x, 5, 7)
    out = sampler.aggregate(v, offsets, weights, offset_groups=3)  # (B, C, H, W)
    torch.testing.assert_close(attention(x, 5, 7), attention.proj(rearrange(out, "b c h w -> b (h w) c")))


def test_dgmn2_starts_as_the_release():
    """The release's (timm's) start: every Linear's weight a truncated normal of std 0.02, its bias 0; the
    relative-position tables N(0, 1 / D), so that q . R is of q's own scale."""
    torch.manual_seed(0)
    for name, module in dgmn2.dgmn2_tiny().named_modules():
        if isinstance(module, nn.Linear) and module.weight.numel() >= 10_000:  # enough draws for a 5% check
            assert abs(module.weight.std().item() / 0.02 - 1) < 0.05 and not module.bias.any(), name
    rel = dgmn2.RelativePosition((56, 56), 64, 9)
    for table in (rel.height, rel.width):
        assert abs(table.std().item() * 64 ** 0.5 - 1) < 0.05


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = dgmn2.dgmn2_tiny(num_classes=10)
    for size in [(64, 64), (48, 80)]:
        model.zero_grad()
        F.cross_entropy(model(torch.randn(2, 3, *size)), torch.tensor([1, 7])).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().max() > 0 and p.grad.isfinite().all(), (size, name)


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_feature_maps_for_any_input_size(output_stride):
    model = dgmn2.dgmn2_tiny(num_classes=0, output_stride=output_stride).eval()
    strides = [min(s, output_stride) for s in (4, 8, 16, 32)]
    assert model.strides == strides
    for H, W in [(64, 64), (65, 97), (33, 50), (20, 13), (7, 7), (1, 1)]:
        with torch.no_grad():
            maps = model.forward_features(torch.randn(1, 3, H, W))
        assert [tuple(m.shape) for m in maps] == [(1, c, -(-H // s), -(-W // s))
                                                  for c, s in zip((64, 128, 320, 512), strides)]
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 512)


def test_reference_and_kernel_paths_agree():
    torch.manual_seed(0)
    model = dgmn2.load_official(dgmn2.dgmn2_tiny(), release_tiny_checkpoint().state_dict()).double()
    images = torch.randn(2, 3, 40, 56, dtype=torch.float64)
    assert_paths_agree(model, images)


def test_reference_and_fused_paths_agree():
    """The default (symmetric) rule, whose attention is the fused op on the kernel path, through a whole model."""
    torch.manual_seed(0)
    model = dgmn2.dgmn2_tiny(num_classes=10).double()
    assert_paths_agree(model, torch.randn(2, 3, 40, 56, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast(path, dtype):
    """Finite gradients, logits near float32's, and the residual stream in float32 (every layer's input)."""
    torch.manual_seed(0)
    model = dgmn2.dgmn2_tiny(num_classes=10).eval()
    images = torch.randn(2, 3, 48, 64)
    full = model(images)
    streams = []
    for layer in model.modules():
        if isinstance(layer, dgmn2.DGMN2Layer):
            layer.register_forward_pre_hook(lambda _, inputs: streams.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=dtype):
        half = model(images)
    half.float().sum().backward()
    assert half.dtype == dtype and all(p.grad.isfinite().all() for p in model.parameters())
    assert streams == [torch.float32] * sum(dgmn2.VARIANTS["tiny"].depths)
    # measured 0.014 (bf16; 0.018 with the stream in bf16) and 0.002 (fp16); walks lost under autocast would give 0.11
    error = (half.float() - full).norm() / full.norm()
    assert error < {torch.bfloat16: 0.05, torch.float16: 0.01}[dtype], error


@pytest.mark.slow
@pytest.mark.parametrize("choice, transposed", [("torch", False), ("auto", False), ("auto", True)])
def test_torch_compile_traces_a_layer(choice, transposed):
    """fullgraph=True on the reference and on the default path (here the kernel; its build check is not traced)."""
    layer = dgmn2.DGMN2Layer(64, 2, 4, (6, 8))
    layer.attn.rel_pos.transposed = transposed
    tokens = torch.randn(2, 5 * 7, 64)
    with sampler.backend(choice):
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
        for a, b in zip(outputs_and_grads(lambda t: compiled(t, 5, 7), [tokens]),
                        outputs_and_grads(lambda t: layer(t, 5, 7), [tokens])):
            torch.testing.assert_close(a, b)


def test_attention_reads_q_k_v_and_walks_where_the_linears_wrote_them(monkeypatch):
    """No fold of heads into the batch and no copy: the fused attention gets the qkv and walk Linears' outputs
    themselves, and the release rule's dot and aggregate get views of them."""
    attention = dgmn2.DGMN2Attention(64, 2, (5, 7))
    written, read = {}, {}
    for name in ("qkv", "walk"):
        getattr(attention, name).register_forward_hook(lambda m, i, out, name=name: written.update({name: out}))
    for name in ("attention", "dot", "aggregate"):
        original = getattr(sampler, name)
        monkeypatch.setattr(sampler, name, lambda *args, original=original, name=name, **kwargs:
                            read.setdefault(name, []).append(args) or original(*args, **kwargs))
    x = torch.randn(2, 5 * 7, 64)
    attention(x, 5, 7)
    qkv, walks_ = read.pop("attention")[0][:2]
    assert qkv is written["qkv"] and walks_ is written["walk"]
    read.clear()
    attention.rel_pos.transposed = True
    attention(x, 5, 7)
    (q, k, offsets_dot, *_), (v, offsets_aggregate, attn) = read["dot"][0], read["aggregate"][0]
    storage = {name: out.untyped_storage().data_ptr() for name, out in written.items()}
    assert {t.untyped_storage().data_ptr() for t in (q, k, v)} == {storage["qkv"]}
    assert {t.untyped_storage().data_ptr() for t in (offsets_dot, offsets_aggregate)} == {storage["walk"]}
    assert q.shape == (2, 64, 5, 7) and q.stride(1) == 1 and attn.shape == (2, 2, 9, 5, 7)


def _ddp_rank(rank, world, store, state, images, labels, out):
    """One rank of test_ddp_...: its share of the batch through DistributedDataParallel; rank 0 saves the grads."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    model = dgmn2.dgmn2_tiny(num_classes=10)
    model.load_state_dict(state)
    ddp = DistributedDataParallel(model.eval())  # BN on running statistics: a rank's batch share does not change them
    share = len(images) // world
    mine = slice(rank * share, (rank + 1) * share)
    for step in range(2):  # a second step: DDP raises there if a parameter got no gradient in the first
        model.zero_grad()
        F.cross_entropy(ddp(images[mine]), labels[mine]).backward()
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_averages_gradients_like_one_large_batch(tmp_path):
    torch.manual_seed(0)
    model = dgmn2.dgmn2_tiny(num_classes=10).eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 9, 3])
    torch.multiprocessing.spawn(_ddp_rank, nprocs=2, args=(2, tmp_path / "store", model.state_dict(), images, labels,
                                                           tmp_path / "grads.pt"))
    F.cross_entropy(model(images), labels).backward()
    for local, averaged in zip([p.grad for p in model.parameters()], torch.load(tmp_path / "grads.pt")):
        torch.testing.assert_close(averaged, local)


def test_drop_path_rises_linearly_and_drops_whole_samples():
    model = dgmn2.dgmn2_tiny(drop_path_rate=0.1)
    rates = [layer.drop_path.p for stage in model.stages for layer in stage.layers]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])  # 0 to 0.1 over the 8 layers, evenly
    drop = dgmn2.DropPath(0.5).train()
    x = torch.ones(1000, 4, 3)
    out = drop(x)
    assert set(out.flatten().tolist()) == {0.0, 2.0} and (out == out[:, :1, :1]).all()
    assert 0.4 < (out[:, 0, 0] == 0).float().mean() < 0.6
    assert drop.eval()(x) is x


def test_the_mlp_overwrites_fc1s_output_only_when_no_backward_needs_it():
    """Without autograd fc2 reads fc1's own storage (GELU in place); with it, a fresh map that leaves fc1's output to
    GELU's backward. The same numbers and gradients as fc1, F.gelu, fc2 either way."""
    mlp = dgmn2.MLP(8, 32)
    storage = {}
    mlp.fc1.register_forward_hook(lambda module, inputs, out: storage.update(fc1=out.data_ptr()))
    mlp.fc2.register_forward_pre_hook(lambda module, inputs: storage.update(fc2=inputs[0].data_ptr()))
    x = torch.randn(2, 5, 8, requires_grad=True)
    expected = outputs_and_grads(lambda t: mlp.fc2(F.gelu(mlp.fc1(t))), [x])
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected[0])
    assert storage["fc1"] == storage["fc2"]
    for a, b in zip(outputs_and_grads(mlp, [x]), expected):
        torch.testing.assert_close(a, b)
    assert storage["fc1"] != storage["fc2"]


def test_model_errors_are_one_line():
    cases = [(lambda: dgmn2.dgmn2_tiny()(torch.randn(2, 1, 32, 32)), r"takes images of shape \(B, 3, H, W\)"),
             (lambda: dgmn2.build("huge"), "unknown DGMN2 variant 'huge'"),
             (lambda: dgmn2.dgmn2_tiny(output_stride=4), "output_stride must be 8, 16 or 32"),
             (lambda: dgmn2.dgmn2_tiny(drop_path_rate=1.0), r"drop_path_rate must lie in \[0, 1\), got 1.0"),
             (lambda: dgmn2.DGMN2Attention(64, 3, (4, 4)), "3 heads do not divide the width 64")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


@CUDA
def test_model_on_cuda_matches_the_cpu_reference(exact_cuda):
    """The CUDA kernels (asked for, so that a failed build fails the test instead of falling back) in float32 against
    the torch reference on the CPU in float64: logits and every parameter's gradient to 1e-3 of their norm (float32
    lands near 1e-4: the stem's gradients sum over every pixel, too many roundings for an elementwise 1e-3), then
    logits under bf16 autocast."""
    torch.manual_seed(0)
    model = dgmn2.load_official(dgmn2.dgmn2_tiny(), release_tiny_checkpoint().state_dict()).eval()
    names = ["logits"] + [name for name, _ in model.named_parameters()]
    images = torch.randn(2, 3, 64, 96)
    results = []
    for device, choice, dtype in (("cpu", "torch", torch.float64), ("cuda", "kernel", torch.float32)):
        with sampler.backend(choice):
            model.to(device, dtype).zero_grad()
            logits = model(images.to(device, dtype))
            logits.square().sum().backward()
            # copies: on the CPU .to("cpu") alone would be the gradient itself, which model.to("cuda") moves in place
            results.append([t.to("cpu", torch.float64, copy=True)
                            for t in [logits] + [p.grad for p in model.parameters()]])
    for name, kernel, reference in zip(names, *results):
        assert (kernel - reference).norm() <= 1e-3 * reference.norm(), name
    with sampler.backend("kernel"), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        half = model(images.cuda()).double().cpu()
    assert F.cosine_similarity(half.flatten(), results[0][0].flatten(), dim=0) > 0.99


def test_profile_lists_where_a_step_goes():
    """python dgmn2.py --profile (on the GPU: kernels and launches; here the CPU's ops): a table per run whose rows
    are the most expensive, their shares of the run's total, and the count per layer."""
    lines = dgmn2._profile("tiny", batch=1, img_size=64, top=5)
    assert lines[0].startswith("DGMN2-Tiny on CPU, batch 1, 64 x 64, bf16 autocast, the sampler's kernel path")
    heads = [(i, re.fullmatch(r"(.+): (\d+) ops \((\d+) a layer, of which the sampler's (\d+)\), ([\d.]+) ms of op "
                              r"self time", line)) for i, line in enumerate(lines)]
    heads = [(i, m) for i, m in heads if m]
    assert [m[1] for _, m in heads] == ["stage 1's first layer (16x16x64, 1 head)", "the whole model (8 layers)"]
    for (i, m), layers in zip(heads, (1, 8)):
        # the fused attention's forward and backward: the sampler's only ops (whether they make the top rows depends
        # on the machine's speed)
        assert round(int(m[2]) / layers) == int(m[3]) and m[4] == "2"
        rows = [re.fullmatch(r"\| (.+) \| (\d+) \| ([\d.]+) \| ([\d.]+)% \|", line) for line in lines[i + 4:i + 9]]
        times = [float(row[3]) for row in rows]
        assert times == sorted(times, reverse=True) and sum(int(row[2]) for row in rows) <= int(m[2])
        for row in rows:  # each share is its time over the run's total
            assert float(row[4]) == pytest.approx(100 * float(row[3]) / float(m[5]), abs=0.1)


def test_the_profile_counts_every_gpu_kernel_of_the_sampler_as_its():
    """dgmn2.py --profile tells the sampler's launches on the GPU by name: every __global__ kernel of sampler_cuda.cu,
    as the profiler demangles it, is the sampler's; cuBLAS's, PyTorch's and a host op's name are not. Kernels are
    launches; the GPU's memory copies and fills, as CUPTI names them, are not."""
    kernels = re.findall(r"__global__ void(?: __launch_bounds__\(\w+\))? (\w+)\(", sampler._SOURCE.read_text())
    assert len(kernels) >= 2  # each_lane (the composed ops, the fused forward), each_tile (the fused backward)
    for kernel in kernels:
        name = f"void {kernel}<8, 8, Op<c10::BFloat16, int> >(Op<c10::BFloat16, int>)"
        assert dgmn2._is_samplers(name, cuda=True) and dgmn2._is_launch(name)
    others = ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "dgmn_sampler_host::attention",
              "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>(int)")
    for other in others:
        assert not dgmn2._is_samplers(other, cuda=True)
    assert dgmn2._is_samplers("dgmn_sampler_host::attention_backward", cuda=False)
    assert all(map(dgmn2._is_launch, others[::2]))
    for memory in ("Memset (Device)", "Memcpy DtoD (Device -> Device)", "Memcpy HtoD (Pageable -> Device)"):
        assert not dgmn2._is_launch(memory)


def test_profile_rows_are_the_profilers_self_times_summed_by_name(monkeypatch):
    """python dgmn2.py --profile (here the CPU's ops): each run's head counts every op the profiler recorded and
    sums their self times (not their inclusive times, which count nested ops twice); its table has exactly `top`
    rows, the ops of most self time, each with its number of calls and the sum of their self times, counted here
    from the profiler's own events."""
    from torch.autograd import DeviceType
    profilers, original = [], torch.profiler.profile

    def recording(*args, **kwargs):
        profilers.append(original(*args, **kwargs))
        return profilers[-1]

    monkeypatch.setattr(torch.profiler, "profile", recording)
    lines = dgmn2._profile("tiny", batch=1, img_size=64, top=3)
    heads = [i for i, line in enumerate(lines) if re.fullmatch(r".+: \d+ ops \(.+\), [\d.]+ ms of op self time", line)]
    assert len(heads) == len(profilers) == 2
    for i, prof in zip(heads, profilers):
        per_name = {}
        for e in prof.events():
            if e.device_type == DeviceType.CPU:
                calls, us = per_name.get(e.name, (0, 0.0))
                per_name[e.name] = calls + 1, us + e.self_cpu_time_total
        total = sum(us for _, us in per_name.values())
        m = re.fullmatch(r".+: (\d+) ops \(.+\), ([\d.]+) ms of op self time", lines[i])
        assert int(m[1]) == sum(calls for calls, _ in per_name.values())
        assert float(m[2]) == pytest.approx(total / 1e3, abs=0.006)  # printed to 0.01 ms, summed in another order
        end = next((j for j in range(i + 4, len(lines)) if not lines[j].startswith("| ")), len(lines))
        rows = [re.fullmatch(r"\| (.+) \| (\d+) \| ([\d.]+) \| ([\d.]+)% \|", line) for line in lines[i + 4:end]]
        assert len(rows) == 3 and all(rows)
        for row in rows:  # each row an op's calls and summed self time (printed to 0.001 ms)
            assert int(row[2]) == per_name[row[1]][0]
            assert float(row[3]) == pytest.approx(per_name[row[1]][1] / 1e3, abs=0.0006)
        times = [float(row[3]) for row in rows]
        left_out = max(us for name, (_, us) in per_name.items() if name not in {row[1] for row in rows}) / 1e3
        assert times == sorted(times, reverse=True) and left_out <= times[-1] + 0.0006  # the most self time first


def test_from_checkpoint_builds_what_a_checkpoint_holds(tmp_path):
    """Ours (train_imagenet.py's format or a bare state dict, any variant, classes and img_size) and the release's,
    each giving the saved model's logits; a file that is no DGMN2 is named in a one-line error."""
    images = torch.randn(1, 3, 64, 64)
    torch.manual_seed(0)
    small = dgmn2.dgmn2_small(num_classes=7, img_size=(192, 256)).eval()
    small.stages[0].layers[0].attn.rel_pos.transposed = True
    path = tmp_path / "checkpoint-0001.pth"
    torch.save({"model": small.state_dict(), "optimizer": {}, "config": {"model": "small"}, "epoch": 1}, path)
    release = release_tiny_checkpoint()
    expected = dgmn2.load_official(dgmn2.dgmn2_tiny(), release.state_dict()).eval()
    for checkpoint, model in ((path, small), (small.state_dict(), small), (release.state_dict(), expected)):
        built = dgmn2.from_checkpoint(checkpoint).eval()
        assert built.state_dict().keys() == model.state_dict().keys()
        with torch.no_grad():
            torch.testing.assert_close(built(images), model(images))
    assert dgmn2.from_checkpoint(path).stages[0].layers[0].attn.rel_pos.transposed
    backbone = dgmn2.dgmn2_medium(num_classes=0)
    assert isinstance(dgmn2.from_checkpoint(backbone.state_dict()).head, nn.Identity)
    torch.save({"model": {"stages.0.layers.0.attn.qkv.weight": torch.zeros(3)}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match=r"odd.pth: no DGMN2 variant has \(1, 0, 0, 0\) layers per stage") as error:
        dgmn2.from_checkpoint(tmp_path / "odd.pth")
    assert "\n" not in str(error.value)


def test_the_sampled_nodes_leave_the_model_as_they_found_it():
    """The hooks that catch each stage's walks are removed: a second call finds the same nodes, and the model's later
    forwards run no hook."""
    model = dgmn2.dgmn2_tiny(num_classes=3).eval()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    first = dgmn2._sampled_nodes(model, image, (30, 20))
    assert dgmn2._sampled_nodes(model, image, (30, 20)) == first
    assert not any(module._forward_hooks for module in model.modules())


def test_show_walks_draws_a_picture(tmp_path):
    """Fig. 11's picture: every head's K nodes of the last layer of every stage, each filled with the shade of its
    attention weight (the weights of a head summing to one), beside a legend and a colour bar."""
    from PIL import Image
    image, out = tmp_path / "image.png", tmp_path / "walks.png"
    Image.fromarray(torch.randint(0, 256, (256, 288, 3), dtype=torch.uint8).numpy()).save(image)
    torch.manual_seed(0)
    small = dgmn2.dgmn2_small(num_classes=3)
    torch.save({"model": small.state_dict(), "config": {"model": "small"}}, tmp_path / "ours.pth")
    nodes = dgmn2._show_walks(image, weights=tmp_path / "ours.pth", point=(120, 150), out_path=out)
    picture = Image.open(out)
    assert picture.size == (288 + dgmn2.PANEL_WIDTH, 256)
    heads = small.stages[0].layers[0].attn.heads, *(stage.layers[0].attn.heads for stage in small.stages[1:])
    assert len(nodes) == 9 * sum(heads)
    for stage, head in {(n[0], n[1]) for n in nodes}:
        assert sum(n[4] for n in nodes if n[:2] == (stage, head)) == pytest.approx(1, abs=1e-5)
    # A node with no other near it shows its own shade at its centre.
    alone = [n for n in nodes if 8 <= n[2] < 248 and 8 <= n[3] < 280 and
             all(max(abs(n[2] - m[2]), abs(n[3] - m[3])) > 2 * dgmn2.NODE_RADIUS + 2 for m in nodes if m is not n)]
    assert alone
    for _, _, row, column, weight in alone:
        assert picture.getpixel((round(column), round(row))) == dgmn2._shade(weight)
    assert picture.getpixel((288 + 14, 86)) == dgmn2._shade(1) == dgmn2.VIRIDIS[-1]  # the colour bar's top
    assert dgmn2._shade(0) == dgmn2.VIRIDIS[0] and dgmn2._shade(0.5) == dgmn2.VIRIDIS[2]
    with pytest.raises(ValueError, match=r"point \(row 256, column 0\) lies outside the 256 x 288 image"):
        dgmn2._show_walks(image, point=(256, 0), out_path=out)
    (tmp_path / "bad.pth").write_text("not a checkpoint")
    nowhere = tmp_path / "nowhere" / "walks.png"
    for call, message in (
            (lambda: dgmn2._show_walks(image, weights=tmp_path / "bad.pth", out_path=out), "bad.pth: not a readable"),
            (lambda: dgmn2._show_walks(tmp_path / "ours.pth", out_path=out), "ours.pth: not a readable"),
            (lambda: dgmn2._show_walks(image, out_path=nowhere), "walks.png: cannot write the picture there"),
            (lambda: dgmn2._show_walks(image, weights=tmp_path, out_path=out), "a folder, not a checkpoint file")):
        with pytest.raises(ValueError, match=message) as error:
            call()
        assert "\n" not in str(error.value)


def test_stages_keep_the_residual_stream_channels_last():
    """Stage casts its embedding's output to channels-last: each layer gets (B, N, C) tokens that are a contiguous
    view of the map (no strided reads in the Linears), and the stage maps are channels-last views of the tokens."""
    model = dgmn2.dgmn2_tiny(num_classes=0).eval()
    seen = []
    for stage in model.stages:
        stage.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        maps = model.forward_features(torch.randn(2, 3, 40, 56))
    assert len(seen) == 4 and all(tokens.is_contiguous() for tokens in seen)
    assert all(m.is_contiguous(memory_format=torch.channels_last) and not m.is_contiguous() for m in maps)


def test_a_checkpoint_file_that_is_not_a_dict_is_named(tmp_path):
    """A file that torch.load reads but that holds no dict (a list) is refused in one line naming the file."""
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    for read in (dgmn2.from_checkpoint, lambda p: dgmn2.load_official(dgmn2.dgmn2_tiny(), p)):
        with pytest.raises(ValueError, match=r"list.pth: not a checkpoint \(a list, not a dict of tensors\)"):
            read(str(path))


def test_the_sampled_nodes_sit_at_the_walked_grid_in_image_pixels():
    """_sampled_nodes puts node k = 3 i + j of the query (qy, qx) at ((qy + i - 1 + dy_k) s, (qx + j - 1 + dx_k) s)
    for stage stride s, the query the nearest feature to the point, clamped onto the map by its own height and
    width: here walks fixed by the walk Linear's bias (dy_k, dx_k different), a 64 x 128 image and a point on its
    bottom row."""
    model = dgmn2.dgmn2_tiny(num_classes=3).eval()
    dy, dx = 0.1 * torch.arange(9) + 0.25, -0.05 * torch.arange(9) - 0.5
    for stage in model.stages:
        walk = stage.layers[-1].attn.walk
        nn.init.zeros_(walk.weight)
        with torch.no_grad():
            walk.bias.copy_(torch.stack([dy, dx], dim=1).flatten())  # channel 2k is dy, 2k + 1 is dx
    point = (63, 10)
    nodes = dgmn2._sampled_nodes(model, torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8), point)
    expected = []
    for s, stride in enumerate((4, 8, 16, 32)):
        h, w = 64 // stride, 128 // stride
        qy, qx = min(round(point[0] / stride), h - 1), min(round(point[1] / stride), w - 1)
        for g in range(model.stages[s].layers[-1].attn.heads):
            expected += [(s, g, (qy + k // 3 - 1 + dy[k].item()) * stride, (qx + k % 3 - 1 + dx[k].item()) * stride)
                         for k in range(9)]
    assert len(nodes) == len(expected)
    for node, (s, g, row, column) in zip(nodes, expected):
        assert node[:2] == (s, g) and node[2:4] == pytest.approx((row, column), abs=1e-4)


# ====================================================================================================================
# segmentation.py: the Cityscapes models of Tables 2 and 11, their parameters and FLOPs


def test_release_align_corners_in_the_fpn_head(monkeypatch):
    calls = []
    interpolate = segmentation.F.interpolate

    def spy(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename == segmentation.__file__:  # the head's resizes, not the backbone's
            calls.append(kwargs.get("align_corners"))
        return interpolate(*args, **kwargs)

    monkeypatch.setattr(segmentation.F, "interpolate", spy)
    net = segmentation.SemanticFPN(dgmn2.dgmn2_tiny(num_classes=0), 5).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 40, 40)).shape == (1, 5, 40, 40)
    assert len(calls) == (1 + 2 + 3) + 4 + 1 and all(corner is True for corner in calls)  # 2x ups, sums, output
    assert segmentation.DilatedFCN.align_corners is False


def test_the_classifiers_drop_channels_as_the_configs():
    """mmseg's FPNHead (the release's Semantic FPN) and the FCN heads of the CCNet and DANet code bases drop 10% of the
    channels (Dropout2d) before the 1x1 classifier; the release's SETR heads drop nothing."""
    with torch.device("meta"):
        fpn, fcn = segmentation.build("dgmn2-tiny"), segmentation.build("fcn")
        setr = [segmentation.build(f"dgmn2-tiny-{head}") for head in segmentation.SETR_HEADS]
    for net in (fpn, fcn):
        dropout, classifier = net.classifier
        assert type(dropout) is nn.Dropout2d and dropout.p == 0.1 and classifier.kernel_size == (1, 1)
    assert not [m for net in setr for m in net.head.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]


FCN_BASELINES = ["fcn-deformable", "fcn-aspp", "fcn-nonlocal"]


SIDE = 97 * 97  # positions of the 512-channel map of a 769 crop at stride 8


@pytest.mark.parametrize("model", FCN_BASELINES)
def test_each_table_2_baseline_trains_two_steps_with_a_gradient_for_every_parameter(model):
    torch.manual_seed(0)
    net = segmentation.build(model, 5)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(2, 3, 17, 17), torch.randint(0, 5, (2, 17, 17))  # a 3 x 3 map at stride 8
    silent = []
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        silent.append({name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()})
    # Zero-initialised parts: the non-local block's last BN weight is 0, so theta, phi, g and W_z get their gradient
    # from the second step only; DCNv2's offset-and-mask conv starts at 0 but has a gradient from the first step.
    zero_first = {f"context.0.{conv}.{p}" for conv in ("theta", "phi", "g", "out.0") for p in ("weight", "bias")}
    assert silent == [zero_first if model == "fcn-nonlocal" else set(), set()] and math.isfinite(loss.item())
    assert net(images).shape == (2, 5, 17, 17)


def test_new_modules_start_as_the_papers_describe():
    torch.manual_seed(0)
    dcn = dgmn.ModulatedDeformConv(8, 4)
    x = torch.randn(2, 8, 7, 9)
    regular = F.conv2d(x, dcn.weight, padding=1)  # zero offsets, masks sigmoid(0) = 0.5: half a regular 3x3 conv
    torch.testing.assert_close(dcn(x), 0.5 * regular)
    with torch.no_grad():  # trained: the masks are the sigmoid of the predicted third (at 0 any f with f(0) = 0.5 fits)
        dcn.offset_mask.weight.normal_(0, 0.3)
        dcn.offset_mask.bias.normal_(0, 1)
    offsets, masks = dcn.offset_mask(x).split([18, 9], dim=1)
    torch.testing.assert_close(dcn(x), deform_conv2d(x, offsets, dcn.weight, padding=1, mask=masks.sigmoid()))
    aspp = segmentation.ASPP(16)
    # DeepLab v3's rates at output stride 8: twice its (6, 12, 18) at stride 16
    assert [c[0].dilation for c in aspp.convs[1:4]] == [(12, 12), (24, 24), (36, 36)]
    assert aspp(torch.randn(2, 16, 9, 9)).shape == (2, 16, 9, 9)


def test_table_2_baselines_added_counts_within_3_percent_or_the_stated_gap():
    classes, C = segmentation.NUM_CLASSES, segmentation.FCN_CHANNELS
    K, D = 9, segmentation.DCN_CHANNELS
    expected_macs = {  # by hand: convolutions and matrix products on the 97 x 97 map, the classifier's change
        "fcn-deformable": SIDE * (C * D * K + C * 3 * K * K + (D - C) * classes),
        "fcn-aspp": SIDE * (C * 256 + 3 * C * 256 * K + 5 * 256 * C) + C * 256,  # pooling's conv on one position
        "fcn-nonlocal": SIDE * (3 * C * (C // 2) + (C // 2) * C + C * C * K) + 2 * SIDE ** 2 * (C // 2),
    }
    with torch.device("meta"):
        plain = parameter_count(segmentation.build("fcn", classes))
    gaps = {"fcn-aspp": (0.03, 0.06)}  # ASPP's FLOPs: +5.8%, stated in its MODELS row (no standard layout fits both)
    for model in FCN_BASELINES:
        params, macs = segmentation.fcn_added_cost(model)
        with torch.device("meta"):
            assert params == parameter_count(segmentation.build(model, classes)) - plain  # the whole model's difference
        assert macs == expected_macs[model]
        row = segmentation.FCN_VARIANTS[model]
        params_gap, flops_gap = gaps.get(model, (0.03, 0.03))
        assert abs(params / (row.params_m * 1e6) - 1) < params_gap, model
        assert abs(macs / (row.gflops * 1e9) - 1) < flops_gap, model


def test_the_deformable_row_counts_its_deform_conv_by_the_registered_formula():
    params, macs = segmentation.fcn_added_cost("fcn-deformable")
    assert params == 512 * 256 * 9 + 512 * 27 * 9 + 27 + 2 * 256 - 256 * 19  # convs, offset bias, BN, classifier
    assert macs - SIDE * 512 * 27 * 9 > 11e9  # the deformable conv itself, not only its offset conv


@pytest.mark.slow
def test_segmentation_imports_no_training_script():
    source = Path(segmentation.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+\.?\s*train_", source, re.M) and "InputError" not in source
    code = "import sys, segmentation; print(sorted(m for m in sys.modules if m.split('.')[0].startswith('train_')))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-2000:]
    assert "train_cityscapes" in sys.modules  # the check sees modules: this process has one


def test_table_11_parameters_within_1_percent_and_the_backbone_at_output_stride_8():
    for name, row in segmentation.DGMN2_MODELS.items():
        with torch.device("meta"):
            model = segmentation.build(name, segmentation.NUM_CLASSES)
        params = sum(p.numel() for p in model.parameters())
        assert abs(params / (row.params_m * 1e6) - 1) < 0.01, (name, params)
        assert model.backbone.strides == ([4, 8, 16, 32] if row.head == "fpn" else [4, 8, 8, 8])
    tiny = sum(p.numel() for p in dgmn2.build("tiny", num_classes=0).parameters())
    classes, C = segmentation.NUM_CLASSES, (64, 128, 320, 512)
    by_hand = dict(naive=512 * classes + classes,  # the 1x1 classifier
                   pup=(512 * 256 * 9 + 256 + 2 * 256) + 2 * (256 * 256 * 9 + 256 + 2 * 256) + 256 * classes + classes,
                   mla=sum(c * 128 * 9 + 2 * 128 + 128 * 128 * 9 + 2 * 128 for c in C) + 512 * classes + classes)
    for head, count in by_hand.items():
        with torch.device("meta"):
            model = segmentation.build(f"dgmn2-tiny-{head}", classes)
        assert sum(p.numel() for p in model.parameters()) == tiny + count


def gap_columns(params, macs, row):
    """Ours vs the paper's row, as the tables print it: "+0.1% / -0.2%"."""
    return f"{100 * (params / (row.params_m * 1e6) - 1):+.1f}% / {100 * (macs / (row.gflops * 1e9) - 1):+.1f}%"


@pytest.mark.parametrize("name", ["dgmn2-tiny", "dgmn2-tiny-naive"])
def test_table_11_multiply_adds_counted_apart_and_their_gaps(name):
    with torch.device("meta"):
        model = segmentation.build(name, segmentation.NUM_CLASSES).eval()
    params, (macs, _) = parameter_count(model), macs_counted_here(model, (1, 3, 769, 769))
    assert segmentation.dgmn2_cost(name) == (params, macs)
    row = segmentation.DGMN2_MODELS[name]
    assert segmentation.gaps(params, macs, row) == gap_columns(params, macs, row) != "+0.0% / +0.0%"


@pytest.mark.parametrize("head", ["naive", "pup", "mla"])
def test_each_setr_head_trains_two_steps_with_a_gradient_for_every_parameter(head):
    torch.manual_seed(0)
    net = segmentation.SETR(dgmn2.build("tiny", num_classes=0, output_stride=8), head, 5)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images, labels = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2, 32, 32))
    for _ in range(2):
        optimizer.zero_grad()
        loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        silent = [name for name, p in net.named_parameters() if p.grad is None or not p.grad.any()]
        assert silent == [] and math.isfinite(loss.item())
    assert net(images).shape == (2, 5, 32, 32)


def test_setr_heads_resize_as_the_release(monkeypatch):
    calls = []
    interpolate = segmentation.F.interpolate

    def spy(x, size=None, **kwargs):
        if sys._getframe(1).f_code.co_filename == segmentation.__file__:  # the heads' resizes, not the backbone's
            calls.append((tuple(x.shape[-2:]), tuple(size), kwargs.get("align_corners")))
        return interpolate(x, size=size, **kwargs)

    monkeypatch.setattr(segmentation.F, "interpolate", spy)
    maps = [torch.randn(1, c, *side) for c, side in zip((64, 128, 320, 512), [(10, 12), (5, 6), (5, 6), (5, 6)])]
    pup = [((5, 6), (10, 12)), ((10, 12), (20, 24)), ((20, 24), (40, 48)), ((40, 48), (80, 96))]
    expected = dict(naive=[], pup=pup,
                    mla=[((10, 12), (20, 24))] + [((5, 6), (20, 24))] * 3)  # all to 4 x the stride-8 map
    out_sides = dict(naive=(5, 6), pup=(80, 96), mla=(20, 24))
    for head, resizes in expected.items():
        calls.clear()
        with torch.no_grad():
            out = segmentation.SETR_HEADS[head]([m.shape[1] for m in maps], 7).eval()(maps)
        assert out.shape == (1, 7, *out_sides[head])
        assert calls == [(before, after, True) for before, after in resizes]
    calls.clear()
    net = segmentation.SETR(dgmn2.build("tiny", num_classes=0, output_stride=8), "naive", 7).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 33, 40)).shape == (1, 7, 33, 40)
    assert calls == [((5, 5), (33, 40), True)] and segmentation.SETR.align_corners is True


def test_naive_head_is_a_pointwise_classifier_of_the_last_map():
    torch.manual_seed(0)
    net = segmentation.SETR(dgmn2.build("tiny", num_classes=0, output_stride=8), "naive", 4).eval()
    image = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        last = net.backbone.forward_features(image)[-1]  # (1, 512, 3, 3)
        by_hand = torch.einsum("bchw,kc->bkhw", last, net.head.classifier.weight[:, :, 0, 0]) \
            + net.head.classifier.bias[:, None, None]
        torch.testing.assert_close(net(image), F.interpolate(by_hand, size=(24, 24), mode="bilinear",
                                                             align_corners=True))


def test_sliding_window_equals_whole_image_inference():
    torch.manual_seed(0)
    model = dgmn2.dgmn2_tiny(num_classes=0)
    net = segmentation.SemanticFPN(model, 5).eval()
    image = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(segmentation.slide(net, image, 5, window=64, stride=48), net(image))
        pointwise = nn.Conv2d(3, 5, 1)  # overlapping windows of a per-pixel model average equal values
        image = torch.randn(1, 3, 50, 77)
        torch.testing.assert_close(segmentation.slide(pointwise, image, 5, window=32, stride=20),
                                   pointwise(image))
        image = torch.randn(1, 3, 20, 50)  # shorter than the window: mmseg's windows of 20 rows, unpadded, at 0 and 18

        def context(x):  # a model whose every output reads the whole window (padding would change it)
            return pointwise(x) + x.mean((2, 3), keepdim=True).sum(1, keepdim=True)

        expected = torch.zeros(1, 5, 20, 50)
        expected[..., :32] += context(image[..., :32])
        expected[..., 18:] += context(image[..., 18:])
        expected[..., 18:32] /= 2
        torch.testing.assert_close(segmentation.slide(context, image, 5, window=32, stride=20), expected)


def test_multi_scale_prediction_sums_the_softmax_of_logits_resized_back():
    """mmseg's aug_test, as the release evaluates: each scale's (and mirror's) logits back at the image's size, then
    their softmax, summed."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 5, 3, padding=1).eval()
    model.align_corners = True  # as DGMN2's heads resize
    image = torch.randn(1, 3, 30, 41)

    def back(logits):
        return F.interpolate(logits, size=(30, 41), mode="bilinear", align_corners=True)

    with torch.no_grad():
        half = F.interpolate(image, scale_factor=0.5, mode="bilinear", align_corners=False)
        expected = sum(p.softmax(dim=1) for p in (model(image), model(image.flip(-1)).flip(-1), back(model(half)),
                                                   back(model(half.flip(-1))).flip(-1)))
        scores = segmentation.predict(model, image, 5, window=64, stride=48, scales=(1, 0.5), flip=True)
        single = segmentation.predict(model, image, 5, window=64, stride=48)  # one scale, no mirror: one softmax
        torch.testing.assert_close(single, model(image).softmax(dim=1))
    torch.testing.assert_close(scores, expected)


def test_batched_sliding_windows_equal_one_window_a_forward():
    torch.manual_seed(0)
    net = segmentation.SemanticFPN(dgmn2.dgmn2_tiny(num_classes=0), 5).eval()
    image = torch.randn(1, 3, 40, 45)  # 2 x 2 windows of 32
    with torch.no_grad():
        one = segmentation.slide(net, image, 5, window=32, stride=20, batch=1)
        torch.testing.assert_close(segmentation.slide(net, image, 5, window=32, stride=20, batch=3), one)
        border = nn.Sequential(nn.Conv2d(3, 5, 5, padding=2), nn.BatchNorm2d(5), nn.Conv2d(5, 5, 3, padding=1)).eval()
        image = torch.randn(1, 3, 70, 97)  # 4 x 6 windows of 24, each sees its own borders
        one = segmentation.slide(border, image, 5, window=24, stride=15, batch=1)
        for batch in (5, 8, 100):
            torch.testing.assert_close(segmentation.slide(border, image, 5, window=24, stride=15, batch=batch), one)
        channels_last = segmentation.slide(border, image, 5, window=24, stride=15, batch=7, layout=torch.channels_last)
        torch.testing.assert_close(channels_last, one, atol=1e-5, rtol=1e-5)


def ohem_by_hand(logits, labels, threshold, min_kept):
    """A loop over the labelled pixels: under threshold, or the min_kept hardest if fewer are."""
    probabilities = logits.softmax(dim=1)
    pixels = [(probabilities[b, labels[b, i, j], i, j].item(), b, i, j) for b in range(labels.shape[0])
              for i in range(labels.shape[1]) for j in range(labels.shape[2]) if labels[b, i, j] != cs.IGNORE]
    kept = [p for p in pixels if p[0] < threshold]
    if len(kept) < min_kept:
        kept = sorted(pixels)[:min_kept]
    return sum(-math.log(p) for p, *_ in kept) / len(kept), {pixel[1:] for pixel in kept}


def test_cross_entropy_is_the_mean_over_labelled_pixels_and_0_without_any():
    """PyTorch's mean where some pixel is labelled; a crop of ignored pixels alone gives 0 and a zero gradient, where
    F.cross_entropy's mean gives NaN (a run would stop there, and again at the same crop when resumed)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, :2] = cs.IGNORE
    torch.testing.assert_close(segmentation.cross_entropy(logits, labels),
                               F.cross_entropy(logits, labels, ignore_index=cs.IGNORE))
    unlabelled = torch.full_like(labels, cs.IGNORE)
    assert F.cross_entropy(logits, unlabelled, ignore_index=cs.IGNORE).isnan()
    loss = segmentation.cross_entropy(logits, unlabelled)
    loss.backward()
    assert loss.item() == 0 and (logits.grad == 0).all()


def test_ohem_equals_an_explicit_computation_in_each_branch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 5, generator=g) * 3
    labels = torch.randint(0, 3, (2, 4, 5), generator=g)
    labels[0, 0, :3] = labels[1, 2, 1] = cs.IGNORE
    labelled = int((labels != cs.IGNORE).sum())
    assert labelled == 36  # of which 27 are under 0.7 and 20 under 0.2: the three cases take the three branches
    for threshold, min_kept, kept_count in [(0.7, 5, 27), (0.2, 25, 25), (0.2, 100, labelled), (0.2, 0, 20)]:
        expected, kept = ohem_by_hand(logits, labels, threshold, min_kept)
        assert len(kept) == kept_count
        x = logits.clone().requires_grad_()
        loss = segmentation.ohem_cross_entropy(x, labels, threshold, min_kept)
        torch.testing.assert_close(loss.item(), expected, rtol=1e-5, atol=1e-6)
        loss.backward()
        with_gradient = {tuple(p) for p in x.grad.abs().sum(dim=1).nonzero().tolist()}
        assert with_gradient == kept  # no other pixel, ignored ones least of all, takes part


def test_pretrained_takes_the_release_checkpoint_with_its_argparse_namespace(tmp_path):
    path = tmp_path / "dgmn2_tiny_model.pth"
    torch.save(dict(model=release_tiny_checkpoint().state_dict(), args=argparse.Namespace(lr=1e-3)), path)
    with pytest.raises(Exception):  # a plain weights-only load refuses the Namespace
        torch.load(path, weights_only=True)
    ours, reference = segmentation.build("dgmn2-tiny"), dgmn2.build("tiny", num_classes=0)
    segmentation.load_pretrained(ours, dgmn2.load_checkpoint(str(path)))
    dgmn2.load_official(reference, str(path))
    torch.testing.assert_close(ours.backbone.state_dict(), reference.state_dict(), rtol=0, atol=0)


def test_a_bare_dgmn2_state_dict_of_ours_starts_each_model(tmp_path):
    """torch.save(model.state_dict()) of a DGMN2 (its classifier included) is weights to start from everywhere, as
    train_imagenet.py's checkpoints are: --weights (ImageNet), --pretrained (Cityscapes, COCO)."""
    torch.manual_seed(0)
    trained = dgmn2.dgmn2_tiny(num_classes=10)
    path = tmp_path / "bare.pth"
    torch.save(trained.state_dict(), path)
    expected = {k: v for k, v in trained.state_dict().items() if not k.startswith("head.")}
    segmenter = segmentation.build("dgmn2-tiny")
    segmentation.load_pretrained(segmenter, dgmn2.load_checkpoint(path))
    detector = detection.build("retinanet-dgmn2-tiny", 91)
    detection.load_pretrained(detector, dgmn2.load_checkpoint(path))
    classifier = train_imagenet.build_model(train_imagenet.Config(weights=str(path)), 10, torch.device("cpu"),
                                            lambda *_: None)
    backbones = [segmenter.backbone.state_dict(), detector.backbone.body.state_dict(), classifier.state_dict()]
    for loaded in backbones:
        torch.testing.assert_close({k: loaded[k] for k in expected}, expected, rtol=0, atol=0)
    torch.testing.assert_close(classifier.head.weight, trained.head.weight, rtol=0, atol=0)


# ====================================================================================================================
# detection.py: the COCO models of Tables 3, 5, 7, 8 and 16, their parameters and FLOPs


@pytest.mark.parametrize("model", ["retinanet-dgmn2-tiny", "maskrcnn-dgmn2-tiny",
                                   pytest.param("maskrcnn-r50-dgmn-c5", marks=pytest.mark.slow)])
def test_every_detector_parameter_gets_a_gradient(model):
    torch.manual_seed(0)
    detector = detection.build(model, 5, min_size=64, max_size=64)
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 4:30], masks[1, 30:60, 36:62] = 1, 1
    target = dict(boxes=torch.tensor([[4.0, 8, 30, 40], [36, 30, 62, 60]]), labels=torch.tensor([1, 4]), masks=masks)
    losses = detector([torch.rand(3, 64, 64), torch.rand(3, 64, 64)], [target, target])
    sum(losses.values()).backward()
    assert not [n for n, p in detector.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]


def test_detector_parameter_counts_equal_tables_7_and_8():
    for name, spec in detection.MODELS.items():
        if spec.backbone in dgmn2.VARIANTS:  # the paper's heads score 80 classes (Mask R-CNN: and the background)
            with torch.device("meta"):
                detector = detection.build(name, 80 + (spec.detector == "maskrcnn"))
            assert abs(sum(p.numel() for p in detector.parameters()) / 1e6 - spec.params_m) < 0.15, name


def halved(side, times):
    """A side after `times` 3x3 (or 1x1 pooling) stride-2 steps with padding: each rounds up."""
    for _ in range(times):
        side = (side + 1) // 2
    return side


def test_mask_rcnn_keeps_its_releases_proposals_in_training():
    """1000 RPN proposals an image in training (torchvision's default: 2000), as the releases; 1000 at test."""
    with torch.device("meta"):
        kept = [detection.build(name, 91).rpn._post_nms_top_n for name in ("maskrcnn-dgmn2-tiny", "maskrcnn-r50")]
    assert kept == [dict(training=1000, testing=1000)] * 2


def test_the_detectors_keep_their_releases_detections_sampled_rois_and_two_criss_cross_passes():
    """RetinaNet's 100 detections an image (mmdetection's max_per_img), Mask R-CNN's 512 RoIs an image for its box and
    mask heads (Detectron's) and 100 detections, and Table 3's criss-cross attention looping twice (CCNet's R = 2)."""
    with torch.device("meta"):
        retinanet, mask_rcnn = detection.build("retinanet-dgmn2-tiny", 91), detection.build("maskrcnn-r50", 91)
        ccnet = detection.build("maskrcnn-r50-ccnet", 91)
    assert retinanet.detections_per_img == 100
    heads = mask_rcnn.roi_heads
    assert heads.fg_bg_sampler.batch_size_per_image == 512 and heads.detections_per_img == 100
    assert [m.recurrence for m in ccnet.modules() if isinstance(m, dgmn.CrissCrossAttention)] == [2]


def test_the_set_prediction_backbones_strides_and_channels_are_their_maps():
    """ResNet layers 1-4 and DGMN2 stages 0-3 at strides 4-32, as their maps come out (Sparse R-CNN's RoIAlign and
    level rule read the strides), for Deformable DETR's three maps and Sparse R-CNN's four."""
    with torch.device("meta"):
        for backbone in [detection.ResNetStages("resnet50"), detection.ResNetStages("resnet50", (1, 2, 3, 4)),
                         detection.DGMN2Stages("tiny"), detection.DGMN2Stages("tiny", (0, 1, 2, 3))]:
            maps = backbone(torch.empty(1, 3, 128, 192))
            assert [tuple(m.shape[-2:]) for m in maps] == [(128 // s, 192 // s) for s in backbone.strides]
            assert [m.shape[1] for m in maps] == backbone.channels


def test_the_set_prediction_counts_add_the_bilinear_reads():
    """detection.macs_with_reads: a DGMN2 as dgmn2.model_macs counts it (4 multiply-adds a sampled element and channel
    beyond FlopCounterMode's), and each output element of F.grid_sample (the deformable attention's reads) at 5: its 4
    bilinear neighbours and the attention weight."""
    with torch.device("meta"):
        body, shape = dgmn2.build("tiny", num_classes=0).eval(), (1, 3, 64, 96)
        total, bilinear = dgmn2.model_macs(body, shape)
        assert bilinear > 0 and detection.macs_with_reads(lambda: body(torch.empty(shape))) == total
        values, grid = torch.empty(2, 3, 5, 6), torch.empty(2, 7, 4, 2)
        assert detection.macs_with_reads(lambda: F.grid_sample(values, grid, align_corners=False)) == 5 * 2 * 3 * 7 * 4


def test_the_cost_table_counts_mask_rcnn_r50_as_torchvisions_model_by_hand():
    """detection.cost against torchvision's own Mask R-CNN R-50 at 81 classes: its parameters less the stem's, res2's
    and every BN's (frozen in the pretrained backbone), its backbone through FlopCounterMode, and the heads counted by
    hand at COUNTING's sizes."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        reference = torchvision.models.detection.maskrcnn_resnet50_fpn(num_classes=81, weights_backbone=None)
        with FlopCounterMode(display=False) as counter:
            reference.backbone(torch.empty(1, 3, 800, 1333))
    levels = [(halved(800, s), halved(1333, s)) for s in (2, 3, 4, 5, 6)]  # strides 4 to 64 (P6: pooled P5)
    rpn = sum(h * w for h, w in levels) * (256 * 256 * 9 + 256 * 3 + 256 * 3 * 4)  # 3 anchors a place
    box = 1000 * (256 * 7 * 7 * 1024 + 1024 * 1024 + 1024 * 81 + 1024 * 81 * 4)  # TwoMLPHead, classes and boxes
    mask = 100 * (4 * 14 * 14 * 256 * 256 * 9 + 14 * 14 * 256 * 256 * 4 + 28 * 28 * 256 * 81)  # convs, 2x up, logits
    body, norms = reference.backbone.body, [m for m in reference.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = {id(p) for m in [body.conv1, body.layer1, *norms] for p in m.parameters()}
    trainable = sum(p.numel() for p in reference.parameters() if id(p) not in frozen)
    assert detection.cost("maskrcnn-r50") == (trainable, counter.get_total_flops() // 2 + rpn + box + mask)


def test_the_cost_table_counts_retinanet_dgmn2_tiny_by_hand_beyond_the_backbone():
    """detection.cost against DGMN2-Tiny's stages (FlopCounterMode, as dgmn2.model_macs less the bilinear reads) and
    the FPN, P6, P7 and RetinaNet head counted by hand at 800 x 1333, 80 classes, 9 anchors a place."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        body = dgmn2.build("tiny", num_classes=0).eval()
        with FlopCounterMode(display=False) as counter:
            body.forward_features(torch.empty(1, 3, 800, 1333))
    channels = body.channels[1:]  # C3-C5: strides 8, 16, 32
    sides = [halved(800, s) * halved(1333, s) for s in (3, 4, 5, 6, 7)]  # P3-P7
    lateral = sum(c * 256 * side for c, side in zip(channels, sides))
    outputs = 256 * 256 * 9 * sum(sides[:3])
    extra = 512 * 256 * 9 * sides[3] + 256 * 256 * 9 * sides[4]  # P6 from C5, P7 from P6
    head = sum(sides) * (2 * 4 * 256 * 256 * 9 + 256 * 9 * 80 * 9 + 256 * 9 * 4 * 9)  # two towers, logits, boxes
    params = (parameter_count(body) + sum(c * 256 + 256 for c in channels) + 3 * (256 * 256 * 9 + 256)
              + 512 * 256 * 9 + 256 + 256 * 256 * 9 + 256
              + 2 * 4 * (256 * 256 * 9 + 256) + 256 * 9 * 80 * 9 + 80 * 9 + 256 * 9 * 4 * 9 + 4 * 9)
    assert detection.cost("retinanet-dgmn2-tiny") == (params, counter.get_total_flops() // 2 + lateral + outputs
                                                      + extra + head)


class StandIn(nn.Module):
    """In place of DGMN2 + FPN's layers: bf16 convolutions take the slow path on CPUs without bf16 instructions (the
    whole DGMN2-Tiny RetinaNet at 800 x 800 takes over a minute here). The body's stage maps are the image itself; the
    FPN's levels, named and strided as the real ones, 256 channels each, are a 1x1 convolution of the pooled image."""

    def __init__(self, levels):
        super().__init__()
        self.levels, self.conv = levels, nn.Conv2d(3, 256, 1)

    def forward_features(self, images):
        return [images] * 4

    def forward(self, maps):
        image = next(iter(maps.values()))
        return {name: self.conv(F.avg_pool2d(image, stride, ceil_mode=True)) for name, stride in self.levels.items()}


def cheap_detector(name):
    """detection.build's detector at 800 x 800 (its hooks, torchvision's anchors, RPN, RoI heads, box coders and
    post-processing), its heavy convolutions replaced by cheap ones (under autocast, bf16 all the same); every score
    kept, so that random weights give boxes."""
    torch.manual_seed(0)
    model = detection.build(name, 2, min_size=800, max_size=800, rois=64)
    if name.startswith("retinanet"):
        model.backbone.body = model.backbone.fpn = StandIn(dict(zip(["0", "1", "2", "p6", "p7"], [8, 16, 32, 64, 128])))
        heads = model.head.classification_head, model.head.regression_head
        heads[0].conv = heads[1].conv = nn.Identity()
        heads[0].cls_logits = nn.Conv2d(256, heads[0].cls_logits.out_channels, 1)
        heads[1].bbox_reg = nn.Conv2d(256, heads[1].bbox_reg.out_channels, 1)
        model.score_thresh = 0.0
    else:
        model.backbone.body = model.backbone.fpn = StandIn(dict(zip(["0", "1", "2", "3", "pool"], [4, 8, 16, 32, 64])))
        model.rpn.head.conv = model.roi_heads.mask_head = nn.Identity()
        model.rpn._pre_nms_top_n, model.rpn._post_nms_top_n = dict(training=1000, testing=1000), dict(training=200,
                                                                                                       testing=200)
        model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.0, 50
    return model


@pytest.mark.parametrize("name", ["retinanet-dgmn2-tiny", "maskrcnn-dgmn2-tiny"])
def test_bf16_autocast_gives_float32_boxes(name):
    image, masks = torch.rand(3, 800, 800, generator=torch.Generator().manual_seed(1)), torch.zeros(1, 800, 800)
    masks[0, 100:300, 200:500] = 1
    target = dict(boxes=torch.tensor([[200.0, 100, 500, 300]]), labels=torch.tensor([1]), masks=masks.byte())
    for hooks in (True, False):
        model = cheap_detector(name)
        if not hooks:  # the control: without detection.build's hooks, the boxes are bf16, on bf16's grid
            for module in model.modules():
                module._forward_hooks.clear()
        with torch.autocast("cpu", torch.bfloat16):
            losses = model([image], [target]) if hooks else {}
            with torch.no_grad():
                detections = model.eval()([image])[0]
        boxes, left = detections["boxes"], detections["boxes"][:, 0]
        assert len(boxes) >= 50 and left.max() > 512  # bf16's grid there: 4 px
        on_grid = (left == left.bfloat16().to(left.dtype)).float().mean()  # 0 and 800 (clipped boxes) lie on it
        distinct = len(left.unique()) / len(left)
        if hooks:
            assert boxes.dtype == detections["scores"].dtype == torch.float32
            assert on_grid < 0.1 and distinct > 0.9, (on_grid, distinct)  # bf16 boxes: 0.79-0.88 distinct here
            assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in losses.values())
            assert "masks" not in detections or detections["masks"].dtype == torch.float32
        else:
            assert boxes.dtype == torch.bfloat16 and on_grid == 1


NEW_MODELS = ["maskrcnn-r50-gcnet", "maskrcnn-r50-dmp", "maskrcnn-r50-nonlocal", "maskrcnn-r50-ccnet",
              "maskrcnn-r50-dgmn", "maskrcnn-r50-gcnet-c5", "maskrcnn-r50-dcn-c5"]


DEEPER = ["maskrcnn-r101", "maskrcnn-r101-dgmn-c5", "maskrcnn-x101", "maskrcnn-x101-dgmn-c5", "maskrcnn-x101-64x4d"]


@pytest.mark.parametrize("model", [m if m == "maskrcnn-r50-dgmn" else pytest.param(m, marks=pytest.mark.slow)
                                   for m in NEW_MODELS])  # one in the quick check
def test_every_baseline_backbone_parameter_learns_in_two_steps(model):
    """Two SGD steps of the backbone (the ResNet-50 with its module, the FPN) on a loss over every FPN level: by the
    second every parameter has had a gradient (zero-initialised parts, such as GCNet's last conv or the non-local
    block's BN, pass one on only once the first step has moved them). The heads are maskrcnn-r50's, trained
    elsewhere."""
    torch.manual_seed(0)  # BN trains: with random weights, frozen BN would pass unnormalised activations on
    backbone = detection.build(model, 5, min_size=64, max_size=64).backbone
    optimizer = torch.optim.SGD(backbone.parameters(), lr=1e-4)  # small: walks that leave a 2 x 2 map read zeros
    images, learnt = torch.rand(2, 3, 64, 64), set()
    for _ in range(2):
        optimizer.zero_grad()
        sum(level.square().mean() for level in backbone(images).values()).backward()
        learnt |= {n for n, p in backbone.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
    assert learnt == {n for n, p in backbone.named_parameters() if p.requires_grad}


def count_on_meta(name):
    """(the parameters that train with --pretrained, the inserted modules' weights) at the paper's 80 classes."""
    with torch.device("meta"):
        detector = detection.build(name, 81, pretrained=True)
    parameters = dict(detector.named_parameters())
    trainable = sum(p.numel() for p in parameters.values() if p.requires_grad)
    return trainable, sum(p.numel() for n, p in parameters.items() if ".context." in n and n.endswith("weight"))


def test_r50_dgmn_c4c5_has_section_5_3s_51_1m_parameters_in_the_release_layout():
    plain, _ = count_on_meta("maskrcnn-r50")
    trainable, module_weights = count_on_meta("maskrcnn-r50-dgmn-c4c5")
    # the release's layout: 2268 C weights a module at four rates (C -> 2K walks and G K + K predictors, 3x3 each)
    assert module_weights == 2268 * (3 * 512 + 6 * 256)  # res5's three 512-channel 3x3 convs, res4's six 256
    assert abs(trainable / 1e6 - 51.1) < 0.01 * 51.1
    assert trainable - plain - module_weights == 9 * 4 * (18 + 1)  # and per module and rate: walk biases, a scale


@pytest.mark.slow
def test_deeper_backbones_count_as_the_paper_and_run():
    for name, paper in [("maskrcnn-r101", 63.1), ("maskrcnn-x101-64x4d", 101.9)]:  # Section 5.3, Table 8
        assert abs(count_on_meta(name)[0] / 1e6 - paper) < 0.01 * paper
    for name, channels in [("maskrcnn-r101-dgmn-c5", 512), ("maskrcnn-x101-dgmn-c5", 2048)]:  # res5's 3x3 convs
        assert count_on_meta(name)[1] == 3 * 2268 * channels
    for name in DEEPER:  # backbone and FPN on the meta device: the levels at strides 4-64
        with torch.device("meta"):
            detector = detection.build(name, 81)
            levels = detector.backbone(torch.empty(1, 3, 96, 128))
        assert [tuple(f.shape[-2:]) for f in levels.values()] == [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]


def test_dcn_counts_as_a_plain_conv_plus_its_offset_conv():
    _, plain = detection.cost("maskrcnn-r50")
    _, deformable = detection.cost("maskrcnn-r50-dcn-c5")
    H, W = 25, 42  # res5 of 800 x 1333
    assert deformable - plain == 3 * (3 * 9) * (512 * 3 * 3) * H * W  # res5's offset-and-mask convs, 3K outputs


def test_torchvision_resnets_load_missing_only_the_inserted_modules():
    for name, make, called in [("maskrcnn-r101-dgmn-c5", torchvision.models.resnet101, "ResNet-101"),
                               ("maskrcnn-x101-dgmn-c5", torchvision.models.resnext101_32x8d, "ResNeXt-101 32x8d")]:
        with torch.device("meta"):  # keys and shapes only
            detector, state = detection.build(name, 81, pretrained=True), make().state_dict()
        detection.load_pretrained(detector, state)
        missing = detector.backbone.body.state_dict().keys() - state.keys()
        assert missing and all(".conv2.context." in key and key.startswith("layer4.") for key in missing)
        with torch.device("meta"):
            other = torchvision.models.resnet50().state_dict()
        with pytest.raises(ValueError, match=f"not a torchvision {called} state"):
            detection.load_pretrained(detector, other)
    torch.manual_seed(0)
    dcn = detection.build("maskrcnn-r50-dcn-c5", 81, pretrained=True)
    weights = torchvision.models.resnet50().state_dict()
    detection.load_pretrained(dcn, weights)  # the DCN keeps the replaced conv's weight by name
    torch.testing.assert_close(dcn.backbone.body.layer4[1].conv2.weight, weights["layer4.1.conv2.weight"])
    assert isinstance(dcn.backbone.body.layer4[1].conv2, dgmn.ModulatedDeformConv)


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_detection_imports_neither_a_training_script_nor_pycocotools():
    loaded = "import sys; print(sorted(m for m in sys.modules if m.startswith(('train_', 'pycocotools'))))"
    run = subprocess.run([sys.executable, "-c", f"import detection; {loaded}; import train_coco; {loaded}"],
                         cwd=Path(__file__).parent, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    alone, with_the_script = run.stdout.splitlines()
    assert alone == "[]"
    assert "'train_coco'" in with_the_script and "'pycocotools'" in with_the_script  # the control: it would show


# ====================================================================================================================
# deformable_detr.py and matching.py: Table 9


def bilinear_read(image, x, y):
    """One bilinear read of image (D, H, W) at pixel coordinates x, y (centres at integers), zero outside."""
    D, H, W = image.shape
    x0, y0 = math.floor(x), math.floor(y)
    total = torch.zeros(D, dtype=image.dtype)
    for dy, dx in itertools.product((0, 1), (0, 1)):
        yy, xx = y0 + dy, x0 + dx
        if 0 <= yy < H and 0 <= xx < W:
            total = total + (1 - abs(y - yy)) * (1 - abs(x - xx)) * image[:, yy, xx]
    return total


def deformable_inputs(B=2, Q=3, M=2, D=3, shapes=((3, 4), (2, 3)), P=2, seed=0):
    """value (B, N, M, D), locations (B, Q, M, L, P, 2) inside and beyond [0, 1], off the pixels' kinks; weights."""
    g = torch.Generator().manual_seed(seed)
    N, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(B, N, M, D, generator=g, dtype=torch.float64)
    shape = (B, Q, M, L, P, 2)
    pixels = torch.randint(-1, 5, shape, generator=g) + 0.1 + 0.8 * torch.rand(shape, generator=g)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float64).view(1, 1, 1, L, 1, 2)
    locations = ((pixels + 0.5) / size).double()  # pixel p's centre at (p + 0.5) / size
    weights = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64)
    return value, list(shapes), locations, weights


def test_deformable_attention_reads_as_a_loop_of_bilinear_reads():
    value, shapes, locations, weights = deformable_inputs()
    B, Q, M, L, P, _ = locations.shape
    expected = torch.zeros(B, Q, M, value.shape[-1], dtype=torch.float64)
    starts = [0] + list(itertools.accumulate(h * w for h, w in shapes))
    for b, q, m, level, p in itertools.product(range(B), range(Q), range(M), range(L), range(P)):
        H, W = shapes[level]
        image = value[b, starts[level]:starts[level + 1], m].T.reshape(-1, H, W)  # (D, H, W)
        x, y = locations[b, q, m, level, p].tolist()
        expected[b, q, m] += weights[b, q, m, level, p] * bilinear_read(image, x * W - 0.5, y * H - 0.5)
    torch.testing.assert_close(deformable_detr.sample_levels(value, shapes, locations, weights),
                               expected.flatten(2))


def test_deformable_attention_reads_bf16_values_at_float32_locations():
    """Under autocast the values come in bf16 and the locations in float32: the points stay where the locations put
    them (a bf16 grid has 8 bits: up to a sixth of a pixel off near the edge of a 167-pixel-wide level)."""
    W = 167
    value = torch.arange(W, dtype=torch.bfloat16).repeat(2)[None, :, None, None]  # (1, 2 W, 1, 1): a ramp, exact
    x = torch.linspace(0.6, 0.99, 50, dtype=torch.float64)
    locations = torch.stack([x, torch.full_like(x, 0.5)], -1)[None, :, None, None, None].float()  # (1, Q, 1, 1, 1, 2)
    sampled = deformable_detr.sample_levels(value, [(2, W)], locations, torch.ones(1, 50, 1, 1, 1))  # (1, Q, 1)
    torch.testing.assert_close(sampled[0, :, 0].double(), x * W - 0.5, rtol=0, atol=1e-3)  # the ramp at x


def test_deformable_attention_gradcheck_and_padded_values_read_as_zeros():
    value, shapes, locations, weights = deformable_inputs(B=1, Q=2, D=2)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(lambda v, loc, w: deformable_detr.sample_levels(v, shapes, loc, w), inputs)
    torch.manual_seed(0)
    attention = deformable_detr.DeformableAttention(16, heads=2, levels=2, points=2).double()
    query, values = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 18, 16, dtype=torch.float64)
    reference = torch.rand(2, 5, 2, 2, dtype=torch.float64)
    padding = torch.zeros(2, 18, dtype=torch.bool)
    padding[1, 10:] = True  # the second image's last tokens are padding
    changed = values.clone()
    changed[1, 10:] = 100.0
    out = attention(query, reference, values, [(3, 4), (2, 3)], padding)
    torch.testing.assert_close(attention(query, reference, changed, [(3, 4), (2, 3)], padding), out)
    assert not torch.allclose(attention(query, reference, changed, [(3, 4), (2, 3)], padding & False), out)


def test_deformable_attention_starts_as_upstream():
    attention = deformable_detr.DeformableAttention()
    bias = attention.sampling_offsets.bias.view(8, 4, 4, 2)  # (M, L, P, xy)
    rays = bias[:, 0, 0]  # point 1 of level 0: each head's unit step, its larger coordinate +-1
    torch.testing.assert_close(rays.abs().max(-1).values, torch.ones(8))
    angles = torch.atan2(rays[:, 1], rays[:, 0]) % (2 * math.pi)
    torch.testing.assert_close(angles, torch.arange(8) * math.pi / 4)
    torch.testing.assert_close(bias, rays[:, None, None] * torch.arange(1.0, 5).view(1, 1, 4, 1).expand(8, 4, 4, 1))
    assert not attention.sampling_offsets.weight.any() and not attention.attention_weights.weight.any()
    detr = detection.build("deformable-detr-dgmn2-tiny", 91)
    head, box = detr.class_heads[0], detr.box_heads[0].layers[-1]
    torch.testing.assert_close(head.bias, torch.full((91,), -math.log(99)))
    assert not box.weight.any() and box.bias.tolist() == [0, 0, -2, -2]
    plus = detection.build("deformable-detr-plus-dgmn2-small", 91)
    assert all(not h.layers[-1].bias.any() for h in plus.box_heads) and len(plus.box_heads) == 7
    for layer in (plus.enc_output, plus.pos_trans):  # xavier's bound, above nn.Linear's 1 / sqrt(fan in)
        bound = math.sqrt(6 / sum(layer.weight.shape))
        assert 0.95 * bound < layer.weight.abs().max() <= bound
    refined = deformable_detr.DeformableDETR(detr.backbone, 91, box_refine=True)  # upstream: the first head's -2 alone
    assert [h.layers[-1].bias.tolist() for h in refined.box_heads] == [[0, 0, -2, -2]] + [[0, 0, 0, 0]] * 5


def sines(angle, features, temperature=10000):
    """Upstream's sine encoding of one angle: `features` values, sin at even and cos at odd channels, channel pair k at
    a wavelength of temperature ** (2 k / features)."""
    return [(math.sin, math.cos)[c % 2](angle / temperature ** (2 * (c // 2) / features)) for c in range(features)]


def test_the_sine_encodings_are_upstreams_by_hand():
    """A pixel's: y then x, each its 0-based index plus a half over its column's (row's) unpadded pixels, times 2 pi
    (Deformable DETR's PositionEmbeddingSine, normalised, offset -0.5); a two-stage box's: each coordinate times 2 pi,
    in turn (its get_proposal_pos_embed)."""
    padding = torch.zeros(2, 4, 5, dtype=torch.bool)
    padding[1, 3:], padding[1, :, 2:] = True, True  # the second image: 3 rows and 2 columns
    pos = deformable_detr.sine_position(padding, features=6)
    assert pos.shape == (2, 12, 4, 5)
    for b, (h, w) in enumerate([(4, 5), (3, 2)]):
        for i, j in itertools.product(range(h), range(w)):
            expected = sines((i + 0.5) / h * 2 * math.pi, 6) + sines((j + 0.5) / w * 2 * math.pi, 6)
            torch.testing.assert_close(pos[b, :, i, j], torch.tensor(expected))
    boxes = torch.rand(2, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    encoded = deformable_detr.box_position(boxes, features=6)
    expected = [[sum((sines(x * 2 * math.pi, 6) for x in box.tolist()), []) for box in image] for image in boxes]
    torch.testing.assert_close(encoded, torch.tensor(expected, dtype=torch.float64))


def test_boxes_are_corrections_of_their_reference_before_the_sigmoid():
    """inverse_sigmoid undoes the sigmoid (finite at 0 and 1); a zero correction leaves a reference box where it is and
    puts a reference point's box at the point with sides sigmoid(0) = 1/2; a correction of log 3 takes 1/2 to 3/4."""
    x = torch.tensor([0.01, 0.2, 0.5, 0.9, 0.999])
    torch.testing.assert_close(deformable_detr.inverse_sigmoid(x).sigmoid(), x)
    assert deformable_detr.inverse_sigmoid(torch.tensor([0.0, 1.0])).isfinite().all()
    boxes, zero = deformable_detr.DeformableDETR.boxes, torch.zeros(1, 1, 4)
    reference = torch.tensor([[[0.3, 0.6, 0.2, 0.1]]])
    torch.testing.assert_close(boxes(zero, reference), reference)
    torch.testing.assert_close(boxes(zero, reference[..., :2]), torch.tensor([[[0.3, 0.6, 0.5, 0.5]]]))
    torch.testing.assert_close(boxes(torch.full((1, 1, 4), math.log(3)), torch.full((1, 1, 4), 0.5)),
                               torch.full((1, 1, 4), 0.75))


@pytest.mark.parametrize("box", [False, True])
def test_deformable_attention_is_upstreams_msdeformattn(box):
    """The module around sample_levels as upstream's MSDeformAttn composes it: values projected (padding zeroed),
    offsets read as (M, L, P, xy), weights a softmax over each head's L P points, offsets in pixels of each level
    (x / W_l, y / H_l) from a reference point, or in halves of the reference box's sides over P; output projected."""
    torch.manual_seed(0)
    M, L, P, C, shapes = 2, 2, 2, 8, [(3, 4), (2, 3)]
    attention = deformable_detr.DeformableAttention(C, heads=M, levels=L, points=P).double()
    for layer in (attention.sampling_offsets, attention.attention_weights):  # not their start: every value counts
        nn.init.normal_(layer.weight, std=0.5)
        nn.init.normal_(layer.bias)
    query, values = torch.randn(2, 5, C, dtype=torch.float64), torch.randn(2, 18, C, dtype=torch.float64)
    reference = torch.rand(2, 5, L, 4 if box else 2, dtype=torch.float64) * 0.5 + 0.25
    padding = torch.zeros(2, 18, dtype=torch.bool)
    padding[1, 15:] = True
    out = attention(query, reference, values, shapes, padding)
    value = attention.value_proj(values).masked_fill(padding[..., None], 0).view(2, 18, M, C // M)
    offsets = attention.sampling_offsets(query).view(2, 5, M, L, P, 2)
    weights = attention.attention_weights(query).view(2, 5, M, L * P).softmax(-1).view(2, 5, M, L, P)
    ref = reference[:, :, None, :, None]  # (B, Q, 1, L, 1, 2 or 4)
    if box:
        locations = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5
    else:
        locations = ref + offsets / torch.tensor([[4.0, 3], [3, 2]], dtype=torch.float64)[:, None]  # (W_l, H_l)
    expected = attention.output_proj(deformable_detr.sample_levels(value, shapes, locations, weights))
    torch.testing.assert_close(out, expected)


def test_masked_group_norm_is_group_norm_of_the_image_alone():
    """On an unpadded image torch's GroupNorm; on a padded one GroupNorm of the image's pixels, the padding left out."""
    torch.manual_seed(0)
    norm = deformable_detr.MaskedGroupNorm(4, 8).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    inside = torch.ones(2, 5, 6, dtype=torch.bool)
    inside[1, 3:], inside[1, :, 4:] = False, False  # the second image: 3 x 4
    out = norm(x, inside)
    torch.testing.assert_close(out[:1], F.group_norm(x[:1], 4, norm.weight, norm.bias, norm.eps))
    torch.testing.assert_close(out[1:, :, :3, :4], F.group_norm(x[1:, :, :3, :4], 4, norm.weight, norm.bias, norm.eps))


def test_the_decoders_self_attention_reads_the_positions_in_its_queries_and_keys_only():
    """Upstream's decoder layer: self_attn(q + pos, k + pos, v = q). With the attention uniform (its query and key
    projections zero), what norm1 receives is the queries plus the projected mean of their projected values, whatever
    the positions."""
    torch.manual_seed(0)
    layer = deformable_detr.DecoderLayer(16, heads=2).eval()
    attention = layer.self_attn
    with torch.no_grad():
        attention.in_proj_weight[:32], attention.in_proj_bias[:32] = 0, 0  # the queries' and keys' projections
    received = []
    layer.norm1.register_forward_hook(lambda module, args, out: received.append(args[0]))
    queries, memory, padding = torch.randn(2, 5, 16), torch.randn(2, 16, 16), torch.zeros(2, 16, dtype=torch.bool)
    reference = torch.rand(2, 5, deformable_detr.LEVELS, 2)
    with torch.no_grad():
        for pos in (torch.zeros(2, 5, 16), torch.randn(2, 5, 16)):
            layer(queries, pos, reference, memory, [(2, 2)] * deformable_detr.LEVELS, padding)
        mean = F.linear(queries, attention.in_proj_weight[32:], attention.in_proj_bias[32:]).mean(1, keepdim=True)
        expected = queries + attention.out_proj(mean)
    for seen in received:
        torch.testing.assert_close(seen, expected)


@functools.cache
def detection_cost(name, cost=detection.cost):
    """detection.cost(name), counted once for all the tests that read it (half a minute for every COCO model)."""
    return cost(name)


@pytest.mark.slow
def test_table_9_parameters_and_flops():
    """Parameters exactly as counted from the release (its 91 classes, the R-50 rows' trainable ones); the base rows'
    FLOPs within 2% of Table 9 with the bilinear reads counted (detection.COUNTING), the "+" rows' printed."""
    expected = {"deformable-detr-r50": 39_847_265, "deformable-detr-dgmn2-tiny": 23_992_529,
                "deformable-detr-dgmn2-small": 32_859_425, "deformable-detr-dgmn2-medium": 47_702_777,
                "deformable-detr-plus-r50": 40_959_129, "deformable-detr-plus-dgmn2-small": 33_971_289}
    assert [n for n in detection.MODELS if n.startswith("deformable")] == list(expected)
    for name, count in expected.items():
        params, macs = detection_cost(name)
        assert params == count, name
        spec = detection.MODELS[name]
        assert abs(params / 1e6 - spec.params_m) < 0.06 and spec.table == "Table 9"  # R-50: 39.85 for 39.9
        if "plus" not in name:
            assert abs(macs / 1e9 / spec.gflops - 1) < 0.02, (name, macs)


def box_corners(box):
    """(x0, y0, x1, y1) of a (cx, cy, w, h) box given as 4 floats."""
    cx, cy, w, h = box
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2


def giou_from_corners(a, b):
    """GIoU of two (cx, cy, w, h) boxes: IoU less the share of their enclosing box that neither covers."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = box_corners(a), box_corners(b)
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
    return inter / union - (hull - union) / hull


def focal_by_hand(logit, on):
    """Sigmoid focal loss (alpha 0.25, gamma 2) of one logit against target 1 (on) or 0."""
    p = 1 / (1 + math.exp(-logit))
    return 0.25 * (1 - p) ** 2 * -math.log(p) if on else 0.75 * p ** 2 * -math.log(1 - p)


def matching_cost_by_hand(logits, box, label, goal, box_format="cxcywh"):
    """Deformable DETR's matching cost of one query (K logits, a box) and one target (its class, its box), the boxes
    (cx, cy, w, h) or, as Sparse R-CNN's, corners (x0, y0, x1, y1): L1 on the coordinates given."""
    p = 1 / (1 + math.exp(-logits[label]))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p ** 2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, goal))
    if box_format == "xyxy":
        box, goal = ([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0] for x0, y0, x1, y1 in (box, goal))
    return 2 * focal + 5 * l1 - 2 * giou_from_corners(box, goal)


def random_boxes(n, g):
    """n (cx, cy, w, h) boxes, centres anywhere in the image, sides 0.1 to 0.5: (n, 4)."""
    return torch.cat([torch.rand(n, 2, generator=g), 0.1 + 0.4 * torch.rand(n, 2, generator=g)], -1)


def random_batch(Q, counts, K=3, seed=0):
    """Predictions dict(logits (B, Q, K), boxes (B, Q, 4)) and B targets of counts[b] boxes each."""
    g = torch.Generator().manual_seed(seed)
    prediction = dict(logits=torch.randn(len(counts), Q, K, generator=g),
                      boxes=torch.stack([random_boxes(Q, g) for _ in counts]))
    targets = [dict(labels=torch.randint(0, K, (T,), generator=g), boxes=random_boxes(T, g)) for T in counts]
    return prediction, targets


@pytest.mark.parametrize("box_format", ["cxcywh", "xyxy"])
def test_the_matcher_finds_the_cheapest_of_all_injective_assignments(box_format):
    """Against every assignment's cost by hand, for boxes as Deformable DETR gives them and as corners (Sparse
    R-CNN's)."""
    Q = 5
    for T, seed in itertools.product(range(7), range(4)):  # fewer targets than queries, as many, more
        prediction, targets = random_batch(Q, [T, 6 - T], seed=seed)
        if box_format == "xyxy":
            prediction["boxes"] = torchvision.ops.box_convert(prediction["boxes"], "cxcywh", "xyxy")
            targets = [dict(t, boxes=torchvision.ops.box_convert(t["boxes"], "cxcywh", "xyxy")) for t in targets]
        matches = matching.hungarian_match(prediction["logits"], prediction["boxes"], targets, box_format)
        assert len(matches) == 2
        for b, (target, (queries, chosen)) in enumerate(zip(targets, matches)):
            logits, boxes = prediction["logits"][b], prediction["boxes"][b]
            n = len(target["labels"])
            cost = [[matching_cost_by_hand(logits[q].tolist(), boxes[q].tolist(), int(target["labels"][t]),
                                           target["boxes"][t].tolist(), box_format) for t in range(n)]
                    for q in range(Q)]
            if n <= Q:  # each target to its own query
                pairs = ([(q, t) for t, q in enumerate(order)] for order in itertools.permutations(range(Q), n))
            else:  # each query to its own target
                pairs = (list(enumerate(order)) for order in itertools.permutations(range(n), Q))
            best = min(sum(cost[q][t] for q, t in assignment) for assignment in pairs)
            assert queries.dtype == chosen.dtype == torch.int64 and len(queries) == len(chosen) == min(Q, n)
            assert len(set(queries.tolist())) == len(set(chosen.tolist())) == min(Q, n)  # one to one
            found = sum(cost[q][t] for q, t in zip(queries.tolist(), chosen.tolist()))
            assert found == pytest.approx(best, rel=1e-5, abs=1e-5)


def test_the_set_loss_by_hand_and_its_normalisation_by_the_batchs_boxes():
    logits = torch.tensor([[[0.3, 1.5], [-0.7, -2.0]]])  # query 0 is near the target, query 1 far from it
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.1, 0.1]]])
    target = dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.45, 0.55, 0.3, 0.2]]))
    losses = matching.set_loss(dict(logits=logits, boxes=boxes), [target], num_boxes=1)
    (l00, l01), (l10, l11) = logits[0].tolist()
    focal = (focal_by_hand(l00, False) + focal_by_hand(l01, True)  # the matched query: class 1 on
             + focal_by_hand(l10, False) + focal_by_hand(l11, False))  # the unmatched one: no class
    assert losses["loss_class"].item() == pytest.approx(2 * focal, rel=1e-5)
    assert losses["loss_l1"].item() == pytest.approx(5 * (0.05 + 0.05 + 0.1 + 0.2), rel=1e-5)
    giou = giou_from_corners([0.5, 0.5, 0.2, 0.4], [0.45, 0.55, 0.3, 0.2])
    assert losses["loss_giou"].item() == pytest.approx(2 * (1 - giou), rel=1e-5)
    for num_boxes in (2, 3.5):
        scaled = matching.set_loss(dict(logits=logits, boxes=boxes), [target], num_boxes)
        assert all(scaled[k].item() == pytest.approx(losses[k].item() / num_boxes, rel=1e-6) for k in losses)
    prediction, targets = random_batch(6, [3, 1])  # the sums of both images over the batch's 4 boxes
    batch = matching.set_losses(prediction, targets)
    alone = [matching.set_loss({k: v[b:b + 1] for k, v in prediction.items()}, [targets[b]], 1) for b in range(2)]
    assert all(batch[k].item() == pytest.approx((alone[0][k] + alone[1][k]).item() / 4, rel=1e-5) for k in batch)
    twice = matching.set_losses({k: torch.cat([v, v]) for k, v in prediction.items()}, targets + targets)
    assert all(twice[k].item() == pytest.approx(batch[k].item(), rel=1e-5) for k in batch)


def test_every_layer_and_the_encoder_have_their_losses_exactly_when_asked():
    prediction, targets = random_batch(6, [2, 3], seed=1)
    num_boxes = matching.count_boxes(targets, "cpu")
    terms = ("class", "l1", "giou")
    assert set(matching.set_losses(prediction, targets)) == {f"loss_{t}" for t in terms}
    aux = [random_batch(6, [2, 3], seed=seed)[0] for seed in range(2, 7)]  # 5 earlier layers, each its own boxes
    layers = matching.set_losses(prediction, targets, aux=aux)
    assert set(layers) == {f"loss_{t}{s}" for t in terms for s in ("", "_0", "_1", "_2", "_3", "_4")}
    for index, layer in enumerate(aux):  # each matched on its own, divided by the batch's boxes
        alone = matching.set_loss(layer, targets, num_boxes)
        assert all(layers[f"{k}_{index}"] == alone[k] for k in alone)
    encoder = random_batch(6, [2, 3], seed=7)[0]
    labels = [t["labels"].clone() for t in targets]
    proposals = matching.set_losses(prediction, targets, encoder=encoder)
    assert set(proposals) == {f"loss_{t}{s}" for t in terms for s in ("", "_enc")}
    agnostic = matching.set_loss(encoder, [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets], num_boxes)
    assert all(proposals[f"{k}_enc"] == agnostic[k] for k in agnostic)
    assert all(torch.equal(t["labels"], old) for t, old in zip(targets, labels))  # the targets stay as they were
    logits, boxes = torch.tensor([[[0.4, -0.3]]]), torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])  # a proposal of class 1
    one = [dict(labels=torch.tensor([1]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.2]]))]
    enc = matching.set_losses(dict(logits=logits, boxes=boxes), one, encoder=dict(logits=logits, boxes=boxes))
    assert enc["loss_class_enc"].item() == pytest.approx(2 * (focal_by_hand(0.4, True) + focal_by_hand(-0.3, False)))
    assert enc["loss_class"].item() == pytest.approx(2 * (focal_by_hand(0.4, False) + focal_by_hand(-0.3, True)))


def test_count_boxes_is_the_batchs_boxes_at_least_one():
    assert not torch.distributed.is_initialized()
    assert matching.count_boxes(random_batch(4, [3, 0, 2])[1], "cpu") == 5
    assert matching.count_boxes(random_batch(4, [0, 0])[1], "cpu") == 1
    assert matching.count_boxes(random_batch(4, [1])[1], "cpu") == 1


def test_count_boxes_averages_the_ranks_counts(monkeypatch):
    """Under torch.distributed every rank divides by the mean of the ranks' counts (upstream's all-reduce over the world
    size), at least 1: a stand-in for torch.distributed, two ranks whose other one holds 3 boxes."""
    two_ranks = argparse.Namespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                                   all_reduce=lambda count: count.add_(3))  # this rank's count plus the other's
    monkeypatch.setattr(matching, "dist", two_ranks)
    assert matching.count_boxes(random_batch(4, [3, 2])[1], "cpu") == 4  # (5 + 3) / 2
    assert matching.count_boxes(random_batch(4, [0])[1], "cpu") == 1.5  # (0 + 3) / 2


class Pointwise(nn.Module):
    """A backbone whose features at a pixel depend on that pixel alone: an image's features do not change with
    the padding around it (DGMN2's and ResNet's do, through their convolutions)."""

    def __init__(self):
        super().__init__()
        self.channels, self.strides = [8, 16, 32], [8, 16, 32]
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in self.channels)

    def forward(self, images):
        return [conv(images[..., s // 2::s, s // 2::s]) for conv, s in zip(self.convs, self.strides)]


@pytest.mark.parametrize("plus", [False, True])
def test_an_images_detections_do_not_change_when_batched_with_a_larger_one(plus):
    torch.manual_seed(0)
    model = deformable_detr.DeformableDETR(Pointwise(), 5, box_refine=plus, two_stage=plus, queries=20, min_size=64,
                                           max_size=192).eval()
    small, large = torch.rand(3, 64, 64), torch.rand(3, 64, 192)  # no resize; padded by 128 columns in the batch
    with torch.no_grad():
        alone, batched = model([small])[0], model([small, large])[0]
    assert alone["boxes"].shape == (100, 4)
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(batched[key], alone[key])


@pytest.mark.parametrize("plus", [False, True])
def test_deformable_detr_heads_compute_in_float32_under_autocast(plus):
    """Under bf16 autocast the reference points, every class and box head (two-stage's too) and their layers compute in
    float32, equal to the same layer run in float32 without autocast on the input it got; the losses come out too."""
    torch.manual_seed(0)
    model = deformable_detr.DeformableDETR(Pointwise(), 5, box_refine=plus, two_stage=plus, queries=20, min_size=64,
                                           max_size=64)
    layers = {m for n, m in model.named_modules()
              if n.startswith(("class_heads", "box_heads", "reference_points")) and isinstance(m, nn.Linear)}
    calls = []
    for module in layers:
        module.register_forward_hook(lambda m, args, out: calls.append((m, args[0], out)))
    images, targets = detr_batch()
    with torch.autocast("cpu", torch.bfloat16):
        losses = model(images, targets)
    assert {m for m, _, _ in calls} == layers and len(layers) == (7 * 4 if plus else 5)  # each layer called
    for module, x, out in calls:
        assert out.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(out, nn.functional.linear(x.float(), module.weight, module.bias))
    assert all(loss.dtype == torch.float32 and loss.isfinite() for loss in losses.values())


def two_steps(model):
    """Two AdamW steps on detr_batch(): (the last step's losses, the parameters that received a non-zero gradient)."""
    images, targets = detr_batch()
    optimizer, seen = torch.optim.AdamW(model.parameters(), 1e-4), set()
    for _ in range(2):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        seen |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
    return losses, seen


def ten_steps(model, optimizer, clip):
    """Ten steps on detr_batch() with the gradient norm clipped to clip: the losses (floats)."""
    images, targets = detr_batch()
    losses = []
    for _ in range(10):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def detr_batch():
    targets = [dict(boxes=torch.tensor([[4.0, 8, 30, 40], [36, 30, 62, 60]]), labels=torch.tensor([1, 4])),
               dict(boxes=torch.tensor([[10.0, 5, 50, 20]]), labels=torch.tensor([2]))]
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 80, generator=g)], targets


@pytest.mark.parametrize("name", ["deformable-detr-dgmn2-tiny",
                                  pytest.param("deformable-detr-plus-r50", marks=pytest.mark.slow)])
def test_every_deformable_detr_parameter_gets_a_gradient_in_two_steps(name):
    torch.manual_seed(0)
    model = detection.build(name, 5, min_size=64, max_size=96, queries=30, pretrained=True)
    losses, seen = two_steps(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == seen
    plus = "plus" in name
    assert {"loss_class", "loss_l1", "loss_giou", "loss_class_4"} <= losses.keys()
    assert ("loss_class_enc" in losses) == plus and "loss_class_5" not in losses


def test_deformable_detr_makes_up_to_four_levels_from_two_three_or_four_maps():
    """A stride-2 conv a level the backbone lacks (the first from its last map), none beyond four maps; five are
    refused."""
    torch.manual_seed(0)
    images, _ = detr_batch()
    for levels in [(2, 3), (1, 2, 3), (0, 1, 2, 3)]:
        model = deformable_detr.DeformableDETR(detection.DGMN2Stages("tiny", levels), 5, queries=10, min_size=64,
                                               max_size=96, layers=1).eval()
        extra = [projection[0] for projection in model.input_proj[len(levels):]]
        assert len(model.input_proj) == deformable_detr.LEVELS and all(conv.stride == (2, 2) for conv in extra)
        inputs = [model.backbone.channels[-1], deformable_detr.HIDDEN]  # the last map's, then an extra level's
        assert [conv.in_channels for conv in extra] == inputs[:len(extra)]
        with torch.no_grad():
            assert model(images)[0]["boxes"].shape == (10 * 5, 4)  # every query-class pair: fewer than DETECTIONS
    five = nn.Module()
    five.channels, five.strides = [64] * 5, [4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match="the backbone gives 5 maps; Deformable DETR attends over at most 4"):
        deformable_detr.DeformableDETR(five, 5)


def test_the_deformable_detr_loss_reads_each_layers_boxes_normalised_by_width_and_height():
    """Targets in pixels become (cx, cy, w, h) over the image's width and height; the last decoder layer is the main
    loss and layer i the suffix _i: here a 64 x 96 image, one target, every layer but the last 0.01 * (5 - i) off in
    cx on the matched query, by hand."""
    model = deformable_detr.DeformableDETR(Pointwise(), 5, queries=2, min_size=64, max_size=96).train()
    model.transform.eval()  # the image (and its target) kept at 64 x 96, not resized to a random training side
    goal = [36 / 96, 32 / 64, 48 / 96, 32 / 64]  # of the target (12, 16) - (60, 48) in pixels
    logits = torch.full((1, 2, 5), -5.0)
    logits[0, 0, 3] = 5.0
    far = [0.9, 0.9, 0.05, 0.05]  # the other query
    outputs = [dict(logits=logits, boxes=torch.tensor([[[goal[0] + 0.01 * (5 - i), *goal[1:]], far]]))
               for i in range(6)]
    model.predict = lambda *_: (outputs, None)
    losses = model([torch.rand(3, 64, 96)], [dict(boxes=torch.tensor([[12.0, 16, 60, 48]]), labels=torch.tensor([3]))])
    assert losses["loss_l1"].item() == pytest.approx(0, abs=1e-6)
    assert losses["loss_giou"].item() == pytest.approx(0, abs=1e-6)
    for i in range(5):
        assert losses[f"loss_l1_{i}"].item() == pytest.approx(5 * 0.01 * (5 - i), rel=1e-4), i


def test_two_stage_proposals_are_the_tokens_boxes_and_the_queries_their_best_by_channel_0():
    """Each token proposes a box at its centre with sides 0.05 x 2^level (upstream's), which the last box head (zero at
    its start) corrects; the queries start from the Q proposals whose channel 0 (the class-agnostic score) is best."""
    torch.manual_seed(0)
    model = deformable_detr.DeformableDETR(Pointwise(), 5, box_refine=True, two_stage=True, queries=6, min_size=64,
                                           max_size=64).eval()
    shapes = [(8, 8), (4, 4), (2, 2), (1, 1)]
    expected = torch.tensor([[(j + 0.5) / W, (i + 0.5) / H, 0.05 * 2 ** level, 0.05 * 2 ** level]
                             for level, (H, W) in enumerate(shapes) for i in range(H) for j in range(W)])
    memory = torch.randn(1, len(expected), deformable_detr.HIDDEN)
    with torch.no_grad():
        logits, boxes, chosen = model.proposals(memory, torch.zeros(1, len(expected), dtype=torch.bool), shapes,
                                                torch.ones(1, 4, 2))
    torch.testing.assert_close(boxes[0], expected)
    top = logits[0, :, 0].topk(6).indices
    assert not torch.equal(top, logits[0].max(-1).values.topk(6).indices)  # the control: the best of any class differ
    torch.testing.assert_close(chosen[0], expected[top])


def test_box_refinement_and_two_stage_queries_start_from_detached_boxes():
    """Upstream's: each decoder layer refines a detached copy of the boxes before it, and the two-stage queries start
    from detached proposals: the last layer's boxes train the last layer's box head alone."""
    torch.manual_seed(0)
    model = deformable_detr.DeformableDETR(Pointwise(), 5, box_refine=True, two_stage=True, queries=6, min_size=64,
                                           max_size=64).eval()
    outputs, _ = model.predict(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    outputs[-1]["boxes"].sum().backward()
    assert [head.layers[-1].weight.grad is not None for head in model.box_heads] == [False] * 5 + [True, False]


def test_each_level_adds_its_own_embedding_to_its_positions():
    """The encoder's positions: each level's sine encoding plus that level's embedding (a row of level_embed each)."""
    torch.manual_seed(0)
    model = deformable_detr.DeformableDETR(Pointwise(), 5, queries=6, min_size=64, max_size=64)
    with torch.no_grad():
        _, _, pos, shapes, _ = model.levels(torch.rand(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.bool))
    assert len(shapes) == 4
    start = 0
    for level, (H, W) in enumerate(shapes):
        sine = rearrange(deformable_detr.sine_position(torch.zeros(1, H, W, dtype=torch.bool)), "b c h w -> b (h w) c")
        torch.testing.assert_close(pos[:, start:start + H * W] - sine, model.level_embed[level].expand(1, H * W, -1))
        start += H * W


@pytest.mark.parametrize("name, queries", [("deformable-detr-dgmn2-tiny", 300), ("sparse-rcnn-dgmn2-small", 12)])
def test_the_set_prediction_detectors_detect_inside_the_image_in_its_pixels(name, queries):
    """The top query-class pairs (Deformable DETR: 100 of 300 queries x 5 classes; Sparse R-CNN: as many as its 12
    proposals, upstream's), in each image's own pixels."""
    torch.manual_seed(0)
    model = detection.build(name, 5, min_size=64, max_size=96, queries=queries).eval()
    images, _ = detr_batch()
    with torch.no_grad():
        outputs = model(images)
    for image, output in zip(images, outputs):
        H, W = image.shape[-2:]
        boxes, count = output["boxes"], 100 if name.startswith("deformable") else queries
        assert boxes.shape == (count, 4) and output["scores"].shape == output["labels"].shape == (count,)
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= W).all() and (boxes[:, 1::2] <= H).all()
        assert (boxes[:, 2:] >= boxes[:, :2]).all() and boxes[:, 2].max() > 0.8 * W  # in this image's pixels
        assert output["labels"].max() < 5 and output["scores"].diff().le(0).all()  # sorted, the top pairs


def test_deformable_detr_takes_a_dgmn2_checkpoint_and_torchvisions_resnet50(tmp_path):
    model = detection.build("deformable-detr-dgmn2-tiny", 91)
    imagenet = dgmn2.build("tiny")  # a train_imagenet.py checkpoint: the classifier is left out
    detection.load_pretrained(model, dict(model=imagenet.state_dict(), config=dict(model="tiny")))
    for name, tensor in model.backbone.body.state_dict().items():
        torch.testing.assert_close(tensor, imagenet.state_dict()[name])
    r50 = detection.build("deformable-detr-r50", 91)
    resnet = torchvision.models.resnet50()
    detection.load_pretrained(r50, resnet.state_dict())
    torch.testing.assert_close(r50.backbone.body.layer4[0].conv1.weight, resnet.layer4[0].conv1.weight)
    body = r50.backbone.body  # upstream's frozen stem and layer 1
    assert not body.layer1[0].conv1.weight.requires_grad and body.layer2[0].conv1.weight.requires_grad


@NEEDS_PYCOCOTOOLS
def test_the_deformable_detr_recipe_is_upstreams():
    cfg = train_coco.Config(model="deformable-detr-dgmn2-tiny", min_size=64, max_size=64, queries=30)
    plan = train_coco.recipe(cfg, 100)  # 100 batches an epoch
    assert (plan["optimizer"], plan["lr"], plan["iterations"], plan["steps"], plan["warmup_factor"], plan["clip"]) == \
        ("adamw", 2e-4, 5000, [4000], 1.0, 0.1)  # no warm-up: it starts at the full lr
    model = train_coco.build_model(cfg, 5)
    assert model.query_embed.num_embeddings == 30 and train_coco.parse_args(["--model", cfg.model]).queries == 100
    optimizer, _ = train_coco.optimizer_and_schedule(model, plan, cfg.weight_decay)
    slow = {id(p) for n, p in model.named_parameters()
            if n.startswith("backbone.") or "sampling_offsets" in n or "reference_points" in n}
    for group in optimizer.param_groups:
        assert group["weight_decay"] == 1e-4
        assert group["lr"] == (2e-5 if {id(p) for p in group["params"]} <= slow else 2e-4)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_deformable_detr_loss_falls_on_a_fixed_batch():
    """Two images, ten steps of upstream's optimiser (its parameter groups, lr 2e-4, gradient norm 0.1)."""
    torch.manual_seed(0)
    model = detection.build("deformable-detr-dgmn2-tiny", 5, min_size=64, max_size=96, queries=30)
    losses = ten_steps(model, torch.optim.AdamW(model.param_groups(2e-4, 1e-4)), clip=0.1)
    assert losses[-1] < 0.8 * losses[0], losses


def test_the_upstream_augmentation_flips_resizes_and_crops_boxes_with_the_image():
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.rand(3, 100, 160))
    target = dict(boxes=tv_tensors.BoundingBoxes([[10.0, 10, 60, 50], [100, 20, 150, 90]], format="XYXY",
                                                 canvas_size=(100, 160)), labels=torch.tensor([1, 2]))
    sizes = set()
    augment = deformable_detr.augmentation(min_size=100)
    for seed in range(40):
        torch.manual_seed(seed)
        out_image, out_target = augment(image, target)
        H, W = out_image.shape[-2:]
        sizes.add((H, W))
        boxes = out_target["boxes"]
        assert len(boxes) == len(out_target["labels"]) and (boxes[:, 2:] <= torch.tensor([W, H])).all()
        if (H, W) != (100, 160):  # cropped: each side within the scaled crop range, at most the resized image's
            assert 48 <= min(H, W) and max(H, W) <= 75
    assert (100, 160) in sizes and len(sizes) > 10  # half the time untouched (flipped or not), else crops of many sizes


def test_each_detector_trains_on_its_recipes_augmentation():
    """detection.augmentation, what train_coco.py applies: RetinaNet and Mask R-CNN flip, Deformable DETR and Sparse
    R-CNN crop."""
    from torchvision import tv_tensors
    image = tv_tensors.Image(torch.rand(3, 100, 160))
    target = dict(boxes=tv_tensors.BoundingBoxes([[10.0, 10, 60, 50]], format="XYXY", canvas_size=(100, 160)),
                  labels=torch.tensor([1]))
    for name, sizes_seen in [("retinanet-dgmn2-tiny", 1), ("maskrcnn-r50", 1), ("deformable-detr-dgmn2-tiny", 10),
                             ("sparse-rcnn-dgmn2-small", 10)]:
        augment, sizes, flipped = detection.augmentation(name, min_size=100), set(), set()
        for seed in range(30):
            torch.manual_seed(seed)
            out, out_target = augment(image, target)
            sizes.add(tuple(out.shape[-2:]))
            if out.shape == image.shape:
                flipped.add(torch.equal(out, image.flip(-1)) and out_target["boxes"][0, 0].item() == 100)
        assert (len(sizes) == 1) == (sizes_seen == 1) and len(sizes) >= sizes_seen and flipped == {False, True}, name


# ====================================================================================================================
# sparse_rcnn.py: Table 10


@pytest.mark.slow
def test_table_10_parameters_and_flops():
    """Parameters exactly as counted from the release (80 classes; R-50: the trainable ones); FLOPs within 1% of the
    facts' independent estimate at 800 x 1344 without DGMN2's full relative-position tables: R-50 87.6 + FPN 60.9 +
    heads 26.9 = 175.4G, DGMN2-S 99.7 - 10.9 (those tables) + 54.8 + 26.9, plus 2.2 of bilinear reads = 172.7G."""
    expected = {"sparse-rcnn-r50": (106_067_368, 175.4e9), "sparse-rcnn-dgmn2-small": (102_569_320, 172.7e9)}
    assert [n for n in detection.MODELS if n.startswith("sparse")] == list(expected)
    for name, (count, macs_expected) in expected.items():
        params, macs = detection_cost(name)
        spec = detection.MODELS[name]
        assert params == count and abs(params / 1e6 - spec.params_m) < 0.05 and spec.table == "Table 10", name
        assert abs(macs / macs_expected - 1) < 0.01, (name, macs)
    assert detection.EXTRA_CLASS_PARAMS == sum(p.numel() for p in detection.build("sparse-rcnn-dgmn2-small", 91)
                                               .parameters()) - 102_569_320


def test_the_dynamic_interaction_is_two_generated_1x1_convolutions_a_proposal():
    torch.manual_seed(0)
    C, E, S, R = 8, 4, 3, 5
    interaction = sparse_rcnn.DynamicInteraction(C, E, S).double()
    for norm in (interaction.norm1, interaction.norm2, interaction.norm3):  # not at their start: weights count
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    features, rois = torch.randn(R, C, dtype=torch.float64), torch.randn(R, C, S, S, dtype=torch.float64)
    out = interaction(features, rearrange(rois, "r c s t -> r (s t) c"))
    for r in range(R):
        generated = interaction.generate(features[r])
        first = generated[:C * E].view(C, E).T[:, :, None, None]  # (E, C, 1, 1): a conv from C to E channels
        second = generated[C * E:].view(E, C).T[:, :, None, None]  # (C, E, 1, 1)
        x = F.conv2d(rois[r:r + 1], first)  # (1, E, S, S)
        x = F.relu(F.layer_norm(x.permute(0, 2, 3, 1), (E,), interaction.norm1.weight, interaction.norm1.bias))
        x = F.conv2d(x.permute(0, 3, 1, 2), second)
        x = F.relu(F.layer_norm(x.permute(0, 2, 3, 1), (C,), interaction.norm2.weight, interaction.norm2.bias))
        flat = x.reshape(-1)  # (S S C): position-major, channels within
        expected = F.relu(interaction.norm3(interaction.out(flat)))
        torch.testing.assert_close(out[r], expected)


def test_roi_features_on_one_level_are_aligned_roi_align_and_the_level_rule_is_fpns():
    boxes = torch.tensor([[0.0, 0, 224, 224], [10, 10, 122, 122], [0, 0, 448, 448], [0, 0, 900, 900], [5, 5, 20, 20],
                          [0, 0, 111, 113]])
    assert sparse_rcnn.roi_levels(boxes, 2, 5).tolist() == [2, 1, 3, 3, 0, 0]  # P4, P3, P5, P5 (clamped), P2, P2
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 3, 64 // s, 64 // s, generator=g) for s in (1, 2, 4, 8)]  # strides 4 ... 32: 256 px
    corners = torch.rand(2, 4, 2, generator=g) * 120
    boxes = torch.cat([corners, corners + 30 + torch.rand(2, 4, 2, generator=g) * 40], -1)  # sides 30-70: P2
    pooled = sparse_rcnn.roi_features(maps, [4, 8, 16, 32], boxes)
    rois = torch.cat([torch.arange(2).repeat_interleave(4)[:, None].float(), boxes.flatten(0, 1)], 1)
    expected = torchvision.ops.roi_align(maps[0], rois, 7, 1 / 4, 2, aligned=True)
    torch.testing.assert_close(pooled, expected)
    assert not torch.allclose(pooled, torchvision.ops.roi_align(maps[0], rois, 7, 1 / 4, 2, aligned=False))


def test_box_deltas_move_and_scale_boxes_as_r_cnn_does():
    boxes = torch.tensor([[10.0, 20, 50, 100]])  # centre (30, 60), 40 x 80
    deltas = torch.tensor([[0.5, -1.0, math.log(2.0), 0.0]])  # weights (2, 2, 1, 1): dx 0.25, dy -0.5, w x 2
    out = sparse_rcnn.apply_deltas(deltas, boxes)
    torch.testing.assert_close(out, torch.tensor([[0.0, -20, 80, 60]]))  # centre (40, 20), 80 x 80
    huge = sparse_rcnn.apply_deltas(torch.tensor([[0.0, 0, 100, 100]]), boxes)  # clamped at log(1e5 / 16)
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(40 * 1e5 / 16))


def test_the_fpn_of_an_unpadded_batch_is_torchvisions():
    """Without padding Sparse R-CNN's FPN is torchvision's FeaturePyramidNetwork with the same weights: 1x1 laterals,
    each coarser sum added to the next finer level (nearest), a 3x3 conv a level."""
    torch.manual_seed(0)
    channels = [4, 8, 8, 16]
    fpn, reference = sparse_rcnn.FPN(channels, 16), torchvision.ops.FeaturePyramidNetwork(channels, 16)
    for ours, theirs in zip([*fpn.laterals, *fpn.outputs], [*reference.inner_blocks, *reference.layer_blocks]):
        theirs[0].load_state_dict(ours.state_dict())  # torchvision's: each conv in a Conv2dNormActivation
    maps = [torch.randn(2, c, 24 // 2 ** i, 40 // 2 ** i) for i, c in enumerate(channels)]  # 5 x 3 at the coarsest
    expected = reference({str(i): x for i, x in enumerate(maps)}).values()
    for out, want in zip(fpn(maps, torch.zeros(2, 96, 160, dtype=torch.bool)), expected, strict=True):
        torch.testing.assert_close(out, want)


def test_a_sparse_rcnn_heads_sublayers_add_to_their_input_before_each_norm():
    """Post-norm residuals (upstream's DynamicHead): with the self-attention's, the interaction's and the feed-forward's
    outputs silenced, each of norm1-3 normalises the features as they came (the head's new features are LayerNorm's
    of its input, thrice), and zero deltas leave the boxes where they were."""
    torch.manual_seed(0)
    head = sparse_rcnn.Head(5, dim=16, heads=2)
    with torch.no_grad():
        for layer in (head.self_attn.out_proj, head.interaction.out, head.ffn[-1], head.box_deltas):
            layer.weight.zero_()
            layer.bias.zero_()
    features, rois = torch.randn(2, 3, 16), torch.randn(6, 16, sparse_rcnn.POOL, sparse_rcnn.POOL)
    boxes = torch.tensor([[10.0, 20, 50, 100], [0, 0, 8, 8], [5, 5, 60, 30]]).expand(2, -1, -1)
    with torch.no_grad():
        logits, moved, out = head(rois, boxes, features)
    torch.testing.assert_close(out, F.layer_norm(F.layer_norm(F.layer_norm(features, (16,)), (16,)), (16,)))
    torch.testing.assert_close(moved, boxes)
    assert logits.shape == (2, 3, 5)


def test_the_set_loss_reads_l1_on_corners_when_asked_and_giou_alike():
    prediction, targets = random_batch(6, [3, 2], seed=3)
    corners = {k: v for k, v in prediction.items()}
    corners["boxes"] = torchvision.ops.box_convert(prediction["boxes"], "cxcywh", "xyxy")
    targets_xyxy = [dict(t, boxes=torchvision.ops.box_convert(t["boxes"], "cxcywh", "xyxy")) for t in targets]
    centres, xyxy = matching.set_loss(prediction, targets, 5), matching.set_loss(corners, targets_xyxy, 5, "xyxy")
    matches = matching.hungarian_match(corners["logits"], corners["boxes"], targets_xyxy, "xyxy")
    l1 = sum((corners["boxes"][b, q] - targets_xyxy[b]["boxes"][t]).abs().sum()
             for b, (queries, chosen) in enumerate(matches) for q, t in zip(queries, chosen))
    assert xyxy["loss_l1"].item() == pytest.approx(5 * l1.item() / 5, rel=1e-5)
    assert xyxy["loss_l1"].item() != pytest.approx(centres["loss_l1"].item(), rel=1e-3)
    if [m[0].tolist() for m in matches] == [m[0].tolist() for m in matching.hungarian_match(
            prediction["logits"], prediction["boxes"], targets)]:  # the same pairs: the same GIoU and class terms
        for key in ("loss_giou", "loss_class"):
            assert xyxy[key].item() == pytest.approx(centres[key].item(), rel=1e-5)


def test_sparse_rcnn_starts_as_upstream():
    model = detection.build("sparse-rcnn-dgmn2-small", 80)
    assert model.proposal_boxes.weight.tolist() == [[0.5, 0.5, 1.0, 1.0]] * 300
    boxes, features = model.start([(100, 150), (80, 60)], "cpu")  # the whole of each image
    assert boxes[:, 0].tolist() == [[0.0, 0, 150, 100], [0, 0, 60, 80]] and features.shape == (2, 300, 256)
    for head in model.heads:
        torch.testing.assert_close(head.class_logits.bias, torch.full((80,), -math.log(99)))
    assert len(model.heads) == 6 and model.heads[0].interaction.generate.out_features == 2 * 256 * 64
    assert model.strides == [4, 8, 16, 32] and not model.heads[0].box_branch[0][0].bias


class Pointwise4(Pointwise):
    """Pointwise at strides 4 ... 32: Sparse R-CNN's four levels."""

    def __init__(self):
        nn.Module.__init__(self)
        self.channels, self.strides = [4, 8, 8, 16], [4, 8, 16, 32]
        self.convs = nn.ModuleList(nn.Conv2d(3, c, 1) for c in self.channels)


def test_an_images_sparse_rcnn_detections_do_not_change_when_batched_with_a_larger_one():
    torch.manual_seed(0)
    model = sparse_rcnn.SparseRCNN(Pointwise4(), 5, proposals=20, min_size=64, max_size=192).eval()
    for head in model.heads:  # moved boxes: proposals reaching across the image's border as well
        nn.init.normal_(head.box_deltas.weight, std=0.05)
    for conv in [*model.fpn.laterals, *model.fpn.outputs]:  # biases as trained ones: the padding holds no zeros
        nn.init.normal_(conv.bias)
    model = model.double()  # in float32 the batch changes the order of the sums: differences of 1e-4 over six heads
    small, large = torch.rand(3, 64, 64).double(), torch.rand(3, 64, 192).double()  # no resize; padded in the batch
    with torch.no_grad():
        alone, batched = model([small])[0], model([small, large])[0]
    assert alone["boxes"].shape == (20, 4)  # as many (proposal, class) pairs as proposals
    for key in ("boxes", "scores", "labels"):
        torch.testing.assert_close(batched[key], alone[key])


@pytest.mark.parametrize("name", ["sparse-rcnn-dgmn2-small", pytest.param("sparse-rcnn-r50", marks=pytest.mark.slow)])
def test_every_sparse_rcnn_parameter_gets_a_gradient_in_two_steps(name):
    torch.manual_seed(0)
    model = detection.build(name, 5, min_size=64, max_size=96, queries=12)
    with torch.no_grad():  # proposals of every size (up to 8 x the image), so that every level pools some RoIs
        model.proposal_boxes.weight[:, 2:] = torch.linspace(0.1, 8.0, 24).view(12, 2)
    losses, seen = two_steps(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == seen
    assert set(losses) == {f"loss_{t}{s}" for t in ("class", "l1", "giou") for s in ("", "_0", "_1", "_2", "_3", "_4")}
    model.zero_grad()
    model(*detr_batch())["loss_l1"].backward()  # the last head's boxes: earlier heads' boxes come detached
    assert [head.box_deltas.weight.grad is not None for head in model.heads] == [False] * 5 + [True]


@pytest.mark.slow
def test_sparse_rcnn_loss_falls_on_a_fixed_batch():
    """Two images, ten steps of upstream's optimiser (AdamW, gradient norm 1.0; lr 1e-4 for a short run). The set loss
    jumps by 10-30% from step to step as the matching changes (and float32's path through those jumps differs
    between the sampler's paths, which agree to 1e-14 in float64): the best of the last three steps is compared."""
    torch.manual_seed(0)
    model = detection.build("sparse-rcnn-dgmn2-small", 5, min_size=64, max_size=96, queries=12)
    losses = ten_steps(model, torch.optim.AdamW(model.parameters(), 1e-4, weight_decay=1e-4), clip=1.0)
    assert min(losses[-3:]) < 0.85 * losses[0], losses


def test_sparse_rcnn_reads_its_boxes_as_corners_in_the_loss(monkeypatch):
    """Heads that predict each target with its left edge 2 px too far right (and two proposals far off): L1 on the
    corners as fractions of the 64 x 64 image, and GIoU = IoU = 24 / 26 for each 26 px wide target, by hand."""
    model = sparse_rcnn.SparseRCNN(Pointwise4(), 5, proposals=4, min_size=64, max_size=64).train()
    model.transform.eval()  # the image (and its targets) kept at 64 x 64, not resized to a random training side
    goals = torch.tensor([[4.0, 8, 30, 40], [36, 30, 62, 60]])
    boxes = torch.cat([goals + torch.tensor([2.0, 0, 0, 0]), torch.tensor([[0.0, 0, 2, 2], [60, 0, 62, 2]])])
    logits = torch.full((4, 5), -5.0)
    logits[0, 1] = logits[1, 4] = 5.0
    monkeypatch.setattr(model, "predict", lambda *_: [dict(logits=logits[None], boxes=boxes[None])] * 6)
    losses = model([torch.rand(3, 64, 64)], [dict(boxes=goals, labels=torch.tensor([1, 4]))])
    torch.testing.assert_close(losses["loss_l1"], torch.tensor(5 * (2 / 64 + 2 / 64) / 2))
    torch.testing.assert_close(losses["loss_giou"], torch.tensor(2 * 2 * (1 - 24 / 26) / 2))


def test_sparse_rcnn_normalises_x_by_the_width_and_y_by_the_height_in_the_loss(monkeypatch):
    """On a 64 x 96 image, a head that predicts the target's left edge 3 px too far right and its top 2 px too low:
    L1 on the corners as fractions of the width (x) and the height (y), 3 / 96 + 2 / 64, by hand."""
    model = sparse_rcnn.SparseRCNN(Pointwise4(), 5, proposals=2, min_size=64, max_size=96).train()
    model.transform.eval()  # the image (and its target) kept at 64 x 96, not resized to a random training side
    goal = torch.tensor([[4.0, 8, 30, 40]])
    boxes = torch.cat([goal + torch.tensor([3.0, 2, 0, 0]), torch.tensor([[80.0, 50, 90, 60]])])
    logits = torch.full((2, 5), -5.0)
    logits[0, 1] = 5.0
    monkeypatch.setattr(model, "predict", lambda *_: [dict(logits=logits[None], boxes=boxes[None])] * 6)
    losses = model([torch.rand(3, 64, 96)], [dict(boxes=goal, labels=torch.tensor([1]))])
    torch.testing.assert_close(losses["loss_l1"], torch.tensor(5 * (3 / 96 + 2 / 64)))


def test_sparse_rcnn_takes_a_dgmn2_checkpoint_and_torchvisions_resnet50():
    model = detection.build("sparse-rcnn-dgmn2-small", 91)
    imagenet = dgmn2.build("small")
    detection.load_pretrained(model, dict(model=imagenet.state_dict(), config=dict(model="small")))
    for name, tensor in model.backbone.body.state_dict().items():
        torch.testing.assert_close(tensor, imagenet.state_dict()[name])
    r50, resnet = detection.build("sparse-rcnn-r50", 91), torchvision.models.resnet50()
    detection.load_pretrained(r50, resnet.state_dict())
    torch.testing.assert_close(r50.backbone.body.layer1[0].conv1.weight, resnet.layer1[0].conv1.weight)
    assert not r50.backbone.body.layer1[0].conv1.weight.requires_grad and r50.backbone.channels[0] == 256


@pytest.mark.parametrize("name", ["deformable-detr-dgmn2-tiny", "sparse-rcnn-dgmn2-small"])
def test_the_set_prediction_detectors_learn_from_an_image_without_objects(name):
    """COCO's unannotated training images, which upstream's keep: every query learns "no class", no box term."""
    torch.manual_seed(0)
    model = detection.build(name, 5, min_size=64, max_size=96, queries=12)
    images, targets = detr_batch()
    empty = dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
    assert all(torch.isfinite(loss) for loss in model(images, [targets[0], empty]).values())
    alone = model([images[1]], [empty])
    sum(alone.values()).backward()
    assert alone["loss_l1"] == alone["loss_giou"] == 0 and alone["loss_class"] > 0
    assert model.class_heads[-1].bias.grad.any() if name.startswith("deformable") else \
        model.heads[-1].class_logits.bias.grad.any()


@NEEDS_PYCOCOTOOLS
def test_the_sparse_rcnn_recipe_is_upstreams():
    cfg = train_coco.Config(model="sparse-rcnn-dgmn2-small", min_size=64, max_size=64, queries=30)
    plan = train_coco.recipe(cfg, 270)  # iterations, whatever the epoch's length (COCO's: 7392 at batch 16)
    assert (plan["optimizer"], plan["lr"], plan["iterations"], plan["steps"], plan["warmup"], plan["warmup_factor"],
            plan["clip"]) == ("adamw", 2.5e-5, 270_000, [210_000, 250_000], 1000, 0.01, 1.0)
    assert train_coco.recipe(dataclasses.replace(cfg, warmup=0), 270)["warmup"] == 0  # none, not the recipe's
    model = train_coco.build_model(cfg, 91)
    optimizer, _ = train_coco.optimizer_and_schedule(model, plan, cfg.weight_decay)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups] == \
        [(2.5e-5 * 0.01, 1e-4, len(list(model.parameters())))]  # one group, the warm-up's first lr
    assert model.proposal_boxes.num_embeddings == 30


# ====================================================================================================================
# train_imagenet.py: Section 6.1


def tiny_run(tmp_path, **overrides):
    """A config of the built-in default, shrunk to a few steps at 32 x 32."""
    settings = {**train_imagenet.SYNTHETIC, **dict(synthetic_train=16, synthetic_val=11, batch_size=8, epochs=1,
                                                    workers=0, output=str(tmp_path / "run"))}
    return train_imagenet.Config(**{**settings, **overrides})


def test_an_epochs_record_is_logged_before_its_checkpoint(tmp_path, monkeypatch):
    """A run killed while it saves an epoch's checkpoint keeps that epoch's line in log.jsonl (a resume redoes the
    epoch and writes it again, rather than leaving it out)."""
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_imagenet, "save_checkpoint", killed)
    with pytest.raises(KeyboardInterrupt):
        train_imagenet.main(tiny_run(tmp_path))
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["epoch"] == 1


def write_image_folder(root, classes=("cat", "dog", "fox"), per_class=(4, 2)):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, count in zip(("train", "val"), per_class):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=g).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_imagenet_evaluation_counts_top_1_and_top_5():
    """Four images whose labels rank 1st, 3rd, 6th and 1st among 7 classes' logits, in two batches: top-1 2 of 4,
    top-5 3 of 4."""
    class Fixed(nn.Module):
        def forward(self, images):  # the same ranking for every image: class 0 first, class 6 last
            return torch.arange(7.0, 0, -1).expand(len(images), -1)

    images, labels = torch.zeros(4, 3, 8, 8), torch.tensor([0, 2, 5, 0])
    loader = [(images[:2], labels[:2]), (images[2:], labels[2:])]
    metrics = train_imagenet.evaluate(Fixed(), loader, torch.device("cpu"), contextlib.nullcontext(),
                                      train_imagenet.Config(), 1)
    assert metrics == dict(top1=50.0, top5=75.0, images=4)


def test_synthetic_default_trains_two_steps(tmp_path):
    cfg = tiny_run(tmp_path)
    assert train_imagenet.parse_args([]) == train_imagenet.Config(**train_imagenet.SYNTHETIC)
    metrics = train_imagenet.main(cfg)
    assert metrics["step"] == 2 and math.isfinite(metrics["train_loss"]) and metrics["images"] == 11
    assert (tmp_path / "run" / "checkpoint-0000002.pth").is_file()
    assert json.loads((tmp_path / "run" / "log.jsonl").read_text())["top1"] == metrics["top1"]


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_bench_times_dgmn2_beside_swin_t(tmp_path, capsys, monkeypatch, channels_last):
    """Both models' training and inference rates, the models taking turns; a channels-last run says so in every line
    (.ci/gpu runs both)."""
    trained = []  # the class of each model a training step was given
    step = train_imagenet.train_step
    monkeypatch.setattr(train_imagenet, "train_step", lambda p, *args: trained.append(type(p.model).__name__) or
                        step(p, *args))
    assert train_imagenet.main(tiny_run(tmp_path, bench=2, batch_size=2, channels_last=channels_last)) is None
    warm_up = ["DGMN2"] * train_imagenet.BENCH_WARM_UP + ["SwinTransformer"] * train_imagenet.BENCH_WARM_UP
    timed = ["DGMN2", "SwinTransformer"] * 2  # taking turns
    assert trained == warm_up + timed
    out = capsys.readouterr().out
    layout = ", channels-last" if channels_last else ""
    rows = re.findall(r"^\| (DGMN2-tiny \(sampler: kernel path.*\)|torchvision swin_t.*) \| ([\d.]+)M \| ([\d.]+) \| "
                      r"([\d.]+) \|$", out, re.M)
    assert [row[0] for row in rows] == [f"DGMN2-tiny (sampler: kernel path{layout})", f"torchvision swin_t{layout}"]
    assert rows[1][1] == "28.3"
    assert all(float(rate) > 0 for row in rows for rate in row[2:])
    assert re.search(rf"DGMN2-tiny / swin_t{layout}: [\d.]+x training, [\d.]+x inference", out)
    assert not (tmp_path / "run").exists()  # a benchmark writes nothing


def test_image_folder_with_the_paper_recipe(tmp_path):
    data = write_image_folder(tmp_path / "data")
    cfg = train_imagenet.parse_args(["--data", str(data), "--img-size", "32", "--eval-resize", "36", "--batch-size",
                                     "4", "--epochs", "1", "--workers", "0", "--output", str(tmp_path / "run"),
                                     "--min-lr", "1e-6"])  # under batch 4's peak, 1e-3 x 4 / 1024
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.epochs == 1 and cfg.warmup_epochs == 5  # paper defaults
    metrics = train_imagenet.main(cfg)
    assert metrics["step"] == 3 and metrics["images"] == 6 and math.isfinite(metrics["train_loss"])


def scheduled_lrs(optimizer, scheduler, steps):
    """The first parameter group's lr at steps 0, 1, ..., steps - 1 of the schedule (before each step)."""
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_learning_rate_schedule():
    cfg = train_imagenet.Config(epochs=10, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)  # batch 1024: peak 1e-3
    lrs = scheduled_lrs(*train_imagenet.optimiser(cfg, nn.Linear(2, 2), steps_per_epoch=5), 51)
    warmup = [1e-6 + (1e-3 - 1e-6) * t / 10 for t in range(10)]  # linear from --warmup-lr over 2 epochs of 5 steps
    cosine = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * t / 40)) / 2 for t in range(41)]  # then to --min-lr
    assert lrs == pytest.approx(warmup + cosine, rel=1e-9)


def test_weight_decay_spares_biases_and_norms_as_the_release():
    """The release's timm optimiser decays every parameter but 1-d ones (biases, norm weights) and its
    no_weight_decay() names (only a cls_token it does not have): the relative-position tables decay."""
    model = dgmn2.dgmn2_tiny()
    decay, no_decay = train_imagenet.param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0
    tables = {id(t) for m in model.modules() if isinstance(m, dgmn2.RelativePosition) for t in (m.width, m.height)}
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert len(tables) == 2 * sum(dgmn2.VARIANTS["tiny"].depths)
    assert {id(p) for p in decay["params"]} == weights | tables
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters()} - weights - tables


def keys_loaded(dataset_class, monkeypatch):
    """The keys dataset_class.__getitem__ is called with in this process, in order: a list that grows as they come."""
    loaded, load = [], dataset_class.__getitem__

    def recorded(self, key):
        loaded.append(key)
        return load(self, key)

    monkeypatch.setattr(dataset_class, "__getitem__", recorded)
    return loaded


def log_records(output):
    """A run's log.jsonl, a dict a line."""
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def kill_then_resume(script, cfg, monkeypatch):
    """Run script.main(cfg), killed right after its first checkpoint, then again with --resume auto. Returns the
    optimiser steps the resumed run took: a run that restarts from step 0 retakes those before the checkpoint (and,
    fully seeded, could reach the same final checkpoint)."""
    save = script.save_checkpoint

    def save_then_die(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        script.main(cfg)
    monkeypatch.setattr(script, "save_checkpoint", save)
    steps = []
    counting = register_optimizer_step_post_hook(lambda *_: steps.append(1))  # global: whichever optimiser it builds
    try:
        script.main(dataclasses.replace(cfg, resume="auto"))
    finally:
        counting.remove()
    return len(steps)


def losses_of(script, cfg, monkeypatch):
    """script.main(cfg)'s training loss at every step (the sum of its terms), as the loop hands it to Progress."""
    seen, update = [], script.Progress.update

    def record(self, losses, lr):
        seen.append(sum(loss.item() for loss in losses.values()))
        return update(self, losses, lr)

    monkeypatch.setattr(script.Progress, "update", record)
    script.main(cfg)
    return seen


def test_the_loss_falls_on_a_fixed_batch(tmp_path, monkeypatch):
    """The training set is one batch of 8 (crops of the whole area: only their aspect and flips vary); 8 steps of the
    cosine schedule from lr 1e-2 without warm-up."""
    cfg = tiny_run(tmp_path, synthetic_train=8, batch_size=8, epochs=8, warmup_epochs=0, lr=1e-2, crop_scale=1.0)
    losses = losses_of(train_imagenet, cfg, monkeypatch)
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, monkeypatch):
    straight = tiny_run(tmp_path / "a", epochs=2, mixup=0.8)
    train_imagenet.main(straight)
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000004.pth", weights_only=True)

    assert kill_then_resume(train_imagenet, tiny_run(tmp_path / "b", epochs=2, mixup=0.8), monkeypatch) == 2
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000004.pth", weights_only=True)
    assert resumed["step"] == expected["step"] == 4
    torch.testing.assert_close(resumed["model"], expected["model"])
    torch.testing.assert_close(resumed["optimizer"], expected["optimizer"])
    assert resumed["scheduler"] == expected["scheduler"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_checkpoints_within_an_epoch_resume_exactly(tmp_path, monkeypatch, workers):
    """--save-every 1 at 2 steps an epoch: a record and a checkpoint each step, the evaluation at each epoch's end; a
    run killed after step 1 resumes mid-epoch with the same samples in the same order (seen in this process: without
    workers) and the same weights, EMA and optimiser state, drop path (reseeded at each checkpoint) and MixUp included,
    also when the resumed run's persistent workers start where the uninterrupted run's went on."""
    settings = dict(epochs=2, save_every=1, mixup=0.8, drop_path=0.1, drop_path_epoch=0, ema_decay=0.9,
                    workers=workers)
    loaded = keys_loaded(train_imagenet.Augmented, monkeypatch)
    train_imagenet.main(tiny_run(tmp_path / "a", **settings))
    log = log_records(tmp_path / "a" / "run")
    assert [(r["epoch"], r["step"], "top1" in r) for r in log] == [(1, 1, False), (1, 2, True), (2, 3, False),
                                                                    (2, 4, True)]
    training = [key for key in loaded if isinstance(key, tuple)]  # (index, seed); evaluation's are indices
    assert len(training) == (4 * 8 if not workers else 0) and len(set(training)) == len(training)
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000004.pth", weights_only=True)
    loaded.clear()
    assert kill_then_resume(train_imagenet, tiny_run(tmp_path / "b", **settings), monkeypatch) == 3
    assert [key for key in loaded if isinstance(key, tuple)] == training
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000004.pth", weights_only=True)
    for part in ("model", "optimizer", "ema"):
        torch.testing.assert_close(resumed[part], expected[part], rtol=0, atol=0)


def test_repeated_augmentation_starts_anywhere_in_an_epoch():
    """A sampler started at this rank's sample s yields what one started at 0 yields from s on, for each rank."""
    for rank in range(3):
        sampler = train_imagenet.RepeatedAugmentationSampler(10, 3, rank, 3, seed=4)
        sampler.set_epoch(2)
        whole = list(sampler)
        for start in (1, 2, len(whole)):
            sampler.set_epoch(2, start=start)
            assert list(sampler) == whole[start:]


def test_a_non_finite_loss_stops_the_run(tmp_path, monkeypatch):
    step = train_imagenet.train_step
    calls = []

    def diverging(*args):
        calls.append(1)
        loss = step(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(train_imagenet, "train_step", diverging)
    with pytest.raises(train_imagenet.TrainingError, match=r"the loss is nan at step 3 \(epoch 2\); stopped, the "
                                                           r"last good checkpoint is .*checkpoint-0000002.pth"):
        train_imagenet.main(tiny_run(tmp_path, epochs=2, log_every=1))
    assert (tmp_path / "run" / "checkpoint-0000002.pth").is_file()


def test_bad_input_gives_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train").mkdir()
    (tmp_path / "empty" / "val").mkdir()
    mismatch = write_image_folder(tmp_path / "mismatch")
    (mismatch / "val" / "fox").rename(mismatch / "val" / "wolf")
    other, empty = tmp_path / "small.pth", tmp_path / "empty.pth"
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={}, config={"model": "small"}),
               other)
    empty.touch()
    cases = [(dict(data=str(tmp_path / "nowhere")), "nowhere: no such data directory"),
             (dict(data=str(tmp_path)), r"no train or val folder \(expected .*/train/CLASS/IMAGE"),
             (dict(data=str(tmp_path / "empty")), "empty/train: Couldn't find any class folder"),
             (dict(data=str(mismatch)), "train has 3 classes and val 3, and they differ \\(first: fox\\)"),
             (dict(data=str(data), resume=str(other)), "small.pth: saved with --model 'small', not 'tiny'"),
             (dict(data=str(data), resume=str(tmp_path / "none.pth")), "none.pth: no such checkpoint"),
             (dict(data=str(data), resume=str(empty)), r"empty.pth: not a readable checkpoint \(EOFError\)"),
             (dict(data=str(data), weights=str(other)), r"--weights .*small.pth: does not fit this model \(first: st"),
             (dict(data=str(data), lr=-1.0), "--lr -1.0: the peak learning rate must be positive"),
             (dict(data=str(data), resume=str(tmp_path)), "pytest.*: a folder, not a checkpoint"),
             (dict(data=str(data), output=str(empty)), "--output .*empty.pth: a file, not a folder"),
             (dict(data=str(data), output=str(empty / "run")), "--output .*empty.pth/run: cannot be made a folder"),
             (dict(model="huge"), "unknown --model 'huge'"),
             (dict(drop_path=1.0), r"--drop-path 1.0: a probability of dropping a block, in \[0, 1\)"),
             (dict(clip_grad=-1.0), "--clip-grad must be >= 0, got -1.0"),
             (dict(crop_scale=0.0), r"--crop-scale 0.0: a fraction of the image's area, in \(0, 1\]"),
             (dict(eval_only=True), "--eval-only needs the weights to evaluate"),
             (dict(eval_only=True, resume="auto"), "--eval-only --resume auto: no checkpoint in"),
             (dict(amp="fp8"), "unknown --amp 'fp8'"),
             (dict(batch_size=0), "--batch-size must be positive, got 0"),
             (dict(img_size=64, eval_resize=36), "--eval-resize 36 is smaller than the --img-size 64"),
             (dict(warmup_lr=2e-4), r"--warmup-lr 0.0002 must be positive and at most the peak learning rate, "
              r"0.000125 \(--lr x --batch-size / 1024\)"),  # tiny_run's: 1.6e-2 x 8 / 1024
             (dict(min_lr=2e-4), r"--min-lr 0.0002 is above the peak learning rate, 0.000125 .*: the cosine would"),
             (dict(warmup_lr=0.0, bench=1), "--warmup-lr 0.0 must be positive")]
    for settings in (dict(bench=1), dict(eval_only=True, weights="w.pth")):  # neither follows the schedule
        train_imagenet.check(tiny_run(tmp_path, min_lr=2e-4, warmup_lr=2e-4, **settings))
    for overrides, message in cases:
        with pytest.raises(train_imagenet.InputError, match=message) as error:
            train_imagenet.main(tiny_run(tmp_path, **overrides))
        assert "\n" not in str(error.value)


def test_an_imagenet_resume_refuses_another_schedule(tmp_path):
    """The saved optimiser and scheduler hold the learning rates and the cosine's length: a resume with other ones
    would follow the saved schedule (past its end, back up the cosine), so it is refused; an evaluation is not."""
    saved = train_imagenet.Config()
    path = tmp_path / "checkpoint-0000002.pth"
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={},
                    config=dataclasses.asdict(saved)), path)
    for changed, message in [(dict(epochs=400), "saved with --epochs 300, not 400"),
                             (dict(lr=2e-3), "saved with --lr 0.001, not 0.002"),
                             (dict(min_lr=0.0), "saved with --min-lr 1e-05, not 0.0"),
                             (dict(ema_decay=0.9), "saved with --ema-decay 0.0, not 0.9")]:
        with pytest.raises(train_imagenet.InputError, match=message):
            train_imagenet.read_checkpoint(path, dataclasses.replace(saved, **changed),
                                           train_imagenet.WEIGHTS_DEPEND_ON, train_imagenet.TRAINING_DEPENDS_ON)
    evaluation = dataclasses.replace(saved, epochs=400, eval_only=True)
    assert train_imagenet.read_checkpoint(path, evaluation, train_imagenet.WEIGHTS_DEPEND_ON,
                                          train_imagenet.TRAINING_DEPENDS_ON)["config"]["epochs"] == 300


@pytest.mark.slow
def test_a_resume_that_does_not_fit_gives_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    train_imagenet.main(tiny_run(tmp_path))
    with pytest.raises(train_imagenet.InputError, match="holds another run's checkpoints: continue it with --resume"):
        train_imagenet.main(tiny_run(tmp_path))
    with pytest.raises(train_imagenet.InputError, match=r"saved with --batch-size 8, not 4"):
        train_imagenet.main(tiny_run(tmp_path, resume="auto", batch_size=4))
    with pytest.raises(train_imagenet.InputError, match=r"saved with steps_per_epoch 2, now 1 \(other options or data"):
        train_imagenet.main(tiny_run(tmp_path, resume="auto", synthetic_train=8))
    with pytest.raises(train_imagenet.InputError, match=r"does not fit this model \(first: head.weight \(6, 512\)"):
        train_imagenet.main(tiny_run(tmp_path, resume="auto", data=str(data), batch_size=4, eval_only=True))


@pytest.mark.slow
def test_command_line_errors_exit_with_one_line(tmp_path):
    data = write_image_folder(tmp_path / "data")
    (data / "train" / "cat" / "0.png").write_bytes(b"not an image")
    script = str(Path(__file__).with_name("train_imagenet.py"))
    run = subprocess.run([sys.executable, script, "--data", str(data), "--img-size", "32", "--batch-size", "4",
                          "--min-lr", "1e-6", "--workers", "1", "--output", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == \
        f"train_imagenet.py: error: {data / 'train' / 'cat' / '0.png'}: unreadable image " \
        f"(cannot identify image file '{data / 'train' / 'cat' / '0.png'}')"
    assert "Traceback" not in run.stderr
    run = subprocess.run([sys.executable, script, "--model", "huge"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "invalid choice: 'huge'" in run.stderr and "Traceback" not in run.stderr


def torchrun(script, *args, processes=2):
    """(the finished run, its seconds): script (a name beside this file, or a path) under torchrun."""
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                          str(processes), str(Path(__file__).parent / script), *map(str, args)], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    return run, time.perf_counter() - started


def instrumented(script, folder, record=None, kill=False):
    """A script (written in folder) that runs script's command line with, where asked, the training items each rank
    loads (keys of its Augmented, workers 0) appended to record-RANK.jsonl, and rank 0 killed (os._exit: no clean-up)
    as soon as its first checkpoint is written: torchrun then ends the other ranks wherever they are."""
    path = folder / f"{record or 'killed'}_{script}"
    path.write_text(textwrap.dedent(f"""
        import json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import {script.removesuffix(".py")} as script
        load, save = script.Augmented.__getitem__, script.save_checkpoint
        def recorded(self, key):
            if isinstance(key, tuple):  # a training item; evaluation's are indices
                with open(os.path.join({str(folder)!r}, f"{record}-{{os.environ['RANK']}}.jsonl"), "a") as file:
                    file.write(json.dumps(key) + "\\n")
            return load(self, key)
        def save_then_die(*args, **kwargs):
            save(*args, **kwargs)
            os._exit(3)
        if {record is not None}:
            script.Augmented.__getitem__ = recorded
        if {kill}:
            script.save_checkpoint = save_then_die
        script.command_line()
        """))
    return path


@pytest.mark.slow
def test_imagenet_under_torchrun(tmp_path):
    """Two processes: bad input met by rank 0 alone before the ranks' first exchange, or by one rank mid-epoch, ends
    every rank within seconds, one line printed once and no traceback (two processes that train: below)."""
    run, seconds = torchrun("train_imagenet.py", "--resume", tmp_path / "missing.pth", "--output", tmp_path / "run")
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert run.returncode != 0
    assert errors == [f"train_imagenet.py: error: {tmp_path / 'missing.pth'}: no such checkpoint"]
    # torchrun's own report of the failed worker is a traceback of the launcher; none comes from the ranks
    assert run.stderr.count("Traceback") == run.stderr.count("ChildFailedError:") <= 1, run.stderr[-3000:]
    assert seconds < 60
    data = write_image_folder(tmp_path / "data")  # one rank alone meets the unreadable image, mid-epoch
    (data / "train" / "dog" / "1.png").write_bytes(b"not an image")
    run, seconds = torchrun("train_imagenet.py", "--data", data, "--img-size", "32", "--batch-size", "4",
                            "--min-lr", "1e-6", "--repeated-aug", "1", "--workers", "0", "--output", tmp_path / "bad")
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    bad = data / "train" / "dog" / "1.png"
    assert run.returncode != 0 and len(errors) == 1
    assert errors[0].endswith(f"1.png: unreadable image (cannot identify image file '{bad}')")
    assert run.stderr.count("Traceback") == run.stderr.count("ChildFailedError:") <= 1, run.stderr[-3000:]
    assert seconds < 60


# the options; a rank's items a step and an epoch (a pass); the training set's size; the log's step counter; what each
# evaluation counts over both ranks (11 images, 5 scenes: uneven shares)
TWO_PROCESS_RESUMES = {
    "train_imagenet.py": dict(options=["--synthetic-train", 32, "--synthetic-val", 11, "--batch-size", 8, "--epochs", 2,
                                       "--drop-path", 0.1, "--drop-path-epoch", 0, "--ema-decay", 0.9],
                              per_step=4, per_pass=16, train_set=32, counted="step", evaluated=dict(images=11)),
    "train_cityscapes.py": dict(options=["--model", "dgmn2-tiny", "--iterations", 8, "--eval-every", 4,
                                         "--synthetic-train", 6, "--synthetic-val", 5, "--base-size", 32, "--crop", 32,
                                         "--eval-stride", 24, "--batch-size", 4],
                                per_step=2, per_pass=3, train_set=6, counted="iteration",
                                evaluated=dict(pixels=5 * 32 * 32))}  # no ignored pixels


@pytest.mark.slow
@pytest.mark.parametrize("script", TWO_PROCESS_RESUMES)
def test_two_processes_resume_mid_way_exactly(tmp_path, script):
    """Under torchrun with a checkpoint every 3 steps (mid-epoch for ImageNet, mid-pass for Cityscapes): each rank's
    stretches go on in its data where the last ended, every pass covering the training set once over the ranks, and
    each validation image (pixel) is counted once; a run killed after the first checkpoint resumes with each rank at
    its place in its data, dropout and drop path reseeded from the step, and ends with the uninterrupted run's weights
    and optimiser state (and EMA)."""
    case = TWO_PROCESS_RESUMES[script]
    settings = [*case["options"], "--save-every", 3, "--workers", 0, "--resume", "auto"]
    steps = [instrumented(script, tmp_path, record="a"), instrumented(script, tmp_path, kill=True),
             instrumented(script, tmp_path, record="b")]
    for name, step in zip("abb", steps):
        run, _ = torchrun(step, *settings, "--output", tmp_path / name)
        assert run.returncode == 0 or step.name.startswith("killed") and re.search(r"exitcode\s*: 3 ", run.stderr), \
            run.stderr[-2000:]
    for name in "ab":  # b: killed after 3, resumed at 4
        log = log_records(tmp_path / name)
        assert [r[case["counted"]] for r in log] == [3, 4, 6, 8]
        assert [{key: r[key] for key in case["evaluated"]} for r in log[1::2]] == [case["evaluated"]] * 2
    loads = {name: [[json.loads(line) for line in (tmp_path / f"{name}-{rank}.jsonl").read_text().splitlines()]
                    for rank in range(2)] for name in "ab"}
    per_step, per_pass = case["per_step"], case["per_pass"]
    for rank in range(2):
        assert len(loads["a"][rank]) == 8 * per_step and loads["b"][rank] == loads["a"][rank][3 * per_step:]
    index = 0 if script == "train_imagenet.py" else 1  # ImageNet's keys: (index, seed); Cityscapes': (pass, index)
    for p in range(8 * per_step // per_pass):
        covered = [key[index] for keys in loads["a"] for key in keys[p * per_pass:(p + 1) * per_pass]]
        assert sorted(covered) == list(range(case["train_set"]))
    if index == 1:
        assert all([key[0] for key in keys] == [i // per_pass for i in range(8 * per_step)] for keys in loads["a"])
    expected, resumed = (torch.load(tmp_path / name / "checkpoint-0000008.pth", weights_only=True) for name in "ab")
    assert expected.keys() == resumed.keys()
    for part in ("model", "optimizer", "ema"):
        torch.testing.assert_close(resumed.get(part), expected.get(part), rtol=0, atol=0)


def test_repeated_augmentation_deals_each_image_three_times_across_ranks():
    def epoch(e):
        samplers = [train_imagenet.RepeatedAugmentationSampler(12, 3, rank, 2, seed=0) for rank in range(2)]
        for passes in samplers:
            passes.set_epoch(e)
        return [list(passes) for passes in samplers]

    ranks = epoch(0)
    assert epoch(0) == ranks and epoch(1) != ranks  # a function of (seed, epoch) alone
    assert [len(r) for r in ranks] == [6, 6]  # as many samples as images, split evenly
    images = [index for r in ranks for index, _ in r]
    assert sorted(images.count(i) for i in set(images)) == [3, 3, 3, 3]  # 4 images, 3 copies each
    for image in set(images):  # the copies of an image go to both ranks
        assert all(any(index == image for index, _ in r) for r in ranks)
    seeds = [seed for r in ranks for _, seed in r]
    assert len(set(seeds)) == 12  # each copy its own augmentation


def test_randaugment_posterizes_as_timms_increasing_operation():
    """timm's PosterizeIncreasing keeps 4 - int(0.4 m) bits (torchvision's Posterize 8 - round(0.4 m)), here at
    least 1; applied, m9 leaves each channel its top bit."""
    bits = train_imagenet.TimmOperations._AUGMENTATION_SPACE["Posterize"][0](101, 8, 8)
    assert [bits[10 * m].item() for m in (0, 2, 5, 9, 10)] == [4, 4, 2, 1, 1]

    class PosterizeOnly(train_imagenet.TimmOperations):
        _AUGMENTATION_SPACE = {"Posterize": train_imagenet.TimmOperations._AUGMENTATION_SPACE["Posterize"]}

    from PIL import Image
    image = PosterizeOnly(1, 90, num_magnitude_bins=101)(Image.new("RGB", (8, 8), (200, 100, 50)))
    assert image.getpixel((3, 3)) == (128, 0, 0)


def test_randaugment_follows_timms_scale(monkeypatch):
    calls, rotations = [], train_imagenet.TimmOperations._AUGMENTATION_SPACE["Rotate"][0]

    class Recorder:
        def __init__(self, num_ops, magnitude, num_magnitude_bins, **kwargs):
            calls.append(magnitude / (num_magnitude_bins - 1))
            self.rotate = rotations(num_magnitude_bins, 8, 8)[magnitude]

        def __call__(self, image):
            return image

    monkeypatch.setattr(train_imagenet, "TimmOperations", Recorder)
    torch.manual_seed(0)
    exact = train_imagenet.RandAugment(2, 9.0, std=0.0)
    for _ in range(1000):
        exact(torch.zeros(3, 8, 8))
    assert 0.45 < len(calls) / 2000 < 0.55  # each of the 2 operations with probability 0.5, as timm's
    assert set(calls) == {0.9}  # m9 is 90% of each operation's range (torchvision's own RandAugment(9): 30%)
    assert Recorder(1, 90, 101).rotate == 27.0  # degrees
    calls.clear()
    noisy = train_imagenet.RandAugment(2, 9.0, std=0.5)
    for _ in range(1000):
        noisy(torch.zeros(3, 8, 8))
    spread = torch.tensor(calls) * 10
    assert abs(spread.mean() - 9) < 0.1 and abs(spread.std() - 0.5) < 0.1  # mstd0.5


def test_imagenet_transforms_follow_the_release():
    cfg = train_imagenet.Config(img_size=32)
    steps = [type(t).__name__ for t in train_imagenet.transforms(cfg, train=True).transforms]
    assert steps == ["RandomResizedCrop", "RandomHorizontalFlip", "RandAugment", "ToImage", "ToDtype", "Normalize",
                     "RandomErasing"]  # no ColorJitter beside RandAugment; the PIL-side steps before ToImage
    jitter = [type(t).__name__ for t in train_imagenet.transforms(dataclasses.replace(cfg, randaugment_ops=0),
                                                                  train=True).transforms]
    assert "ColorJitter" in jitter
    from PIL import Image
    image = train_imagenet.transforms(cfg, train=True)(Image.new("RGB", (40, 48)))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32


def test_drop_path_starts_at_its_epoch(tmp_path, monkeypatch):
    rates, set_rate = [], dgmn2.DGMN2.set_drop_path_rate

    def record(model, rate):
        rates.append(rate)
        set_rate(model, rate)

    monkeypatch.setattr(dgmn2.DGMN2, "set_drop_path_rate", record)
    train_imagenet.main(tiny_run(tmp_path, epochs=2, drop_path=0.1, drop_path_epoch=1, synthetic_val=2))
    assert rates[-2:] == [0.0, 0.1]  # set at each epoch (before: at construction)
    assert train_imagenet.Config().drop_path_epoch == 100  # the release's recipe by default


@pytest.mark.slow
def test_eval_only_evaluates_the_ema_weights(tmp_path, capsys):
    trained = train_imagenet.main(tiny_run(tmp_path, ema_decay=0.5))
    evaluated = train_imagenet.main(tiny_run(tmp_path, eval_only=True, resume="auto"))
    assert "Evaluating the EMA weights of" in capsys.readouterr().out
    assert evaluated["top1"] == trained["ema_top1"] and evaluated["top5"] == trained["ema_top5"]


@pytest.mark.slow
def test_imagenet_loaders_keep_their_workers(tmp_path):
    train, val, classes = train_imagenet.loaders(tiny_run(tmp_path, workers=1), 0, 1, print)
    assert train.persistent_workers and val.persistent_workers and classes == 6
    assert train.pin_memory == torch.cuda.is_available()
    first = [images for images, _ in train]
    assert all(map(torch.equal, first, [images for images, _ in train]))  # the same epoch, the same augmentations
    train.sampler.set_epoch(1)
    assert not any(map(torch.equal, first, [images for images, _ in train]))


def test_the_learning_rate_scales_with_the_global_batch():
    """DeiT's rule, lr 5e-4 per 512 images (--lr 1e-3 at 1024): at a global batch of 256 the peak is 2.5e-4; the
    warm-up still starts at --warmup-lr (1e-6) and reaches the scaled peak after --warmup-epochs."""
    cfg = train_imagenet.Config(batch_size=256, epochs=4, warmup_epochs=1, warmup_lr=1e-6, min_lr=1e-5)
    lrs = scheduled_lrs(*train_imagenet.optimiser(cfg, nn.Linear(2, 2), steps_per_epoch=4), 5)
    assert lrs[0] == pytest.approx(1e-6, rel=1e-9) and lrs[4] == pytest.approx(2.5e-4, rel=1e-9)
    assert lrs[2] == pytest.approx((1e-6 + 2.5e-4) / 2, rel=1e-9)  # half-way up the linear ramp


def test_imagenet_top_5_counts_the_fifth_class_and_not_the_sixth():
    """Labels ranked 5th and 6th of 8 classes: only the 5th is a top-5 hit; the model is evaluated in eval mode (its
    dropout and BatchNorm off) and handed back in training mode."""
    modes = []

    class Fixed(nn.Module):
        def forward(self, images):  # class 0 first, class 7 last
            modes.append(self.training)
            return torch.arange(8.0, 0, -1).expand(len(images), -1)

    model = Fixed()
    loader = [(torch.zeros(3, 3, 8, 8), torch.tensor([4, 5, 1]))]
    metrics = train_imagenet.evaluate(model, loader, torch.device("cpu"), contextlib.nullcontext(),
                                      train_imagenet.Config(), 1)
    assert metrics["top1"] == 0 and metrics["top5"] == pytest.approx(200 / 3) and metrics["images"] == 3
    assert modes == [False] and model.training


def test_imagenet_evaluation_resizes_to_256_crops_224_and_normalises():
    """The release's evaluation at 224: the shorter side to 224 / 0.875 = 256, the centre 224 x 224, then ImageNet's
    mean and std. A 320 x 256 image needs no resize: the result is its centre crop, normalised."""
    from PIL import Image
    pixels = torch.randint(0, 256, (256, 320, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = train_imagenet.transforms(train_imagenet.Config(), train=False)(Image.fromarray(pixels.numpy()))
    crop = pixels[16:240, 48:272].permute(2, 0, 1).double() / 255  # (3, 224, 224): 16 rows and 48 columns off each side
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(image.double(), (crop - mean) / std, rtol=0, atol=1e-5)


def test_imagenet_defaults_are_deits_recipe(tmp_path):
    """DeiT's / PVT's numbers: 300 epochs, 5 of warm-up from 1e-6, cosine to 1e-5, weight decay 0.05, label smoothing
    0.1, MixUp alpha 0.8 and CutMix alpha 1.0 (one of the two a batch), random erasing 0.25, 3 repeats."""
    cfg = train_imagenet.Config()
    assert (cfg.epochs, cfg.warmup_epochs, cfg.warmup_lr, cfg.min_lr, cfg.weight_decay) == (300, 5, 1e-6, 1e-5, 0.05)
    assert (cfg.label_smoothing, cfg.random_erasing, cfg.repeated_aug) == (0.1, 0.25, 3)
    train, _, _ = train_imagenet.loaders(tiny_run(tmp_path, mixup=cfg.mixup, cutmix=cfg.cutmix), 0, 1, print)
    mixes = train.collate_fn.keywords["mix"].transforms
    assert [(type(m).__name__, m.alpha) for m in mixes] == [("MixUp", 0.8), ("CutMix", 1.0)]


def test_imagenet_training_loss_smooths_the_labels(tmp_path, monkeypatch):
    """The loss a run trains with is the cross-entropy against labels smoothed by --label-smoothing (0.1 by default):
    at 3 classes the target 0 becomes (0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3)."""
    criteria, step = [], train_imagenet.train_step
    monkeypatch.setattr(train_imagenet, "train_step", lambda parts, *args: criteria.append(parts.criterion) or
                        step(parts, *args))
    train_imagenet.main(tiny_run(tmp_path, synthetic_val=2))
    log_p = [2 - math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2), -math.log(math.exp(2) + 2)]
    expected = -sum(q * lp for q, lp in zip([0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], log_p))
    loss = criteria[0](torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_imagenet_ema_is_a_moving_average_of_the_trained_weights(tmp_path, monkeypatch):
    """--ema-decay d: after the first step the average is the weights, after each further step d x itself + (1 - d) x
    the new weights (two steps at d = 0.9: 0.9 w1 + 0.1 w2)."""
    snapshots, update = [], train_imagenet.AveragedModel.update_parameters

    def record(self, model):
        snapshots.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return update(self, model)

    monkeypatch.setattr(train_imagenet.AveragedModel, "update_parameters", record)
    train_imagenet.main(tiny_run(tmp_path, ema_decay=0.9, synthetic_val=2))
    assert len(snapshots) == 2
    ema = torch.load(tmp_path / "run" / "checkpoint-0000002.pth", weights_only=True)["ema"]
    for name, first in snapshots[0].items():
        torch.testing.assert_close(ema[f"module.{name}"], 0.9 * first + 0.1 * snapshots[1][name])


def test_imagenet_train_step_clips_the_gradient_norm_and_starts_each_step_afresh():
    """--clip-grad 0.5: the gradient (loss (w . x)^2 / 2 at w = 1, x = (3, 4): w . x x = (21, 28), norm 35) is scaled
    to norm 0.5; a second step's gradient is its own, not added to the first's."""
    model = nn.Linear(2, 1, bias=False)
    nn.init.ones_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    parts = train_imagenet.Parts(model, model, optimizer, None, torch.amp.GradScaler("cpu", enabled=False),
                                 contextlib.nullcontext(), lambda out, target: (out ** 2).sum() / 2, None, None, None,
                                 {})
    images = torch.tensor([[3.0, 4.0]])
    train_imagenet.train_step(parts, images, None, train_imagenet.Config(clip_grad=0.5))
    torch.testing.assert_close(model.weight.grad, torch.tensor([[21.0, 28.0]]) * 0.5 / 35)
    for _ in range(2):
        train_imagenet.train_step(parts, images, None, train_imagenet.Config(clip_grad=0.0))
        torch.testing.assert_close(model.weight.grad, torch.tensor([[21.0, 28.0]]))


def test_the_synthetic_validation_images_are_not_the_training_images():
    """The built-in set's validation images are drawn apart from its training images (a held-out set)."""
    train, val, _ = train_imagenet.datasets(train_imagenet.Config(img_size=16))
    for i in range(3):
        assert train[i][1] == val[i][1] and train[i][0].tobytes() != val[i][0].tobytes()


def test_repeated_augmentation_reshuffles_the_images_each_epoch():
    """Each epoch deals the images in a new order (DeiT's RASampler: a permutation of (seed, epoch)), not only new
    augmentations."""
    sampler = train_imagenet.RepeatedAugmentationSampler(12, 3, 0, 1, seed=0)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append([index for index, _ in sampler])
    assert len({tuple(order) for order in orders}) == 3


def test_imagenet_validation_is_split_across_ranks_once(tmp_path):
    """Under 2 processes the ranks' validation shares are disjoint and cover the 11 images, rank 0 taking the even
    ones; each rank's training batch is half the global batch."""
    shares = []
    for rank in range(2):
        train, val, _ = train_imagenet.loaders(tiny_run(tmp_path), rank, 2, print)
        shares.append(list(val.dataset.indices))
        assert train.batch_size == val.batch_size == 4
    assert shares[0] == [0, 2, 4, 6, 8, 10] and sorted(shares[0] + shares[1]) == list(range(11))


def test_an_imagenet_resume_refuses_another_warm_up_decay_or_batch(tmp_path):
    """Beside epochs, lr, min_lr and EMA: the warm-up's length and start, the weight decay and the global batch are in
    the saved optimiser and schedule too, so a training resume with other values is refused."""
    saved = train_imagenet.Config()
    path = tmp_path / "checkpoint-0000002.pth"
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={},
                    config=dataclasses.asdict(saved)), path)
    for changed in [dict(warmup_epochs=10), dict(warmup_lr=1e-7), dict(weight_decay=0.1), dict(batch_size=512)]:
        with pytest.raises(train_imagenet.InputError, match=f"saved with --{next(iter(changed)).replace('_', '-')} "):
            train_imagenet.read_checkpoint(path, dataclasses.replace(saved, **changed),
                                           train_imagenet.WEIGHTS_DEPEND_ON, train_imagenet.TRAINING_DEPENDS_ON)


# ====================================================================================================================
# train_cityscapes.py: Sections 5, 6.3, 8.1.1; Tables 2, 4, 11-15's recipes


def segmentation_run(tmp_path, **overrides):
    """A config of the built-in default, shrunk to a few iterations on 32 x 32 scenes."""
    settings = {**train_cityscapes.SYNTHETIC, **dict(synthetic_train=8, synthetic_val=3, batch_size=2, iterations=2,
                                                      eval_every=2, base_size=32, crop=32, eval_stride=24, workers=0,
                                                      pictures=2, output=str(tmp_path / "run"))}
    return train_cityscapes.Config(**{**settings, **overrides})


def write_cityscapes(root, size=(40, 72)):
    """The real layout: leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and gtFine/SPLIT/CITY/*_gtFine_labelIds.png."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    label_ids = torch.tensor([7, 8, 11, 26, 0, 24])  # road, sidewalk, building, car, unlabeled, person
    for split, city, count in (("train", "aachen", 3), ("val", "lindau", 2)):
        for folder in ("leftImg8bit", "gtFine"):
            (root / folder / split / city).mkdir(parents=True)
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            labels = label_ids[torch.randint(0, len(label_ids), size, generator=g)].to(torch.uint8).numpy()
            Image.fromarray(labels).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


@pytest.mark.parametrize("model, multi_scale", [("dgmn2-tiny", True),
                                                 pytest.param("fcn-dgmn", False, marks=pytest.mark.slow)])
def test_each_segmentation_family_trains_two_iterations(tmp_path, model, multi_scale):
    metrics = train_cityscapes.main(segmentation_run(tmp_path, model=model, multi_scale=multi_scale))
    assert metrics["iteration"] == 2 and math.isfinite(metrics["loss"]) and 0 <= metrics["miou"] <= 100
    assert (tmp_path / "run" / "checkpoint-0000002.pth").is_file()
    assert (tmp_path / "run" / "predictions-0000002.png").is_file()


def test_cityscapes_layout_trains_and_maps_train_ids(tmp_path):
    data = write_cityscapes(tmp_path / "cityscapes")
    val = train_cityscapes.CityscapesTrainIds(str(data), "val")
    _, label = val[0]
    assert set(label.unique().tolist()) <= {0, 1, 2, 13, 11, 255}  # road, sidewalk, building, car, person, ignore
    cfg = train_cityscapes.parse_args(["--data", str(data), "--base-size", "40", "--crop", "32", "--eval-stride",
                                       "24", "--batch-size", "2", "--iterations", "1", "--eval-every", "1",
                                       "--workers", "0", "--output", str(tmp_path / "run")])
    assert cfg.optimizer == "auto" and cfg.crop == 32 and cfg.scale_max == 2.0  # the paper's recipe otherwise
    metrics = train_cityscapes.main(cfg)
    assert metrics["iteration"] == 1 and len(metrics["iou"]) == 19


def test_the_learning_rate_decays_as_a_polynomial_to_zero():
    for name, base in (("fcn", 0.01), ("dgmn2-tiny", 1e-4)):
        cfg = train_cityscapes.Config(model=name, iterations=20)
        lrs = scheduled_lrs(*train_cityscapes.optimiser_and_schedule(cfg, nn.Linear(2, 2)), 21)
        assert lrs == pytest.approx([base * (1 - t / 20) ** 0.9 for t in range(21)], rel=1e-9, abs=1e-12)


def test_miou_from_a_hand_checked_confusion_matrix():
    label = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    # confusion (rows: true class; the ignored pixel left out): [[1, 1, 0], [0, 2, 1], [1, 0, 1]], so the IoU of
    # class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (3 + 3 - 2), class 2 = 1 / (2 + 2 - 1)

    class Fixed(nn.Module):  # one window, the 2 x 4 image (smaller than the 4 x 4 window): the one-hot prediction
        def forward(self, windows):
            assert windows.shape == (1, 3, 2, 4)
            return F.one_hot(prediction, 3).permute(2, 0, 1).float()[None]

    cfg = cs.Config(crop=4, eval_stride=4, eval_batch=1, workers=0)
    metrics = cs.evaluate(Fixed(), [(torch.zeros(3, 2, 4, dtype=torch.uint8), label)], ["a", "b", "c"], cfg,
                          torch.device("cpu"), torch.autocast("cpu", enabled=False), 0, 1)
    assert metrics["pixels"] == 7 and metrics["iou"] == dict(a=round(100 / 3, 2), b=50.0, c=round(100 / 3, 2))
    assert metrics["miou"] == pytest.approx((100 / 3 + 50 + 100 / 3) / 3)


def test_segmentation_loss_falls_on_a_fixed_batch(tmp_path, monkeypatch):
    """The training set is one batch of 2 scenes at scale 1 (the crops and flips vary); 8 steps of the recipe."""
    cfg = segmentation_run(tmp_path, synthetic_train=2, iterations=8, eval_every=8, scale_min=1.0, scale_max=1.0,
                           pictures=0)
    losses = losses_of(train_cityscapes, cfg, monkeypatch)
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


@pytest.mark.slow
def test_segmentation_resume_continues_exactly(tmp_path, monkeypatch):
    train_cityscapes.main(segmentation_run(tmp_path / "a", iterations=4))
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000004.pth", weights_only=True)
    killed = segmentation_run(tmp_path / "b", iterations=4)
    assert kill_then_resume(train_cityscapes, killed, monkeypatch) == 2  # saved at 2 of 4
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000004.pth", weights_only=True)
    torch.testing.assert_close(resumed["model"], expected["model"])
    torch.testing.assert_close(resumed["optimizer"], expected["optimizer"])
    with pytest.raises(train_cityscapes.InputError, match="saved with --iterations 4, not 8"):
        train_cityscapes.main(dataclasses.replace(killed, resume="auto", iterations=8))


@pytest.mark.slow
def test_segmentation_checkpoints_between_evaluations_resume_exactly(tmp_path, monkeypatch):
    """--save-every 1 within --eval-every 3: a checkpoint (and log line) each iteration, an evaluation at 3; each
    stretch goes on in the data where the last ended; a run killed after its first checkpoint resumes mid-way to the
    same items and the same weights, dropout and crops included."""
    settings = dict(iterations=3, eval_every=3, save_every=1, pictures=0)
    loaded = keys_loaded(train_cityscapes.Augmented, monkeypatch)
    train_cityscapes.main(segmentation_run(tmp_path / "a", **settings))
    log = log_records(tmp_path / "a" / "run")
    assert [(r["iteration"], "miou" in r) for r in log] == [(1, False), (2, False), (3, True)]
    assert len(loaded) == 6 and len(set(loaded)) == 6  # 3 batches of 2 from the first pass over 8 scenes
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000003.pth", weights_only=True)
    uninterrupted = loaded[:]
    loaded.clear()
    assert kill_then_resume(train_cityscapes, segmentation_run(tmp_path / "b", **settings), monkeypatch) == 2
    assert loaded == uninterrupted
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000003.pth", weights_only=True)
    torch.testing.assert_close(resumed["model"], expected["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"], expected["optimizer"], rtol=0, atol=0)


def test_the_training_passes_start_anywhere_in_their_stream():
    """An iterator started at item s of the sampler's endless stream yields what one started at 0 yields from s on:
    across passes, for each rank; each pass is a permutation of the rank's share."""
    for rank in range(2):
        passes = train_cityscapes.Passes(range(7), num_replicas=2, rank=rank, shuffle=True, seed=5, drop_last=True)
        stream = list(itertools.islice(passes, 20))  # 3 items a pass
        assert all(len({i for _, i in stream[p * 3:p * 3 + 3]}) == 3 for p in range(6))
        assert [p for p, _ in stream[:9]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        for start in (1, 3, 8):
            passes.start = start
            assert list(itertools.islice(passes, 20 - start)) == stream[start:]


@pytest.mark.slow
def test_segmentation_bad_input_gives_one_line(tmp_path):
    data = write_cityscapes(tmp_path / "cityscapes")
    shutil.rmtree(data / "gtFine" / "val")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a checkpoint")
    cases = [(dict(data=str(tmp_path / "nowhere")), "nowhere: no such data directory"),
             (dict(data=str(data)), "not a Cityscapes directory for split 'val'"),
             (dict(eval_stride=40), "--eval-stride 40 exceeds the window --crop 32"),
             (dict(scale_min=2.0, scale_max=1.0), "--scale-min 2.0 and --scale-max 1.0: give 0 < min <= max"),
             (dict(poly_power=0.0), "--poly-power 0.0 must be positive"),
             (dict(model="segformer"), "unknown --model 'segformer'"),
             (dict(pretrained=str(tmp_path / "none.pth")), "--pretrained .*none.pth: no such checkpoint file"),
             (dict(model="fcn", pretrained=str(notes)), "--pretrained .*notes.txt: not a readable checkpoint"),
             (dict(base_size=1, crop=1, eval_stride=1), "--base-size 1 at --scale-min 0.5: a shorter side under one "
                                                        "pixel"),
             (dict(workers=-1), "--workers -1 must be at least 0")]
    for overrides, message in cases:
        with pytest.raises(train_cityscapes.InputError, match=message) as error:
            train_cityscapes.main(segmentation_run(tmp_path, **overrides))
        assert "\n" not in str(error.value)
    from PIL import Image
    mismatched = write_cityscapes(tmp_path / "mismatched")
    Image.new("RGB", (30, 20)).save(mismatched / "leftImg8bit/val/lindau/lindau_000001_000019_leftImg8bit.png")
    val = train_cityscapes.CityscapesTrainIds(str(mismatched), "val")
    with pytest.raises(train_cityscapes.InputError, match=r"lindau_000001_000019_leftImg8bit.png: the image is 30 x 20 "
                       r"but its label .*lindau_000001_000019_gtFine_labelIds.png is 72 x 40$"):
        [val[i] for i in range(len(val))]
    with pytest.raises(train_cityscapes.InputError, match=r"--predict .*notes.txt/out: cannot be made a folder"):
        train_cityscapes.write_predictions(None, None, segmentation_run(tmp_path, predict=str(notes / "out")), "cpu",
                                           None, 0, 1)
    script = str(Path(__file__).with_name("train_cityscapes.py"))
    run = subprocess.run([sys.executable, script, "--data", str(tmp_path / "nowhere")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().endswith("nowhere: no such data directory")
    assert "Traceback" not in run.stderr


cs = train_cityscapes


MMSEG = dict(brightness=(-32, 32), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=(-18 / 180, 18 / 180))  # defaults


def rgb_image(seed=0, H=6, W=7):
    """A float (3, H, W) image on the 0-255 scale with saturated, grey and dark pixels among random ones."""
    image = torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed)) * 255
    image[:, 0, 0] = torch.tensor([255.0, 0.0, 0.0])  # fully saturated
    image[:, 0, 1] = 128.0  # grey: no hue, S = 0
    image[:, 0, 2] = 0.0  # black
    return image


def hsv(image):
    """Per-pixel (h, s, v) of a (3, H, W) 0-255 image by the standard library: (H * W, 3)."""
    pixels = (image / 255).flatten(1).T.tolist()  # (3, H, W) -> (H * W, 3)
    return torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels], dtype=torch.float64)


def from_hsv(values, shape):
    rgb = torch.tensor([colorsys.hsv_to_rgb(*p) for p in values.tolist()], dtype=torch.float64)
    return (rgb.T * 255).reshape(shape)  # (H * W, 3) -> (3, H, W)


def seed_where(wanted):
    """The first seed whose photometric draws (5 coins, then 4 values, as photometric_distortion draws them) apply
    exactly the ops in wanted; with contrast, wanted["last"] says whether it comes after saturation and hue."""
    names = list(MMSEG)
    assert list(cs.DISTORTIONS) == names  # the order of the coins and values drawn
    for seed in range(10_000):
        g = torch.Generator().manual_seed(seed)
        coins, values = torch.rand(5, generator=g).tolist(), torch.rand(4, generator=g).tolist()
        applied = {name for name, coin in zip(names, coins) if coin < 0.5}
        if applied == set(wanted["ops"]) and ("last" not in wanted or (coins[4] >= 0.5) == wanted["last"]):
            return seed, {n: low + (high - low) * u for (n, (low, high)), u in zip(MMSEG.items(), values)}
    raise AssertionError(f"no seed draws {wanted}")


def distort(image, seed):
    return cs.photometric_distortion(image.clone(), torch.Generator().manual_seed(seed))


def test_brightness_and_contrast_are_additive_and_multiplicative_clipped():
    image = rgb_image()
    seed, drawn = seed_where(dict(ops=["brightness"]))
    torch.testing.assert_close(distort(image, seed), (image + drawn["brightness"]).clamp(0, 255))
    assert -32 <= drawn["brightness"] <= 32
    seed, drawn = seed_where(dict(ops=["contrast"]))
    torch.testing.assert_close(distort(image, seed), (image * drawn["contrast"]).clamp(0, 255))
    seed, _ = seed_where(dict(ops=[]))
    assert torch.equal(distort(image, seed), image)


def test_saturation_scales_s_and_keeps_hue_and_value():
    image = rgb_image()
    for factor in (0.5, 0.8, 1.3, 1.5, 4.0):  # 4: S capped at 1 for most pixels
        expected = hsv(image)
        expected[:, 1] = (expected[:, 1] * factor).clamp(max=1)
        out = cs.saturation(image, factor)
        torch.testing.assert_close(out.double(), from_hsv(expected, image.shape), atol=1e-3, rtol=0)
        got = hsv(out)
        torch.testing.assert_close(got[:, 2], hsv(image)[:, 2], atol=1e-5, rtol=0)  # V kept
        coloured = hsv(image)[:, 1] > 0.05
        turn = (got[coloured, 0] - hsv(image)[coloured, 0] + 0.5) % 1 - 0.5
        assert turn.abs().max() < 1e-4  # hue kept
    seed, drawn = seed_where(dict(ops=["saturation"]))
    torch.testing.assert_close(distort(image, seed), cs.saturation(image, drawn["saturation"]).clamp(0, 255))
    assert 0.5 <= drawn["saturation"] <= 1.5


def test_hue_turns_by_the_opencv_delta_over_180():
    image = rgb_image()
    seed, drawn = seed_where(dict(ops=["hue"]))
    delta = drawn["hue"]
    assert abs(delta) <= 18 / 180
    out = distort(image, seed)
    torch.testing.assert_close(out, v2.functional.adjust_hue(image / 255, delta) * 255)
    expected = hsv(image)
    expected[:, 0] = (expected[:, 0] + delta) % 1  # a turn of delta, S and V kept
    torch.testing.assert_close(out.double(), from_hsv(expected, image.shape), atol=2e-3 * 255, rtol=0)


def test_contrast_comes_before_or_after_saturation_and_hue():
    image = rgb_image(1)
    ops = ["brightness", "contrast", "saturation", "hue"]
    for last in (False, True):
        seed, d = seed_where(dict(ops=ops, last=last))
        x = (image + d["brightness"]).clamp(0, 255)
        if not last:
            x = (x * d["contrast"]).clamp(0, 255)
        x = cs.saturation(x, d["saturation"]).clamp(0, 255)
        x = (v2.functional.adjust_hue(x / 255, d["hue"]) * 255).clamp(0, 255)
        if last:
            x = (x * d["contrast"]).clamp(0, 255)
        torch.testing.assert_close(distort(image, seed), x, atol=1e-3, rtol=0)


def test_each_distortion_applies_with_probability_one_half(monkeypatch):
    calls = []

    def recorder(name):
        def op(image, value):
            calls[-1].append((name, value))
            return image
        return op

    for name, (_, low, high) in list(cs.DISTORTIONS.items()):
        monkeypatch.setitem(cs.DISTORTIONS, name, (recorder(name), low, high))
    draws = 2000
    for seed in range(draws):
        calls.append([])
        cs.photometric_distortion(torch.zeros(3, 1, 1), torch.Generator().manual_seed(seed))
    for name, (low, high) in MMSEG.items():
        values = [v for call in calls for n, v in call if n == name]
        assert abs(len(values) / draws - 0.5) < 0.04  # binomial(2000, 0.5): sd 0.011
        assert low <= min(values) and max(values) <= high
        assert abs(sum(values) / len(values) - (low + high) / 2) < 0.05 * (high - low)
    orders = [[n for n, _ in call] for call in calls]
    assert all(order[0] == "brightness" for order in orders if "brightness" in order)
    assert all(order.index("saturation") < order.index("hue") for order in orders if {"saturation", "hue"} <= {*order})
    full = [order for order in orders if len(order) == 4]
    assert {tuple(order) for order in full} == {("brightness", "contrast", "saturation", "hue"),
                                                ("brightness", "saturation", "hue", "contrast")}
    assert 0.3 < sum(order[1] == "contrast" for order in full) / len(full) < 0.7


def coordinates(H, W):
    """A uint8 image whose channels 0 and 1 hold each pixel's row and column: a crop says where it was taken."""
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([rows, cols, rows * 0]).to(torch.uint8)


def replayed_windows(seed, H, W, h, w, tries=11):
    """The (top, left) windows random_crop draws at scale 1 from generator seed, in order."""
    g = torch.Generator().manual_seed(seed)
    return [(int(torch.randint(H - h + 1, (), generator=g)), int(torch.randint(W - w + 1, (), generator=g)))
            for _ in range(tries)]


def acceptable(label):
    """mmseg's test, written out: two classes or more among the labelled pixels, none covering 75% of them."""
    values, counts = label[label != 255].unique(return_counts=True)
    return len(values) >= 2 and counts.max().item() / counts.sum().item() < 0.75


def test_crop_rejection_keeps_the_first_acceptable_window_of_ten():
    H, W, crop = 60, 80, 20
    label = torch.zeros(H, W, dtype=torch.uint8)
    label[:25, :30] = 1  # most windows hold class 0 alone or nearly
    label[50:, 70:] = 255
    image = coordinates(H, W)
    accepted, rejected_all, free = 0, 0, 0
    for seed in range(200):
        out, cut = cs.random_crop(image, label, H, crop, torch.Generator().manual_seed(seed))  # short = H: scale 1
        windows = replayed_windows(seed, H, W, crop, crop)
        goods = [(t, l) for t, l in windows[:10] if acceptable(label[t:t + crop, l:l + crop])]
        top, left = goods[0] if goods else windows[10]  # after 10 rejections, one more draw (mmseg's loop)
        assert (int(out[0, 0, 0]), int(out[1, 0, 0])) == (top, left)
        assert torch.equal(cut, label[top:top + crop, left:left + crop])
        out, _ = cs.random_crop(image, label, H, crop, torch.Generator().manual_seed(seed), tries=0)
        assert (int(out[0, 0, 0]), int(out[1, 0, 0])) == windows[0]  # no check: the first window
        accepted += acceptable(cut)
        rejected_all += not goods
        free += acceptable(label[windows[0][0]:windows[0][0] + crop, windows[0][1]:windows[0][1] + crop])
    assert free < 40 and accepted > 120 and accepted >= 200 - rejected_all  # 12% of windows pass, 70% of crops


def test_crop_smaller_than_the_window_is_the_whole_image_padded_after_normalisation():
    H, W, crop = 20, 30, 40
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    label = torch.randint(0, 3, (H, W), dtype=torch.uint8, generator=g)
    cfg = cs.Config(crop=crop, base_size=H, scale_min=1.0, scale_max=1.0)  # the shorter side stays H: scale 1
    padded_image, padded_label = cs.Augmented([(image, label)], cfg)[(7, 0)]
    assert padded_image.shape == (3, crop, crop) and padded_label.shape == (crop, crop)
    assert (padded_image[:, H:] == 0).all() and (padded_image[:, :, W:] == 0).all()  # 0: the mean colour
    assert (padded_label[H:] == 255).all() and (padded_label[:, W:] == 255).all()
    inside = padded_label[:H, :W]  # the top and left are not padded: the label is there whole, maybe flipped
    assert torch.equal(inside, label) or torch.equal(inside, label.flip(-1))
    assert (padded_image[:, :H, :W] != 0).float().mean() > 0.99
    # normalised before padding: a black image's pixels are -mean / std, the padding 0
    black, _ = cs.Augmented([(torch.zeros_like(image), label)], cfg)[(3, 0)]
    assert (black[:, :H, :W] < -0.5).all() and (black[:, H:] == 0).all()


def test_the_fcns_take_the_dgmn_papers_crop_and_flip_without_mmsegs_additions():
    """Section 8.1.1's FCN recipe: a grey image stays one grey (no photometric distortion), a one-class label's crop
    is the first window drawn (no rejection); the DGMN2 models distort the colours."""
    H, W, crop = 30, 40, 16
    grey, label = torch.full((3, H, W), 100, dtype=torch.uint8), torch.zeros(H, W, dtype=torch.uint8)
    for model, mmseg in [("fcn-dgmn", False), ("fcn", False), ("dgmn2-tiny", True)]:
        cfg = cs.Config(model=model, crop=crop, base_size=H, scale_min=1.0, scale_max=1.0)
        colours = {tuple(cs.Augmented([(grey, label)], cfg)[(key, 0)][0][:, 0, 0].tolist()) for key in range(20)}
        assert (colours == {tuple(cs.normalise(torch.full((3, 1, 1), 100.0)).flatten().tolist())}) != mmseg
    fcn = cs.Config(model="fcn", crop=crop, base_size=H, scale_min=1.0, scale_max=1.0)
    for key in range(20):
        out = cs.Augmented([(coordinates(H, W), label)], fcn)[(key, 0)][0]
        g = torch.Generator().manual_seed(cs.seed_of(fcn.seed, key, 0))
        torch.randint(H, H + 1, (), generator=g)  # Augmented's first draw: the shorter side (here H, scale 1)
        top = int(torch.randint(H - crop + 1, (), generator=g))  # the first window's; a flip keeps the rows
        assert round(out[0, 0, 0].item() * 255 * dgmn2.IMAGENET_STD[0] + 255 * dgmn2.IMAGENET_MEAN[0]) == top


def smooth_image(H, W):
    rows, cols = torch.meshgrid(torch.arange(H) / H, torch.arange(W) / W, indexing="ij")
    channels = [torch.sin(3 * rows + 2 * cols), torch.cos(2 * rows - 3 * cols), torch.sin(4 * rows * cols + 1)]
    return (127.5 + 100 * torch.stack(channels)).round().to(torch.uint8)


@pytest.mark.parametrize("short", [75, 100, 180, 260])  # scales 0.75 (down) to 2.6 (up) of a 100 x 160 image
def test_crop_then_resize_equals_resize_then_crop(short):
    H, W, crop = 100, 160, 64
    image = smooth_image(H, W)
    label = (torch.arange(W) // 3 % 2).expand(H, W).to(torch.uint8)  # stripes: every window is acceptable
    Hs, Ws = v2.functional.resize(image, short).shape[-2:]  # torchvision's own rounding of the scaled size
    resized = v2.functional.resize(image, [Hs, Ws], antialias=False).float()
    resized_label = v2.functional.resize(label[None], [Hs, Ws], v2.InterpolationMode.NEAREST)[0]
    for seed in range(5):
        out, cut = cs.random_crop(image, label, short, crop, torch.Generator().manual_seed(seed))
        top, left = replayed_windows(seed, Hs, Ws, crop, crop, tries=1)[0]
        expected = resized[:, top:top + crop, left:left + crop]
        assert out.shape == expected.shape == (3, crop, crop)
        error = (out.float() - expected).abs()
        assert error.mean() < 1.0 and error.max() <= 6  # a shift of at most half a source pixel
        assert (cut == resized_label[top:top + crop, left:left + crop]).float().mean() > 0.6  # thin stripes move


def test_training_resize_is_bilinear_without_antialiasing_as_mmcv():
    """Halved, columns striped 2 on, 2 off read as pairs of equal pixels: bilinear alone keeps them 0 and 255 (mmcv's
    cv2 resize), an antialiasing filter would blur them."""
    image = ((torch.arange(160) // 2 % 2) * 255).expand(3, 100, 160).to(torch.uint8)
    label = (torch.arange(160) // 3 % 2).expand(100, 160).to(torch.uint8)
    for seed in range(5):
        out, _ = cs.random_crop(image, label, 50, 32, torch.Generator().manual_seed(seed))
        assert out.shape == (3, 32, 32) and set(out.unique().tolist()) == {0, 255}


def test_scales_and_windows_are_drawn_as_resize_then_crop():
    H, W, crop = 40, 50, 64  # every scaled image fits in the crop: its unpadded size shows the scale drawn
    label = (torch.arange(W) % 2).expand(H, W).to(torch.uint8)
    cfg = cs.Config(crop=crop, base_size=H, scale_min=0.5, scale_max=1.0)
    augmented = cs.Augmented([(coordinates(H, W), label)], cfg)
    sizes = [tuple((augmented[(key, 0)][1] != 255).sum(dim=d).max().item() for d in (0, 1)) for key in range(300)]
    shorts = [h for h, _ in sizes]
    assert set(shorts) == set(range(20, 41)) and min(map(shorts.count, set(shorts))) >= 4  # RandomResize(20, 41)
    assert all((h, w) == tuple(v2.functional.resize(label[None], h).shape[-2:]) for h, w in sizes)
    tops = [cs.random_crop(coordinates(H, W), label, H, 16, torch.Generator().manual_seed(s))[0][0, 0, 0].item()
            for s in range(600)]
    assert set(tops) == set(range(H - 16 + 1))  # every position, as RandomCrop draws it


@pytest.mark.slow
def test_real_data_without_pretrained_warns_that_the_backbone_starts_from_scratch(tmp_path, capsys):
    data = write_cityscapes(tmp_path / "cityscapes")
    real = dict(data=str(data), base_size=40, crop=32, eval_stride=24, iterations=1, eval_every=1, log_every=1)
    train_cityscapes.main(segmentation_run(tmp_path / "a", **real))
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "from scratch" in warnings[0] and "--pretrained" in warnings[0]
    assert re.search(r"^train to 1, step 1: loss [\d.]+, lr [\d.e+-]+, [\d.]+ images/s, data wait \d+ ms/step, ETA ",
                     out, re.M)  # the log line without a terminal
    weights = tmp_path / "imagenet.pth"  # a train_imagenet.py checkpoint of the backbone
    torch.save(dict(model=dgmn2.build("tiny", num_classes=0).state_dict(), config={}), weights)
    train_cityscapes.main(segmentation_run(tmp_path / "b", pretrained=str(weights), **real))
    train_cityscapes.main(segmentation_run(tmp_path / "c", iterations=1, eval_every=1, synthetic_val=1))  # no warning
    assert "WARNING" not in capsys.readouterr().err


@pytest.mark.slow
def test_persistent_workers_resume_exactly_and_draw_as_one_process(tmp_path, monkeypatch):
    settings = dict(iterations=2, eval_every=1, workers=1, synthetic_val=1, pictures=0)
    train_cityscapes.main(segmentation_run(tmp_path / "a", **settings))
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000002.pth", weights_only=True)
    assert kill_then_resume(train_cityscapes, segmentation_run(tmp_path / "b", **settings), monkeypatch) == 1
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000002.pth", weights_only=True)
    train_cityscapes.main(segmentation_run(tmp_path / "c", **{**settings, "workers": 0}))
    in_process = torch.load(tmp_path / "c" / "run" / "checkpoint-0000002.pth", weights_only=True)
    for other in (resumed, in_process):
        torch.testing.assert_close(other["model"], expected["model"], rtol=0, atol=0)
        torch.testing.assert_close(other["optimizer"], expected["optimizer"], rtol=0, atol=0)
        assert other["scheduler"] == expected["scheduler"]


def test_new_options_and_their_help():
    cfg = train_cityscapes.parse_args(["--eval-batch", "3", "--channels-last", "--compile", "--log-every", "7"])
    assert (cfg.eval_batch, cfg.channels_last, cfg.compile, cfg.log_every) == (3, True, True, 7)
    defaults = train_cityscapes.parse_args([])
    assert (defaults.channels_last, defaults.compile, defaults.log_every) == (False, False, 10)
    assert train_cityscapes.Config().log_every == 50
    fields = dataclasses.fields(train_cityscapes.Config)
    assert all(len(f.metadata["help"].split()) >= 3 for f in fields)
    for name in ("channels_last", "compile"):
        assert "off until a GPU measurement" in next(f for f in fields if f.name == name).metadata["help"]
    assert "global" in next(f for f in fields if f.name == "batch_size").metadata["help"]
    with pytest.raises(train_cityscapes.InputError, match="--eval-batch must be positive, got 0"):
        train_cityscapes.main(segmentation_run(Path("/nonexistent"), eval_batch=0))


def test_table_2_baselines_are_offered_by_model():
    for model in FCN_BASELINES:
        assert model in cs.CHOICES["model"] and cs.parse_args(["--model", model]).model == model


def test_multi_grid_dilates_res5_by_1_2_4():
    cfg = cs.Config(model="fcn", multi_grid=True)
    with torch.device("meta"):
        grid = cs.build_model(cfg, 5, 1, torch.device("meta")).backbone.layer4
        plain = cs.build_model(dataclasses.replace(cfg, multi_grid=False), 5, 1, torch.device("meta")).backbone.layer4
    assert [b.conv2.dilation for b in plain] == [(2, 2), (4, 4), (4, 4)]  # torchvision's: the first block at half
    assert [b.conv2.dilation for b in grid] == [(4, 4), (8, 8), (16, 16)]  # the stage's 4 times (1, 2, 4)
    assert [b.conv2.padding for b in grid] == [b.conv2.dilation for b in grid]
    assert grid(torch.empty(1, 1024, 9, 9, device="meta")).shape == (1, 2048, 9, 9)  # the map's size kept


def dgmn_module(**overrides):
    cfg = cs.Config(**overrides)
    cs.check(cfg)
    with torch.device("meta"):
        return cs.build_model(cfg, 5, 1, torch.device("meta")).context


def test_dgmn_rates_and_groups_reach_the_module():
    for text, rates in [("1", (1,)), ("1,1,1,1", (1, 1, 1, 1)), ("1,6,12", (1, 6, 12)), ("", (1, 6, 12, 24, 36))]:
        module = dgmn_module(model="fcn-dgmn", dgmn_rates=text)
        assert tuple(m.rate for m in module.messages) == rates
        assert all(m.groups == 4 and m.dynamic_weights for m in module.messages)
    module = dgmn_module(model="fcn-da-dw", dgmn_rates="1,6", dgmn_groups=8)
    assert [(m.rate, m.groups, m.dynamic_weights) for m in module.messages] == [(1, 8, True), (6, 8, True)]
    module = dgmn_module(model="fcn-dgmn", dgmn_groups=0)
    assert not any(m.dynamic_weights for m in module.messages)
    assert all(m.predict.per_node.out_channels == 9 * 9 for m in module.messages)  # K affinities of K nodes, no filters
    assert not any(m.dynamic_weights for m in dgmn_module(model="fcn-da", dgmn_rates="1,6").messages)
    assert isinstance(dgmn_module(model="fcn-dgmn").sigma, nn.ReLU)  # Eq. 2's sigma: the classifier follows


def test_fcn_options_are_refused_elsewhere_and_bad_values_in_one_line(tmp_path):
    cases = [(dict(model="dgmn2-tiny", dgmn_rates="1,6"), "--dgmn-rates applies to fcn-da, fcn-da-dw, fcn-dgmn, not"),
             (dict(model="fcn-aspp", dgmn_groups=8), "--dgmn-groups applies to fcn-da, fcn-da-dw, fcn-dgmn, not"),
             (dict(model="dgmn2-tiny", ohem=True), "--ohem applies to fcn, fcn-deformable, .* not to --model dgmn2"),
             (dict(model="dgmn2-small", multi_grid=True), "--multi-grid applies to fcn, .*, not to --model dgmn2"),
             (dict(model="fcn-dgmn", dgmn_rates="1,x"), "--dgmn-rates '1,x': give positive integers"),
             (dict(model="fcn-dgmn", dgmn_rates="0,6"), "--dgmn-rates '0,6': give positive integers"),
             (dict(model="fcn-dgmn", dgmn_rates="1,,6"), "--dgmn-rates '1,,6': give positive integers"),
             (dict(model="fcn-dgmn", dgmn_groups=-1), "--dgmn-groups -1: 0 .* or a divisor of 512"),
             (dict(model="fcn-dgmn", dgmn_groups=3), "--dgmn-groups 3: 0 .* or a divisor of 512"),
             (dict(model="fcn-da", dgmn_groups=8), "--dgmn-groups 8: fcn-da has no dynamic weights")]
    for overrides, message in cases:
        with pytest.raises(cs.InputError, match=message) as error:
            cs.main(cs.Config(output=str(tmp_path / "run"), **overrides))
        assert "\n" not in str(error.value)


def test_a_resume_refuses_other_fcn_options_and_another_schedule(tmp_path):
    saved = cs.Config(model="fcn-dgmn", dgmn_rates="1,6,12", ohem=True)
    path = tmp_path / "checkpoint-0000002.pth"
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={},
                    config=dataclasses.asdict(saved)), path)
    for changed, message in [(dict(dgmn_rates=""), "saved with --dgmn-rates '1,6,12', not ''"),
                             (dict(dgmn_groups=0), "saved with --dgmn-groups 4, not 0"),
                             (dict(multi_grid=True), "saved with --multi-grid False, not True"),
                             (dict(ohem=False), "saved with --ohem True, not False"),
                             (dict(lr=1e-2), "saved with --lr 0.0, not 0.01"),  # the saved optimiser's would win
                             (dict(poly_power=2.0), "saved with --poly-power 0.9, not 2.0")]:
        with pytest.raises(cs.InputError, match=message):
            cs.read_checkpoint(path, dataclasses.replace(saved, **changed), cs.WEIGHTS_DEPEND_ON,
                               cs.TRAINING_DEPENDS_ON)
    evaluation = dataclasses.replace(saved, ohem=False, eval_only=True)  # OHEM changes the training only
    assert cs.read_checkpoint(path, evaluation, cs.WEIGHTS_DEPEND_ON, cs.TRAINING_DEPENDS_ON)["config"]["ohem"]


@pytest.fixture(scope="module")
def table_printed():
    """What train_cityscapes.py --table prints (about 20 s on a CPU: computed once for the tests that read it),
    segmentation.dgmn2_cost's count of each Table 11 row, recorded as the table was made, and `python segmentation.py`
    running beside it (both count on one core)."""
    script = subprocess.Popen([sys.executable, str(Path(__file__).with_name("segmentation.py"))], text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    out, counted = printed_and_counted(segmentation, "dgmn2_cost", lambda: cs.main(cs.parse_args(["--table"])))
    yield out, counted, script
    script.kill()  # when the test that reads it was not selected
    script.communicate()


@pytest.mark.slow
def test_table_prints_table_2s_and_table_11s_rows(table_printed):
    out, counted, _ = table_printed
    assert "FlopCounterMode's count / 2" in out and "deform_conv2d" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| fcn")]
    assert [row[0][2:] for row in rows] == list(segmentation.FCN_VARIANTS)
    dgmn_rows = {row[0][2:]: row for row in rows if row[0][2:] in segmentation.DGMN_FCNS}
    assert [row[1] for row in dgmn_rows.values()] == ["+0.566M", "+0.732M", "+2.610M"]  # Table 2's layout, exact
    by_hand = {"fcn-da": 565_760, "fcn-da-dw": 731_648, "fcn-dgmn": 2_609_664}  # as test_dgmn_table_2_counts
    for name, row in dgmn_rows.items():  # every counted convolution runs on the whole 97 x 97 map
        assert row[5] == gap_columns(by_hand[name], by_hand[name] * 97 * 97, segmentation.FCN_VARIANTS[name])
    assert "not its walk convs" in dgmn_rows["fcn-dgmn"][-1]
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| dgmn2")]  # Table 11
    assert [row[0][2:] for row in rows] == list(segmentation.DGMN2_MODELS) and "769 x 769" in out
    assert all(abs(float(gap.strip("%"))) < 1 for row in rows for gap in row[5].split(" / "))  # params and FLOPs
    for row, (name, paper) in zip(rows, segmentation.DGMN2_MODELS.items()):
        params, macs = counted[name]  # dgmn2_cost's, which is checked against a count apart above
        assert row[1:6] == [f"{params / 1e6:.3f}M", f"{paper.params_m}M", f"{macs / 1e9:.2f}G", f"{paper.gflops}G",
                            gap_columns(params, macs, paper)]
    assert f"{segmentation.NUM_CLASSES} classes" in out and segmentation.NUM_CLASSES == len(cs.TRAIN_CLASSES)


@pytest.mark.slow
def test_python_segmentation_prints_what_the_table_option_prints(table_printed):
    table, _, script = table_printed
    stdout, stderr = script.communicate(timeout=600)
    assert script.returncode == 0, stderr[-2000:]
    assert stdout == table and stdout.count("\n| dgmn2-") == len(segmentation.DGMN2_MODELS)


@pytest.mark.slow
def test_the_model_files_tables_answer_help():
    """python segmentation.py / detection.py --help describe the tables they print (half a minute each) instead of
    printing them (dgmn.py's parses its arguments the same way)."""
    runs = {name: subprocess.Popen([sys.executable, name, "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, cwd=Path(__file__).parent)
            for name in ("segmentation.py", "detection.py")}  # side by side: each is mostly torch's import
    for name, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0 and out.startswith(f"usage: {name} [-h]") and "parameters and FLOPs" in out, err


def test_a_model_files_bad_argument_is_a_value_error_in_one_line():
    cases = [(dict(name="segformer"), "unknown model 'segformer': choose one of dgmn2-tiny, "),
             (dict(name="dgmn2-tiny-pup", output_stride=16), "output_stride 16: the SETR heads take DGMN2 at output "
              "stride 8"),
             (dict(name="fcn", output_stride=8), "output_stride applies to the DGMN2 models, not to fcn"),
             (dict(name="fcn-aspp", dgmn_options=dict(rates=(1,))), "dgmn_options apply to fcn-da, fcn-da-dw, "
              "fcn-dgmn, not to fcn-aspp"),
             (dict(name="dgmn2-tiny", multi_grid=True), "multi_grid and dgmn_options apply to the dilated FCNs"),
             (dict(name="fcn-dgmn", dgmn_options=dict(groups=3)), "groups = 3 must be positive and divide channels "
              "= 512"),
             (dict(name="fcn-dgmn", dgmn_options=dict(rates=(0, 6))), "rates must be positive ints"),
             (dict(name="dgmn2-small", output_stride=4), "output_stride must be 8, 16 or 32, got 4")]
    for kwargs, message in cases:
        with torch.device("meta"), pytest.raises(ValueError, match=re.escape(message)) as error:
            segmentation.build(**kwargs)
        assert "\n" not in str(error.value) and str(error.value), kwargs
    # The training script turns one into its one-line InputError
    refused = cs.Config(model="dgmn2-tiny-pup", output_stride=16)
    with pytest.raises(cs.InputError, match="^--model dgmn2-tiny-pup: output_stride 16: the SETR heads take") as error:
        cs.build_model(refused, 19, 1, torch.device("cpu"))
    assert "\n" not in str(error.value)


SETR_MODELS = [f"dgmn2-{variant}-{head}" for head in ("naive", "pup", "mla") for variant in dgmn2.VARIANTS]


def test_setr_models_are_offered_by_model():
    for model in SETR_MODELS:
        assert model in cs.CHOICES["model"] and cs.parse_args(["--model", model]).model == model
    assert set(segmentation.DGMN2_MODELS) == {f"dgmn2-{v}" for v in dgmn2.VARIANTS} | set(SETR_MODELS)


def extend_cityscapes(root, size=(40, 72)):
    """write_cityscapes plus a test split without labels and coarse train_extra labels (all "car", labelId 26)."""
    from PIL import Image
    write_cityscapes(root, size)
    g = torch.Generator().manual_seed(1)
    for split, city, count, coarse in (("test", "berlin", 3, False), ("train_extra", "bochum", 2, True)):
        (root / "leftImg8bit" / split / city).mkdir(parents=True)
        for i in range(count):
            stem = f"{city}_{i:06d}_000019"
            pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=g).numpy()
            Image.fromarray(pixels).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            if coarse:
                (root / "gtCoarse" / split / city).mkdir(parents=True, exist_ok=True)
                labels = torch.full(size, 26, dtype=torch.uint8).numpy()
                labels[:, :8] = 0  # unlabelled, as coarse polygons leave most borders
                Image.fromarray(labels).save(root / "gtCoarse" / split / city / f"{stem}_gtCoarse_labelIds.png")
    return root


def real_run(tmp_path, data, **overrides):
    settings = dict(data=str(data), base_size=40, crop=32, eval_stride=24, iterations=1, eval_every=1)
    return segmentation_run(tmp_path, **{**settings, **overrides})


def test_predict_writes_label_ids_that_map_back_to_the_models_prediction(tmp_path):
    data = extend_cityscapes(tmp_path / "cityscapes")
    saved = real_run(tmp_path, data, model="dgmn2-tiny", crop=48, eval_stride=48)  # few windows at each scale
    torch.manual_seed(0)
    model = cs.build_model(saved, len(cs.TRAIN_CLASSES), 1, torch.device("cpu")).eval()
    checkpoint = tmp_path / "checkpoint-0000001.pth"
    torch.save(dict(model=model.state_dict(), optimizer={}, scheduler={}, scaler={}, step=1, plan={},
                    config=dataclasses.asdict(saved)), checkpoint)
    lut = cs.CityscapesTrainIds(str(data), "val").lut  # labelId -> train id
    for split, multi_scale in (("val", False), ("test", True)):
        out, folder = tmp_path / f"submission-{split}", data / "leftImg8bit" / split
        cfg = dataclasses.replace(saved, eval_only=True, resume=str(checkpoint), predict=str(out), eval_split=split,
                                  multi_scale=multi_scale)
        inputs = sorted(p.relative_to(folder) for p in folder.glob("*/*_leftImg8bit.png"))
        assert cs.main(cfg) == dict(written=len(inputs))
        assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == inputs  # mirrored, one an image
        for name in inputs:
            image = cs.torchvision.io.read_image(str(folder / name))[None]
            written = cs.torchvision.io.read_image(str(out / name))[0]
            assert written.shape == image.shape[-2:]
            assert set(written.unique().tolist()) <= {c.id for c in cs.TRAIN_CLASSES}
            with torch.no_grad():
                scores = segmentation.predict(model, cs.normalise(image.float()), len(cs.TRAIN_CLASSES), cfg.crop,
                                              cfg.eval_stride, cfg.eval_batch,
                                              scales=cs.MULTI_SCALES if multi_scale else (1,), flip=multi_scale)
            ours = scores.argmax(dim=1)[0]
            assert torch.equal(lut[written.long()].long(), ours)


def test_predictions_visit_each_image_once_over_the_ranks(tmp_path):
    data = extend_cityscapes(tmp_path / "cityscapes")
    images = cs.CityscapesImages(str(data), "test")
    net = torch.nn.Conv2d(3, 19, 1).eval()
    cfg = cs.Config(crop=32, eval_stride=24, workers=0)
    off = torch.autocast("cpu", enabled=False)
    seen = [index.item() for rank in range(2)
            for _, index, _ in cs.predictions(net, images, 19, cfg, torch.device("cpu"), off, rank, 2)]
    assert sorted(seen) == list(range(len(images))) == [0, 1, 2]  # 3 images over 2 ranks: none twice, none padded


def test_coarse_mode_reads_gtcoarse_and_trainval_adds_val(tmp_path):
    data = extend_cityscapes(tmp_path / "cityscapes")
    train, val, _ = cs.datasets(real_run(tmp_path, data, mode="coarse"))
    assert len(train) == 2 and len(val) == 2
    _, label = train[0]
    assert (label[:, 8:] == 13).all() and (label[:, :8] == cs.IGNORE).all()  # car's train id; unlabelled ignored
    train, _, _ = cs.datasets(real_run(tmp_path, data, trainval=True))
    assert len(train) == 3 + 2
    metrics = cs.main(real_run(tmp_path, data, mode="coarse", model="dgmn2-tiny-mla"))
    assert metrics["iteration"] == 1 and math.isfinite(metrics["loss"])


@pytest.mark.slow
def test_finetune_starts_a_new_run_from_another_runs_weights(tmp_path):
    first = segmentation_run(tmp_path / "a", model="dgmn2-tiny-naive", iterations=1, eval_every=1)
    cs.main(first)
    saved = torch.load(tmp_path / "a" / "run" / "checkpoint-0000001.pth", weights_only=True)
    torch.manual_seed(first.seed)
    initial = cs.build_model(first, len(cs.Scenes.classes), 1, torch.device("cpu")).state_dict()
    moved = max((saved["model"][k] - t).abs().max().item() for k, t in initial.items()
                if torch.is_tensor(t) and t.is_floating_point())
    assert moved > 1e-4  # the first run's step moved the weights
    path = str(tmp_path / "a" / "run" / "checkpoint-0000001.pth")
    second = segmentation_run(tmp_path / "b", model="dgmn2-tiny-naive", finetune=path, lr=1e-30, iterations=2,
                              eval_every=2)
    cs.main(second)
    tuned = torch.load(tmp_path / "b" / "run" / "checkpoint-0000002.pth", weights_only=True)
    names = [name for name, _ in cs.build_model(second, 6, 1, torch.device("cpu")).named_parameters()]
    for name in names:  # a learning rate of 1e-30: the parameters stay the first run's
        torch.testing.assert_close(tuned["model"][name], saved["model"][name], rtol=0, atol=1e-6)
    assert tuned["scheduler"]["last_epoch"] == 2 and tuned["optimizer"]["param_groups"][0]["initial_lr"] == 1e-30
    assert all(state["step"].item() == 2 for state in tuned["optimizer"]["state"].values())  # a new optimiser
    other = dataclasses.replace(second, model="dgmn2-tiny-mla", output=str(tmp_path / "c"))
    with pytest.raises(cs.InputError, match="saved with --model 'dgmn2-tiny-naive', not 'dgmn2-tiny-mla'"):
        cs.main(other)


def test_new_options_are_refused_in_one_line_where_they_do_not_apply(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    cases = [(dict(model="dgmn2-tiny-pup", output_stride=16), "--model dgmn2-tiny-pup: output_stride 16: the SETR "
              "heads take DGMN2 at output stride 8"),  # segmentation.build()'s words, as the script reports them
             (dict(model="dgmn2-large-mla", output_stride=32), "output_stride 32: the SETR heads"),
             (dict(model="fcn", output_stride=8), "--model fcn: output_stride applies to the DGMN2 models, not to fcn"),
             (dict(output_stride=4), "unknown --output-stride 4"),
             (dict(mode="coarse"), "--mode coarse needs --data"),
             (dict(mode="coarse", trainval=True, data=str(tmp_path)), "--trainval applies to --mode fine"),
             (dict(finetune=str(weights), eval_only=True, resume=str(weights)), "--finetune starts a training run"),
             (dict(finetune=str(weights), pretrained=str(weights)), "leave out --pretrained"),
             (dict(finetune=str(tmp_path / "none.pth")), "--finetune .*none.pth: no such checkpoint"),
             (dict(predict=str(tmp_path)), "--predict needs --eval-only --resume CKPT"),
             (dict(predict=str(tmp_path), eval_only=True, resume=str(weights)), "--predict needs --data"),
             (dict(eval_split="test", eval_only=True, resume=str(weights)), "--eval-split test: its labels are "
              "withheld"),
             (dict(eval_split="train"), "unknown --eval-split 'train'"),
             (dict(mode="extra"), "unknown --mode 'extra'")]
    for overrides, message in cases:
        with pytest.raises(cs.InputError, match=message) as error:
            cs.main(segmentation_run(tmp_path, **overrides))
        assert "\n" not in str(error.value)


# The official Cityscapes label table (cityscapesScripts' labels.py): labelId -> trainId of the 19 evaluated classes
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def test_label_ids_map_to_the_official_train_ids_and_the_rest_is_ignored(tmp_path):
    """Every labelId 0-255 maps as cityscapesScripts' table says: the 19 classes to train ids 0-18 in order (road ...
    bicycle), everything else (unlabeled, ego vehicle, license plate's -1, ...) to 255."""
    assert [c.id for c in cs.TRAIN_CLASSES] == list(CITYSCAPES_TRAIN_IDS)
    assert [c.name for c in cs.TRAIN_CLASSES][:3] == ["road", "sidewalk", "building"]
    assert cs.TRAIN_CLASSES[-1].name == "bicycle" and cs.IGNORE == 255
    lut = cs.CityscapesTrainIds(str(write_cityscapes(tmp_path / "cityscapes")), "val").lut
    assert lut.tolist() == [CITYSCAPES_TRAIN_IDS.get(label_id, 255) for label_id in range(256)]


def test_miou_averages_the_classes_present_alone():
    """A class absent from both the labels and the prediction has no IoU (None) and leaves the mean: 2 of 3 classes
    seen, IoUs 1/2 and 2/3 by hand, mIoU their mean (not a third of their sum)."""
    label = torch.tensor([[0, 0, 1, 1]])
    prediction = torch.tensor([[0, 1, 1, 1]])  # confusion [[1, 1], [0, 2]]: IoU 1 / (2 + 1 - 1), 2 / (2 + 3 - 2)

    class Fixed(nn.Module):
        def forward(self, windows):
            return F.one_hot(prediction, 3).permute(2, 0, 1).float()[None]

    cfg = cs.Config(crop=4, eval_stride=4, eval_batch=1, workers=0)
    metrics = cs.evaluate(Fixed(), [(torch.zeros(3, 1, 4, dtype=torch.uint8), label)], ["a", "b", "c"], cfg,
                          torch.device("cpu"), torch.autocast("cpu", enabled=False), 0, 1)
    assert metrics["iou"] == dict(a=50.0, b=round(200 / 3, 2), c=None)
    assert metrics["miou"] == pytest.approx((50 + 200 / 3) / 2)


def test_each_family_gets_its_papers_optimiser_with_the_given_decay_and_poly_power():
    """FCNs: SGD, lr 0.01, momentum 0.9 (Section 8.1.1); DGMN2: AdamW, lr 1e-4; both take --weight-decay, and the
    schedule decays as (1 - t / T) ** --poly-power."""
    for model, kind, lr in (("fcn-dgmn", torch.optim.SGD, 0.01), ("dgmn2-tiny", torch.optim.AdamW, 1e-4)):
        cfg = cs.Config(model=model, iterations=10, weight_decay=3e-4, poly_power=2.0)
        optimizer, scheduler = cs.optimiser_and_schedule(cfg, nn.Linear(2, 2))
        group = optimizer.param_groups[0]
        assert type(optimizer) is kind and group["lr"] == lr and group["weight_decay"] == 3e-4
        assert kind is torch.optim.AdamW or group["momentum"] == 0.9
        lrs = scheduled_lrs(optimizer, scheduler, 11)
        assert lrs == pytest.approx([lr * (1 - t / 10) ** 2 for t in range(11)], rel=1e-9, abs=1e-15)


def test_training_crops_are_flipped_half_the_time():
    """mmseg's RandomFlip(prob=0.5): over 200 items, the crop's left column holds the image's rightmost source column
    (a flip) in about half (binomial sd 3.5%)."""
    H, W = 16, 16
    label = (torch.arange(W) % 2).expand(H, W).to(torch.uint8)
    cfg = cs.Config(model="fcn", crop=16, base_size=H, scale_min=1.0, scale_max=1.0)  # the whole image, scale 1
    augmented = cs.Augmented([(coordinates(H, W), label)], cfg)
    mean, std = 255 * dgmn2.IMAGENET_MEAN[1], 255 * dgmn2.IMAGENET_STD[1]
    first_columns = [round(augmented[(key, 0)][0][1, 0, 0].item() * std + mean) for key in range(200)]
    assert set(first_columns) == {0, W - 1}
    assert 0.4 < first_columns.count(W - 1) / 200 < 0.6


def test_synthetic_trainval_adds_the_validation_scenes_which_differ_from_the_training_ones(tmp_path):
    """--trainval on the built-in scenes trains on the training and the validation scenes; the validation scenes are
    not copies of training scenes."""
    cfg = segmentation_run(tmp_path, synthetic_train=4, synthetic_val=3)
    train, val, _ = cs.datasets(cfg)
    assert len(train) == 4 and len(val) == 3
    assert not any(torch.equal(train[i][0], val[j][0]) for i in range(4) for j in range(3))
    train, val, _ = cs.datasets(dataclasses.replace(cfg, trainval=True))
    assert len(train) == 4 + 3 and torch.equal(train[4][0], val[0][0])


def test_multi_scale_evaluation_takes_mmsegs_six_ratios_and_flips(monkeypatch):
    """--multi-scale is mmseg's aug_test of Cityscapes: img_ratios 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 with flips; single
    scale: 1 without a flip."""
    seen = []

    def recorder(model, image, classes, **kwargs):
        seen.append((tuple(kwargs["scales"]), kwargs["flip"]))
        return torch.zeros(1, classes, *image.shape[-2:])

    monkeypatch.setattr(segmentation, "predict", recorder)
    dataset = [(torch.zeros(3, 4, 4, dtype=torch.uint8), torch.zeros(4, 4, dtype=torch.uint8))]
    for multi_scale in (True, False):
        cfg = cs.Config(crop=4, eval_stride=4, workers=0, multi_scale=multi_scale)
        list(cs.predictions(nn.Identity(), dataset, 3, cfg, torch.device("cpu"), contextlib.nullcontext(), 0, 1))
    assert seen == [((0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True), ((1,), False)]


def test_the_passes_of_neighbouring_seeds_are_not_shifted_copies():
    """Pass p of --seed s is not pass p - 1 of --seed s + 1 (as seed + p would make it): runs of seeds 0 and 1 do not
    share their data orders."""
    orders = {}
    for seed in (0, 1):
        passes = cs.Passes(range(40), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=True)
        stream = [i for _, i in itertools.islice(passes, 120)]
        orders[seed] = [stream[p * 40:p * 40 + 40] for p in range(3)]
    assert orders[0][1] != orders[1][0] and orders[0][2] != orders[1][1]


def test_the_defaults_are_mmsegs_cityscapes_769_recipe():
    """mmseg's Cityscapes 769 x 769 configs (and the DGMN2 release's): a 769 crop, windows every 513 pixels at
    evaluation, the shorter side (Cityscapes' 1024) times 0.5 to 2.0, 8 images a step for 40k steps, poly power 0.9."""
    cfg = cs.Config()
    assert (cfg.crop, cfg.eval_stride, cfg.base_size, cfg.scale_min, cfg.scale_max) == (769, 513, 1024, 0.5, 2.0)
    assert (cfg.batch_size, cfg.iterations, cfg.poly_power) == (8, 40_000, 0.9)


def test_each_rank_loads_its_share_of_the_global_batch(tmp_path):
    """--batch-size is global: under 2 processes each rank's loader gives half of it."""
    cfg = segmentation_run(tmp_path, batch_size=4)
    train, _, _ = cs.datasets(cfg)
    assert [cs.training_loader(train, cfg, rank, 2, torch.device("cpu")).batch_size for rank in (0, 1)] == [2, 2]


# ====================================================================================================================
# train_coco.py: Sections 5.1-5.3, 6.2, 8.1.2


def detection_run(tmp_path, **overrides):
    """A config of the built-in default, shrunk to two iterations on a few 64 x 64 synthetic images."""
    settings = {**train_coco.SYNTHETIC, **dict(synthetic_train=4, synthetic_val=3, batch_size=2, iterations=2,
                                                lr_steps="1", warmup=1, eval_every=2, save_every=2, min_size=64,
                                                max_size=64, workers=0, pictures=1, output=str(tmp_path / "run"))}
    return train_coco.Config(**{**settings, **overrides})


def write_coco(root):
    """A tiny COCO directory: rectangles as polygons, category ids 1, 7 and 90 (COCO's are not contiguous), a crowd
    region, and images without usable annotations (none; only a crowd region; a 1-pixel-wide box). Image i is filled
    with the value 10 i, so a test model can tell which image it is given. Returns root."""
    from PIL import Image
    layout = {  # split -> per image: (category, x0, y0, x1, y1, iscrowd)
        "train": [[(1, 4, 4, 30, 20, 0), (7, 10, 24, 40, 44, 0)], [], [(90, 2, 2, 20, 20, 1)],
                  [(7, 5, 5, 6, 30, 0)], [(90, 20, 4, 44, 40, 0), (1, 1, 30, 12, 46, 1)]],
        "val": [[(1, 3, 5, 33, 25, 0), (90, 30, 28, 46, 46, 0)], [(7, 8, 8, 40, 40, 0), (1, 0, 0, 8, 8, 1)], [],
                [(90, 4, 30, 44, 46, 0), (7, 2, 2, 14, 12, 0), (1, 20, 4, 40, 20, 0)]],
    }
    (root / "annotations").mkdir(parents=True)
    for split, images in layout.items():
        (root / f"{split}2017").mkdir()
        entries, annotations = [], []
        for i, objects in enumerate(images):
            Image.new("RGB", (48, 48), (10 * i,) * 3).save(root / f"{split}2017" / f"{i}.png")
            entries.append(dict(id=100 + i, file_name=f"{i}.png", height=48, width=48))
            for category, x0, y0, x1, y1, crowd in objects:
                annotations.append(dict(id=len(annotations) + 1, image_id=100 + i, category_id=category, iscrowd=crowd,
                                        bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0),
                                        segmentation=[[x0, y0, x1, y0, x1, y1, x0, y1]]))
        categories = [dict(id=i, name=n) for i, n in [(1, "person"), (7, "train"), (90, "toothbrush")]]
        (root / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(dict(images=entries, annotations=annotations, categories=categories)))
    return root


class GroundTruthDetector(nn.Module):
    """Returns the ground truth of each image as detections (scores 1, masks as pycocotools rasterises them), shifted
    by `shift` pixels, or nothing at all (keep=False); it tells the images apart by their fill value."""

    def __init__(self, annotation_file, shift=0.0, keep=True):
        super().__init__()
        self.coco, self.shift, self.keep = COCO(str(annotation_file)), shift, keep

    def forward(self, images):
        outputs = []
        for image in images:
            image_id = 100 + round(image[0, 0, 0].item() * 255 / 10)
            objects = [a for a in self.coco.imgToAnns[image_id] if not a["iscrowd"] and self.keep]
            boxes = torch.tensor([a["bbox"] for a in objects], dtype=torch.float32).view(-1, 4)
            masks = [torch.from_numpy(self.coco.annToMask(a)).float() for a in objects]
            outputs.append(dict(boxes=torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) + self.shift,
                                labels=torch.tensor([a["category_id"] for a in objects], dtype=torch.int64),
                                scores=torch.ones(len(objects)),
                                masks=torch.stack(masks)[:, None] if masks else torch.zeros(0, 1, *image.shape[1:])))
        return outputs


def evaluate_detector(data, detector, rank=0, world=1, output=None):
    cfg = detection_run(data, model="maskrcnn-dgmn2-tiny", data=str(data), eval_only=True, resume="x")
    _, val, names, annotation_file = train_coco.datasets(cfg)
    loader = train_coco.evaluation_loader(val, cfg, rank, world, torch.device("cpu"))
    return train_coco.evaluate(detector, loader, names, annotation_file, cfg, torch.device("cpu"),
                               contextlib.nullcontext(), rank, world, output, "test")


@NEEDS_PYCOCOTOOLS
def test_perfect_detections_score_ap_100(tmp_path):
    data = write_coco(tmp_path / "coco")
    annotation_file = data / "annotations" / "instances_val2017.json"
    metrics = evaluate_detector(data, GroundTruthDetector(annotation_file), output=tmp_path)
    for iou_type in ("bbox", "segm"):
        assert metrics[iou_type]["AP"] == metrics[iou_type]["AP50"] == metrics[iou_type]["AP75"] == 100.0
        assert metrics[iou_type]["APl"] is None  # no object over 96 x 96 pixels
    written = COCO(str(annotation_file)).loadRes(str(tmp_path / "detections-segm.json"))  # valid COCO results
    assert len(written.anns) == 6 and {a["category_id"] for a in written.anns.values()} == {1, 7, 90}
    assert len(list((tmp_path / "pictures-test").glob("*.png"))) == 1
    shifted = evaluate_detector(data, GroundTruthDetector(annotation_file, shift=1.0))
    assert 0 < shifted["bbox"]["AP"] < 100 and shifted["bbox"]["AP50"] == 100.0
    assert shifted["segm"]["AP"] == 100.0  # the masks did not move
    nothing = evaluate_detector(data, GroundTruthDetector(annotation_file, keep=False))
    assert nothing["bbox"]["AP"] == nothing["segm"]["AP"] == 0.0 and nothing["bbox"]["APl"] is None


@NEEDS_PYCOCOTOOLS
def test_coco_results_are_xywh_boxes_and_rle_masks_over_one_half():
    """COCO's result format: bbox [x, y, width, height] of the detectors' x0, y0, x1, y1 (to 0.01 px), category_id the
    label (the labels are the categories' ids), score to 1e-4; segmentation the RLE of the mask probabilities over 0.5,
    as Mask R-CNN pastes its masks."""
    from pycocotools import mask as coco_mask
    probabilities = torch.zeros(2, 1, 6, 8)
    probabilities[0, 0, 1:4, 2:5] = 0.7
    probabilities[0, 0, 4, 2:5] = 0.4  # not confident enough: out
    probabilities[1, 0] = 0.55
    probabilities[1, 0, :, :3] = 0.5  # one half exactly: out
    output = dict(boxes=torch.tensor([[1.234, 2.5, 5.678, 7.25], [0.0, 0.0, 8.0, 6.0]]), labels=torch.tensor([90, 7]),
                  scores=torch.tensor([0.98765, 0.123456]), masks=probabilities)
    bbox, segm = train_coco.to_coco_results(output, 42)
    assert [(r["image_id"], r["category_id"]) for r in bbox + segm] == [(42, 90), (42, 7)] * 2
    assert bbox[0]["bbox"] == pytest.approx([1.234, 2.5, 4.444, 4.75], abs=0.006)  # hand-computed widths, heights
    assert bbox[1]["bbox"] == pytest.approx([0, 0, 8, 6], abs=0.006)
    assert [r["score"] for r in bbox + segm] == pytest.approx([0.98765, 0.123456] * 2, abs=1e-4)
    expected = torch.zeros(2, 6, 8, dtype=torch.bool)
    expected[0, 1:4, 2:5] = True
    expected[1, :, 3:] = True
    json.dumps(bbox + segm)  # plain JSON: the RLE counts are text
    for result, mask in zip(segm, expected):
        rle = dict(result["segmentation"], counts=result["segmentation"]["counts"].encode("ascii"))
        assert list(rle["size"]) == [6, 8] and torch.equal(torch.from_numpy(coco_mask.decode(rle)).bool(), mask)


def _evaluate_rank(rank, world, store, data, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    detector = GroundTruthDetector(data / "annotations" / "instances_val2017.json")
    metrics = evaluate_detector(data, detector, rank, world)
    if rank == 0:
        out.write_text(json.dumps(metrics))
    dist.destroy_process_group()


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_detections_of_every_rank_are_evaluated_once(tmp_path):
    data = write_coco(tmp_path / "coco")  # each rank alone holds half the images: AP 100 needs both halves
    torch.multiprocessing.spawn(_evaluate_rank, nprocs=2, args=(2, tmp_path / "store", data, tmp_path / "out.json"))
    metrics = json.loads((tmp_path / "out.json").read_text())
    assert metrics["bbox"]["AP"] == metrics["segm"]["AP"] == 100.0


@NEEDS_PYCOCOTOOLS
def test_coco_layout_drops_unusable_images_and_crowds(tmp_path):
    data = write_coco(tmp_path / "coco")
    train, val, names, _ = train_coco.datasets(detection_run(tmp_path, data=str(data), model="maskrcnn-dgmn2-tiny"))
    assert names == {1: "person", 7: "train", 90: "toothbrush"} and len(val) == 4
    assert [train.ids[i] for i in range(len(train))] == [100, 104]  # 101: none, 102: crowd, 103: 1 px wide
    image, target = train[1]
    assert image.shape == (3, 48, 48) and image.dtype == torch.float32
    assert target["labels"].tolist() == [90] and target["masks"].shape == (1, 48, 48)  # the crowd region is gone
    assert target["masks"].sum() == 24 * 36 and target["boxes"].tolist() in ([[20, 4, 44, 40]], [[4, 4, 28, 40]])
    for model in ("deformable-detr-dgmn2-tiny", "sparse-rcnn-dgmn2-small"):  # upstream's keep every image
        train, *_ = train_coco.datasets(detection_run(tmp_path, data=str(data), model=model))
        assert [train.ids[i] for i in range(len(train))] == [100, 101, 102, 103, 104]
        for i in (1, 2, 3):  # nothing usable: no boxes, no labels (and no crowd region)
            _, target = train[i]
            assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,) and "masks" not in target


def write_sized_coco(root, splits):
    """A COCO directory of blank images, category 1 ("thing"): splits = {split: [(width, height, [(x, y, w, h), ...]),
    ...]}, image ids from 100. Returns root."""
    from PIL import Image
    (root / "annotations").mkdir(parents=True)
    for split, images in splits.items():
        (root / f"{split}2017").mkdir()
        entries, annotations = [], []
        for i, (width, height, boxes) in enumerate(images):
            Image.new("RGB", (width, height)).save(root / f"{split}2017" / f"{i}.png")
            entries.append(dict(id=100 + i, file_name=f"{i}.png", height=height, width=width))
            for x, y, w, h in boxes:
                annotations.append(dict(id=len(annotations) + 1, image_id=100 + i, category_id=1, iscrowd=0,
                                        bbox=[x, y, w, h], area=w * h, segmentation=[[x, y, x + w, y, x + w, y + h,
                                                                                      x, y + h]]))
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(dict(
            images=entries, annotations=annotations, categories=[dict(id=1, name="thing")])))
    return root


@NEEDS_PYCOCOTOOLS
def test_training_boxes_are_clipped_to_the_image_and_thin_ones_dropped(tmp_path):
    """As maskrcnn-benchmark's COCODataset: an annotation 1 px wide or high (or less) is left out, and an image left
    with none with it; a box reaching past the image is clipped to the image, not dropped."""
    root = write_sized_coco(tmp_path / "coco", dict(train=[
        (48, 40, [(30, 10, 30, 20)]),  # x1 = 60, past the 48 px wide image
        (48, 40, [(5, 5, 20, 1)]),  # 1 px high: nothing usable
        (48, 40, [(5, 5, 20, 1), (2, 3, 10, 12)])]))
    train = train_coco.load_coco(root, "train", {"image_id", "boxes", "labels"}, True, ["bbox", "category_id"])
    assert [train.ids[i] for i in range(len(train))] == [100, 102]
    assert train[0][1]["boxes"].tolist() == [[30, 10, 48, 30]]  # x0, y0, x1, y1, clipped at x = 48
    assert train[1][1]["boxes"].tolist() == [[2, 3, 12, 15]] and train[1][1]["labels"].tolist() == [1]


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
@pytest.mark.parametrize("model", ["retinanet-dgmn2-tiny", "maskrcnn-dgmn2-tiny", "maskrcnn-r50-dgmn-c5",
                                   "deformable-detr-dgmn2-tiny", "deformable-detr-plus-r50", "sparse-rcnn-dgmn2-small"])
def test_each_detector_trains_two_iterations(tmp_path, model):
    metrics = train_coco.main(detection_run(tmp_path, model=model))
    types = {"bbox", "segm"} if model.startswith("maskrcnn") else {"bbox"}
    assert set(metrics) == types and all(0 <= m["AP"] <= 100 for m in metrics.values())
    run = tmp_path / "run"
    log = json.loads((run / "log.jsonl").read_text())
    assert log["iteration"] == 2 and math.isfinite(log["loss"]) and log["bbox"] == metrics["bbox"]
    assert (run / "checkpoint-0000002.pth").is_file() and (run / "pictures-0000002").is_dir()
    assert {p.name for p in run.glob("detections-*.json")} == {f"detections-{t}.json" for t in types}


@NEEDS_PYCOCOTOOLS
def test_pretrained_backbones_load_from_local_files(tmp_path):
    from torchvision.models import resnet50
    torch.save(resnet50().state_dict(), tmp_path / "resnet50.pth")
    detector = detection.build("maskrcnn-r50-dgmn-c5", 5, min_size=64, max_size=64, pretrained=True)
    state = dgmn2.load_checkpoint(str(tmp_path / "resnet50.pth"))
    detection.load_pretrained(detector, state)
    torch.testing.assert_close(detector.backbone.body.layer4[0].conv2.weight, state["layer4.0.conv2.weight"])
    assert not detector.backbone.body.layer1[0].conv1.weight.requires_grad  # Detectron's 1x: stem and res2 frozen
    assert isinstance(detector.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d)
    tiny = detection.build("maskrcnn-dgmn2-tiny", 5, min_size=64, max_size=64, pretrained=True)
    release = dict(model=release_tiny_checkpoint().state_dict(), epoch=299, args=argparse.Namespace(model="tiny"))
    torch.save(release, tmp_path / "dgmn2_tiny.pth")  # as the release's script saves it
    detection.load_pretrained(tiny, dgmn2.load_checkpoint(str(tmp_path / "dgmn2_tiny.pth")))
    assert tiny.backbone.body.stages[0].layers[0].attn.rel_pos.transposed  # the release's rule came with its weights
    with pytest.raises(ValueError, match="not a torchvision ResNet-50 state dict"):
        detection.load_pretrained(detector, {"conv1.weight": torch.zeros(1)})


@NEEDS_PYCOCOTOOLS
def test_detection_recipes_are_the_papers():
    tiny = train_coco.recipe(train_coco.Config(model="maskrcnn-dgmn2-tiny"), 7330)  # COCO at batch 16: 7330 an epoch
    assert tiny == dict(optimizer="adamw", lr=1e-4, iterations=12 * 7330, steps=[8 * 7330, 11 * 7330], warmup=500,
                        warmup_factor=0.001, eval_every=7330, clip=0.0)
    r50 = train_coco.recipe(train_coco.Config(model="maskrcnn-r50-dgmn-c5"), 7330)
    assert r50 == dict(optimizer="sgd", lr=0.02, iterations=90_000, steps=[60_000, 80_000], warmup=500,
                       warmup_factor=0.3, eval_every=7330, clip=0.0)
    shorter = train_coco.recipe(train_coco.Config(model="maskrcnn-r50", iterations=9000), 100)
    assert shorter["steps"] == [6000, 8000]  # the decays keep their place in a shorter run
    synthetic = train_coco.parse_args(["--iterations", "120"])  # no --data: the recipe's step fractions
    assert train_coco.recipe(synthetic, 250)["steps"] == [80, 110]
    scaled = {**r50, "warmup": 10, "steps": [60, 80]}  # the recipe's shape in fewer steps
    assert lr_factors(scaled, (0, 5, 10, 59, 60, 80)) == pytest.approx([0.3, 0.65, 1, 1, 0.1, 0.01])
    assert lr_factors({**r50, "warmup": 0}, (0, 1)) == [1, 1]


@NEEDS_PYCOCOTOOLS
def test_detection_loss_falls_on_a_fixed_batch(tmp_path, monkeypatch):
    """RetinaNet with DGMN2-Tiny: the training set is one batch of 2 images (only flips and the sampled anchors vary);
    10 steps at lr 1e-3 without warm-up."""
    cfg = detection_run(tmp_path, synthetic_train=2, iterations=10, eval_every=10, save_every=10, lr=1e-3, warmup=0,
                        pictures=0)
    losses = losses_of(train_coco, cfg, monkeypatch)
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.75 * losses[0], losses


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_detection_training_augments_reseeds_and_evaluates_on_schedule(tmp_path, monkeypatch):
    """The training loop passes every image of every batch through the recipe's augmentation (RetinaNet's flips,
    its resizes); each stretch between checkpoints and evaluations reseeds from (seed, its first step, rank), so the
    stretches draw different flips; and the validation set is scored at every eval_every step and the last, logged."""
    draws, real = [], detection.augmentation

    def augmentation(model, min_size):
        augment = real(model, min_size)

        def recorded(image, target):
            draws.append(torch.rand(1).item())  # the first draw of a stretch follows from its seed alone
            return augment(image, target)
        return recorded

    monkeypatch.setattr(detection, "augmentation", augmentation)
    cfg = detection_run(tmp_path, iterations=4, eval_every=2, save_every=3, pictures=0)
    train_coco.main(cfg)  # stretches: steps 1-2 (evaluated), 3 (saved), 4 (the last: evaluated)
    assert len(draws) == 4 * cfg.batch_size
    assert len({draws[0], draws[2 * cfg.batch_size], draws[3 * cfg.batch_size]}) == 3  # the stretches' first draws
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [(record["iteration"], "bbox" in record) for record in log] == [(2, True), (3, False), (4, True)]


@NEEDS_PYCOCOTOOLS
def test_deformable_detr_clips_the_gradient_norm_at_0_1(tmp_path, monkeypatch):
    """Upstream Deformable DETR's clip_max_norm 0.1, applied at every step; RetinaNet (Detectron's) clips nothing."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recorded(parameters, max_norm, *args, **kwargs):
        norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recorded)
    for model, expected in [("deformable-detr-dgmn2-tiny", [0.1, 0.1]), ("retinanet-dgmn2-tiny", [])]:
        norms.clear()
        train_coco.main(detection_run(tmp_path / model, model=model, queries=10, pictures=0))  # two steps
        assert norms == expected, model


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_detection_resume_continues_exactly(tmp_path, monkeypatch):
    # 3 batches an epoch and a checkpoint after 2: the resumed run starts in the middle of an epoch
    train_coco.main(detection_run(tmp_path / "a", iterations=4, eval_every=4, synthetic_train=6, workers=1))
    expected = torch.load(tmp_path / "a" / "run" / "checkpoint-0000004.pth", weights_only=True)
    killed = detection_run(tmp_path / "b", iterations=4, eval_every=4, synthetic_train=6, workers=1)
    assert kill_then_resume(train_coco, killed, monkeypatch) == 2  # saved at 2 of 4
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoint-0000004.pth", weights_only=True)
    torch.testing.assert_close(resumed["model"], expected["model"])
    torch.testing.assert_close(resumed["optimizer"], expected["optimizer"])
    assert resumed["scheduler"] == expected["scheduler"]
    with pytest.raises(train_coco.InputError, match=r"saved with iterations 4, now 8 \(other options or data"):
        train_coco.main(dataclasses.replace(killed, resume="auto", iterations=8))


@NEEDS_PYCOCOTOOLS
def test_data_order_survives_an_interruption():
    groups = [1] * 10  # all landscape: the grouped batches are the plain ones
    stream = train_coco.batches(groups, 3, 0, 0, 1, 0)
    straight = [next(stream) for _ in range(7)]  # into the third epoch; each epoch's tenth image is left out
    resumed = train_coco.batches(groups, 3, 0, 0, 1, 4)
    assert [next(resumed) for _ in range(3)] == straight[4:]
    assert len(set(sum(straight[:3], []))) == 9 and straight[:3] != straight[3:6]  # each epoch: 9 images, reshuffled
    mixed = [int(i % 3 == 0) for i in range(50)]  # grouped, two ranks: resumed mid-epoch on each rank
    for rank in range(2):
        stream, resumed = train_coco.batches(mixed, 4, 7, rank, 2, 0), train_coco.batches(mixed, 4, 7, rank, 2, 9)
        straight = [next(stream) for _ in range(15)]  # 6 an epoch: step 9 is in the middle of the second
        assert [next(resumed) for _ in range(6)] == straight[9:]


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_detection_bad_input_gives_one_line(tmp_path):
    data = write_coco(tmp_path / "coco")
    (data / "annotations" / "instances_train2017.json").unlink()
    broken = write_coco(tmp_path / "broken")
    (broken / "annotations" / "instances_val2017.json").write_text("{not json")
    foreign, misfit = tmp_path / "foreign.pth", tmp_path / "misfit.pth"
    torch.save(dict(config={}, model={}), foreign)
    torch.save({"conv1.weight": torch.zeros(1)}, misfit)  # readable, but no backbone's weights
    cases = [(dict(data=str(tmp_path / "nowhere")), "nowhere: no such data directory"),
             (dict(data=str(data)), "instances_train2017.json: no such annotation file"),
             (dict(data=str(broken)), "instances_val2017.json: not a COCO annotation file"),
             (dict(model="detr"), "unknown --model 'detr'"),
             (dict(lr_steps="60k"), "--lr-steps '60k': give increasing iterations separated by commas"),
             (dict(lr_steps="3,3"), "--lr-steps '3,3': give increasing iterations"),
             (dict(resume=str(foreign)), "foreign.pth: not a checkpoint of train_coco.py"),
             (dict(min_size=200), "--min-size 200 exceeds --max-size 64"),
             (dict(warmup=-2), "--warmup -2: give steps, or -1 for the recipe's"),
             (dict(pretrained=str(tmp_path / "none.pth")), "--pretrained .*none.pth: no such checkpoint file"),
             (dict(pretrained=str(misfit)), "--pretrained .*misfit.pth: another DGMN2 variant, or not a DGMN2's"),
             (dict(pretrained=str(misfit), model="maskrcnn-r50"), "misfit.pth: not a torchvision ResNet-50 state")]
    for overrides, message in cases:
        with pytest.raises(train_coco.InputError, match=message) as error:
            train_coco.main(detection_run(tmp_path, **overrides))
        assert "\n" not in str(error.value)
    script = str(Path(__file__).with_name("train_coco.py"))
    run = subprocess.run([sys.executable, script, "--data", str(data), "--output", str(tmp_path / "cli")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and run.stderr.strip().endswith("instances_train2017.json: no such annotation file")
    assert "Traceback" not in run.stderr


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
@pytest.mark.parametrize("model", ["maskrcnn-dgmn2-tiny", "deformable-detr-dgmn2-tiny"])  # DETR: its loss's box count
def test_detection_under_torchrun(tmp_path, model):
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(Path(__file__).with_name("train_coco.py")), "--model", model,
                          "--iterations", "2", "--eval-every", "2", "--synthetic-train", "4", "--synthetic-val", "3",
                          "--min-size", "64", "--max-size", "64", "--batch-size", "4", "--workers", "0",
                          "--output", str(tmp_path / "run")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    log = json.loads((tmp_path / "run" / "log.jsonl").read_text())
    assert log["iteration"] == 2 and set(log) >= {"bbox", "segm"} - ({"segm"} if "detr" in model else set())


# ---------------------------------------------------------------------------------------------------------------------
# Batches grouped by aspect ratio


@NEEDS_PYCOCOTOOLS
def test_grouped_batches_are_of_one_group_deterministic_and_equal_in_number_on_every_rank():
    groups = [int(torch.rand(1, generator=torch.Generator().manual_seed(i)) < 0.3) for i in range(103)]  # 0: portrait
    for world, local_batch in [(1, 4), (2, 4), (3, 5), (4, 2)]:
        ranks = [train_coco.epoch_batches(groups, local_batch, 0, 0, rank, world) for rank in range(world)]
        per_epoch = len(groups) // world // local_batch
        assert [len(batches) for batches in ranks] == [per_epoch] * world  # the ranks step together
        assert all(len(batch) == local_batch and len({groups[i] for i in batch}) == 1 for r in ranks for batch in r)
        shares = [set(i for batch in batches for i in batch) for batches in ranks]
        assert all(not a & b for a, b in itertools.combinations(shares, 2))  # each image on one rank at most
        for batches in ranks:  # a batch completed with images of its group counts them twice, at most one batch does
            indices = [i for batch in batches for i in batch]
            assert len(indices) - len(set(indices)) < local_batch
        assert ranks == [train_coco.epoch_batches(groups, local_batch, 0, 0, rank, world) for rank in range(world)]
        assert ranks != [train_coco.epoch_batches(groups, local_batch, 0, 1, rank, world) for rank in range(world)]
        assert ranks != [train_coco.epoch_batches(groups, local_batch, 1, 0, rank, world) for rank in range(world)]


@NEEDS_PYCOCOTOOLS
def test_grouped_batches_complete_the_leftovers_from_the_start_of_the_share():
    groups = [1, 0, 1, 1, 0, 1, 0]  # world 1, batch 3: 4 landscape, 3 portrait: two full batches, nothing to complete
    batches = train_coco.epoch_batches(groups, 3, 0, 0, 0, 1)
    order = torch.randperm(7, generator=torch.Generator().manual_seed(train_coco.seed_of(0, 0))).tolist()
    landscape, portrait = [i for i in order if groups[i]], [i for i in order if not groups[i]]
    assert sorted(batches) == sorted([landscape[:3], portrait])  # each filled in the epoch's order
    groups = [1, 1, 1, 0, 0]  # batch 4: no group fills one; the larger leftover (3 landscape) is completed
    batches = train_coco.epoch_batches(groups, 4, 0, 0, 0, 1)
    order = torch.randperm(5, generator=torch.Generator().manual_seed(train_coco.seed_of(0, 0))).tolist()
    landscape = [i for i in order if groups[i]]
    assert batches == [landscape + landscape[:1]]  # with the first landscape image of the epoch


@NEEDS_PYCOCOTOOLS
def test_training_batches_group_landscape_and_portrait_images_apart(tmp_path, monkeypatch):
    """run() gives the batch sampler each training image's aspect group from the annotation file's sizes, as
    Detectron's aspect grouping: the landscape images (wider than high) in one group, the others (square ones too, as
    detectron2's AspectRatioGroupedDataset and maskrcnn-benchmark's grouping put them) in the other."""
    box = [(4, 4, 20, 20)]
    sizes = [(64, 48), (48, 64), (60, 40), (40, 60), (41, 40), (40, 40)]  # the last square
    root = write_sized_coco(tmp_path / "coco", dict(train=[(w, h, box) for w, h in sizes], val=[(48, 48, box)]))
    handed = []

    def batches(groups, local_batch, *rest):
        handed.append((groups, local_batch))
        raise KeyboardInterrupt  # enough: stop before training

    monkeypatch.setattr(train_coco, "batches", batches)
    with pytest.raises(KeyboardInterrupt):
        train_coco.run(detection_run(tmp_path, data=str(root), batch_size=2), 0, 1, torch.device("cpu"))
    (groups, local_batch), = handed
    landscape = {groups[i] for i, (w, h) in enumerate(sizes) if w > h}
    portrait = {groups[i] for i, (w, h) in enumerate(sizes) if w <= h}
    assert len(groups) == 6 and local_batch == 2 and len(landscape) == len(portrait) == 1 and landscape != portrait


@NEEDS_PYCOCOTOOLS
def test_training_data_loaders_pin_memory_and_keep_evaluation_workers(tmp_path):
    data = write_coco(tmp_path / "coco")
    cfg = detection_run(tmp_path, data=str(data), workers=1)
    _, val, _, ground_truth = train_coco.datasets(cfg)
    loader = train_coco.evaluation_loader(val, cfg, 1, 2, torch.device("cpu"))
    assert loader.persistent_workers and not loader.pin_memory and list(loader.dataset.indices) == [1, 3]
    assert ground_truth is val.coco  # evaluation matches against the dataset's own COCO object
    assert [len(batch) for batch in loader] == [1, 1]  # 2 images for this rank of 2


@NEEDS_PYCOCOTOOLS
def test_evaluation_takes_one_image_a_forward_as_dgmn2s_detections_depend_on_the_padding(tmp_path):
    """A DGMN2 detector's detections of an image change when a wider image in its batch pads it (the relative
    positions span the padded map), so evaluation runs one image a forward, whatever the batch and processes."""
    data = write_coco(tmp_path / "coco")
    cfg = detection_run(tmp_path, data=str(data), batch_size=16)
    _, val, _, _ = train_coco.datasets(cfg)
    assert [len(batch) for batch in train_coco.evaluation_loader(val, cfg, 0, 1, torch.device("cpu"))] == [1] * len(val)
    torch.manual_seed(0)
    model = detection.build("retinanet-dgmn2-tiny", 5, min_size=64, max_size=96).eval()
    model.score_thresh = 0.0  # every anchor's best boxes, not only confident ones
    square, wide = torch.rand(3, 64, 64), torch.rand(3, 64, 96)
    with torch.no_grad():
        alone, batched = model([square])[0], model([square, wide])[0]
    assert not torch.allclose(alone["scores"], batched["scores"])


# ---------------------------------------------------------------------------------------------------------------------
# The recipes: SGD's biases, the schedule


@NEEDS_PYCOCOTOOLS
def test_sgd_biases_train_at_twice_the_lr_without_weight_decay():
    cfg = train_coco.Config(model="maskrcnn-r50-dgmn-c5", min_size=64, max_size=64)
    model = train_coco.build_model(cfg, 5, pretrained=True)  # frozen stem and res2
    plan = train_coco.recipe(cfg, 100)
    optimizer, scheduler = train_coco.optimizer_and_schedule(model, plan, cfg.weight_decay)
    weights, biases = optimizer.param_groups
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in biases["params"]} == {id(p) for n, p in trainable.items() if n.endswith(".bias")}
    assert len(weights["params"]) + len(biases["params"]) == len(trainable) and biases["params"]
    assert biases["weight_decay"] == 0 and weights["weight_decay"] == cfg.weight_decay == 1e-4
    for _ in range(600):  # the schedule scales both groups alike: biases at twice the lr throughout
        assert biases["lr"] == pytest.approx(2 * weights["lr"])
        optimizer.step()
        scheduler.step()
    assert weights["lr"] == pytest.approx(0.02) and biases["lr"] == pytest.approx(0.04)
    tiny = train_coco.Config(model="maskrcnn-dgmn2-tiny", min_size=64, max_size=64)
    adamw, _ = train_coco.optimizer_and_schedule(train_coco.build_model(tiny, 5), train_coco.recipe(tiny, 100), 1e-4)
    assert len(adamw.param_groups) == 1 and adamw.param_groups[0]["weight_decay"] == 1e-4  # the release's AdamW


@NEEDS_PYCOCOTOOLS
def test_detectrons_sgd_has_momentum_0_9():
    """Detectron's 1x (the ResNet recipes' SGD): momentum 0.9 in both parameter groups."""
    plan = train_coco.recipe(train_coco.Config(model="maskrcnn-r50"), 100)
    sgd, _ = train_coco.optimizer_and_schedule(nn.Sequential(nn.Linear(2, 2)), plan, 1e-4)  # 0.weight, 0.bias
    assert [(g["momentum"], len(g["params"])) for g in sgd.param_groups] == [(0.9, 1), (0.9, 1)]


@NEEDS_PYCOCOTOOLS
def test_deformable_detr_trains_each_slow_parameter_at_a_tenth_of_the_lr():
    """Upstream Deformable DETR: the backbone, the sampling offsets and the reference points at 0.1 x lr (2e-5), every
    other parameter at lr 2e-4, whatever the optimizer's groups: checked parameter by parameter."""
    cfg = train_coco.Config(model="deformable-detr-dgmn2-tiny", min_size=64, max_size=64, queries=30)
    model = train_coco.build_model(cfg, 5)
    optimizer, _ = train_coco.optimizer_and_schedule(model, train_coco.recipe(cfg, 100), cfg.weight_decay)
    lr = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    expected = {name: 2e-5 if name.startswith("backbone.") or "sampling_offsets" in name or "reference_points" in name
                else 2e-4 for name, _ in model.named_parameters()}
    assert {name: lr[id(p)] for name, p in model.named_parameters()} == pytest.approx(expected)
    assert set(expected.values()) == {2e-5, 2e-4}


def lr_factors(plan, iterations):
    """The scheduler's lr factor at each of the given iterations (one parameter at lr 1)."""
    optimizer, scheduler = train_coco.optimizer_and_schedule(nn.Linear(1, 1), {**plan, "optimizer": "adamw", "lr": 1.0},
                                                             0.0)
    factors = {}
    for iteration in range(max(iterations) + 1):
        factors[iteration] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    return [factors[i] for i in iterations]


@NEEDS_PYCOCOTOOLS
def test_the_schedule_resumes_exactly():
    plan = dict(train_coco.recipe(train_coco.Config(model="maskrcnn-r50"), 10), iterations=40, steps=[20, 30],
                warmup=10, optimizer="adamw", lr=1.0)
    optimizer, scheduler = train_coco.optimizer_and_schedule(nn.Linear(1, 1), plan, 0.0)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict(), optimizer.state_dict()
    again, resumed = train_coco.optimizer_and_schedule(nn.Linear(1, 1), plan, 0.0)
    resumed.load_state_dict(state[0])
    again.load_state_dict(state[1])
    for _ in range(20):
        assert again.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
        for o, s in ((optimizer, scheduler), (again, resumed)):
            o.step()
            s.step()


@NEEDS_PYCOCOTOOLS
def test_a_warmup_factor_of_one_is_allowed_and_means_no_warmup():
    """--warmup-factor, the lr's fraction at the warm-up's start, is at most 1: 1 itself (Deformable DETR's) starts at
    the full lr; more is refused."""
    cfg = train_coco.Config(warmup_factor=1.0)
    train_coco.check(cfg)
    assert lr_factors(train_coco.recipe(cfg, 100), (0, 1, 499, 500)) == pytest.approx([1, 1, 1, 1])
    with pytest.raises(train_coco.InputError, match="at most 1"):
        train_coco.check(train_coco.Config(warmup_factor=1.01))


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation per rank, merged


def random_coco(images=14, seed=0, decimals=None):
    """A ground truth of boxes of 3 categories (COCO's ids 1, 7, 90) in all sizes, some crowd regions, images without
    objects; and imperfect detections: the objects moved and rescored (scores rounded to `decimals`, if given, so that
    they tie), some missed, some false ones."""
    g = torch.Generator().manual_seed(seed)
    gt, detections, size = COCO(), [], 400
    annotations = []
    for image in range(1, images + 1):
        for _ in range(int(torch.randint(0, 6, (1,), generator=g))):
            w, h = (torch.rand(2, generator=g) * torch.tensor([150.0, 150.0]) + 4).tolist()
            x, y = (torch.rand(2, generator=g) * (size - 160)).tolist()
            category = [1, 7, 90][int(torch.randint(0, 3, (1,), generator=g))]
            crowd = int(torch.rand(1, generator=g) < 0.1)
            annotations.append(dict(id=len(annotations) + 1, image_id=image, category_id=category, bbox=[x, y, w, h],
                                    area=w * h, iscrowd=crowd, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]]))
            if torch.rand(1, generator=g) < 0.8:  # found, moved and rescaled a little
                dx, dy, sw, sh = (torch.randn(4, generator=g) * torch.tensor([3, 3, 0.1, 0.1])).tolist()
                detections.append(dict(image_id=image, category_id=category, bbox=[x + dx, y + dy, w * (1 + sw),
                                                                                   h * (1 + sh)],
                                       score=draw_score(g, decimals)))
        for _ in range(int(torch.randint(0, 3, (1,), generator=g))):  # false detections
            x, y, w, h = (torch.rand(4, generator=g) * torch.tensor([300.0, 300, 90, 90]) + 1).tolist()
            detections.append(dict(image_id=image, category_id=[1, 7, 90][int(torch.randint(0, 3, (1,), generator=g))],
                                   bbox=[x, y, w, h], score=draw_score(g, decimals)))
    gt.dataset = dict(images=[dict(id=i, height=size, width=size) for i in range(1, images + 1)],
                      annotations=annotations, categories=[dict(id=i, name=str(i)) for i in (1, 7, 90)])
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt, detections


def draw_score(g, decimals):
    score = float(torch.rand(1, generator=g))
    return score if decimals is None else round(score, decimals)


def rectangle(x, y, w, h, size=400):
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[round(y):round(y + h), round(x):round(x + w)] = True
    return mask


@NEEDS_PYCOCOTOOLS
@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 1), (2, 1)])
def test_per_rank_evaluation_merged_equals_one_evaluation_of_all_images(capsys, seed, decimals):
    """Scores rounded to 0.1 tie across images (the script rounds to 4 decimals: ties occur): COCOeval ranks tied
    detections in the order of its images, so only a merge in image-id order gives the same AP."""
    ground_truth, detections = random_coco(seed=seed, decimals=decimals)
    for iou_type in ("bbox", "segm"):
        if iou_type == "segm":  # the detections' boxes as masks, RLE-encoded as the script does
            detections = [dict(image_id=d["image_id"], category_id=d["category_id"], score=d["score"],
                               segmentation=train_coco.mask_to_rle(rectangle(*d["bbox"]))) for d in detections]
        with contextlib.redirect_stdout(io.StringIO()):
            single = COCOeval(ground_truth, ground_truth.loadRes([dict(d) for d in detections]), iou_type)
            single.evaluate()
            single.accumulate()
            single.summarize()
        expected = {m: None if v < 0 else round(100 * v, 2) for m, v in zip(train_coco.METRICS, single.stats[:6])}
        assert 5 < expected["AP"] < 95  # imperfect
        for world in (1, 2, 3):
            parts = []
            for rank in range(world):  # each rank's images, r, r + world, ...: its detections only
                mine = list(range(1 + rank, 15, world))
                parts.append(train_coco.match(ground_truth, [d for d in detections if d["image_id"] in mine], mine,
                                              iou_type))
            assert train_coco.score(ground_truth, parts[::-1], iou_type) == expected, (iou_type, world)
    assert "Average Precision" in capsys.readouterr().out  # COCO's summary, printed


@NEEDS_PYCOCOTOOLS
def test_a_rank_without_detections_still_counts_its_objects():
    """Rank 1 (the even images) finds nothing; rank 2 has no images at all (fewer images than ranks)."""
    ground_truth, detections = random_coco()
    found = [d for d in detections if d["image_id"] % 2]
    parts = [train_coco.match(ground_truth, found, list(range(1, 15, 2)), "bbox"),
             train_coco.match(ground_truth, [], list(range(2, 15, 2)), "bbox"),
             train_coco.match(ground_truth, [], [], "bbox")]
    with contextlib.redirect_stdout(io.StringIO()):
        single = COCOeval(ground_truth, ground_truth.loadRes([dict(d) for d in found]), "bbox")
        single.evaluate()
        single.accumulate()
        single.summarize()
        merged = train_coco.score(ground_truth, parts, "bbox")
    assert merged["AP"] == round(100 * single.stats[0], 2) and 0 < merged["AP"]


@NEEDS_PYCOCOTOOLS
def test_annotations_the_models_cannot_take_are_refused_in_one_line():
    def coco(categories, annotations, image):
        ground_truth = COCO()
        ground_truth.dataset = dict(images=[image], annotations=annotations, categories=categories)
        with contextlib.redirect_stdout(io.StringIO()):
            ground_truth.createIndex()
        return ground_truth

    image, box = dict(id=1, file_name="1.png", height=8, width=8), dict(id=1, image_id=1, bbox=[0, 0, 4, 4])
    person = [dict(id=1, name="person")]
    needed = ["bbox", "category_id", "iscrowd", "area"]  # what the evaluation reads
    fits = dict(box, category_id=1, iscrowd=0, area=16)
    train_coco.check_annotations(coco(person, [fits], image), [1], "a.json", needed)
    cases = [(coco([], [], image), "a.json: lists no categories"),
             (coco([dict(id=0, name="thing")], [], image), "a.json: category id 0: ids start at 1"),
             (coco(person, [dict(fits, category_id=3)], image), "annotations of category 3, which its categories do"),
             (coco(person, [], dict(id=1, file_name="1.png")), "a.json: image 1 has no width or height"),
             (coco(person, [], dict(id=1, height=8, width=8)), "a.json: image 1 has no 'file_name'"),
             # (without category_id COCO's own index fails: load_coco reports "not a COCO annotation file")
             *[(coco(person, [{k: v for k, v in fits.items() if k != key}], image),
                f"a.json: annotation 1 has no '{key}'") for key in ("bbox", "iscrowd", "area")]]
    for ground_truth, message in cases:
        with pytest.raises(train_coco.InputError, match=message):
            train_coco.check_annotations(ground_truth, [1], "a.json", needed)


@NEEDS_PYCOCOTOOLS
def test_validation_images_without_a_size_are_refused_where_masks_are_evaluated(tmp_path):
    """COCOeval draws the ground truth's masks at each image's size: a Mask R-CNN run refuses a validation image
    without one as it starts, not at its first evaluation; box detectors' evaluation reads no size."""
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_val2017.json"
    data = json.loads(path.read_text())
    del data["images"][1]["height"]
    path.write_text(json.dumps(data))
    boxes = ["bbox", "category_id", "iscrowd", "area"]
    assert len(train_coco.load_coco(root, "val", {"image_id"}, False, boxes)) == 4
    with pytest.raises(train_coco.InputError, match=f"{path}: image 101 has no width or height"):
        train_coco.load_coco(root, "val", {"image_id"}, False, boxes + ["segmentation"])


@NEEDS_PYCOCOTOOLS
def test_a_checkpoint_refuses_data_with_categories_past_its_class_head():
    state = dict(num_classes=5, config=dict(pretrained=""))  # ids 1-4
    with pytest.raises(train_coco.InputError, match="the checkpoint's detector knows category ids up to 4, the data's "
                                                    "go up to 7"):
        train_coco.make_model(detection_run(Path("unused")), state, None, {1: "a", 7: "b"}, "cpu", print)


@NEEDS_PYCOCOTOOLS
def test_a_checkpoint_takes_data_with_categories_up_to_its_class_head():
    """A class head of 5 outputs (background and ids 1-4) takes data whose largest category id is 4."""
    state = dict(num_classes=5, config=dict(pretrained=""))
    _, num_classes = train_coco.make_model(detection_run(Path("unused")), state, None, {1: "a", 4: "d"}, "cpu",
                                           lambda *args: None)
    assert num_classes == 5


@NEEDS_PYCOCOTOOLS
def test_a_checkpoint_rebuilds_the_resnet_it_was_trained_with():
    """A ResNet trained from --pretrained weights has Detectron's frozen BN: its checkpoint, resumed or evaluated
    without --pretrained, gets that backbone back (else its weights would not fit); one trained from scratch, trainable
    BN."""
    cfg = detection_run(Path("unused"), model="maskrcnn-r50")
    for pretrained in ("resnet50.pth", ""):
        state = dict(num_classes=5, config=dict(pretrained=pretrained))
        with torch.device("meta"):
            model, _ = train_coco.make_model(cfg, state, None, {1: "a"}, "meta", lambda *args: None)
        assert isinstance(model.backbone.body.bn1, torchvision.ops.FrozenBatchNorm2d) == bool(pretrained), pretrained


@NEEDS_PYCOCOTOOLS
def test_only_the_set_prediction_detectors_weights_depend_on_the_queries():
    """A RetinaNet or Mask R-CNN checkpoint is not refused for another --queries, which they do not have."""
    for name, queries in [("deformable-detr-dgmn2-tiny", True), ("sparse-rcnn-dgmn2-small", True),
                          ("retinanet-dgmn2-tiny", False), ("maskrcnn-r50", False)]:
        assert ("queries" in train_coco.weights_depend_on(detection_run(Path("unused"), model=name))) == queries


@NEEDS_PYCOCOTOOLS
def test_without_pretrained_weights_the_log_says_what_stays_frozen():
    """The DETR family's and Sparse R-CNN's ResNet keeps upstream's frozen stem, layer 1 and BN even from scratch."""
    for name, frozen in [("deformable-detr-r50", True), ("deformable-detr-dgmn2-tiny", False)]:
        said = []
        cfg = detection_run(Path("unused"), data="elsewhere", model=name)
        train_coco.make_model(cfg, None, None, {1: "a"}, "cpu", said.append)
        assert said[0].startswith("No --pretrained: the backbone starts from random weights")
        assert ("its stem, layer 1 and BN frozen" in said[0]) == frozen


# ---------------------------------------------------------------------------------------------------------------------
# Bad input (the shared block's message), the options off by default


@NEEDS_PYCOCOTOOLS
def test_channels_last_and_compile_are_off_by_default_and_say_why():
    for name in ("channels_last", "compile"):
        field = train_coco.Config.__dataclass_fields__[name]
        assert field.default is False and "off until a GPU measurement shows" in field.metadata["help"]
    cfg = train_coco.parse_args(["--channels-last", "--compile"])
    assert cfg.channels_last and cfg.compile


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_channels_last_trains(tmp_path):
    metrics = train_coco.main(detection_run(tmp_path, channels_last=True, eval_every=2))
    assert 0 <= metrics["bbox"]["AP"] <= 100


# ---------------------------------------------------------------------------------------------------------------------
# The models' options: --dgmn-rates, --dgmn-groups, --table


@NEEDS_PYCOCOTOOLS
def test_the_baselines_are_offered_by_model():
    for name in NEW_MODELS + DEEPER:
        assert train_coco.parse_args(["--model", name]).model == name
    with pytest.raises(SystemExit):  # argparse refuses a model it does not offer
        train_coco.parse_args(["--model", "maskrcnn-r50-aspp"])


@NEEDS_PYCOCOTOOLS
def test_dgmn_rates_and_groups_reach_the_modules():
    for options, rates, groups, dynamic_weights in [(dict(), (1, 4, 8, 12), 4, True),
                                                    (dict(dgmn_rates="1,4,8", dgmn_groups=2), (1, 4, 8), 2, True),
                                                    (dict(dgmn_groups=0), (1, 4, 8, 12), 1, False)]:
        cfg = train_coco.Config(model="maskrcnn-r50-dgmn-c4c5", **options)
        train_coco.check(cfg)
        with torch.device("meta"):
            detector = train_coco.build_model(cfg, 81)
        modules = [m for m in detector.modules() if isinstance(m, dgmn.DGMN)]
        assert len(modules) == 9 and all(m.update is None for m in modules)  # the release's layout
        for message in (message for m in modules for message in m.messages):
            outputs = message.predict.per_node.out_channels // message.nodes  # G K + K filters and affinities
            assert message.groups == groups and outputs == (groups * dynamic_weights + 1) * message.nodes
        assert [[message.rate for message in m.messages] for m in modules] == [list(rates)] * 9


@NEEDS_PYCOCOTOOLS
def test_dgmn_rates_and_groups_are_refused_elsewhere_and_when_bad(tmp_path):
    for overrides, message in [(dict(model="maskrcnn-r50", dgmn_rates="1,4"), "maskrcnn-r50 has none"),
                               (dict(model="maskrcnn-r50-dmp", dgmn_groups=2), "maskrcnn-r50-dmp has none"),
                               (dict(model="retinanet-dgmn2-tiny", dgmn_groups=0), "retinanet-dgmn2-tiny has none"),
                               (dict(dgmn_rates="1,,4"), "--dgmn-rates '1,,4'"), (dict(dgmn_rates="0,4"), "'0,4'"),
                               (dict(dgmn_rates="1 4"), "'1 4'"), (dict(dgmn_groups=-1), "at least 0")]:
        with pytest.raises(train_coco.InputError, match=message):
            train_coco.main(train_coco.Config(**dict(model="maskrcnn-r50-dgmn-c5", output=str(tmp_path)) | overrides))
    with pytest.raises(train_coco.InputError, match="--model maskrcnn-r50-dgmn-c5: dgmn_groups 3 must be 0 .* or "
                       "divide the 512 channels"):  # detection.build's ValueError, in the script's words
        with torch.device("meta"):
            train_coco.build_model(train_coco.Config(model="maskrcnn-r50-dgmn-c5", dgmn_groups=3), 81)


@NEEDS_PYCOCOTOOLS
def test_a_resume_with_other_dgmn_options_is_refused(tmp_path):
    saved = train_coco.Config(model="maskrcnn-r50-dgmn-c5", dgmn_rates="1,4,8", output=str(tmp_path))
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={},
                    config=dataclasses.asdict(saved)), tmp_path / "checkpoint-0000002.pth")
    for changed, message in [(dict(dgmn_rates=""), "saved with --dgmn-rates '1,4,8', not ''"),
                             (dict(dgmn_groups=2), "saved with --dgmn-groups 4, not 2")]:
        with pytest.raises(train_coco.InputError, match=message):
            train_coco.main(dataclasses.replace(saved, resume="auto", **{"dgmn_rates": "1,4,8", **changed}))


@NEEDS_PYCOCOTOOLS
def test_a_checkpoint_saved_before_an_option_existed_reads_it_as_its_default(tmp_path):
    cfg = train_coco.Config(model="maskrcnn-r50-dgmn-c5")
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("dgmn_rates", "dgmn_groups")}
    torch.save(dict(model={}, optimizer={}, scheduler={}, scaler={}, step=0, plan={}, config=config),
               tmp_path / "old.pth")
    state = train_coco.read_checkpoint(tmp_path / "old.pth", cfg, ["model", "dgmn_rates", "dgmn_groups"], [])
    assert state["config"] == config
    with pytest.raises(train_coco.InputError, match=r"saved with --dgmn-groups 4, not 2"):
        train_coco.read_checkpoint(tmp_path / "old.pth", dataclasses.replace(cfg, dgmn_groups=2), ["dgmn_groups"], [])


@pytest.mark.slow
@NEEDS_PYCOCOTOOLS
def test_the_scripts_table_is_detection_pys(capsys, monkeypatch):
    asked = []  # each model counted once for both tables (and the tests above): detection_cost
    monkeypatch.setattr(detection, "cost", lambda name: asked.append(name) or detection_cost(name))
    detection.print_table()
    table = capsys.readouterr().out
    assert train_coco.main(train_coco.parse_args(["--table"])) is None
    assert capsys.readouterr().out == table
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "| paper |" not in line]
    assert [row[0][2:] for row in rows] == list(detection.MODELS) == asked[:len(detection.MODELS)]
    for row, (name, spec) in zip(rows, detection.MODELS.items()):  # ours beside the paper's, as counted
        params, macs = detection_cost(name)
        assert row[1:3] == [f"{params / 1e6:.1f}", str(spec.params_m or "-")]
        assert row[4:6] == [f"{macs / 1e9:.1f}", str(spec.gflops or "-")]
        for ours, paper, gap in [(params / 1e6, spec.params_m, row[3]), (macs / 1e9, spec.gflops, row[6])]:
            assert gap == (f"{100 * (ours / paper - 1):+.1f}%" if paper else "-")


@NEEDS_PYCOCOTOOLS
def test_a_model_files_bad_argument_raises_a_one_line_value_error():
    with torch.device("meta"):
        r50 = detection.build("maskrcnn-r50", 81)
    for call, message in [(lambda: detection.build("detr", 81), "unknown COCO model 'detr': choose one of retinanet"),
                          (lambda: detection.build("maskrcnn-r50-dgmn-c5", 81, dgmn_groups=3),
                           "dgmn_groups 3 must be 0 .* or divide the 512 channels of a DGMN module"),
                          (lambda: detection.build("maskrcnn-r50-dgmn-c5", 81, dgmn_groups=-1), "dgmn_groups -1"),
                          (lambda: detection.load_pretrained(r50, {"fc.weight": torch.zeros(1), "x": torch.zeros(1)}),
                           "not a torchvision ResNet-50 state dict"),
                          (lambda: detection.load_pretrained(detection.build("retinanet-dgmn2-tiny", 91), {}),
                           "another DGMN2 variant, or not a DGMN2's weights")]:
        with torch.device("meta"), pytest.raises(ValueError, match=message) as error:
            call()
        assert type(error.value) is ValueError and "\n" not in str(error.value)
    with pytest.raises(train_coco.InputError, match="--model maskrcnn-r50-dgmn-c5: dgmn_groups 3 must be"):
        with torch.device("meta"):  # the script's one line
            train_coco.build_model(train_coco.Config(model="maskrcnn-r50-dgmn-c5", dgmn_groups=3), 81)


# ====================================================================================================================
# The block the three training scripts share


SCRIPTS = [train_imagenet, train_cityscapes, train_coco]


def shared_block(script):
    text = Path(script.__file__).read_text()
    return text[text.index("# The shared block"):text.index("# End of the shared block")]


@NEEDS_PYCOCOTOOLS
def test_the_shared_block_is_the_same_text_in_every_script():
    blocks = [shared_block(script) for script in SCRIPTS]
    assert len(blocks[0].splitlines()) > 100 and blocks[1:] == blocks[:1] * 2
    for script in SCRIPTS:  # what the scripts repeat is in the block, not beside it
        text = Path(script.__file__).read_text().replace(shared_block(script), "")
        for repeated in ("class InputError", "def parse_args", "def save_checkpoint", "def setup_distributed",
                         "1_000_003", "noqa", "def main"):
            assert repeated not in text, (script.__name__, repeated)


@NEEDS_PYCOCOTOOLS
def test_a_checkpoint_names_its_script_and_another_script_refuses_it(tmp_path):
    """Each script's checkpoints name it; another script refuses them in one line, pointing at the option that takes
    weights to start from, where it used to blame an option of the model's name."""
    for saver, reader in itertools.permutations(SCRIPTS, 2):
        path = tmp_path / f"{saver.__name__}.pth"
        saver.save_checkpoint(path, saver.Config(), saver.Parts(*[None] * len(saver.Parts._fields)), step=1)
        assert saver.read_checkpoint(path, saver.Config(), ["model"], [])["script"] == f"{saver.__name__}.py"
        with pytest.raises(reader.InputError, match=f"{path}: a checkpoint of {saver.__name__}.py, not of "
                           rf"{reader.__name__}.py \(weights to start from go to {reader.START_WEIGHTS}\)$"):
            reader.read_checkpoint(path, reader.Config(), ["model"], [])
    assert [script.START_WEIGHTS for script in SCRIPTS] == ["--weights", "--pretrained", "--pretrained"]
    for script in SCRIPTS:
        assert script.START_WEIGHTS.lstrip("-") in {f.name for f in dataclasses.fields(script.Config)}


MALLINFO = """
import ctypes, torch, train_imagenet
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
def mapped_and_held():  # bytes a 64 MB tensor took from mmap; bytes the process still holds once it is freed
    before = libc.mallinfo2()
    x = torch.empty(2 ** 24)
    mapped = libc.mallinfo2().hblkhd - before.hblkhd
    del x
    after = libc.mallinfo2()
    return mapped, after.arena + after.hblkhd - before.arena - before.hblkhd
print(*mapped_and_held(), end=" ")
train_imagenet.keep_freed_memory()
print(*mapped_and_held())
"""


@pytest.mark.slow
@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")),
                    reason="glibc 2.33 or later only")
def test_the_scripts_serve_large_tensors_from_the_heap_and_keep_them_once_freed():
    glibc_defaults = {name: value for name, value in os.environ.items()  # no other malloc, no tuning
                      if not name.startswith("MALLOC_") and name not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    run = subprocess.run([sys.executable, "-c", MALLINFO], capture_output=True, text=True,
                         cwd=Path(__file__).parent, env=glibc_defaults, timeout=120)
    assert run.returncode == 0, run.stderr
    mapped, held, mapped_after, held_after = map(int, run.stdout.split())
    assert mapped >= 2 ** 26 and held < 2 ** 25  # glibc's default: mapped afresh, unmapped when freed
    assert mapped_after == 0 and held_after > 2 ** 25  # from the heap, never trimmed (old free space may serve part)


def test_restore_refuses_an_older_checkpoint_or_another_plan_and_returns_the_step():
    model = nn.Linear(2, 2)
    parts = train_imagenet.Parts(model, *[None] * 9, plan=dict(steps_per_epoch=5))
    cfg, said = train_imagenet.Config(), []
    older = dict(model=model.state_dict(), optimizer={}, scheduler={}, scaler={}, ema=None, epoch=1, config={})
    with pytest.raises(train_imagenet.InputError, match=r"old.pth: saved by an older version \(no step or plan\)"):
        train_imagenet.restore("old.pth", older, cfg, parts, said.append)
    ours = dict(older, step=7, plan=dict(steps_per_epoch=4))
    with pytest.raises(train_imagenet.InputError, match=r"saved with steps_per_epoch 4, now 5 \(other options"):
        train_imagenet.restore("c.pth", ours, cfg, parts, said.append)
    assert train_imagenet.restore("c.pth", dict(ours, plan=parts.plan), cfg, parts, said.append) == 7
    assert train_imagenet.restore("o.pth", older, dataclasses.replace(cfg, eval_only=True), parts, said.append) == 0
    assert said == ["Resuming c.pth, saved at step 7.", "Evaluating o.pth, saved at step ?."]
    assert train_imagenet.restore("none", None, cfg, parts, said.append) == 0


@NEEDS_PYCOCOTOOLS
def test_a_resume_from_elsewhere_refuses_an_output_of_another_runs_checkpoints(tmp_path):
    """--resume PATH goes on saving in --output: where that holds another run's checkpoints, they would be overwritten
    (and its older ones deleted), so it is refused, as a new run there is; a checkpoint inside --output is read."""
    output, elsewhere = tmp_path / "run", tmp_path / "other" / "checkpoint-0000001.pth"
    for path in (output / "checkpoint-0000003.pth", elsewhere):
        path.parent.mkdir()
        path.write_text("not a checkpoint")
    for script in SCRIPTS:
        cfg = script.Config(output=str(output), resume=str(elsewhere))
        with pytest.raises(script.InputError, match=f"{output} holds another run's checkpoints: continue it with "
                                                    f"--resume auto, or choose another --output to resume .* in$"):
            script.resume(cfg, 0, 1, [], [], print)
        with pytest.raises(script.InputError, match="checkpoint-0000003.pth: not a readable checkpoint"):
            script.resume(dataclasses.replace(cfg, resume=str(output / "checkpoint-0000003.pth")), 0, 1, [], [], print)


@NEEDS_PYCOCOTOOLS
def test_float_options_refuse_nan_and_inf(capsys):
    """Every range check compares, and nan passes any comparison that refuses: argparse takes only finite floats."""
    for script in SCRIPTS:
        for value in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit):
                script.parse_args([f"--weight-decay={value}"])
            assert f"argument --weight-decay: '{value}' is not a finite number" in capsys.readouterr().err
        assert script.parse_args(["--weight-decay", "1e-3"]).weight_decay == 1e-3


@NEEDS_PYCOCOTOOLS
def test_help_explains_every_option(capsys):
    for script in SCRIPTS:
        for field in dataclasses.fields(script.Config):
            assert len(field.metadata["help"].split()) >= 3, (script.__name__, field.name)
        with pytest.raises(SystemExit):
            script.parse_args(["--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert " ".join(script.__doc__.splitlines()[0].split()) in out  # the usage lines
        assert "Without --data (the built-in synthetic set) these defaults change" in out
        for field in dataclasses.fields(script.Config):
            assert "--" + field.name.replace("_", "-") in out
        assert "global batch" in script.Config.__dataclass_fields__["batch_size"].metadata["help"]
        assert "--no-eval-only" not in out and "--eval-only" in out  # a plain switch
    assert train_imagenet.parse_args(["--eval-only", "--weights", "x"]).eval_only


def test_progress_syncs_logs_and_stops_every_log_every_steps(capsys, tmp_path):
    cfg = argparse.Namespace(log_every=3)
    progress = train_imagenet.Progress(cfg, 0, 1, torch.device("cpu"), 10, 17, 4, "epoch 2", tmp_path)
    for step, _ in enumerate(progress.batches(range(7))):
        progress.update(dict(box=torch.tensor(1.0 * step), mask=torch.tensor(2.0)), lr=0.1)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 2, steps 11-13", "epoch 2, steps 14-16",
                                                      "epoch 2, step 17"]
    assert lines[0].startswith("epoch 2, steps 11-13: loss 3.000 (box 1.000, mask 2.000), lr 1.00e-01, ")
    assert re.search(r"images/s, data wait \d+ ms/step, ETA 0:00:0\d$", lines[0])
    assert progress.close() == dict(loss=5.0, box=3.0, mask=2.0)
    progress = train_imagenet.Progress(cfg, 0, 1, torch.device("cpu"), 0, 6, 4, "epoch 1", tmp_path)
    progress.update(dict(loss=torch.tensor(float("nan"))), lr=0.1)
    progress.update(dict(loss=torch.tensor(1.0)), lr=0.1)  # no sync yet: the NaN is seen at the third step
    with pytest.raises(train_imagenet.TrainingError, match=r"the loss is nan at steps 1-3 \(epoch 1\); stopped, "
                                                           "the last good checkpoint is none yet"):
        progress.update(dict(loss=torch.tensor(1.0)), lr=0.1)


# ====================================================================================================================
# .ci/gpu: its refusal without a GPU, its prerequisites and its strict kernel path, on a simulated GPU


def ci_gpu(tmp_path, nvcc_release="13.0", ninja=True):
    """Run .ci/gpu where torch reports a GPU (a sitecustomize patches torch.cuda) and CUDA_HOME holds a stand-in nvcc
    of the given release that fails every compilation, or no nvcc at all (nvcc_release None); ninja=False puts a
    failing ninja first on PATH. Returns the finished process and the output folder."""
    site, cuda, tools = tmp_path / "site", tmp_path / "cuda", tmp_path / "bin"
    for folder in (site, cuda / "bin", tools):
        folder.mkdir(parents=True)
    (site / "sitecustomize.py").write_text(
        "import torch\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.get_device_name = lambda device=None: 'Simulated GPU'\n"
        "torch.cuda.get_device_capability = lambda device=None: (9, 0)\n")
    if nvcc_release:
        (cuda / "bin" / "nvcc").write_text(
            '#!/bin/sh\n'
            f'if [ "$1" = --version ]; then echo "Cuda compilation tools, release {nvcc_release}, V{nvcc_release}.1"; '
            'exit 0; fi\n'
            'echo "nvcc: simulated compiler error" >&2; exit 1\n')
        (cuda / "bin" / "nvcc").chmod(0o755)
    if not ninja:
        (tools / "ninja").write_text("#!/bin/sh\nexit 1\n")
        (tools / "ninja").chmod(0o755)
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(site), "CUDA_HOME": str(cuda),
           "PATH": f"{tools}:{os.environ['PATH']}", "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),
           "OUT": str(tmp_path / "out"), "COMMIT": "abc1234"}
    env.pop("DGMN_SAMPLER", None)
    run = subprocess.run(["bash", str(Path(__file__).with_name(".ci") / "gpu")], capture_output=True, text=True,
                         env=env, timeout=300)
    return run, tmp_path / "out"


@pytest.mark.slow
def test_ci_gpu_refuses_in_one_line_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run = subprocess.run(["bash", str(Path(__file__).with_name(".ci") / "gpu")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr == (".ci/gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False): run it where "
                          "there is one\n")


@pytest.mark.slow
def test_ci_gpu_names_each_missing_prerequisite(tmp_path):
    major = torch.version.cuda.split(".")[0] if torch.version.cuda else None
    if major is None:
        pytest.skip("needs a CUDA build of torch")
    run, out = ci_gpu(tmp_path / "a", nvcc_release=None, ninja=False)
    assert run.returncode == 1 and not out.exists()
    assert run.stderr.splitlines() == [
        ".ci/gpu: missing prerequisite: ninja (torch.utils.cpp_extension builds with it): pip install ninja, or put "
        "ninja on PATH",
        f".ci/gpu: missing prerequisite: nvcc (looked for {tmp_path / 'a' / 'cuda' / 'bin' / 'nvcc'}): install a "
        f"CUDA {major}.x toolkit, or set CUDA_HOME to one"]
    run, out = ci_gpu(tmp_path / "b", nvcc_release=f"{int(major) - 1}.4")
    nvcc = tmp_path / "b" / "cuda" / "bin" / "nvcc"
    assert run.returncode == 1 and not out.exists()
    assert run.stderr.splitlines() == [
        f".ci/gpu: missing prerequisite: nvcc of torch's CUDA major version: {nvcc} is CUDA {int(major) - 1}.4, torch "
        f"{torch.__version__} is built with CUDA {torch.version.cuda}; install a CUDA {major}.x toolkit, or set "
        "CUDA_HOME to one"]


@pytest.mark.slow
def test_ci_gpu_fails_a_failed_build_and_runs_nothing_after_it(tmp_path):
    """A kernel that does not build is a failed step with the compiler's error in gpu.log; no step runs the reference
    in its place, and the summary names the GPU, the versions and the commit."""
    if torch.version.cuda is None:
        pytest.skip("needs a CUDA build of torch")
    run, out = ci_gpu(tmp_path, nvcc_release=torch.version.cuda)
    assert run.returncode == 1
    log, summary = (out / "gpu.log").read_text(), (out / "summary.md").read_text()
    assert "nvcc: simulated compiler error" in log and "-gencode=arch=compute_90,code=sm_90" in log
    assert summary.startswith("# .ci/gpu on Simulated GPU\n\n"
                              f"torch {torch.__version__} built with CUDA {torch.version.cuda}, nvcc release "
                              f"{torch.version.cuda}, V{torch.version.cuda}.1, driver ")
    assert ", commit abc1234, " in summary and "DGMN_SAMPLER=kernel" in summary
    rows = re.findall(r"^\| (.+) \| (.+) \| (\d+) \|$", summary, re.M)
    assert rows[0][:2] == ("CUDA build", "FAILED (exit 1)")
    assert [row[0] for row in rows[1:]] == ["CUDA tests", "sampler benchmark", "profile DGMN2-Small",
                                            "bench DGMN2-tiny vs swin_t", "bench DGMN2-small vs swin_t",
                                            "bench DGMN2-tiny vs swin_t, channels-last", "torch.compile DGMN2-Tiny",
                                            "Deformable DETR, Sparse R-CNN + DGMN2-Small"]
    assert all(row[1] == "NOT RUN: the CUDA build failed (its error is in gpu.log)" for row in rows[1:])
    assert "none: no step that measures ran to its end" in summary
    assert "torch reference path" not in log and run.stdout.endswith(summary)


# ====================================================================================================================
# .ci/sanitize: the host kernels under AddressSanitizer and UndefinedBehaviorSanitizer


@pytest.mark.slow
def test_host_kernels_read_and_write_only_inside_their_tensors(tmp_path):
    """The kernels' tests against the sanitized host build: no read or write outside a tensor and no undefined
    arithmetic, which comparisons of values cannot see (a flush that adds zero sums one row before a table, or at
    column W, changes no value)."""
    asan = shutil.which("gcc") and subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True,
                                                  text=True).stdout.strip()
    if not asan or not Path(asan).is_file():
        pytest.skip("no gcc with an AddressSanitizer runtime")
    tests = ("(fused_attention or kernel_matches_reference or gradcheck or host_backward or dot_matches"
             " or aggregate_with) and not torch")  # the kernel's cases, not the reference's
    run = subprocess.run(["bash", str(Path(__file__).with_name(".ci") / "sanitize"), "-q", "-k", tests],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-4000:]
    assert list(tmp_path.iterdir()) == []  # no report
    assert int(re.search(r"(\d+) passed", run.stdout)[1]) >= 80  # the kernels' tests, not a selection gone empty
