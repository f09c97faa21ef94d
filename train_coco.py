"""COCO detection and instance segmentation: the recipes (Sections 6.2, 8.1.2) that train detection.py's models, with
torchvision's RetinaNet and Mask R-CNN: DGMN2 + FPN backbones (Tables 7, 8) and ResNet / ResNeXt-FPN with DGMN modules
or the modules DGMN is compared with (Sections 5.1-5.3, Tables 3, 5, 15, 16); pycocotools evaluation, DDP through
torchrun. Paper targets on COCO val2017 (box AP / mask AP), 1x schedule: RetinaNet DGMN2-Tiny/Small/Medium/Large 39.7,
42.5, 43.7, 44.7 (Table 7); Mask R-CNN DGMN2-T/S/M/L 40.1 / 37.2, 43.4 / 39.7, 44.4 / 40.2, 46.2 / 41.6 (Table 8); Mask
R-CNN R-50-FPN 37.8 / 34.4, + DGMN (C5) 40.2 / 36.0; R-101, X-101 (Tables 3, 16); Deformable DETR (50 epochs)
DGMN2-T/S/M 44.4, 47.3, 48.4, "+" DGMN2-S 48.5 (Table 9); Sparse R-CNN (3x, 270k iterations) DGMN2-S 48.2 (Table 10).

    torchrun --nproc_per_node 8 train_coco.py --model maskrcnn-dgmn2-tiny --data coco --pretrained dgmn2_tiny.pth
    torchrun --nproc_per_node 8 train_coco.py --model deformable-detr-dgmn2-tiny --data coco --pretrained dgmn2_tiny.pth
    torchrun --nproc_per_node 8 train_coco.py --model sparse-rcnn-dgmn2-small --data coco --pretrained dgmn2_small.pth
    torchrun train_coco.py                  # no --data: the built-in synthetic shapes, a few minutes on a CPU
"""

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import functools
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import ChainedScheduler, LinearLR, MultiStepLR
from torch.utils._pytree import tree_map_only
from torch.utils.data import DataLoader, Subset
import torchvision
from torchvision.transforms import v2
from tqdm import tqdm

import detection
import dgmn2


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
# The options (the models and their paper numbers: detection.py), the recipes
@dataclasses.dataclass
class Config:
    model: str = option("retinanet-dgmn2-tiny", "the detector and its backbone, so its recipe (--table lists them)")
    data: str = option("", "the COCO root (train2017/, val2017/, annotations/); empty: the synthetic shapes")
    output: str = option("runs/coco", "the run's folder: checkpoints, log.jsonl, detections-*.json, pictures")
    pretrained: str = option("", "backbone weights: the release's or train_imagenet.py's DGMN2, torchvision's ResNet")
    dgmn_rates: str = option("", "DGMN's sampling rates, e.g. 1,4,8 (Table 15); empty: COCO's 1,4,8,12 (Section 5.1)")
    dgmn_groups: int = option(detection.DGMN_GROUPS, "DGMN's filter groups G (Table 15); 0: no dynamic weights")
    iterations: int = option(0, "training steps; 0: the recipe's, 12 epochs (DGMN2), 90,000 (ResNets), 50 epochs "
                             "(Deformable DETR), 270,000 (Sparse R-CNN)")
    lr_steps: str = option("", "the steps after which the lr is multiplied by 0.1 (60000,80000); empty: the recipe's")
    batch_size: int = option(16, "the global batch: images a step over all processes together, as the paper counts")
    optimizer: str = option("auto", "auto: the paper's, AdamW (Deformable DETR's backbone, sampling offsets and "
                            "reference points at 0.1 x lr) but for ResNets, SGD (biases: 2 x lr, no decay)")
    lr: float = option(0.0, "peak lr; 0: the paper's, AdamW 1e-4 (Deformable DETR 2e-4, Sparse R-CNN 2.5e-5), SGD 0.02")
    weight_decay: float = option(1e-4, "the weight decay (of every parameter but SGD's biases)")
    warmup: int = option(-1, "steps of linear learning-rate warm-up; -1: the recipe's, 500 (Sparse R-CNN 1000)")
    warmup_factor: float = option(0.0, "the lr's fraction at step 0 of the warm-up; 0: 0.001 (DGMN2), 0.3 (ResNets), "
                                  "1: none (Deformable DETR), 0.01 (Sparse R-CNN)")
    min_size: int = option(800, "the shorter image side the detector resizes to (synthetic images are this size)")
    max_size: int = option(1333, "the longer image side at most after that resize")
    rois: int = option(512, "Mask R-CNN: regions sampled per image for the box and mask heads' losses")
    queries: int = option(300, "Deformable DETR's queries, Sparse R-CNN's proposals (synthetic images: 2-4 objects)")
    eval_every: int = option(0, "steps between evaluations on the validation set; 0: once an epoch")
    save_every: int = option(1000, "steps between checkpoints")
    log_every: int = option(20, "steps between log lines (the loss terms are averaged over them and checked)")
    pictures: int = option(4, "validation images saved with their detections at each evaluation")
    amp: str = option("auto", "mixed precision; auto: bf16 on GPUs that have it, else fp16 (loss scaled); off on CPU")
    channels_last: bool = option(False, "channels-last convolutions; off until a GPU measurement shows them faster")
    compile: bool = option(False, "torch.compile the training model; off until a GPU measurement shows it faster")
    workers: int = option(4, "data-loading processes per training process")
    seed: int = option(0, "the seed of the initial weights, the data order and the augmentations")
    resume: str = option("", "the checkpoint to continue from, or auto: the newest in --output")
    eval_only: bool = option(False, "evaluate the --resume checkpoint, then exit")
    table: bool = option(False, "print every model's parameters and FLOPs beside the paper's, then exit")
    synthetic_train: int = option(1000, "training images of the synthetic set")
    synthetic_val: int = option(100, "validation images of the synthetic set")


