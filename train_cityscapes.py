"""Semantic segmentation on Cityscapes, the recipe: training, sliding-window evaluation, the test server's label images,
DDP through torchrun, for the models of segmentation.py: DGMN2 + Semantic FPN or one of SETR's heads (Section 6.3,
Tables 11, 12) and the dilated FCN with the DGMN module or a module it is compared with (Section 5, Tables 2, 4, 13,
14).

Paper targets, mIoU on Cityscapes val (single scale / multi-scale + flip): DGMN2-Tiny/Small/Medium/Large + Semantic
FPN 78.09/79.40, 80.65/81.58, 80.60/81.79, 81.75/82.64 (the SETR heads: segmentation.MODELS); dilated FCN ResNet-101
75.0, + DGMN (DA+DW+DS) 80.4.

    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                                         # Table 11 (AdamW 1e-4, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny-mla --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                                         # Table 11, SETR-MLA at output stride 8
    torchrun --nproc_per_node 8 train_cityscapes.py --model fcn-dgmn --data /path/to/cityscapes \\
        --pretrained resnet101.pth                                          # Table 2 (SGD 0.01, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-large-mla --data /path/to/cityscapes \\
        --eval-only --resume CKPT --multi-scale --eval-split test --predict DIR     # Table 12: the server's files
    torchrun train_cityscapes.py                  # no --data: the built-in synthetic scenes, a few minutes on a CPU
    python train_cityscapes.py --table            # Tables 2 and 11: parameters and FLOPs beside the paper's, as
                                                  # python segmentation.py prints them
"""

import argparse
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
# self-contained. The script around it defines Config, SYNTHETIC (the defaults without --data), CHOICES, check(cfg)
# and run(cfg, rank, world, device).


class InputError(Exception):
    """Bad input (options, paths, data, checkpoints): reported in one line, exit status 1."""


class TrainingError(Exception):
    """A run that cannot go on (a non-finite loss): reported in one line, exit status 1."""


def option(default, help):
    """A Config field: its default and its --help text."""
    return dataclasses.field(default=default, metadata=dict(help=help))


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
            kwargs.update(type=f.type, choices=CHOICES.get(f.name))
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


def logger(rank):
    return print if rank == 0 else lambda *args, **kwargs: None


class Progress:
    """A training loop's log without a host sync a step: the loss terms are summed on the device and, every
    cfg.log_every steps and at the last, averaged over the ranks, checked and shown (a tqdm bar on a terminal, else a
    line with the ETA, images/s, data wait and GPU memory). A non-finite loss stops every rank at the same step."""

    def __init__(self, cfg, rank, world, device, first, last, images_per_step, where, output):
        self.cfg, self.rank, self.world, self.device, self.where, self.output = cfg, rank, world, device, where, output
        self.first = self.synced = self.step = first
        self.last, self.images_per_step, self.names = last, images_per_step, []
        self.sums = self.totals = self.wait = 0
        self.started = self.since = time.perf_counter()
        self.bar = tqdm(total=last - first, desc=where, leave=False, disable=rank != 0 or not sys.stderr.isatty())

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
        eta = datetime.timedelta(seconds=round((now - self.started) / (self.step - self.first)
                                               * (self.last - self.step)))
        line = (f"loss {sum(means):.3f}{terms}, lr {lr:.2e}, {steps * self.images_per_step / (now - self.since):.1f} "
                f"images/s, data wait {1000 * self.wait / steps:.0f} ms/step{memory}, ETA {eta}")
        if self.bar.disable and self.rank == 0:
            print(f"{self.where}, {named}: {line}", flush=True)
        self.bar.set_postfix_str(line, refresh=False)
        self.bar.update(steps)
        self.sums, self.synced, self.since, self.wait = 0, self.step, now, 0.0

    def close(self):
        """The bar goes; returns dict(loss=the mean of the summed terms over the steps run, and each term)."""
        self.bar.close()
        means = (self.totals / (self.step - self.first)).tolist() if self.step > self.first else []
        return dict(loss=sum(means), **(dict(zip(self.names, means)) if len(means) > 1 else {}))


