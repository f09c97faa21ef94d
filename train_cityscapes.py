"""Semantic segmentation on Cityscapes, the recipe (training, sliding-window evaluation, the test server's files, DDP
through torchrun) for segmentation.py's models: DGMN2 + Semantic FPN or a SETR head (Section 6.3, Tables 11, 12) and
the dilated FCN with DGMN or a module of Table 2 (Section 5, Tables 2, 4, 13, 14).

Paper targets, mIoU on Cityscapes val (single scale / multi-scale + flip): DGMN2-Tiny/Small/Medium/Large + Semantic
FPN 78.09/79.40, 80.65/81.58, 80.60/81.79, 81.75/82.64 (the SETR heads: segmentation.MODELS); dilated FCN ResNet-101
75.0, + DGMN (DA+DW+DS) 80.4.

    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny-mla --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                     # Table 11: SETR-MLA at output stride 8, AdamW 1e-4, 40k steps
    torchrun --nproc_per_node 8 train_cityscapes.py --model fcn-dgmn --data /path/to/cityscapes \\
        --pretrained resnet101.pth                                          # Table 2 (SGD 0.01, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-large-mla --data /path/to/cityscapes \\
        --eval-only --resume CKPT --multi-scale --eval-split test --predict DIR     # Table 12: the server's files
    torchrun train_cityscapes.py                  # no --data: the built-in synthetic scenes, a few minutes on a CPU
    python train_cityscapes.py --table            # Tables 2 and 11, as python segmentation.py prints them
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
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler, Subset
from torchvision.transforms import v2
from tqdm import tqdm

import dgmn2
import segmentation


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
# ---- Configuration: the paper's recipes by default; SYNTHETIC replaces what no flag set without --data ----------
IGNORE = 255
SYNTHETIC = dict(iterations=400, batch_size=16, lr=1e-3, base_size=64, crop=64, eval_stride=48, eval_every=100,
                 workers=1, log_every=10, output="runs/synthetic-segmentation")
START_WEIGHTS = "--pretrained"  # the option that takes weights to start from
CHOICES = dict(model=list(segmentation.MODELS), mode=["fine", "coarse"], output_stride=[0, 8, 16, 32],
               eval_split=["val", "test"], optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
# A resume refuses a checkpoint saved with other values of WEIGHTS_DEPEND_ON and, to train on, of TRAINING_DEPENDS_ON
WEIGHTS_DEPEND_ON = ["model", "output_stride", "dgmn_rates", "dgmn_groups", "multi_grid"]
TRAINING_DEPENDS_ON = ["optimizer", "lr", "weight_decay", "poly_power",  # the saved optimiser and schedule hold these
                       "iterations", "batch_size", "eval_every", "save_every", "ohem", "mode", "trainval"]
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CROP_TRIES, CAT_MAX_RATIO = 10, 0.75  # mmseg's RandomCrop: at most 10 redraws of a window where one class covers 75%
TRAIN_CLASSES = [c for c in torchvision.datasets.Cityscapes.classes if c.train_id not in (-1, 255)]  # by train id
PALETTE = torch.tensor([c.color for c in TRAIN_CLASSES] + [[0, 0, 0]] * (256 - 19), dtype=torch.uint8)  # others black


@dataclasses.dataclass
class Config:
    model: str = option("dgmn2-tiny", "DGMN2 + FPN, dgmn2-VARIANT-HEAD (SETR, Table 11), an FCN of Table 2; --table")
    data: str = option("", "the Cityscapes root (leftImg8bit/, gtFine/, gtCoarse/); empty: synthetic scenes")
    mode: str = option("fine", "training labels: fine (gtFine/train) or coarse (gtCoarse/train_extra, Table 12)")
    trainval: bool = option(False, "--mode fine: train on train and val together (Table 12's first and third steps)")
    finetune: str = option("", "a checkpoint of ours whose weights start this run with a new schedule (Table 12)")
    output: str = option("runs/cityscapes", "the folder of the checkpoints, log.jsonl and the prediction pictures")
    pretrained: str = option("", "backbone weights: torchvision's ResNet-101, the release's or our DGMN2; empty: none")
    iterations: int = option(40_000, "training iterations (optimiser steps)")
    batch_size: int = option(8, "the global batch (as the paper reports it): images a step, over all processes")
    optimizer: str = option("auto", "auto: AdamW for DGMN2 (lr 1e-4), SGD with momentum 0.9 for the FCNs (lr 0.01)")
    lr: float = option(0.0, "the initial learning rate; 0: the optimiser's paper value")
    weight_decay: float = option(1e-4, "the weight decay of either optimiser")
    poly_power: float = option(0.9, "the power of the polynomial decay of the learning rate to 0")
    output_stride: int = option(0, "DGMN2 + Semantic FPN: 8, 16 or 32 (Section 6.3); 0: the model's (SETR: 8 only)")
    dgmn_rates: str = option("", "the DGMN FCNs' sampling rates, e.g. 1,6,12 (Table 14); empty: the model's")
    dgmn_groups: int = option(4, "the DGMN FCNs' filter groups G (Table 15); 0: no dynamic weights")
    ohem: bool = option(False, "the FCNs: the loss over the hard pixels alone (OHEM, Table 13)")
    multi_grid: bool = option(False, f"the FCNs: res5's dilations times {segmentation.MULTI_GRID} (Table 13)")
    base_size: int = option(1024, "the shorter side that the random scale multiplies (Cityscapes: 2048 x 1024)")
    scale_min: float = option(0.5, "the smallest random scale of a training image")
    scale_max: float = option(2.0, "the largest random scale of a training image")
    crop: int = option(769, "the side of the square training crop, and of the sliding window at evaluation")
    eval_stride: int = option(513, "the step of the sliding window at evaluation")
    eval_batch: int = option(8, "sliding windows that go through the model in one forward at evaluation")
    eval_every: int = option(4000, "iterations between evaluations, each followed by a checkpoint")
    save_every: int = option(1000, "iterations between checkpoints")
    multi_scale: bool = option(False, "evaluate at scales 0.5-1.75 with horizontal flips as well")
    pictures: int = option(4, "colourised predictions saved beside their labels at each evaluation")
    amp: str = option("auto", "mixed precision: auto is bf16 on GPUs that have it, else fp16; off on CPU")
    workers: int = option(4, "data-loading worker processes per training process")
    log_every: int = option(50, "iterations between log lines (the loss is averaged over them: one host sync each)")
    channels_last: bool = option(False, "channels-last model and inputs; off until a GPU measurement shows it faster")
    compile: bool = option(False, "torch.compile the training model; off until a GPU measurement shows it faster")
    seed: int = option(0, "the seed of the initial weights, the data order and the augmentations")
    resume: str = option("", "a checkpoint to continue from, or auto: the newest in --output (if any)")
    eval_only: bool = option(False, "evaluate the --resume checkpoint and stop")
    eval_split: str = option("val", "the split that --eval-only evaluates or --predict writes (test: --predict only)")
    predict: str = option("", "with --eval-only: write the predicted labelIds to DIR as the test server takes them")
    synthetic_train: int = option(2000, "training scenes of the built-in synthetic set")
    synthetic_val: int = option(100, "validation scenes of the built-in synthetic set")
    table: bool = option(False, "print the models' parameters and FLOPs beside the paper's (Tables 2, 11); exit")

    @property
    def layout(self):
        """The memory format of the model and its inputs."""
        return torch.channels_last if self.channels_last else torch.preserve_format


def check(cfg):
    """Options out of range or that do not go together: InputError."""
    for name in ["iterations", "batch_size", "crop", "eval_stride", "eval_batch", "eval_every", "save_every",
                 "base_size", "log_every", "synthetic_train", "synthetic_val"]:
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    fcns, dgmn_fcns, channels = list(segmentation.FCN_VARIANTS), segmentation.DGMN_FCNS, segmentation.FCN_CHANNELS
    for name, models in [("dgmn_rates", dgmn_fcns), ("dgmn_groups", dgmn_fcns), ("ohem", fcns), ("multi_grid", fcns)]:
        if getattr(cfg, name) != getattr(Config, name) and cfg.model not in models:
            raise InputError(f"--{name.replace('_', '-')} applies to {', '.join(models)}, not to --model {cfg.model}")
    row = segmentation.MODELS[cfg.model]  # --output-stride is segmentation.build()'s to check
    refusals = [
        (not re.fullmatch(r"([1-9]\d*(,[1-9]\d*)*)?", cfg.dgmn_rates), f"--dgmn-rates {cfg.dgmn_rates!r}: give "
         "positive integers separated by commas, e.g. 1,6,12"),
        (cfg.lr < 0, f"--lr {cfg.lr}: a learning rate, or 0 for the optimiser's paper value"),
        (cfg.weight_decay < 0, f"--weight-decay {cfg.weight_decay} must be at least 0"),
        (cfg.poly_power <= 0, f"--poly-power {cfg.poly_power} must be positive"),
        (not 0 < cfg.scale_min <= cfg.scale_max, f"--scale-min {cfg.scale_min} and --scale-max {cfg.scale_max}: give "
         "0 < min <= max"),
        (int(cfg.base_size * cfg.scale_min) < 1, f"--base-size {cfg.base_size} at --scale-min {cfg.scale_min}: a "
         "shorter side under one pixel"),
        (cfg.workers < 0, f"--workers {cfg.workers} must be at least 0"),
        (cfg.eval_stride > cfg.crop, f"--eval-stride {cfg.eval_stride} exceeds the window --crop {cfg.crop}: pixels "
         "missed"),
        (cfg.eval_only and not cfg.resume, "--eval-only needs the model to evaluate: --resume CKPT"),
        (cfg.dgmn_groups < 0 or cfg.dgmn_groups and channels % cfg.dgmn_groups, f"--dgmn-groups {cfg.dgmn_groups}: 0 "
         f"(no dynamic weights) or a divisor of {channels}"),
        (cfg.dgmn_groups not in (0, Config.dgmn_groups) and (getattr(row, "dgmn", None) or {}).get(
            "dynamic_weights") is False, f"--dgmn-groups {cfg.dgmn_groups}: {cfg.model} has no dynamic weights "
         "(fcn-da-dw has)"),
        (cfg.mode == "coarse" and not cfg.data, "--mode coarse needs --data: the synthetic scenes have no coarse "
         "labels"),
        (cfg.trainval and cfg.mode == "coarse", "--trainval applies to --mode fine: the coarse labels are "
         "train_extra's"),
        (cfg.finetune and cfg.eval_only, "--finetune starts a training run: evaluate a checkpoint with --eval-only "
         "--resume CKPT"),
        (cfg.finetune and cfg.pretrained, "--finetune gives the whole model's weights: leave out --pretrained"),
        (cfg.finetune and not Path(cfg.finetune).is_file(), f"--finetune {cfg.finetune}: no such checkpoint"),
        (cfg.predict and not cfg.eval_only, "--predict needs --eval-only --resume CKPT"),
        (cfg.predict and not cfg.data, "--predict needs --data: it writes Cityscapes' file names"),
        (cfg.predict and Path(cfg.predict).exists() and not Path(cfg.predict).is_dir(),
         f"--predict {cfg.predict}: a file, not a directory"),
        (cfg.eval_split == "test" and not cfg.predict, "--eval-split test: its labels are withheld; write the test "
         "server's label images with --predict DIR")]
    for refused, message in refusals:
        if refused:
            raise InputError(message)


# ---- Data: the built-in synthetic scenes or Cityscapes, uint8 images and labels --------------------------------
class Scenes(Dataset):
    """A learnable stand-in for Cityscapes, scene i a function of (seed, i): sky, ground and 2-4 random shapes (disc,
    square, triangle, bar) in their class's colours, with noise, labelled pixel by pixel. -> ((3, S, S), (S, S))."""
    classes = ["sky", "ground", "disc", "square", "triangle", "bar"]
    colours = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.9, 0.8, 0.1], [0.8, 0.3, 0.9]])  # each shape's

    def __init__(self, size, length, seed):
        self.size, self.length, self.seed = size, length, seed

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if not 0 <= index < self.length:
            raise IndexError(index)
        g, S = torch.Generator().manual_seed(seed_of(self.seed, index)), self.size
        uniform = functools.partial(torch.rand, generator=g)  # U(0, 1) numbers of a given shape
        y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
        label = torch.where(y < (uniform(1) - 0.5) * 0.8 + (uniform(1) - 0.5) * 0.6 * x, 0, 1)  # sky above a horizon
        sky, ground = uniform(3, 1, 1) * 0.5 + torch.tensor([[[0.2]], [[0.3]], [[0.5]]]), uniform(3, 1, 1) * 0.6
        image = torch.where(label == 0, sky, ground) + 0.1 * uniform(3, 1, 1) * y
        for _ in range(2 + int(uniform(1) * 3)):
            kind, scale, angle = 2 + int(uniform(1) * 4), 0.2 + 0.25 * uniform(1), 2 * math.pi * uniform(1)
            cy, cx = (uniform(2) - 0.5) * 1.8
            cos, sin = angle.cos(), angle.sin()
            u, v = (cos * (x - cx) + sin * (y - cy)) / scale, (-sin * (x - cx) + cos * (y - cy)) / scale
            inside = [u ** 2 + v ** 2 < 0.8, (u.abs() < 0.7) & (v.abs() < 0.7),
                      (v < 0.6) & (v > 1.9 * u.abs() - 0.9), (u.abs() < 0.95) & (v.abs() < 0.25)][kind - 2]
            image = torch.where(inside, 0.7 * self.colours[kind - 2][:, None, None] + 0.3 * uniform(3, 1, 1), image)
            label = torch.where(inside, kind, label)
        image = (image + 0.04 * torch.randn(3, S, S, generator=g)).clamp(0, 1)
        return (image * 255).round().to(torch.uint8), label.to(torch.uint8)


