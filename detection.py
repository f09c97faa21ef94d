"""Every COCO model: DGMN2 + FPN under torchvision's RetinaNet and Mask R-CNN (Section 6.2, Tables 7, 8), and Mask R-CNN
with a ResNet-50 / ResNet-101 / ResNeXt-101-FPN backbone that takes DGMN modules (Sections 5.1-5.3, Tables 3, 5, 15,
16) or one of the modules DGMN is compared with in Table 3 (deformable message passing, GCNet's global context block,
the non-local block, criss-cross attention, DCNv2), each placed as the paper places it; Deformable DETR
(deformable_detr.py) and Sparse R-CNN (sparse_rcnn.py) on DGMN2 or ResNet-50 (Section 6.2, Tables 9, 10). Also the
parameters and FLOPs as the paper counts them, beside its numbers.

Symbols, used throughout: B batch, C channels, H x W a map (or an image), s a map's stride and C_s its channels,
N detections of an image.

    python detection.py         every model's parameters and FLOPs beside the paper's (Tables 3, 5, 7-10, 16)

    model = detection.build("maskrcnn-r50-dgmn-c5", num_classes=91, pretrained=True)
    detection.load_pretrained(model, torch.load("resnet50.pth"))   # torchvision's ImageNet ResNet-50

The training recipe, the data and the evaluation are train_coco.py's.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torchvision
from torch.utils._pytree import tree_map_only
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.transforms import v2

try:  # inside a package: the model files copied into a project
    from . import deformable_detr, dgmn, dgmn2, sampler, sparse_rcnn
except ImportError:  # at the top level of this repository
    import deformable_detr
    import dgmn
    import dgmn2
    import sampler
    import sparse_rcnn

DGMN_GROUPS = 4  # Section 5.1: G = 4 filter groups
DETECTIONS_PER_IMAGE = 100  # RetinaNet's detections a picture (mmdetection's max_per_img; torchvision's Mask R-CNN's)
# Mask R-CNN's RPN proposals an image in training: the DGMN2 release's (mmdetection's max_num) and, on average, the DGMN
# release's (maskrcnn-benchmark's 2000 for the batch of 2 images a GPU); torchvision's default is 2000 an image
TRAINING_PROPOSALS = 1000

# ----------------------------------------------------------------------------------------------------------------
# The modules of Table 3 and where they go in a ResNet


def dgmn_module(channels, rates, groups):
    """Section 5.1's DGMN in the release's layout. groups 0 (Table 15's G = 0): no dynamic weights, the affinities
    alone weigh the nodes, alike in every channel (one group). (B, C, H, W) -> (B, C, H, W)."""
    if groups < 0 or groups and channels % groups:
        raise ValueError(f"dgmn_groups {groups} must be 0 (no dynamic weights) or divide the {channels} channels of "
                         "a DGMN module")
    return dgmn.DGMN(channels, rates, groups or 1, dynamic_weights=groups > 0, channel_transforms=False,
                     nonlinearity=False)  # the release's: no sigma (after a 3x3 conv, a BN-ReLU follows)


# The modules of Table 3: make(channels, rates, groups) -> a module x -> x + context; "dcn": make(the replaced conv)
MODULES = {"dgmn": dgmn_module, "dmp": lambda channels, *_: dgmn.deformable_message_passing(channels),
           "gcnet": lambda channels, *_: dgmn.GlobalContext(channels),
           "nonlocal": lambda channels, *_: dgmn.NonLocal(channels),
           "ccnet": lambda channels, *_: dgmn.CrissCrossAttention(channels, recurrence=2),
           "dcn": lambda conv, *_: dgmn.ModulatedDeformConv.replacing(conv)}


def before_the_last_block(resnet, stages, make):
    """make(the stage's output channels) right before each stage's last residual block. Returns the ResNet."""
    for stage in stages:
        dgmn.before_last_block(resnet, stage, make(dgmn.resnet_stage(resnet, stage)[-1].conv3.out_channels))
    return resnet


def instead_of_every_3x3(resnet, stages, make):
    """Every 3x3 convolution of the stages replaced by make(that convolution). Returns the ResNet."""
    for stage in stages:
        for block in dgmn.resnet_stage(resnet, stage):
            for name, conv in list(block.named_children()):
                if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                    setattr(block, name, make(conv))
    return resnet


PLACEMENTS = {"after every 3x3": dgmn.after_every_3x3, "before the last block": before_the_last_block,
              "instead of every 3x3": instead_of_every_3x3}
INSERTED = (".context.", ".offset_mask.")  # the state-dict keys that the modules add to a torchvision ResNet

# ----------------------------------------------------------------------------------------------------------------
# The backbones: DGMN2 + FPN (Section 6.2), a ResNet / ResNeXt + FPN with its modules (Section 5.1)

RESNETS = {"resnet50": "ResNet-50", "resnet101": "ResNet-101", "resnext101_32x8d": "ResNeXt-101 32x8d",
           "resnext101_64x4d": "ResNeXt-101 64x4d"}  # torchvision's names, and how the error messages name them
# The release's FPN necks on DGMN2's stage maps (levels 0-3: strides 4-32): (levels taken, the levels added)
NECKS = dict(retinanet=((1, 2, 3), "p6p7"), maskrcnn=((0, 1, 2, 3), "pool"))


class DGMN2FPN(nn.Module):
    """DGMN2's stage maps at levels (0-3: strides 4-32) into an FPN: RetinaNet's levels 1-3 with P6, P7 from C5
    ("p6p7"), Mask R-CNN's 0-3 with a max-pooled P6 ("pool").
    (B, 3, H, W) -> dict of (B, 256, H / s, W / s), finest first."""

    def __init__(self, variant, levels, extra_levels, out_channels=256):
        super().__init__()
        self.body, self.levels, self.out_channels = dgmn2.build(variant, num_classes=0), levels, out_channels
        extra = LastLevelP6P7(self.body.channels[-1], out_channels) if extra_levels == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([self.body.channels[i] for i in levels], out_channels, extra)

    def forward(self, images):
        maps = self.body.forward_features(images)
        return self.fpn({str(n): maps[level] for n, level in enumerate(self.levels)})


class DGMN2Stages(nn.Module):
    """DGMN2's stage maps at levels (0-3: strides 4-32) as they are, no FPN, nothing frozen: Deformable DETR's stages
    2-4 (the release's), Sparse R-CNN's 1-4. (B, 3, H, W) -> [(B, C_s, H / s, W / s)]."""

    def __init__(self, variant, levels=(1, 2, 3)):
        super().__init__()
        self.body, self.levels = dgmn2.build(variant, num_classes=0), levels
        self.channels, self.strides = [self.body.channels[i] for i in levels], [4 * 2 ** i for i in levels]

    def forward(self, images):
        maps = self.body.forward_features(images)
        return [maps[i] for i in self.levels]


class ResNetStages(nn.Module):
    """A ResNet's layers (1-4: strides 4-32) as they are, with FrozenBatchNorm2d, the stem and layer 1 frozen
    (upstream's Deformable DETR: layers 2-4; Sparse R-CNN: 1-4). (B, 3, H, W) -> [(B, C_s, H / s, W / s)]."""

    def __init__(self, name, layers=(2, 3, 4)):
        super().__init__()
        self.body = getattr(torchvision.models, name)(norm_layer=FrozenBatchNorm2d)
        self.body.fc, self.body.name = nn.Identity(), RESNETS[name]  # no classifier; load_pretrained's errors
        for module in (self.body.conv1, self.body.layer1):
            module.requires_grad_(False)
        self.layers = layers
        self.channels = [getattr(self.body, f"layer{i}")[-1].conv3.out_channels for i in layers]
        self.strides = [2 ** (i + 1) for i in layers]

    def forward(self, images):
        body = self.body
        x, maps = body.maxpool(body.relu(body.bn1(body.conv1(images)))), []
        for i in range(1, max(self.layers) + 1):
            x = getattr(body, f"layer{i}")(x)
            if i in self.layers:
                maps.append(x)
        return maps


def resnet_backbone(spec, pretrained, rates, groups):
    """spec's torchvision ResNet / ResNeXt + FPN with its modules (DGMN's at these rates and groups). Pretrained:
    frozen BN, stem, res2 as Detectron's 1x (else all trains, with BN).
    (B, 3, H, W) -> dict of (B, 256, H / s, W / s), s = 4 ... 64, finest first."""
    backbone = resnet_fpn_backbone(backbone_name=spec.backbone, weights=None, trainable_layers=3 if pretrained else 5,
                                   norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d)
    if spec.module:  # the placement gives the maker the channels (DCN: the conv), the caller the options
        make = MODULES[spec.module]
        PLACEMENTS[spec.placement](backbone.body, spec.stages, lambda where: make(where, rates, groups))
    backbone.body.name = RESNETS[spec.backbone]  # for load_pretrained's errors
    return backbone


# ----------------------------------------------------------------------------------------------------------------
# The models, beside the paper's numbers


@dataclass(frozen=True)
class Detector:
    """A detector, its backbone and the modules in it, beside the paper's numbers (None where the paper gives none)."""
    detector: str                    # "retinanet", "maskrcnn", "deformable-detr" (or -plus) or "sparse-rcnn"
    backbone: str                    # a DGMN2 variant, or a torchvision ResNet / ResNeXt of RESNETS
    box_ap: float                    # the paper's COCO box AP (val unless the table says test-dev)
    mask_ap: float | None            # the paper's COCO mask AP
    table: str                       # where the paper gives these numbers
    module: str | None = None        # MODULES' module that the ResNet takes
    stages: tuple = ()               # the ResNet stages that take it ("C4": res4, "C5": res5)
    placement: str = "after every 3x3"  # PLACEMENTS' way of putting it there
    params_m: float | None = None    # the paper's parameter count (M, 80 classes)
    gflops: float | None = None      # the paper's FLOPs (G, multiply-adds at 800 x 1333)


R50, R101, X101 = (functools.partial(Detector, "maskrcnn", name)
                   for name in ("resnet50", "resnet101", "resnext101_32x8d"))
C4_ONCE = dict(stages=("C4",), placement="before the last block")  # Table 3's single module, where Wang et al. put it
MODELS = {
    **{f"retinanet-dgmn2-{v}": Detector("retinanet", v, ap, None, "Table 7", params_m=p, gflops=g) for v, p, g, ap in [
        ("tiny", 21.8, 206.8, 39.7), ("small", 30.7, 248.2, 42.5), ("medium", 45.6, 312.0, 43.7),
        ("large", 57.9, 382.1, 44.7)]},
    **{f"maskrcnn-dgmn2-{v}": Detector("maskrcnn", v, box, mask, "Table 8", params_m=p, gflops=g)
       for v, p, g, box, mask in [("tiny", 31.8, 223.0, 40.1, 37.2), ("small", 40.6, 264.5, 43.4, 39.7),
                                  ("medium", 55.5, 328.2, 44.4, 40.2), ("large", 67.9, 398.4, 46.2, 41.6)]},
    "maskrcnn-r50": R50(37.8, 34.4, "Table 3; Table 8's count", params_m=44.2, gflops=269.8),
    "maskrcnn-r50-gcnet": R50(38.1, 34.9, "Table 3", "gcnet", **C4_ONCE),
    "maskrcnn-r50-dmp": R50(38.7, 35.0, "Table 3", "dmp", **C4_ONCE),
    "maskrcnn-r50-nonlocal": R50(39.0, 35.5, "Table 3", "nonlocal", **C4_ONCE),
    "maskrcnn-r50-ccnet": R50(39.3, 36.1, "Table 3", "ccnet", **C4_ONCE),
    "maskrcnn-r50-dgmn": R50(39.5, 35.7, "Table 3", "dgmn", **C4_ONCE),
    "maskrcnn-r50-gcnet-c5": R50(38.7, 35.2, "Table 3", "gcnet", ("C5",)),
    "maskrcnn-r50-dcn-c5": R50(39.9, 34.9, "Table 3", "dcn", ("C5",), "instead of every 3x3"),
    "maskrcnn-r50-dgmn-c5": R50(40.2, 36.0, "Tables 3, 15", "dgmn", ("C5",)),
    "maskrcnn-r50-dgmn-c4c5": R50(41.0, 36.8, "Table 5 (test-dev); Section 5.3's count", "dgmn", ("C4", "C5"),
                                  params_m=51.1, gflops=297.1),
    "maskrcnn-r101": R101(40.1, 36.2, "Table 16; Section 5.3's count (Table 8's: 63.2M, 349.7G)", params_m=63.1,
                          gflops=354.0),
    "maskrcnn-r101-dgmn-c5": R101(41.7, 37.4, "Table 16", "dgmn", ("C5",)),
    # Tables 5, 16: the release's X-101-32x8d (its config; the baseline's 42.2 / 37.8 are maskrcnn-benchmark's)
    "maskrcnn-x101": X101(42.2, 37.8, "Table 16"),
    "maskrcnn-x101-dgmn-c5": X101(43.7, 38.7, "Table 16", "dgmn", ("C5",)),
    "maskrcnn-x101-64x4d": Detector("maskrcnn", "resnext101_64x4d", 42.8, 38.4, "Table 8", params_m=101.9,
                                    gflops=514.7),  # the DGMN2 comparison's ResNeXt (mmdetection's)
    # Table 9: Deformable DETR ("plus": iterative box refinement and two-stage); the R-50 rows' AP is the fixed
    # upstream's (ResNet-50*; the first release's: 43.8 and 46.2)
    **{f"deformable-detr-{v}": Detector("deformable-detr", b, ap, None, "Table 9", params_m=p, gflops=g)
       for v, b, p, g, ap in [("r50", "resnet50", 39.9, 206.7, 44.5), ("dgmn2-tiny", "tiny", 24.0, 163.6, 44.4),
                              ("dgmn2-small", "small", 32.9, 205.1, 47.3),
                              ("dgmn2-medium", "medium", 47.7, 268.9, 48.4)]},
    **{f"deformable-detr-plus-{v}": Detector("deformable-detr-plus", b, ap, None, "Table 9", params_m=p, gflops=g)
       for v, b, p, g, ap in [("r50", "resnet50", 41.0, 215.9, 46.9), ("dgmn2-small", "small", 34.0, 214.3, 48.5)]},
    # Table 10: Sparse R-CNN, 300 proposals
    "sparse-rcnn-r50": Detector("sparse-rcnn", "resnet50", 45.0, None, "Table 10", params_m=106.1, gflops=112.82),
    "sparse-rcnn-dgmn2-small": Detector("sparse-rcnn", "small", 48.2, None, "Table 10", params_m=102.6, gflops=114.86),
}
DETR_FAMILY = ("deformable-detr", "deformable-detr-plus")
SET_PREDICTION = (*DETR_FAMILY, "sparse-rcnn")  # trained by matching.py's loss, upstream's augmentation


def augmentation(name, min_size=800):
    """The training augmentation of MODELS[name]'s recipe, a v2 transform of (image, target) before the detector's own
    resize: Deformable DETR's and Sparse R-CNN's (upstream's both, scaled to min_size), else a horizontal flip."""
    if MODELS[name].detector in SET_PREDICTION:
        return deformable_detr.augmentation(min_size)
    return v2.RandomHorizontalFlip()


def float32_output(module, inputs, output):
    """A forward hook: the module's output tensors (in dicts, lists, tuples) in float32 (see build)."""
    return tree_map_only(torch.Tensor, torch.Tensor.float, output)


def build(name, num_classes, *, min_size=800, max_size=1333, rois=512, queries=deformable_detr.QUERIES,
          pretrained=False, dgmn_rates=dgmn.COCO_RATES, dgmn_groups=DGMN_GROUPS):
    """The detector of MODELS[name]: num_classes with the background (COCO: 91 ids, 0 the background), images resized
    to min_size on the shorter side, at most max_size on the longer; Mask R-CNN's box and mask heads learn from rois
    regions an image, Deformable DETR's decoder from `queries` queries, Sparse R-CNN's heads from as many proposals.
    pretrained: a ResNet built to start from ImageNet weights (load_pretrained) freezes its BN, stem and res2 as
    Detectron's 1x; DGMN2 trains whole either way (Deformable DETR's and Sparse R-CNN's ResNet is frozen as
    upstream's, its stem, layer 1 and BN, either way). dgmn_rates, dgmn_groups: the DGMN modules' (Table 15).
    Training: (list of B float (3, H, W) images in [0, 1], list of B targets: boxes (N, 4) xyxy, labels (N,)
    [, masks (N, H, W)]) -> dict of losses. Evaluation: images -> list of B dicts: boxes (N, 4), labels (N,),
    scores (N,) [, masks (N, 1, H, W)]."""
    if name not in MODELS:
        raise ValueError(f"unknown COCO model {name!r}: choose one of {', '.join(MODELS)}")
    spec, sizes = MODELS[name], dict(min_size=min_size, max_size=max_size)
    if spec.detector in DETR_FAMILY:  # its boxes and logits leave in float32 whatever the autocast
        backbone = ResNetStages(spec.backbone) if spec.backbone in RESNETS else DGMN2Stages(spec.backbone)
        plus = spec.detector == "deformable-detr-plus"
        return deformable_detr.DeformableDETR(backbone, num_classes, box_refine=plus, two_stage=plus,
                                              queries=queries, **sizes)
    if spec.detector == "sparse-rcnn":  # every stage into its FPN; boxes and logits in float32 too
        backbone = ResNetStages(spec.backbone, (1, 2, 3, 4)) if spec.backbone in RESNETS else \
            DGMN2Stages(spec.backbone, (0, 1, 2, 3))
        return sparse_rcnn.SparseRCNN(backbone, num_classes, proposals=queries, **sizes)
    if spec.backbone in RESNETS:
        backbone = resnet_backbone(spec, pretrained, dgmn_rates, dgmn_groups)
    else:
        backbone = DGMN2FPN(spec.backbone, *NECKS[spec.detector])
    # torchvision's heads, whose Detectron rules the DGMN release (maskrcnn-benchmark) shares; the DGMN2 release's
    # mmdetection 2.x differs in small ways, left as torchvision has them: smooth L1 (beta 1/9) box losses for its L1,
    # RoIAlign unaligned with 2 samples a bin for aligned with adaptive ones, soft mask targets, a ReLU before P7.
    # Where an argument reaches the releases' value, it is set: RPN proposals in training.
    if spec.detector == "retinanet":
        model = RetinaNet(backbone, num_classes, detections_per_img=DETECTIONS_PER_IMAGE, **sizes)
        predictors = [model.head]
    else:
        model = MaskRCNN(backbone, num_classes, box_batch_size_per_image=rois,
                         rpn_post_nms_top_n_train=TRAINING_PROPOSALS, **sizes)
        predictors = [model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
    # Under bf16, anchors take the features' dtype and boxes decode in the regression's: a 4 px grid at 800 px. Float32
    # features and predictions keep anchors, proposals and detections float32; the layers still run in bf16.
    for module in [backbone, *predictors]:
        module.register_forward_hook(float32_output)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Pictures of the detections


PALETTE = [tuple(c) for c in torch.randint(64, 256, (256, 3), generator=torch.Generator().manual_seed(0)).tolist()]


def draw(image, output, names, threshold=0.5):
    """uint8 (3, H, W) image with the detections (a detector's output for it, on any device) scoring at least
    threshold: masks, boxes, names (names: {label: name}) and scores."""
    output = {k: v.cpu() for k, v in output.items()}
    keep = output["scores"] >= threshold
    if not keep.any():
        return image
    labels = output["labels"][keep].tolist()
    colours = [PALETTE[c % len(PALETTE)] for c in labels]
    if "masks" in output:
        image = torchvision.utils.draw_segmentation_masks(image, output["masks"][keep, 0] > 0.5, alpha=0.5,
                                                          colors=colours)
    captions = [f"{names.get(c, c)} {s:.2f}" for c, s in zip(labels, output["scores"][keep].tolist())]
    return torchvision.utils.draw_bounding_boxes(image, output["boxes"][keep], captions, colors=colours, width=2)


# ----------------------------------------------------------------------------------------------------------------
# Pretrained backbones


def load_pretrained(model, state):
    """Backbone weights without the classifier into a detector of build(): the release's DGMN2, ours
    (train_imagenet.py's checkpoint or a state dict), torchvision's ResNet or ResNeXt (all but the inserted modules:
    INSERTED). state: the loaded file. A state that does not fit raises ValueError, naming the first tensor at fault."""
    body = model.backbone.body
    weights = state.get("model", state) if isinstance(state, dict) else {}  # a training script's, or bare
    if isinstance(body, dgmn2.DGMN2) and dgmn2.is_release(weights):
        return dgmn2.load_official(body, weights)
    try:
        missing, unexpected = body.load_state_dict({k: v for k, v in weights.items() if k.split(".")[0] not in (
            "head", "fc")}, strict=False)
    except RuntimeError as error:  # a tensor of another shape
        missing, unexpected = [str(error).splitlines()[-1].strip()], []
    misfit = [k for k in missing if not any(key in k for key in INSERTED)] + unexpected
    if misfit:
        kind = "another DGMN2 variant, or not a DGMN2's weights" if isinstance(body, dgmn2.DGMN2) else \
            f"not a torchvision {body.name} state dict"
        raise ValueError(f"{kind} ({misfit[0]})")


# ----------------------------------------------------------------------------------------------------------------
# Parameters and FLOPs as the paper counts them: python detection.py

PAPER_CLASSES = 80  # the paper's heads score COCO's 80 classes (Mask R-CNN's also the background); ours its 91 ids
DETR_CLASSES = 91  # Deformable DETR's (upstream's) score COCO's 91 ids
FLOPS_IMAGE = (800, 1333)  # Section 6.2: FLOPs at an 800 x 1333 input
SPARSE_IMAGE = (800, 1344)  # that input padded to a multiple of 32, as Sparse R-CNN runs it
STAGES, PROPOSALS, POOL = sparse_rcnn.STAGES, sparse_rcnn.PROPOSALS, sparse_rcnn.POOL
EXTRA_CLASS_PARAMS = STAGES * (DETR_CLASSES - PAPER_CLASSES) * (sparse_rcnn.HIDDEN + 1)  # a class: its weights, bias
BOX_ROIS, MASK_ROIS = 1000, 100  # mmdetection's dummy forward: the box head on 1000 proposals, the mask head on 100
COUNTING = f"""Counted on the meta device (nothing is computed), as mmcv's get_model_complexity_info counts mmdetection:
- parameters: those that train from pretrained weights (frozen BN holds buffers; the frozen stem and res2 are left
  out), the heads at the paper's {PAPER_CLASSES} classes (Mask R-CNN: + the background);
- FLOPs: multiply-adds (FlopCounterMode's FLOPs / 2), an {FLOPS_IMAGE[0]} x {FLOPS_IMAGE[1]} image through the backbone,
  the FPN and the RPN or RetinaNet head on every level, and for Mask R-CNN the box head on {BOX_ROIS} RoIs and the
  mask head on {MASK_ROIS} (mmdetection's forward_dummy; RoIAlign, NMS and post-processing are not run): convolutions
  (DCN's as a plain conv's), linear layers, matmuls and attention, DGMN's sampler products; not BN, activations,
  softmax, pooling or the bilinear reads;
- Deformable DETR (Table 9): its trainable parameters, the heads at upstream's {DETR_CLASSES} classes; FLOPs: the
  backbone, input projections, encoder, decoder and heads (two-stage: the proposals' scoring) on the image, plus
  the bilinear reads the paper's counts hold (Table 9's base rows land within 1% with them, 1.3-1.7% under without):
  DGMN2's, 4 multiply-adds a sampled element and channel, and the deformable attention's, 5 (4 neighbours and the
  attention weight). The "+" rows' paper FLOPs add 9.2G to the base rows' for ResNet-50 and DGMN2-Small alike, where
  ours add 5.2G (the proposals' scoring on every token and the decoder's box MLPs): the rest is not recovered;
- Sparse R-CNN (Table 10): its trainable parameters, the heads at upstream's {PAPER_CLASSES} classes (train_coco.py
  gives it COCO's {DETR_CLASSES} ids: {EXTRA_CLASS_PARAMS:,} parameters more); FLOPs: the backbone and the FPN on the
  image padded to {SPARSE_IMAGE[0]} x {SPARSE_IMAGE[1]} (a multiple of 32, as the detector pads it), the {STAGES} heads
  on {PROPOSALS} proposals (RoIAlign not run), DGMN2's bilinear reads as above. No convention we tried gives the
  paper's 112.82G and 114.86G (ours are about 1.5 times them): compare the two rows' ratio, printed below the table.
Gaps: ours / the paper's - 1."""


def macs_with_reads(run):
    """The multiply-adds of run() as COUNTING says for the set-prediction detectors: the matrix products (DGMN2's
    sampler products among them), DGMN2's bilinear reads (4 a sampled element and channel, as dgmn2.model_macs) and
    the deformable attention's reads (deformable_detr.SAMPLING_MACS a sampled element and channel)."""
    readings = {torch.ops.aten.grid_sampler_2d: deformable_detr.sampling_flops}
    with sampler.backend("kernel"), FlopCounterMode(display=False, custom_mapping=readings) as counter:
        run()
    return counter.get_total_flops() // 2 + 4 * sampler.sampled_multiply_adds(counter.get_flop_counts()["Global"])


def sparse_rcnn_heads(model, image):
    """Sparse R-CNN on one padded image as COUNTING counts it: the backbone and FPN, then each head on RoI features
    that RoIAlign would give (its reads are not counted; on the meta device it cannot choose the boxes' levels)."""
    model.fpn(model.backbone(image), torch.zeros(1, *image.shape[-2:], dtype=torch.bool))
    boxes, features = model.start([image.shape[-2:]], image.device)
    for head in model.heads:
        _, boxes, features = head(torch.empty(boxes.shape[1], features.shape[2], POOL, POOL), boxes, features)


def paper_classes(name):
    """The classes (the background among them) of the heads the paper's parameter count of MODELS[name] holds."""
    spec = MODELS[name]
    return DETR_CLASSES if spec.detector in DETR_FAMILY else PAPER_CLASSES + (spec.detector == "maskrcnn")


def cost(name):
    """(parameters, multiply-adds) of the model as COUNTING says."""
    spec = MODELS[name]
    with torch.device("meta"):
        model = build(name, paper_classes(name), pretrained=True)
        image = torch.empty(1, 3, *FLOPS_IMAGE)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if spec.detector == "sparse-rcnn":
            return trainable, macs_with_reads(lambda: sparse_rcnn_heads(model, torch.empty(1, 3, *SPARSE_IMAGE)))
        if spec.detector in DETR_FAMILY:
            padding = torch.zeros(1, *FLOPS_IMAGE, dtype=torch.bool)
            return trainable, macs_with_reads(lambda: model.eval().predict(image, padding))
        dcn_flops = {torch.ops.torchvision.deform_conv2d: dgmn.deform_conv_flops}  # as the conv it generalises
        # the sampler's kernel ops count the products the reference's einsums count; on meta only their shapes are
        # computed, which takes a third of the time the reference's many small ops take
        with sampler.backend("kernel"), FlopCounterMode(display=False, custom_mapping=dcn_flops) as counter:
            features = list(model.backbone(image).values())
            if spec.detector == "retinanet":
                model.head(features)
            else:
                heads, channels = model.roi_heads, model.backbone.out_channels
                model.rpn.head(features)
                heads.box_predictor(heads.box_head(torch.empty(BOX_ROIS, channels, *heads.box_roi_pool.output_size)))
                heads.mask_predictor(heads.mask_head(torch.empty(MASK_ROIS, channels,
                                                                 *heads.mask_roi_pool.output_size)))
    return trainable, counter.get_total_flops() // 2


def print_table():
    """Every model's parameters and FLOPs beside the paper's (Tables 3, 5, 7-10, 16, Section 5.3), and Table 10's
    ratio of FLOPs."""
    print(COUNTING + "\n")
    print("| model | params (M) | paper | gap | GFLOPs | paper | gap | box AP paper | mask AP paper | source |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    macs = {}
    for name, spec in MODELS.items():
        params, macs[name] = cost(name)
        columns = [f"{ours:.1f} | {paper or '-'} | {f'{100 * (ours / paper - 1):+.1f}%' if paper else '-'}"
                   for ours, paper in [(params / 1e6, spec.params_m), (macs[name] / 1e9, spec.gflops)]]
        print(f"| {name} | {' | '.join(columns)} | {spec.box_ap} | {spec.mask_ap or '-'} | {spec.table} |", flush=True)
    small, r50 = "sparse-rcnn-dgmn2-small", "sparse-rcnn-r50"
    print(f"\nTable 10's FLOPs, DGMN2-Small / ResNet-50: ours {macs[small] / macs[r50]:.3f}, the paper's "
          f"{MODELS[small].gflops / MODELS[r50].gflops:.3f}")


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Tables 3, 5, 7-10 and 16: every COCO model's parameters and "
                                                 "FLOPs beside the paper's.")
    parser.parse_args()  # only --help
    print_table()