def save_checkpoint(state, path):
    """Written to a temporary file, synced, then renamed (a kill never leaves a broken checkpoint); older ones go."""
    path, temporary = Path(path), Path(path).with_suffix(".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    for old in path.parent.glob("checkpoint-*.pth"):
        if old != path:
            old.unlink()
    return path


def find_checkpoint(cfg):
    """--resume, or the newest checkpoint in --output for "auto" (None if none); another run's --output is refused."""
    found = sorted(Path(cfg.output).glob("checkpoint-*.pth"))
    if cfg.resume and cfg.resume != "auto" and not Path(cfg.resume).is_file():
        raise InputError(f"{cfg.resume}: no such checkpoint")
    if found and not cfg.resume and not cfg.eval_only:
        raise InputError(f"{cfg.output} holds another run's checkpoints: continue it with --resume auto, or choose "
                         "another --output")
    return (found[-1] if found else None) if cfg.resume == "auto" else Path(cfg.resume) if cfg.resume else None


def read_checkpoint(path, cfg, weights_depend_on, training_depends_on):
    """A checkpoint of this script, refused in one line if saved with other values of the options listed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file
        raise InputError(f"{path}: not a readable checkpoint ({str(error).strip().splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "scaler", "config"} <= state.keys():
        raise InputError(f"{path}: not a checkpoint of {Path(__file__).name} (backbone weights go to --pretrained)")
    for name in [*weights_depend_on, *([] if cfg.eval_only else training_depends_on)]:
        saved = state["config"].get(name, getattr(type(cfg), name))  # an option added since: its default
        if saved != getattr(cfg, name):
            raise InputError(f"{path}: saved with --{name.replace('_', '-')} {saved!r}, not {getattr(cfg, name)!r}")
    return state


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


def main(cfg):
    """Train, evaluate or benchmark as cfg says; returns run()'s result (the last evaluation's metrics)."""
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise InputError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}: choose one of {choices}")
    check(cfg)
    rank, world, device, store = setup_distributed()
    try:
        result = run(cfg, rank, world, device)
    except BaseException as error:  # the first rank to fail reports it; the others (their peers gone) stay quiet
        error.reported_elsewhere = world > 1 and store.compare_set("failed", "", str(rank)) != str(rank).encode()
        raise
    if world > 1:
        dist.destroy_process_group()
    return result


def command_line():
    """The script under python or torchrun: bad input or a failed run ends every rank, one line printed once."""
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
CHOICES = dict(model=list(segmentation.MODELS), mode=["fine", "coarse"], output_stride=[0, 8, 16, 32],
               eval_split=["val", "test"], optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
# A resume refuses a checkpoint saved with other values of WEIGHTS_DEPEND_ON and, to train on, of TRAINING_DEPENDS_ON
WEIGHTS_DEPEND_ON = ["model", "output_stride", "dgmn_rates", "dgmn_groups", "multi_grid"]
TRAINING_DEPENDS_ON = ["optimizer", "iterations", "batch_size", "eval_every", "ohem", "mode", "trainval"]
OHEM_THRESHOLD, OHEM_MIN_KEPT = 0.7, 100_000  # pixel OHEM as the CCNet and DANet code bases train Cityscapes
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CROP_TRIES, CAT_MAX_RATIO = 10, 0.75  # mmseg's RandomCrop: at most 10 redraws of a window where one class covers 75%
TRAIN_CLASSES = [c for c in torchvision.datasets.Cityscapes.classes if c.train_id not in (-1, 255)]  # by train id
PALETTE = torch.tensor([c.color for c in TRAIN_CLASSES] + [[0, 0, 0]] * (256 - 19), dtype=torch.uint8)  # others black


@dataclasses.dataclass
class Config:
    model: str = option("dgmn2-tiny", "DGMN2 + Semantic FPN or, as dgmn2-VARIANT-HEAD, a SETR head (naive, pup, "
                        "mla) (Table 11), or the dilated FCN ResNet-101 with a module of Table 2 (--table lists them)")
    data: str = option("", "the Cityscapes root (leftImg8bit/, gtFine/, gtCoarse/); empty: the built-in synthetic "
                       "scenes")
    mode: str = option("fine", "the training annotations: fine (gtFine/train) or coarse (gtCoarse/train_extra, as "
                       "Table 12's second step); evaluation is on the fine ones")
    trainval: bool = option(False, "--mode fine: train on train and val together (Table 12's first and third steps); "
                            "the evaluations during training then see training images")
    finetune: str = option("", "a checkpoint of this script whose model weights start this run, with a new schedule "
                           "and optimiser (Table 12's second and third steps); a --resume found replaces it")
    output: str = option("runs/cityscapes", "the folder of the checkpoints, log.jsonl and the prediction pictures")
    pretrained: str = option("", "backbone weights (nothing is downloaded): a torchvision ResNet-101 state dict, an "
                             "authors' DGMN2 or a train_imagenet.py checkpoint; empty: the backbone from scratch")
    iterations: int = option(40_000, "training iterations (optimiser steps)")
    batch_size: int = option(8, "the global batch (as the paper reports it): images a step, over all processes")
    optimizer: str = option("auto", "auto: AdamW for DGMN2 (lr 1e-4), SGD with momentum 0.9 for the FCNs (lr 0.01)")
    lr: float = option(0.0, "the initial learning rate; 0: the optimiser's paper value")
    weight_decay: float = option(1e-4, "the weight decay of either optimiser")
    poly_power: float = option(0.9, "the power of the polynomial decay of the learning rate to 0")
    output_stride: int = option(0, "DGMN2 + Semantic FPN: 8 for stride-1 patch embeddings in stages 3-4 (Section "
                                "6.3), 16 or 32; 0: the model's, 32, and 8 for the SETR heads, which take no other")
    dgmn_rates: str = option("", "the DGMN FCNs (fcn-da, fcn-da-dw, fcn-dgmn): their sampling rates, comma-separated, "
                             "e.g. 1,6,12 (Table 14); empty: the model's")
    dgmn_groups: int = option(4, "the DGMN FCNs: G, the channel groups of the dynamic filters; 0: no dynamic weights "
                              "(Table 15's G = 0)")
    ohem: bool = option(False, "the FCNs: pixel OHEM (Table 13), the loss over the pixels whose class probability is "
                        f"under {OHEM_THRESHOLD}, or over the {OHEM_MIN_KEPT:,} hardest if fewer (per process)")
    multi_grid: bool = option(False, "the FCNs: res5's three blocks at its dilation times "
                              f"{segmentation.MULTI_GRID} (DeepLab v3's multi-grid, Table 13)")
    base_size: int = option(1024, "the shorter side that the random scale multiplies (Cityscapes: 2048 x 1024)")
    scale_min: float = option(0.5, "the smallest random scale of a training image")
    scale_max: float = option(2.0, "the largest random scale of a training image")
    crop: int = option(769, "the side of the square training crop, and of the sliding window at evaluation")
    eval_stride: int = option(513, "the step of the sliding window at evaluation")
    eval_batch: int = option(8, "sliding windows that go through the model in one forward at evaluation")
    eval_every: int = option(4000, "iterations between evaluations and checkpoints")
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
    eval_split: str = option("val", "the split that --eval-only evaluates or --predict writes: val, or test (its "
                             "labels are withheld: with --predict only)")
    predict: str = option("", "with --eval-only: instead of evaluating, write each image's predicted labelIds to "
                          "DIR/CITY/*_leftImg8bit.png, the format of the Cityscapes test server (Table 12)")
    synthetic_train: int = option(2000, "training scenes of the built-in synthetic set")
    synthetic_val: int = option(100, "validation scenes of the built-in synthetic set")
    table: bool = option(False, "print the models' parameters and FLOPs beside the paper's (Tables 2, 11), then "
                         "exit")

    @property
    def layout(self):
        """The memory format of the model and its inputs."""
        return torch.channels_last if self.channels_last else torch.preserve_format


def check(cfg):
    """Options out of range or that do not go together: InputError."""
    for name in ["iterations", "batch_size", "crop", "eval_stride", "eval_batch", "eval_every", "base_size",
                 "log_every", "synthetic_train", "synthetic_val"]:
        if getattr(cfg, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.eval_stride > cfg.crop:
        raise InputError(f"--eval-stride {cfg.eval_stride} exceeds the window --crop {cfg.crop}: pixels missed")
    if cfg.eval_only and not cfg.resume:
        raise InputError("--eval-only needs the model to evaluate: --resume CKPT")
    fcns, dgmn_fcns, channels = list(segmentation.FCN_VARIANTS), segmentation.DGMN_FCNS, segmentation.FCN_CHANNELS
    for name, models in [("dgmn_rates", dgmn_fcns), ("dgmn_groups", dgmn_fcns), ("ohem", fcns), ("multi_grid", fcns)]:
        if getattr(cfg, name) != getattr(Config, name) and cfg.model not in models:
            raise InputError(f"--{name.replace('_', '-')} applies to {', '.join(models)}, not to --model {cfg.model}")
    if cfg.output_stride and cfg.model in fcns:
        raise InputError(f"--output-stride applies to the DGMN2 models, not to --model {cfg.model}")
    setr = cfg.model not in fcns and segmentation.DGMN2_MODELS[cfg.model].head != "fpn"
    if setr and cfg.output_stride not in (0, segmentation.SETR_OUTPUT_STRIDE):
        raise InputError(f"--output-stride {cfg.output_stride}: the SETR heads take DGMN2 at output stride "
                         f"{segmentation.SETR_OUTPUT_STRIDE} (Section 6.3)")
    check_data_options(cfg)
    if cfg.dgmn_rates:
        rates_of(cfg.dgmn_rates)
    if cfg.dgmn_groups < 0 or cfg.dgmn_groups and channels % cfg.dgmn_groups:
        raise InputError(f"--dgmn-groups {cfg.dgmn_groups}: 0 (no dynamic weights) or a divisor of {channels}")
    if cfg.dgmn_groups not in (0, Config.dgmn_groups) and \
            segmentation.FCN_VARIANTS[cfg.model].dgmn.get("dynamic_weights") is False:
        raise InputError(f"--dgmn-groups {cfg.dgmn_groups}: {cfg.model} has no dynamic weights (fcn-da-dw has)")


def check_data_options(cfg):
    """--mode, --trainval, --finetune, --eval-split and --predict that do not go together: InputError."""
    refusals = [(cfg.mode == "coarse" and not cfg.data, "--mode coarse needs --data: the synthetic scenes have no "
                 "coarse labels"),
                (cfg.trainval and cfg.mode == "coarse", "--trainval applies to --mode fine: the coarse labels are "
                 "train_extra's"),
                (cfg.finetune and cfg.eval_only, "--finetune starts a training run: evaluate a checkpoint with "
                 "--eval-only --resume CKPT"),
                (cfg.finetune and cfg.pretrained, "--finetune gives the whole model's weights: leave out --pretrained"),
                (cfg.finetune and not Path(cfg.finetune).is_file(), f"--finetune {cfg.finetune}: no such checkpoint"),
                (cfg.predict and not cfg.eval_only, "--predict needs --eval-only --resume CKPT"),
                (cfg.predict and not cfg.data, "--predict needs --data: it writes Cityscapes' file names"),
                (cfg.predict and Path(cfg.predict).exists() and not Path(cfg.predict).is_dir(),
                 f"--predict {cfg.predict}: a file, not a directory"),
                (cfg.eval_split == "test" and not cfg.predict, "--eval-split test: its labels are withheld; write the "
                 "test server's label images with --predict DIR")]
    for refused, message in refusals:
        if refused:
            raise InputError(message)


def rates_of(text):
    """--dgmn-rates "1,6,12" -> (1, 6, 12); InputError unless positive integers."""
    try:
        rates = tuple(int(rate) for rate in text.split(","))
    except ValueError:
        rates = ()
    if not rates or min(rates) < 1:
        raise InputError(f"--dgmn-rates {text!r}: give positive integers separated by commas, e.g. 1,6,12")
    return rates


# ---- Data: the built-in synthetic scenes or Cityscapes, uint8 images and labels --------------------------------
class Scenes(Dataset):
    """A learnable stand-in for Cityscapes, scene i a function of (seed, i): sky, ground and 2-4 random shapes (disc,
    square, triangle, bar) in their class's colours, with noise, labelled pixel by pixel. -> ((3, S, S), (S, S))."""
    classes = ["sky", "ground", "disc", "square", "triangle", "bar"]
    colours = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.9, 0.8, 0.1], [0.8, 0.3, 0.9]])  # of the shapes

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
            hue = self.colours[kind - 2][:, None, None]  # (3, 1, 1): each class has its own colour family
            image = torch.where(inside, (0.7 * hue + 0.3 * uniform(3, 1, 1)).clamp(0, 1), image)
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
        except OSError as error:
            raise InputError(f"{self.images[index]}: unreadable ({error})") from None
        return v2.functional.pil_to_tensor(image), self.lut[v2.functional.pil_to_tensor(target)[0].long()]