class CityscapesTrainIds(torchvision.datasets.Cityscapes):
    """Cityscapes (semantic; mode "fine": gtFine, "coarse": gtCoarse), labelIds mapped to the 19 train ids, others
    IGNORE. -> ((3, H, W), (H, W)) uint8."""
    def __init__(self, root, split, mode="fine"):
        try:
            super().__init__(root, split=split, mode=mode, target_type="semantic")
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{root}: not a Cityscapes directory for split {split!r} ({mode}: {error})") from None
        if len(self) == 0:
            raise InputError(f"{root}: no {split} images under leftImg8bit/{split}")
        self.lut = torch.full((256,), IGNORE, dtype=torch.uint8)  # labelId -> train id
        self.lut[[c.id for c in TRAIN_CLASSES]] = torch.tensor([c.train_id for c in TRAIN_CLASSES], dtype=torch.uint8)

    def __getitem__(self, index):
        try:
            image, target = super().__getitem__(index)
        except OSError as error:  # the image's or its label's file: the error names which
            raise InputError(f"{self.images[index]}: unreadable image or label ({error})") from None
        if image.size != target.size:  # PIL's (width, height)
            raise InputError(f"{self.images[index]}: the image is {image.size[0]} x {image.size[1]} but its label "
                             f"{self.targets[index][0]} is {target.size[0]} x {target.size[1]}")
        return v2.functional.pil_to_tensor(image), self.lut[v2.functional.pil_to_tensor(target)[0].long()]


