"""The test suite: python -m pytest test_all.py

One section per file. Tests check each computation against an independent one (F.unfold, F.grid_sample,
torchvision.ops.deform_conv2d, explicit indexing, finite differences) and the sampler's two paths against each
other. On CPU the sampler's kernel path is sampler_cuda.cu compiled by the host compiler; GPU tests skip
without a GPU.
"""

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

import sampler

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

# ====================================================================================================================
# sampler.py: Eq. 4-5


@pytest.fixture(params=["torch", "kernel"])
def path(request):
    """Each test taking `path` runs on the reference and on the kernel (on CPU, its host build)."""
    with sampler.backend(request.param):
        yield request.param


def walks(B, K, H, W, spread=3, dtype=torch.float64, seed=0, device="cpu"):
    """Random walks whose fractional parts lie in [0.1, 0.9]: nodes never sit on the integer kinks of bilinear
    interpolation, where finite differences would straddle two slopes."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randint(-spread, spread + 1, (B, 2 * K, H, W), generator=g)
    return (whole + 0.1 + 0.8 * torch.rand(B, 2 * K, H, W, generator=g)).to(dtype=dtype, device=device)


def grid_sample_nodes(x, offsets, dilation):
    """The nodes through F.grid_sample, one node at a time: pixel p sits at (2p + 1) / size - 1."""
    _, _, H, W = x.shape
    ks = math.isqrt(offsets.shape[1] // 2)
    ys = torch.arange(H, dtype=x.dtype).view(H, 1)
    xs = torch.arange(W, dtype=x.dtype).view(1, W)
    nodes = []
    for k in range(ks * ks):
        i, j = divmod(k, ks)
        py = ys + (i - ks // 2) * dilation + offsets[:, 2 * k]
        px = xs + (j - ks // 2) * dilation + offsets[:, 2 * k + 1]
        grid = torch.stack([(2 * px + 1) / W - 1, (2 * py + 1) / H - 1], dim=-1)  # (B, H, W, 2), x first
        nodes.append(F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    return torch.stack(nodes, dim=2)  # (B, C, K, H, W)


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


@pytest.mark.parametrize("dilation", [1, 2])
def test_sample_matches_grid_sample(path, dilation):
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    offsets = walks(2, 9, 5, 6, spread=4)
    torch.testing.assert_close(sampler.sample(x, offsets, dilation), grid_sample_nodes(x, offsets, dilation))


def test_aggregate_with_a_fixed_kernel_matches_deform_conv2d(path):
    B, C, H, W, G, dilation = 2, 6, 5, 7, 3, 2
    x, offsets = torch.randn(B, C, H, W, dtype=torch.float64), walks(B, 9, H, W)
    kernel = torch.randn(G, 9, dtype=torch.float64)  # one 3x3 filter per group, the same at every pixel
    weights = kernel.view(1, G, 9, 1, 1).expand(B, G, 9, H, W)
    depthwise = kernel.repeat_interleave(C // G, dim=0).view(C, 1, 3, 3)
    expected = deform_conv2d(x, offsets, depthwise, padding=dilation, dilation=dilation)
    torch.testing.assert_close(sampler.aggregate(x, offsets, weights, dilation), expected)


def test_aggregate_with_per_pixel_weights_matches_modulated_deform_conv2d(path):
    # DCNv2's mask with G offset groups is a per-pixel weight per group; the G groups share our offsets.
    B, C, H, W, G, dilation = 2, 6, 5, 7, 3, 2
    x, offsets = torch.randn(B, C, H, W, dtype=torch.float64), walks(B, 9, H, W)
    weights = torch.randn(B, G, 9, H, W, dtype=torch.float64)
    ones = torch.ones(C, 1, 3, 3, dtype=torch.float64)
    expected = deform_conv2d(x, offsets.repeat(1, G, 1, 1), ones, padding=dilation, dilation=dilation,
                             mask=weights.flatten(1, 2))
    torch.testing.assert_close(sampler.aggregate(x, offsets, weights, dilation), expected)


def test_dot_matches_grid_sample_inner_products(path):
    B, C, H, W, G = 2, 6, 5, 7, 3
    q, x, offsets = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64), \
        walks(B, 9, H, W)
    nodes = grid_sample_nodes(x, offsets, 1).view(B, G, C // G, 9, H, W)
    expected = (q.view(B, G, C // G, 1, H, W) * nodes).sum(2)
    torch.testing.assert_close(sampler.dot(q, x, offsets, G), expected)


@pytest.mark.parametrize("op", ["sample", "aggregate", "dot"])
def test_gradcheck(path, op):
    B, C, H, W, G, dilation = 2, 4, 4, 5, 2, 1
    x, q = torch.randn(B, C, H, W, dtype=torch.float64), torch.randn(B, C, H, W, dtype=torch.float64)
    offsets, weights = walks(B, 9, H, W), torch.randn(B, G, 9, H, W, dtype=torch.float64)
    rows, cols = sampler._node_positions(offsets, dilation)
    on_border = ((rows > -1) & (rows < 0)) | ((rows > H - 1) & (rows < H)) | \
                ((cols > -1) & (cols < 0)) | ((cols > W - 1) & (cols < W))
    beyond = (rows <= -1) | (rows >= H) | (cols <= -1) | (cols >= W)
    assert on_border.any() and beyond.any() and (~beyond).any()
    call, inputs = {
        "sample": (lambda x, o: sampler.sample(x, o, dilation), (x, offsets)),
        "aggregate": (lambda x, o, w: sampler.aggregate(x, o, w, dilation), (x, offsets, weights)),
        "dot": (lambda q, x, o: sampler.dot(q, x, o, G, dilation), (q, x, offsets)),
    }[op]
    assert torch.autograd.gradcheck(call, tuple(t.requires_grad_() for t in inputs))


def outputs_and_grads(fn, inputs, seed=0):
    """fn(*inputs) and the gradients of a random projection of it with respect to every input."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).bfloat16()  # exact in every dtype here
    return [out, *torch.autograd.grad(out, inputs, g.to(out.device, out.dtype))]


