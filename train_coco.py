"""COCO object detection and instance segmentation: RetinaNet and Mask R-CNN with DGMN2 + FPN backbones (Section 6.2,
Tables 7 and 8) and Mask R-CNN R-50-FPN with DGMN modules (Sections 5.1-5.3, 8.1.2, Tables 3 and 5); training,
pycocotools evaluation, DDP through torchrun. The detectors are torchvision's; this file adds the DGMN2 + FPN
backbone, the data, the recipes and the evaluation.

Paper targets on COCO val2017 (box AP / mask AP), 1x schedule:
    RetinaNet DGMN2-Tiny/Small/Medium/Large         39.7, 42.5, 43.7, 44.7                      (Table 7)
    Mask R-CNN DGMN2-Tiny/Small/Medium/Large        40.1 / 37.2, 43.4 / 39.7, 44.4 / 40.2, 46.2 / 41.6  (Table 8)
    Mask R-CNN R-50-FPN 37.8 / 34.4, + DGMN (C5) 40.2 / 36.0                                      (Table 3)

    torchrun --nproc_per_node 8 train_coco.py --model maskrcnn-dgmn2-tiny --data /path/to/coco \\
        --pretrained dgmn2_tiny.pth                     # Table 8: AdamW 1e-4, 12 epochs, lr / 10 after epochs 8 and 11
    torchrun --nproc_per_node 8 train_coco.py --model maskrcnn-r50-dgmn-c5 --data /path/to/coco \\
        --pretrained resnet50.pth                       # Table 3: SGD 0.02, 90k iterations, lr / 10 at 60k and 80k
    torchrun train_coco.py                  # no --data: the built-in synthetic shapes, a few minutes on a CPU
    python train_coco.py --table            # the parameter counts of every model beside Tables 5, 7 and 8

"After epochs 8 and 11" is the release's mmdetection step=[8, 11], which Section 6.2 calls "at epochs 9 and 11".
--data holds train2017/, val2017/ and annotations/instances_{train,val}2017.json. --pretrained takes an authors'
DGMN2 checkpoint (dgmn2.load_official), a train_imagenet.py checkpoint or a torchvision ResNet-50 state dict; nothing
is downloaded. Every knob is a flag: python train_coco.py --help.
"""

import argparse
import bisect
import contextlib
import dataclasses
import datetime
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d, box_convert
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

import dgmn
import dgmn2

# ----------------------------------------------------------------------------------------------------------------
# The models and the paper's numbers beside them


@dataclass(frozen=True)
class Detector:
    detector: str            # "retinanet" | "maskrcnn"
    backbone: str            # a DGMN2 variant, or "r50"
    dgmn_stages: tuple       # R-50 stages given a DGMN module after every 3x3 conv (Section 5.1)
    params_m: float | None   # the paper's parameter count (M)
    box_ap: float            # the paper's COCO val box AP
    mask_ap: float | None    # the paper's COCO val mask AP
    table: str


MODELS = {
    **{f"retinanet-dgmn2-{v}": Detector("retinanet", v, (), p, ap, None, "Table 7") for v, p, ap in [
        ("tiny", 21.8, 39.7), ("small", 30.7, 42.5), ("medium", 45.6, 43.7), ("large", 57.9, 44.7)]},
    **{f"maskrcnn-dgmn2-{v}": Detector("maskrcnn", v, (), p, box, mask, "Table 8") for v, p, box, mask in [
        ("tiny", 31.8, 40.1, 37.2), ("small", 40.6, 43.4, 39.7), ("medium", 55.5, 44.4, 40.2),
        ("large", 67.9, 46.2, 41.6)]},
    "maskrcnn-r50": Detector("maskrcnn", "r50", (), 44.2, 37.8, 34.4, "Tables 3, 8"),
    "maskrcnn-r50-dgmn-c5": Detector("maskrcnn", "r50", ("C5",), None, 40.2, 36.0, "Table 3"),
    # Table 5 reports C4 + C5 on test-dev only (41.0 / 36.8); its 51.1M parameters are in the text of Section 5.3.
    # dgmn.py's module has the layout that reproduces Table 2, with C x C transforms per rate: 57.3M here.
    "maskrcnn-r50-dgmn-c4c5": Detector("maskrcnn", "r50", ("C4", "C5"), 51.1, 41.0, 36.8, "Table 5, test-dev"),
}
assert all(m.backbone in dgmn2.VARIANTS for m in MODELS.values() if m.backbone != "r50")

# ----------------------------------------------------------------------------------------------------------------
# Configuration: the paper's recipes by default; SYNTHETIC replaces what no flag set when there is no --data


