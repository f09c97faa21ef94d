"""ImageNet-1K classification with DGMN2 (Section 6.1, Table 6): training, evaluation, DDP through torchrun.

Paper targets, top-1 on ImageNet-1K val at 224 x 224 (resize 256, centre crop): DGMN2-Tiny 78.7, Small 81.7,
Medium 82.5, Large 83.3 (300 epochs, global batch 1024 on 8 GPUs), with the release's (DeiT's) recipe: AdamW, cosine,
RandAugment rand-m9-mstd0.5-inc1, MixUp/CutMix, random erasing, repeated augmentation, drop path 0.1 from epoch 100.

    torchrun --nproc_per_node 8 train_imagenet.py --model tiny --data /path/to/imagenet      # Table 6, Tiny
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train_imagenet.py ...
    torchrun train_imagenet.py --model tiny      # no --data: built-in synthetic shapes at 32 x 32, minutes on a CPU
    python train_imagenet.py --eval-only --weights dgmn2_tiny.pth --data /path/to/imagenet     # the release's weights
    python train_imagenet.py --eval-only --resume runs/imagenet/checkpoint-0375300.pth --data ...  # EMA if saved
    python train_imagenet.py --bench 10 --img-size 224 --batch-size 16      # images/s beside torchvision's swin_t
"""

import argparse
import ctypes
import dataclasses
import datetime
import functools
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.models import swin_t
from torchvision.transforms import InterpolationMode, v2

import dgmn2
import sampler


# ================================================================================================================
# The shared block: the same text in the three training scripts (test_all.py compares them), so that each stays
# self-contained. The script around it defines Config, SYNTHETIC (the defaults without --data), CHOICES, SAVED (the
# parts of a run whose state a checkpoint holds, the model first; their namedtuple has the plan: what the schedule
# and the data order depend on beyond the options), START_WEIGHTS (the option that takes weights to start from),
# check(cfg) and run(cfg, rank, world, device).


class InputError(Exception):
    """Bad input (options, paths, data, checkpoints): reported in one line, exit status 1."""


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss): reported in one line, exit status 1."""


def option(default, help):
    """A Config field: its default and its --help text."""
    return dataclasses.field(default=default, metadata=dict(help=help))


def finite(text):
    """A float option's value: a number, not nan or inf, which the range checks' comparisons would let through."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parse_args(argv=None):
    """Config from the command line, an option a field. Without --data, SYNTHETIC replaces the defaults it names."""
    changed = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in SYNTHETIC.items())
    parser = argparse.ArgumentParser(prog=Path(__file__).name, description=__doc__, epilog="Without --data (the "
                                     f"built-in synthetic set) these defaults change: {changed}.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        synthetic = f"; {SYNTHETIC[f.name]!r} without --data" if f.name in SYNTHETIC else ""
        kwargs = dict(default=None, help=f"{f.metadata['help']} (default {f.default!r}{synthetic})".replace("%", "%%"))
        if f.type is bool:  # a plain switch, with a --no- twin only where it is on by default
            on = f.default or SYNTHETIC.get(f.name, False)
            kwargs.update(action=argparse.BooleanOptionalAction if on else "store_true")
        else:
            kwargs.update(type=finite if f.type is float else f.type, choices=CHOICES.get(f.name))
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    return Config(**{**(SYNTHETIC if not given.get("data") else {}), **given})


def seed_of(*keys):
    """One seed from several integers (seed, epoch, rank, image index, ...): distinct tuples, distinct seeds."""
    return functools.reduce(lambda seed, key: (seed * 1_000_003 + key) % 2 ** 63, keys, 0)


def setup_distributed():
    """(rank, world size, device, store) from torchrun's environment; (0, 1, device, None) without it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device, None
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    store, rank, world = next(dist.rendezvous("env://"))  # under torchrun, the agent's store: it outlives any rank
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank, world_size=world)
    return rank, world, device, store


def precision(cfg, device):
    """(dtype, autocast, GradScaler) of --amp. auto: bf16 on GPUs that have it, else fp16 (scaled); off on CPU."""
    dtype = dict(bf16=torch.bfloat16, fp16=torch.float16).get(cfg.amp)
    if cfg.amp == "auto" and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    return dtype, autocast, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def distribute(model, cfg, world):
    """The model as it trains: DDP over the ranks, then torch.compile where asked."""
    model = DistributedDataParallel(model) if world > 1 else model
    return torch.compile(model) if cfg.compile else model


class Progress:
    """A training loop's log without a host sync a step: the loss terms are summed on the device and, every
    cfg.log_every steps and at the last, averaged over the ranks, checked and shown by rank 0 in a line with the ETA,
    images/s, data wait and GPU memory. A non-finite loss stops every rank at the same step."""

    def __init__(self, cfg, rank, world, device, first, last, images_per_step, where, output):
        self.cfg, self.rank, self.world, self.device, self.where, self.output = cfg, rank, world, device, where, output
        self.first = self.synced = self.step = first
        self.last, self.images_per_step, self.names = last, images_per_step, []
        self.sums = self.totals = self.wait = 0
        self.started = self.since = time.perf_counter()

    def batches(self, iterable):
        """The batches of iterable; the time spent waiting for them is the data wait."""
        waited = time.perf_counter()
        for batch in iterable:
            self.wait += time.perf_counter() - waited
            yield batch
            waited = time.perf_counter()

    def update(self, losses, lr):
        """After a step: its losses (a dict of scalar tensors) and learning rate."""
        self.names, self.step = list(losses), self.step + 1
        self.sums = self.sums + torch.stack([loss.detach().float() for loss in losses.values()])
        if (self.step - self.first) % self.cfg.log_every == 0 or self.step == self.last:
            self._sync(lr)

    def _sync(self, lr):
        steps, now = self.step - self.synced, time.perf_counter()
        if self.world > 1:
            dist.all_reduce(self.sums)
        means = (self.sums / (self.world * steps)).tolist()  # the host sync
        named = f"step {self.step}" if steps == 1 else f"steps {self.synced + 1}-{self.step}"
        if not all(map(math.isfinite, means)):
            last = sorted(Path(self.output).glob("checkpoint-*.pth"))
            raise TrainingError(f"the loss is {sum(means)} at {named} ({self.where}); stopped, the last good "
                                f"checkpoint is {last[-1] if last else 'none yet'}")
        self.totals = self.totals + torch.tensor(means, dtype=torch.float64) * steps
        terms = f" ({', '.join(f'{n} {m:.3f}' for n, m in zip(self.names, means))})" if len(means) > 1 else ""
        memory = f", {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB" if self.device.type == "cuda" else ""
        left = (now - self.started) / (self.step - self.first) * (self.last - self.step)  # seconds, at this pace
        rate = steps * self.images_per_step / (now - self.since)
        if self.rank == 0:
            print(f"{self.where}, {named}: loss {sum(means):.3f}{terms}, lr {lr:.2e}, {rate:.1f} images/s, data wait "
                  f"{1000 * self.wait / steps:.0f} ms/step{memory}, ETA {datetime.timedelta(seconds=round(left))}",
                  flush=True)
        self.sums, self.synced, self.since, self.wait = 0, self.step, now, 0.0

    def close(self):
        """dict(loss=the mean of the summed terms over the steps run, and each term)."""
        means = (self.totals / (self.step - self.first)).tolist() if self.step > self.first else []
        return dict(loss=sum(means), **(dict(zip(self.names, means)) if len(means) > 1 else {}))


def save_checkpoint(path, cfg, parts, **position):
    """The SAVED parts' state, their plan, position (the step, ...) and the config, written to a temporary file, synced
    and renamed (a kill never leaves a broken checkpoint); the older checkpoints go."""
    state = {name: None if (part := getattr(parts, name)) is None else part.state_dict() for name in SAVED}
    path, temporary = Path(path), Path(path).with_suffix(".tmp")
    with open(temporary, "wb") as file:
        torch.save(dict(state, plan=parts.plan, **position, config=dataclasses.asdict(cfg), script=Path(__file__).name),
                   file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    for old in set(path.parent.glob("checkpoint-*.pth")) - {path}:
        old.unlink()
    return path


def read_checkpoint(path, cfg, weights_depend_on, training_depends_on):
    """A checkpoint of this script, refused in one line if saved with other values of the options listed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file (a text file's: a bare KeyError)
        reason = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0].rstrip(": ")
        raise InputError(f"{path}: not a readable checkpoint ({reason})") from None
    script = Path(__file__).name
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "config"} <= state.keys():
        raise InputError(f"{path}: not a checkpoint of {script} (weights to start from go to {START_WEIGHTS})")
    if state.get("script", script) != script:  # checkpoints saved before they named their script: taken as ours
        raise InputError(f"{path}: a checkpoint of {state['script']}, not of {script} (weights to start from go to "
                         f"{START_WEIGHTS})")
    for name in [*weights_depend_on, *([] if cfg.eval_only else training_depends_on)]:
        saved = state["config"].get(name, getattr(type(cfg), name))  # an option added since: its default
        if saved != getattr(cfg, name):
            raise InputError(f"{path}: saved with --{name.replace('_', '-')} {saved!r}, not {getattr(cfg, name)!r}")
    return state


