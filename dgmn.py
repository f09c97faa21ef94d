"""DGMN: the dynamic graph message passing module (Sections 3.2-3.5, Eq. 1-7, Fig. 2-3), its ablations (Table 2,
Tables 14-15, the deformable message passing baseline of Table 3), and its placement in ResNets (Section 5.1).

Every pixel is a graph node. At each of S sampling rates (Eq. 3), a node receives a message from K = ks * ks nodes:
a ks x ks grid spaced `rate` apart (uniform sampling) moved by predicted walks (Eq. 4, dynamic sampling, DS), read
bilinearly (Eq. 5). Filters over G channel groups (dynamic weights, DW) and affinities normalised over the K nodes
(dynamic affinity, DA) are predicted from those walked nodes (Eq. 6-7); the message is the filter x affinity weighted
sum of the nodes, transformed by a C x C map per rate (Eq. 1's w), and the node is updated with the sum of the
messages (Eq. 2). sampler.aggregate computes the weighted sum without materialising the K sampled nodes (on its
kernel path; its torch reference path gathers them).

Symbols, used throughout: B batch, C channels, H x W the map, K nodes per rate, G filter groups, S rates, O outputs.

    python dgmn.py      Table 2: the parameters and multiply-adds that DGMN adds at the Cityscapes setting

Two parameter layouts, one switch (channel_transforms), each where the paper used it:
- True, Table 2's: per rate a C x C transform (Eq. 1's w^q) and a ks x ks predictor of G K + K channels, plus one
  shared C x C update U. It reproduces all three rows of Table 2 exactly (`python dgmn.py`), which the release's
  layout does not (its convolutions, channel_transforms=False below, have 1,451,520 weights at C = 512 and five
  rates against Table 2's +2.61M); the Cityscapes models use it.
- False, the authors' release (lzrobots/dgmn): no C x C maps; per rate the walk conv and the deformable ks x ks
  predictor, and h = f + sum_q beta_q m_q. 2268 C parameters per module at four rates (plus the walks' biases and
  the scalars), which is what gives Section 5.3's 51.1M for Mask R-CNN R-50 + DGMN (C4, C5); the COCO models use it.
Table 2 counts the transforms and predictors only; the walk predictors and the few scalars are reported beside them.

Also here: the modules DGMN is compared with (Tables 2, 3): the non-local block, GCNet's global context block,
criss-cross attention and DCNv2's modulated deformable convolution (with FlopCounterMode's formula for torchvision's
deform_conv2d), and where Table 3 puts them in a ResNet.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torchvision
from einops import rearrange, reduce

try:  # inside a package: the model files copied into a project
    from . import sampler
except ImportError:  # at the top level of this repository
    import sampler

CITYSCAPES_RATES = (1, 6, 12, 24, 36)  # Section 5.1: the network's stride is 8
COCO_RATES = (1, 4, 8, 12)             # Section 5.1: C4 / C5 at strides 16 / 32

# ----------------------------------------------------------------------------------------------------------------
# A convolution over the walked nodes (Eq. 6's matrix transformation)


class NodeConv(nn.Module):
    """Eq. 6's matrix transformation: O outputs from the K walked nodes of every pixel, sum_k W_k rho(x, p_k), a ks x ks
    deformable convolution (no bias). rho is linear per channel, so sum_k W_k rho(x, p_k) = sum_k rho(W_k x, p_k): one
    1x1 convolution to K O channels, of which node k reads only the k-th block of O. Parameters and multiply-adds are
    those of the ks x ks convolution, and the K C sampled values are never materialised on the kernel path; the price is
    that sampler.aggregate reads all K O channels at every node and weighs K - 1 of K reads by zero. No bias: Table 2
    counts none. With zero offsets it is the dilated ks x ks convolution.
    x (B, C, H, W), offsets (B, 2K, H, W) -> (B, O, H, W)."""

    def __init__(self, channels, out_channels, dilation, kernel_size=3):
        super().__init__()
        self.nodes, self.dilation = kernel_size ** 2, dilation
        self.per_node = nn.Conv2d(channels, self.nodes * out_channels, 1, bias=False)
        with torch.no_grad():  # the scale of the ks x ks convolution it stands for (fan-in K C, not C)
            self.per_node.weight /= math.sqrt(self.nodes)
        one_node = rearrange(torch.eye(self.nodes), "g k -> 1 g k 1 1")  # (1, K, K, 1, 1): group g weighs node g
        self.register_buffer("one_node", one_node, persistent=False)

    def forward(self, x, offsets):
        B, _, H, W = x.shape
        per_node = self.per_node(x)  # (B, K O, H, W): block k is W_k x
        pick = self.one_node.to(x.dtype).expand(B, -1, -1, H, W)  # (B, K, K, H, W): group k weighs node k only
        picked = sampler.aggregate(per_node, offsets, pick, self.dilation)  # (B, K O, H, W): rho(W_k x, p_k)
        return reduce(picked, "b (k o) h w -> b o h w", "sum", k=self.nodes)


# ----------------------------------------------------------------------------------------------------------------
# The message at one sampling rate (Eq. 3-7, Fig. 3)


class RateMessage(nn.Module):
    """The message of one sampling rate (Eq. 3-7): walks (Eq. 4), filters and affinities from the walked nodes
    (Eq. 6-7), their weighted sum of the nodes (Eq. 5), and the rate's C x C transform w^q (Eq. 1, 3).

    Switches (Table 2): dynamic_sampling off: the uniform grid (no walks); dynamic_weights off: no filters, the
    affinity alone weighs the nodes (Eq. 1's static w is then w^q); dynamic_affinity off: the filters alone. With both
    off (deformable message passing), static filters per group and node, randomly initialised and shared by all
    pixels, weigh the walked nodes: with w^q, a deformable convolution factorised into taps and a C x C map.
    channel_transforms off (the release's layout): no w^q.
    h (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, rate, groups=4, kernel_size=3, dynamic_affinity=True, dynamic_weights=True,
                 dynamic_sampling=True, channel_transforms=True):
        super().__init__()
        K = kernel_size ** 2
        self.rate, self.groups, self.nodes = rate, groups, K
        self.walk = sampler.WalkPredictor(channels, rate, kernel_size) if dynamic_sampling else None  # Eq. 4
        outputs = groups * K * dynamic_weights + K * dynamic_affinity  # Eq. 6: filters, then affinity logits
        self.predict = NodeConv(channels, outputs, rate, kernel_size) if outputs else None
        self.dynamic_weights, self.dynamic_affinity = dynamic_weights, dynamic_affinity
        static = not (dynamic_weights or dynamic_affinity)
        self.static_filters = nn.Parameter(torch.empty(groups, K).uniform_(-1, 1) / math.sqrt(K)) if static else None
        self.transform = nn.Conv2d(channels, channels, 1, bias=False) if channel_transforms else nn.Identity()  # w^q

    def graph(self, h):
        """The sampled graph: walks (B, 2K, H, W) and the node weights filters x affinity (B, G, K, H, W), and the
        affinity (B, 1, K, H, W) (None when DA is off)."""
        B, _, H, W = h.shape
        G, K = self.groups, self.nodes
        offsets = self.walk(h) if self.walk is not None else h.new_zeros(B, 2 * K, H, W)
        predicted = self.predict(h, offsets) if self.predict is not None else None  # (B, G K + K, H, W) at most
        filters = affinity = None
        if self.dynamic_weights:
            filters = rearrange(predicted[:, :G * K], "b (g k) h w -> b g k h w", g=G)
        elif self.static_filters is not None:
            filters = self.static_filters[None, :, :, None, None].expand(B, G, K, H, W)  # (B, G, K, H, W)
        if self.dynamic_affinity:
            affinity = predicted[:, None, -K:].softmax(dim=2)  # Eq. 7: (B, 1, K, H, W), normalised over the nodes
        if filters is None:  # DA alone: the affinity weighs every group alike
            return offsets, affinity.expand(B, G, K, H, W), affinity
        return offsets, filters if affinity is None else filters * affinity, affinity

    def forward(self, h):
        offsets, weights, _ = self.graph(h)
        return self.transform(sampler.aggregate(h, offsets, weights, self.rate))


# ----------------------------------------------------------------------------------------------------------------
# The DGMN module (Eq. 1-3, Fig. 2)


class DGMN(nn.Module):
    """Eq. 2-3: h <- sigma(f + alpha * U(sum_q beta_q m_q(h))), T times from h = f, with m_q the message of rate q.

    U is a C x C transform shared by the rates; alpha (Eq. 2) and beta_q (Eq. 3) are learnable scalars starting at 1.
    sigma is Eq. 2's non-linearity, a ReLU; nonlinearity=False leaves it out, as the release does where the module
    sits before a BN-ReLU (inside a ResNet's blocks, the COCO models). The T iterations share their parameters.
    channel_transforms off (the release's layout): no U, no w^q, no alpha (beta_q alone scales each message, as the
    release's gamma_q). f (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, rates=CITYSCAPES_RATES, groups=4, kernel_size=3, iterations=1,
                 dynamic_affinity=True, dynamic_weights=True, dynamic_sampling=True, channel_transforms=True,
                 nonlinearity=True):
        super().__init__()
        if not rates or not all(type(r) is int and r > 0 for r in rates):
            raise ValueError(f"rates must be positive ints, got {rates!r}")
        if groups < 1 or channels % groups:
            raise ValueError(f"groups = {groups} must be positive and divide channels = {channels}")
        if kernel_size < 1 or kernel_size % 2 == 0 or iterations < 1:
            raise ValueError(f"kernel_size must be odd and positive, iterations >= 1, got {kernel_size}, {iterations}")
        self.channels, self.iterations = channels, iterations
        self.messages = nn.ModuleList(
            RateMessage(channels, rate, groups, kernel_size, dynamic_affinity, dynamic_weights, dynamic_sampling,
                        channel_transforms) for rate in rates)
        self.beta = nn.Parameter(torch.ones(len(rates)))
        self.update = nn.Conv2d(channels, channels, 1, bias=False) if channel_transforms else None
        self.alpha = nn.Parameter(torch.ones(())) if channel_transforms else None
        self.sigma = nn.ReLU() if nonlinearity else nn.Identity()

    def forward(self, f):
        if f.dim() != 4 or f.shape[1] != self.channels:
            raise ValueError(f"DGMN takes (B, {self.channels}, H, W) maps, got {tuple(f.shape)}")
        h = f
        for _ in range(self.iterations):
            message = sum(beta * message(h) for beta, message in zip(self.beta, self.messages))
            h = self.sigma(f + (message if self.update is None else self.alpha * self.update(message)))
        return h


def deformable_message_passing(channels, rates=COCO_RATES, groups=4, kernel_size=3):
    """Table 3's baseline: "randomly initialised deformable convolutions for message calculation, but without using the
    proposed dynamic sampling and dynamic weights/affinities strategies" (Section 5.1). Our reading: each rate's
    message is a deformable convolution, whose offsets are predicted from the features as Dai et al.'s are (the walk
    convs here: a deformable convolution without them would be a dilated one), factorised into G x K static,
    randomly initialised taps and the C x C w^q; no filter or affinity is predicted from the walked nodes. So it
    departs from the quoted "without dynamic sampling" in keeping the offsets. Table 2's layout (it needs w^q to mix
    channels): the release has no such baseline. No sigma, as the release's DGMN module, whose place it takes in a
    ResNet (after a 3x3 conv a BN-ReLU follows; before a stage's last block the block takes the sum as it is)."""
    return DGMN(channels, rates, groups, kernel_size, dynamic_affinity=False, dynamic_weights=False,
                nonlinearity=False)


# ----------------------------------------------------------------------------------------------------------------
# The modules DGMN is compared with (Tables 2, 3): each returns x + its context, so each drops in where DGMN does


def bottleneck(channels, ratio, module):
    """channels // ratio, the width of a baseline's 1x1 bottleneck: a one-line error where that leaves none."""
    if channels < ratio:
        raise ValueError(f"{module}: channels = {channels} // {ratio} leaves its bottleneck empty; give it at least "
                         f"{ratio} channels")
    return channels // ratio


class NonLocal(nn.Module):
    """The non-local block (Wang et al., CVPR 2018), embedded Gaussian: y = softmax(theta(x)^T phi(x) / sqrt(C')) g(x)
    over all N = H W positions, z = x + BN(W_z y), BN's weight starting at 0 so that a new block is the identity.
    theta, phi and g are 1x1 convs to C' = inner_channels (C / 2 by default), drawn from N(0, 0.01^2); no
    sub-sampling. The scale and the small start are the authors' release's (and mmcv's), not in the paper's equation:
    unscaled from PyTorch's default start, a query's largest weight on a random 512-channel 20 x 30 map is 0.20, not
    near 1 / N (0.0017): its attention would start far from the uniform average the release starts from.
    x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, inner_channels=None):
        super().__init__()
        inner = inner_channels or bottleneck(channels, 2, "NonLocal")
        self.theta, self.phi, self.g = (nn.Conv2d(channels, inner, 1) for _ in range(3))
        for conv in (self.theta, self.phi, self.g):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        self.out = nn.Sequential(nn.Conv2d(inner, channels, 1), nn.BatchNorm2d(channels))
        nn.init.zeros_(self.out[1].weight)

    def forward(self, x):
        H = x.shape[-2]
        theta, phi, g = (rearrange(f(x), "b c h w -> b 1 (h w) c") for f in (self.theta, self.phi, self.g))
        # its default scale is 1 / sqrt(C'); the N x N affinities are never stored (B, 1, N, C')
        y = nn.functional.scaled_dot_product_attention(theta, phi, g)
        return x + self.out(rearrange(y, "b 1 (h w) c -> b c h w", h=H))


class GlobalContext(nn.Module):
    """GCNet's global context block (Cao et al., ICCVW 2019): one attention map over the H W positions (a 1x1 conv to 1,
    softmax) pools a (C, 1, 1) context, transformed by a bottleneck (1x1 conv C -> C / ratio, LayerNorm, ReLU, 1x1 conv
    back, zero-initialised) and added at every position. x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, ratio=16):
        super().__init__()
        inner = bottleneck(channels, ratio, "GlobalContext")
        self.attention = nn.Conv2d(channels, 1, 1, bias=False)  # GCNet's has one: a softmax ignores it, it never learns
        nn.init.kaiming_normal_(self.attention.weight, mode="fan_in", nonlinearity="relu")  # GCNet's start
        self.transform = nn.Sequential(nn.Conv2d(channels, inner, 1), nn.LayerNorm([inner, 1, 1]),
                                       nn.ReLU(inplace=True), nn.Conv2d(inner, channels, 1))
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x):
        weights = rearrange(self.attention(x), "b 1 h w -> b (h w) 1").softmax(dim=1)  # (B, N, 1)
        context = torch.einsum("bcn,bno->bco", rearrange(x, "b c h w -> b c (h w)"), weights)  # (B, C, 1)
        return x + self.transform(context[..., None])  # (B, C, 1, 1), broadcast over H x W