class CityscapesImages(Dataset):
    """The images of a Cityscapes split without labels (the test split's are withheld), for --predict:
    leftImg8bit/SPLIT/CITY/*_leftImg8bit.png, names[i] the path under SPLIT (CITY/NAME). -> (uint8 (3, H, W), i)."""
    def __init__(self, root, split):
        folder = Path(root, "leftImg8bit", split)
        self.files = sorted(folder.glob("*/*_leftImg8bit.png"))
        if not self.files:
            raise InputError(f"{root}: no {split} images under leftImg8bit/{split}/CITY/")
        self.names = [file.relative_to(folder) for file in self.files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        try:
            return torchvision.io.read_image(str(self.files[index]), torchvision.io.ImageReadMode.RGB), index
        except RuntimeError as error:
            raise InputError(f"{self.files[index]}: unreadable ({error})") from None


def datasets(cfg):
    """(the training set, None under --eval-only; the evaluated set; class names). Training: --mode's annotations
    (coarse: train_extra; fine: train, and val under --trainval); evaluated: --eval-split, or its images alone for
    --predict."""
    if not cfg.data:
        train, val = Scenes(cfg.base_size, cfg.synthetic_train, 1), Scenes(cfg.base_size, cfg.synthetic_val, 2)
        return ConcatDataset([train, val]) if cfg.trainval else train, val, Scenes.classes
    if not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: no such data directory")
    evaluated = (CityscapesImages if cfg.predict else CityscapesTrainIds)(cfg.data, cfg.eval_split)
    splits = ["train_extra"] if cfg.mode == "coarse" else ["train", "val"] if cfg.trainval else ["train"]
    train = None if cfg.eval_only else \
        ConcatDataset([CityscapesTrainIds(cfg.data, split, cfg.mode) for split in splits])
    return train, evaluated, [c.name for c in TRAIN_CLASSES]


# ---- Training augmentation as mmsegmentation trains Cityscapes (Augmented), each draw replayable ---------------
def saturation(image, factor):
    """HSV saturation S times factor (at most 1), hue and V = max(R, G, B) kept: c -> V - (V - c) * min(factor, 1/S)."""
    value, least = image.amax(-3, keepdim=True), image.amin(-3, keepdim=True)
    return value - (value - image) * torch.clamp(value / (value - least).clamp_min(1e-6), max=factor)


def hue(image, delta):
    """The hue turned by delta turns (OpenCV's hue delta out of 180, over 180), by torchvision's adjust_hue."""
    return v2.functional.adjust_hue(image / 255, delta) * 255


DISTORTIONS = dict(brightness=(torch.add, -32, 32), contrast=(torch.mul, 0.5, 1.5),  # op(image, value), value range
                   saturation=(saturation, 0.5, 1.5), hue=(hue, -18 / 180, 18 / 180))


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


def random_crop(image, label, short, crop, g):
    """Crop-then-resize with the windows of resize-then-crop: a RandomCrop window of the image at shorter side short
    (torchvision's rounding), mapped back to whole source pixels, resized (image bilinear antialiased, label nearest);
    one without two classes, or with one over CAT_MAX_RATIO of its labels, is redrawn. -> ((3, h, w), (h, w))."""
    H, W = label.shape
    Hs, Ws = (short, int(short * W / H)) if H <= W else (int(short * H / W), short)
    h, w = min(crop, Hs), min(crop, Ws)
    for attempt in range(CROP_TRIES + 1):
        top, left = (int(torch.randint(side - size + 1, (), generator=g)) for side, size in ((Hs, h), (Ws, w)))
        y0, x0 = min(int(top * H / Hs + 0.5), H - 1), min(int(left * W / Ws + 0.5), W - 1)  # rounded to the nearest
        y1, x1 = max(int((top + h) * H / Hs + 0.5), y0 + 1), max(int((left + w) * W / Ws + 0.5), x0 + 1)
        cut = v2.functional.resize(label[None, y0:y1, x0:x1], [h, w], v2.InterpolationMode.NEAREST)[0]
        counts = torch.bincount(cut[cut != IGNORE].long())  # labelled pixels a class
        if attempt == CROP_TRIES or counts.count_nonzero() > 1 and counts.max() < CAT_MAX_RATIO * counts.sum():
            return v2.functional.resize(image[:, y0:y1, x0:x1], [h, w], antialias=True), cut


def normalise(image):
    """A float image (..., 3, H, W) on the 0-255 scale, less the ImageNet mean, over its deviation: mean colour 0."""
    mean, std = 255 * torch.tensor([dgmn2.IMAGENET_MEAN, dgmn2.IMAGENET_STD], device=image.device)[..., None, None]
    return (image - mean) / std  # mean, std: (3, 1, 1)


class Augmented(Dataset):
    """mmseg's Cityscapes training pipeline: a shorter side uniform in range(*shorts), random_crop, a flip (p = 0.5),
    photometric_distortion, normalise, padding at the bottom and right (image 0, label IGNORE). Item (key, index), its
    draws from (seed, key, index) alone: a resumed run repeats them. -> (float (3, crop, crop), uint8 (crop, crop))."""
    def __init__(self, dataset, cfg):
        self.dataset, self.crop, self.seed = dataset, cfg.crop, cfg.seed
        self.shorts = int(cfg.base_size * cfg.scale_min), int(cfg.base_size * cfg.scale_max) + 1

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        g = torch.Generator().manual_seed(seed_of(self.seed, *key))
        short = int(torch.randint(*self.shorts, (), generator=g))
        image, label = random_crop(*self.dataset[key[1]], short, self.crop, g)
        if torch.rand((), generator=g) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = normalise(photometric_distortion(image.float(), g))
        pad = (0, self.crop - label.shape[1], 0, self.crop - label.shape[0])  # (left, right, top, bottom)
        return F.pad(image, pad), F.pad(label, pad, value=IGNORE)


class Passes(DistributedSampler):
    """Pass after pass over this rank's share of the training set, without end: after set_epoch(chunk), pass p is
    shuffled by seed_of(chunk, p), its key. Items: (key, index), the key seeding the item's augmentation."""
    def __iter__(self):
        chunk = self.epoch
        for p in itertools.count():
            self.set_epoch(seed_of(chunk, p))  # DistributedSampler shuffles by seed + epoch
            yield from ((self.epoch, index) for index in super().__iter__())


# ---- The model: segmentation.py's, as the options say, with its pretrained backbone -----------------------------
def dgmn_options(cfg):
    """--dgmn-rates and --dgmn-groups as the DGMN switches that replace a DGMN FCN's (Tables 14, 15); None for other
    models."""
    if cfg.model not in segmentation.DGMN_FCNS:
        return None
    rates = dict(rates=rates_of(cfg.dgmn_rates)) if cfg.dgmn_rates else {}
    return {**rates, **(dict(groups=cfg.dgmn_groups) if cfg.dgmn_groups else dict(dynamic_weights=False))}


def build_model(cfg, classes, world, device):
    """--model with its --pretrained backbone, SyncBatchNorm under DDP on GPUs, on device (channels-last if asked)."""
    try:
        model = segmentation.build(cfg.model, classes, output_stride=cfg.output_stride or None,
                                   multi_grid=cfg.multi_grid, dgmn_options=dgmn_options(cfg))
    except ValueError as error:  # what check() has not caught, in the model file's words
        raise InputError(f"--model {cfg.model}: {error}") from None
    if cfg.pretrained:
        load_pretrained(model.backbone, cfg.pretrained)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=cfg.layout)


