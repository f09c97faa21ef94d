"""DGMN2: dynamic graph message passing as a Transformer layer (Section 4.1, Eq. 8-9, Fig. 4) and the pyramidal
DGMN2-Tiny/Small/Medium/Large backbones (Section 4.2, Table 1), with the ImageNet numbers of Table 6.

Each query samples K = 9 nodes: a 3 x 3 grid around it moved by walks predicted from the query's own features
(Eq. 4). Keys and values are read at those nodes with the bilinear sampler (Eq. 8), and the message is attention over
them (Eq. 9):  softmax_k(q . k_k / sqrt(D) + rel_k) . v_k,  with rel the relative-position term of Fig. 4b.
sampler.attention computes it as one op (its kernel path: logits and softmax in registers, the sampled keys and values
never materialised); the release's transposed relative-position rule takes sampler.dot and sampler.aggregate.

Symbols, used throughout: B batch, C channels (the stage's width; C_in a stage's input's, C_s stage s's), H x W the
stage's map, N = H * W tokens, G heads, D = C / G head dim, K sampled nodes per query.

    python dgmn2.py                      Table 6: parameters and multiply-adds beside the paper's
    python dgmn2.py --show-walks IMG     the nodes sampled for one pixel, drawn on the image (Fig. 5 and 11)
    python dgmn2.py --profile --model small      the top kernels of a training step and the launches per layer

The authors' ImageNet checkpoints (fudan-zvg/DGMN2) load with `load_official`.
"""

import argparse
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import einsum, rearrange

try:  # inside a package: the model files copied into a project
    from . import sampler
except ImportError:  # at the top level of this repository
    import sampler

KERNEL_SIZE = 3                      # the 3 x 3 grid of sampled nodes around each query (K = 9), one rate
LAYER_NORM_EPS = 1e-6                # the release's LayerNorm
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# ----------------------------------------------------------------------------------------------------------------
# Relative position (Fig. 4b)