@dataclass
class Config:
    model: str = "retinanet-dgmn2-tiny"
    data: str = ""                      # COCO root (train2017/, val2017/, annotations/); empty: the synthetic set
    output: str = "runs/coco"
    pretrained: str = ""                # backbone weights (see the module docstring)
    iterations: int = 0                 # 0: the recipe's, 12 epochs (DGMN2) or 90,000
    lr_steps: str = ""                  # iterations after which lr x 0.1, e.g. "60000,80000"; empty: the recipe's
    batch_size: int = 16                # global, split over the processes
    optimizer: str = "auto"             # auto: adamw for DGMN2 (lr 1e-4), sgd for R-50 (lr 0.02, momentum 0.9)
    lr: float = 0.0                     # 0: the optimizer's paper value
    weight_decay: float = 1e-4
    warmup: int = 500                   # iterations of linear warm-up
    warmup_factor: float = 0.0          # lr factor at iteration 0; 0: the recipe's, 0.001 (DGMN2) or 0.3
    min_size: int = 800                 # shorter image side, inside the model (synthetic images are this size)
    max_size: int = 1333                # longer image side at most
    rois: int = 512                     # Mask R-CNN: RoIs sampled per image for the box and mask heads' losses
    eval_every: int = 0                 # iterations between evaluations; 0: once an epoch
    save_every: int = 1000              # iterations between checkpoints
    pictures: int = 4                   # validation images saved with their detections at each evaluation
    amp: str = "auto"
    workers: int = 4
    seed: int = 0
    resume: str = ""                    # a checkpoint, or "auto": the newest in --output
    eval_only: bool = False
    table: bool = False                 # print every model's parameters beside the paper's, then exit
    synthetic_train: int = 1000
    synthetic_val: int = 100


SYNTHETIC = dict(iterations=500, lr_steps="400,470", batch_size=4, optimizer="adamw", lr=2e-4, warmup=50,
                 min_size=128, max_size=128, rois=64, eval_every=100, save_every=100, workers=1,
                 output="runs/synthetic-coco")
CHOICES = dict(model=list(MODELS), optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6]
DRAW_SCORE = 0.5  # detections drawn in the pictures


class InputError(Exception):
    """Bad input (paths, data, checkpoints): reported in one line, exit status 1."""


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss): reported in one line, exit status 1."""


def parse_args(argv=None):
    """Config from the command line: one flag per field; SYNTHETIC fills the fields no flag set when --data is empty."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        elif f.name in CHOICES:
            parser.add_argument(flag, choices=CHOICES[f.name], default=None)
        else:
            parser.add_argument(flag, type=f.type, default=None, help=f"default {f.default}")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    defaults = SYNTHETIC if not given.get("data") else {}
    if "iterations" in given:  # SYNTHETIC's steps belong to its own length: the recipe's fractions instead
        defaults = {k: v for k, v in defaults.items() if k != "lr_steps"}
    return Config(**{**defaults, **given})


def recipe(cfg, iterations_per_epoch):
    """The optimizer and schedule: what cfg sets, else the paper's recipe for the model's backbone. A dict."""
    r50 = MODELS[cfg.model].backbone == "r50"
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else "sgd" if r50 else "adamw"
    if r50:  # Section 8.1.2: Detectron's 1x, 90k iterations at batch 16, lr / 10 at 60k and 80k
        iterations, step_fractions, warmup_factor = 90_000, (2 / 3, 8 / 9), 0.3
    else:  # Section 6.2 and the release's configs: 12 epochs, lr / 10 after epochs 8 and 11
        iterations, step_fractions, warmup_factor = 12 * iterations_per_epoch, (8 / 12, 11 / 12), 0.001
    iterations = cfg.iterations or iterations
    steps = [int(s) for s in cfg.lr_steps.split(",")] if cfg.lr_steps else [round(f * iterations)
                                                                              for f in step_fractions]
    return dict(optimizer=optimizer, lr=cfg.lr or dict(adamw=1e-4, sgd=0.02)[optimizer], iterations=iterations,
                steps=steps, warmup=cfg.warmup, warmup_factor=cfg.warmup_factor or warmup_factor,
                eval_every=cfg.eval_every or iterations_per_epoch)


def lr_factor(iteration, plan):
    """The lr multiplier at an iteration: a linear warm-up from plan["warmup_factor"] (Section 8.1.2's "0.02 x 0.3"
    is Detectron's linear warm-up starting there), then x 0.1 after each of plan["steps"]."""
    warm = 1.0
    if iteration < plan["warmup"]:
        warm = plan["warmup_factor"] + (1 - plan["warmup_factor"]) * iteration / plan["warmup"]
    return warm * 0.1 ** bisect.bisect_right(plan["steps"], iteration)


# ----------------------------------------------------------------------------------------------------------------
# The built-in synthetic set, written in COCO's format


SHAPES = ("disc", "square", "triangle", "bar")  # category ids 1-4
SHAPE_COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.9, 0.8, 0.1], [0.8, 0.3, 0.9]])