SYNTHETIC = dict(iterations=500, batch_size=4, optimizer="adamw", warmup=50, min_size=128, max_size=128, rois=64,
                 queries=100, eval_every=100, save_every=100, workers=1, output="runs/synthetic-coco")
START_WEIGHTS = "--pretrained"  # the option that takes weights to start from
CHOICES = dict(model=list(detection.MODELS), optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
POSITIVE = ["batch_size", "min_size", "max_size", "rois", "queries", "save_every", "log_every", "synthetic_train",
            "synthetic_val"]
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[:6]
BIAS_LR_FACTOR = 2  # Detectron's and maskrcnn-benchmark's SGD: biases at twice the lr, without weight decay


def check(cfg):
    """Options out of range or that do not go together: InputError."""
    for name in [*POSITIVE, "iterations", "eval_every", "lr", "warmup_factor", "weight_decay", "workers",
                 "pictures", "dgmn_groups"]:
        if getattr(cfg, name) < (name in POSITIVE):
            raise InputError(f"--{name.replace('_', '-')} must be {'positive' if name in POSITIVE else 'at least 0'}, "
                             f"got {getattr(cfg, name)}")
    steps = [int(s) for s in re.findall(r"\d+", cfg.lr_steps)]
    refusals = [
        (cfg.warmup < -1, f"--warmup {cfg.warmup}: give steps, or -1 for the recipe's"),
        (cfg.warmup_factor > 1, f"--warmup-factor {cfg.warmup_factor}: a fraction of the learning rate, at most 1"),
        (not re.fullmatch(r"(\d+(,\d+)*)?", cfg.lr_steps) or steps != sorted(set(steps)), f"--lr-steps "
         f"{cfg.lr_steps!r}: give increasing iterations separated by commas, e.g. 60000,80000"),
        (cfg.min_size > cfg.max_size, f"--min-size {cfg.min_size} exceeds --max-size {cfg.max_size}"),
        (cfg.eval_only and not cfg.resume, "--eval-only needs the model to evaluate: --resume CKPT"),
        (not re.fullmatch(r"([1-9]\d*(,[1-9]\d*)*)?", cfg.dgmn_rates), f"--dgmn-rates {cfg.dgmn_rates!r}: give "
         "positive rates separated by commas, e.g. 1,4,8"),
        ((cfg.dgmn_rates or cfg.dgmn_groups != detection.DGMN_GROUPS) and detection.MODELS[cfg.model].module != "dgmn",
         f"--dgmn-rates and --dgmn-groups set DGMN modules: {cfg.model} has none")]
    for refused, message in refusals:
        if refused:
            raise InputError(message)


def recipe(cfg, iterations_per_epoch):
    """The optimizer and schedule: what cfg sets, else the paper's recipe for the model. A dict."""
    spec = detection.MODELS[cfg.model]
    detr, sparse = spec.detector in detection.DETR_FAMILY, spec.detector == "sparse-rcnn"
    resnet = spec.backbone in detection.RESNETS and not (detr or sparse)
    optimizer = cfg.optimizer if cfg.optimizer != "auto" else "sgd" if resnet else "adamw"
    if detr:  # Section 6.2, upstream Deformable DETR: 50 epochs, lr / 10 after 40, no warm-up, gradient norm 0.1
        iterations, fractions, warmup_factor = 50 * iterations_per_epoch, (40 / 50,), 1.0
    elif sparse:  # upstream Sparse R-CNN's 3x: 270k iterations at batch 16 (about 36 epochs), lr / 10 at 210k, 250k
        iterations, fractions, warmup_factor = 270_000, (7 / 9, 25 / 27), 0.01
    elif resnet:  # Section 8.1.2: Detectron's 1x, 90k iterations at batch 16, lr / 10 at 60k and 80k
        iterations, fractions, warmup_factor = 90_000, (2 / 3, 8 / 9), 0.3
    else:  # Section 6.2, the release's configs: 12 epochs, lr / 10 after epochs 8, 11 (step=[8, 11]; "at 9 and 11")
        iterations, fractions, warmup_factor = 12 * iterations_per_epoch, (8 / 12, 11 / 12), 0.001
    iterations = cfg.iterations or iterations
    steps = [int(s) for s in cfg.lr_steps.split(",")] if cfg.lr_steps else [round(f * iterations) for f in fractions]
    lr = cfg.lr or dict(adamw=2e-4 if detr else 2.5e-5 if sparse else 1e-4, sgd=0.02)[optimizer]
    warmup = cfg.warmup if cfg.warmup >= 0 else 1000 if sparse else 500
    return dict(optimizer=optimizer, lr=lr, iterations=iterations, steps=steps, warmup=warmup,
                warmup_factor=cfg.warmup_factor or warmup_factor, eval_every=cfg.eval_every or iterations_per_epoch,
                clip=0.1 if detr else 1.0 if sparse else 0.0)  # upstream's gradient-norm clipping (0: none)


def optimizer_and_schedule(model, plan, weight_decay):
    """The plan's optimizer (SGD as Detectron's 1x, AdamW in one group or the model's param_groups) and schedule: a
    linear warm-up from plan["warmup_factor"] (Section 8.1.2's "0.02 x 0.3"), times 0.1 after each of plan["steps"]."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # ResNets' frozen stem, res2 stay out
    if plan["optimizer"] == "sgd":
        groups = [dict(params=[p for n, p in trainable if not n.endswith(".bias")]),
                  dict(params=[p for n, p in trainable if n.endswith(".bias")], lr=BIAS_LR_FACTOR * plan["lr"],
                       weight_decay=0.0)]
        optimizer = torch.optim.SGD(groups, lr=plan["lr"], momentum=0.9, weight_decay=weight_decay)
    else:
        groups = model.param_groups(plan["lr"], weight_decay) if hasattr(model, "param_groups") else \
            [p for _, p in trainable]
        optimizer = torch.optim.AdamW(groups, lr=plan["lr"], weight_decay=weight_decay)
    warmup = LinearLR(optimizer, plan["warmup_factor"] if plan["warmup"] else 1.0, total_iters=max(plan["warmup"], 1))
    return optimizer, ChainedScheduler([warmup, MultiStepLR(optimizer, plan["steps"], gamma=0.1)])  # factors multiply


# ---- The built-in synthetic set, written in COCO's format ------------------------------------------------------
SHAPES = ("disc", "square", "triangle", "bar")  # category ids 1-4
SHAPE_COLOURS = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.9, 0.8, 0.1], [0.8, 0.3, 0.9]])  # each class's


def synthetic_scene(S, generator):
    """2-4 shapes (20-40% of the side, any position and rotation, coloured after their class, barely overlapping) on a
    cluttered background -> uint8 (3, S, S) image, [(category id, bool (S, S) mask)]."""
    rand = functools.partial(torch.rand, generator=generator)
    y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")  # (S, S) each
    image = rand(3, 1, 1) * 0.6 + 0.2 * rand(3, 1, 1) * x + 0.2 * rand(3, 1, 1) * y  # (3, S, S) gradient
    for _ in range(6):  # clutter: faint stripes that belong to no class
        angle, phase = 2 * math.pi * rand(1), 2 * math.pi * rand(1)
        image = image + 0.05 * torch.sin(8 * (angle.cos() * x + angle.sin() * y) + phase)
    taken, instances = torch.zeros(S, S, dtype=torch.bool), []
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
        if inside.sum() >= 16:
            image = torch.where(inside, 0.7 * SHAPE_COLOURS[kind].view(3, 1, 1) + 0.3 * rand(3, 1, 1), image)
            taken |= inside
            instances.append((kind + 1, inside))
    image = (image + 0.04 * torch.randn(3, S, S, generator=generator)).clamp(0, 1)
    return (image * 255).round().to(torch.uint8), instances


def mask_to_rle(mask):
    """bool (H, W) -> COCO RLE with str counts (pycocotools encodes Fortran-ordered uint8 arrays)."""
    rle = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return dict(size=rle["size"], counts=rle["counts"].decode("ascii"))


def write_synthetic(root, size, lengths, seed=1):
    """The synthetic set as a COCO directory, lengths = {split: images}; each annotation file last, atomically."""
    for split_index, (split, length) in enumerate(lengths.items()):
        annotation_file = Path(root) / "annotations" / f"instances_{split}2017.json"
        if annotation_file.is_file() and len(json.loads(annotation_file.read_text())["images"]) == length:
            continue
        (Path(root) / f"{split}2017").mkdir(parents=True, exist_ok=True)
        annotation_file.parent.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(length):
            image, instances = synthetic_scene(size, torch.Generator().manual_seed(seed_of(seed, split_index, i)))
            v2.functional.to_pil_image(image).save(Path(root) / f"{split}2017" / f"{i:06d}.png")
            images.append(dict(id=i + 1, file_name=f"{i:06d}.png", height=size, width=size))
            for category, rle in ((category, mask_to_rle(mask)) for category, mask in instances):
                annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=category, iscrowd=0,
                                        bbox=coco_mask.toBbox(rle).tolist(), area=int(coco_mask.area(rle)),
                                        segmentation=rle))  # bbox: xywh, at the pixels' edges
        categories = [dict(id=i + 1, name=name, supercategory="shape") for i, name in enumerate(SHAPES)]
        annotation_file.with_suffix(".tmp").write_text(json.dumps(dict(images=images, annotations=annotations,
                                                                       categories=categories)))
        os.replace(annotation_file.with_suffix(".tmp"), annotation_file)


# ---- Data: torchvision's CocoDetection, targets as the detectors take them, batches grouped by aspect ratio ----
class Coco(torchvision.datasets.CocoDetection):
    """CocoDetection with an unreadable image reported by its path."""
    def _load_image(self, id):
        try:
            return super()._load_image(id)
        except OSError as error:
            raise InputError(f"{Path(self.root, self.coco.imgs[id]['file_name'])}: unreadable ({error})") from None


def unannotated(image, target):
    """An image without annotations (the wrapper gives its id alone) as the detectors take it: no boxes, no labels."""
    boxes = torchvision.tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=image.shape[-2:])
    return image, target if "boxes" in target else dict(target, boxes=boxes, labels=torch.zeros(0, dtype=torch.int64))


def load_coco(root, split, target_keys, train, needed, keep_unannotated=False):
    """A split as the detectors take it, items (float (3, H, W) image in [0, 1], dict of tv_tensors); to train, crowds,
    1 px boxes, unannotated images unless kept dropped, boxes clamped, degenerate ones dropped (then augmented).
    needed: the keys every annotation must have."""
    images, annotations = Path(root) / f"{split}2017", Path(root) / "annotations" / f"instances_{split}2017.json"
    if not annotations.is_file() or not images.is_dir():
        raise InputError(f"{annotations}: no such annotation file" if not annotations.is_file() else
                         f"{images}: no such image directory")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports its loading on stdout
            tidy = [unannotated, v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes()] if train else []
            dataset = Coco(str(images), str(annotations), transforms=v2.Compose(
                [v2.ToImage(), *tidy, v2.ToDtype(torch.float32, scale=True)]))
        for image_id in dataset.ids if train else []:
            dataset.coco.imgToAnns[image_id] = [a for a in dataset.coco.imgToAnns[image_id] if not a.get("iscrowd")
                                                and a["bbox"][2] > 1 and a["bbox"][3] > 1]
        dataset.ids = [i for i in dataset.ids if dataset.coco.imgToAnns[i] or not train or keep_unannotated]
    except Exception as error:  # any parse or schema failure is one bad file
        raise InputError(f"{annotations}: not a COCO annotation file ({type(error).__name__}: {error})") from None
    if not dataset.ids:
        raise InputError(f"{annotations}: no {'usable annotated ' if train else ''}images")
    sized = dataset.ids if train or "segmentation" in needed else []
    check_annotations(dataset.coco, sized, annotations, needed)
    return torchvision.datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=target_keys)


def check_annotations(coco, sized, path, needed):
    """What the models, the batching and the evaluation take for granted, refused in one line: every image with a
    file name and every annotation with the keys `needed`, categories listed, with ids from 1 (the class count is the
    largest id + 1, and torchvision's detectors read label 0 as background), every annotation of a listed category,
    and the images of `sized` with a width and height (the batches group by aspect; COCOeval draws the ground truth's
    masks at that size)."""
    for kind, records, keys in (("image", coco.imgs, ["file_name"]), ("annotation", coco.anns, needed)):
        for record_id, record in records.items():
            missing = [key for key in keys if key not in record]
            if missing:
                raise InputError(f"{path}: {kind} {record_id} has no {missing[0]!r}")
    ids = coco.cats.keys()
    if not ids or min(ids) < 1:
        raise InputError(f"{path}: " + (f"category id {min(ids)}: ids start at 1 (0 is the detectors' background)"
                                        if ids else "lists no categories"))
    unlisted = {a["category_id"] for a in coco.anns.values()} - ids
    if unlisted:
        raise InputError(f"{path}: annotations of category {min(unlisted)}, which its categories do not list")
    sizeless = [i for i in sized if not {"width", "height"} <= coco.imgs[i].keys()]
    if sizeless:
        raise InputError(f"{path}: image {sizeless[0]} has no width or height")


def datasets(cfg, rank=0, world=1):
    """(train, val, category names by id, val's COCO ground truth) of --data or the synthetic set; unannotated images
    train the set-prediction detectors (upstream's), not the others (Detectron's)."""
    root = cfg.data or Path(cfg.output) / f"synthetic-{cfg.min_size}px"
    if cfg.data and not Path(cfg.data).is_dir():
        raise InputError(f"{cfg.data}: no such data directory")
    if not cfg.data and rank == 0:
        print(f"No --data: the built-in synthetic shapes ({len(SHAPES)} classes) in COCO's format under {root}.")
        write_synthetic(root, cfg.min_size, dict(val=cfg.synthetic_val, **({} if cfg.eval_only else dict(
            train=cfg.synthetic_train))))
    if not cfg.data and world > 1:  # the others wait for rank 0's files
        dist.barrier()
    detector = detection.MODELS[cfg.model].detector
    masks = detector == "maskrcnn"
    keys = {"image_id", "boxes", "labels"} | ({"masks"} if masks else set())
    needed = ["bbox", "category_id"] + (["segmentation"] if masks else [])  # what the targets and the evaluation read
    train = None if cfg.eval_only else load_coco(root, "train", keys, True, needed,
                                                 keep_unannotated=detector in detection.SET_PREDICTION)
    val = load_coco(root, "val", {"image_id"}, False, needed + ["iscrowd", "area"])  # COCOeval reads both
    return train, val, {c["id"]: c["name"] for c in val.coco.cats.values()}, val.coco


def epoch_batches(groups, local_batch, seed, epoch, rank, world):
    """A rank's batches of an epoch (lists of indices) as GroupedBatchSampler: every world-th image of a seeded order,
    a batch once an aspect group fills one, then leftovers completed, len(share) // local_batch on every rank."""
    order = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed_of(seed, epoch))).tolist()
    share = order[rank:len(order) - len(order) % world:world]
    batches, filling = [], ([], [])
    for index in share:
        filling[groups[index]].append(index)
        if len(filling[groups[index]]) == local_batch:
            batches.append(filling[groups[index]].copy())
            filling[groups[index]].clear()
    for leftover in sorted(filling, key=len, reverse=True)[:len(share) // local_batch - len(batches)]:
        group = itertools.cycle([i for i in share if groups[i] == groups[leftover[0]]])
        batches.append(leftover + list(itertools.islice(group, local_batch - len(leftover))))
    return batches


def batches(groups, local_batch, seed, rank, world, first):
    """Endless training batches from step `first` on (a batch_sampler), as an uninterrupted run would see them."""
    epoch, skip = divmod(first, len(groups) // world // local_batch)
    while True:
        yield from epoch_batches(groups, local_batch, seed, epoch, rank, world)[skip:]
        epoch, skip = epoch + 1, 0


# ---- The model: detection.py's, built with the options; --pretrained's file -------------------------------------
def build_model(cfg, num_classes, pretrained=False):
    """detection.build() of cfg.model with cfg's options; a bad one (the model's ValueError) in one line."""
    rates = dict(dgmn_rates=tuple(int(r) for r in cfg.dgmn_rates.split(","))) if cfg.dgmn_rates else {}
    try:
        return detection.build(cfg.model, num_classes, min_size=cfg.min_size, max_size=cfg.max_size, rois=cfg.rois,
                               queries=cfg.queries, pretrained=pretrained, dgmn_groups=cfg.dgmn_groups, **rates)
    except ValueError as error:
        raise InputError(f"--model {cfg.model}: {error}") from None


# ---- Evaluation: each rank detects and matches its own images; rank 0 merges the matches and scores them once --
def to_coco_results(output, image_id):
    """One image's detections as COCO results: (bbox results with xywh boxes, segm results with RLE masks at 0.5)."""
    boxes = torchvision.ops.box_convert(output["boxes"], "xyxy", "xywh").tolist()
    labels, scores = output["labels"].tolist(), output["scores"].tolist()
    bbox = [dict(image_id=image_id, category_id=c, bbox=[round(v, 2) for v in b], score=round(s, 4))
            for b, c, s in zip(boxes, labels, scores)]
    segm = [dict(image_id=image_id, category_id=c, segmentation=mask_to_rle(m), score=round(s, 4))
            for m, c, s in zip((output["masks"][:, 0] > 0.5).cpu(), labels, scores)] if "masks" in output else []
    return bbox, segm


def match(ground_truth, results, image_ids, iou_type):
    """COCOeval.evaluate() on some images -> (their ids, sorted; their evaluations in (category, area, image) order)."""
    if not image_ids:  # a rank without images (fewer than the ranks): pycocotools cannot evaluate none
        return [], []
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools' progress reports
        # loadRes refuses an empty list (then an empty COCO) and adds keys to the dicts it gets (copies)
        detections = ground_truth.loadRes([dict(r) for r in results]) if results else COCO()
        evaluator = COCOeval(ground_truth, detections, iou_type)
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
    return evaluator.params.imgIds, evaluator.evalImgs


def score(ground_truth, parts, iou_type):
    """METRICS (%) of match()'s parts merged in image-id order, as one evaluate() on all; None where no object fits."""
    evaluator = COCOeval(ground_truth, iouType=iou_type)
    categories, areas = len(evaluator.params.catIds), len(evaluator.params.areaRng)
    image_ids = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in parts])
    # each part's evaluations (categories, areas, its images), concatenated along the images, then in id order
    merged = np.concatenate([np.array(e, dtype=object).reshape(categories, areas, len(ids)) for ids, e in parts], 2)
    order = np.argsort(image_ids)
    evaluator.params.imgIds, evaluator.evalImgs = image_ids[order].tolist(), merged[:, :, order].ravel().tolist()
    evaluator._paramsEval = evaluator.params  # the parameters evalImgs were made with
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    print(f"COCO {iou_type}:")
    evaluator.summarize()
    return {m: None if v < 0 else round(100 * v, 2) for m, v in zip(METRICS, evaluator.stats[:6].tolist())}


def summary(metrics):
    return ", ".join(f"{t} AP {'-' if m['AP'] is None else format(m['AP'], '.1f')}" for t, m in metrics.items())


def evaluation_loader(val, cfg, rank, world, device):
    """Rank r's validation images: r, r + world, ..., one a forward, as the releases test: a batch pads its images to
    the largest, and DGMN2's features change with the padding (its relative positions span the padded map), so an
    image's detections would depend on its companions and the number of processes. The workers persist from one
    evaluation to the next."""
    return DataLoader(Subset(val, range(rank, len(val), world)), 1, collate_fn=list, num_workers=cfg.workers,
                      pin_memory=device.type == "cuda", persistent_workers=cfg.workers > 0)


@torch.no_grad()
def evaluate(model, val, names, ground_truth, cfg, device, autocast, rank, world, output=None, tag=""):
    """COCO box (and mask) metrics over val (this rank's evaluation_loader()); with output, rank 0 writes
    detections-*.json, pictures-{tag}/. Returns dict(bbox={metric: AP}[, segm=...]) on rank 0, None elsewhere."""
    pictures = output / f"pictures-{tag}" if output is not None and rank == 0 and cfg.pictures else None
    model.eval()
    results, image_ids = dict(bbox=[], segm=[]), []
    for batch in tqdm(val, desc="eval", leave=False, disable=rank != 0 or not sys.stderr.isatty()):
        images, targets = zip(*batch)  # batches are lists of (image, target): the images differ in size
        with autocast:
            detections = model([image.to(device, non_blocking=True) for image in images])
        for image, target, detected in zip(images, targets, detections):
            for iou_type, found in zip(results, to_coco_results(detected, target["image_id"])):
                results[iou_type] += found
            if pictures and len(image_ids) < cfg.pictures:
                pictures.mkdir(parents=True, exist_ok=True)
                picture = detection.draw((image * 255).round().to(torch.uint8), detected, names)
                v2.functional.to_pil_image(picture).save(pictures / f"{target['image_id']}.png")
            image_ids.append(target["image_id"])
    model.train()
    types = ["bbox", "segm"] if detection.MODELS[cfg.model].detector == "maskrcnn" else ["bbox"]
    mine = dict(results=results, matches={t: match(ground_truth, results[t], image_ids, t) for t in types})
    gathered = [mine] if world == 1 else [None] * world if rank == 0 else None
    if world > 1:
        dist.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    for iou_type in types if output is not None else []:
        path = output / f"detections-{iou_type}.json"
        path.with_suffix(".tmp").write_text(json.dumps([r for part in gathered for r in part["results"][iou_type]]))
        os.replace(path.with_suffix(".tmp"), path)
    return {t: score(ground_truth, [part["matches"][t] for part in gathered], t) for t in types}


# ---- Training: run() in named steps ----------------------------------------------------------------------------
def make_model(cfg, state, train, names, device, log):
    """(the detector on the device, with --pretrained's weights unless a checkpoint has them, its number of classes)."""
    data_classes = 1 + max(names.keys() | (train.coco.cats.keys() if train else set()))  # ids from 1 (0: background)
    num_classes = state["num_classes"] if state else data_classes
    if data_classes > num_classes:  # a label past the class head fails deep in the detector's loss, or is never found
        raise InputError(f"the checkpoint's detector knows category ids up to {num_classes - 1}, the data's go up to "
                         f"{data_classes - 1}")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    pretrained = bool(state["config"]["pretrained"] if state else cfg.pretrained)  # ResNets: frozen BN or not
    model = build_model(cfg, num_classes, pretrained)
    if cfg.pretrained and not state:
        try:
            detection.load_pretrained(model, dgmn2.load_checkpoint(cfg.pretrained))
        except ValueError as error:  # load_checkpoint's name the file, load_pretrained's do not
            message = str(error).removeprefix(cfg.pretrained + ": ")
            raise InputError(f"--pretrained {cfg.pretrained}: {message}") from None
    elif cfg.data and not state:
        frozen = " (its stem, layer 1 and BN frozen at their initial values, as upstream's)" \
            if isinstance(model.backbone, detection.ResNetStages) else ""
        log(f"No --pretrained: the backbone starts from random weights{frozen}; the paper starts from ImageNet's.")
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters at {num_classes} classes "
        f"(paper: {detection.MODELS[cfg.model].params_m or '-'}M at {detection.paper_classes(cfg.model)})")
    return (model.to(device, memory_format=torch.channels_last) if cfg.channels_last else model.to(device)), num_classes