def load_pretrained(backbone, path):
    """Backbone weights, classifiers left out: a torchvision ResNet, authors' DGMN2 or train_imagenet.py checkpoint."""
    source = f"--pretrained {path}"
    try:
        state = dgmn2.load_checkpoint(path)
    except ValueError as error:
        raise InputError(f"--pretrained {error}") from None
    ours = isinstance(state, dict) and "config" in state and "model" in state  # train_imagenet.py's
    if isinstance(backbone, dgmn2.DGMN2) and not ours:
        try:
            dgmn2.load_official(backbone, state)
        except ValueError as error:
            raise InputError(f"{source}: {error}") from None
        return
    weights = state["model"] if ours else state
    if not isinstance(weights, dict):
        raise InputError(f"{source}: not a state dict")
    load_weights(backbone, {k: v for k, v in weights.items() if not k.startswith(("head.", "fc."))}, source)


# ---- Evaluation: sliding windows, scales and flips; mIoU from a confusion matrix -------------------------------
def sliding_window(model, image, classes, window, stride, batch=1, layout=torch.preserve_format):
    """Logits (1, classes, H, W) of a (1, 3, H, W) image, padded to the window if smaller: windows every stride pixels
    (the last flush with the border), batch a forward (in memory layout), averaged where they overlap."""
    _, _, H, W = image.shape
    padded = F.pad(image, (0, max(window - W, 0), 0, max(window - H, 0)))
    logits, count = image.new_zeros(1, classes, *padded.shape[-2:]), image.new_zeros(1, 1, *padded.shape[-2:])
    corners = list(itertools.product(*[sorted({min(s, side - window) for s in range(0, side - window + stride, stride)})
                                       for side in padded.shape[-2:]]))  # (row, column) of each window, row by row
    for first in range(0, len(corners), batch):
        group = corners[first:first + batch]
        windows = torch.cat([padded[..., r:r + window, c:c + window] for r, c in group])  # (n, 3, window, window)
        for (r, c), scores in zip(group, model(windows.to(memory_format=layout)).float()):
            logits[0, :, r:r + window, c:c + window] += scores
            count[..., r:r + window, c:c + window] += 1
    return (logits / count)[..., :H, :W]