class CityscapesImages(Dataset):
    """The images of a Cityscapes split without labels (the test split's are withheld), for --predict:
    leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, names[i] the path under SPLIT (CITY/NAME). -> (uint8 (3, H, W), i)."""
    def __init__(self, root, split):
        self.folder = Path(root, "leftImg8bit", split)
        self.names = sorted(file.relative_to(self.folder) for file in self.folder.glob("*/*_leftImg8bit.png"))
        if not self.names:
            raise InputError(f"{root}: no {split} images under leftImg8bit/{split}/CITY/")

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        path = self.folder / self.names[index]
        try:
            return torchvision.io.read_image(str(path), torchvision.io.ImageReadMode.RGB), index
        except RuntimeError as error:
            raise InputError(f"{path}: unreadable ({error})") from None


def datasets(cfg):
    """(the training set (None under --eval-only): --mode's labels, coarse: train_extra, fine: train (and val under
    --trainval); the evaluated set: --eval-split's, its images alone for --predict; the class names)."""
    if not cfg.data:
        train, val = Scenes(cfg.base_size, cfg.synthetic_train, 1), Scenes(cfg.base_size, cfg.synthetic_val, 2)
        return ConcatDataset([train, val]) if cfg.trainval else train, val, Scenes.classes
    if not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: no such data directory")
    evaluated = (CityscapesImages if cfg.predict else CityscapesTrainIds)(cfg.data, cfg.eval_split)
    splits = ["train_extra"] if cfg.mode == "coarse" else ["train", "val"] if cfg.trainval else ["train"]
    train = None if cfg.eval_only else ConcatDataset([CityscapesTrainIds(cfg.data, s, cfg.mode) for s in splits])
    return train, evaluated, [c.name for c in TRAIN_CLASSES]