class CrissCrossAttention(nn.Module):
    """CCNet's recurrent criss-cross attention (Huang et al., ICCV 2019): each pixel attends to the H + W - 1 pixels
    of its row and column (itself once) with 1x1 conv queries and keys of C / 8 channels, the softmax over all of
    them weighs 1x1 conv values of C channels; x <- x + gamma * that, gamma starting at 0. `recurrence` passes share
    the weights, so that with 2 every pixel reaches every other. x (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels, recurrence=2, reduction=8):
        super().__init__()
        self.recurrence = recurrence
        inner = bottleneck(channels, reduction, "CrissCrossAttention")
        self.query, self.key = (nn.Conv2d(channels, inner, 1) for _ in range(2))
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(()))

    def attend(self, x):
        H = x.shape[-2]
        q, k, v = self.query(x), self.key(x), self.value(x)
        column = torch.einsum("bchw,bcgw->bhwg", q, k)  # (B, H, W, H): pixel (h, w) with (g, w)
        itself = torch.eye(H, dtype=torch.bool, device=x.device)[:, None, :]  # (H, 1, H): g == h, counted in the row
        row = torch.einsum("bchw,bchg->bhwg", q, k)  # (B, H, W, W): pixel (h, w) with (h, g)
        attention = torch.cat([column.masked_fill(itself, float("-inf")), row], dim=-1).softmax(dim=-1)
        out = (torch.einsum("bhwg,bcgw->bchw", attention[..., :H], v)  # (B, C, H, W) from the columns
               + torch.einsum("bhwg,bchg->bchw", attention[..., H:], v))  # and from the rows
        return x + self.gamma * out

    def forward(self, x):
        for _ in range(self.recurrence):
            x = self.attend(x)
        return x


# ----------------------------------------------------------------------------------------------------------------
# DCNv2, Table 2's "+ Deformable": a convolution (not x + a context, as the modules above), and its FLOP formula


class ModulatedDeformConv(torchvision.ops.DeformConv2d):
    """DCNv2 (Zhu et al., CVPR 2019): a ks x ks convolution whose K reads move by predicted offsets and are scaled by
    predicted masks (a sigmoid), both from a ks x ks conv of the input (same stride, padding and dilation) to 3K
    channels with bias (as mmcv's ModulatedDeformConv2dPack). That conv starts at zero: a new layer reads the regular
    grid at masks 0.5. Padding defaults to "same". x (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1, padding=None, dilation=1, groups=1,
                 bias=False):
        padding = dilation * (kernel_size // 2) if padding is None else padding
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias)
        self.reads = math.prod(self.kernel_size)  # K
        self.offset_mask = nn.Conv2d(in_channels, 3 * self.reads, kernel_size, stride, padding, dilation)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    @classmethod
    def replacing(cls, conv):
        """DCNv2 in place of a convolution of the same geometry, holding that convolution's weight and bias (the same
        tensors: a frozen one stays frozen, and torchvision's weights load under the same names)."""
        dcn = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None)
        dcn.weight, dcn.bias = conv.weight, conv.bias
        return dcn

    def forward(self, x):
        offsets, masks = self.offset_mask(x).split([2 * self.reads, self.reads], dim=1)  # (B, 2K | K, H', W')
        return super().forward(x, offsets, masks.sigmoid())