def predict(model, image, classes, cfg):
    """Class scores (1, classes, H, W): sliding windows at scale 1, or their sum over MULTI_SCALES and flips."""
    windows = dict(window=cfg.crop, stride=cfg.eval_stride, batch=cfg.eval_batch, layout=cfg.layout)
    if not cfg.multi_scale:
        return sliding_window(model, image, classes, **windows).softmax(dim=1)
    total = 0
    for scale in MULTI_SCALES:
        scaled = F.interpolate(image, scale_factor=scale, mode="bilinear", align_corners=False)
        for flip in (False, True):
            scores = sliding_window(model, scaled.flip(-1) if flip else scaled, classes, **windows).softmax(dim=1)
            total = total + F.interpolate(scores.flip(-1) if flip else scores, size=image.shape[-2:], mode="bilinear",
                                          align_corners=model.align_corners)  # back as the model's head resizes
    return total


def confusion(prediction, label, classes):
    """(classes, classes) counts of (true, predicted) over the pixels whose label is not ignored."""
    keep = label != IGNORE
    counts = torch.bincount(label[keep] * classes + prediction[keep], minlength=classes ** 2)
    return counts.view(classes, classes)  # (classes ** 2,) -> (true, predicted)


def iou(matrix):
    """Per-class IoU (%) from a confusion matrix: TP / (TP + FP + FN); NaN for a class absent from both."""
    tp = matrix.diag().double()
    return 100 * tp / (matrix.sum(0) + matrix.sum(1) - tp)