# What a run holds: the model (trained: it under DDP / compile), its training and evaluation, the plan (the recipe)
Parts = namedtuple("Parts", "model trained optimizer scheduler scaler autocast evaluation batches plan num_classes")
SAVED = ("model", "optimizer", "scheduler", "scaler")  # the parts whose state a checkpoint holds


def training(cfg, rank, world, device, parts, start, log):
    """Steps start + 1 to the plan's last in stretches ending at each save_every, each eval_every and the last: there
    the record, a checkpoint and (at eval_every and the last) an evaluation. Returns the last metrics. Random choices
    (flips, anchor and RoI samples) follow from (seed, step, rank): a resumed run repeats an uninterrupted one."""
    total, every, output, metrics = parts.plan["iterations"], parts.plan["eval_every"], Path(cfg.output), None
    augment = detection.augmentation(cfg.model, cfg.min_size)
    ends = {*range(cfg.save_every, total, cfg.save_every), *range(every, total, every), total}
    for first, last in itertools.pairwise([start, *sorted(end for end in ends if end > start)]):
        torch.manual_seed(seed_of(cfg.seed, first, rank))
        progress = Progress(cfg, rank, world, device, first, last, cfg.batch_size, f"train to {last}", cfg.output)
        for batch in itertools.islice(progress.batches(parts.batches), last - first):
            images, targets = zip(*batch)  # lists of (image, target): the images differ in size
            images, targets = tree_map_only(torch.Tensor, lambda t: t.to(device, non_blocking=True), (images, targets))
            images, targets = zip(*map(augment, images, targets))  # here, not in the workers: the reseeds decide it
            with parts.autocast:
                losses = parts.trained(images, targets)  # the detector's loss terms, each weighted 1
            parts.optimizer.zero_grad(set_to_none=True)
            parts.scaler.scale(sum(losses.values())).backward()
            if parts.plan["clip"]:  # Deformable DETR's, Sparse R-CNN's
                parts.scaler.unscale_(parts.optimizer)
                torch.nn.utils.clip_grad_norm_(parts.trained.parameters(), parts.plan["clip"])
            parts.scaler.step(parts.optimizer)
            parts.scaler.update()
            parts.scheduler.step()
            progress.update(losses, parts.scheduler.get_last_lr()[0])
        record = dict(iteration=last, **progress.close(), seconds=round(time.perf_counter() - progress.started, 1))
        if last % every == 0 or last == total:
            if world > 1:  # BN statistics differ by rank: evaluate rank 0's
                for buffer in parts.model.buffers():
                    dist.broadcast(buffer, src=0)
            metrics = parts.evaluation(f"{last:07d}")
            record.update(metrics or {})
        if rank == 0:  # the record first: a kill between the two loses none
            with open(output / "log.jsonl", "a") as file:
                file.write(json.dumps(record) + "\n")
            path = save_checkpoint(output / f"checkpoint-{last:07d}.pth", cfg, parts, step=last,
                                   num_classes=parts.num_classes)
            scores = summary({t: m for t, m in record.items() if t in ("bbox", "segm")})
            log(f"iteration {last}/{total}: loss {record['loss']:.3f}{'; ' + scores if scores else ''}; saved {path}")
        if world > 1:
            dist.barrier()
    return metrics


