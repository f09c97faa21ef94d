"""Semantic segmentation on Cityscapes: DGMN2 + Semantic FPN or one of SETR's heads (Section 6.3, Tables 11, 12) and
the dilated FCN with the DGMN module or a module it is compared with (Section 5, Tables 2, 4, 13, 14); training,
sliding-window evaluation, the test server's label images, DDP through torchrun.

Paper targets, mIoU on Cityscapes val (single scale / multi-scale + flip): DGMN2-Tiny/Small/Medium/Large + Semantic
FPN 78.09/79.40, 80.65/81.58, 80.60/81.79, 81.75/82.64 (the SETR heads: TABLE_11); dilated FCN ResNet-101 75.0, + DGMN
(DA+DW+DS) 80.4.

    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                                         # Table 11 (AdamW 1e-4, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-tiny-mla --data /path/to/cityscapes \\
        --pretrained dgmn2_tiny.pth                                         # Table 11, SETR-MLA at output stride 8
    torchrun --nproc_per_node 8 train_cityscapes.py --model fcn-dgmn --data /path/to/cityscapes \\
        --pretrained resnet101.pth                                          # Table 2 (SGD 0.01, 40k iterations)
    torchrun --nproc_per_node 8 train_cityscapes.py --model dgmn2-large-mla --data /path/to/cityscapes \\
        --eval-only --resume CKPT --multi-scale --eval-split test --predict DIR     # Table 12: the server's files
    torchrun train_cityscapes.py                  # no --data: the built-in synthetic scenes, a few minutes on a CPU
    python train_cityscapes.py --table            # Tables 2 and 11: parameters and FLOPs beside the paper's
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
from torch.utils.flop_counter import FlopCounterMode
from torchvision.transforms import v2
from tqdm import tqdm

import dgmn
import dgmn2
import sampler


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
# ---- Table 2's modules on the dilated FCN's 512-channel map: those from torchvision here, the rest in dgmn.py ----
FCN_CHANNELS = dgmn.CITYSCAPES_CHANNELS  # Section 5.1: the 3x3 Conv-BN-ReLU after the backbone gives 512
DCN_CHANNELS = 256  # "+ Deformable": DCNv2 512 -> 256 is the standard width that gives Table 2's +1.31M
ASPP_RATES, ASPP_CHANNELS = (12, 24, 36), 256  # DeepLab v3 at output stride 8: its rates, its branches' width


def conv_bn_relu(in_channels, out_channels, bias=False):
    """A 3x3 Conv-BN-ReLU, the width changed (bias: the conv's own, redundant before BN; the DGMN2 release's PUP head
    has it). (B, C_in, H, W) -> (B, C_out, H, W)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias), nn.BatchNorm2d(out_channels),
                         nn.ReLU(inplace=True))


class ModulatedDeformConv(torchvision.ops.DeformConv2d):
    """DCNv2 (Zhu et al., CVPR 2019): a ks x ks convolution (no bias) whose K reads move by predicted offsets and are
    scaled by predicted masks (a sigmoid), both from a ks x ks conv of the input to 3K channels with bias (as mmcv's
    ModulatedDeformConv2dPack). That conv starts at zero: a new layer reads the regular grid at masks 0.5.
    x (B, C_in, H, W) -> (B, C_out, H, W)."""

    def __init__(self, in_channels, out_channels, kernel_size=3):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.reads = kernel_size ** 2
        self.offset_mask = nn.Conv2d(in_channels, 3 * self.reads, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.offset_mask.weight)
        nn.init.zeros_(self.offset_mask.bias)

    def forward(self, x):
        offsets, masks = self.offset_mask(x).split([2 * self.reads, self.reads], dim=1)  # (B, 2K, H, W), (B, K, H, W)
        return super().forward(x, offsets, masks.sigmoid())