class RelativePosition(nn.Module):
    """Fig. 4b: a logit per query and sampled slot from a width and a height table of head-dim vectors.

    For the query q at row a, column b of an H x W map and slot s in 0..K-1 (the s-th node of the 3 x 3 grid; the
    term depends on the slot, not on where its walk took it), with Rw, Rh the tables resized to W + K - 1 and H + K - 1
    rows:
        symmetric rule (default)        rel(a, b, s) = q[a, b] . Rw[s + W-1 - b]  +  q[a, b] . Rh[s + H-1 - a]
        release rule (transposed=True)  rel(a, b, s) = q[a, b] . Rw[s + W-1 - b]  +  q[b, a] . Rh[s + H-1 - b]
    The release computes the height term on the transposed map and never transposes it back: its height logits are
    the symmetric ones transposed, which for an H x W map lie on a W x H grid that its detection code resizes
    (bilinearly) to H x W. Its weights were trained with that rule; `load_official` turns it on. The rule is stored
    in the state dict as a bool tensor (`release_rule`), so a model fine-tuned from those weights keeps it, and every
    state-dict value is a tensor (safetensors, dtype loops).

    Both tables are indexed by the slot s, as in the release (the paper, Section 4.1, speaks of relative height and
    width positions between the sampled nodes without giving the index). The tables are built for one map size (the
    stage's map at the model's img_size, 224 x 224 for ImageNet) and resized bilinearly along their rows for any
    other, as the paper does for detection and segmentation (Section 4.1).
    q (..., D, H, W), unscaled -> (..., K, H, W)."""

    def __init__(self, size, head_dim, nodes):
        super().__init__()
        height, width = size
        self.nodes = nodes
        self.height = nn.Parameter(torch.randn(height + nodes - 1, head_dim) * head_dim ** -0.5)
        self.width = nn.Parameter(torch.randn(width + nodes - 1, head_dim) * head_dim ** -0.5)
        self.register_buffer("release_rule", torch.tensor(False))
        self._transposed = False  # the buffer's value as a Python bool: forward branches on it (torch.compile too)

    @property
    def transposed(self):
        return self._transposed

    @transposed.setter
    def transposed(self, value):
        self._transposed = bool(value)
        self.release_rule.fill_(self._transposed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.pop(prefix + "_extra_state", None)  # our checkpoints from before the rule was a tensor
        if saved is not None:
            state_dict[prefix + "release_rule"] = torch.tensor(saved["transposed"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "release_rule" in state_dict:
            self._transposed = bool(state_dict[prefix + "release_rule"])

    def _resized(self, table, length):
        """(rows0, D) -> (length + K - 1, D): the table for a map of this side, linear along the rows."""
        rows = length + self.nodes - 1
        if table.shape[0] == rows:
            return table
        return F.interpolate(table[None, None], size=(rows, table.shape[1]), mode="bilinear",
                             align_corners=False)[0, 0]  # (1, 1, rows0, D) -> (1, 1, rows, D)

    def tables(self, H, W):
        """The width and height tables at an H x W map's size: (W + K - 1, D), (H + K - 1, D)."""
        return self._resized(self.width, W), self._resized(self.height, H)

    def _by_slot(self, table, length):
        """(length + K - 1, D) rows along one axis -> (length, K, D): entry [p, s] is row s + length - 1 - p."""
        return table[sampler._slot_rows(length, self.nodes, table.device)]

    def forward(self, q):
        H, W = q.shape[-2:]
        width, height = self.tables(H, W)
        width = einsum(q, self._by_slot(width, W), "... d h w, w k d -> ... k h w")
        height = einsum(q, self._by_slot(height, H), "... d h w, h k d -> ... k h w")
        if self.transposed:
            height = height.transpose(-1, -2)  # (..., K, W, H), read as if it were H x W
            if H != W:  # (..., K, W, H) -> (L, K, W, H), L = prod(...), resized -> (..., K, H, W)
                lead = height.shape[:-3]
                height = F.interpolate(height.reshape(-1, *height.shape[-3:]), size=(H, W), mode="bilinear",
                                       align_corners=False).view(*lead, -1, H, W)
        return width + height


# ----------------------------------------------------------------------------------------------------------------
# DGMN2 attention (Eq. 8-9, Fig. 4a)


class DGMN2Attention(nn.Module):
    """Eq. 8-9: every query attends over K walked nodes of its own head's keys and values.

    q, k, v come from one linear map (Eq. 8's W^{k,A} and Eq. 9's W^h); each head predicts its walks (Eq. 4) from its
    slice of the input, and its keys and values are sampled at the same walked nodes.
    x (B, N, C) tokens of an H x W map -> (B, N, C)."""

    def __init__(self, dim, heads, size):
        super().__init__()
        if dim % heads:
            raise ValueError(f"{heads} heads do not divide the width {dim}")
        self.heads, head_dim = heads, dim // heads
        self.scale = head_dim ** -0.5
        nodes = KERNEL_SIZE ** 2
        self.qkv = nn.Linear(dim, 3 * dim)
        # Paper: walks by a 3x3 conv on the sampled nodes (3.5); release: a per-head Linear on x, not zero-init.
        self.walk = nn.Linear(head_dim, 2 * nodes)
        self.rel_pos = RelativePosition(size, head_dim, nodes)
        self.proj = nn.Linear(dim, dim)  # the release's output projection, a Transformer's (Eq. 9 stops at the message)

    def walks_and_weights(self, x, H, W):
        """Every query's walks and attention over its K nodes, and the values they weigh: x (B, N, C) ->
        v (B, C, H, W), offsets (B, 2K G, H, W), attn (B, G, K, H, W)."""
        G = self.heads
        # The sampler reads q, k, v and the walks where the Linears wrote them: channels-last views, a walk per head.
        q, k, v = rearrange(self.qkv(x), "b (h w) (three c) -> three b c h w", three=3, h=H, w=W)  # each (B, C, H, W)
        walks = self.walk(rearrange(x, "b n (g d) -> b n g d", g=G))  # (B, N, G, 2K)
        offsets = rearrange(walks, "b (h w) g o -> b (g o) h w", h=H, w=W)  # (B, 2K G, H, W)
        # Eq. 9 has no 1 / sqrt(D); the release scales q . k by it, and adds the relative-position term unscaled.
        # These composed ops keep qkv's dtype: under autocast the logits are rounded to it before the softmax, and in
        # fp16 an unscaled q . k over 65504 is inf (the fused op of the symmetric rule keeps them in float32).
        logits = sampler.dot(q, k, offsets, groups=G, offset_groups=G) * self.scale \
            + self.rel_pos(rearrange(q, "b (g d) h w -> b g d h w", g=G))  # q per head (B, G, D, H, W); (B, G, K, H, W)
        return v, offsets, logits.softmax(dim=2)

    def forward(self, x, H, W):
        if self.rel_pos.transposed:  # the release's rule stays composed: its height term is read transposed
            v, offsets, attn = self.walks_and_weights(x, H, W)
            out = sampler.aggregate(v, offsets, attn, offset_groups=self.heads)  # (B, C, H, W), channels-last
            return self.proj(rearrange(out, "b c h w -> b (h w) c"))
        # The symmetric rule: one fused op on the kernel path, reading qkv and the walks where the Linears wrote them.
        walks = self.walk(rearrange(x, "b n (g d) -> b n g d", g=self.heads))  # (B, N, G, 2K)
        out = sampler.attention(self.qkv(x), walks, *self.rel_pos.tables(H, W), (H, W), self.heads, self.scale)
        return self.proj(out)  # (B, N, C)


# ----------------------------------------------------------------------------------------------------------------
# DGMN2 layer: the attention and a feed-forward block, pre-norm, with stochastic depth


class DropPath(nn.Module):
    """Stochastic depth: in training, drop a residual branch for a whole sample with probability p and scale the
    kept ones by 1 / (1 - p). (B, ...) -> (B, ...)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *[1] * (x.dim() - 1)).bernoulli_(1 - self.p)  # (B, 1, ..., 1)
        return x * keep.div_(1 - self.p)  # scaled while it is B numbers: one pass over x, not two


class MLP(nn.Module):
    """The feed-forward block of Fig. 4a: fc1, GELU, fc2. (B, N, C) -> (B, N, C), through a (B, N, r C) hidden map, r
    the MLP ratio (8 in stages 1-2, 4 in stages 3-4)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        hidden = self.fc1(x)  # (B, N, r C): a layer's largest map
        # When no backward needs fc1's output, GELU overwrites it: one map of this size fewer, whose fresh pages cost
        # more than GELU itself where the allocator maps them anew (glibc's default for blocks over 32 MB).
        return self.fc2(F.gelu(hidden) if hidden.requires_grad else torch.ops.aten.gelu_(hidden))


class DGMN2Layer(nn.Module):
    """Fig. 4a: x + DropPath(attention(LN(x))), then x + DropPath(MLP(LN(x))). x (B, N, C) of an H x W map -> same."""

    def __init__(self, dim, heads, mlp_ratio, size, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = DGMN2Attention(dim, heads, size)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = MLP(dim, mlp_ratio * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, H, W):
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------------------------------------------
# Patch embeddings and stages (Section 4.2)


def conv_bn_relu(in_channels, out_channels, stride):
    """One 3x3 Conv-BN-ReLU unit. (B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))."""
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False),
                                     norm=nn.BatchNorm2d(out_channels), relu=nn.ReLU(inplace=True)))


class Stage(nn.Module):
    """A stage of Section 4.2: a patch embedding (Conv-BN-ReLU units) and DGMN2 layers.
    (B, C_in, H, W) -> (B, C, ceil(H / stride), ceil(W / stride)), stride the product of the embedding's strides."""

    def __init__(self, embed, layers):
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)

    def forward(self, x):
        # The residual stream in the layers' dtype, channels-last: float32 under autocast, where the embedding hands
        # out bf16 (fp16) and a stream in it would be rounded to 8 (11) bits at every residual add.
        x = self.embed(x).to(self.layers[0].norm1.weight.dtype, memory_format=torch.channels_last)
        H, W = x.shape[-2:]
        tokens = rearrange(x, "b c h w -> b (h w) c")  # (B, N, C), a view of the channels-last map
        for layer in self.layers:
            tokens = layer(tokens, H, W)
        return rearrange(tokens, "b (h w) c -> b c h w", h=H)  # (B, C, H, W), a channels-last view


