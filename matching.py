"""The set-prediction loss of DETR-family detectors as Deformable DETR (Zhu et al., ICLR 2021) trains them, the loss of
Table 9 of the DGMN paper (Section 6.2): each target box is matched to one query by the Hungarian algorithm, then
every query is scored by a sigmoid focal loss over the classes (unmatched ones against no class at all) and the
matched ones by an L1 and a GIoU term on their boxes. The decoder's earlier layers and a two-stage encoder's
proposals are matched and scored on their own (deep supervision). Sparse R-CNN (Sun et al., CVPR 2021; Table 10)
trains by the same loss on each of its heads, its L1 term on corners instead of centres and sides.

Symbols, used throughout: B images, Q queries (predictions of one image), K classes (sigmoid channels, no background
channel), T target boxes of one image. Boxes are normalised by the image's unpadded size, in one of two formats
(box_format, torchvision's names): "cxcywh", (cx, cy, w, h) as Deformable DETR's L1 term reads them, or "xyxy", the
corners, as Sparse R-CNN's does. The GIoU term is the same in both.

    losses = set_losses(dict(logits=..., boxes=...), targets, aux=[...], encoder=None)   # a dict of weighted terms
"""

import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 2.0, 5.0, 2.0  # in the matching cost and in the loss alike
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0
LOG_EPS = 1e-8  # keeps the class cost's logarithms finite where a probability saturates at 0 or 1

# ----------------------------------------------------------------------------------------------------------------
# The matching cost


def focal_cost(logits, labels, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA):
    """The class cost of matching: the change in a query's focal loss at a target's class when that class becomes its
    target (the positive term less the negative one). logits (Q, K), labels (T,) -> (Q, T)."""
    p = logits.sigmoid()[:, labels]
    positive = alpha * (1 - p) ** gamma * -(p + LOG_EPS).log()
    negative = (1 - alpha) * p ** gamma * -(1 - p + LOG_EPS).log()
    return positive - negative


def corners(boxes, box_format):
    return box_convert(boxes, box_format, "xyxy")


def match_cost(logits, boxes, target, box_format="cxcywh"):
    """The weighted cost of matching each query of one image to each of its targets: class, L1 and -GIoU.
    logits (Q, K), boxes (Q, 4), target dict(labels (T,), boxes (T, 4)), both boxes in box_format -> (Q, T)."""
    goals = target["boxes"].to(boxes)
    giou = generalized_box_iou(corners(boxes, box_format), corners(goals, box_format))
    return (CLASS_WEIGHT * focal_cost(logits, target["labels"]) + L1_WEIGHT * torch.cdist(boxes, goals, p=1)
            - GIOU_WEIGHT * giou)


# ----------------------------------------------------------------------------------------------------------------
# The Hungarian matcher


@torch.no_grad()
def hungarian_match(logits, boxes, targets, box_format="cxcywh"):
    """The assignment of least total cost, image by image: logits (B, Q, K), boxes (B, Q, 4), B target dicts -> B pairs
    of int64 CPU index tensors (matched queries, their targets), each of min(Q, T) entries (none without targets)."""
    matches = []
    for image_logits, image_boxes, target in zip(logits.float(), boxes.float(), targets):
        cost = match_cost(image_logits, image_boxes, target, box_format).cpu()  # scipy solves on the host
        queries, chosen = linear_sum_assignment(cost.numpy())
        matches.append((torch.as_tensor(queries, dtype=torch.int64), torch.as_tensor(chosen, dtype=torch.int64)))
    return matches


# ----------------------------------------------------------------------------------------------------------------
# The loss of one set of predictions


def count_boxes(targets, device):
    """The loss's divisor: the batch's target boxes, averaged over the ranks (every rank divides by the same number),
    at least 1. B target dicts with labels (T,) -> a float."""
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1).item()


def set_loss(prediction, targets, num_boxes, box_format="cxcywh"):
    """One set of predictions against the batch's targets, matched here: the focal loss over every query and class,
    L1 and 1 - GIoU over the matched pairs, each summed, divided by num_boxes and weighted.
    prediction dict(logits (B, Q, K), boxes (B, Q, 4)), B target dicts (labels (T,), boxes (T, 4)), both boxes in
    box_format, num_boxes a float -> dict(loss_class, loss_l1, loss_giou) of scalars."""
    logits, boxes = prediction["logits"].float(), prediction["boxes"].float()
    matches = hungarian_match(logits, boxes, targets, box_format)
    # the matched pairs of the whole batch, flattened: image, query, the target's class and box
    images = torch.cat([torch.full_like(queries, b) for b, (queries, _) in enumerate(matches)]).to(logits.device)
    queries = torch.cat([queries for queries, _ in matches]).to(logits.device)
    labels = torch.cat([t["labels"][chosen] for t, (_, chosen) in zip(targets, matches)]).to(logits.device)
    goals = torch.cat([t["boxes"][chosen] for t, (_, chosen) in zip(targets, matches)]).to(boxes)
    onehot = torch.zeros_like(logits)  # unmatched queries learn to predict no class
    onehot[images, queries, labels] = 1
    matched = boxes[images, queries]
    focal = sigmoid_focal_loss(logits, onehot, alpha=FOCAL_ALPHA, gamma=FOCAL_GAMMA, reduction="sum")
    giou = generalized_box_iou(corners(matched, box_format), corners(goals, box_format)).diagonal()
    return dict(loss_class=CLASS_WEIGHT * focal / num_boxes,
                loss_l1=L1_WEIGHT * (matched - goals).abs().sum() / num_boxes,
                loss_giou=GIOU_WEIGHT * (1 - giou).sum() / num_boxes)


# ----------------------------------------------------------------------------------------------------------------
# Deep supervision: every decoder layer (or head) and the encoder's proposals


def set_losses(prediction, targets, aux=(), encoder=None, box_format="cxcywh"):
    """The loss of the decoder's last layer (keys loss_class, loss_l1, loss_giou), of each earlier one in aux (the
    same keys with suffix _0, _1, ...) and of a two-stage encoder's proposals (suffix _enc: class-agnostic, every
    target of class 0). Each set is matched on its own; all divide by the batch's one count_boxes.
    prediction, each of aux and encoder dict(logits (B, Q, K), boxes (B, Q, 4)); B target dicts (labels (T,) int64 in
    [0, K), boxes (T, 4)), all boxes in box_format -> dict of scalars, each already weighted (the training loss is
    their sum)."""
    num_boxes = count_boxes(targets, prediction["logits"].device)

    def loss(predictions, goals, suffix=""):
        return {key + suffix: value for key, value in set_loss(predictions, goals, num_boxes, box_format).items()}

    losses = loss(prediction, targets)
    for index, layer in enumerate(aux):
        losses.update(loss(layer, targets, f"_{index}"))
    if encoder is not None:
        losses.update(loss(encoder, [dict(t, labels=torch.zeros_like(t["labels"])) for t in targets], "_enc"))
    return losses
