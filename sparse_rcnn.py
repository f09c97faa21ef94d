"""Sparse R-CNN (Sun et al., CVPR 2021) on any multi-scale backbone: the detector of Table 10 (Section 6.2). Read beside
Sparse R-CNN's paper: the feature pyramid, the learnable proposal boxes and features (its Sec. 3.2), RoI features,
the dynamic instance interaction (Sec. 3.3, its Fig. 4), the iterative heads (Sec. 3.4), then the detector with
torchvision's interface. Its loss is matching.py's, Deformable DETR's, with L1 on the boxes' corners.

Symbols, used throughout: B images, C the width (256), H_l x W_l level l's map and C_l its channels, P proposals an
image (300), R = B P RoIs of a batch, S x S a RoI's feature grid (7 x 7), E the dynamic filters' width (64), K classes
(sigmoid channels, no background: the paper's 80 COCO classes, or COCO's 91 ids as train_coco.py gives them), T target
boxes of an image. Boxes are (x1, y1, x2, y2) in the resized image's pixels.

    model = SparseRCNN(backbone, num_classes=80)   # backbone(images) -> maps at strides 4 ... 32; .channels, .strides
    losses = model(images, targets)                # training: a dict of losses (matching.set_losses)
    detections = model(images)                     # evaluation: [{"boxes", "scores", "labels"}] in pixels
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_area, box_convert, clip_boxes_to_image, roi_align

try:  # inside a package: the model files copied into a project
    from . import matching
except ImportError:  # at the top level of this repository
    import matching

HIDDEN, HEADS, STAGES = 256, 8, 6  # C, the proposals' attention heads, the iterative heads
PROPOSALS = 300  # P; an image keeps P detections too, upstream's (COCO scores each class's best 100)
POOL, SAMPLING_RATIO = 7, 2  # S; RoIAlign's bilinear samples a bin side
DYNAMIC, FFN = 64, 2048  # E; the feed-forward width (upstream's dropout is 0: none here)
CLASS_LAYERS, BOX_LAYERS = 1, 3  # Linear + LayerNorm + ReLU layers before the class and box outputs
DELTA_WEIGHTS = (2.0, 2.0, 1.0, 1.0)  # the box deltas' (dx, dy, dw, dh) come scaled by these
SCALE_CLAMP = math.log(100000.0 / 16)  # a box grows at most by e^this a head (detectron2's clamp)
CANONICAL_SIDE, CANONICAL_LEVEL = 224, 4  # FPN's rule: a 224 px box pools from P4 (stride 2^4)
PRIOR = 0.01  # the class logits start at the probability of a rare class (focal loss's prior)
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRAIN_SIDES = tuple(range(480, 801, 32))  # upstream's shorter sides at 800: one at random a training image

# ----------------------------------------------------------------------------------------------------------------
# The feature pyramid


def inside_of(padding, x):
    """Where map x lies on the image: padding (B, H, W) True outside it, x (B, C, h, w) -> (B, 1, h, w) float, 1
    inside (nearest: a cell is inside when its top-left pixel is)."""
    return 1 - F.interpolate(padding[:, None].to(x.dtype), size=x.shape[-2:])


class FPN(nn.Module):
    """The feature pyramid (Lin et al.): a 1x1 lateral conv a level, each coarser sum added to the next finer level
    (nearest, x2), a 3x3 conv a level; C channels. Upstream's (detectron2's) less its P6, a max-pool of P5 that no
    head reads. The padding reads as zeros at every step, so that an image's pyramid does not change with the images
    it is batched with (torchvision's FeaturePyramidNetwork has these convs, but no place for the masks).
    maps [(B, C_l, H_l, W_l)], padding (B, H, W) True outside the image -> [(B, C, H_l, W_l)], finest first."""

    def __init__(self, channels, dim=HIDDEN):
        super().__init__()
        self.laterals = nn.ModuleList(nn.Conv2d(c, dim, 1) for c in channels)
        self.outputs = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in channels)
        for conv in [*self.laterals, *self.outputs]:  # detectron2's c2_xavier_fill
            nn.init.kaiming_uniform_(conv.weight, a=1)
            nn.init.zeros_(conv.bias)

    def forward(self, maps, padding):
        insides = [inside_of(padding, x) for x in maps]
        summed = [None] * len(maps)
        for level in reversed(range(len(maps))):  # coarsest first
            x = self.laterals[level](maps[level])  # 1x1: the padding reaches no pixel of the image
            if level + 1 < len(maps):
                x = x + F.interpolate(summed[level + 1], size=x.shape[-2:], mode="nearest")
            summed[level] = x * insides[level]
        return [conv(x) * inside for conv, x, inside in zip(self.outputs, summed, insides)]


# ----------------------------------------------------------------------------------------------------------------
# RoI features


def roi_levels(boxes, first, last):
    """FPN's level rule (its Eq. 1, detectron2's form): a box of side sqrt(w h) pools from level
    floor(CANONICAL_LEVEL + log2(side / CANONICAL_SIDE)), clamped to levels first ... last (stride 2^level).
    boxes (R, 4) -> (R,) int64, the level less first."""
    side = box_area(boxes).clamp(min=0).sqrt()
    level = torch.floor(CANONICAL_LEVEL + torch.log2(side / CANONICAL_SIDE + 1e-8))
    return (level.clamp(first, last) - first).long()


def roi_features(maps, strides, boxes, pool=POOL):
    """Each box's S x S features from its level: RoIAlign with half-pixel alignment (aligned=True, detectron2's
    ROIAlignV2), SAMPLING_RATIO^2 bilinear samples a bin, in float32. maps [(B, C, H_l, W_l)] at strides (powers of 2),
    boxes (B, P, 4) -> (B P, C, S, S)."""
    B, P, _ = boxes.shape
    images = torch.arange(B, device=boxes.device).repeat_interleave(P)
    rois = torch.cat([images[:, None].to(boxes.dtype), boxes.flatten(0, 1)], 1)  # (R, 5): image, x1, y1, x2, y2
    levels = roi_levels(rois[:, 1:], int(math.log2(strides[0])), int(math.log2(strides[-1])))
    pooled = torch.zeros(B * P, maps[0].shape[1], pool, pool, device=boxes.device)
    for level, (x, stride) in enumerate(zip(maps, strides)):
        chosen = levels == level
        # A zero column and row beyond the map: RoIAlign repeats a map's last pixel up to one pixel past it, which
        # would read the image's last pixel where a larger image in the batch would have it read the padding's zeros.
        x = F.pad(x.float(), (0, 1, 0, 1))
        pooled[chosen] = roi_align(x, rois[chosen].float(), pool, 1 / stride, SAMPLING_RATIO, aligned=True)
    return pooled


# ----------------------------------------------------------------------------------------------------------------
# The dynamic instance interaction and the iterative head


class DynamicInteraction(nn.Module):
    """Sec. 3.3 of Sparse R-CNN: each proposal's feature generates the two 1x1 convolutions (C -> E -> C) its own RoI
    features go through, each followed by LayerNorm and ReLU; a Linear over the flattened S x S grid then gives the
    proposal's new feature. features (R, C), rois (R, S S, C) -> (R, C)."""

    def __init__(self, dim=HIDDEN, dynamic=DYNAMIC, pool=POOL):
        super().__init__()
        self.dim, self.dynamic = dim, dynamic
        self.generate = nn.Linear(dim, 2 * dim * dynamic)  # both filters of a proposal
        self.norm1, self.norm2 = nn.LayerNorm(dynamic), nn.LayerNorm(dim)
        self.out, self.norm3 = nn.Linear(pool * pool * dim, dim), nn.LayerNorm(dim)

    def forward(self, features, rois):
        first, second = self.generate(features).split(self.dim * self.dynamic, -1)
        first = rearrange(first, "r (c e) -> r c e", c=self.dim)
        second = rearrange(second, "r (e c) -> r e c", e=self.dynamic)
        x = F.relu(self.norm1(torch.bmm(rois, first)))  # (R, S S, E)
        x = F.relu(self.norm2(torch.bmm(x, second)))  # (R, S S, C)
        return F.relu(self.norm3(self.out(x.flatten(1))))  # (R, S S, C) -> (R, S S C), position-major as upstream


