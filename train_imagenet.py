"""ImageNet-1K classification with DGMN2 (Section 6.1, Table 6): training, evaluation, DDP through torchrun.

Paper targets, top-1 on ImageNet-1K val at 224 x 224 (resize 256, centre crop): DGMN2-Tiny 78.7, Small 81.7,
Medium 82.5, Large 83.3 (300 epochs, global batch 1024 on 8 GPUs). To reproduce Tiny:

    torchrun --nproc_per_node 8 train_imagenet.py --model tiny --data /path/to/imagenet --batch-size 128

Several machines: the same command on each with torchrun's rendezvous, e.g. on both of two nodes
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_imagenet.py ...

Without --data it trains on a built-in synthetic set (shapes with random colour, size, position, rotation and
clutter), at 32 x 32 with a short schedule, in a few minutes on a CPU: same code path, other defaults (SYNTHETIC).
    torchrun train_imagenet.py --model tiny

Evaluate the authors' released weights:  --eval-only --weights dgmn2_tiny.pth --data /path/to/imagenet
Benchmark beside torchvision's swin_t:   --bench 10 --img-size 224 --batch-size 16 (timed steps on random images)
The recipe (AdamW, lr 1e-3 at batch 1024, cosine, RandAugment, MixUp/CutMix, ...) is from the paper and the
authors' release (../shared/reference/recipes.md). Every knob is a flag: python train_imagenet.py --help.
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode, v2
from tqdm import tqdm

import dgmn2

IMAGENET_MEAN, IMAGENET_STD = dgmn2.IMAGENET_MEAN, dgmn2.IMAGENET_STD

# ----------------------------------------------------------------------------------------------------------------
# Configuration: the paper's recipe by default; SYNTHETIC replaces what no flag set when there is no --data


@dataclass
class Config:
    model: str = "tiny"               # tiny | small | medium | large
    data: str = ""                    # ImageFolder root with train/ and val/; empty: the built-in synthetic set
    output: str = "runs/imagenet"     # checkpoints and log.jsonl
    epochs: int = 300
    warmup_epochs: int = 5
    batch_size: int = 128             # per process; the global batch is batch_size x world size
    lr: float = 1e-3                  # at a global batch of 1024, scaled linearly with the real one
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    weight_decay: float = 0.05        # not on biases, norm weights and relative-position tables
    img_size: int = 224
    eval_resize: int = 0              # eval: resize the shorter side (0: img_size / 0.875, 256 at 224), crop img_size
    crop_scale: float = 0.08          # RandomResizedCrop's smallest area fraction
    color_jitter: float = 0.4
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    random_erasing: float = 0.25
    mixup: float = 0.8                # MixUp alpha (0: off); with CutMix, one of the two per batch
    cutmix: float = 1.0               # CutMix alpha (0: off)
    label_smoothing: float = 0.1
    drop_path: float = 0.1
    amp: str = "auto"                 # auto (bf16 on GPUs that have it, else fp16; off on CPU) | bf16 | fp16 | off
    ema_decay: float = 0.0            # 0: no EMA; e.g. 0.99996
    clip_grad: float = 0.0            # max gradient norm, 0: no clipping
    channels_last: bool = False
    compile: bool = False
    workers: int = 8
    seed: int = 0
    resume: str = ""                  # a checkpoint, or "auto": the newest in --output
    weights: str = ""                 # the authors' released checkpoint (dgmn2.load_official)
    eval_only: bool = False
    bench: int = 0                    # > 0: time this many training and inference steps on random images, DGMN2
                                      # and torchvision's swin_t, and exit
    synthetic_train: int = 6000       # images in the built-in synthetic set
    synthetic_val: int = 1200


SYNTHETIC = dict(  # a few minutes on a CPU: small images, few epochs; the generator already varies colour and place
    epochs=6, warmup_epochs=1, batch_size=64, lr=1.6e-2, img_size=32, crop_scale=0.35,
    color_jitter=0.0, randaugment_ops=0, random_erasing=0.0, mixup=0.0, cutmix=0.0, drop_path=0.0, workers=1,
    output="runs/synthetic")


CHOICES = dict(model=list(dgmn2.VARIANTS), amp=["auto", "bf16", "fp16", "off"])


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
# The built-in synthetic set: shapes to tell apart


class Shapes(Dataset):
    """A learnable stand-in for ImageNet: each image holds one shape of its class (disc, ring, square, triangle,
    cross, bar), with random colour, size, position and rotation, on a random two-colour background with small
    distractor blobs and noise. Image i is a function of (seed, i): the set needs no storage and is the same on
    every rank. Items are (uint8 (3, S, S) image, class)."""

    classes = ["disc", "ring", "square", "triangle", "cross", "bar"]

    def __init__(self, size, length, seed, resolution=48):
        self.size, self.length, self.seed, self.resolution = size, length, seed, resolution

    def __len__(self):
        return self.length

    def _shape(self, label, u, v):
        """Inside-test of each class in the shape's own frame: u, v in about [-1, 1]."""
        r2 = u ** 2 + v ** 2
        return [r2 < 0.8, (r2 < 0.9) & (r2 > 0.35), (u.abs() < 0.7) & (v.abs() < 0.7),
                (v < 0.6) & (v > 1.9 * u.abs() - 0.9), ((u.abs() < 0.22) | (v.abs() < 0.22)) & (r2 < 0.9),
                (u.abs() < 0.95) & (v.abs() < 0.25)][label]

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % len(self.classes)
        rand = lambda *shape: torch.rand(shape, generator=g)  # noqa: E731
        S = self.resolution
        y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
        top, bottom = rand(3, 1, 1), rand(3, 1, 1)
        image = top + (bottom - top) * (y + 1) / 2  # (3, S, S) background gradient
        for _ in range(4):  # distractor blobs, smaller than the shape
            cy, cx, r = rand(3) * torch.tensor([1.6, 1.6, 0.12]) + torch.tensor([-0.8, -0.8, 0.04])
            image = torch.where((y - cy) ** 2 + (x - cx) ** 2 < r ** 2, rand(3, 1, 1), image)
        scale, angle = 0.35 + 0.3 * rand(1), 2 * math.pi * rand(1)
        cy, cx = (rand(2) - 0.5) * 2 * (1 - scale)
        cos, sin = angle.cos(), angle.sin()
        u, v = (cos * (x - cx) + sin * (y - cy)) / scale, (-sin * (x - cx) + cos * (y - cy)) / scale
        colour = rand(3, 1, 1)
        colour = torch.where((colour - image.mean((1, 2), keepdim=True)).abs().mean() < 0.25, 1 - colour, colour)
        image = torch.where(self._shape(label, u, v), colour, image)
        image = (image + 0.05 * torch.randn(3, S, S, generator=g)).clamp(0, 1)
        image = v2.functional.resize(image, [self.size, self.size], antialias=True)
        return (image * 255).round().to(torch.uint8), label