# ----------------------------------------------------------------------------------------------------------------
# The backbone


class DGMN2(nn.Module):
    """Fig. 4c: a stem of three Conv-BN-ReLU (strides 2, 1, 2) and one Conv-BN-ReLU (stride 2) before stages 2-4,
    each stage a stack of DGMN2 layers; global average pooling of stage 4 and a linear classifier (no final norm,
    as in the release).

    Any input size: a stride-2 unit maps a side n to ceil(n / 2), so the stage maps are ceil(H / 4) ... ceil(H / 32)
    (nothing is padded). output_stride=8 uses stride-1 embeddings in stages 3 and 4, as Section 6.3 does for
    segmentation (16: in stage 4 only); the parameters are the same, the relative-position tables are always built for
    img_size at the strides 4, 8, 16, 32 and resized at run time.
    x (B, 3, H, W) -> logits (B, num_classes), or pooled features (B, dims[-1]) when num_classes == 0."""

    def __init__(self, depths, dims=(64, 128, 320, 512), heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4),
                 num_classes=1000, img_size=224, drop_path_rate=0.0, output_stride=32, in_channels=3):
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        nominal = [4 * 2 ** s for s in range(len(depths))]  # (4, 8, 16, 32): the strides the tables are built for
        self.strides = [min(stride, output_stride) for stride in nominal]
        stem = [(dims[0] // 2, 2), (dims[0] // 2, 1), (dims[0], 2)]  # (out channels, stride) of the three units
        self.stages = nn.ModuleList()
        for s, depth in enumerate(depths):
            embed, width = nn.Sequential(), in_channels if s == 0 else dims[s - 1]
            for out, stride in stem if s == 0 else [(dims[s], self.strides[s] // self.strides[s - 1])]:
                embed.append(conv_bn_relu(width, out, stride))
                width = out
            size = (math.ceil(img_h / nominal[s]), math.ceil(img_w / nominal[s]))  # the map at img_size
            self.stages.append(Stage(embed, [DGMN2Layer(dims[s], heads[s], mlp_ratios[s], size)
                                             for _ in range(depth)]))
        self.channels = list(dims)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)
        self.set_drop_path_rate(drop_path_rate)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def set_drop_path_rate(self, rate):
        """Stochastic depth rising linearly from 0 to `rate` over all layers (the release sets 0, then 0.1)."""
        if not 0 <= rate < 1:
            raise ValueError(f"drop_path_rate must lie in [0, 1), got {rate}")
        layers = [layer for stage in self.stages for layer in stage.layers]
        for i, layer in enumerate(layers):
            layer.drop_path.p = rate * i / max(len(layers) - 1, 1)

    def forward_features(self, x):
        """The four stage maps for FPN-style heads: x (B, 3, H, W) -> [(B, C_s, ceil(H / stride_s), ...)], channels
        (64, 128, 320, 512), strides self.strides: (4, 8, 16, 32) at output_stride 32."""
        in_channels = self.stages[0].embed[0].conv.in_channels
        if x.dim() != 4 or x.shape[1] != in_channels:
            raise ValueError(f"DGMN2 takes images of shape (B, {in_channels}, H, W), got {tuple(x.shape)}")
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def forward(self, x):
        return self.head(self.forward_features(x)[-1].mean(dim=(2, 3)))


# ----------------------------------------------------------------------------------------------------------------
# The family (Table 1): the same widths (64, 128, 320, 512), heads (1, 2, 5, 8) and MLP ratios (8, 8, 4, 4)


@dataclass(frozen=True)
class Variant:
    depths: tuple       # DGMN2 layers per stage (Table 1)
    params_m: float     # Table 6: parameters (M)
    gflops: float       # Table 6: FLOPs (G, multiply-adds) at 224 x 224
    top1: float         # Table 6: ImageNet-1K top-1 (%)


VARIANTS = dict(
    tiny=Variant(depths=(2, 2, 2, 2), params_m=12.1, gflops=2.3, top1=78.7),
    small=Variant(depths=(3, 4, 6, 3), params_m=21.0, gflops=4.3, top1=81.7),
    medium=Variant(depths=(3, 4, 18, 3), params_m=35.8, gflops=7.1, top1=82.5),
    large=Variant(depths=(3, 8, 27, 3), params_m=48.3, gflops=10.4, top1=83.3),
)


def build(variant, **overrides):
    """DGMN2 by name, e.g. build("small", num_classes=100, drop_path_rate=0.1, img_size=384, output_stride=8)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DGMN2 variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    return DGMN2(depths=VARIANTS[variant].depths, **overrides)


def dgmn2_tiny(**overrides):
    return build("tiny", **overrides)


def dgmn2_small(**overrides):
    return build("small", **overrides)


def dgmn2_medium(**overrides):
    return build("medium", **overrides)


def dgmn2_large(**overrides):
    return build("large", **overrides)


# ----------------------------------------------------------------------------------------------------------------
# The authors' released weights

_RELEASE_NAMES = [  # (release pattern, ours), applied in order to every key of a release checkpoint
    (r"^patch_embed1\.(conv|norm)(\d)\.", lambda m: f"stages.0.embed.{int(m[2]) - 1}.{m[1]}."),
    (r"^patch_embed(\d)\.(conv|norm)\.", lambda m: f"stages.{int(m[1]) - 1}.embed.0.{m[2]}."),
    (r"^block(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.layers."),
    (r"\.attn\.conv_offset\.", ".attn.walk."),
    (r"\.attn\.pos_emb\.rel_(height|width)$", lambda m: f".attn.rel_pos.{m[1]}"),
]


def _our_name(name):
    for pattern, replacement in _RELEASE_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def load_checkpoint(path):
    """What a checkpoint file holds: the release's, train_imagenet.py's, or any state dict saved with torch.save
    (loaded weights-only; the release's training script saves its argparse.Namespace beside the weights). One-line
    ValueError naming the file if it is missing or unreadable. The one reader of checkpoints of the model files and
    of the training scripts' --pretrained."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: {'a folder, not a' if Path(path).is_dir() else 'no such'} checkpoint file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file (a text file's: a bare KeyError)
        reason = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0].rstrip(": ")
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None


def _read(checkpoint):
    """A checkpoint's dict of weights: from a path (the file named in every error) or an already loaded dict; the
    weights under "model" (as the release's and train_imagenet.py's training scripts save them) or bare."""
    if isinstance(checkpoint, (str, Path)):
        loaded = load_checkpoint(checkpoint)
        if not isinstance(loaded, dict):
            raise ValueError(f"{checkpoint}: not a checkpoint (a {type(loaded).__name__}, not a dict of tensors)")
        checkpoint = loaded
    if not isinstance(checkpoint, dict):
        raise ValueError(f"checkpoint must be a path or a dict of tensors, got {type(checkpoint).__name__}")
    return checkpoint.get("model", checkpoint)


THOP_COUNTERS = ("total_ops", "total_params")
RELEASE_LAYERS = r"(patch_embed[1-4]|block[1-4])\."  # the release's names of its stages' layers (ours: stages.*)


def is_release(weights):
    """Whether a dict of weights has the release's names (patch_embed1..4, block1..4), not ours (stages.*)."""
    return any(re.match(RELEASE_LAYERS, name) for name in weights)


def load_official(model, checkpoint):
    """Load a checkpoint of the authors' release (fudan-zvg/DGMN2, classification/) into a DGMN2 of the same variant
    and switch its relative positions to the release's (transposed) rule, so that it gives the released model's
    logits. checkpoint: a path or an already loaded dict, with the weights under "model" (as the release's training
    script saves them) or bare, under the release's names. Strict: every tensor must be there with its shape, except
    the relative-position tables, which are resized (bilinearly, as at run time) for a model built with another
    img_size, and the classifier, which a backbone (num_classes=0) leaves out. Returns the model."""
    # thop's counters (total_ops, total_params on every module of a profiled model), which the release's detection
    # code also drops from these files
    release = {name: t for name, t in _read(checkpoint).items() if name.split(".")[-1] not in THOP_COUNTERS}
    foreign = [name for name in release if not (re.match(RELEASE_LAYERS, name) or name.startswith("head."))]
    if foreign:
        raise ValueError(f"not the release's format: {len(foreign)} names such as {foreign[0]!r} are not its names "
                         "(patch_embed1..4, block1..4, head); a state dict of ours loads with load_state_dict")
    ours = model.state_dict()
    # A backbone (num_classes=0) has no classifier: the release's is left out.
    state = {_our_name(name): tensor for name, tensor in release.items()
             if "head.weight" in ours or not name.startswith("head.")}
    for name, tensor in state.items():
        if name.split(".")[-2] == "rel_pos" and name in ours and tensor.shape[1:] == ours[name].shape[1:]:
            state[name] = F.interpolate(tensor[None, None].float(), size=ours[name].shape, mode="bilinear",
                                        align_corners=False)[0, 0].to(tensor.dtype)  # (rows, D) -> (our rows, D)
    rules = [name for name in ours if name.endswith("rel_pos.release_rule")]
    state.update({name: torch.tensor(True) for name in rules})
    missing, unexpected = sorted(set(ours) - set(state)), sorted(set(state) - set(ours))
    wrong = [f"{name} {tuple(state[name].shape)} (ours {tuple(ours[name].shape)})" for name in ours
             if name in state and name not in rules and state[name].shape != ours[name].shape]
    if missing or unexpected or wrong:
        problems = [f"{len(missing)} missing (first: {missing[0]})" if missing else "",
                    f"{len(unexpected)} unexpected (first: {unexpected[0]})" if unexpected else "",
                    f"{len(wrong)} of another shape (first: {wrong[0]})" if wrong else ""]
        raise ValueError("checkpoint does not fit this DGMN2 (another variant or number of classes?): "
                         + "; ".join(p for p in problems if p))
    model.load_state_dict(state)
    return model


def from_checkpoint(checkpoint):
    """The DGMN2 that a checkpoint holds, built and loaded: the release's (through load_official) or this project's
    (train_imagenet.py's, or a bare state dict), whatever its variant (read off its layers), number of classes (off
    its classifier; 0 without one) and, for ours, the img_size its relative-position tables were built for."""
    weights = _read(checkpoint)
    where = f"{checkpoint}: " if isinstance(checkpoint, (str, Path)) else ""
    release = is_release(weights)
    layer = r"block(\d)\.(\d+)\." if release else r"stages\.(\d)\.layers\.(\d+)\."
    found = {}  # stage -> layers
    for name in weights:
        if match := re.match(layer, name):
            stage = int(match[1]) - release  # the release counts stages from 1
            found[stage] = max(found.get(stage, 0), int(match[2]) + 1)
    depths = tuple(found.get(stage, 0) for stage in range(4))
    variant = next((name for name, v in VARIANTS.items() if v.depths == depths), None)
    if variant is None:
        raise ValueError(f"{where}no DGMN2 variant has {depths} layers per stage (Table 1: "
                         f"{', '.join(f'{n} {v.depths}' for n, v in VARIANTS.items())})")
    head = weights.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    if release:
        return load_official(build(variant, num_classes=num_classes), weights)
    rows = [weights["stages.0.layers.0.attn.rel_pos.height"].shape[0],
            weights["stages.0.layers.0.attn.rel_pos.width"].shape[0]]
    img_size = tuple(4 * (n - KERNEL_SIZE ** 2 + 1) for n in rows)  # stage 1's map is a quarter of the image
    model = build(variant, num_classes=num_classes, img_size=img_size)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(f"{where}does not load into DGMN2-{variant.capitalize()}: "
                         f"{' '.join(str(error).split())[:300]}") from None
    return model


# ----------------------------------------------------------------------------------------------------------------
# python dgmn2.py: Table 6; --profile: where a step's time goes; --show-walks IMAGE: the sampled nodes of one pixel


def model_macs(model, shape):
    """Multiply-adds of one forward pass of a model built on the meta device, on an input of that shape (nothing is
    computed). Returns (total, of which bilinear sampling). The total is torch.utils.flop_counter.FlopCounterMode's
    FLOPs / 2 (matmuls, convolutions, and the sampler's q . k and attn . v products: not norms, activations or
    softmax) plus the bilinear reads of the sampled keys and values, 4 multiply-adds per sampled element and channel,
    which FlopCounterMode cannot see inside the sampler (the release's count leaves them out, but counts its relative
    positions' q against all W + K - 1 table rows where ours uses the K that are read)."""
    from torch.utils.flop_counter import FlopCounterMode
    # On the meta device the kernel path runs the sampler ops' shape functions, which FlopCounterMode counts by name;
    # each product that reads a sampled element of one channel is 4 bilinear multiply-adds more.
    with sampler.backend("kernel"), FlopCounterMode(display=False) as counter:
        model(torch.empty(shape, device="meta"))
    bilinear = 4 * sampler.sampled_multiply_adds(counter.get_flop_counts()["Global"])
    return counter.get_total_flops() // 2 + bilinear, bilinear


def count_macs(variant, size=224):
    """model_macs of a variant at size x size, batch 1: (total, of which bilinear sampling)."""
    with torch.device("meta"):
        model = build(variant).eval()  # batch 1: BN in training mode would refuse a 1 x 1 map
    return model_macs(model, (1, 3, size, size))


def _table_6():
    print("| model | params (M) | paper | multiply-adds (G) | paper | of which bilinear sampling (G) | "
          "top-1 (%), paper |")
    print("|---|---|---|---|---|---|---|")
    for name, variant in VARIANTS.items():
        with torch.device("meta"):
            params = sum(p.numel() for p in build(name).parameters())
        macs, bilinear = count_macs(name)
        print(f"| DGMN2-{name.capitalize()} | {params / 1e6:.3f} | {variant.params_m} | {macs / 1e9:.3f} | "
              f"{variant.gflops} | {bilinear / 1e9:.3f} | {variant.top1} |")


def _is_samplers(event, cuda):
    """Whether a profiled event, by its name, is the sampler's: on the GPU one of sampler_cuda.cu's kernels (each_lane
    and the fused backward's each_tile, as the profiler demangles them: "void each_tile<8, 8, ...>(...)"), on the CPU
    one of its built ops."""
    if cuda:
        return re.search(r"\beach_(lane|tile)<", event) is not None
    return event.startswith(("dgmn_sampler_host", "dgmn_sampler_cuda"))


def _is_launch(event):
    """Whether a profiled GPU event, by its name, is a kernel launch: CUPTI names the GPU's memory copies and fills
    "Memcpy DtoD (Device -> Device)", "Memset (Device)" and so on, which take device time but launch nothing."""
    return not event.startswith(("Memcpy", "Memset"))


NAME_WIDTH = 100  # characters of a kernel's name in the profile's tables (a template's name runs to hundreds)


def _profile(variant="small", batch=64, img_size=224, top=10):
    """torch.profiler over one forward and backward under bf16 autocast, of stage 1's first layer and of the whole
    model: the top kernels by time with their share, and the kernel launches per layer (the GPU's memory copies and
    fills counted apart). Returns the report's lines.
    Without a GPU the same tables list the CPU's ops by self time (no kernels are launched)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    device, unit, what, calls, spent = ("cuda", "kernel launches", "kernel", "launches", "kernel time") if cuda else \
        ("cpu", "ops", "op", "calls", "op self time")
    model = build(variant, img_size=img_size).to(device)  # training mode, as a training step runs it
    side, C, G = math.ceil(img_size / model.strides[0]), model.channels[0], model.stages[0].layers[0].attn.heads
    tokens = torch.randn(batch, side * side, C, device=device, requires_grad=True)  # (B, N, C) stage 1's tokens
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    layers = sum(len(stage.layers) for stage in model.stages)
    where = torch.cuda.get_device_name() if cuda else "CPU"
    lines = [f"DGMN2-{variant.capitalize()} on {where}, batch {batch}, {img_size} x {img_size}, bf16 autocast, "
             f"the sampler's {sampler.which_path(device)} path; one forward and backward after one warm-up"]
    runs = [(f"stage 1's first layer ({side}x{side}x{C}, {G} head{'s' * (G > 1)})", 1,
             lambda: model.stages[0].layers[0](tokens, side, side)), (f"the whole model ({layers} layers)", layers,
                                                                      lambda: model(images))]
    for name, count, forward in runs:
        def step():
            with torch.autocast(device, dtype=torch.bfloat16):
                out = forward()
            out.float().square().mean().backward()

        step()  # builds the kernels, picks cuDNN's algorithms, fills the allocator's cache
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        if cuda:
            events = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
            timed = [(event, us) for event, us in events if _is_launch(event)]
            memory = [us for event, us in events if not _is_launch(event)]
            besides = f", besides {len(memory)} memory copies and fills ({sum(memory) / 1e3:.2f} ms)"
        else:
            timed = [(e.name, e.self_cpu_time_total) for e in prof.events() if e.device_type == DeviceType.CPU]
            besides = ""
        if not timed:
            raise RuntimeError(f"the profiler recorded no {unit} for {name}")
        per_name = {}
        for kernel, us in timed:
            launches, total = per_name.get(kernel, (0, 0.0))
            per_name[kernel] = launches + 1, total + us
        total_us = sum(us for _, us in timed)
        ours = sum(1 for kernel, _ in timed if _is_samplers(kernel, cuda))
        lines += ["", f"{name}: {len(timed)} {unit} ({len(timed) / count:.0f} a layer, of which the sampler's "
                      f"{ours / count:.0f}), {total_us / 1e3:.2f} ms of {spent}{besides}", "",
                  f"| {what} | {calls} | ms | share |", "|---|---|---|---|"]
        for kernel, (launches, us) in sorted(per_name.items(), key=lambda item: -item[1][1])[:top]:
            short = kernel if len(kernel) <= NAME_WIDTH else kernel[:NAME_WIDTH - 3] + "..."
            lines.append(f"| {short.replace('|', '/')} | {launches} | {us / 1e3:.3f} | {us / total_us:.1%} |")
    return lines


STAGE_COLOURS = ["red", "orange", "yellow", "cyan"]  # --show-walks: the ring around a node of stage 1, 2, 3, 4
VIRIDIS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # attention 0 ... 1
NODE_RADIUS, PANEL_WIDTH, PANEL_HEIGHT = 3, 110, 150  # pixels of a drawn node; the legend's panel beside the image


def _shade(weight):
    """The colour of an attention weight in [0, 1]: linear between VIRIDIS's anchors, as Fig. 11 shades its nodes."""
    position = min(max(weight, 0.0), 1.0) * (len(VIRIDIS) - 1)
    i = min(int(position), len(VIRIDIS) - 2)
    return tuple(round(a + (b - a) * (position - i)) for a, b in zip(VIRIDIS[i], VIRIDIS[i + 1]))


def _sampled_nodes(model, image, point):
    """The K nodes that each head of the last layer of every stage samples for one pixel, and their attention:
    image (3, H, W) uint8, point (row, column) -> [(stage, head, row, column, weight)], positions in image pixels."""
    seen = {}  # stage -> offsets (1, 2K G, h, w), attn (1, G, K, h, w) of its last layer
    hooks = [stage.layers[-1].attn.register_forward_hook(
        lambda module, args, out, s=s: seen.__setitem__(s, module.walks_and_weights(*args)[1:]))
        for s, stage in enumerate(model.stages)]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))  # (3, 1, 1) each
    try:
        with torch.no_grad():
            model(((image / 255 - mean) / std)[None])  # (1, 3, H, W)
    finally:  # the model is the caller's: it leaves without our hooks
        for hook in hooks:
            hook.remove()
    steps = torch.arange(KERNEL_SIZE) - KERNEL_SIZE // 2
    grid = torch.cartesian_prod(steps, steps)  # (K, 2) the uniform grid, node k = KERNEL_SIZE * i + j
    nodes = []
    for s, stride in enumerate(model.strides):
        offsets, attn = seen[s]
        h, w = attn.shape[-2:]
        # Stride-2, padding-1 3x3 convs centre feature p on image pixel stride * p.
        qy, qx = min(round(point[0] / stride), h - 1), min(round(point[1] / stride), w - 1)
        walks = rearrange(offsets[0, :, qy, qx], "(g k yx) -> g k yx", k=KERNEL_SIZE ** 2, yx=2)  # (G, K, 2)
        where = (torch.tensor([qy, qx]) + grid + walks) * stride  # (G, K, 2) in image pixels, (row, column)
        nodes += [(s, g, *where[g, k].tolist(), attn[0, g, k, qy, qx].item())
                  for g in range(walks.shape[0]) for k in range(walks.shape[1])]
    return nodes