def resume(cfg, rank, world, weights_depend_on, training_depends_on, log):
    """(the checkpoint to start from, its contents) or (None, None): --resume, or for "auto" the newest in --output.
    Rank 0 chooses (every node must see --output); a new run refuses an --output that holds another run's."""
    found = sorted(Path(cfg.output).glob("checkpoint-*.pth")) if rank == 0 else []
    if rank == 0 and cfg.resume not in ("", "auto") and not Path(cfg.resume).is_file():
        why = "a folder, not a checkpoint" if Path(cfg.resume).is_dir() else "no such checkpoint"
        raise InputError(f"{cfg.resume}: {why}")
    elsewhere = cfg.resume not in ("", "auto") and Path(cfg.resume).resolve().parent != Path(cfg.output).resolve()
    if found and (not cfg.resume or elsewhere) and not cfg.eval_only:  # its checkpoints would be overwritten
        raise InputError(f"{cfg.output} holds another run's checkpoints: continue it with --resume auto, or choose "
                         "another --output" + (f" to resume {cfg.resume} in" if elsewhere else ""))
    path = [(found[-1] if found else None) if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None]
    if world > 1:
        dist.broadcast_object_list(path, src=0)
    if path[0] is None and cfg.resume == "auto":
        if cfg.eval_only:
            raise InputError(f"--eval-only --resume auto: no checkpoint in {cfg.output}")
        log(f"--resume auto: no checkpoint in {cfg.output} yet, starting from scratch.")
    return path[0], path[0] and read_checkpoint(path[0], cfg, weights_depend_on, training_depends_on)


def load_weights(module, weights, source):
    """module.load_state_dict(weights), refused in one line that names the first tensor that does not fit."""
    ours = module.state_dict()
    misfit = [f"{name} {tuple(t.shape)}, ours {tuple(ours[name].shape)}" for name, t in weights.items()
              if name in ours and torch.is_tensor(t) and t.shape != ours[name].shape]
    misfit += [f"{name} missing" for name in ours if name not in weights]
    misfit += [f"{name} unexpected" for name in weights if name not in ours]
    if misfit:
        raise InputError(f"{source}: does not fit this model (first: {misfit[0]})")
    module.load_state_dict(weights)