def colourise(label):
    """(H, W) class ids -> (3, H, W) uint8 in the Cityscapes palette."""
    return PALETTE.to(label.device)[label.long()].permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@torch.no_grad()
def predictions(model, dataset, classes, cfg, device, autocast, rank, world):
    """This rank's share of dataset, items rank, rank + world, ... (each item once over the ranks, none padded), and
    the model's classes: yields (image (1, 3, H, W) uint8 on device, the item's second part, prediction (H, W))."""
    model.eval()
    loader = DataLoader(Subset(dataset, range(rank, len(dataset), world)), num_workers=cfg.workers,
                        pin_memory=device.type == "cuda")
    for image, other in tqdm(loader, desc="eval", disable=rank != 0 or not sys.stderr.isatty(), leave=False):
        image = image.to(device, non_blocking=True)
        with autocast:
            prediction = predict(model, normalise(image.float()), classes, cfg).argmax(dim=1)[0]
        yield image, other[0], prediction
    model.train()


def evaluate(model, val, class_names, cfg, device, autocast, rank, world, pictures_to=None):
    """Exact mIoU, per-class IoU, labelled pixels over val (rank r: images r, r + world, ...); rank 0 saves pictures."""
    classes, shown = len(class_names), []
    matrix = torch.zeros(classes, classes, dtype=torch.long, device=device)
    for image, label, prediction in predictions(model, val, classes, cfg, device, autocast, rank, world):
        label = label.to(device, non_blocking=True).long()
        matrix += confusion(prediction, label, classes)
        if pictures_to and rank == 0 and len(shown) < 3 * cfg.pictures:  # 3 tiles a picture: image, label, prediction
            shown += [image[0] / 255, colourise(label) / 255, colourise(prediction) / 255]
    if world > 1:
        dist.all_reduce(matrix)
    if shown:
        torchvision.utils.save_image(torch.stack(shown), pictures_to, nrow=3)
    per_class = iou(matrix)
    return dict(miou=per_class.nanmean().item(), pixels=int(matrix.sum()),  # absent classes: None (JSON has no NaN)
                iou={n: None if math.isnan(v) else round(v, 2) for n, v in zip(class_names, per_class.tolist())})