def apply_deltas(deltas, boxes, weights=DELTA_WEIGHTS, clamp=SCALE_CLAMP):
    """R-CNN's box deltas (Girshick et al.) on boxes: the centre moves by (dx, dy) times the box's (w, h), the sides
    scale by exp(dw), exp(dh); the deltas come multiplied by weights. deltas (..., 4), boxes (..., 4) -> (..., 4), in
    float32."""
    deltas = deltas.float() / torch.tensor(weights, device=deltas.device)
    size = boxes[..., 2:] - boxes[..., :2]
    centre = boxes[..., :2] + 0.5 * size + deltas[..., :2] * size
    size = size * deltas[..., 2:].clamp(max=clamp).exp()
    return torch.cat([centre - 0.5 * size, centre + 0.5 * size], -1)


def branch(layers, dim=HIDDEN):
    """A head's classification or box branch: `layers` times Linear (no bias), LayerNorm, ReLU. (..., C) -> (..., C)."""
    return nn.Sequential(*[nn.Sequential(nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU())
                           for _ in range(layers)])


class Head(nn.Module):
    """One of the iterative heads (Sec. 3.4): the proposals of an image attend to each other, each interacts with its
    own RoI features, a feed-forward layer (post-norm: each sublayer's output added, then LayerNorm), then a class
    branch and a box branch whose deltas move the proposal's box.
    rois (B P, C, S, S), boxes (B, P, 4), features (B, P, C) -> logits (B, P, K), boxes (B, P, 4) in float32,
    features (B, P, C)."""

    def __init__(self, num_classes, dim=HIDDEN, heads=HEADS):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.interaction = DynamicInteraction(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, FFN), nn.ReLU(), nn.Linear(FFN, dim))
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.class_branch, self.box_branch = branch(CLASS_LAYERS, dim), branch(BOX_LAYERS, dim)
        self.class_logits, self.box_deltas = nn.Linear(dim, num_classes), nn.Linear(dim, 4)

    def forward(self, rois, boxes, features):
        B = features.shape[0]
        features = self.norm1(features + self.self_attn(features, features, features, need_weights=False)[0])
        interacted = self.interaction(rearrange(features, "b p c -> (b p) c"),
                                      rearrange(rois, "r c s t -> r (s t) c").to(features.dtype))
        features = self.norm2(features + rearrange(interacted, "(b p) c -> b p c", b=B))
        features = self.norm3(features + self.ffn(features))
        logits = self.class_logits(self.class_branch(features))
        return logits, apply_deltas(self.box_deltas(self.box_branch(features)), boxes), features