def deformable(channels):
    """Table 2's "+ Deformable": a DCNv2 3x3 conv to DCN_CHANNELS, BN, ReLU; the classifier reads DCN_CHANNELS.
    (B, C, H, W) -> (B, DCN_CHANNELS, H, W)."""
    return nn.Sequential(ModulatedDeformConv(channels, DCN_CHANNELS), nn.BatchNorm2d(DCN_CHANNELS),
                         nn.ReLU(inplace=True))


class ASPP(torchvision.models.segmentation.deeplabv3.ASPP):
    """Table 2's "+ ASPP": DeepLab v3's atrous spatial pyramid pooling (Chen et al., 2017), torchvision's: a 1x1 conv,
    3x3 convs at ASPP_RATES and image pooling, ASPP_CHANNELS each with BN-ReLU, concatenated and projected by a 1x1
    Conv-BN-ReLU (and dropout 0.5). The projection goes back to C, as the ASPP module of the CCNet / OCNet code base
    (5 x 256 -> 512), not to 256 as torchvision's: the nearer of the two to Table 2 (FCN_VARIANTS gives both gaps).
    (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels):
        super().__init__(channels, ASPP_RATES, ASPP_CHANNELS)
        self.project[0] = nn.Conv2d(len(self.convs) * ASPP_CHANNELS, channels, 1, bias=False)
        self.project[1] = nn.BatchNorm2d(channels)


def non_local(channels):
    """Table 2's "+ Non-local": the embedded-Gaussian block (dgmn.NonLocal, C / 2 inner channels) then a 3x3
    Conv-BN-ReLU C -> C, as DANet's head follows its attention module (conv5a, the module, conv51, the classifier).
    (B, C, H, W) -> (B, C, H, W)."""
    return nn.Sequential(dgmn.NonLocal(channels), conv_bn_relu(channels, channels))


@dataclasses.dataclass(frozen=True)
class FCNRow:
    """A dilated FCN of Table 2: make(channels, **DGMN switches) builds the module on its 512-channel map."""
    make: object                     # the module's builder (nn.Identity ignores its arguments)
    params_m: float | None           # Table 2: the parameters it adds (M)
    gflops: float | None             # Table 2: the FLOPs it adds (G)
    miou: float                      # Table 2: Cityscapes val mIoU (%), single scale
    layout: str                      # what the module is, after which paper or code base
    dgmn: dict | None = None         # DGMN's switches: the rows that --dgmn-rates and --dgmn-groups change
    out_channels: int | None = None  # the width the classifier reads; None: the map's


# ---- SETR's decoder heads (Zheng et al., CVPR 2021) on DGMN2 at output stride 8 (Section 6.3, Table 11) --------
SETR_OUTPUT_STRIDE = 8  # Section 6.3: stride-1 patch embeddings in stages 3 and 4
FPN_OUTPUT_STRIDE = 32  # DGMN2 as it classifies ImageNet, under the Semantic FPN (Table 11)
PUP_CHANNELS, PUP_ROUNDS = 256, 3  # the release's PUP: three 3x3 convs to 256 channels, each before a 2x upsampling
MLA_CHANNELS, MLA_SCALE = 128, 4  # the release's MLA: 128 channels a stage, resized to 4 x the stride-8 map


def resize(x, size):
    """Bilinear resize of (B, C, h, w) to size (H, W), corners aligned as in every resize of the DGMN2 release's SETR
    heads: its configs set align_corners=True (SETR's own set False) and its MLA head hard-codes True for the four
    maps. -> (B, C, H, W)."""
    return F.interpolate(x, size=list(size), mode="bilinear", align_corners=True)


def doubled(x):
    """(B, C, h, w) -> (B, C, 2h, 2w), resized."""
    return resize(x, [2 * side for side in x.shape[-2:]])


class NaiveHead(nn.Module):
    """SETR-Naive as the DGMN2 release has it: a 1x1 classifier on the last stage map.
    The four stage maps [(B, C_s, H_s, W_s)] -> (B, classes, H_4, W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.classifier = nn.Conv2d(channels[-1], classes, 1)

    def forward(self, maps):
        return self.classifier(maps[-1])


class PUPHead(nn.Module):
    """SETR-PUP (progressive upsampling) as the release has it: PUP_ROUNDS rounds of a 3x3 Conv-BN-ReLU to
    PUP_CHANNELS (the conv with a bias) and a 2x upsampling on the last map, then a 1x1 classifier and a last 2x
    upsampling; at output stride 8 its logits have twice the input's side, which SETR resizes down.
    [(B, C_s, H_s, W_s)] -> (B, classes, 16 H_4, 16 W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        widths = [channels[-1]] + [PUP_CHANNELS] * PUP_ROUNDS
        self.rounds = nn.ModuleList(conv_bn_relu(i, o, bias=True) for i, o in zip(widths, widths[1:]))
        self.classifier = nn.Conv2d(PUP_CHANNELS, classes, 1)

    def forward(self, maps):
        x = maps[-1]
        for unit in self.rounds:
            x = doubled(unit(x))
        return doubled(self.classifier(x))


class MLAHead(nn.Module):
    """SETR-MLA (multi-level feature aggregation) as the release has it, on DGMN2's four stage maps where SETR takes
    four ViT layers: two 3x3 Conv-BN-ReLU to MLA_CHANNELS on each map, each resized to MLA_SCALE times the last
    (stride-8) map, concatenated and classified by a 1x1 conv. [(B, C_s, H_s, W_s)] -> (B, classes, 4 H_4, 4 W_4)."""

    def __init__(self, channels, classes):
        super().__init__()
        self.levels = nn.ModuleList(nn.Sequential(conv_bn_relu(width, MLA_CHANNELS),
                                                  conv_bn_relu(MLA_CHANNELS, MLA_CHANNELS)) for width in channels)
        self.classifier = nn.Conv2d(len(channels) * MLA_CHANNELS, classes, 1)

    def forward(self, maps):
        size = [MLA_SCALE * side for side in maps[-1].shape[-2:]]
        return self.classifier(torch.cat([resize(level(x), size) for level, x in zip(self.levels, maps)], dim=1))


SETR_HEADS = dict(naive=NaiveHead, pup=PUPHead, mla=MLAHead)  # --model dgmn2-VARIANT-HEAD


class SETR(nn.Module):
    """Section 6.3: DGMN2 at output stride 8 and one of SETR_HEADS, its logits resized to the input (the release resizes
    Naive's and MLA's to the 769 crop first: the same at the training crop and evaluation window); no auxiliary heads,
    no dropout (the release's configs). (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = True  # as resize(): multi-scale evaluation resizes the scores back the same way

    def __init__(self, backbone, head, classes):
        super().__init__()
        self.backbone, self.head = backbone, SETR_HEADS[head](backbone.channels, classes)

    def forward(self, images):
        return resize(self.head(self.backbone.forward_features(images)), images.shape[-2:])


@dataclasses.dataclass(frozen=True)
class DGMN2Row:
    """A DGMN2 row of Table 11 (Cityscapes val): the backbone, its decoder head and the paper's numbers."""
    variant: str     # of dgmn2.VARIANTS
    head: str        # "fpn" (Semantic FPN, output stride 32) or one of SETR_HEADS (output stride 8)
    params_m: float  # parameters (M)
    gflops: float    # FLOPs (G)
    miou: float      # mIoU (%), single scale
    miou_ms: float   # mIoU (%), multi-scale and flips


TABLE_11 = {  # the DGMN2 rows, a head's for Tiny, Small, Medium, Large: (params M, FLOPs G, mIoU SS, mIoU MS)
    "fpn": [(15.84, 76.35, 78.09, 79.4), (24.71, 99.57, 80.65, 81.58), (39.55, 136.01, 80.60, 81.79),
            (52.02, 175.94, 81.75, 82.64)],
    "naive": [(11.60, 117.52, 77.23, 78.23), (20.47, 204.97, 80.31, 81.04), (35.31, 347.76, 80.83, 81.39),
              (47.78, 467.46, 81.80, 82.61)],
    "pup": [(13.95, 242.51, 78.25, 79.26), (22.82, 329.96, 79.78, 80.73), (37.67, 472.75, 80.97, 81.80),
            (50.14, 592.45, 81.58, 82.27)],
    "mla": [(13.37, 141.72, 78.25, 79.32), (22.24, 229.17, 80.79, 81.62), (37.08, 371.96, 81.09, 82.00),
            (49.56, 491.66, 81.55, 81.98)],
}


# ---- Configuration: the paper's recipes by default; SYNTHETIC replaces what no flag set without --data ----------
IGNORE = 255
FCN_VARIANTS = {  # Table 2's rows, in its order
    "fcn": FCNRow(nn.Identity, None, None, 75.0, "nothing: the Conv-BN-ReLU feeds the classifier"),
    "fcn-deformable": FCNRow(deformable, 1.31, 12.34, 78.2, "DCNv2 3x3 512 -> 256, BN, ReLU (Zhu et al.); "
                             "the classifier reads 256 channels", out_channels=DCN_CHANNELS),
    "fcn-aspp": FCNRow(ASPP, 4.42, 38.45, 78.9, "DeepLab v3's ASPP (torchvision's), rates 12, 24, 36, 5 x 256 "
                       "projected to 512 as in the CCNet / OCNet code base; no standard layout is within 3% of both "
                       "numbers: torchvision's projection to 256 gives -6.6% / -2.3%"),
    "fcn-nonlocal": FCNRow(non_local, 2.88, 73.33, 79.0, "non-local block (Wang et al.), 256 inner channels, then "
                           "a 3x3 Conv-BN-ReLU 512 -> 512 (DANet's head)"),
    **{name: FCNRow(dgmn.DGMN, row.params_m, row.gflops, row.miou, "dgmn.DGMN, Table 2's layout", dgmn=row.options)
       for name, row in zip(["fcn-da", "fcn-da-dw", "fcn-dgmn"], dgmn.TABLE_2.values())},
}
DGMN_FCNS = [name for name, row in FCN_VARIANTS.items() if row.dgmn]  # what --dgmn-rates, --dgmn-groups change
DGMN2_MODELS = {f"dgmn2-{variant}" + ("" if head == "fpn" else f"-{head}"): DGMN2Row(variant, head, *numbers)
                for head, rows in TABLE_11.items() for variant, numbers in zip(dgmn2.VARIANTS, rows, strict=True)}
MODELS = list(DGMN2_MODELS) + list(FCN_VARIANTS)
SYNTHETIC = dict(iterations=400, batch_size=16, lr=1e-3, base_size=64, crop=64, eval_stride=48, eval_every=100,
                 workers=1, log_every=10, output="runs/synthetic-segmentation")
CHOICES = dict(model=MODELS, mode=["fine", "coarse"], output_stride=[0, 8, 16, 32], eval_split=["val", "test"],
               optimizer=["auto", "adamw", "sgd"], amp=["auto", "bf16", "fp16", "off"])
# A resume refuses a checkpoint saved with other values of WEIGHTS_DEPEND_ON and, to train on, of TRAINING_DEPENDS_ON
WEIGHTS_DEPEND_ON = ["model", "output_stride", "dgmn_rates", "dgmn_groups", "multi_grid"]
TRAINING_DEPENDS_ON = ["optimizer", "iterations", "batch_size", "eval_every", "ohem", "mode", "trainval"]
OHEM_THRESHOLD, OHEM_MIN_KEPT = 0.7, 100_000  # pixel OHEM as the CCNet and DANet code bases train Cityscapes
MULTI_GRID = (1, 2, 4)  # DeepLab v3: res5's three blocks at the stage's dilation times these
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
                              f"{MULTI_GRID} (DeepLab v3's multi-grid, Table 13)")
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
    for name, models in [("dgmn_rates", DGMN_FCNS), ("dgmn_groups", DGMN_FCNS), ("ohem", list(FCN_VARIANTS)),
                         ("multi_grid", list(FCN_VARIANTS))]:
        if getattr(cfg, name) != getattr(Config, name) and cfg.model not in models:
            raise InputError(f"--{name.replace('_', '-')} applies to {', '.join(models)}, not to --model {cfg.model}")
    if cfg.output_stride and cfg.model in FCN_VARIANTS:
        raise InputError(f"--output-stride applies to the DGMN2 models, not to --model {cfg.model}")
    if cfg.output_stride not in (0, SETR_OUTPUT_STRIDE) and DGMN2_MODELS[cfg.model].head != "fpn":
        raise InputError(f"--output-stride {cfg.output_stride}: the SETR heads take DGMN2 at output stride "
                         f"{SETR_OUTPUT_STRIDE} (Section 6.3)")
    check_data_options(cfg)
    if cfg.dgmn_rates:
        rates_of(cfg.dgmn_rates)
    if cfg.dgmn_groups < 0 or cfg.dgmn_groups and FCN_CHANNELS % cfg.dgmn_groups:
        raise InputError(f"--dgmn-groups {cfg.dgmn_groups}: 0 (no dynamic weights) or a divisor of {FCN_CHANNELS}")
    if cfg.dgmn_groups not in (0, Config.dgmn_groups) and FCN_VARIANTS[cfg.model].dgmn.get("dynamic_weights") is False:
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


# ---- Models ----------------------------------------------------------------------------------------------------
class SemanticFPN(nn.Module):
    """Semantic FPN (Kirillov et al.) on the four DGMN2 maps: an FPN, per level 3x3 Conv-BN-ReLU units, each but the
    finest's followed by a 2x upsampling; their sum, a 1x1 classifier, upsampled. (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = True  # in every resize, as the release's Cityscapes configs set for mmseg's FPNHead

    def __init__(self, backbone, classes, fpn_channels=256, head_channels=128):
        super().__init__()
        self.backbone, self.fpn = backbone, torchvision.ops.FeaturePyramidNetwork(backbone.channels, fpn_channels)
        units = [max(int(math.log2(s // backbone.strides[0])), 1) for s in backbone.strides]  # 2x upsamplings, >= 1
        self.scales = nn.ModuleList(nn.Sequential(*[nn.Sequential(
            nn.Conv2d(head_channels if u else fpn_channels, head_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(head_channels), nn.ReLU(inplace=True)) for u in range(n)]) for n in units)
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(head_channels, classes, 1))

    def forward(self, images):
        maps = self.backbone.forward_features(images)
        finest, fused, corners = maps[0].shape[-2:], 0, self.align_corners
        for level, scale in zip(self.fpn({str(i): m for i, m in enumerate(maps)}).values(), self.scales):
            for unit in scale:
                level = unit(level)
                if level.shape[-2:] != finest:
                    level = F.interpolate(level, scale_factor=2, mode="bilinear", align_corners=corners)
            fused = fused + F.interpolate(level, size=finest, mode="bilinear", align_corners=corners)  # exact sizes
        return F.interpolate(self.classifier(fused), size=images.shape[-2:], mode="bilinear", align_corners=corners)


class DilatedFCN(nn.Module):
    """Section 5.1: ResNet-101 at output stride 8 (dilated layer3-4), a 3x3 Conv-BN-ReLU to 512 channels, the model's
    module on that map (`context`: nothing for the FCN baseline, a baseline of Table 2 or DGMN, with dgmn_options
    for the DGMN rows, their own by default), dropout and a 1x1 classifier, upsampled to the input. multi_grid: res5
    (layer4) with DeepLab v3's multi-grid. (B, 3, H, W) -> (B, classes, H, W)."""
    align_corners = False  # the DGMN release (lzrobots/dgmn) has COCO code only: nothing says what its FCN used

    def __init__(self, classes, model="fcn", dgmn_options=None, multi_grid=False, channels=FCN_CHANNELS):
        super().__init__()
        row = FCN_VARIANTS[model]
        self.backbone = torchvision.models.resnet101(replace_stride_with_dilation=[False, True, True])
        self.backbone.fc = nn.Identity()  # unused: DDP requires every parameter to take part
        if multi_grid:
            multi_grid_dilations(self.backbone.layer4)
        self.reduce = conv_bn_relu(2048, channels)
        self.context = row.make(channels, **(dgmn_options or row.dgmn or {}))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(row.out_channels or channels, classes, 1))

    def forward(self, images):
        r = self.backbone
        x = r.layer4(r.layer3(r.layer2(r.layer1(r.maxpool(r.relu(r.bn1(r.conv1(images))))))))  # (B, 2048, H / 8, W / 8)
        logits = self.classifier(self.context(self.reduce(x)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=self.align_corners)


def multi_grid_dilations(stage):
    """DeepLab v3's multi-grid, in place: the 3x3 conv of block i of a torchvision ResNet stage at the stage's dilation
    (its last block's; torchvision gives the first block half of it) times MULTI_GRID[i]. Returns the stage."""
    dilation = stage[-1].conv2.dilation[0]
    for block, unit in zip(stage, MULTI_GRID, strict=True):
        block.conv2.dilation = block.conv2.padding = (dilation * unit,) * 2  # padding = dilation: the size kept
    return stage


def dgmn_options(cfg):
    """The DGMN switches of a DGMN FCN, with --dgmn-rates and --dgmn-groups (Tables 14, 15); None for other models."""
    row = FCN_VARIANTS.get(cfg.model)
    if row is None or row.dgmn is None:
        return None
    options = {**row.dgmn, **(dict(rates=rates_of(cfg.dgmn_rates)) if cfg.dgmn_rates else {})}
    return {**options, **(dict(groups=cfg.dgmn_groups) if cfg.dgmn_groups else dict(dynamic_weights=False))}


def output_stride(cfg):
    """DGMN2's output stride: --output-stride, or the model's (the Semantic FPN's 32, the SETR heads' 8)."""
    return cfg.output_stride or (FPN_OUTPUT_STRIDE if DGMN2_MODELS[cfg.model].head == "fpn" else
                                 SETR_OUTPUT_STRIDE)


def build_model(cfg, classes, world, device):
    """--model with its --pretrained backbone, SyncBatchNorm under DDP on GPUs, on device (channels-last if asked)."""
    if cfg.model in FCN_VARIANTS:
        model = DilatedFCN(classes, cfg.model, dgmn_options(cfg), cfg.multi_grid)
    else:
        row = DGMN2_MODELS[cfg.model]
        backbone = dgmn2.build(row.variant, num_classes=0, output_stride=output_stride(cfg))
        model = SemanticFPN(backbone, classes) if row.head == "fpn" else SETR(backbone, row.head, classes)
    if cfg.pretrained:
        load_pretrained(model.backbone, cfg.pretrained)
    if world > 1 and device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=cfg.layout)


def load_pretrained(backbone, path):
    """Backbone weights, classifiers left out: a torchvision ResNet, authors' DGMN2 or train_imagenet.py checkpoint."""
    source = f"--pretrained {path}"
    if not Path(path).is_file():
        raise InputError(f"{source}: no such file")
    try:  # the release's DGMN2 checkpoints hold the argparse.Namespace of its training script
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unpickling failure is one bad file
        raise InputError(f"{source}: not a readable checkpoint ({str(error).splitlines()[0]})") from None
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
        return print_table() if rank == 0 else None
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
    name = cfg.optimizer if cfg.optimizer != "auto" else "sgd" if cfg.model in FCN_VARIANTS else "adamw"
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


# ---- python train_cityscapes.py --table: the models' parameters and FLOPs beside the paper's --------------------
TABLE_SIDE = dgmn.CITYSCAPES_SIDE  # 97: the side of the 512-channel map of a 769 crop at stride 8
TABLE_11_SIDE = 769  # the training crop: the input side at which Table 11's FLOPs are reproduced
HEAD_LAYOUTS = dict(fpn="Semantic FPN (FPN 256, head 128 channels), DGMN2 at output stride 32",
                    naive="SETR-Naive: a 1x1 classifier on the stride-8 map, DGMN2 at output stride 8",
                    pup=f"SETR-PUP: {PUP_ROUNDS} x [3x3 conv {PUP_CHANNELS}, BN, ReLU, 2x up], a 1x1 classifier, "
                    "2x up; DGMN2 at output stride 8",
                    mla=f"SETR-MLA: 2 x [3x3 conv {MLA_CHANNELS}, BN, ReLU] on each stage's map, resized to "
                    f"{MLA_SCALE}x the stride-8 map, concatenated, a 1x1 classifier; DGMN2 at output stride 8")
COUNTING = ("Multiply-adds (G): torch.utils.flop_counter.FlopCounterMode's count / 2 on the meta device, batch 1: "
            "convolutions and matrix products only (norms, activations, softmax, pooling and resizes are not "
            "counted); torchvision's deform_conv2d, which FlopCounterMode does not know, is counted as the "
            "convolution it generalises (deform_conv_flops, passed as its custom_mapping): the bilinear reads and "
            "the masks' products are not counted. The paper's FLOPs are multiply-adds (its DGMN rows are their "
            f"parameters x {TABLE_SIDE} x {TABLE_SIDE}).")


def deform_conv_flops(input_shape, weight_shape, *_, out_shape, **__):
    """FlopCounterMode's formula for torchvision::deform_conv2d (shapes in, FLOPs out, 2 a multiply-add): that of the
    convolution it generalises, out elements x (C_in / groups) x ks x ks."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def fcn_added_cost(model, classes=len(TRAIN_CLASSES)):
    """(parameters, multiply-adds) that an FCN's module adds to the dilated FCN on one (1, 512, 97, 97) map, the
    classifier's change of width included (the COUNTING rules), from the models built on the meta device."""
    counts = []
    for name in (model, "fcn"):
        with torch.device("meta"):
            fcn = DilatedFCN(classes, name).eval()
        head = nn.Sequential(fcn.context, fcn.classifier)
        with FlopCounterMode(display=False, custom_mapping={torch.ops.torchvision.deform_conv2d: deform_conv_flops}) \
                as counter:
            head(torch.empty(1, FCN_CHANNELS, TABLE_SIDE, TABLE_SIDE, device="meta"))
        counts.append((sum(p.numel() for p in head.parameters()), counter.get_total_flops() // 2))
    return counts[0][0] - counts[1][0], counts[0][1] - counts[1][1]


def gaps(params, macs, row):
    """Ours vs the paper's row (its params_m and gflops, None where it gives none): "+0.1% / -0.2%"."""
    return " / ".join(f"{100 * (ours / (paper * scale) - 1):+.1f}%" if paper else "-"
                      for ours, paper, scale in ((params, row.params_m, 1e6), (macs, row.gflops, 1e9)))


def table_2():
    """Table 2 (Section 5.2): what each dilated FCN's module adds, beside the paper. -> (title, rows)."""
    rows = []
    for name, row in FCN_VARIANTS.items():
        if row.dgmn is None:
            (params, macs), counted = fcn_added_cost(name), row.layout
        else:
            cost = dgmn.added_cost(row.dgmn, FCN_CHANNELS, TABLE_SIDE)
            params, macs = cost["params"], cost["macs"]
            walks = f"; not its walk convs, +{cost['walk_params'] / 1e6:.3f}M / +{cost['walk_macs'] / 1e9:.2f}G" \
                if cost["walk_params"] else ""
            counted = f"{row.layout}: its transforms and predictors, as Table 2 counts them (dgmn.added_cost){walks}"
        rows.append([name, f"+{params / 1e6:.3f}M", f"+{row.params_m}M" if row.params_m else "-",
                     f"+{macs / 1e9:.2f}G", f"+{row.gflops}G" if row.gflops else "-", gaps(params, macs, row),
                     row.miou, counted])
    return (f"Table 2: added to the dilated FCN ResNet-101 on its {TABLE_SIDE} x {TABLE_SIDE} x {FCN_CHANNELS} map "
            f"(a 769 crop at stride 8), {len(TRAIN_CLASSES)} classes; mIoU: the paper's, Cityscapes val"), rows


def dgmn2_cost(model, side=TABLE_11_SIDE, classes=len(TRAIN_CLASSES)):
    """(parameters, multiply-adds) of a DGMN2 model of Table 11 on one (1, 3, side, side) image, built on the meta
    device: the COUNTING rules plus the sampler's bilinear reads, 4 multiply-adds per sampled element and channel, as
    dgmn2.count_macs counts them (the sampler's kernel ops, which run their shape functions on the meta device, are
    told apart by name; FlopCounterMode counts their products by the formulas sampler.py registers)."""
    with torch.device("meta"):
        net = build_model(Config(model=model), classes, 1, torch.device("meta")).eval()  # batch 1: BN's running stats
    with sampler.backend("kernel"), FlopCounterMode(display=False) as counter:
        net(torch.empty(1, 3, side, side, device="meta"))
    products = sum(flops for op, flops in counter.get_flop_counts()["Global"].items()
                   if str(op).startswith("dgmn_sampler")) // 2
    return sum(p.numel() for p in net.parameters()), counter.get_total_flops() // 2 + 4 * products


def table_11():
    """Table 11 (Section 6.3): the DGMN2 models, parameters and FLOPs beside the paper's, with its mIoU. -> (title,
    rows)."""
    rows = []
    for name, row in DGMN2_MODELS.items():
        params, macs = dgmn2_cost(name)
        rows.append([name, f"{params / 1e6:.3f}M", f"{row.params_m}M", f"{macs / 1e9:.2f}G", f"{row.gflops}G",
                     gaps(params, macs, row), f"{row.miou:.2f} / {row.miou_ms:.2f}", HEAD_LAYOUTS[row.head]])
    return (f"Table 11: DGMN2 on Cityscapes, whole models on one {TABLE_11_SIDE} x {TABLE_11_SIDE} image (the "
            "training crop and evaluation window: the input side that reproduces the paper's FLOPs; 768 x 768 gives "
            "about 2% fewer, 512 x 1024 14% fewer, 1024 x 1024 70% more), 19 classes; counted as above plus DGMN2's "
            "bilinear reads of the sampled keys and values, 4 multiply-adds per sampled element and channel "
            "(dgmn2.count_macs' rule; without them every row is 0.3-1.4% under the paper's); mIoU: the paper's, "
            "Cityscapes val, single scale / multi-scale"), rows


TABLES = [table_2, table_11]  # each: () -> (title, rows of TABLE_COLUMNS)
TABLE_COLUMNS = ["model", "params", "paper", "multiply-adds", "paper", "ours vs paper (params / FLOPs)",
                 "mIoU paper", "layout, and what is counted"]


def print_table():
    """python train_cityscapes.py --table: the counting rules, then each of TABLES as a Markdown table."""
    print(COUNTING)
    for title, rows in (table() for table in TABLES):
        print(f"\n{title}\n\n| {' | '.join(TABLE_COLUMNS)} |\n|{'---|' * len(TABLE_COLUMNS)}")
        for row in rows:
            print(f"| {' | '.join(map(str, row))} |")


if __name__ == "__main__":
    command_line()
