"""Deformable DETR (Zhu et al., ICLR 2021) on any multi-scale backbone: the detector of Table 9 (Section 6.2), with
its iterative box refinement and two-stage options (the "+" rows). Read beside Deformable DETR's paper: the sine
position encoding (its Sec. A.4), multi-scale deformable attention (Eq. 3 there), the encoder, the decoder, the heads,
then the detector with torchvision's interface.

Symbols, used throughout: B images, C the hidden width (256), L feature levels (4), H_l x W_l level l's size,
N the tokens of all levels (sum of H_l W_l), Q queries (300; in the encoder Q = N), M heads (8), D = C / M a head's
width, P points a head samples on each level (4), K classes (sigmoid channels, no background: COCO's 91 ids), T target
boxes of an image.
Boxes inside the model are (cx, cy, w, h) normalised by the image's unpadded size.

    model = DeformableDETR(backbone, num_classes=91)     # backbone(images) -> L - 1 maps; .channels, .strides
    losses = model(images, targets)                      # training: a dict of losses (matching.set_losses)
    detections = model(images)                           # evaluation: [{"boxes", "scores", "labels"}] in pixels
"""

import contextlib
import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert
from torchvision.transforms import v2

try:  # inside a package: the model files copied into a project
    from . import matching
except ImportError:  # at the top level of this repository
    import matching

HIDDEN, HEADS, LEVELS, POINTS = 256, 8, 4, 4  # C, M, L, P
LAYERS, FFN, DROPOUT = 6, 1024, 0.1  # encoder and decoder layers, the feed-forward width, dropout
QUERIES, DETECTIONS = 300, 100  # Q decoder queries; detections an image keeps (query-class pairs)
PRIOR = 0.01  # the class logits start at the probability of a rare class (focal loss's prior)
TWO_STAGE_SIZE = 0.05  # an encoder proposal's side at the finest level, doubling with each coarser one
IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TRAIN_SIDES = tuple(range(480, 801, 32))  # upstream's shorter sides at 800: one at random a training image
CROP_SIDES, CROP_RANGE = (400, 500, 600), (384, 600)  # upstream's other branch: a resize, then a crop of this range
TEMPERATURE = 10000  # the sine encodings' base, the Transformer's: wavelengths from 1 to nearly 10000 image sides
BORDER = 0.01  # two-stage proposals within this (a fraction of the image) of its edge are not used
SAMPLING_MACS = 5  # a deformable read of one element and channel: 4 bilinear neighbours and the attention weight

# ----------------------------------------------------------------------------------------------------------------
# Position encodings