def weights_depend_on(cfg):
    """The options that a checkpoint's weights depend on for --model: the queries only where the detector has them."""
    set_prediction = detection.MODELS[cfg.model].detector in detection.SET_PREDICTION
    return ["model", "dgmn_rates", "dgmn_groups"] + (["queries"] if set_prediction else [])


def run(cfg, rank, world, device):
    """A run in named steps: the checkpoint, data, model, recipe, optimizer and schedule, the starting point; then an
    evaluation or training. Returns the last evaluation's metrics on rank 0, None elsewhere."""
    if cfg.table:
        return detection.print_table() if rank == 0 else None
    if cfg.batch_size % world:
        raise InputError(f"--batch-size {cfg.batch_size} (the global batch) is not divisible by the {world} processes")
    log = print if rank == 0 else lambda *args, **kwargs: None
    path, state = resume(cfg, rank, world, weights_depend_on(cfg), ["batch_size", "seed", "save_every", "weight_decay"],
                         log)
    output_folder(cfg)  # before the synthetic set is written into it
    train, val, names, ground_truth = datasets(cfg, rank, world)
    model, num_classes = make_model(cfg, state, train, names, device, log)
    sizes = [] if cfg.eval_only else [train.coco.imgs[i] for i in train.ids]  # no image read
    groups = [int(size["width"] > size["height"]) for size in sizes]  # landscape, or not (square too: Detectron's)
    per_epoch = len(groups) // world // (cfg.batch_size // world) if sizes else 1
    if per_epoch == 0:
        raise InputError(f"{cfg.data or 'the synthetic set'}: {len(train)} training images are fewer than one batch")
    plan = recipe(cfg, per_epoch)
    optimizer, scheduler = optimizer_and_schedule(model, plan, cfg.weight_decay)
    _, autocast, scaler = precision(cfg, device)
    evaluation = functools.partial(evaluate, model, evaluation_loader(val, cfg, rank, world, device), names,
                                   ground_truth, cfg, device, autocast, rank, world, Path(cfg.output))
    parts = Parts(model, distribute(model, cfg, world), optimizer, scheduler, scaler, autocast, evaluation, None, plan,
                  num_classes)
    start = restore(path, state, cfg, parts, log)
    if cfg.eval_only:
        metrics = evaluation("eval")
        log(f"eval: {summary(metrics)}" if rank == 0 else "")
        return metrics
    log(f"{world} process(es) on {device.type}; {plan['optimizer']}, lr {plan['lr']:g}, {plan['iterations']} "
        f"iterations of {cfg.batch_size} images ({per_epoch} an epoch), lr x 0.1 after {plan['steps']}")
    loader = DataLoader(train, batch_sampler=batches(groups, cfg.batch_size // world, cfg.seed, rank, world, start),
                        collate_fn=list, num_workers=cfg.workers, pin_memory=device.type == "cuda")
    parts = parts._replace(batches=iter(loader))  # the iterator draws a seed: before training() reseeds
    return training(cfg, rank, world, device, parts, start, log)


if __name__ == "__main__":
    command_line()