# ----------------------------------------------------------------------------------------------------------------
# Data


def load_rgb(path):
    """ImageFolder's loader, with an unreadable file reported by its path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: unreadable image ({error})") from None


def transforms(cfg, train):
    """The train augmentation (RandomResizedCrop, flip, ColorJitter, RandAugment, RandomErasing) or the eval
    resize-and-crop; both end in ImageNet normalisation. Image (PIL or uint8 tensor) -> float (3, S, S)."""
    bicubic = InterpolationMode.BICUBIC
    if train:
        steps = [v2.RandomResizedCrop(cfg.img_size, scale=(cfg.crop_scale, 1.0), interpolation=bicubic),
                 v2.RandomHorizontalFlip()]
        if cfg.color_jitter:
            steps.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
        if cfg.randaugment_ops:
            steps.append(v2.RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude))
    else:
        resize = cfg.eval_resize or round(cfg.img_size / 0.875)
        steps = [v2.Resize(resize, interpolation=bicubic), v2.CenterCrop(cfg.img_size)]
    steps = [v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train and cfg.random_erasing:
        steps.append(v2.RandomErasing(cfg.random_erasing, value="random"))
    return v2.Compose(steps)


def datasets(cfg):
    """(train, val, number of classes), with the data directory checked first."""
    if not cfg.data:
        return (Shapes(cfg.img_size, cfg.synthetic_train, seed=1), Shapes(cfg.img_size, cfg.synthetic_val, seed=2),
                len(Shapes.classes))
    root = Path(cfg.data)
    if not root.is_dir():
        raise InputError(f"{root}: no such data directory")
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise InputError(f"{root}: no {' or '.join(missing)} folder (expected {root}/train/CLASS/IMAGE and "
                         f"{root}/val/CLASS/IMAGE)")
    found = []
    for split in ("train", "val"):
        try:
            found.append(ImageFolder(root / split, loader=load_rgb))
        except FileNotFoundError as error:
            raise InputError(f"{root / split}: {error}") from None
    train, val = found
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes)) or ["(the same names, in another order)"]
        raise InputError(f"{root}: train has {len(train.classes)} classes and val {len(val.classes)}, and they "
                         f"differ (first: {only[0]})")
    return train, val, len(train.classes)


class Apply(Dataset):
    """A dataset with a transform applied to its images."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return self.transform(image), label