def write_predictions(model, images, cfg, device, autocast, rank, world):
    """--predict DIR: the predicted classes of each of images (a CityscapesImages) as labelIds, Cityscapes' submission
    format, in DIR/CITY/NAME_leftImg8bit.png; each image by one rank. Returns dict(written=images written)."""
    label_ids = torch.tensor([c.id for c in TRAIN_CLASSES], dtype=torch.uint8, device=device)  # by train id
    written = torch.zeros((), dtype=torch.long, device=device)
    for _, index, prediction in predictions(model, images, len(TRAIN_CLASSES), cfg, device, autocast, rank, world):
        path = Path(cfg.predict) / images.names[index]
        path.parent.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_png(label_ids[prediction][None].cpu(), str(path))  # (1, H, W): one grey channel
        written += 1
    if world > 1:
        dist.all_reduce(written)
    return dict(written=int(written))


# ---- Training --------------------------------------------------------------------------------------------------
def run(cfg, rank, world, device):
    """Train (or only evaluate) as cfg says; returns the last evaluation's metrics."""
    if cfg.table:
        return segmentation.print_tables() if rank == 0 else None
    log = logger(rank)
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} (global) is not divisible by the {world} processes")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    checkpoint, state = resume_state(cfg, rank, world)
    train, val, class_names = datasets(cfg)
    model = build_model(cfg, len(class_names), world, device)
    announce(cfg, log, world, device, model, checkpoint)
    optimizer, scheduler = optimiser_and_schedule(cfg, model)
    _, autocast, scaler = precision(cfg, device)
    parts = dict(optimizer=optimizer, scheduler=scheduler, scaler=scaler)  # what a checkpoint holds beside the model
    if state:
        load_weights(model, state["model"], checkpoint)
        for name, part in parts.items():
            if state[name] and not cfg.eval_only:  # the scaler's is empty unless the run used fp16
                part.load_state_dict(state[name])
    elif cfg.finetune:  # the weights alone: this run's schedule and optimiser start afresh
        load_weights(model, read_checkpoint(cfg.finetune, cfg, WEIGHTS_DEPEND_ON, [])["model"], cfg.finetune)
    output, start = Path(cfg.output), state["iteration"] if state else 0
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
    evaluation = functools.partial(evaluate, model, val, class_names, cfg, device, autocast, rank, world)
    if cfg.eval_only and cfg.predict:
        result = write_predictions(model, val, cfg, device, autocast, rank, world)
        log(f"wrote the labelIds of {result['written']} {cfg.eval_split} images to {cfg.predict}")
        return result
    if cfg.eval_only:
        metrics = evaluation(output / "eval.png")
        log(f"eval: mIoU {metrics['miou']:.2f}% ({'multi-scale + flip' if cfg.multi_scale else 'single scale'})")
        return metrics
    loader = training_loader(train, cfg, rank, world, device)
    trained, metrics = distribute(model, cfg, world), None
    for first in range(start, cfg.iterations, cfg.eval_every):
        last, started = min(first + cfg.eval_every, cfg.iterations), time.perf_counter()
        loss = train_chunk(trained, loader, optimizer, scheduler, scaler, autocast, cfg, rank, world, device, first,
                           last)
        seconds = time.perf_counter() - started
        if world > 1:  # without SyncBatchNorm (CPU) the ranks' statistics differ: evaluate rank 0's
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        metrics = dict(iteration=last, loss=loss, seconds=seconds, **evaluation(output / f"predictions-{last:07d}.png"))
        if rank == 0:
            state = {name: part.state_dict() for name, part in dict(model=model, **parts).items()}
            path = save_checkpoint(dict(state, iteration=last, config=dataclasses.asdict(cfg)),
                                   output / f"checkpoint-{last:07d}.pth")
            with open(output / "log.jsonl", "a") as file:
                file.write(json.dumps(metrics) + "\n")
            log(f"iteration {last}/{cfg.iterations}: loss {loss:.3f}, mIoU {metrics['miou']:.2f}%; saved {path}")
        if world > 1:
            dist.barrier()
    return metrics