# ----------------------------------------------------------------------------------------------------------------
# The detector


class SparseRCNN(nn.Module):
    """Sparse R-CNN on `backbone`: a module mapping (B, 3, H, W) images to a list of maps, finest first, with attributes
    `channels` and `strides` (powers of 2); an FPN over them; P learned proposal boxes (fractions of the image, all
    starting as the whole image) and features; STAGES heads, each starting from the previous one's boxes (detached)
    and features. The interface of torchvision's detectors: a list of float (3, H, W) images in [0, 1] (and, to
    train, targets with boxes (T, 4) xyxy in pixels and labels (T,) class ids < num_classes) -> a dict of losses
    (training; every head's, matching.set_losses) or, per image, the top P proposal-class pairs by sigmoid score, no
    NMS: boxes (P, 4) xyxy in its pixels, scores, labels (evaluation)."""

    def __init__(self, backbone, num_classes=80, *, proposals=PROPOSALS, min_size=800, max_size=1333, dim=HIDDEN,
                 stages=STAGES):
        super().__init__()
        self.backbone, self.num_classes, self.strides = backbone, num_classes, list(backbone.strides)
        # Resizes (in training to a random one of TRAIN_SIDES, scaled to min_size; to min_size in evaluation),
        # normalises, pads to a multiple of 32; scales the detections back.
        sides = tuple(round(side * min_size / TRAIN_SIDES[-1]) for side in TRAIN_SIDES)
        self.transform = GeneralizedRCNNTransform(sides, max_size, IMAGE_MEAN, IMAGE_STD)
        self.fpn = FPN(backbone.channels, dim)
        self.proposal_boxes = nn.Embedding(proposals, 4)  # (cx, cy, w, h), fractions of the image
        self.proposal_features = nn.Embedding(proposals, dim)
        self.heads = nn.ModuleList(Head(num_classes, dim) for _ in range(stages))
        self.reset_parameters()

    def reset_parameters(self):
        """Upstream's start: the proposals cover the whole image, xavier for the heads' matrices, the class prior."""
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        for p in self.heads.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for head in self.heads:
            nn.init.constant_(head.class_logits.bias, -math.log((1 - PRIOR) / PRIOR))

    def start(self, sizes, device):
        """The proposals of B images of sizes [(h, w)]: boxes (B, P, 4) in their pixels, features (B, P, C)."""
        whwh = torch.tensor([[w, h, w, h] for h, w in sizes], dtype=torch.float32, device=device)
        boxes = box_convert(self.proposal_boxes.weight.float(), "cxcywh", "xyxy")[None] * whwh[:, None]
        return boxes, self.proposal_features.weight[None].expand(len(sizes), -1, -1)

    def predict(self, images, sizes):
        """images (B, 3, H, W) padded, sizes [(h, w)] unpadded -> per head dict(logits (B, P, K), boxes (B, P, 4))."""
        padding = torch.ones(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
        for i, (h, w) in enumerate(sizes):
            padding[i, :h, :w] = False
        maps = self.fpn(list(self.backbone(images)), padding)
        boxes, features = self.start(sizes, images.device)
        outputs = []
        for head in self.heads:
            logits, boxes, features = head(roi_features(maps, self.strides, boxes), boxes, features)
            outputs.append(dict(logits=logits.float(), boxes=boxes))
            boxes = boxes.detach()  # each head learns its own correction
        return outputs

    def forward(self, images, targets=None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        outputs = self.predict(batch.tensors, batch.image_sizes)
        if self.training:  # L1 on the corners as fractions of the image (upstream's), GIoU the same in any unit
            whwh = torch.tensor([[w, h, w, h] for h, w in batch.image_sizes], dtype=torch.float32,
                                device=batch.tensors.device)[:, None]  # (B, 1, 4)
            normalised = [dict(o, boxes=o["boxes"] / whwh) for o in outputs]
            goals = [dict(labels=t["labels"], boxes=t["boxes"].float() / scale)
                     for t, scale in zip(targets, whwh)]
            return matching.set_losses(normalised[-1], goals, aux=normalised[:-1], box_format="xyxy")
        detections = self.detections(outputs[-1], batch.image_sizes)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

    def detections(self, output, sizes):
        """The top P (proposal, class) pairs by probability, boxes clipped to the resized image."""
        probabilities = output["logits"].sigmoid().flatten(1)  # (B, P K)
        scores, index = probabilities.topk(output["logits"].shape[1], dim=1)
        proposal, labels = index // self.num_classes, index % self.num_classes
        boxes = output["boxes"].gather(1, proposal[..., None].expand(-1, -1, 4))
        return [dict(boxes=clip_boxes_to_image(boxes[b], size), scores=scores[b], labels=labels[b])
                for b, size in enumerate(sizes)]