# ---- Training augmentation as mmsegmentation trains Cityscapes (Augmented), each draw replayable ---------------
def saturation(image, factor):
    """HSV saturation S times factor (at most 1), hue and V = max(R, G, B) kept: c -> V - (V - c) * min(factor, 1/S)."""
    value, least = image.amax(-3, keepdim=True), image.amin(-3, keepdim=True)
    return value - (value - image) * torch.clamp(value / (value - least).clamp_min(1e-6), max=factor)


# op(image, value) and the value's range; the hue turned by OpenCV's delta out of 180, in turns
DISTORTIONS = dict(brightness=(torch.add, -32, 32), contrast=(torch.mul, 0.5, 1.5), saturation=(saturation, 0.5, 1.5),
                   hue=(lambda image, turns: v2.functional.adjust_hue(image / 255, turns) * 255, -18 / 180, 18 / 180))


def photometric_distortion(image, g):
    """mmseg's PhotoMetricDistortion of a float (3, H, W) 0-255 image: each op with p = 0.5 at a value uniform in its
    DISTORTIONS range, clipped to [0, 255], contrast second or last; unlike mmseg, a continuous hue, no uint8 steps."""
    coins, values = torch.rand(5, generator=g).tolist(), torch.rand(4, generator=g).tolist()
    order = ["brightness", "contrast", "saturation", "hue"] if coins[4] < 0.5 else \
        ["brightness", "saturation", "hue", "contrast"]
    drawn = {name: (coin < 0.5, low + (high - low) * u)
             for (name, (_, low, high)), coin, u in zip(DISTORTIONS.items(), coins, values)}
    for name in order:
        if drawn[name][0]:
            image = DISTORTIONS[name][0](image, drawn[name][1]).clamp(0, 255)
    return image