def synthetic_scene(size, generator):
    """A cluttered background with 2-4 shapes (disc, square, triangle, bar) of 20-40% of the image's side, random
    position and rotation, coloured around a colour of their class; shapes overlap by at most a few pixels.
    -> uint8 (3, S, S) image, [(category id, bool (S, S) mask)]."""
    rand = lambda *shape: torch.rand(shape, generator=generator)  # noqa: E731
    S = size
    y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
    image = rand(3, 1, 1) * 0.6 + 0.2 * rand(3, 1, 1) * x + 0.2 * rand(3, 1, 1) * y  # (3, S, S) gradient
    for _ in range(6):  # clutter: faint stripes that belong to no class
        angle, phase = 2 * math.pi * rand(1), 2 * math.pi * rand(1)
        image = image + 0.05 * torch.sin(8 * (angle.cos() * x + angle.sin() * y) + phase)
    taken = torch.zeros(S, S, dtype=torch.bool)
    instances = []
    for _ in range(2 + int(rand(1) * 3)):
        for _attempt in range(10):  # place it where it covers no earlier shape (up to 2% of its area)
            kind = int(rand(1) * len(SHAPES))
            scale, angle = 0.2 + 0.2 * rand(1), 2 * math.pi * rand(1)
            cy, cx = (rand(2) - 0.5) * (2 - 2 * scale)
            cos, sin = angle.cos(), angle.sin()
            u, v = (cos * (x - cx) + sin * (y - cy)) / scale, (-sin * (x - cx) + cos * (y - cy)) / scale
            inside = [u ** 2 + v ** 2 < 0.8, (u.abs() < 0.7) & (v.abs() < 0.7),
                      (v < 0.6) & (v > 1.9 * u.abs() - 0.9), (u.abs() < 0.95) & (v.abs() < 0.3)][kind]
            if (inside & taken).sum() <= 0.02 * inside.sum():
                break
        else:
            continue
        inside &= ~taken
        if inside.sum() < 16:
            continue
        hue = SHAPE_COLOURS[kind].view(3, 1, 1)  # each class has its own colour family
        image = torch.where(inside, 0.7 * hue + 0.3 * rand(3, 1, 1), image)
        taken |= inside
        instances.append((kind + 1, inside))
    image = (image + 0.04 * torch.randn(3, S, S, generator=generator)).clamp(0, 1)
    return (image * 255).round().to(torch.uint8), instances


def mask_to_rle(mask):
    """bool (H, W) -> COCO RLE with str counts (pycocotools encodes Fortran-ordered uint8 arrays)."""
    rle = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return dict(size=rle["size"], counts=rle["counts"].decode("ascii"))


def write_synthetic(root, size, lengths, seed=1):
    """Write the synthetic set as a COCO directory: root/{split}2017/*.png and root/annotations/
    instances_{split}2017.json, with RLE masks, for lengths = {split: images}. Scene i of a split is a function of
    (seed, split, i). An annotation file is written last and atomically: where it exists, its split is complete."""
    for split_index, (split, length) in enumerate(lengths.items()):
        annotation_file = Path(root) / "annotations" / f"instances_{split}2017.json"
        if annotation_file.is_file() and len(json.loads(annotation_file.read_text())["images"]) == length:
            continue
        (Path(root) / f"{split}2017").mkdir(parents=True, exist_ok=True)
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(length):
            generator = torch.Generator().manual_seed((seed * 1_000_003 + split_index) * 1_000_003 + i)
            image, instances = synthetic_scene(size, generator)
            name = f"{i:06d}.png"
            v2.functional.to_pil_image(image).save(Path(root) / f"{split}2017" / name)
            images.append(dict(id=i + 1, file_name=name, height=size, width=size))
            for category, mask in instances:
                ys, xs = mask.nonzero(as_tuple=True)
                x0, y0 = xs.min().item(), ys.min().item()
                box = [x0, y0, xs.max().item() + 1 - x0, ys.max().item() + 1 - y0]  # xywh, pixel edges
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=category, bbox=box,
                                        area=int(mask.sum()), segmentation=mask_to_rle(mask), iscrowd=0))
        categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SHAPES)]
        temporary = annotation_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(dict(images=images, annotations=annotations, categories=categories)))
        os.replace(temporary, annotation_file)


# ----------------------------------------------------------------------------------------------------------------
# Data: torchvision's CocoDetection, targets as the detectors take them