class MixCollate:
    """default_collate, then MixUp or CutMix (one at random per batch) on the batch: labels become soft."""

    def __init__(self, cfg, num_classes):
        mixes = [mix(alpha=alpha, num_classes=num_classes)
                 for mix, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if alpha > 0]
        self.mix = v2.RandomChoice(mixes) if mixes else None

    def __call__(self, batch):
        images, labels = default_collate(batch)
        return self.mix(images, labels) if self.mix else (images, labels)


def loaders(cfg, rank, world):
    """Train: shuffled by epoch and split across ranks (DistributedSampler, whole batches). Val: rank r takes images
    r, r + world, ..., so that every image is evaluated exactly once under any world size."""
    train, val, num_classes = datasets(cfg)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    common = dict(num_workers=cfg.workers, pin_memory=torch.cuda.is_available())
    train_loader = DataLoader(Apply(train, transforms(cfg, True)), cfg.batch_size, sampler=sampler, drop_last=True,
                              collate_fn=MixCollate(cfg, num_classes), **common)
    val_loader = DataLoader(Subset(Apply(val, transforms(cfg, False)), range(rank, len(val), world)),
                            cfg.batch_size, **common)
    if len(train_loader) == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch "
                         f"of {cfg.batch_size} per process on {world} processes")
    return train_loader, val_loader, num_classes