def restore(path, state, cfg, parts, log):
    """The step to start from: 0 without a checkpoint; else its weights go into parts.model and, to train on, its state
    into the other SAVED parts (unless saved empty: the scaler's without fp16) if its plan is parts.plan."""
    if state is None:
        return 0
    load_weights(parts.model, state["model"], path)
    if not cfg.eval_only:
        if not {"step", "plan", *SAVED} <= state.keys():
            raise InputError(f"{path}: saved by an older version (no step or plan): start a new --output")
        changed = [f"{k} {state['plan'].get(k)}, now {v}" for k, v in parts.plan.items() if state["plan"].get(k) != v]
        if changed:
            raise InputError(f"{path}: saved with {'; '.join(changed)} (other options or data)")
        for name in SAVED[1:]:  # after the model
            if getattr(parts, name) is not None and state[name]:
                getattr(parts, name).load_state_dict(state[name])
    log(f"{'Evaluating' if cfg.eval_only else 'Resuming'} {path}, saved at step {state.get('step', '?')}.")
    return state.get("step", 0)


def output_folder(cfg):
    """--output as a Path, created with its parents; refused in one line where it cannot be (no permission)."""
    try:
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--output {cfg.output}: cannot be made a folder ({error.strerror or error})") from None
    return Path(cfg.output)


def main(cfg):
    """Train, evaluate or benchmark as cfg says; returns run()'s result (the last evaluation's metrics)."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {choices}")
    check(cfg)
    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise InputError(f"--output {cfg.output}: a file, not a folder")
    rank, world, device, store = setup_distributed()
    try:
        result = run(cfg, rank, world, device)
    except BaseException as error:  # the first rank to fail reports it; the others (their peers gone) stay quiet
        error.reported_elsewhere = world > 1 and store.compare_set("failed", "", str(rank)) != str(rank).encode()
        raise
    if world > 1:
        dist.destroy_process_group()
    return result


def keep_freed_memory():
    """Where the C library is glibc, serve large tensors from the heap and keep what is freed for the next step. By
    default glibc maps every block over 32 MB afresh and unmaps it when freed, so each CPU step faults its large
    activations in again, page by page (a DGMN2-Small step at batch 16 over a gigabyte); preloading jemalloc or
    tcmalloc, as PyTorch's CPU tuning guide suggests, avoids it too."""
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None) if sys.platform.startswith("linux") else None
    if mallopt:  # musl's mallopt does nothing
        mallopt(M_MMAP_MAX, 0)  # no block from mmap
        mallopt(M_TRIM_THRESHOLD, -1)  # never give the heap's top back


def command_line():
    """The script under python or torchrun: bad input or a failed run ends every rank, one line printed once."""
    keep_freed_memory()
    try:
        main(parse_args())
    except Exception as error:
        quiet = getattr(error, "reported_elsewhere", False)
        if not quiet and not isinstance(error, (InputError, TrainingError)):
            raise
        if not quiet:  # a DataLoader worker's error comes with its traceback: its last line is the message
            message = re.sub(r"^[\w.]*(InputError|TrainingError): ", "", str(error).strip().splitlines()[-1])
            print(f"{Path(__file__).name}: error: {message}", file=sys.stderr, flush=True)
        if "RANK" in os.environ:  # now: shutting the process group down would wait for the failed peers
            os._exit(1)
        sys.exit(1)


# End of the shared block
# ================================================================================================================
# Configuration: the paper's recipe by default; SYNTHETIC replaces what no option set when there is no --data
REFERENCE_BATCH = 1024  # the global batch at which --lr is given (8 GPUs x 128)
# A resume refuses a checkpoint saved with other values of WEIGHTS_DEPEND_ON and, to train on, of TRAINING_DEPENDS_ON
# (the saved optimiser and schedule hold the learning rates, weight decay and step counts these set)
WEIGHTS_DEPEND_ON = ["model"]
TRAINING_DEPENDS_ON = ["batch_size", "epochs", "warmup_epochs", "lr", "warmup_lr", "min_lr", "weight_decay",
                       "ema_decay",  # the saved run holds a moving average of this decay, or none
                       "save_every"]  # where the training process reseeds (drop path's draws)