def deform_conv_flops(input_shape, weight_shape, *_, out_shape, **__):
    """FlopCounterMode's formula for torchvision::deform_conv2d (shapes in, FLOPs out, 2 a multiply-add), which it
    does not know: that of the convolution it generalises, out elements x (C_in / groups) x ks x ks; the bilinear reads
    and the masks' products are not counted. Pass it as FlopCounterMode(custom_mapping={
    torch.ops.torchvision.deform_conv2d: deform_conv_flops})."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


# ----------------------------------------------------------------------------------------------------------------
# Where the modules go in a ResNet (Sections 5.1, 5.2): after every 3x3 conv of a stage, or once before its last block

RESNET_STAGES = dict(C2="layer1", C3="layer2", C4="layer3", C5="layer4")


def resnet_stage(resnet, stage):
    """The stage ("C2"-"C5") of a torchvision ResNet: its nn.Sequential of residual blocks."""
    if stage not in RESNET_STAGES or not hasattr(resnet, RESNET_STAGES[stage]):
        raise ValueError(f"stage {stage!r}: a ResNet has stages {', '.join(RESNET_STAGES)}")
    return getattr(resnet, RESNET_STAGES[stage])


class ConvThen(nn.Conv2d):
    """A convolution followed by a module (its attribute `context`). It is the convolution itself (same parameter
    names), so a pretrained state dict still loads into it. (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)."""

    def __init__(self, conv, module):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                         device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        for name, p in conv.named_parameters():  # a frozen conv stays frozen
            getattr(self, name).requires_grad_(p.requires_grad)
        self.context = module.to(conv.weight.device, conv.weight.dtype)

    def forward(self, x):
        return self.context(super().forward(x))


def after_every_3x3(resnet, stages, make):
    """Every 3x3 convolution of the chosen stages of a torchvision ResNet (or ResNeXt) followed by make(its output
    channels), in place ("C5": layer4, "C4": layer3). Every other parameter keeps its name, so torchvision's ImageNet
    weights load with strict=False, missing only the new modules. Returns the ResNet."""
    for stage in stages:
        for block in resnet_stage(resnet, stage):
            for name, conv in list(block.named_children()):
                if isinstance(conv, ConvThen):
                    raise ValueError(f"stage {stage!r} already has modules after its 3x3 convolutions")
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    setattr(block, name, ConvThen(conv, make(conv.out_channels)))
    return resnet


def insert_into_resnet(resnet, stages=("C5",), rates=COCO_RATES, **dgmn):
    """A DGMN module after every 3x3 convolution of the chosen stages (Section 5.1), by default as our COCO models
    build it: COCO's rates, the release's layout (channel_transforms=False) and no sigma, since a BN-ReLU follows
    (dgmn's keywords say otherwise, e.g. channel_transforms=True for Table 2's layout)."""
    dgmn = dict(nonlinearity=False, channel_transforms=False) | dgmn
    return after_every_3x3(resnet, stages, lambda channels: DGMN(channels, rates=rates, **dgmn))


def before_last_block(resnet, stage, module):
    """module right before the last residual block of a stage, in place (Table 3's single module: "C4", as Wang et al.
    place the non-local block). The blocks keep their names (layer3.0 ... layer3.5); the module is layer3.context.
    Returns the ResNet."""
    blocks = list(resnet_stage(resnet, stage).named_children())
    if any(name == "context" for name, _ in blocks):
        raise ValueError(f"stage {stage!r} already has a module before its last block")
    setattr(resnet, RESNET_STAGES[stage], nn.Sequential(OrderedDict([*blocks[:-1], ("context", module), blocks[-1]])))
    return resnet


# ----------------------------------------------------------------------------------------------------------------
# Table 2: python dgmn.py

CITYSCAPES_CHANNELS, CITYSCAPES_SIDE = 512, 97  # the 512-channel map of the dilated FCN: 769 crop at stride 8


@dataclass(frozen=True)
class Ablation:
    options: dict = field(hash=False)  # DGMN's switches for this row
    params_m: float                    # Table 2: added parameters (M)
    gflops: float                      # Table 2: added FLOPs (G)
    miou: float                        # Table 2: Cityscapes val mIoU (%)


TABLE_2 = {
    "DGMN w/ DA": Ablation(dict(rates=(1,), dynamic_weights=False, dynamic_sampling=False), 0.57, 5.32, 76.5),
    "DGMN w/ DA+DW": Ablation(dict(rates=(1,), dynamic_sampling=False), 0.73, 6.88, 79.1),
    "DGMN w/ DA+DW+DS": Ablation(dict(rates=CITYSCAPES_RATES), 2.61, 24.55, 80.4),
}


def added_cost(options, channels=CITYSCAPES_CHANNELS, side=CITYSCAPES_SIDE):
    """What a DGMN adds on a (1, channels, side, side) map, counted on the meta device (nothing is computed):
    parameters and multiply-adds (FlopCounterMode's count / 2) of the convolutions that Table 2 counts (transforms
    and filter / affinity predictors) and of the walk predictors; the remaining parameters (scalars, static
    filters); and the sampler's weighted sums (products only, the bilinear reads are not counted). A dict."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        module = DGMN(channels, **options)
    params = {name: p.numel() for name, p in module.named_parameters()}
    walk_params = sum(n for name, n in params.items() if ".walk." in name)
    conv_params = sum(n for name, n in params.items() if name.endswith("weight") and ".walk." not in name)
    with sampler.backend("kernel"), FlopCounterMode(display=False) as counter:
        module(torch.empty(1, channels, side, side, device="meta"))
    counts = counter.get_flop_counts()  # module name -> op -> FLOPs
    conv_macs = counts["Global"][torch.ops.aten.convolution] // 2
    walk_macs = sum(ops[torch.ops.aten.convolution] for name, ops in counts.items() if name.endswith(".walk")) // 2
    sampler_macs = sum(f for op, f in counts["Global"].items() if str(op).startswith("dgmn_sampler")) // 2
    return dict(params=conv_params, macs=conv_macs - walk_macs, walk_params=walk_params, walk_macs=walk_macs,
                other_params=sum(params.values()) - conv_params - walk_params, sampler_macs=sampler_macs)


def _table_2():
    print(f"DGMN on a {CITYSCAPES_SIDE}x{CITYSCAPES_SIDE}x{CITYSCAPES_CHANNELS} map (Cityscapes, dilated FCN "
          "ResNet-101, 769 crop), batch 1.\n")
    print("| row | params | paper | multiply-adds (G) | paper | + walk predictors (M / G) | + other params | "
          "+ sampler sums (G) | mIoU paper |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in TABLE_2.items():
        cost = added_cost(row.options)
        print(f"| {name} | {cost['params']:,} | +{row.params_m}M | {cost['macs'] / 1e9:.3f} | +{row.gflops} | "
              f"{cost['walk_params'] / 1e6:.3f} / {cost['walk_macs'] / 1e9:.3f} | {cost['other_params']} | "
              f"{cost['sampler_macs'] / 1e9:.3f} | {row.miou} |")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Table 2: the parameters and FLOPs the DGMN module adds, "
                                                 "beside the paper's.")
    parser.parse_args()  # only --help
    _table_2()