def random_crop(image, label, short, crop, g, tries=CROP_TRIES):
    """Crop-then-resize with the windows of resize-then-crop: a RandomCrop window of the image at shorter side short
    (torchvision's rounding), mapped back to whole source pixels, resized (image bilinear, not antialiased, as mmcv's
    cv2 resize in the release's pipeline; label nearest); one without two classes, or with one over CAT_MAX_RATIO of
    its labels, is redrawn up to `tries` times (0: the first window). -> ((3, h, w), (h, w))."""
    H, W = label.shape
    Hs, Ws = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    h, w = min(crop, Hs), min(crop, Ws)
    for attempt in range(tries + 1):
        top, left = (int(torch.randint(side - size + 1, (), generator=g)) for side, size in ((Hs, h), (Ws, w)))
        y0, x0 = min(int(top * H / Hs + 0.5), H - 1), min(int(left * W / Ws + 0.5), W - 1)  # rounded to the nearest
        y1, x1 = max(int((top + h) * H / Hs + 0.5), y0 + 1), max(int((left + w) * W / Ws + 0.5), x0 + 1)
        cut = v2.functional.resize(label[None, y0:y1, x0:x1], [h, w], v2.InterpolationMode.NEAREST)[0]
        counts = torch.bincount(cut[cut != IGNORE].long())  # labelled pixels a class
        if attempt == tries or counts.count_nonzero() > 1 and counts.max() < CAT_MAX_RATIO * counts.sum():
            return v2.functional.resize(image[:, y0:y1, x0:x1], [h, w], antialias=False), cut


def normalise(image):
    """A float image (..., 3, H, W) on the 0-255 scale, less the ImageNet mean, over its deviation: mean colour 0."""
    mean, std = 255 * torch.tensor([dgmn2.IMAGENET_MEAN, dgmn2.IMAGENET_STD], device=image.device)[..., None, None]
    return (image - mean) / std  # mean, std: (3, 1, 1)


class Augmented(Dataset):
    """mmseg's Cityscapes training pipeline (the DGMN2 release's): a shorter side uniform in range(*shorts),
    random_crop, a flip (p = 0.5), photometric_distortion, normalise, padding at the bottom and right (image 0, label
    IGNORE). The FCNs of Tables 2, 4, 13, 14 take Section 8.1.1's random crop and flip (after the random scale of the
    CCNet code it follows) alone: no crop rejection, no photometric distortion. Item (key, index), its draws from
    (seed, key, index) alone: a resumed run repeats them. -> (float (3, crop, crop), uint8 (crop, crop))."""
    def __init__(self, dataset, cfg):
        self.dataset, self.crop, self.seed = dataset, cfg.crop, cfg.seed
        self.shorts = int(cfg.base_size * cfg.scale_min), int(cfg.base_size * cfg.scale_max) + 1
        self.mmseg = cfg.model not in segmentation.FCN_VARIANTS

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        g = torch.Generator().manual_seed(seed_of(self.seed, *key))
        short = int(torch.randint(*self.shorts, (), generator=g))
        image, label = random_crop(*self.dataset[key[1]], short, self.crop, g, CROP_TRIES if self.mmseg else 0)
        if torch.rand((), generator=g) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = normalise(photometric_distortion(image.float(), g) if self.mmseg else image.float())
        pad = (0, self.crop - label.shape[1], 0, self.crop - label.shape[0])  # (left, right, top, bottom)
        return F.pad(image, pad), F.pad(label, pad, value=IGNORE)