@dataclass
class Config:
    model: str = option("tiny", "DGMN2 variant (Table 6)")
    data: str = option("", "ImageFolder root: train/CLASS/IMAGE, val/CLASS/IMAGE; empty: the built-in synthetic set")
    output: str = option("runs/imagenet", "checkpoints and log.jsonl, written by rank 0 (every node must see it)")
    epochs: int = option(300, "passes over the training set")
    warmup_epochs: int = option(5, "epochs of linear warm-up from --warmup-lr to the peak learning rate")
    batch_size: int = option(1024, "global batch: images a step over all processes (the paper's: 8 GPUs x 128)")
    lr: float = option(1e-3, f"peak learning rate at a global batch of {REFERENCE_BATCH}, scaled with --batch-size")
    warmup_lr: float = option(1e-6, "learning rate at the first warm-up step")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine schedule")
    weight_decay: float = option(0.05, "AdamW's weight decay; none on biases and norm weights (as the release)")
    img_size: int = option(224, "training and evaluation image side")
    eval_resize: int = option(0, "evaluation resizes the shorter side to this, then crops; 0: img_size / 0.875")
    crop_scale: float = option(0.08, "RandomResizedCrop's smallest area fraction")
    randaugment_ops: int = option(2, "RandAugment's operations an image (0: off; then --color-jitter applies)")
    randaugment_magnitude: float = option(9.0, "RandAugment's mean magnitude, timm's: of 10 (9: rotations to 27°)")
    randaugment_std: float = option(0.5, "standard deviation of each RandAugment magnitude (timm's mstd)")
    color_jitter: float = option(0.4, "brightness, contrast, saturation jitter, only without RandAugment (as timm)")
    random_erasing: float = option(0.25, "probability of erasing a random rectangle of an image")
    mixup: float = option(0.8, "MixUp's alpha (0: off); with CutMix, one of the two at random a batch")
    cutmix: float = option(1.0, "CutMix's alpha (0: off)")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy")
    repeated_aug: int = option(3, "repeated augmentation (DeiT): copies of each image drawn in an epoch; 1: off")
    drop_path: float = option(0.1, "stochastic depth of the deepest block (linear in depth)")
    drop_path_epoch: int = option(100, "first epoch with drop path (the release trains 100 epochs without)")
    amp: str = option("auto", "mixed precision; auto: bf16 where the GPU has it, else fp16; off on CPU")
    ema_decay: float = option(0.0, "decay of a moving average of the weights, also evaluated (0: none; 0.99996)")
    clip_grad: float = option(0.0, "largest gradient norm (0: no clipping)")
    channels_last: bool = option(False, "channels-last model and inputs (off until a GPU shows it faster)")
    compile: bool = option(False, "torch.compile the model (off until a GPU shows it faster)")
    log_every: int = option(50, "steps between log lines (the loss's host sync and NaN check)")
    save_every: int = option(1000, "steps between checkpoints, counted from the start (and one at each epoch's end)")
    workers: int = option(8, "data-loading processes a rank")
    seed: int = option(0, "seed of the weights, the data order and the augmentations")
    resume: str = option("", "checkpoint to continue from, or auto: the newest in --output")
    weights: str = option("", "DGMN2 weights to start from or evaluate: the authors' release or ours (a checkpoint "
                          "of this script or a state dict)")
    eval_only: bool = option(False, "evaluate --resume (its EMA weights if it has them) or --weights, then exit")
    bench: int = option(0, "time this many steps on random images beside torchvision's swin_t, then exit (0: off)")
    synthetic_train: int = option(6000, "images in the built-in synthetic training set")
    synthetic_val: int = option(1200, "images in the built-in synthetic validation set")


SYNTHETIC = dict(  # minutes on a CPU: small images, few epochs, no augmentation (the generator varies colour and place)
    epochs=6, warmup_epochs=1, batch_size=64, lr=1.6e-2, img_size=32, crop_scale=0.35, randaugment_ops=0, mixup=0.0,
    color_jitter=0.0, random_erasing=0.0, cutmix=0.0, repeated_aug=1, drop_path=0.0, log_every=20, workers=1,
    output="runs/synthetic")
START_WEIGHTS = "--weights"  # the option that takes weights to start from
CHOICES = dict(model=list(dgmn2.VARIANTS), amp=["auto", "bf16", "fp16", "off"])


def check(cfg):
    """Settings that cannot work, named before anything starts."""
    positive = ["epochs", "batch_size", "img_size", "repeated_aug", "log_every", "save_every", "synthetic_train",
                "synthetic_val"]
    at_least_0 = ["workers", "bench", "warmup_epochs", "min_lr", "weight_decay", "randaugment_ops", "mixup", "cutmix",
                  "clip_grad"]  # a negative clip norm would turn the gradient around
    for name in [n for n in positive if getattr(cfg, n) < 1] + [n for n in at_least_0 if getattr(cfg, n) < 0]:
        raise InputError(f"--{name.replace('_', '-')} must be {'positive' if name in positive else '>= 0'}, "
                         f"got {getattr(cfg, name)}")
    peak = peak_lr(cfg)
    schedule = not (cfg.eval_only or cfg.bench)  # a run that follows it: an evaluation or a benchmark takes any batch
    refusals = [  # each would fail late (drop path at --drop-path-epoch) or deep inside torch or torchvision
        (not cfg.lr > 0, f"--lr {cfg.lr}: the peak learning rate must be positive"),
        (not 0 < cfg.crop_scale <= 1, f"--crop-scale {cfg.crop_scale}: a fraction of the image's area, in (0, 1]"),
        (not 0 <= cfg.random_erasing <= 1, f"--random-erasing {cfg.random_erasing}: a probability, in [0, 1]"),
        (not 0 <= cfg.label_smoothing < 1, f"--label-smoothing {cfg.label_smoothing}: in [0, 1)"),
        (not 0 <= cfg.drop_path < 1, f"--drop-path {cfg.drop_path}: a probability of dropping a block, in [0, 1)"),
        (not 0 <= cfg.ema_decay < 1, f"--ema-decay {cfg.ema_decay}: in [0, 1) (0: no moving average)"),
        (cfg.eval_resize and cfg.eval_resize < cfg.img_size, f"--eval-resize {cfg.eval_resize} is smaller than the "
         f"--img-size {cfg.img_size} it crops"),
        (cfg.eval_only and not (cfg.resume or cfg.weights), "--eval-only needs the weights to evaluate: --resume CKPT "
         "or --weights WEIGHTS"),
        (not cfg.warmup_lr > 0 or (schedule and cfg.warmup_lr > peak), f"--warmup-lr {cfg.warmup_lr} must be positive "
         f"and at most the peak learning rate, {peak:.3g} (--lr x --batch-size / {REFERENCE_BATCH})"),
        (schedule and cfg.min_lr > peak, f"--min-lr {cfg.min_lr} is above the peak learning rate, {peak:.3g} (--lr x "
         f"--batch-size / {REFERENCE_BATCH}): the cosine would rise; lower --min-lr")]
    for refused, message in refusals:
        if refused:
            raise InputError(message)