# ----------------------------------------------------------------------------------------------------------------
# Optimisation


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases, norm weights (1-d) and relative-position tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or ".rel_pos." in name else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def lr_at(step, cfg, peak, steps_per_epoch):
    """Linear warm-up from warmup_lr to peak, then cosine to min_lr, per optimiser step."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.warmup_lr + (peak - cfg.warmup_lr) * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return cfg.min_lr + 0.5 * (peak - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def amp_dtype(cfg, device):
    if cfg.amp == "auto":
        if device.type == "cpu":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return dict(bf16=torch.bfloat16, fp16=torch.float16, off=None)[cfg.amp]


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: written to a temporary file, then renamed, so that a kill never leaves a broken one


def save_checkpoint(state, output, epoch):
    path = Path(output) / f"checkpoint-{epoch:04d}.pth"
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
    """The checkpoint to resume from: cfg.resume, or the newest in cfg.output for "auto" (None if there is none)."""
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
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise InputError(f"{path}: not a checkpoint of this script (use --weights for the authors' release)")
    if state["config"]["model"] != cfg.model:
        raise InputError(f"{path}: a checkpoint of DGMN2-{state['config']['model']}, not of --model {cfg.model}")
    return state


# ----------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train_step(model, optimizer, scaler, criterion, images, targets, cfg, autocast):
    """One optimiser step. Returns the loss (detached)."""
    with autocast:
        loss = criterion(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


@torch.no_grad()
def evaluate(model, loader, device, autocast, cfg, world):
    """Exact top-1 and top-5 (%) over the whole validation set: each rank counts its own images, then they are
    summed over ranks."""
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(images)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices  # (B, 5)
        hits = top5 == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    return dict(top1=100 * counts[0].item() / counts[2].item(), top5=100 * counts[1].item() / counts[2].item(),
                images=int(counts[2].item()))


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


def check(cfg):
    """Settings that cannot work, named before anything starts."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"unknown --{name} {getattr(cfg, name)!r}: choose one of {', '.join(choices)}")
    positive = ["epochs", "batch_size", "img_size", "synthetic_train", "synthetic_val"]
    for name in [n for n in positive if getattr(cfg, n) < 1] + [n for n in ["workers", "bench"] if getattr(cfg, n) < 0]:
        raise InputError(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}, "
                         f"got {getattr(cfg, name)}")
    if cfg.eval_resize and cfg.eval_resize < cfg.img_size:
        raise InputError(f"--eval-resize {cfg.eval_resize} is smaller than the --img-size {cfg.img_size} it crops")
    if cfg.eval_only and not (cfg.resume or cfg.weights):
        raise InputError("--eval-only needs the weights to evaluate: --resume CKPT or --weights RELEASE_CKPT")