class Passes(DistributedSampler):
    """Pass after pass over this rank's share of the training set, without end, pass p shuffled by (seed, p); an
    iterator starts at item `start` of that stream (a resumed run skips the items the interrupted one had seen without
    loading them). Items: (p, index), the pass and the index seeding the item's augmentation."""
    start = 0

    def __iter__(self):
        first_pass, skip = divmod(self.start, self.num_samples)  # num_samples: this rank's items a pass
        for p in itertools.count(first_pass):
            self.set_epoch(seed_of(self.seed, p))  # shuffled by seed + epoch: seed + p would be seed + 1's pass p - 1
            yield from ((p, index) for index in itertools.islice(super().__iter__(), skip, None))
            skip = 0


# ---- The model: segmentation.py's, as the options say, with its pretrained backbone -----------------------------
def build_model(cfg, classes, world, device):
    """--model with its --pretrained backbone, SyncBatchNorm under DDP on GPUs, on device (channels-last if asked).
    A DGMN FCN's switches give way to --dgmn-rates and --dgmn-groups (Tables 14, 15)."""
    rates = dict(rates=tuple(map(int, cfg.dgmn_rates.split(",")))) if cfg.dgmn_rates else {}
    switches = {**rates, **(dict(groups=cfg.dgmn_groups) if cfg.dgmn_groups else dict(dynamic_weights=False))}
    try:
        model = segmentation.build(cfg.model, classes, output_stride=cfg.output_stride or None,
                                   multi_grid=cfg.multi_grid,
                                   dgmn_options=switches if cfg.model in segmentation.DGMN_FCNS else None)
    except ValueError as error:  # what check() has not caught, in the model file's words
        raise InputError(f"--model {cfg.model}: {error}") from None
    if cfg.pretrained:
        try:
            segmentation.load_pretrained(model, dgmn2.load_checkpoint(cfg.pretrained))
        except ValueError as error:  # load_checkpoint's name the file, load_pretrained's do not
            message = str(error).removeprefix(cfg.pretrained + ": ")
            raise InputError(f"--pretrained {cfg.pretrained}: {message}") from None
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=cfg.layout)


# ---- Evaluation: sliding windows, scales and flips; mIoU from a confusion matrix -------------------------------
@torch.no_grad()
def predictions(model, dataset, classes, cfg, device, autocast, rank, world):
    """This rank's share of dataset, items rank, rank + world, ... (each item once over the ranks, none padded), and
    the model's classes: yields (image (1, 3, H, W) uint8 on device, the item's second part, prediction (H, W))."""
    model.eval()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    inference = dict(window=cfg.crop, stride=cfg.eval_stride, batch=cfg.eval_batch, layout=cfg.layout,
                     scales=MULTI_SCALES if cfg.multi_scale else (1,), flip=cfg.multi_scale)  # the training crop's
    for image, other in tqdm(loader, desc="eval", disable=rank != 0 or not sys.stderr.isatty(), leave=False):
        image = image.to(device, non_blocking=True)
        with autocast:
            scores = segmentation.predict(model, normalise(image.float()), classes, **inference)
        yield image, other[0], scores.argmax(dim=1)[0]
    model.train()