def _show_walks(image_path, variant="tiny", weights=None, point=None, out_path="walks.png"):
    """Draw the nodes that each head of the last layer of every stage samples for one pixel (Fig. 5 and 11): each
    node filled with the shade of its attention weight and ringed in its stage's colour, a legend and a colour bar
    in a panel beside the image. weights: a checkpoint of ours or the release's (from_checkpoint), else an untrained
    `variant`. point: (row, column) in image pixels, the centre by default. Returns the nodes drawn."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import pil_to_tensor
    try:
        picture = Image.open(image_path).convert("RGB")
    except OSError as error:
        raise ValueError(f"{image_path}: not a readable image ({error})") from None
    y, x = point or (picture.height // 2, picture.width // 2)
    if not (0 <= y < picture.height and 0 <= x < picture.width):
        raise ValueError(f"point (row {y}, column {x}) lies outside the {picture.height} x {picture.width} image "
                         f"{image_path}")
    model = (from_checkpoint(weights) if weights else build(variant)).eval()
    nodes = _sampled_nodes(model, pil_to_tensor(picture), (y, x))
    canvas = Image.new("RGB", (picture.width + PANEL_WIDTH, max(picture.height, PANEL_HEIGHT)), (32, 32, 32))
    canvas.paste(picture)
    draw = ImageDraw.Draw(canvas)
    draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline="blue", width=2)  # the query, under its nodes
    for stage, _, row, column, weight in nodes:
        draw.ellipse([column - NODE_RADIUS, row - NODE_RADIUS, column + NODE_RADIUS, row + NODE_RADIUS],
                     fill=_shade(weight), outline=STAGE_COLOURS[stage])
    left = picture.width + 8
    for stage, colour in enumerate(STAGE_COLOURS):
        draw.text((left, 6 + 14 * stage), f"stage {stage + 1}", fill=colour)
    top, bottom = 86, PANEL_HEIGHT - 10  # the colour bar: attention 1 at the top, 0 at the bottom
    for row in range(top, bottom + 1):
        draw.line([left, row, left + 12, row], fill=_shade((bottom - row) / (bottom - top)))
    draw.text((left + 18, top - 5), "1", fill="white")
    draw.text((left + 18, bottom - 8), "0", fill="white")
    draw.text((left, top - 18), "attention", fill="white")
    try:
        canvas.save(out_path)
    except (OSError, ValueError) as error:  # no such folder, no permission; an extension PIL does not know
        raise ValueError(f"{out_path}: cannot write the picture there ({error})") from None
    print(f"{out_path}: the nodes sampled for pixel (row {y}, column {x}) by the last layer of every stage, shaded by "
          f"their attention weight{'' if weights else ' (untrained)'}")
    return nodes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Table 6 for DGMN2, a picture of the walks for one pixel, or a "
                                                 "profile of where a training step's time goes.")
    parser.add_argument("--show-walks", metavar="IMAGE", help="draw the nodes sampled for one pixel of IMAGE")
    parser.add_argument("--profile", action="store_true", help="the top kernels of one forward and backward (bf16 "
                        "autocast) of stage 1's first layer and of the whole model, and the launches per layer")
    parser.add_argument("--batch", type=int, default=64, help="images for --profile")
    parser.add_argument("--model", default="tiny", choices=list(VARIANTS), help="the variant for --show-walks and "
                        "--profile")
    parser.add_argument("--weights", help="a checkpoint for --show-walks, the release's or train_imagenet.py's (its "
                        "variant and classes are read off it; without one the walks are untrained)")
    parser.add_argument("--point", type=int, nargs=2, metavar=("ROW", "COL"), help="the pixel (default: the centre)")
    parser.add_argument("--out", default="walks.png", help="where --show-walks writes its picture")
    args = parser.parse_args()
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.profile:
        print("\n".join(_profile(args.model, args.batch)))
    elif args.show_walks:
        try:
            _show_walks(args.show_walks, args.model, args.weights, args.point, args.out)
        except ValueError as error:  # each names the file at fault
            parser.error(str(error))
    else:
        _table_6()