def main(cfg):
    """Train (or evaluate, or benchmark) as cfg says. Returns the last evaluation's metrics (None for --bench)."""
    check(cfg)
    rank, world, device = setup_distributed()
    try:
        return _run(cfg, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(cfg, rank, world, device):
    log = print if rank == 0 else lambda *args, **kwargs: None
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    # Rank 0 chooses (--output must be on a filesystem that every node sees: only rank 0 writes there).
    choice = [find_checkpoint(cfg) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    checkpoint = choice[0]
    if checkpoint is None and cfg.eval_only and not cfg.weights:
        raise InputError(f"--eval-only --resume auto: no checkpoint in {cfg.output}")
    if checkpoint is None and cfg.resume == "auto":
        log(f"--resume auto: no checkpoint in {cfg.output} yet, starting from scratch.")
    if checkpoint is None and not cfg.eval_only and not cfg.bench and list(Path(cfg.output).glob("checkpoint-*.pth")):
        raise InputError(f"{cfg.output} holds another run's checkpoints: continue it with --resume auto, or choose "
                         "another --output")
    state = read_checkpoint(checkpoint, cfg) if checkpoint else None
    if cfg.bench:
        train_loader, val_loader, num_classes = None, None, 1000
    else:
        if not cfg.data:
            log(f"No --data: training on the built-in synthetic set ({len(Shapes.classes)} shape classes, "
                f"{cfg.img_size} x {cfg.img_size}, {cfg.synthetic_train} images).")
        train_loader, val_loader, num_classes = loaders(cfg, rank, world)
    model = dgmn2.build(cfg.model, num_classes=num_classes, drop_path_rate=cfg.drop_path).to(device)
    if cfg.weights:
        try:
            dgmn2.load_official(model, cfg.weights)
        except ValueError as error:
            raise InputError(f"--weights {cfg.weights}: {error}") from None
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = sum(p.numel() for p in model.parameters())
    macs, _ = dgmn2.count_macs(cfg.model, cfg.img_size)
    log(f"DGMN2-{cfg.model}: {params / 1e6:.2f}M parameters, {macs / 1e9:.3f}G multiply-adds at {cfg.img_size} x "
        f"{cfg.img_size} (1000 classes); {world} process(es) on {device.type}")

    global_batch = cfg.batch_size * world
    peak = cfg.lr * global_batch / 1024
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak)
    steps_per_epoch = len(train_loader) if train_loader else 1
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lambda step: lr_at(step, cfg, peak, steps_per_epoch) / peak)
    dtype = amp_dtype(cfg, device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    start_epoch = 0
    if state:
        ours = model.state_dict()
        misfit = [f"{name} {tuple(t.shape)}, ours {tuple(ours[name].shape)}" for name, t in state["model"].items()
                  if name in ours and torch.is_tensor(t) and t.shape != ours[name].shape]
        misfit += sorted(set(ours) ^ set(state["model"]))  # missing or unexpected names
        if misfit:
            raise InputError(f"{checkpoint}: does not fit this model (first: {misfit[0]})")
        saved = (state["global_batch"], state["steps_per_epoch"])
        if not (cfg.eval_only or cfg.bench) and saved != (global_batch, steps_per_epoch):
            raise InputError(f"{checkpoint}: saved at a global batch of {saved[0]} ({saved[1]} steps an epoch), now "
                             f"{global_batch} ({steps_per_epoch}): its schedule would not continue")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty unless the run used fp16
            scaler.load_state_dict(state["scaler"])
        if ema and state["ema"]:
            ema.load_state_dict(state["ema"])
        start_epoch = state["epoch"]
        log(f"Resumed from {checkpoint} at epoch {start_epoch}, step {state['step']}.")

    trained = DistributedDataParallel(model) if world > 1 else model
    if cfg.compile:
        trained = torch.compile(trained)
    if cfg.bench:
        return _bench(cfg, trained, optimizer, scaler, criterion, autocast, dtype, device, world, log)
    if cfg.eval_only:
        metrics = evaluate(model, val_loader, device, autocast, cfg, world)
        log(f"eval: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} images")
        return metrics

    output = Path(cfg.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    if start_epoch >= cfg.epochs:
        log(f"{checkpoint} has finished all {cfg.epochs} epochs: nothing to train.")
    metrics = None
    for epoch in range(start_epoch, cfg.epochs):
        # Every random choice of an epoch (shuffle, augmentation, workers' seeds, stochastic depth) follows from
        # (seed, epoch, rank): a resumed run repeats exactly what the interrupted one would have done.
        torch.manual_seed(cfg.seed * 1_000_003 + epoch * world + rank)
        train_loader.sampler.set_epoch(epoch)
        model.train()
        started, total_loss = time.time(), torch.zeros((), device=device)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=rank != 0, leave=False)
        for images, targets in bar:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            loss = train_step(trained, optimizer, scaler, criterion, images, targets, cfg, autocast)
            scheduler.step()
            if ema:
                ema.update_parameters(model)
            if world > 1:
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            if not torch.isfinite(loss):
                last = sorted(output.glob("checkpoint-*.pth"))
                raise TrainingError(f"the loss is {loss.item()} at step {scheduler.last_epoch} (epoch {epoch + 1}); "
                                    f"stopped, the last good checkpoint is {last[-1] if last else 'none yet'}")
            total_loss += loss
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                            img_s=f"{(bar.n + 1) * global_batch / (time.time() - started):.0f}")
        seconds = time.time() - started
        if world > 1:  # BatchNorm statistics moved on each rank after DDP's last broadcast: evaluate rank 0's
            for buffer in [*model.buffers(), *(ema.module.buffers() if ema else [])]:
                dist.broadcast(buffer, src=0)
        metrics = dict(epoch=epoch + 1, step=scheduler.last_epoch, train_loss=total_loss.item() / len(train_loader),
                       lr=scheduler.get_last_lr()[0], images_per_s=len(train_loader) * global_batch / seconds,
                       **evaluate(model, val_loader, device, autocast, cfg, world))
        if ema:
            ema_metrics = evaluate(ema.module, val_loader, device, autocast, cfg, world)
            metrics.update(ema_top1=ema_metrics["top1"], ema_top5=ema_metrics["top5"])
        if rank == 0:
            path = save_checkpoint(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                        scheduler=scheduler.state_dict(), scaler=scaler.state_dict(),
                                        ema=ema.state_dict() if ema else None, epoch=epoch + 1,
                                        step=scheduler.last_epoch, global_batch=global_batch,
                                        steps_per_epoch=steps_per_epoch, config=dataclasses.asdict(cfg)),
                                   output, epoch + 1)
            with open(output / "log.jsonl", "a") as file:
                file.write(json.dumps(metrics) + "\n")
            log(f"epoch {epoch + 1}/{cfg.epochs}: loss {metrics['train_loss']:.3f}, top-1 {metrics['top1']:.2f}%, "
                f"top-5 {metrics['top5']:.2f}%, {metrics['images_per_s']:.0f} images/s; saved {path}")
        if world > 1:
            dist.barrier()
    return metrics