# ---- The built-in synthetic set: shapes to tell apart ----------------------------------------------------------
class Shapes(Dataset):
    """A learnable stand-in for ImageNet: each image holds one shape of its class, of random colour, size, position
    and rotation, on a two-colour background with distractor blobs and noise. Image i is a function of (seed, i): no
    storage, the same on every rank. Items are (S x S RGB PIL image, class), as ImageFolder's."""

    classes = ["disc", "ring", "square", "triangle", "cross", "bar"]

    def __init__(self, size, length, seed, resolution=48):
        self.size, self.length, self.seed, self.resolution = size, length, seed, resolution

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g = torch.Generator().manual_seed(seed_of(self.seed, index))
        rand, label, S = functools.partial(torch.rand, generator=g), index % len(self.classes), self.resolution
        y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
        image = torch.lerp(rand(3, 1, 1), rand(3, 1, 1), (y + 1) / 2)  # (3, S, S) background: top to bottom
        for _ in range(4):  # distractor blobs, smaller than the shape
            cy, cx, r = rand(3) * torch.tensor([1.6, 1.6, 0.12]) + torch.tensor([-0.8, -0.8, 0.04])
            image = torch.where((y - cy) ** 2 + (x - cx) ** 2 < r ** 2, rand(3, 1, 1), image)
        scale, angle = 0.35 + 0.3 * rand(1), 2 * math.pi * rand(1)
        cy, cx = (rand(2) - 0.5) * 2 * (1 - scale)
        cos, sin = angle.cos(), angle.sin()
        u, v = (cos * (x - cx) + sin * (y - cy)) / scale, (-sin * (x - cx) + cos * (y - cy)) / scale
        colour = rand(3, 1, 1)
        colour = torch.where((colour - image.mean((1, 2), keepdim=True)).abs().mean() < 0.25, 1 - colour, colour)
        r2 = u ** 2 + v ** 2  # the inside-test of each class, in the shape's own frame (u, v in about [-1, 1])
        inside = [r2 < 0.8, (r2 < 0.9) & (r2 > 0.35), (u.abs() < 0.7) & (v.abs() < 0.7),
                  (v < 0.6) & (v > 1.9 * u.abs() - 0.9), ((u.abs() < 0.22) | (v.abs() < 0.22)) & (r2 < 0.9),
                  (u.abs() < 0.95) & (v.abs() < 0.25)][label]
        image = (torch.where(inside, colour, image) + 0.05 * torch.randn(3, S, S, generator=g)).clamp(0, 1)
        image = v2.functional.resize(image, [self.size, self.size], antialias=True)
        return v2.functional.to_pil_image((image * 255).round().to(torch.uint8)), label