def load_coco(root, split, target_keys, train):
    """CocoDetection on root/{split}2017 with root/annotations/instances_{split}2017.json, its targets as tv_tensors
    (wrap_dataset_for_transforms_v2). For training, images without a usable (non-crowd, wider and taller than one
    pixel) annotation are dropped."""
    images, annotations = Path(root) / f"{split}2017", Path(root) / "annotations" / f"instances_{split}2017.json"
    if not annotations.is_file():
        raise InputError(f"{annotations}: no such annotation file")
    if not images.is_dir():
        raise InputError(f"{images}: no such image directory")
    usable = lambda a: not a.get("iscrowd", 0) and a["bbox"][2] > 1 and a["bbox"][3] > 1  # noqa: E731
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its loading on stdout
            dataset = CocoDetection(str(images), str(annotations))
        if train:
            dataset.ids = [i for i in dataset.ids if any(usable(a) for a in dataset.coco.imgToAnns[i])]
    except Exception as error:  # any parse or schema failure is one bad file
        raise InputError(f"{annotations}: not a COCO annotation file ({type(error).__name__}: {error})") from None
    if not dataset.ids:
        raise InputError(f"{annotations}: no {'usable annotated ' if train else ''}images")
    return wrap_dataset_for_transforms_v2(dataset, target_keys=target_keys)


class Prepared(Dataset):
    """A wrapped CocoDetection with crowd instances removed and a joint transform: items are (float (3, H, W) image
    in [0, 1], dict(image_id, boxes (N, 4) xyxy, labels (N,) category ids[, masks (N, H, W) uint8]))."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image, target = self.dataset[index]
        except OSError as error:
            raise InputError(f"image {self.dataset.ids[index]} of {self.dataset.root}: unreadable ({error})") from None
        if "iscrowd" in target:  # crowd regions are not objects to learn: dropped, as torchvision's references do
            keep = torch.tensor(target.pop("iscrowd")) == 0
            target["boxes"] = tv_tensors.wrap(target["boxes"][keep], like=target["boxes"])
            target["labels"] = target["labels"][keep]
            if "masks" in target:
                target["masks"] = tv_tensors.Mask(target["masks"][keep])
        return self.transform(image, target)


def transform(train):
    steps = [v2.ToImage()]
    if train:
        steps += [v2.RandomHorizontalFlip(), v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])  # the detectors normalise and resize


def collate(batch):
    return tuple(zip(*batch))  # (images, targets): the detectors take lists of differently sized images


def datasets(cfg, masks):
    """(train, val, category names by id, the val annotation file) from --data or the synthetic set."""
    root = cfg.data
    if not cfg.data:
        root = Path(cfg.output) / f"synthetic-{cfg.min_size}px"
    elif not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: no such data directory")
    keys = {"image_id", "boxes", "labels", "iscrowd"} | ({"masks"} if masks else set())
    train = None if cfg.eval_only else Prepared(load_coco(root, "train", keys, train=True), transform(train=True))
    val = Prepared(load_coco(root, "val", {"image_id"}, train=False), transform(train=False))
    names = {c["id"]: c["name"] for c in val.dataset.coco.cats.values()}
    return train, val, names, Path(root) / "annotations" / "instances_val2017.json"


# ----------------------------------------------------------------------------------------------------------------
# Backbones and detectors


class DGMN2FPN(nn.Module):
    """DGMN2's stage maps at the chosen levels (0-3: strides 4-32) into an FPN of 256 channels, as torchvision's
    detectors take it. The release's necks: RetinaNet's levels 1-3 with P6 and P7 computed from C5 ("on input"),
    Mask R-CNN's levels 0-3 with a max-pooled P6. (B, 3, H, W) -> OrderedDict of (B, 256, H / s, W / s) maps, finest
    first, named "0", "1", ... then "p6", "p7" or "pool"."""

    def __init__(self, variant, levels, extra_levels, out_channels=256):
        super().__init__()
        self.body = dgmn2.build(variant, num_classes=0)
        self.levels = levels
        extra = LastLevelP6P7(self.body.channels[-1], out_channels) if extra_levels == "p6p7" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([self.body.channels[i] for i in levels], out_channels, extra)
        self.out_channels = out_channels

    def forward(self, images):
        maps = self.body.forward_features(images)
        return self.fpn(OrderedDict((str(n), maps[level]) for n, level in enumerate(self.levels)))


def build_model(cfg, num_classes, pretrained=False):
    """The detector of cfg.model for num_classes (COCO: 91, its own category ids with 0 the background). DGMN2: see
    DGMN2FPN. R-50: torchvision's ResNet-50-FPN, with frozen BN and frozen stem and res2 when it starts from pretrained
    weights, as in Detectron's 1x (trained from scratch, all of it trains with ordinary BN, as torchvision does);
    DGMN modules go after the 3x3 convs of the chosen stages with COCO's rates (1, 4, 8, 12)."""
    spec = MODELS[cfg.model]
    sizes = dict(min_size=cfg.min_size, max_size=cfg.max_size)
    if spec.backbone == "r50":
        backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None,
                                       norm_layer=FrozenBatchNorm2d if pretrained else nn.BatchNorm2d,
                                       trainable_layers=3 if pretrained else 5)
        if spec.dgmn_stages:
            dgmn.insert_into_resnet(backbone.body, stages=spec.dgmn_stages, rates=dgmn.COCO_RATES)
        return MaskRCNN(backbone, num_classes, box_batch_size_per_image=cfg.rois, **sizes)
    if spec.detector == "retinanet":
        backbone = DGMN2FPN(spec.backbone, (1, 2, 3), "p6p7")
        return RetinaNet(backbone, num_classes, detections_per_img=100, **sizes)  # COCO scores 100 a picture
    return MaskRCNN(DGMN2FPN(spec.backbone, (0, 1, 2, 3), "pool"), num_classes, box_batch_size_per_image=cfg.rois,
                    **sizes)