def evaluate(model, val, class_names, cfg, device, autocast, rank, world, pictures_to=None):
    """Exact mIoU, per-class IoU (TP / (TP + FP + FN) of a confusion matrix; NaN for a class absent from both), labelled
    pixels over val (rank r: images r, r + world, ...); rank 0 saves pictures: image, label, prediction."""
    classes, shown = len(class_names), []
    matrix = torch.zeros(classes ** 2, dtype=torch.long, device=device)  # (true, predicted) counts, flattened
    for image, label, prediction in predictions(model, val, classes, cfg, device, autocast, rank, world):
        label = label.to(device, non_blocking=True).long()
        keep = label != IGNORE
        matrix += torch.bincount(label[keep] * classes + prediction[keep], minlength=classes ** 2)
        if pictures_to and rank == 0 and len(shown) < 3 * cfg.pictures:
            colours = PALETTE.to(device)[torch.stack([label, prediction])]  # (2, H, W, 3)
            shown += [image[0], *colours.permute(0, 3, 1, 2)]  # each (3, H, W)
    if world > 1:
        dist.all_reduce(matrix)
    if shown:
        torchvision.utils.save_image(torch.stack(shown) / 255, pictures_to, nrow=3)
    matrix = matrix.view(classes, classes)  # (true, predicted)
    tp = matrix.diag().double()
    per_class = 100 * tp / (matrix.sum(0) + matrix.sum(1) - tp)
    return dict(miou=per_class.nanmean().item(), pixels=int(matrix.sum()),  # absent classes: None (JSON has no NaN)
                iou={n: None if math.isnan(v) else round(v, 2) for n, v in zip(class_names, per_class.tolist())})