# ---- Data: the release's augmentations, repeated augmentation, every validation image once ---------------------
def load_rgb(path):
    """ImageFolder's loader, with an unreadable file reported by its path."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise InputError(f"{path}: unreadable image ({error})") from None


def datasets(cfg):
    """(train, val, number of classes), with the data directory checked first."""
    if not cfg.data:
        return Shapes(cfg.img_size, cfg.synthetic_train, 1), Shapes(cfg.img_size, cfg.synthetic_val, 2), \
            len(Shapes.classes)
    root = Path(cfg.data)
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise InputError(f"{root}: no such data directory" if not root.is_dir() else f"{root}: no "
                         f"{' or '.join(missing)} folder (expected {root}/train/CLASS/IMAGE and "
                         f"{root}/val/CLASS/IMAGE)")
    found = []
    for split in ("train", "val"):
        try:
            found.append(ImageFolder(root / split, loader=load_rgb))
        except FileNotFoundError as error:  # no class folders
            raise InputError(f"{root / split}: {error}") from None
    train, val = found
    if train.classes != val.classes:
        only = sorted(set(train.classes) ^ set(val.classes)) or ["(the same names, in another order)"]
        raise InputError(f"{root}: train has {len(train.classes)} classes and val {len(val.classes)}, and they "
                         f"differ (first: {only[0]})")
    return train, val, len(train.classes)


class TimmOperations(v2.RandAugment):
    """torchvision's RandAugment operations at the magnitudes of timm's increasing set, which they share but for
    Posterize: timm's keeps 4 bits down to 0 (1 at m9), torchvision's 8 down to 4; at least 1 here (Pillow refuses 0,
    which would blacken the image)."""
    _AUGMENTATION_SPACE = {**v2.RandAugment._AUGMENTATION_SPACE, "Posterize": (
        lambda bins, height, width: (4 - (torch.arange(bins) * 4 / (bins - 1)).floor()).clamp(min=1).int(), False)}


class RandAugment(nn.Module):
    """timm's rand-m{magnitude}-mstd{std}-inc1 (the release's) on TimmOperations: `ops` times, with p = 0.5, a random
    operation at a magnitude from N(magnitude, std) clipped to [0, 10], 10 being an operation's whole range (rotate
    30 degrees, ...): 101 bins (torchvision's 31 would make 9 mean 30%). The operations: timm's increasing set
    without Invert and SolarizeAdd, with Identity. Bicubic, filled with the mean colour. Image -> image."""

    def __init__(self, ops, magnitude, std):
        super().__init__()
        self.ops, self.magnitude, self.std = ops, magnitude, std
        self.fill = [round(255 * m) for m in dgmn2.IMAGENET_MEAN]

    def forward(self, image):
        for _ in range(self.ops):
            if torch.rand(()) < 0.5:
                magnitude = (self.magnitude + self.std * torch.randn(())).clamp(0, 10).item()
                image = TimmOperations(1, round(10 * magnitude), num_magnitude_bins=101,
                                       interpolation=InterpolationMode.BICUBIC, fill=self.fill)(image)
        return image


def transforms(cfg, train):
    """Train: RandomResizedCrop, flip, RandAugment (or ColorJitter), normalise, RandomErasing; eval: resize, centre
    crop, normalise. The geometric and colour steps run on the PIL image, before ToImage, where they are fastest."""
    bicubic = InterpolationMode.BICUBIC
    resize = cfg.eval_resize or round(cfg.img_size / 0.875)
    image_steps, tensor_steps = [v2.Resize(resize, interpolation=bicubic), v2.CenterCrop(cfg.img_size)], []
    if train:
        image_steps = [v2.RandomResizedCrop(cfg.img_size, scale=(cfg.crop_scale, 1.0), interpolation=bicubic),
                       v2.RandomHorizontalFlip()]
        if cfg.randaugment_ops:
            image_steps.append(RandAugment(cfg.randaugment_ops, cfg.randaugment_magnitude, cfg.randaugment_std))
        elif cfg.color_jitter:
            image_steps.append(v2.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
        tensor_steps = [v2.RandomErasing(cfg.random_erasing, value="random")] if cfg.random_erasing else []
    return v2.Compose([*image_steps, v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(dgmn2.IMAGENET_MEAN, dgmn2.IMAGENET_STD), *tensor_steps])


class RepeatedAugmentationSampler(Sampler):
    """DeiT's repeated augmentation, deterministic per epoch: the images shuffled by (seed, epoch), each repeated
    `repeats` times in a row, dealt round-robin to the ranks (an image's copies go to different ranks); an epoch has
    as many samples as images, as in DeiT. Yields (image index, augmentation seed from (seed, epoch, place)): the
    augmentations do not depend on the (persistent) workers, and a resumed run repeats them. An iterator starts at
    this rank's sample `start` of the epoch: a run resumed mid-epoch skips what the interrupted one had trained on."""

    def __init__(self, size, repeats, rank, world, seed):
        self.size, self.repeats, self.rank, self.world, self.seed = size, repeats, rank, world, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.size // self.world

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        order = order.repeat_interleave(self.repeats)[:len(self) * self.world].tolist()  # (world x len,) indices
        places = range(self.rank + self.start * self.world, len(order), self.world)  # this rank's, from start on
        return iter([(order[p], seed_of(self.seed, self.epoch, p)) for p in places])


class Augmented(Dataset):
    """A dataset with a transform applied to its images. Keyed by (index, augmentation seed), an item is (image,
    label, seed), its random choices fixed by the seed; keyed by an index, (image, label)."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        image, label = self.dataset[index]
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.transform(image), label, seed


def mix_collate(batch, mix):
    """default_collate, then MixUp or CutMix (mix: one of the two at random a batch), seeded by the batch's first
    augmentation seed: labels become soft."""
    images, labels, seeds = default_collate(batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[0].item())
        return mix(images, labels) if mix else (images, labels)


def loaders(cfg, rank, world, log):
    """(train, val, classes): training batches from this rank's RepeatedAugmentationSampler share; for validation
    rank r takes images r, r + world, ..., so that every image is evaluated exactly once under any world size."""
    if not cfg.data:
        log(f"No --data: the built-in synthetic set ({len(Shapes.classes)} shapes, {cfg.synthetic_train} images).")
    train, val, num_classes = datasets(cfg)
    mixes = [mix(alpha=alpha, num_classes=num_classes)
             for mix, alpha in ((v2.MixUp, cfg.mixup), (v2.CutMix, cfg.cutmix)) if alpha > 0]
    common = dict(batch_size=cfg.batch_size // world, num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=cfg.workers > 0)
    # A new iterator draws a seed from the loader's generator, by default the global one (drop path's): with
    # persistent workers a resumed run makes one more than an uninterrupted one, and would shift the draws after it
    train_loader = DataLoader(Augmented(train, transforms(cfg, True)), drop_last=True,
                              sampler=RepeatedAugmentationSampler(len(train), cfg.repeated_aug, rank, world, cfg.seed),
                              collate_fn=functools.partial(mix_collate, mix=v2.RandomChoice(mixes) if mixes else None),
                              generator=torch.Generator().manual_seed(seed_of(cfg.seed, rank)), **common)
    val_loader = DataLoader(Subset(Augmented(val, transforms(cfg, False)), range(rank, len(val), world)), **common)
    if len(train_loader) == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch "
                         f"of {cfg.batch_size // world} a process on {world} processes")
    return train_loader, val_loader, num_classes


# ---- The run: model, optimiser and schedule, starting point, training, evaluation ------------------------------
# What a run holds: the model (trained: it under DDP / compile), optimiser, schedule, precision, loss, EMA, data and
# the plan: what the schedule and the data order depend on beyond the options, unchanged in a resumed run
Parts = namedtuple("Parts", "model trained optimizer scheduler scaler autocast criterion ema train_loader "
                   "val_loader plan")
SAVED = ("model", "optimizer", "scheduler", "scaler", "ema")  # the parts whose state a checkpoint holds


def build_model(cfg, num_classes, device, log):
    """DGMN2 of cfg.model, from --weights if given (the release's or ours), on the device. Drop path is set each
    epoch."""
    model = dgmn2.build(cfg.model, num_classes=num_classes).to(device)
    if cfg.weights:
        try:
            state = dgmn2.load_checkpoint(cfg.weights)
        except ValueError as error:  # it names the file
            raise InputError(f"--weights {error}") from None
        weights = state.get("model", state) if isinstance(state, dict) else {}  # a training script's, or bare
        if dgmn2.is_release(weights):
            try:
                dgmn2.load_official(model, weights)
            except ValueError as error:
                raise InputError(f"--weights {cfg.weights}: {error}") from None
        else:
            load_weights(model, weights, f"--weights {cfg.weights}")
    macs, _ = dgmn2.count_macs(cfg.model, cfg.img_size)
    log(f"DGMN2-{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters at {num_classes} "
        f"classes, {macs / 1e9:.3f}G multiply-adds at {cfg.img_size} x {cfg.img_size}")
    return model.to(memory_format=torch.channels_last) if cfg.channels_last else model


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on biases and norm weights (1-d), as the release's timm optimiser; its
    relative-position tables (2-d, not in its no_weight_decay) decay with the matrices."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def peak_lr(cfg):
    """--lr scaled to the global batch, DeiT's rule: --lr at REFERENCE_BATCH images a step."""
    return cfg.lr * cfg.batch_size / REFERENCE_BATCH


def optimiser(cfg, model, steps_per_epoch):
    """AdamW at the peak lr scaled to the global batch, and its schedule, stepped every optimiser step: linear
    warm-up from --warmup-lr over --warmup-epochs, then cosine to --min-lr at the last step. The release steps timm's
    cosine once an epoch, an epoch behind (its first two epochs at --warmup-lr): the same shape in steps of an epoch."""
    peak = peak_lr(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak)
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch
    cosine = CosineAnnealingLR(optimizer, T_max=max(total - warmup, 1), eta_min=cfg.min_lr)
    if not warmup:
        return optimizer, cosine
    ramp = LinearLR(optimizer, start_factor=cfg.warmup_lr / peak, total_iters=warmup)
    return optimizer, SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])


def evaluated_weights(path, state, parts, log):
    """--eval-only --resume: the checkpoint's EMA weights replace the trained ones that restore() loaded, if saved."""
    averaged = {k.removeprefix("module."): v for k, v in (state.get("ema") or {}).items() if k != "n_averaged"}
    if averaged:
        load_weights(parts.model, averaged, path)
    log(f"Evaluating the {'EMA' if averaged else 'trained (no EMA in the checkpoint)'} weights of {path}.")


def to_device(images, labels, cfg, device):
    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else images, labels


def train_step(parts, images, targets, cfg):
    """One optimiser step of parts.trained. Returns the loss (detached, on the device)."""
    with parts.autocast:
        loss = parts.criterion(parts.trained(images), targets)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    if cfg.clip_grad:
        parts.scaler.unscale_(parts.optimizer)
        nn.utils.clip_grad_norm_(parts.trained.parameters(), cfg.clip_grad)
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()
    return loss.detach()


@torch.no_grad()
def evaluate(model, loader, device, autocast, cfg, world):
    """Exact top-1 and top-5 (%) over the whole validation set: each rank counts its images; summed over ranks."""
    model.eval()
    counts = torch.zeros(3, device=device, dtype=torch.float64)  # top-1 hits, top-5 hits, images
    for images, labels in loader:
        images, labels = to_device(images, labels, cfg, device)
        with autocast:
            logits = model(images)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, 5)
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(len(labels), device=device)])
    if world > 1:
        dist.all_reduce(counts)
    model.train()
    top1, top5, images = counts.tolist()
    return dict(top1=100 * top1 / images, top5=100 * top5 / images, images=int(images))


