"""Semantic segmentation on Cityscapes: DGMN2 + Semantic FPN (Section 6.3, Table 11) and the dilated FCN with the DGMN
module (Section 5, Tables 2 and 4); training, sliding-window evaluation, DDP through torchrun.

Paper targets, mIoU on Cityscapes val (single scale / multi-scale + flip): DGMN2-Tiny/Small/Medium/Large + Semantic
FPN 78.09/79.40, 80.65/81.58, 80.60/81.79, 81.75/82.64; dilated FCN ResNet-101 75.0, + DGMN (DA+DW+DS) 80.4.

    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                                         # Table 11 (AdamW 1e-4, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model fcn-dgmn --data /path/to/cityscapes \\
        --pretrained resnet101.pth                                          # Table 2 (SGD 0.01, 40k iterations)
    torchrun train_cityscapes.py                  # no --data: the built-in synthetic scenes, a few minutes on a CPU

Models (--model): dgmn2-{tiny,small,medium,large} (+ Semantic FPN; --output-stride 8 for Section 6.3's stride-1
stages 3-4), fcn (the dilated FCN baseline), fcn-da, fcn-da-dw, fcn-dgmn (Table 2's DGMN rows). --pretrained takes
a torchvision ResNet-101 state dict, an authors' DGMN2 checkpoint or a train_imagenet.py checkpoint; nothing is
downloaded. Every knob is a flag: python train_cityscapes.py --help.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import tv_tensors
from torchvision.datasets import Cityscapes
from torchvision.models import resnet101
from torchvision.ops import FeaturePyramidNetwork
from torchvision.transforms import v2
from torchvision.utils import save_image
from tqdm import tqdm

import dgmn
import dgmn2

IGNORE = 255
IMAGENET_MEAN, IMAGENET_STD = dgmn2.IMAGENET_MEAN, dgmn2.IMAGENET_STD
FCN_VARIANTS = {  # Table 2's rows: the DGMN module's switches, None for the FCN baseline
    "fcn": None,
    "fcn-da": dgmn.TABLE_2["DGMN w/ DA"].options,
    "fcn-da-dw": dgmn.TABLE_2["DGMN w/ DA+DW"].options,
    "fcn-dgmn": dgmn.TABLE_2["DGMN w/ DA+DW+DS"].options,
}
MODELS = [f"dgmn2-{name}" for name in dgmn2.VARIANTS] + list(FCN_VARIANTS)

# ----------------------------------------------------------------------------------------------------------------
# Configuration: the paper's recipes by default; SYNTHETIC replaces what no flag set when there is no --data


@dataclass
class Config:
    model: str = "dgmn2-tiny"
    data: str = ""                      # Cityscapes root (leftImg8bit/, gtFine/); empty: the built-in synthetic set
    output: str = "runs/cityscapes"
    pretrained: str = ""                # backbone weights (see the module docstring)
    iterations: int = 40_000
    batch_size: int = 8                 # global, split over the processes
    optimizer: str = "auto"             # auto: adamw for DGMN2 (lr 1e-4), sgd for the FCNs (lr 0.01, momentum 0.9)
    lr: float = 0.0                     # 0: the optimizer's paper value
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    output_stride: int = 32             # DGMN2 only: 8 for stride-1 patch embeddings in stages 3-4 (Section 6.3)
    base_size: int = 1024               # the shorter side that the scale ratio multiplies (Cityscapes: 2048 x 1024)
    scale_min: float = 0.5
    scale_max: float = 2.0
    crop: int = 769
    eval_stride: int = 513              # sliding-window stride at evaluation
    eval_every: int = 4000              # iterations between evaluations and checkpoints
    multi_scale: bool = False           # evaluate at scales 0.5-1.75 with flips as well
    pictures: int = 4                   # colourised predictions saved at each evaluation
    amp: str = "auto"
    workers: int = 4
    seed: int = 0
    resume: str = ""                    # a checkpoint, or "auto": the newest in --output
    eval_only: bool = False
    synthetic_train: int = 2000
    synthetic_val: int = 100


SYNTHETIC = dict(iterations=400, batch_size=16, lr=1e-3, base_size=64, crop=64, eval_stride=48, eval_every=100,
                 workers=1, output="runs/synthetic-segmentation")
CHOICES = dict(model=MODELS, optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


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
    return Config(**{**defaults, **given})


# ----------------------------------------------------------------------------------------------------------------
# The built-in synthetic set: scenes to segment


class Scenes(Dataset):
    """A learnable stand-in for Cityscapes: a sky and a ground region split by a random horizon, and 2-4 shapes
    (disc, square, triangle, bar) of random size, position and rotation, coloured around a colour of their class,
    with noise. Each pixel is labelled
    with what is drawn there. Scene i is a function of (seed, i). Items: (uint8 (3, S, S) image, uint8 (S, S) label)."""

    classes = ["sky", "ground", "disc", "square", "triangle", "bar"]
    colours = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.9, 0.8, 0.1], [0.8, 0.3, 0.9]])  # of the shapes

    def __init__(self, size, length, seed):
        self.size, self.length, self.seed = size, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        rand = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
        S = self.size
        y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
        horizon = (rand(1) - 0.5) * 0.8 + (rand(1) - 0.5) * 0.6 * x
        label = torch.where(y < horizon, 0, 1)
        sky, ground = rand(3, 1, 1) * 0.5 + torch.tensor([0.2, 0.3, 0.5]).view(3, 1, 1), rand(3, 1, 1) * 0.6
        image = torch.where(label == 0, sky, ground) + 0.1 * rand(3, 1, 1) * y
        for _ in range(2 + int(rand(1) * 3)):
            kind = 2 + int(rand(1) * 4)
            scale, angle = 0.2 + 0.25 * rand(1), 2 * math.pi * rand(1)
            cy, cx = (rand(2) - 0.5) * 1.8
            cos, sin = angle.cos(), angle.sin()
            u, v = (cos * (x - cx) + sin * (y - cy)) / scale, (-sin * (x - cx) + cos * (y - cy)) / scale
            inside = [u ** 2 + v ** 2 < 0.8, (u.abs() < 0.7) & (v.abs() < 0.7),
                      (v < 0.6) & (v > 1.9 * u.abs() - 0.9), (u.abs() < 0.95) & (v.abs() < 0.25)][kind - 2]
            hue = self.colours[kind - 2].view(3, 1, 1)  # each class has its own colour family
            image = torch.where(inside, (0.7 * hue + 0.3 * rand(3, 1, 1)).clamp(0, 1), image)
            label = torch.where(inside, kind, label)
        image = (image + 0.04 * torch.randn(3, S, S, generator=g)).clamp(0, 1)
        return (image * 255).round().to(torch.uint8), label.to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Data


class CityscapesTrainIds(Dataset):
    """torchvision's Cityscapes (fine, semantic) with labelIds mapped to the 19 train ids (others: 255)."""

    def __init__(self, root, split):
        try:
            self.dataset = Cityscapes(root, split=split, mode="fine", target_type="semantic")
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{root}: not a Cityscapes directory for split {split!r} ({error})") from None
        if len(self.dataset) == 0:
            raise InputError(f"{root}: no {split} images under leftImg8bit/{split}")
        self.lut = torch.full((256,), IGNORE, dtype=torch.uint8)
        for c in Cityscapes.classes:
            if c.id >= 0:
                self.lut[c.id] = c.train_id if c.train_id not in (-1, 255) else IGNORE
        self.classes = [c.name for c in Cityscapes.classes if c.train_id not in (-1, 255)]

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            image, target = self.dataset[index]
        except OSError as error:
            raise InputError(f"{self.dataset.images[index]}: unreadable ({error})") from None
        label_ids = torch.as_tensor(v2.functional.pil_to_tensor(target))[0].long()  # (H, W) labelIds
        return v2.functional.pil_to_tensor(image), self.lut[label_ids]