def read_weights(path):
    if not Path(path).is_file():
        raise InputError(f"--pretrained {path}: no such file")
    try:  # the release's training script saves its argparse.Namespace beside the weights
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file
        raise InputError(f"--pretrained {path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None


def load_matching(module, weights):
    """module.load_state_dict(weights, strict=False) -> (missing, unexpected); a tensor of another shape counts as
    missing, named by torch's message."""
    try:
        return module.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        return [str(error).splitlines()[-1].strip()], []


def load_pretrained(model, state, path):
    """Backbone weights: an authors' DGMN2 checkpoint (dgmn2.load_official) or a train_imagenet.py checkpoint into a
    DGMN2 backbone; a torchvision ResNet-50 state dict into R-50 (the DGMN modules stay newly initialised). The
    classifier is left out."""
    body = model.backbone.body
    if isinstance(body, dgmn2.DGMN2):
        if isinstance(state, dict) and "config" in state:  # ours, from train_imagenet.py
            weights = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
            missing, unexpected = load_matching(body, weights)
            if missing or unexpected:
                raise InputError(f"--pretrained {path}: another DGMN2 variant ({(missing or unexpected)[0]})")
            return
        try:
            dgmn2.load_official(body, state)
        except ValueError as error:
            raise InputError(f"--pretrained {path}: {error}") from None
        return
    if not isinstance(state, dict):
        raise InputError(f"--pretrained {path}: not a state dict")
    missing, unexpected = load_matching(body, {k: v for k, v in state.items() if not k.startswith("fc.")})
    missing = [k for k in missing if ".dgmn." not in k]
    if missing or unexpected:
        raise InputError(f"--pretrained {path}: not a torchvision ResNet-50 state dict ({(missing or unexpected)[0]})")


def print_table():
    """Every model's parameters, with COCO's 91 category ids and with the paper's heads for 80 classes (mmdetection's
    RetinaNet scores 80 classes, its Mask R-CNN 80 + background), beside the paper's; frozen layers count, and BN
    affine weights too (as buffers of FrozenBatchNorm2d, they would not). Built on the meta device."""
    cfg = Config()
    print("| model | params, 91 ids (M) | params, 80 classes (M) | paper (M) | box AP paper | mask AP paper | source |")
    print("|---|---|---|---|---|---|---|")
    for name, spec in MODELS.items():
        cfg.model = name
        counts = []
        for classes in (91, 80 if spec.detector == "retinanet" else 81):
            with torch.device("meta"):
                counts.append(sum(p.numel() for p in build_model(cfg, classes).parameters()))
        print(f"| {name} | {counts[0] / 1e6:.2f} | {counts[1] / 1e6:.2f} | {spec.params_m or '-'} | {spec.box_ap} | "
              f"{spec.mask_ap or '-'} | {spec.table} |")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: detections in COCO's result format, scored by pycocotools on rank 0


def to_coco_results(output, image_id):
    """One image's detections (xyxy boxes, labels = category ids, scores, [masks (N, 1, H, W) probabilities]) as COCO
    result dicts: xywh boxes, masks thresholded at 0.5 and RLE-encoded. Two lists: bbox and segm results."""
    boxes = box_convert(output["boxes"].float(), "xyxy", "xywh").tolist()
    labels, scores = output["labels"].tolist(), output["scores"].float().tolist()
    bbox = [dict(image_id=image_id, category_id=c, bbox=[round(v, 2) for v in b], score=round(s, 4))
            for b, c, s in zip(boxes, labels, scores)]
    segm = []
    if "masks" in output:
        for mask, c, s in zip((output["masks"][:, 0] > 0.5).cpu(), labels, scores):
            segm.append(dict(image_id=image_id, category_id=c, segmentation=mask_to_rle(mask), score=round(s, 4)))
    return bbox, segm


def coco_metrics(ground_truth, results, iou_type):
    """COCOeval's AP, AP50, AP75, APs, APm, APl (%) of the results against a COCO object; None where the ground truth
    has no object of that size. It prints COCO's summary."""
    with contextlib.redirect_stdout(io.StringIO()):  # loading and matching chatter
        if results:
            detections = ground_truth.loadRes(results)
        else:  # loadRes refuses an empty list
            detections = COCO()
            detections.dataset = dict(images=ground_truth.dataset["images"], annotations=[],
                                      categories=ground_truth.dataset["categories"])
            detections.createIndex()
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
    print(f"COCO {iou_type}:")
    evaluator.summarize()
    return {m: None if v < 0 else round(100 * v, 2) for m, v in zip(METRICS, evaluator.stats[:6].tolist())}


def summary(metrics):
    return ", ".join(f"{t} AP {'-' if m['AP'] is None else format(m['AP'], '.1f')}" for t, m in metrics.items())


PALETTE = [tuple(c) for c in torch.randint(64, 256, (256, 3), generator=torch.Generator().manual_seed(0)).tolist()]


def draw(image, output, names):
    """uint8 (3, H, W) image with the detections scoring at least DRAW_SCORE: masks, boxes, names and scores."""
    keep = output["scores"] >= DRAW_SCORE
    if not keep.any():
        return image
    labels = output["labels"][keep].tolist()
    colours = [PALETTE[c % len(PALETTE)] for c in labels]
    if "masks" in output:
        image = draw_segmentation_masks(image, output["masks"][keep, 0] > 0.5, alpha=0.5, colors=colours)
    captions = [f"{names.get(c, c)} {s:.2f}" for c, s in zip(labels, output["scores"][keep].tolist())]
    return draw_bounding_boxes(image, output["boxes"][keep].float(), captions, colors=colours, width=2)


@torch.no_grad()
def evaluate(model, val, names, annotation_file, cfg, device, autocast, rank, world, output=None, tag=""):
    """COCO box (and mask) metrics over the validation set: rank r detects images r, r + world, ...; rank 0 gathers the
    detections, evaluates them once with pycocotools and, with output, writes them as COCO result JSON
    (detections-bbox.json, detections-segm.json) and saves its first cfg.pictures images with their detections under
    output/pictures-{tag}/. Returns dict(bbox={metric: AP}, segm=...) on rank 0 (segm for Mask R-CNN), else None."""
    model.eval()
    mine = Subset(val, range(rank, len(val), world))
    loader = DataLoader(mine, batch_size=max(cfg.batch_size // world, 1), collate_fn=collate,
                        num_workers=cfg.workers)
    results = dict(bbox=[], segm=[])
    pictures = output / f"pictures-{tag}" if output is not None and rank == 0 and cfg.pictures else None
    shown = 0
    for images, targets in tqdm(loader, desc="eval", disable=rank != 0, leave=False):
        with autocast:
            detections = model([image.to(device) for image in images])
        for image, target, detection in zip(images, targets, detections):
            bbox, segm = to_coco_results(detection, target["image_id"])
            results["bbox"] += bbox
            results["segm"] += segm
            if pictures and shown < cfg.pictures:
                pictures.mkdir(parents=True, exist_ok=True)
                picture = draw((image * 255).round().to(torch.uint8), {k: v.cpu() for k, v in detection.items()}, names)
                v2.functional.to_pil_image(picture).save(pictures / f"{target['image_id']}.png")
                shown += 1
    model.train()
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank == 0:
            results = {k: [r for part in gathered for r in part[k]] for k in results}
    if rank != 0:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(annotation_file))
    types = ["bbox", "segm"] if MODELS[cfg.model].detector == "maskrcnn" else ["bbox"]
    metrics = {}
    for iou_type in types:
        if output is not None:
            path = output / f"detections-{iou_type}.json"
            path.with_suffix(".tmp").write_text(json.dumps(results[iou_type]))
            os.replace(path.with_suffix(".tmp"), path)
        metrics[iou_type] = coco_metrics(ground_truth, results[iou_type], iou_type)
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Training


def save_checkpoint(state, output, iteration):
    """Written to a temporary file, synced, then renamed: a kill never leaves a broken checkpoint."""
    path = Path(output) / f"checkpoint-{iteration:07d}.pth"
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    for old in Path(output).glob("checkpoint-*.pth"):
        if old != path:
            old.unlink()
    return path


def find_checkpoint(cfg):
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = sorted(Path(cfg.output).glob("checkpoint-*.pth"))
        return found[-1] if found else None
    if not Path(cfg.resume).is_file():
        raise InputError(f"{cfg.resume}: no such checkpoint")
    return Path(cfg.resume)


def read_checkpoint(path, cfg):
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file
        raise InputError(f"{path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    keys = {"model", "optimizer", "scheduler", "scaler", "iteration", "plan", "num_classes", "config"}
    if not isinstance(state, dict) or not keys <= state.keys():
        raise InputError(f"{path}: not a checkpoint of this script (use --pretrained for backbone weights)")
    # the weights; where in the data the run stands, the seeds of its chunks, what the optimizer state keeps
    for name in ("model", "batch_size", "seed", "save_every", "weight_decay"):
        if state["config"][name] != getattr(cfg, name) and not (cfg.eval_only and name != "model"):
            raise InputError(f"{path}: saved with --{name.replace('_', '-')} {state['config'][name]!r}, not "
                             f"{getattr(cfg, name)!r}")
    return state


def check(cfg):
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"unknown --{name} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    for name in ["batch_size", "min_size", "max_size", "rois", "save_every", "synthetic_train", "synthetic_val"]:
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["iterations", "eval_every", "warmup", "lr", "warmup_factor", "weight_decay", "workers"]:
        if getattr(cfg, name) < 0:
            raise InputError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")
    if not re.fullmatch(r"(\d+(,\d+)*)?", cfg.lr_steps) or cfg.lr_steps and any(
            a >= b for a, b in itertools.pairwise(int(s) for s in cfg.lr_steps.split(","))):
        raise InputError(f"--lr-steps {cfg.lr_steps!r}: give increasing iterations separated by commas, e.g. "
                         "60000,80000")
    if cfg.min_size > cfg.max_size:
        raise InputError(f"--min-size {cfg.min_size} exceeds --max-size {cfg.max_size}")
    if cfg.eval_only and not cfg.resume:
        raise InputError("--eval-only needs the model to evaluate: --resume CKPT")


def amp_dtype(cfg, device):
    """bf16 on GPUs that have it, else fp16 (with a GradScaler); off on CPU."""
    if cfg.amp == "auto":
        if device.type == "cpu":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return dict(bf16=torch.bfloat16, fp16=torch.float16, off=None)[cfg.amp]


def setup_distributed():
    """(rank, world size, device) from torchrun's environment; a single process without it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    # rank 0 alone scores COCO (minutes for 5,000 images' masks) while the others wait: a longer timeout than 10 min
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size(), device


def main(cfg):
    """Train (or evaluate) as cfg says. Returns the last evaluation's metrics (on rank 0)."""
    check(cfg)
    if cfg.table:
        return print_table()
    rank, world, device = setup_distributed()
    try:
        return _run(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def batches(train, sampler, local_batch, per_epoch, first, cfg, device):
    """The training batches from iteration `first` on, epoch after epoch: the sampler's order for each epoch, skipping
    the batches of the epoch that came before `first`, so a resumed run sees the images an uninterrupted one would."""
    epoch, skip = divmod(first, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)[skip * local_batch:per_epoch * local_batch]
        yield from DataLoader(train, local_batch, sampler=order, collate_fn=collate, num_workers=cfg.workers,
                              pin_memory=device.type == "cuda", drop_last=True)
        epoch, skip = epoch + 1, 0


def _run(cfg, rank, world, device):
    log = print if rank == 0 else lambda *args, **kwargs: None
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    spec = MODELS[cfg.model]
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    choice = [find_checkpoint(cfg) if rank == 0 else None]  # --output must be seen by every node
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    checkpoint = choice[0]
    if checkpoint is None and cfg.eval_only:
        raise InputError(f"--eval-only --resume auto: no checkpoint in {cfg.output}")
    if checkpoint is None and not cfg.eval_only and list(Path(cfg.output).glob("checkpoint-*.pth")):
        raise InputError(f"{cfg.output} holds another run's checkpoints: continue it with --resume auto, or choose "
                         "another --output")
    state = read_checkpoint(checkpoint, cfg) if checkpoint else None
    weights = read_weights(cfg.pretrained) if cfg.pretrained and not state else None  # a checkpoint has them
    output = Path(cfg.output)
    if not cfg.data:
        log(f"No --data: the built-in synthetic shapes ({len(SHAPES)} classes, {cfg.min_size} x {cfg.min_size}, "
            f"{cfg.synthetic_train} training images) in COCO's format under {output}.")
        if rank == 0:
            splits = dict(val=cfg.synthetic_val) if cfg.eval_only else dict(train=cfg.synthetic_train,
                                                                            val=cfg.synthetic_val)
            write_synthetic(output / f"synthetic-{cfg.min_size}px", cfg.min_size, splits)
        if world > 1:
            dist.barrier()
    train, val, names, annotation_file = datasets(cfg, masks=spec.detector == "maskrcnn")
    num_classes = state["num_classes"] if state else 1 + max(names.keys() | train.dataset.coco.cats.keys())
    pretrained = bool(state["config"]["pretrained"] if state else weights is not None)  # frozen BN or not
    model = build_model(cfg, num_classes, pretrained=pretrained)
    if weights is not None:
        load_pretrained(model, weights, cfg.pretrained)
    elif cfg.data and not state:
        log("No --pretrained: the backbone trains from scratch (the paper starts from ImageNet weights).")
    model = model.to(device)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters at {num_classes} "
        f"classes (paper: {spec.params_m or '-'}M at 80, {spec.table}; python train_coco.py --table); "
        f"{world} process(es) on {device.type}")
    local_batch = cfg.batch_size // world
    sampler = None if cfg.eval_only else DistributedSampler(train, world, rank, shuffle=True, seed=cfg.seed,
                                                            drop_last=True)
    per_epoch = len(sampler) // local_batch if sampler else 1
    if sampler and per_epoch == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch")
    plan = recipe(cfg, per_epoch)
    trainable = [p for p in model.parameters() if p.requires_grad]  # R-50's frozen stem and res2 stay out
    if plan["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(trainable, lr=plan["lr"], momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=plan["lr"], weight_decay=cfg.weight_decay)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda iteration: lr_factor(iteration, plan))
    dtype = amp_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0
    if state:
        try:
            model.load_state_dict(state["model"])
            if not cfg.eval_only:
                optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{checkpoint}: does not fit this model ({str(error).splitlines()[-1].strip()})") from None
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty unless the run used fp16
            scaler.load_state_dict(state["scaler"])
        if not cfg.eval_only and state["plan"] != plan:  # what the rest of the run depends on
            changed = [k for k in plan if state["plan"][k] != plan[k]]
            raise InputError(f"{checkpoint}: saved with " + ", ".join(f"{k} {state['plan'][k]}" for k in changed) +
                             "; now " + ", ".join(f"{k} {plan[k]}" for k in changed) + " (other flags or data)")
        start = state["iteration"]
        log(f"Resumed from {checkpoint} at iteration {start}.")
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    evaluation = lambda tag: evaluate(model, val, names, annotation_file, cfg, device, autocast,  # noqa: E731
                                      rank, world, output, tag)
    if cfg.eval_only:
        metrics = evaluation("eval")
        if rank == 0:
            log(f"eval: {summary(metrics)}")
        return metrics

    total = plan["iterations"]
    if start >= total:
        log(f"{checkpoint} has finished all {total} iterations: nothing to train.")
    log(f"{plan['optimizer']}, lr {plan['lr']:g}, {total} iterations of {cfg.batch_size} images ({per_epoch} an "
        f"epoch), lr x 0.1 after {plan['steps']}")
    trained = DistributedDataParallel(model) if world > 1 else model
    ends = sorted({*range(cfg.save_every, total, cfg.save_every), *range(plan["eval_every"], total,
                                                                         plan["eval_every"]), total})
    metrics = None
    chunk_start = start
    for chunk_end in (end for end in ends if end > start):
        # Every random choice between two checkpoints follows from (seed, iteration, rank): a resumed run repeats
        # exactly what the interrupted one would have done.
        torch.manual_seed(cfg.seed * 1_000_003 + chunk_start * world + rank)
        stream = batches(train, sampler, local_batch, per_epoch, chunk_start, cfg, device)
        bar = tqdm(range(chunk_start, chunk_end), desc=f"iterations {chunk_start}-{chunk_end}", disable=rank != 0,
                   leave=False)
        started, total_loss = time.time(), torch.zeros((), device=device)
        for _ in bar:
            images, targets = next(stream)
            images = [image.to(device, non_blocking=True) for image in images]
            targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
                       for t in targets]
            with autocast:
                loss = sum(trained(images, targets).values())  # the detector's losses, each weighted 1
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss = loss.detach()
            if world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            if not torch.isfinite(loss):
                last = sorted(output.glob("checkpoint-*.pth"))
                raise TrainingError(f"the loss is {loss.item()} at iteration {scheduler.last_epoch}; stopped, the "
                                    f"last good checkpoint is {last[-1] if last else 'none yet'}")
            total_loss += loss
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        stream.close()
        record = dict(iteration=chunk_end, loss=total_loss.item() / (chunk_end - chunk_start),
                      seconds=time.time() - started)
        chunk_start = chunk_end
        if chunk_end % plan["eval_every"] == 0 or chunk_end == total:
            if world > 1:  # BN statistics (DGMN2's stems, R-50 from scratch) differ by rank: evaluate rank 0's
                for buffer in model.buffers():
                    dist.broadcast(buffer, src=0)
            metrics = evaluation(f"{chunk_end:07d}")
            if rank == 0:
                record.update(metrics)
        if rank == 0:
            with open(output / "log.jsonl", "a") as file:  # before the checkpoint: a kill between loses no record
                file.write(json.dumps(record) + "\n")
            path = save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                        iteration=chunk_end, plan=plan, num_classes=num_classes,
                                        config=dataclasses.asdict(cfg)),
                                   output, chunk_end)
            scores = summary({t: m for t, m in record.items() if isinstance(m, dict)})
            log(f"iteration {chunk_end}/{total}: loss {record['loss']:.3f}{'; ' + scores if scores else ''}; "
                f"saved {path}")
        if world > 1:
            dist.barrier()
    return metrics


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (InputError, TrainingError) as error:
        # An error raised in a DataLoader worker arrives wrapped in that worker's traceback: keep its own line.
        message = re.sub(r"^[\w.]*(InputError|TrainingError): ", "", str(error).strip().splitlines()[-1])
        sys.exit(f"train_coco.py: error: {message}")