def train_steps(first, last, cfg, rank, world, device, parts):
    """Optimiser steps first + 1 to last, within one epoch. Every random choice in them (order, augmentations,
    mixing, stochastic depth) follows from (seed, epoch, rank) and the first step: a resumed run repeats what the
    interrupted one would have done."""
    loader, steps_per_epoch = parts.train_loader, parts.plan["steps_per_epoch"]
    epoch = first // steps_per_epoch
    torch.manual_seed(seed_of(cfg.seed, epoch, rank, first))
    loader.sampler.set_epoch(epoch, start=first % steps_per_epoch * loader.batch_size)  # the rank's samples before
    parts.model.set_drop_path_rate(cfg.drop_path if epoch >= cfg.drop_path_epoch else 0.0)
    progress = Progress(cfg, rank, world, device, first, last, cfg.batch_size, f"epoch {epoch + 1}", cfg.output)
    for images, targets in progress.batches(itertools.islice(loader, last - first)):
        loss = train_step(parts, *to_device(images, targets, cfg, device), cfg)
        parts.scheduler.step()
        if parts.ema:
            parts.ema.update_parameters(parts.model)
        progress.update(dict(loss=loss), parts.scheduler.get_last_lr()[0])
    seconds = time.perf_counter() - progress.started
    return dict(epoch=epoch + 1, step=parts.scheduler.last_epoch, train_loss=progress.close()["loss"],
                lr=parts.scheduler.get_last_lr()[0], images_per_s=(last - first) * cfg.batch_size / seconds)


def train(cfg, rank, world, device, parts, start, log):
    """Steps start + 1 to the last in stretches ending at each --save-every step and at each epoch's end: there the
    record in log.jsonl and a checkpoint (rank 0), and at an epoch's end first an evaluation (the EMA weights too).
    Returns the last epoch's record."""
    output, record, steps_per_epoch = output_folder(cfg), None, parts.plan["steps_per_epoch"]
    total = cfg.epochs * steps_per_epoch
    ends = {*range(cfg.save_every, total, cfg.save_every), *range(steps_per_epoch, total + 1, steps_per_epoch)}
    for first, last in itertools.pairwise([start, *sorted(end for end in ends if end > start)]):
        record = train_steps(first, last, cfg, rank, world, device, parts)
        if last % steps_per_epoch == 0:
            record.update(evaluate_epoch(cfg, world, device, parts))
        save_record(record, output, cfg, parts, rank, log)
    return record


def evaluate_epoch(cfg, world, device, parts):
    """At an epoch's end: top-1 and top-5 of the trained weights and, if kept, of their moving average."""
    if world > 1:  # BatchNorm statistics moved on each rank after DDP's last broadcast: evaluate rank 0's
        for buffer in [*parts.model.buffers(), *(parts.ema.module.buffers() if parts.ema else [])]:
            dist.broadcast(buffer, src=0)
    metrics = evaluate(parts.model, parts.val_loader, device, parts.autocast, cfg, world)
    if parts.ema:
        ema = evaluate(parts.ema.module, parts.val_loader, device, parts.autocast, cfg, world)
        metrics.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    return metrics