def _images_per_s(step, cfg, device, world):
    """Images/s of step() (one batch on each rank): 2 warm-up calls, then cfg.bench timed ones."""
    for call in range(2 + cfg.bench):
        if call == 2:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return cfg.bench * cfg.batch_size * world / (time.perf_counter() - started)


def _bench(cfg, model, optimizer, scaler, criterion, autocast, dtype, device, world, log):
    """Training and inference images/s on random images, DGMN2 beside torchvision's swin_t (Table 6 compares the two:
    Small 4.3 and Swin-T 4.5 GMACs), on the same device, batch, precision, memory format and compilation."""
    import torchvision
    images = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size, device=device)
    if cfg.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (cfg.batch_size,), device=device)
    swin = torchvision.models.swin_t(num_classes=1000).to(device)
    if cfg.channels_last:
        swin = swin.to(memory_format=torch.channels_last)
    swin_trained = DistributedDataParallel(swin) if world > 1 else swin
    if cfg.compile:
        swin_trained = torch.compile(swin_trained)
    swin_optimizer = torch.optim.AdamW(param_groups(swin, cfg.weight_decay), lr=cfg.lr)
    swin_scaler = torch.amp.GradScaler(device.type, enabled=scaler.is_enabled())
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    log(f"Training and inference at {cfg.img_size} x {cfg.img_size}, batch {cfg.batch_size} x {world}, autocast "
        f"{dtype}, {cfg.bench} timed steps on {where}:\n| model | parameters | train images/s | inference images/s |"
        "\n|---|---|---|---|")
    rates = []
    for name, net, trained, opt, scale in [(f"DGMN2-{cfg.model}", model, model, optimizer, scaler),
                                           ("torchvision swin_t", swin, swin_trained, swin_optimizer, swin_scaler)]:
        trained.train()
        train = _images_per_s(lambda: train_step(trained, opt, scale, criterion, images, labels, cfg, autocast),
                              cfg, device, world)
        trained.eval()
        with torch.no_grad(), autocast:
            infer = _images_per_s(lambda: trained(images), cfg, device, world)
        rates.append((train, infer))
        log(f"| {name} | {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M | {train:.1f} | {infer:.1f} |")
    (train, infer), (swin_train, swin_infer) = rates
    log(f"DGMN2-{cfg.model} / swin_t: {train / swin_train:.2f}x training, {infer / swin_infer:.2f}x inference")
    return None


if __name__ == "__main__":
    config = parse_args()
    try:
        main(config)
    except (InputError, TrainingError) as error:
        # An error raised in a DataLoader worker arrives wrapped in that worker's traceback: keep its own line.
        message = re.sub(r"^[\w.]*(InputError|TrainingError): ", "", str(error).strip().splitlines()[-1])
        sys.exit(f"train_imagenet.py: error: {message}")
