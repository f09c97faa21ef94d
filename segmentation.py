"""Every Cityscapes model: DGMN2 + Semantic FPN and DGMN2 + SETR's Naive, PUP and MLA heads at output stride 8
(Section 6.3, Table 11), and the dilated FCN ResNet-101 (Section 5.1) with the DGMN module or a module of Table 2
(DCNv2, ASPP, non-local), with DeepLab v3's multi-grid (Table 13) and DGMN's rates and groups (Tables 14, 15) as
options. One model table, MODELS, holds the paper's parameters, FLOPs and mIoU beside each model; build(name) makes
one, load_pretrained gives it its ImageNet backbone, slide and predict run it over a whole image (sliding windows,
scales and flips, Section 8.1.1) and ohem_cross_entropy is the FCNs' OHEM loss (Table 13). train_cityscapes.py trains
and evaluates them.

Symbols, used throughout: B batch, H x W the input image, C channels, H_s x W_s the map of DGMN2's stage s (1-4),
C_s its channels, classes the classifier's outputs.

    python segmentation.py      Tables 2 and 11: parameters and FLOPs beside the paper's

    model = segmentation.build("dgmn2-tiny-mla", num_classes=19)    # (B, 3, H, W) -> (B, 19, H, W)
    model = segmentation.build("fcn-dgmn", dgmn_options=dict(rates=(1, 6, 12)))          # Table 14's rates
"""

import functools
import itertools
import math
import textwrap
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

try:  # inside a package: the model files copied into a project
    from . import dgmn, dgmn2
except ImportError:  # at the top level of this repository
    import dgmn
    import dgmn2

NUM_CLASSES = 19          # Cityscapes' evaluated classes (train ids 0-18)
CLASSIFIER_DROPOUT = 0.1  # the Dropout2d before the Semantic FPN's and the dilated FCN's 1x1 classifiers

# ----------------------------------------------------------------------------------------------------------------
# Building blocks: a Conv-BN-ReLU, and the corner-aligned resizes of the DGMN2 release's heads