def save_record(record, output, cfg, parts, rank, log):
    """Rank 0: the record in log.jsonl, then the checkpoint of its step (a kill between the two loses none)."""
    if rank != 0:
        return
    with open(output / "log.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    path = save_checkpoint(output / f"checkpoint-{record['step']:07d}.pth", cfg, parts, step=record["step"])
    scores = f", top-1 {record['top1']:.2f}%, top-5 {record['top5']:.2f}%" if "top1" in record else ""
    log(f"epoch {record['epoch']}/{cfg.epochs}, step {record['step']}: loss {record['train_loss']:.3f}{scores}, "
        f"{record['images_per_s']:.0f} images/s; saved {path}")


def run(cfg, rank, world, device):
    """A run in named steps: data, model, optimiser and schedule, the starting point; then a benchmark, an
    evaluation or training. Returns the last evaluation's metrics (None for --bench)."""
    log = print if rank == 0 else lambda *args, **kwargs: None
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    train_loader, val_loader, num_classes = (None, None, 1000) if cfg.bench else loaders(cfg, rank, world, log)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = build_model(cfg, num_classes, device, log)
    steps_per_epoch = len(train_loader) if train_loader else 1
    optimizer, scheduler = optimiser(cfg, model, steps_per_epoch)
    dtype, autocast, scaler = precision(cfg, device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True) \
        if cfg.ema_decay else None
    parts = Parts(model, distribute(model, cfg, world), optimizer, scheduler, scaler, autocast,
                  nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), ema, train_loader, val_loader,
                  dict(steps_per_epoch=steps_per_epoch))
    path, state = (None, None) if cfg.bench else resume(cfg, rank, world, WEIGHTS_DEPEND_ON, TRAINING_DEPENDS_ON, log)
    start = restore(path, state, cfg, parts, log)
    if cfg.eval_only and state:
        evaluated_weights(path, state, parts, log)
    log(f"{world} process(es) on {device.type}, global batch {cfg.batch_size}, autocast {dtype}")
    if cfg.bench:
        return bench(cfg, parts, dtype, device, world, log)
    if not cfg.eval_only:
        return train(cfg, rank, world, device, parts, start, log)
    metrics = evaluate(model, val_loader, device, autocast, cfg, world)
    log(f"eval: top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}% on {metrics['images']} images")
    return metrics


# ---- Benchmark beside torchvision's swin_t ---------------------------------------------------------------------
BENCH_WARM_UP = 2  # untimed calls of each model first: they allocate, and on a GPU choose kernels


def bench(cfg, parts, dtype, device, world, log):
    """Training and inference images/s on random images, DGMN2 beside torchvision's swin_t (Table 6 compares the two:
    Small 4.3 and Swin-T 4.5 GMACs), on the same device, batch, precision, memory format and compilation. The two take
    turns step by step, so that a machine whose speed drifts during the run slows both alike; a rate is the global
    batch over the median step's time."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(step):  # one call, the GPU's queue drained before and after it
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        return time.perf_counter() - start

    def infer(p):
        with torch.no_grad(), p.autocast:
            p.trained(images)

    local = cfg.batch_size // world
    images, labels = to_device(torch.randn(local, 3, cfg.img_size, cfg.img_size), torch.randint(0, 1000, (local,)),
                               cfg, device)
    swin = swin_t().to(device, memory_format=torch.channels_last if cfg.channels_last else torch.preserve_format)
    swin_parts = parts._replace(model=swin, trained=distribute(swin, cfg, world),
                                optimizer=torch.optim.AdamW(param_groups(swin, cfg.weight_decay)),
                                scaler=torch.amp.GradScaler(device.type, enabled=parts.scaler.is_enabled()))
    layout = ", channels-last" if cfg.channels_last else ""  # named in every line: a log tells the two runs apart
    models = [(f"DGMN2-{cfg.model} (sampler: {sampler.which_path(device.type)} path{layout})", parts),
              (f"torchvision swin_t{layout}", swin_parts)]
    rates = {}  # (model, "train" or "infer") -> images/s
    for mode, step in [("train", lambda p: train_step(p, images, labels, cfg)), ("infer", infer)]:
        for _, p in models:
            p.trained.train(mode == "train")
            for _ in range(BENCH_WARM_UP):
                step(p)
        times = [[seconds(functools.partial(step, p)) for _, p in models] for _ in range(cfg.bench)]  # (steps, models)
        for (name, _), column in zip(models, zip(*times)):
            rates[name, mode] = cfg.batch_size / statistics.median(column)
    log(f"Training and inference at {cfg.img_size} x {cfg.img_size}, global batch {cfg.batch_size}, autocast {dtype}, "
        f"{cfg.bench} timed steps each, taking turns, on "
        f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'} ({torch.get_num_threads()} threads):\n"
        "| model | parameters | train images/s | inference images/s |\n|---|---|---|---|")
    for name, p in models:
        log(f"| {name} | {sum(q.numel() for q in p.model.parameters()) / 1e6:.1f}M | {rates[name, 'train']:.1f} | "
            f"{rates[name, 'infer']:.1f} |")
    (ours, _), (swin_name, _) = models
    log(f"DGMN2-{cfg.model} / swin_t{layout}: {rates[ours, 'train'] / rates[swin_name, 'train']:.2f}x training, "
        f"{rates[ours, 'infer'] / rates[swin_name, 'infer']:.2f}x inference")


if __name__ == "__main__":
    command_line()