def write_predictions(model, images, cfg, device, autocast, rank, world):
    """--predict DIR: the predicted classes of each of images (a CityscapesImages) as labelIds, Cityscapes' submission
    format, in DIR/CITY/NAME_leftImg8bit.png; each image by one rank (a failure raises). -> dict(written=images)."""
    try:
        Path(cfg.predict).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"--predict {cfg.predict}: cannot be made a folder ({error.strerror or error})") from None
    label_ids = torch.tensor([c.id for c in TRAIN_CLASSES], dtype=torch.uint8, device=device)  # by train id
    for _, index, prediction in predictions(model, images, len(TRAIN_CLASSES), cfg, device, autocast, rank, world):
        path = Path(cfg.predict) / images.names[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_png(label_ids[prediction][None].cpu(), str(path))  # (1, H, W): one grey channel
    return dict(written=len(images))


# ---- Training --------------------------------------------------------------------------------------------------
def run(cfg, rank, world, device):
    """A run in named steps: the checkpoint, data, model, optimiser and schedule, the starting point; then
    predictions, an evaluation or training. Returns the last evaluation's metrics."""
    if cfg.table:
        return segmentation.print_tables() if rank == 0 else None
    log = print if rank == 0 else lambda *args, **kwargs: None
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    path, state = resume(cfg, rank, world, WEIGHTS_DEPEND_ON, TRAINING_DEPENDS_ON, log)
    train, val, class_names = datasets(cfg)
    model = build_model(cfg, len(class_names), world, device)
    announce(cfg, log, world, device, model, path)
    optimizer, scheduler = optimiser_and_schedule(cfg, model)
    _, autocast, scaler = precision(cfg, device)
    parts = Parts(model, distribute(model, cfg, world), optimizer, scheduler, scaler, autocast,
                  functools.partial(evaluate, model, val, class_names, cfg, device, autocast, rank, world),
                  None if cfg.eval_only else training_loader(train, cfg, rank, world, device),
                  {} if cfg.eval_only else dict(training_images=len(train)))
    start = restore(path, state, cfg, parts, log)
    if cfg.finetune and not state:  # the weights alone: this run's schedule and optimiser start afresh
        load_weights(model, read_checkpoint(cfg.finetune, cfg, WEIGHTS_DEPEND_ON, [])["model"], cfg.finetune)
        log(f"Fine-tuning the weights of {cfg.finetune} (a checkpoint in --output would take their place).")
    output_folder(cfg)
    if cfg.eval_only and cfg.predict:
        result = write_predictions(model, val, cfg, device, autocast, rank, world)
        log(f"wrote the labelIds of {result['written']} {cfg.eval_split} images to {cfg.predict}")
        return result
    if cfg.eval_only:
        metrics = parts.evaluation(Path(cfg.output) / "eval.png")
        log(f"eval: mIoU {metrics['miou']:.2f}% ({'multi-scale + flip' if cfg.multi_scale else 'single scale'})")
        return metrics
    return training(cfg, rank, world, device, parts, start, log)


# What a run holds: the model (trained: it under DDP / compile), its optimiser, schedule, precision, evaluation and
# training batches, and the plan: what the data order depends on beyond the options, unchanged in a resumed run
Parts = namedtuple("Parts", "model trained optimizer scheduler scaler autocast evaluation loader plan")
SAVED = ("model", "optimizer", "scheduler", "scaler")  # the parts whose state a checkpoint holds


def training(cfg, rank, world, device, parts, start, log):
    """Iterations start + 1 to --iterations in stretches ending at each --save-every, each --eval-every and the last:
    there the record in log.jsonl and a checkpoint (rank 0), and (at --eval-every and the last) an evaluation. Returns
    the last metrics. A stretch's draws follow from (seed, its first iteration, rank) and the items' keys, its items
    from where the stretch starts in the sampler's stream: a resumed run repeats an uninterrupted one."""
    output, metrics = Path(cfg.output), None
    criterion = functools.partial(segmentation.ohem_cross_entropy if cfg.ohem else segmentation.cross_entropy,
                                  ignore_index=IGNORE)
    ends = {*range(cfg.save_every, cfg.iterations, cfg.save_every),
            *range(cfg.eval_every, cfg.iterations, cfg.eval_every), cfg.iterations}
    for first, last in itertools.pairwise([start, *sorted(end for end in ends if end > start)]):
        torch.manual_seed(seed_of(cfg.seed, first, rank))  # dropout's
        parts.loader.sampler.start = first * parts.loader.batch_size  # the rank's items before this stretch
        progress = Progress(cfg, rank, world, device, first, last, cfg.batch_size, f"train to {last}", cfg.output)
        for images, labels in progress.batches(itertools.islice(parts.loader, last - first)):
            images = images.to(device, non_blocking=True, memory_format=cfg.layout)
            with parts.autocast:
                loss = criterion(parts.trained(images), labels.to(device, non_blocking=True).long())
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scaler.scale(loss).backward()
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
            parts.scheduler.step()
            progress.update(dict(loss=loss), parts.scheduler.get_last_lr()[0])
        record = dict(iteration=last, loss=progress.close()["loss"],
                      seconds=round(time.perf_counter() - progress.started, 1))
        if last % cfg.eval_every == 0 or last == cfg.iterations:
            if world > 1:  # without SyncBatchNorm (CPU) the ranks' statistics differ: evaluate rank 0's
                for buffer in parts.model.buffers():
                    dist.broadcast(buffer, src=0)
            record |= parts.evaluation(output / f"predictions-{last:07d}.png")
            metrics = record
        if rank == 0:  # the record first: a kill between the two loses none
            with open(output / "log.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")
            path = save_checkpoint(output / f"checkpoint-{last:07d}.pth", cfg, parts, step=last)
            miou = f", mIoU {record['miou']:.2f}%" if "miou" in record else ""
            log(f"iteration {last}/{cfg.iterations}: loss {record['loss']:.3f}{miou}; saved {path}")
        if world > 1:
            dist.barrier()
    return metrics


def announce(cfg, log, world, device, model, checkpoint):
    """What the run trains and on what; a backbone from scratch on real data gets a warning (stderr)."""
    if not cfg.data:
        log(f"No --data: the built-in synthetic scenes ({len(Scenes.classes)} classes, {cfg.synthetic_train} images).")
    elif not (cfg.pretrained or cfg.finetune or checkpoint):
        log("WARNING: no --pretrained: the backbone starts from scratch (random weights), where the paper starts "
            "it from ImageNet weights; expect a far lower mIoU than its tables.", file=sys.stderr, flush=True)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {world} process(es) on "
        f"{device.type}")


def optimiser_and_schedule(cfg, model):
    """auto: AdamW for DGMN2, SGD (momentum 0.9) for the FCNs, at the paper's rate unless --lr, decaying to 0."""
    name = cfg.optimizer if cfg.optimizer != "auto" else "sgd" if cfg.model in segmentation.FCN_VARIANTS else "adamw"
    optimizer = torch.optim.SGD(model.parameters(), cfg.lr or 0.01, momentum=0.9, weight_decay=cfg.weight_decay) \
        if name == "sgd" else torch.optim.AdamW(model.parameters(), cfg.lr or 1e-4, weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.PolynomialLR(optimizer, cfg.iterations, power=cfg.poly_power)


def training_loader(train, cfg, rank, world, device):
    """This rank's share of each global batch of augmented crops, from workers that persist over the run."""
    passes = Passes(train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed, drop_last=True)
    loader = DataLoader(Augmented(train, cfg), cfg.batch_size // world, sampler=passes, drop_last=True,
                        num_workers=cfg.workers, pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(seed_of(cfg.seed, rank)))  # not the global: the model's
    if len(loader) == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch")
    return loader


if __name__ == "__main__":
    command_line()