def resume_state(cfg, rank, world):
    """(the checkpoint to start from, its contents), or (None, None): rank 0 chooses, --output must be seen by all."""
    choice = [find_checkpoint(cfg) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(choice, src=0)
    if choice[0] is None and cfg.eval_only:
        raise InputError(f"--eval-only --resume auto: no checkpoint in {cfg.output}")
    return choice[0], choice[0] and read_checkpoint(choice[0], cfg, WEIGHTS_DEPEND_ON, TRAINING_DEPENDS_ON)


def announce(cfg, log, world, device, model, checkpoint):
    """What the run trains, on what and from where; a backbone from scratch on real data gets a warning (stderr)."""
    if not cfg.data:
        log(f"No --data: training on the built-in synthetic scenes ({len(Scenes.classes)} classes, {cfg.base_size} x "
            f"{cfg.base_size}, {cfg.synthetic_train} images).")
    elif not cfg.pretrained and not cfg.finetune and checkpoint is None:
        log("WARNING: no --pretrained: the backbone starts from scratch (random weights), where the paper starts "
            "it from ImageNet weights; expect a far lower mIoU than its tables.", file=sys.stderr, flush=True)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {world} process(es) on "
        f"{device.type}" + (f"; resuming {checkpoint}" if checkpoint else
                            f"; starting from the weights of {cfg.finetune}" if cfg.finetune else ""))


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


def train_chunk(model, loader, optimizer, scheduler, scaler, autocast, cfg, rank, world, device, first, last):
    """Iterations first + 1 .. last; returns their mean loss. Draws follow from (seed, chunk, rank) and item keys."""
    chunk = first // cfg.eval_every
    torch.manual_seed(seed_of(cfg.seed, chunk, rank))  # dropout's: a run resumed at first repeats it
    loader.sampler.set_epoch(chunk)
    progress = Progress(cfg, rank, world, device, first, last, cfg.batch_size, f"train to {last}", cfg.output)
    criterion = ohem_cross_entropy if cfg.ohem else functools.partial(F.cross_entropy, ignore_index=IGNORE)
    for images, labels in progress.batches(itertools.islice(loader, last - first)):
        images = images.to(device, non_blocking=True, memory_format=cfg.layout)
        with autocast:
            loss = criterion(model(images), labels.to(device, non_blocking=True).long())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        progress.update(dict(loss=loss), scheduler.get_last_lr()[0])
    return progress.close()["loss"]


def ohem_cross_entropy(logits, labels, threshold=OHEM_THRESHOLD, min_kept=OHEM_MIN_KEPT):
    """Pixel OHEM (the CCNet and DANet code bases): the mean cross-entropy over the labelled pixels whose probability of
    their class is under threshold or, when fewer than min_kept are, over the min_kept hardest (all the labelled ones
    if fewer; ties with the last one kept too). Over this process's batch, without a host sync.
    logits (B, classes, H, W), labels (B, H, W) -> a scalar."""
    losses = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="none")  # (B, H, W), 0 where ignored
    labelled = labels != IGNORE
    probability = torch.exp(-losses).masked_fill(~labelled, math.inf)  # an ignored pixel is never among the hardest
    kth = probability.flatten().kthvalue(min(min_kept, probability.numel())).values  # inf: fewer labelled than that
    kept = labelled & torch.where(kth < threshold, probability < threshold, probability <= kth)
    return (losses * kept).sum() / kept.sum().clamp_min(1)


if __name__ == "__main__":
    command_line()