def sine_position(padding, features=HIDDEN // 2, temperature=TEMPERATURE):
    """The sine encoding of each pixel's place in the unpadded area, y then x, sin and cos interleaved.
    padding (B, H, W) bool, True outside the image -> (B, 2 features, H, W)."""
    inside = (~padding).float()
    y, x = inside.cumsum(1), inside.cumsum(2)  # 1-based rows and columns within the image
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * math.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * math.pi
    frequencies = temperature ** (2 * (torch.arange(features, device=padding.device) // 2) / features)
    y, x = y[..., None] / frequencies, x[..., None] / frequencies  # (B, H, W, features)
    y = torch.stack([y[..., 0::2].sin(), y[..., 1::2].cos()], -1).flatten(3)  # (B, H, W, features), interleaved
    x = torch.stack([x[..., 0::2].sin(), x[..., 1::2].cos()], -1).flatten(3)
    return rearrange(torch.cat([y, x], -1), "b h w c -> b c h w")


def box_position(boxes, features=HIDDEN // 2, temperature=TEMPERATURE):
    """Two-stage queries: the sine encoding of each coordinate of a box.
    boxes (B, Q, 4) in [0, 1] -> (B, Q, 4 features)."""
    frequencies = temperature ** (2 * (torch.arange(features, device=boxes.device) // 2) / features)
    angles = boxes[..., None] * 2 * math.pi / frequencies  # (B, Q, 4, features)
    # (B, Q, 4, features / 2, 2) -> (B, Q, 4 features), sin and cos interleaved
    return torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], -1).flatten(2)


def inverse_sigmoid(x, eps=1e-5):
    """log(x / (1 - x)), finite for x in [0, 1]: boxes on the border (0 or 1) give large logits, not inf."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


# ----------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention


def sample_levels(value, shapes, locations, weights):
    """Eq. 3 of Deformable DETR's paper after the projections: each head reads P points on each level, bilinearly with
    zeros outside (align_corners=False: pixel p's centre at (p + 0.5) / size), and sums them with its weights.
    value (B, N, M, D); shapes [(H_l, W_l)]; locations (B, Q, M, L, P, 2) x, y in [0, 1]; weights (B, Q, M, L, P)
    -> (B, Q, M D)."""
    B, _, M, _ = value.shape
    sampled, start = [], 0
    for level, (H, W) in enumerate(shapes):
        level_value = rearrange(value[:, start:start + H * W], "b (h w) m d -> (b m) d h w", h=H)
        grid = rearrange(2 * locations[:, :, :, level] - 1, "b q m p xy -> (b m) q p xy")
        # in the wider dtype of the two (float32 for bf16 values under autocast): a grid rounded to bf16 would move
        # points by up to a sixth of a pixel on a 167-pixel-wide level
        dtype = torch.promote_types(level_value.dtype, grid.dtype)
        sampled.append(F.grid_sample(level_value.to(dtype), grid.to(dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # ((B M), D, Q, P)
        start += H * W
    sampled = torch.stack(sampled, dim=3)  # ((B M), D, Q, L, P)
    weights = rearrange(weights, "b q m l p -> (b m) 1 q l p").to(sampled.dtype)
    return rearrange((sampled * weights).sum((3, 4)), "(b m) d q -> b q (m d)", b=B, m=M)


class DeformableAttention(nn.Module):
    """Multi-scale deformable attention: each query's heads sample P points on every level around its reference point
    (or box), at offsets and with weights (a softmax over a head's L P points) predicted from the query.
    query (B, Q, C), reference (B, Q, L, 2) x, y or (B, Q, L, 4) boxes, per level; values (B, N, C) of `shapes`;
    padding (B, N) True on padded tokens -> (B, Q, C)."""

    def __init__(self, dim=HIDDEN, heads=HEADS, levels=LEVELS, points=POINTS):
        super().__init__()
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj, self.output_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self):
        """Upstream's start: point p of every level on ray k (of `heads` evenly turned ones) at (p + 1) x its unit step,
        the points weighed alike (weights 0: a uniform softmax)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads) * 2 * math.pi / self.heads
        rays = torch.stack([angles.cos(), angles.sin()], -1)
        rays = rays / rays.abs().max(-1, keepdim=True).values  # (M, 2), the larger coordinate +-1
        steps = torch.arange(1, self.points + 1).view(1, 1, -1, 1)  # (1, 1, P, 1): point p at p + 1 steps
        with torch.no_grad():
            # (M, 1, P, 2) -> (M, L, P, 2) -> (M L P 2), the order forward reads the bias in
            self.sampling_offsets.bias.copy_((rays[:, None, None] * steps).expand(-1, self.levels, -1, -1).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, query, reference, values, shapes, padding):
        M, L, P = self.heads, self.levels, self.points
        value = self.value_proj(values).masked_fill(padding[..., None], 0)
        value = rearrange(value, "b n (m d) -> b n m d", m=M)
        offsets = rearrange(self.sampling_offsets(query), "b q (m l p xy) -> b q m l p xy", m=M, l=L, p=P)
        weights = rearrange(self.attention_weights(query), "b q (m lp) -> b q m lp", m=M).softmax(-1)
        weights = rearrange(weights, "b q m (l p) -> b q m l p", l=L)
        reference = reference[:, :, None, :, None]  # (B, Q, 1, L, 1, 2 or 4)
        if reference.shape[-1] == 2:  # offsets in pixels of each level (W_l, H_l: the upstream fix)
            size = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
            locations = reference + offsets / size[:, None]  # size (L, 1, 2) against (..., L, P, 2)
        else:  # offsets in halves of the reference box, spread over the points
            locations = reference[..., :2] + offsets / P * reference[..., 2:] * 0.5
        return self.output_proj(sample_levels(value, shapes, locations, weights))


def sampling_flops(*_, out_shape, **__):
    """FlopCounterMode's formula for the reads of F.grid_sample (aten.grid_sampler_2d), which it does not count:
    SAMPLING_MACS multiply-adds (2 FLOPs each) an output element. Pass it as FlopCounterMode(custom_mapping={
    torch.ops.aten.grid_sampler_2d: sampling_flops})."""
    return 2 * SAMPLING_MACS * math.prod(out_shape)


class MaskedGroupNorm(nn.GroupNorm):
    """GroupNorm with its statistics over the image alone, not its padding: upstream's take both, so that an image's
    features change with the images it is batched with. Alike for an unpadded image; upstream's parameter names.
    x (B, C, H, W), inside (B, H, W) bool -> (B, C, H, W)."""

    def forward(self, x, inside):
        exact = x.to(torch.promote_types(x.dtype, torch.float32))  # half precision's statistics in float32
        groups = rearrange(exact, "b (g c) h w -> b g c h w", g=self.num_groups)
        weight = inside[:, None, None].to(groups.dtype)  # (B, 1, 1, H, W)
        count = weight.sum((2, 3, 4), keepdim=True) * groups.shape[2]
        mean = (groups * weight).sum((2, 3, 4), keepdim=True) / count
        variance = ((groups - mean).square() * weight).sum((2, 3, 4), keepdim=True) / count
        normed = rearrange((groups - mean) * torch.rsqrt(variance + self.eps), "b g c h w -> b (g c) h w")
        return (normed * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)).to(x.dtype)  # each (1, C, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Encoder and decoder layers (post-norm: each sublayer's output added, then LayerNorm)


class FeedForward(nn.Module):
    """A post-norm layer's feed-forward: Linear, ReLU, dropout, Linear. x (..., C) -> (..., C)."""

    def __init__(self, dim=HIDDEN, hidden=FFN, dropout=DROPOUT):
        super().__init__()
        self.linear1, self.linear2, self.dropout = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)

    def forward(self, x):
        return self.linear2(self.dropout(F.relu(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Every token attends (deformably) over all levels. tokens (B, N, C), pos (B, N, C), reference (B, N, L, 2)
    -> (B, N, C)."""

    def __init__(self, dim=HIDDEN, dropout=DROPOUT):
        super().__init__()
        self.attn, self.ffn = DeformableAttention(dim), FeedForward(dim, dropout=dropout)
        self.norm1, self.norm2, self.dropout = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.Dropout(dropout)

    def forward(self, tokens, pos, reference, shapes, padding):
        tokens = self.norm1(tokens + self.dropout(self.attn(tokens + pos, reference, tokens, shapes, padding)))
        return self.norm2(tokens + self.dropout(self.ffn(tokens)))


class DecoderLayer(nn.Module):
    """Queries attend to each other, then (deformably) to the encoder's tokens. queries (B, Q, C), pos (B, Q, C),
    reference (B, Q, L, 2 or 4), memory (B, N, C) -> (B, Q, C)."""

    def __init__(self, dim=HIDDEN, heads=HEADS, dropout=DROPOUT):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn, self.ffn = DeformableAttention(dim), FeedForward(dim, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries, pos, reference, memory, shapes, padding):
        q = queries + pos
        queries = self.norm1(queries + self.dropout(self.self_attn(q, q, queries, need_weights=False)[0]))
        attended = self.cross_attn(queries + pos, reference, memory, shapes, padding)
        queries = self.norm2(queries + self.dropout(attended))
        return self.norm3(queries + self.dropout(self.ffn(queries)))


class HeadLinear(nn.Linear):
    """nn.Linear computed in float32 (float64 stays) with autocast off: the heads' outputs are logits and boxes before
    the sigmoid, which bf16 would keep to 8 bits (steps of 1/64 between 2 and 4): a box side up to 1.1 px off at
    1333 px. x (..., C_in) -> (..., C_out) in float32."""

    def forward(self, x):
        dtype = torch.promote_types(x.dtype, torch.float32)
        has_autocast = torch.amp.is_autocast_available(x.device.type)  # the meta device (FLOP counts) has none
        with torch.autocast(x.device.type, enabled=False) if has_autocast else contextlib.nullcontext():
            return F.linear(x.to(dtype), self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype))


class BoxMLP(nn.Module):
    """Three Linears (C -> C -> C -> 4) with ReLUs, in float32: a box as a correction to its reference (before the
    sigmoid). x (..., C) -> (..., 4) float32."""

    def __init__(self, dim=HIDDEN):
        super().__init__()
        self.layers = nn.ModuleList([HeadLinear(dim, dim), HeadLinear(dim, dim), HeadLinear(dim, 4)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


# ----------------------------------------------------------------------------------------------------------------
# Upstream's training augmentation, scaled from its 800 px to the detector's shorter side


def scaled(sides, min_size):
    """Upstream's sides, given for a shorter side of 800 (TRAIN_SIDES[-1]), for one of min_size."""
    return tuple(round(side * min_size / TRAIN_SIDES[-1]) for side in sides)


class RandomSizeCrop:
    """A crop of random height and width in [low, min(side, high)], on v2's (image, target) pairs."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def __call__(self, *inputs):
        sides = v2.functional.get_size(inputs[0])  # (H, W) of the image, which comes first
        size = [int(torch.randint(self.low, max(min(side, self.high), self.low) + 1, (1,))) for side in sides]
        return v2.RandomCrop(size, pad_if_needed=True)(*inputs)


def augmentation(min_size=800):
    """Upstream's training augmentation before the detector's own resize (to one of TRAIN_SIDES, scaled): a
    horizontal flip, and half the time the shorter side to one of CROP_SIDES then a random crop of CROP_RANGE (boxes
    left empty by it dropped). A v2 transform of (image, target)."""
    crop = [v2.RandomShortestSize(scaled(CROP_SIDES, min_size)), RandomSizeCrop(*scaled(CROP_RANGE, min_size)),
            v2.SanitizeBoundingBoxes()]
    return v2.Compose([v2.RandomHorizontalFlip(), v2.RandomApply(crop, p=0.5)])


# ----------------------------------------------------------------------------------------------------------------
# The detector


class DeformableDETR(nn.Module):
    """Deformable DETR on `backbone`: a module mapping (B, 3, H, W) images to a list of maps, finest first, with
    attributes `channels` and `strides`; its maps plus LEVELS - len(maps) extra ones (3x3 stride-2 convs from the last
    map) are the L levels. box_refine: a class head and box MLP per decoder layer, each layer refining the previous
    one's boxes; two_stage: the queries start from the encoder's top-scoring tokens (both: the "+" rows).
    The interface of torchvision's detectors: a list of float (3, H, W) images in [0, 1] (and, to train, targets with
    boxes (T, 4) xyxy in pixels and labels (T,) class ids < num_classes) -> a dict of losses (training) or, per image,
    the top DETECTIONS query-class pairs: boxes (DETECTIONS, 4) xyxy in its pixels, scores, labels (evaluation)."""

    def __init__(self, backbone, num_classes=91, *, box_refine=False, two_stage=False, queries=QUERIES,
                 min_size=800, max_size=1333, dim=HIDDEN, layers=LAYERS):
        super().__init__()
        self.backbone, self.num_classes, self.queries = backbone, num_classes, queries
        self.box_refine, self.two_stage = box_refine, two_stage
        # Resizes (in training to a random one of TRAIN_SIDES, scaled; to min_size in evaluation), normalises, pads to
        # a multiple of 32; scales the detections back.
        self.transform = GeneralizedRCNNTransform(scaled(TRAIN_SIDES, min_size), max_size, IMAGE_MEAN, IMAGE_STD)
        channels = list(backbone.channels)
        if len(channels) > LEVELS:
            raise ValueError(f"the backbone gives {len(channels)} maps; Deformable DETR attends over at most {LEVELS}")
        # The extra levels' stride-2 convs read the last map, then each the extra level before.
        extra = [channels[-1], *[dim] * LEVELS][:LEVELS - len(channels)]
        self.input_proj = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, dim, 1), MaskedGroupNorm(32, dim)) for c in channels]
            + [nn.Sequential(nn.Conv2d(c, dim, 3, stride=2, padding=1), MaskedGroupNorm(32, dim))
               for c in extra])
        self.level_embed = nn.Parameter(torch.empty(LEVELS, dim))
        self.encoder = nn.ModuleList(EncoderLayer(dim) for _ in range(layers))
        self.decoder = nn.ModuleList(DecoderLayer(dim) for _ in range(layers))
        if two_stage:  # queries from the encoder's proposals
            self.enc_output, self.enc_output_norm = nn.Linear(dim, dim), nn.LayerNorm(dim)
            self.pos_trans, self.pos_trans_norm = nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim)
        else:  # learned queries: position and content, and a reference point from the position
            self.query_embed, self.reference_points = nn.Embedding(queries, 2 * dim), HeadLinear(dim, 2)
        heads = layers + two_stage  # the last scores the encoder's proposals
        class_head, box_head = HeadLinear(dim, num_classes), BoxMLP(dim)
        self.class_heads = nn.ModuleList(copy.deepcopy(class_head) if box_refine else class_head for _ in range(heads))
        self.box_heads = nn.ModuleList(copy.deepcopy(box_head) if box_refine else box_head for _ in range(heads))
        self.reset_parameters()

    def reset_parameters(self):
        """Upstream's start: xavier for the transformer's matrices (the two-stage projections too), the attention's own
        start, the class prior, boxes starting at their reference (the first head's small, w = h = sigmoid(-2), unless
        two-stage references give the size; with box refinement the later heads' at the size given)."""
        transformer = [self.encoder, self.decoder] + ([self.enc_output, self.pos_trans] if self.two_stage else [])
        for module in transformer:
            for p in module.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, DeformableAttention):
                module.reset_parameters()
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        nn.init.normal_(self.level_embed)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight)
            nn.init.zeros_(self.reference_points.bias)
        for head in self.class_heads:
            nn.init.constant_(head.bias, -math.log((1 - PRIOR) / PRIOR))
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)
        if not self.two_stage:  # without box refinement the one head that every layer shares
            nn.init.constant_(self.box_heads[0].layers[-1].bias[2:], -2.0)

    # -- the levels and the encoder --

    def levels(self, images, padding):
        """The L projected levels with their padding and position: images (B, 3, H, W), padding (B, H, W) -> tokens
        (B, N, C), padding (B, N), pos (B, N, C) with the level embedding, shapes [(H_l, W_l)], valid (B, L, 2)."""
        def padding_of(x):  # nearest
            return F.interpolate(padding[:, None].float(), size=x.shape[-2:])[:, 0].bool()

        def project(projection, x):  # the padding read as zeros (as a convolution's own), left out of the norm
            conv, norm = projection
            y = conv(x * ~padding_of(x)[:, None])
            return norm(y, ~padding_of(y))

        features = list(self.backbone(images))
        maps = [project(projection, x) for projection, x in zip(self.input_proj, features)]
        extra = features[-1]  # the first extra level reads the last backbone map, the next ones the level before
        for projection in self.input_proj[len(features):]:
            extra = project(projection, extra)
            maps.append(extra)
        tokens, masks, positions, shapes = [], [], [], []
        for level, x in enumerate(maps):
            mask = padding_of(x)
            # (B, C, H_l, W_l): the encoding plus the level's embedding, (C,) as (1, C, 1, 1)
            pos = sine_position(mask).to(x.dtype) + self.level_embed[level].view(1, -1, 1, 1).to(x.dtype)
            tokens.append(rearrange(x, "b c h w -> b (h w) c"))
            positions.append(rearrange(pos, "b c h w -> b (h w) c"))
            masks.append(mask.flatten(1))  # (B, H_l, W_l) -> (B, H_l W_l)
            shapes.append(tuple(x.shape[-2:]))
        valid = torch.stack([self.valid_ratio(m.view(-1, *s)) for m, s in zip(masks, shapes)], 1)  # each (B, H_l, W_l)
        return torch.cat(tokens, 1), torch.cat(masks, 1), torch.cat(positions, 1), shapes, valid

    @staticmethod
    def valid_ratio(mask):
        """The unpadded share of a level's width and height: mask (B, H, W) -> (B, 2) as (w, h)."""
        inside = ~mask
        return torch.stack([inside[:, 0].sum(1) / mask.shape[2], inside[:, :, 0].sum(1) / mask.shape[1]], -1).float()

    @staticmethod
    def token_centres(shapes, valid, device):
        """Each token's pixel centre, normalised by its level's unpadded size: -> (B, N, 2) x, y."""
        centres = []
        for level, (H, W) in enumerate(shapes):
            y, x = torch.meshgrid(torch.arange(H, device=device) + 0.5, torch.arange(W, device=device) + 0.5,
                                  indexing="ij")
            xy = torch.stack([x.flatten() / W, y.flatten() / H], -1)  # (H W, 2), of the padded size
            centres.append(xy[None] / valid[:, None, level])  # (B, H W, 2), of the unpadded size
        return torch.cat(centres, 1)

    def encode(self, tokens, padding, pos, shapes, valid):
        """tokens (B, N, C) -> memory (B, N, C): each token attends from its centre on every level."""
        reference = self.token_centres(shapes, valid, tokens.device)[:, :, None] * valid[:, None]  # (B, N, L, 2)
        for layer in self.encoder:
            tokens = layer(tokens, pos, reference, shapes, padding)
        return tokens

    # -- the queries and the decoder --

    def proposals(self, memory, padding, shapes, valid):
        """Two-stage: every token proposes a box (its centre, a side growing with its level) that the last heads
        score and correct; the top Q become the queries. -> (logits (B, N, K), boxes (B, N, 4) after the sigmoid,
        the top Q's boxes (B, Q, 4), detached)."""
        centres = self.token_centres(shapes, valid, memory.device)
        sides = torch.cat([torch.full((H * W,), TWO_STAGE_SIZE * 2 ** level, device=memory.device)
                           for level, (H, W) in enumerate(shapes)])
        boxes = torch.cat([centres, sides[None, :, None].expand(*centres.shape[:2], 2)], -1)  # (B, N, 4)
        usable = ((boxes > BORDER) & (boxes < 1 - BORDER)).all(-1) & ~padding  # upstream's: none touching the border
        boxes = inverse_sigmoid(boxes).masked_fill(~usable[..., None], float("inf"))
        memory = self.enc_output_norm(self.enc_output(memory.masked_fill(~usable[..., None], 0)))
        logits = self.class_heads[-1](memory)
        unsquashed = self.box_heads[-1](memory) + boxes
        # Class-agnostic: channel 0 scores a proposal. Unlike upstream, padded and border tokens are never chosen, so
        # an image's queries do not depend on the images it is batched with.
        top = logits[..., 0].masked_fill(~usable, float("-inf")).topk(min(self.queries, logits.shape[1]), 1).indices
        chosen = unsquashed.gather(1, top[..., None].expand(-1, -1, 4)).detach()
        return logits, unsquashed.sigmoid(), chosen.sigmoid()

    def decode(self, memory, padding, shapes, valid, reference, queries, pos):
        """The decoder's layers, each refining the boxes when box_refine: -> per layer (outputs (B, Q, C), the
        reference its boxes correct (B, Q, 2 or 4))."""
        results = []
        for index, layer in enumerate(self.decoder):
            scale = valid if reference.shape[-1] == 2 else torch.cat([valid, valid], -1)  # (B, L, 2 or 4)
            queries = layer(queries, pos, reference[:, :, None] * scale[:, None], memory, shapes, padding)
            results.append((queries, reference))
            if self.box_refine:
                reference = self.boxes(self.box_heads[index](queries), reference).detach()
        return results

    @staticmethod
    def boxes(correction, reference):
        """A box MLP's output (B, Q, 4) on its reference (B, Q, 2 or 4) -> boxes (B, Q, 4) in [0, 1]."""
        if reference.shape[-1] == 4:
            return (correction + inverse_sigmoid(reference)).sigmoid()
        return torch.cat([correction[..., :2] + inverse_sigmoid(reference), correction[..., 2:]], -1).sigmoid()

    def predict(self, images, padding):
        """images (B, 3, H, W), padding (B, H, W) -> per decoder layer dict(logits (B, Q, K), boxes (B, Q, 4)), and the
        encoder's proposals' (two-stage; else None)."""
        tokens, token_padding, pos, shapes, valid = self.levels(images, padding)
        memory = self.encode(tokens, token_padding, pos, shapes, valid)
        B, C, encoder = memory.shape[0], memory.shape[2], None
        if self.two_stage:
            logits, boxes, reference = self.proposals(memory, token_padding, shapes, valid)
            encoder = dict(logits=logits, boxes=boxes)
            pos, queries = self.pos_trans_norm(self.pos_trans(box_position(reference))).split(C, -1)
        else:
            pos, queries = self.query_embed.weight[None].expand(B, -1, -1).split(C, -1)
            reference = self.reference_points(pos).sigmoid()
        layers = self.decode(memory, token_padding, shapes, valid, reference, queries, pos)
        outputs = [dict(logits=self.class_heads[i](out), boxes=self.boxes(self.box_heads[i](out), ref))
                   for i, (out, ref) in enumerate(layers)]
        return outputs, encoder

    # -- torchvision's interface --

    def forward(self, images, targets=None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        (B, _, H, W), sizes = batch.tensors.shape, batch.image_sizes
        padding = torch.ones(B, H, W, dtype=torch.bool, device=batch.tensors.device)
        for i, (h, w) in enumerate(sizes):
            padding[i, :h, :w] = False
        outputs, encoder = self.predict(batch.tensors, padding)
        if self.training:
            return matching.set_losses(outputs[-1], self.normalised(targets, sizes), aux=outputs[:-1], encoder=encoder)
        detections = self.detections(outputs[-1], sizes)
        return self.transform.postprocess(detections, sizes, original_sizes)

    def param_groups(self, lr, weight_decay, slow=0.1):
        """Upstream's AdamW groups: the backbone, the sampling offsets and the reference points at slow x lr (moving
        them at full speed unsettles training), the rest at lr; weight decay on all. Frozen parameters stay out."""
        def is_slow(name):
            return name.startswith("backbone.") or "sampling_offsets" in name or "reference_points" in name
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [dict(params=[p for n, p in trainable if not is_slow(n)], lr=lr, weight_decay=weight_decay),
                dict(params=[p for n, p in trainable if is_slow(n)], lr=slow * lr, weight_decay=weight_decay)]

    @staticmethod
    def normalised(targets, sizes):
        """Targets in pixels (xyxy) -> labels and boxes (cx, cy, w, h) normalised by the image's size."""
        scaled = []
        for target, (h, w) in zip(targets, sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=target["boxes"].device)
            scaled.append(dict(labels=target["labels"],
                               boxes=box_convert(target["boxes"].float() / scale, "xyxy", "cxcywh")))
        return scaled

    def detections(self, output, sizes):
        """The top DETECTIONS (query, class) pairs by probability, boxes xyxy in the resized images' pixels, clipped
        to the image."""
        probabilities = output["logits"].sigmoid().flatten(1)  # (B, Q K)
        scores, index = probabilities.topk(min(DETECTIONS, probabilities.shape[1]), dim=1)
        query, labels = index // self.num_classes, index % self.num_classes
        boxes = output["boxes"].gather(1, query[..., None].expand(-1, -1, 4))
        results = []
        for b, (h, w) in enumerate(sizes):
            scale = torch.tensor([w, h, w, h], dtype=boxes.dtype, device=boxes.device)
            results.append(dict(boxes=box_convert(boxes[b], "cxcywh", "xyxy").clamp(0, 1) * scale, scores=scores[b],
                                labels=labels[b]))
        return results