def odd_inputs(C, G, dtype, device):
    """Odd sizes and every input non-contiguous: x channels-last, q transposed, offsets and weights permuted."""
    B, H, W, ks = 3, 7, 9, 3
    K = ks * ks
    x = torch.randn(B, C, H, W, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    q = torch.randn(B, C, W, H, dtype=dtype, device=device).transpose(2, 3)
    offsets = walks(B, K, H, W, dtype=dtype, device=device, seed=1).permute(0, 2, 3, 1).contiguous() \
        .permute(0, 3, 1, 2)
    weights = torch.randn(B, H, W, G, K, dtype=dtype, device=device).permute(0, 3, 4, 1, 2)
    assert not any(t.is_contiguous() for t in (x, q, offsets, weights))
    return x, q, offsets, weights


def both_paths(fn, inputs):
    results = []
    for name in ("torch", "kernel"):
        with sampler.backend(name):
            results.append(outputs_and_grads(fn, inputs))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C, G", [(12, 1), (12, 4), (5, 5)])  # 8 + 4 channels a thread; 3; 1
def test_kernel_matches_reference(device, dtype, C, G):
    x, q, offsets, weights = odd_inputs(C, G, dtype, device)
    calls = [(lambda x, o: sampler.sample(x, o, 2), (x, offsets)),
             (lambda x, o, w: sampler.aggregate(x, o, w, 2), (x, offsets, weights)),
             (lambda q, x, o: sampler.dot(q, x, o, G, 2), (q, x, offsets))]
    for fn, inputs in calls:
        reference, kernel = both_paths(fn, inputs)
        for a, b in zip(kernel, reference):
            torch.testing.assert_close(a, b)


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


def test_bad_inputs_raise_one_clear_error():
    x, q = torch.randn(2, 4, 5, 6), torch.randn(2, 4, 5, 6)
    offsets, weights = torch.zeros(2, 18, 5, 6), torch.rand(2, 2, 9, 5, 6)
    cases = [
        (lambda: sampler.sample(x[0], offsets), r"x must be a floating-point \(B, C, H, W\)"),
        (lambda: sampler.sample(x.long(), offsets), "x must be a floating-point"),
        (lambda: sampler.sample(x, offsets[:, :17]), r"offsets must have shape \(B, 2K, H, W\) = \(2, 2K, 5, 6\)"),
        (lambda: sampler.sample(x, offsets[:, :8]), r"got \(2, 8, 5, 6\)"),  # K = 4: no odd square grid
        (lambda: sampler.sample(x, offsets[..., :5]), "offsets must have shape"),
        (lambda: sampler.sample(x, offsets, dilation=0), "dilation must be a positive int"),
        (lambda: sampler.sample(x, offsets.to("meta")), "offsets is on meta but x is on cpu"),
        (lambda: sampler.aggregate(x, offsets, weights[:, :, :8]), r"weights must have shape \(B, G, K, H, W\)"),
        (lambda: sampler.aggregate(x, offsets, torch.rand(2, 3, 9, 5, 6)), "G dividing C = 4"),
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


def test_walk_predictor_starts_uniform_and_learns(path):
    walk = sampler.WalkPredictor(6, dilation=2).double()
    x = torch.randn(2, 6, 7, 8, dtype=torch.float64)
    offsets = walk(x)
    assert offsets.shape == (2, 18, 7, 8) and offsets.abs().max() == 0
    torch.testing.assert_close(sampler.sample(x, offsets, 2), F.unfold(x, 3, dilation=2, padding=2).view(2, 6, 9, 7, 8))
    sampler.aggregate(x, offsets, torch.rand(2, 3, 9, 7, 8, dtype=torch.float64), 2).square().sum().backward()
    assert walk.weight.grad.abs().max() > 0 and walk.bias.grad.abs().max() > 0


def test_custom_ops_pass_opcheck():
    B, C, H, W, G = 2, 4, 5, 6, 2
    x, q = torch.randn(B, C, H, W, requires_grad=True), torch.randn(B, C, H, W, requires_grad=True)
    offsets = walks(B, 9, H, W, dtype=torch.float32).requires_grad_()
    weights = torch.rand(B, G, 9, H, W, requires_grad=True)
    for op, args in [(sampler._aggregate_kernel, (x, offsets, weights, 1)),
                     (sampler._dot_kernel, (q, x, offsets, G, 2)),
                     (sampler._backward_kernel, (x.detach(), offsets.detach(), weights.detach(), q.detach(), 1,
                                                 True, True))]:
        results = torch.library.opcheck(op, args)
        assert set(results.values()) == {"SUCCESS"}, results


def test_torch_compile_traces_the_sampler(path):
    B, C, H, W = 2, 8, 5, 6

    def attention(q, k, v, offsets):
        return sampler.aggregate(v, offsets, sampler.dot(q, k, offsets).softmax(dim=2))

    inputs = [torch.randn(B, C, H, W) for _ in range(3)] + [walks(B, 9, H, W, dtype=torch.float32)]
    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    for a, b in zip(outputs_and_grads(compiled, inputs), outputs_and_grads(attention, inputs)):
        torch.testing.assert_close(a, b)


def test_a_failed_cuda_build_warns_and_falls_back(monkeypatch):
    def no_compiler(device_type):
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(sampler, "_extension", no_compiler)
    sampler._cuda_kernel_builds.cache_clear()
    try:
        with pytest.warns(UserWarning, match="using the torch reference path"):
            assert sampler._cuda_kernel_builds() is False
    finally:
        sampler._cuda_kernel_builds.cache_clear()


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


def test_nvcc_compiles_the_kernel(tmp_path, monkeypatch):
    """The GPU build compiles (and loads, without launching anything), so CI catches errors in device code."""
    cuda_home, why = _cuda_home()
    if cuda_home is None:
        pytest.skip(why)
    from torch.utils import cpp_extension
    monkeypatch.setenv("CUDA_HOME", cuda_home)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"))
    module = cpp_extension.load(name="dgmn_sampler_nvcc_check", sources=[str(sampler._SOURCE)],
                                build_directory=str(tmp_path), extra_cuda_cflags=["-O3"])
    assert {"aggregate", "dot", "backward"} <= set(dir(module))


@CUDA
def test_cuda_tensors_use_the_kernel_by_default():
    x = torch.randn(2, 4, 5, 6, device="cuda")
    assert sampler._use_kernel(x) and not sampler._use_kernel(x.cpu())