def conv_bn_relu(in_channels, out_channels, bias=False):
    """A 3x3 Conv-BN-ReLU, the width changed (bias: the conv's own, redundant before BN; the DGMN2 release's PUP head
    has it). (B, C_in, H, W) -> (B, C_out, H, W)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


def resize(x, size):
    """Bilinear resize of (B, C, h, w) to size (H, W), corners aligned as in every resize of the DGMN2 release's SETR
    heads: its configs set align_corners=True (SETR's own set False) and its MLA head hard-codes True for the four
    maps. -> (B, C, H, W)."""
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=True)


def doubled(x):
    """(B, C, h, w) -> (B, C, 2h, 2w), resized."""
    return resize(x, [2 * side for side in x.shape[-2:]])


# ----------------------------------------------------------------------------------------------------------------
# DGMN2 + Semantic FPN (Kirillov et al.), Table 11

FPN_OUTPUT_STRIDE = 32  # DGMN2 as it classifies ImageNet, under the Semantic FPN (Table 11)
FPN_CHANNELS, FPN_HEAD_CHANNELS = 256, 128  # the FPN's width, and that of the units that bring each level up


class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al.) on the four DGMN2 maps: an FPN, per level 3x3 Conv-BN-ReLU units, each but the
    finest's followed by a 2x upsampling; their sum, a 1x1 classifier, upsampled. (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = True  # in every resize, as the release's Cityscapes configs set for mmseg's FPNHead

    def __init__(self, backbone, classes, fpn_channels=FPN_CHANNELS, head_channels=FPN_HEAD_CHANNELS):
        super().__init__()
        self.backbone, self.fpn = backbone, torchvision.ops.FeaturePyramidNetwork(backbone.channels, fpn_channels)
        units = [max(int(math.log2(s // backbone.strides[0])), 1) for s in backbone.strides]  # 2x upsamplings, >= 1
        self.scales = nn.ModuleList(nn.Sequential(*[nn.Sequential(
            nn.Conv2d(head_channels if u else fpn_channels, head_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True)) for u in range(n)]) for n in units)
        self.classifier = nn.Sequential(nn.Dropout2d(CLASSIFIER_DROPOUT), nn.Conv2d(head_channels, classes, 1))

    def forward(self, images):
        maps = self.backbone.forward_features(images)
        finest, fused, corners = maps[0].shape[-2:], 0, self.align_corners
        for level, scale in zip(self.fpn({str(i): m for i, m in enumerate(maps)}).values(), self.scales):
            for unit in scale:
                level = unit(level)
                if level.shape[-2:] != finest:
                    level = F.interpolate(level, scale_factor=2, mode="bilinear", align_corners=corners)
            # to the finest map's exact size: an odd side's 2x upsampling can miss it by a pixel
            fused = fused + F.interpolate(level, size=finest, mode="bilinear", align_corners=corners)
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=corners)


# ----------------------------------------------------------------------------------------------------------------
# SETR's decoder heads (Zheng et al., CVPR 2021) on DGMN2 at output stride 8 (Section 6.3, Table 11)

SETR_OUTPUT_STRIDE = 8  # Section 6.3: stride-1 patch embeddings in stages 3 and 4
PUP_CHANNELS, PUP_ROUNDS = 256, 3  # the release's PUP: three 3x3 convs to 256 channels, each before a 2x upsampling
MLA_CHANNELS, MLA_SCALE = 128, 4  # the release's MLA: 128 channels a stage, resized to 4 x the stride-8 map


class NaiveHead(nn.Module):
    """SETR-Naive as the DGMN2 release has it: a 1x1 classifier on the last stage map.
    The four stage maps [(B, C_s, H_s, W_s)] -> (B, classes, H_4, W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.classifier = nn.Conv2d(channels[-1], classes, 1)

    def forward(self, maps):
        return self.classifier(maps[-1])


class PUPHead(nn.Module):
    """SETR-PUP (progressive upsampling) as the release has it: PUP_ROUNDS rounds of a 3x3 Conv-BN-ReLU to
    PUP_CHANNELS (the conv with a bias) and a 2x upsampling on the last map, then a 1x1 classifier and a last 2x
    upsampling; at output stride 8 its logits have twice the input's side, which SETR resizes down.
    [(B, C_s, H_s, W_s)] -> (B, classes, 16 H_4, 16 W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        widths = [channels[-1]] + [PUP_CHANNELS] * PUP_ROUNDS
        self.rounds = nn.ModuleList(conv_bn_relu(i, o, bias=True) for i, o in zip(widths, widths[1:]))
        self.classifier = nn.Conv2d(PUP_CHANNELS, classes, 1)

    def forward(self, maps):
        x = maps[-1]
        for unit in self.rounds:
            x = doubled(unit(x))
        return doubled(self.classifier(x))


class MLAHead(nn.Module):
    """SETR-MLA (multi-level feature aggregation) as the release has it, on DGMN2's four stage maps where SETR takes
    four ViT layers: two 3x3 Conv-BN-ReLU to MLA_CHANNELS on each map, each resized to MLA_SCALE times the last
    (stride-8) map, concatenated and classified by a 1x1 conv. [(B, C_s, H_s, W_s)] -> (B, classes, 4 H_4, 4 W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.levels = nn.ModuleList(nn.Sequential(conv_bn_relu(width, MLA_CHANNELS),
                                                  conv_bn_relu(MLA_CHANNELS, MLA_CHANNELS)) for width in channels)
        self.classifier = nn.Conv2d(len(channels) * MLA_CHANNELS, classes, 1)

    def forward(self, maps):
        size = [MLA_SCALE * side for side in maps[-1].shape[-2:]]
        return self.classifier(torch.cat([resize(level(x), size) for level, x in zip(self.levels, maps)], dim=1))


SETR_HEADS = dict(naive=NaiveHead, pup=PUPHead, mla=MLAHead)  # the models dgmn2-VARIANT-HEAD


class SETR(nn.Module):
    """Section 6.3: DGMN2 at output stride 8 and one of SETR_HEADS, its logits resized to the input (the release resizes
    Naive's and MLA's to the 769 crop first: the same at the training crop and evaluation window); no auxiliary heads,
    no dropout (the release's configs). (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = True  # as resize(): multi-scale evaluation resizes the scores back the same way

    def __init__(self, backbone, head, classes):
        super().__init__()
        self.backbone, self.head = backbone, SETR_HEADS[head](backbone.channels, classes)

    def forward(self, images):
        return resize(self.head(self.backbone.forward_features(images)), images.shape[-2:])


# ----------------------------------------------------------------------------------------------------------------
# Table 2's modules on the dilated FCN's 512-channel map: ASPP from torchvision here, DGMN, the non-local block and
# DCNv2 from dgmn.py

FCN_CHANNELS = dgmn.CITYSCAPES_CHANNELS  # Section 5.1: the 3x3 Conv-BN-ReLU after the backbone gives 512
DCN_CHANNELS = 256  # "+ Deformable": DCNv2 512 -> 256 is the standard width that gives Table 2's +1.31M
ASPP_RATES, ASPP_CHANNELS = (12, 24, 36), 256  # DeepLab v3 at output stride 8: its rates, its branches' width


def deformable(channels):
    """Table 2's "+ Deformable": a DCNv2 3x3 conv to DCN_CHANNELS, BN, ReLU; the classifier reads DCN_CHANNELS.
    (B, C, H, W) -> (B, DCN_CHANNELS, H, W)."""
    return nn.Sequential(dgmn.ModulatedDeformConv(channels, DCN_CHANNELS), nn.BatchNorm2d(DCN_CHANNELS),
                         nn.ReLU(inplace=True))


class ASPP(torchvision.models.segmentation.deeplabv3.ASPP):
    """Table 2's "+ ASPP": DeepLab v3's atrous spatial pyramid pooling (Chen et al., 2017), torchvision's: a 1x1 conv,
    3x3 convs at ASPP_RATES and image pooling, ASPP_CHANNELS each with BN-ReLU, concatenated and projected by a 1x1
    Conv-BN-ReLU (and dropout 0.5). The projection goes back to C, as the ASPP module of the CCNet / OCNet code base
    (5 x 256 -> 512), not to 256 as torchvision's: the nearer of the two to Table 2 (MODELS gives both gaps).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels):
        super().__init__(channels, ASPP_RATES, ASPP_CHANNELS)
        self.project[0] = nn.Conv2d(len(self.convs) * ASPP_CHANNELS, channels, 1, bias=False)
        self.project[1] = nn.BatchNorm2d(channels)


def non_local(channels):
    """Table 2's "+ Non-local": the embedded-Gaussian block (dgmn.NonLocal, C / 2 inner channels) then a 3x3
    Conv-BN-ReLU C -> C, as DANet's head follows its attention module (conv5a, the module, conv51, the classifier).
    (B, C, H, W) -> (B, C, H, W)."""
    return nn.Sequential(dgmn.NonLocal(channels), conv_bn_relu(channels, channels))


# ----------------------------------------------------------------------------------------------------------------
# The dilated FCN ResNet-101 (Section 5.1), DeepLab v3's multi-grid (Table 13)

MULTI_GRID = (1, 2, 4)  # DeepLab v3: res5's three blocks at the stage's dilation times these


def multi_grid_dilations(stage):
    """DeepLab v3's multi-grid, in place: the 3x3 conv of block i of a torchvision ResNet stage at the stage's dilation
    (its last block's; torchvision gives the first block half of it) times MULTI_GRID[i]. Returns the stage."""
    dilation = stage[-1].conv2.dilation[0]
    for block, unit in zip(stage, MULTI_GRID, strict=True):
        block.conv2.dilation = block.conv2.padding = (dilation * unit,) * 2  # padding = dilation: the size kept
    return stage


class DilatedFCN(nn.Module):
    """Section 5.1: ResNet-101 at output stride 8 (dilated layer3-4), a 3x3 Conv-BN-ReLU to 512 channels, a module on
    that map (`context`, made by make_context(channels): nothing for the FCN baseline, a module of Table 2 or DGMN)
    whose output of context_channels (None: the map's) goes through dropout and a 1x1 classifier, upsampled to the
    input. multi_grid: res5 (layer4) with DeepLab v3's multi-grid. (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = False  # the DGMN release (lzrobots/dgmn) has COCO code only: nothing says what its FCN used

    def __init__(self, classes, make_context=nn.Identity, context_channels=None, multi_grid=False,
                 channels=FCN_CHANNELS):
        super().__init__()
        self.backbone = torchvision.models.resnet101(replace_stride_with_dilation=[False, True, True])
        width = self.backbone.fc.in_features  # res5's output channels
        self.backbone.fc = nn.Identity()  # unused: DDP requires every parameter to take part
        if multi_grid:
            multi_grid_dilations(self.backbone.layer4)
        self.reduce = conv_bn_relu(width, channels)
        self.context = make_context(channels)
        self.classifier = nn.Sequential(nn.Dropout2d(CLASSIFIER_DROPOUT),
                                        nn.Conv2d(context_channels or channels, classes, 1))

    def forward(self, images):
        r = self.backbone
        x = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(images))))))))  # (B, 2048, H / 8, W / 8)
        logits = self.classifier(self.context(self.reduce(x)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)


# ----------------------------------------------------------------------------------------------------------------
# The FCNs' training loss with pixel OHEM (Table 13)

OHEM_THRESHOLD, OHEM_MIN_KEPT = 0.7, 100_000  # pixel OHEM as the CCNet and DANet code bases train Cityscapes


def cross_entropy(logits, labels, ignore_index=255):
    """The mean cross-entropy over the labelled pixels, 0 for a batch without any (F.cross_entropy's mean is then NaN,
    which would stop a run, and stop it again where a resumed run repeats that crop).
    logits (B, classes, H, W), labels (B, H, W), ignore_index where unlabelled -> a scalar."""
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp_min(1)


def ohem_cross_entropy(logits, labels, threshold=OHEM_THRESHOLD, min_kept=OHEM_MIN_KEPT, ignore_index=255):
    """Pixel OHEM (the CCNet and DANet code bases): the mean cross-entropy over the labelled pixels whose probability of
    their class is under threshold or, when fewer than min_kept are, over the min_kept hardest (all the labelled ones
    if fewer; ties with the last one kept too). Over the batch given, without a host sync.
    logits (B, classes, H, W), labels (B, H, W), ignore_index where unlabelled -> a scalar."""
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")  # (B, H, W), 0 if ignored
    labelled = labels != ignore_index
    probability = torch.exp(-losses).masked_fill(~labelled, math.inf)  # an ignored pixel is never among the hardest
    # the k-th smallest over all (B H W,) pixels; inf when fewer than min_kept are labelled; min_kept 0: the threshold
    k = min(min_kept, probability.numel())
    kth = probability.flatten().kthvalue(k).values if k else probability.new_tensor(-math.inf)
    kept = labelled & torch.where(kth < threshold, probability < threshold, probability <= kth)
    return (losses * kept).sum() / kept.sum().clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------
# The model table (Tables 2, 11): each model beside the paper's numbers; build(name)


@dataclass(frozen=True)
class DGMN2Row:
    """A DGMN2 model of Table 11 (Cityscapes val): the backbone, its decoder head and the paper's numbers."""
    variant: str     # of dgmn2.VARIANTS
    head: str        # "fpn" (Semantic FPN, output stride 32) or one of SETR_HEADS (output stride 8)
    params_m: float  # parameters (M)
    gflops: float    # FLOPs (G)
    miou: float      # mIoU (%), single scale
    miou_ms: float   # mIoU (%), multi-scale and flips


@dataclass(frozen=True)
class FCNRow:
    """A dilated FCN of Table 2: make(channels, **DGMN switches) builds the module on its 512-channel map."""
    make: object                     # the module's builder (nn.Identity ignores its arguments)
    params_m: float | None           # Table 2: the parameters it adds (M)
    gflops: float | None             # Table 2: the FLOPs it adds (G)
    miou: float                      # Table 2: Cityscapes val mIoU (%), single scale
    layout: str                      # what the module is, after which paper or code base
    dgmn: dict | None = None         # DGMN's switches, for the DGMN rows: what build()'s dgmn_options replace
    out_channels: int | None = None  # the width the classifier reads; None: the map's


def dgmn_fcn(ablation):
    """The dilated FCN with DGMN in Table 2's layout, from its row of dgmn.TABLE_2 (switches and paper numbers)."""
    return FCNRow(dgmn.DGMN, ablation.params_m, ablation.gflops, ablation.miou, "dgmn.DGMN, Table 2's layout",
                  dgmn=ablation.options)


MODELS = {  # Table 11's rows head by head, then Table 2's in its order: the paper's parameters, FLOPs and mIoU
    "dgmn2-tiny": DGMN2Row("tiny", "fpn", params_m=15.84, gflops=76.35, miou=78.09, miou_ms=79.40),
    "dgmn2-small": DGMN2Row("small", "fpn", params_m=24.71, gflops=99.57, miou=80.65, miou_ms=81.58),
    "dgmn2-medium": DGMN2Row("medium", "fpn", params_m=39.55, gflops=136.01, miou=80.60, miou_ms=81.79),
    "dgmn2-large": DGMN2Row("large", "fpn", params_m=52.02, gflops=175.94, miou=81.75, miou_ms=82.64),
    "dgmn2-tiny-naive": DGMN2Row("tiny", "naive", params_m=11.60, gflops=117.52, miou=77.23, miou_ms=78.23),
    "dgmn2-small-naive": DGMN2Row("small", "naive", params_m=20.47, gflops=204.97, miou=80.31, miou_ms=81.04),
    "dgmn2-medium-naive": DGMN2Row("medium", "naive", params_m=35.31, gflops=347.76, miou=80.83, miou_ms=81.39),
    "dgmn2-large-naive": DGMN2Row("large", "naive", params_m=47.78, gflops=467.46, miou=81.80, miou_ms=82.61),
    "dgmn2-tiny-pup": DGMN2Row("tiny", "pup", params_m=13.95, gflops=242.51, miou=78.25, miou_ms=79.26),
    "dgmn2-small-pup": DGMN2Row("small", "pup", params_m=22.82, gflops=329.96, miou=79.78, miou_ms=80.73),
    "dgmn2-medium-pup": DGMN2Row("medium", "pup", params_m=37.67, gflops=472.75, miou=80.97, miou_ms=81.80),
    "dgmn2-large-pup": DGMN2Row("large", "pup", params_m=50.14, gflops=592.45, miou=81.58, miou_ms=82.27),
    "dgmn2-tiny-mla": DGMN2Row("tiny", "mla", params_m=13.37, gflops=141.72, miou=78.25, miou_ms=79.32),
    "dgmn2-small-mla": DGMN2Row("small", "mla", params_m=22.24, gflops=229.17, miou=80.79, miou_ms=81.62),
    "dgmn2-medium-mla": DGMN2Row("medium", "mla", params_m=37.08, gflops=371.96, miou=81.09, miou_ms=82.00),
    "dgmn2-large-mla": DGMN2Row("large", "mla", params_m=49.56, gflops=491.66, miou=81.55, miou_ms=81.98),
    "fcn": FCNRow(nn.Identity, params_m=None, gflops=None, miou=75.0,
                  layout="nothing: the Conv-BN-ReLU feeds the classifier"),
    "fcn-deformable": FCNRow(deformable, params_m=1.31, gflops=12.34, miou=78.2,
                             layout="DCNv2 3x3 512 -> 256, BN, ReLU (Zhu et al.); the classifier reads 256 channels",
                             out_channels=DCN_CHANNELS),
    "fcn-aspp": FCNRow(ASPP, params_m=4.42, gflops=38.45, miou=78.9,
                       layout="DeepLab v3's ASPP (torchvision's), rates 12, 24, 36, 5 x 256 projected to 512 as in "
                       "the CCNet / OCNet code base; no standard layout is within 3% of both numbers: torchvision's "
                       "projection to 256 gives -6.6% / -2.3%"),
    "fcn-nonlocal": FCNRow(non_local, params_m=2.88, gflops=73.33, miou=79.0,
                           layout="non-local block (Wang et al.), 256 inner channels, then a 3x3 Conv-BN-ReLU 512 -> "
                           "512 (DANet's head)"),
    "fcn-da": dgmn_fcn(dgmn.TABLE_2["DGMN w/ DA"]),              # +0.57M, +5.32G, 76.5%
    "fcn-da-dw": dgmn_fcn(dgmn.TABLE_2["DGMN w/ DA+DW"]),        # +0.73M, +6.88G, 79.1%
    "fcn-dgmn": dgmn_fcn(dgmn.TABLE_2["DGMN w/ DA+DW+DS"]),      # +2.61M, +24.55G, 80.4%
}
DGMN2_MODELS = {name: row for name, row in MODELS.items() if isinstance(row, DGMN2Row)}  # Table 11's
FCN_VARIANTS = {name: row for name, row in MODELS.items() if isinstance(row, FCNRow)}  # Table 2's
DGMN_FCNS = [name for name, row in FCN_VARIANTS.items() if row.dgmn]  # those that take dgmn_options


def build(name, num_classes=NUM_CLASSES, output_stride=None, multi_grid=False, dgmn_options=None):
    """A model of MODELS, untrained. DGMN2's: output_stride 8, 16 or 32 under the Semantic FPN, 8 under a SETR head;
    None: the model's (32, 8). The FCNs': multi_grid (Table 13), and for the DGMN FCNs dgmn_options, DGMN switches
    that replace the row's (e.g. rates, Table 14; groups or dynamic_weights=False, Table 15). ValueError, one line,
    for an unknown name or an option that does not apply. The model: (B, 3, H, W) -> (B, num_classes, H, W)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    row = MODELS[name]
    if isinstance(row, FCNRow):
        if output_stride is not None:
            raise ValueError(f"output_stride applies to the DGMN2 models, not to {name} (the dilated FCN's is 8)")
        if dgmn_options and not row.dgmn:
            raise ValueError(f"dgmn_options apply to {', '.join(DGMN_FCNS)}, not to {name}")
        make_context = functools.partial(row.make, **{**(row.dgmn or {}), **(dgmn_options or {})})
        return DilatedFCN(num_classes, make_context, row.out_channels, multi_grid)
    if multi_grid or dgmn_options:
        raise ValueError(f"multi_grid and dgmn_options apply to the dilated FCNs, not to {name}")
    fpn = row.head == "fpn"
    stride = output_stride or (FPN_OUTPUT_STRIDE if fpn else SETR_OUTPUT_STRIDE)
    if not fpn and stride != SETR_OUTPUT_STRIDE:
        raise ValueError(f"output_stride {stride}: the SETR heads take DGMN2 at output stride {SETR_OUTPUT_STRIDE} "
                         "(Section 6.3)")
    backbone = dgmn2.build(row.variant, num_classes=0, output_stride=stride)
    return SemanticFPN(backbone, num_classes) if fpn else SETR(backbone, row.head, num_classes)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained backbones

MESSAGE_WIDTH = 150  # characters of load_state_dict's list of misfits kept in the one-line error


def load_pretrained(model, state):
    """Backbone weights without the classifier into a model of build(): the release's DGMN2, ours (train_imagenet.py's
    checkpoint or a state dict), or torchvision's ResNet-101. state: the loaded file (dgmn2.load_checkpoint). A state
    that does not fit raises ValueError, naming the first tensor at fault."""
    backbone = model.backbone
    weights = state.get("model", state) if isinstance(state, dict) else {}  # a training script's, or bare
    if isinstance(backbone, dgmn2.DGMN2) and dgmn2.is_release(weights):
        dgmn2.load_official(backbone, weights)
        return
    try:
        backbone.load_state_dict({name: t for name, t in weights.items() if not name.startswith(("head.", "fc."))})
    except RuntimeError as error:  # missing, unexpected or misshapen tensors
        found = textwrap.shorten(str(error).splitlines()[1], MESSAGE_WIDTH)  # the first kind of misfit
        raise ValueError(f"does not fit the backbone of this model ({found})") from None


# ----------------------------------------------------------------------------------------------------------------
# Inference on whole images: sliding windows, scales and flips, as the release evaluates Cityscapes


def slide(model, image, classes, window, stride, batch=1, layout=torch.preserve_format):
    """Logits (1, classes, H, W) of a (1, 3, H, W) image: windows every stride pixels (the last flush with the border;
    cut to the image where it is smaller, unpadded, as mmseg's slide_inference), batch a forward (in memory layout),
    averaged where they overlap."""
    _, _, H, W = image.shape
    logits, count = image.new_zeros(1, classes, H, W), image.new_zeros(1, 1, H, W)
    corners = list(itertools.product(*[sorted({max(min(s, side - window), 0)
                                               for s in range(0, max(side - window, 0) + stride, stride)})
                                       for side in (H, W)]))  # (row, column) of each window, row by row
    for first in range(0, len(corners), batch):
        group = corners[first:first + batch]
        windows = torch.cat([image[..., r:r + window, c:c + window] for r, c in group])  # (n, 3, <= window, <= window)
        for (r, c), scores in zip(group, model(windows.to(memory_format=layout)).float()):
            logits[0, :, r:r + window, c:c + window] += scores
            count[..., r:r + window, c:c + window] += 1
    return logits / count


def predict(model, image, classes, window, stride, batch=1, layout=torch.preserve_format, scales=(1,), flip=False):
    """Class probabilities (1, classes, H, W) of a (1, 3, H, W) image: slide()'s logits at each of scales, and of
    the mirrored image too if flip, resized back as the model's head resizes, then their softmax, summed (mmseg's
    aug_test, which the release evaluates with)."""
    total, slid = 0, functools.partial(slide, model, classes=classes, window=window, stride=stride, batch=batch,
                                       layout=layout)
    for scale in scales:
        scaled = image if scale == 1 else F.interpolate(image, scale_factor=scale, mode="bilinear",
                                                        align_corners=False)
        for mirrored in [False, True][:1 + flip]:
            logits = slid(scaled.flip(-1) if mirrored else scaled)
            logits = logits.flip(-1) if mirrored else logits
            if scale != 1:
                logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear",
                                       align_corners=model.align_corners)
            total = total + logits.softmax(dim=1)
    return total


# ----------------------------------------------------------------------------------------------------------------
# python segmentation.py: Tables 2 and 11, the models' parameters and FLOPs beside the paper's

TABLE_SIDE = dgmn.CITYSCAPES_SIDE  # 97: the side of the 512-channel map of a 769 crop at stride 8
TABLE_11_SIDE = 769  # the training crop: the input side at which Table 11's FLOPs are reproduced
HEAD_LAYOUTS = dict(fpn=f"Semantic FPN (FPN {FPN_CHANNELS}, head {FPN_HEAD_CHANNELS} channels), DGMN2 at output "
                    f"stride {FPN_OUTPUT_STRIDE}",
                    naive=f"SETR-Naive: a 1x1 classifier on the stride-{SETR_OUTPUT_STRIDE} map, DGMN2 at output "
                    f"stride {SETR_OUTPUT_STRIDE}",
                    pup=f"SETR-PUP: {PUP_ROUNDS} x [3x3 conv {PUP_CHANNELS}, BN, ReLU, 2x up], a 1x1 classifier, "
                    f"2x up; DGMN2 at output stride {SETR_OUTPUT_STRIDE}",
                    mla=f"SETR-MLA: 2 x [3x3 conv {MLA_CHANNELS}, BN, ReLU] on each stage's map, resized to "
                    f"{MLA_SCALE}x the stride-{SETR_OUTPUT_STRIDE} map, concatenated, a 1x1 classifier; DGMN2 at "
                    f"output stride {SETR_OUTPUT_STRIDE}")
COUNTING = ("Multiply-adds (G): torch.utils.flop_counter.FlopCounterMode's count / 2 on the meta device, batch 1: "
            "convolutions and matrix products only (norms, activations, softmax, pooling and resizes are not "
            "counted); torchvision's deform_conv2d, which FlopCounterMode does not know, is counted as the "
            "convolution it generalises (deform_conv_flops, passed as its custom_mapping): the bilinear reads and "
            "the masks' products are not counted. The paper's FLOPs are multiply-adds (its DGMN rows are their "
            f"parameters x {TABLE_SIDE} x {TABLE_SIDE}).")


def fcn_added_cost(model, classes=NUM_CLASSES):
    """(parameters, multiply-adds) that an FCN's module adds to the dilated FCN on one (1, 512, 97, 97) map, the
    classifier's change of width included (the COUNTING rules), from the models built on the meta device."""
    counts = []
    for name in (model, "fcn"):
        with torch.device("meta"):
            fcn = build(name, classes).eval()
        head = nn.Sequential(fcn.context, fcn.classifier)
        with FlopCounterMode(display=False,
                             custom_mapping={torch.ops.torchvision.deform_conv2d: dgmn.deform_conv_flops}) as counter:
            head(torch.empty(1, FCN_CHANNELS, TABLE_SIDE, TABLE_SIDE, device="meta"))
        counts.append((sum(p.numel() for p in head.parameters()), counter.get_total_flops() // 2))
    return counts[0][0] - counts[1][0], counts[0][1] - counts[1][1]


def gaps(params, macs, row):
    """Ours vs the paper's row (its params_m and gflops, None where it gives none): "+0.1% / -0.2%"."""
    return " / ".join(f"{100 * (ours / (paper * scale) - 1):+.1f}%" if paper else "-"
                      for ours, paper, scale in ((params, row.params_m, 1e6), (macs, row.gflops, 1e9)))


def table_2():
    """Table 2 (Section 5.2): what each dilated FCN's module adds, beside the paper. -> (title, rows)."""
    rows = []
    for name, row in FCN_VARIANTS.items():
        if row.dgmn is None:
            (params, macs), counted = fcn_added_cost(name), row.layout
        else:
            cost = dgmn.added_cost(row.dgmn, FCN_CHANNELS, TABLE_SIDE)
            params, macs = cost["params"], cost["macs"]
            walks = f"; not its walk convs, +{cost['walk_params'] / 1e6:.3f}M / +{cost['walk_macs'] / 1e9:.2f}G" \
                if cost["walk_params"] else ""
            counted = f"{row.layout}: its transforms and predictors, as Table 2 counts them (dgmn.added_cost){walks}"
        rows.append([name, f"+{params / 1e6:.3f}M", f"+{row.params_m}M" if row.params_m else "-",
                     f"+{macs / 1e9:.2f}G", f"+{row.gflops}G" if row.gflops else "-", gaps(params, macs, row),
                     row.miou, counted])
    return (f"Table 2: added to the dilated FCN ResNet-101 on its {TABLE_SIDE} x {TABLE_SIDE} x {FCN_CHANNELS} map "
            f"(a 769 crop at stride 8), {NUM_CLASSES} classes; mIoU: the paper's, Cityscapes val"), rows


def dgmn2_cost(model, side=TABLE_11_SIDE, classes=NUM_CLASSES):
    """(parameters, multiply-adds) of a DGMN2 model of Table 11 on one (1, 3, side, side) image, built on the meta
    device: the COUNTING rules plus the sampler's bilinear reads, as dgmn2.model_macs counts them."""
    with torch.device("meta"):
        net = build(model, classes).eval()  # batch 1: BN's running stats
    macs, _ = dgmn2.model_macs(net, (1, 3, side, side))
    return sum(p.numel() for p in net.parameters()), macs


def table_11():
    """Table 11 (Section 6.3): the DGMN2 models, parameters and FLOPs beside the paper's, with its mIoU. -> (title,
    rows)."""
    rows = []
    for name, row in DGMN2_MODELS.items():
        params, macs = dgmn2_cost(name)
        rows.append([name, f"{params / 1e6:.3f}M", f"{row.params_m}M", f"{macs / 1e9:.2f}G", f"{row.gflops}G",
                     gaps(params, macs, row), f"{row.miou:.2f} / {row.miou_ms:.2f}", HEAD_LAYOUTS[row.head]])
    return (f"Table 11: DGMN2 on Cityscapes, whole models on one {TABLE_11_SIDE} x {TABLE_11_SIDE} image (the "
            "training crop and evaluation window: the input side that reproduces the paper's FLOPs; 768 x 768 gives "
            f"2-3% fewer, 512 x 1024 13-14% fewer, 1024 x 1024 72-74% more), {NUM_CLASSES} classes; counted as above "
            "plus DGMN2's bilinear reads of the sampled keys and values, 4 multiply-adds per sampled element and "
            "channel (dgmn2.model_macs' rule; without them every row is 0.3-1.4% under the paper's); mIoU: the "
            "paper's, Cityscapes val, single scale / multi-scale"), rows


TABLES = [table_2, table_11]  # each: () -> (title, rows of TABLE_COLUMNS)
TABLE_COLUMNS = ["model", "params", "paper", "multiply-adds", "paper", "ours vs paper (params / FLOPs)",
                 "mIoU paper", "layout, and what is counted"]


def print_tables():
    """python segmentation.py (and train_cityscapes.py --table): the counting rules, then each of TABLES as a
    Markdown table."""
    print(COUNTING)
    for title, rows in (table() for table in TABLES):
        print(f"\n{title}\n\n| {' | '.join(TABLE_COLUMNS)} |\n|{'---|' * len(TABLE_COLUMNS)}")
        for row in rows:
            print(f"| {' | '.join(map(str, row))} |")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Tables 2 and 11: every Cityscapes model's parameters and "
                                                 "FLOPs beside the paper's.")
    parser.parse_args()  # only --help
    print_tables()