def train_transform(cfg):
    """Random resize (shorter side base_size x [scale_min, scale_max]), crop (image padded with 0, label with 255),
    flip, photometric distortion, normalisation. (uint8 image, label) -> (float (3, crop, crop), long (crop, crop))."""
    return v2.Compose([
        v2.RandomResize(int(cfg.base_size * cfg.scale_min), int(cfg.base_size * cfg.scale_max) + 1),
        v2.RandomCrop(cfg.crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05),
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform():
    return v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
                       v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class Apply(Dataset):
    """A (image, label) dataset with a joint transform; the label is a tv_tensors.Mask, so it is resized with
    nearest neighbours and never colour-jittered."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(tv_tensors.Image(image), tv_tensors.Mask(label))


def datasets(cfg):
    """(train, val, class names)."""
    if not cfg.data:
        return Scenes(cfg.base_size, cfg.synthetic_train, 1), Scenes(cfg.base_size, cfg.synthetic_val, 2), \
            Scenes.classes
    if not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: no such data directory")
    train, val = CityscapesTrainIds(cfg.data, "train"), CityscapesTrainIds(cfg.data, "val")
    return train, val, train.classes


# ----------------------------------------------------------------------------------------------------------------
# Models


class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al.) on the four DGMN2 maps: an FPN (256 channels), then per level 3x3 Conv-BN-ReLU
    units of 128 channels, each but the finest followed by a 2x upsampling, until stride 4; the sum, dropout 0.1 and
    a 1x1 classifier, upsampled to the input. (B, 3, H, W) -> (B, classes, H, W)."""

    def __init__(self, backbone, classes, fpn_channels=256, head_channels=128):
        super().__init__()
        self.backbone = backbone
        self.fpn = FeaturePyramidNetwork(backbone.channels, fpn_channels)
        self.scales = nn.ModuleList()
        for stride in backbone.strides:
            units = max(int(math.log2(stride // backbone.strides[0])), 1)  # 2x upsamplings to the finest map, >= 1
            self.scales.append(nn.Sequential(*[
                nn.Sequential(nn.Conv2d(fpn_channels if u == 0 else head_channels, head_channels, 3, padding=1,
                                        bias=False), nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True))
                for u in range(units)]))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(head_channels, classes, 1))

    def forward(self, images):
        maps = self.backbone.forward_features(images)
        pyramid = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        finest = maps[0].shape[-2:]
        fused = 0
        for level, scale in zip(pyramid.values(), self.scales):
            for unit in scale:
                level = unit(level)
                if level.shape[-2:] != finest:
                    level = F.interpolate(level, scale_factor=2, mode="bilinear", align_corners=False)
            fused = fused + F.interpolate(level, size=finest, mode="bilinear", align_corners=False)  # exact sizes
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=False)


class DilatedFCN(nn.Module):
    """Section 5.1: ResNet-101 at output stride 8 (dilated layer3-4), a 3x3 Conv-BN-ReLU to 512 channels, the DGMN
    module (or nothing: the FCN baseline), dropout 0.1 and a 1x1 classifier, upsampled to the input.
    (B, 3, H, W) -> (B, classes, H, W)."""

    def __init__(self, classes, dgmn_options=None, channels=512):
        super().__init__()
        self.backbone = resnet101(replace_stride_with_dilation=[False, True, True])
        self.backbone.fc = nn.Identity()  # unused: DDP requires every parameter to take part
        self.reduce = nn.Sequential(nn.Conv2d(2048, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                                    nn.ReLU(inplace=True))
        self.dgmn = dgmn.DGMN(channels, **dgmn_options) if dgmn_options else nn.Identity()
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, classes, 1))

    def forward(self, images):
        r = self.backbone
        x = r.maxpool(r.relu(r.bn1(r.conv1(images))))
        x = r.layer4(r.layer3(r.layer2(r.layer1(x))))  # (B, 2048, H / 8, W / 8)
        logits = self.classifier(self.dgmn(self.reduce(x)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)


def build_model(cfg, classes):
    if cfg.model in FCN_VARIANTS:
        return DilatedFCN(classes, FCN_VARIANTS[cfg.model])
    backbone = dgmn2.build(cfg.model.removeprefix("dgmn2-"), num_classes=0, output_stride=cfg.output_stride)
    return SemanticFPN(backbone, classes)


def load_pretrained(model, path):
    """Backbone weights from a local file: a torchvision ResNet state dict (for the FCNs), an authors' DGMN2
    checkpoint (dgmn2.load_official) or a train_imagenet.py checkpoint (for DGMN2). The classifier is left out."""
    if not Path(path).is_file():
        raise InputError(f"--pretrained {path}: no such file")
    backbone = model.backbone
    if isinstance(backbone, dgmn2.DGMN2):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # any unpickling failure is one bad file
            raise InputError(f"--pretrained {path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
        if isinstance(state, dict) and "config" in state:  # ours, from train_imagenet.py
            weights = {k: v for k, v in state["model"].items() if not k.startswith("head.")}
            missing, unexpected = backbone.load_state_dict(weights, strict=False)
            if missing or unexpected:
                raise InputError(f"--pretrained {path}: another DGMN2 variant ({(missing or unexpected)[0]})")
            return
        try:
            dgmn2.load_official(backbone, state)
        except ValueError as error:
            raise InputError(f"--pretrained {path}: {error}") from None
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file
        raise InputError(f"--pretrained {path}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise InputError(f"--pretrained {path}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"--pretrained {path}: not a torchvision ResNet-101 state dict ({(missing or unexpected)[0]})")


# ----------------------------------------------------------------------------------------------------------------
# Evaluation: sliding windows, scales and flips; mIoU from a confusion matrix


def sliding_window(model, image, classes, window, stride):
    """Logits of a (1, 3, H, W) image from windows of window x window placed every stride pixels (the last flush
    with the border), averaged where they overlap; an image smaller than the window is padded. -> (1, classes, H, W)."""
    _, _, H, W = image.shape
    padded = F.pad(image, (0, max(window - W, 0), 0, max(window - H, 0)))
    PH, PW = padded.shape[-2:]
    logits = image.new_zeros(1, classes, PH, PW)
    count = image.new_zeros(1, 1, PH, PW)
    rows = sorted({min(r, PH - window) for r in range(0, max(PH - window, 0) + stride, stride)})
    cols = sorted({min(c, PW - window) for c in range(0, max(PW - window, 0) + stride, stride)})
    for r in rows:
        for c in cols:
            logits[..., r:r + window, c:c + window] += model(padded[..., r:r + window, c:c + window]).float()
            count[..., r:r + window, c:c + window] += 1
    return (logits / count)[..., :H, :W]


def predict(model, image, classes, cfg):
    """Class scores of one image: sliding windows at scale 1, or averaged over MULTI_SCALES and flips."""
    if not cfg.multi_scale:
        return sliding_window(model, image, classes, cfg.crop, cfg.eval_stride).softmax(dim=1)
    H, W = image.shape[-2:]
    total = 0
    for scale in MULTI_SCALES:
        scaled = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        for flip in (False, True):
            view = scaled.flip(-1) if flip else scaled
            scores = sliding_window(model, view, classes, cfg.crop, cfg.eval_stride).softmax(dim=1)
            scores = scores.flip(-1) if flip else scores
            total = total + F.interpolate(scores, size=(H, W), mode="bilinear", align_corners=False)
    return total


def confusion(prediction, label, classes):
    """(classes, classes) counts of (true, predicted) over the pixels whose label is not ignored."""
    keep = label != IGNORE
    return torch.bincount(label[keep] * classes + prediction[keep], minlength=classes ** 2).view(classes, classes)


def iou(matrix):
    """Per-class IoU (%) from a confusion matrix: TP / (TP + FP + FN); NaN for a class absent from both."""
    matrix = matrix.double()
    tp = matrix.diag()
    return 100 * tp / (matrix.sum(0) + matrix.sum(1) - tp)


PALETTE = torch.tensor([c.color for c in Cityscapes.classes if c.train_id not in (-1, 255)], dtype=torch.uint8)


def colourise(label):
    """(H, W) class ids -> (3, H, W) uint8 in the Cityscapes palette; ignored pixels black."""
    colours = torch.cat([PALETTE, torch.zeros(256 - len(PALETTE), 3, dtype=torch.uint8)])
    return colours[label.long()].permute(2, 0, 1)


@torch.no_grad()
def evaluate(model, val, class_names, cfg, device, autocast, rank, world, pictures_to=None):
    """Exact mIoU and per-class IoU over the validation set (and the number of labelled pixels counted): rank r takes
    images r, r + world, ... and the confusion matrices are summed over ranks. Rank 0 saves its first cfg.pictures
    predictions beside their labels."""
    model.eval()
    classes = len(class_names)
    matrix = torch.zeros(classes, classes, dtype=torch.long, device=device)
    mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    shown = []
    for i in tqdm(range(rank, len(val), world), desc="eval", disable=rank != 0, leave=False):
        image, label = val[i]
        image, label = image.to(device)[None], label.to(device)
        with autocast:
            prediction = predict(model, image, classes, cfg).argmax(dim=1)[0]
        matrix += confusion(prediction, label, classes)
        if pictures_to and rank == 0 and len(shown) < 3 * cfg.pictures:  # 3 tiles a picture
            picture = (image[0] * std + mean).clamp(0, 1)
            shown += [picture, colourise(label) / 255, colourise(prediction) / 255]
    if world > 1:
        dist.all_reduce(matrix)
    if shown:
        save_image(torch.stack(shown), pictures_to, nrow=3)
    model.train()
    per_class = iou(matrix)
    return dict(miou=per_class.nanmean().item(), pixels=int(matrix.sum()),  # absent classes: None (JSON has no NaN)
                iou={n: None if math.isnan(v) else round(v, 2) for n, v in zip(class_names, per_class.tolist())})


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
    if not isinstance(state, dict) or "config" not in state:
        raise InputError(f"{path}: not a checkpoint of this script (use --pretrained for backbone weights)")
    for name in ("model", "output_stride", "optimizer", "iterations"):  # what the weights and schedule depend on
        if state["config"][name] != getattr(cfg, name) and not (cfg.eval_only and name in ("optimizer", "iterations")):
            raise InputError(f"{path}: saved with --{name.replace('_', '-')} {state['config'][name]}, not "
                             f"{getattr(cfg, name)}")
    return state


def check(cfg):
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"unknown --{name} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    for name in ["iterations", "batch_size", "crop", "eval_stride", "eval_every", "base_size", "synthetic_train",
                 "synthetic_val"]:
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_stride > cfg.crop:
        raise InputError(f"--eval-stride {cfg.eval_stride} exceeds the window --crop {cfg.crop}: pixels would be "
                         "missed")
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
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def main(cfg):
    """Train (or evaluate) as cfg says. Returns the last evaluation's metrics."""
    check(cfg)
    rank, world, device = setup_distributed()
    try:
        return _run(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(cfg, rank, world, device):
    log = print if rank == 0 else lambda *args, **kwargs: None
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
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
    if not cfg.data:
        log(f"No --data: training on the built-in synthetic scenes ({len(Scenes.classes)} classes, "
            f"{cfg.base_size} x {cfg.base_size}, {cfg.synthetic_train} images).")
    train, val, class_names = datasets(cfg)
    val = Apply(val, eval_transform())

    model = build_model(cfg, len(class_names))
    if cfg.pretrained:
        load_pretrained(model, cfg.pretrained)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {world} process(es) on "
        f"{device.type}")
    optimizer_name = cfg.optimizer if cfg.optimizer != "auto" else "sgd" if cfg.model in FCN_VARIANTS else "adamw"
    lr = cfg.lr or dict(adamw=1e-4, sgd=0.01)[optimizer_name]
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=cfg.iterations, power=cfg.poly_power)
    dtype = amp_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    criterion = nn.CrossEntropyLoss(ignore_index=IGNORE)
    start = 0
    if state:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{checkpoint}: does not fit this model ({str(error).splitlines()[1].strip()})") from None
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty unless the run used fp16
            scaler.load_state_dict(state["scaler"])
        start = state["iteration"]
        log(f"Resumed from {checkpoint} at iteration {start}.")
    output = Path(cfg.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    if cfg.eval_only:
        metrics = evaluate(model, val, class_names, cfg, device, autocast, rank, world, output / "eval.png")
        log(f"eval: mIoU {metrics['miou']:.2f}% ({'multi-scale + flip' if cfg.multi_scale else 'single scale'})")
        return metrics

    trained = DistributedDataParallel(model) if world > 1 else model
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(Apply(train, train_transform(cfg)), cfg.batch_size // world, sampler=sampler,
                        drop_last=True, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    if len(loader) == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch")
    metrics = None
    for chunk_start in range(start, cfg.iterations, cfg.eval_every):
        # Every random choice between two checkpoints follows from (seed, chunk, rank): a resumed run repeats
        # exactly what the interrupted one would have done.
        chunk = chunk_start // cfg.eval_every
        torch.manual_seed(cfg.seed * 1_000_003 + chunk * world + rank)
        steps = min(cfg.eval_every, cfg.iterations - chunk_start)
        batches, passes = iter(()), 0
        bar = tqdm(range(steps), desc=f"iterations {chunk_start}-{chunk_start + steps}", disable=rank != 0,
                   leave=False)
        started, total_loss = time.time(), torch.zeros((), device=device)
        for _ in bar:
            batch = next(batches, None)
            if batch is None:  # a new pass over the training set, shuffled by (chunk, pass)
                sampler.set_epoch(chunk * 10_000 + passes)
                batches, passes = iter(loader), passes + 1
                batch = next(batches)
            images, labels = (t.to(device, non_blocking=True) for t in batch)
            with autocast:
                loss = criterion(trained(images), labels)
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
        iteration = chunk_start + steps
        if world > 1:  # without SyncBatchNorm (CPU) the ranks' statistics differ: evaluate rank 0's
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = dict(iteration=iteration, loss=total_loss.item() / steps, seconds=time.time() - started,
                       **evaluate(model, val, class_names, cfg, device, autocast, rank, world,
                                  output / f"predictions-{iteration:07d}.png"))
        if rank == 0:
            path = save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                        iteration=iteration, config=dataclasses.asdict(cfg)), output, iteration)
            with open(output / "log.jsonl", "a") as file:
                file.write(json.dumps(metrics) + "\n")
            log(f"iteration {iteration}/{cfg.iterations}: loss {metrics['loss']:.3f}, mIoU {metrics['miou']:.2f}%; "
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
        sys.exit(f"train_cityscapes.py: error: {message}")
