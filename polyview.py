"""Poly-view contrastive learning (Shidani et al., ICLR 2024, arXiv 2403.05490), in one file.

SimCLR learns an image encoder by matching two augmented views of each image against the views of
the other images in the batch. Poly-view contrastive learning draws M > 2 views of each of K images
and asks the encoder to match all of them at once. Its objectives (Geometric and Arithmetic PVC,
Sufficient Statistics) come from maximising the One-vs-Rest mutual information between a view and
the other M - 1 views of its image. The paper's headline: 128 epochs at batch 256 with M views beat
SimCLR at 1024 epochs and batch 4096 on ImageNet-1k.

    python polyview.py --data /path/to/imagenet --loss suffstats --views 8             # one GPU
    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --loss suffstats  # eight GPUs
    python polyview.py --dataset cifar10 --data ./data --arch resnet18 --loss suffstats
    python polyview.py --dataset fake --benchmark        # views/s of the step, the backbone, the data
    python polyview.py --bench-loss                      # cost of each objective

The file reads top to bottom: config, distributed helpers, data and views, model, objectives,
optimiser and schedule, linear probe, training, benchmarks, main. The math is in the docstrings
of the objectives; the naive loops they are tested against are in test_polyview.py.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

# ----------------------------------------------------------------------------------------------
# Config. Every default follows SimCLR's recipe (Chen et al., 2020) unless it says otherwise.
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Poly-view contrastive pre-training of a ResNet, then a linear probe. "
        "Each step draws M augmented views of each of K images; every view is matched to the other "
        "views of its image against all views of the other images (the negatives).",
    )
    p.add_argument("--loss", default="suffstats", choices=list(LOSSES),
                   help="objective: simclr (M = 2), multicrop (SimCLR over view pairs), geometric or "
                   "arithmetic PVC (-log of the geometric / arithmetic mean of the M-1 positives' "
                   "probabilities), suffstats (one positive: the mean of the other views) (default: %(default)s)")
    p.add_argument("--views", type=int, default=None, help="M, views per image (default: 2 for simclr, 4 otherwise)")
    p.add_argument("--batch-size", type=int, default=256, help="K, unique images per step over all GPUs (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=128, help="pre-training epochs (0: probe a random backbone) (default: %(default)s)")
    p.add_argument("--arch", default="resnet50", choices=["resnet50", "resnet18"], help="torchvision backbone (default: %(default)s)")
    p.add_argument("--dataset", default="imagenet", choices=["imagenet", "folder", "cifar10", "cifar100", "fake"],
                   help="imagenet/folder: ImageFolders DATA/train and DATA/val; cifar*: torchvision's "
                   "(downloaded into DATA); fake: random images, for throughput (default: %(default)s)")
    p.add_argument("--data", default="./data", help="dataset folder (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=None,
                   help="side of the crops (default 224, 32 for CIFAR); at 64 or less the small-image "
                   "recipe: 3x3 stride-1 stem, no max-pool, jitter strength 0.5, no blur")
    p.add_argument("--out", default="runs/polyview", help="run folder: checkpoint.pt, metrics.jsonl, loss.png, probe.json (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.3, help="base learning rate; the peak is lr * K / 256 (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=None, help="tau (default 0.1, 0.2 for small images)")
    p.add_argument("--weight-decay", type=float, default=1e-6, help="LARS weight decay (not on BN and biases) (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=float, default=10, help="linear warm-up, at most a tenth of the run (default: %(default)s)")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of every view (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--probe-epochs", type=int, default=90, help="epochs of the linear probe (0 skips it) (default: %(default)s)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt if it exists (else start fresh), so that the "
                   "same command can be relaunched after a crash")
    p.add_argument("--log-every", type=int, default=50, help="steps between log lines (default: %(default)s)")
    p.add_argument("--benchmark", action="store_true", help="print views/s of the step, the backbone and the data path")
    p.add_argument("--bench-loss", action="store_true", help="print the cost of each objective against cross-entropy")
    args = p.parse_args(argv)
    small = args.dataset.startswith("cifar")
    if args.image_size is None:
        args.image_size = 32 if small else 224
    args.small_images = args.image_size <= 64
    if args.temperature is None:
        args.temperature = 0.2 if args.small_images else 0.1
    if args.views is None:
        args.views = 2 if args.loss == "simclr" else 4
    return args


class UserError(Exception):
    """A problem with the command line, the data or the run folder: reported in one line, exit 2."""


def check_args(args, world_size):
    """Fail fast, before any data or GPU is touched, on settings the run could not survive."""
    try:  # the objective itself knows its rules (M >= 2, simclr needs M = 2, tau > 0)
        LOSSES[args.loss](torch.randn(2, args.views, 4), args.temperature)
    except ValueError as error:
        raise UserError(f"--loss {args.loss} --views {args.views} --temperature {args.temperature}: {error}")
    if args.batch_size < 2 or args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be >= 2 and divisible by the {world_size} processes")
    for flag, least in (("epochs", 0), ("workers", 0), ("probe_epochs", 0), ("log_every", 1), ("image_size", 8)):
        if getattr(args, flag) < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup_epochs < 0:
        raise UserError("--lr must be > 0, --weight-decay and --warmup-epochs >= 0")
    if args.dataset in ("imagenet", "folder"):
        for split in ("train", "val"):
            if not (Path(args.data) / split).is_dir():
                raise UserError(f"--data {args.data} must hold the ImageFolders train/ and val/ ({split}/ is missing)")


# ----------------------------------------------------------------------------------------------
# Distributed helpers. The RANK variable (set by torchrun) switches DDP on, as in nanoGPT.
# ----------------------------------------------------------------------------------------------


class GatherWithGrad(torch.autograd.Function):
    """All ranks' embeddings, [k, ...] -> [k * world, ...], in rank order, with gradients.

    Every rank's loss uses every rank's embeddings as negatives, so the gradient of the embeddings
    this rank produced is the sum of the gradients all ranks' losses send them: backward sums over
    ranks (all-reduce) and keeps this rank's slice. With DDP's gradient averaging on top, this is
    exactly the gradient of the single-process, full-batch loss.
    """

    @staticmethod
    def forward(ctx, z):
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, z.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def contrastive_loss(model, views, objective, temperature):
    """The loss of this rank's anchors, views [k, M, C, H, W], against the views of all ranks."""
    z = model(views)                                                  # [k, M, D]
    rank, k = 0, len(views)
    if dist.is_initialized():
        rank = dist.get_rank()
        z = GatherWithGrad.apply(z)                                   # [K, M, D], K = k * world
    return objective(z, temperature, anchors=slice(rank * k, (rank + 1) * k))


# ----------------------------------------------------------------------------------------------
# Data and views
# ----------------------------------------------------------------------------------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, applied inside the model


def random_crop_and_flip(size):
    """The part of SimCLR's views drawn on the CPU, per view, on uint8 images: a random-resized
    crop (area 0.08-1 of the image, aspect 3/4-4/3) to size x size, and a horizontal flip (p = 0.5).
    The colour transforms follow on the device, batched: see `device_augment`."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToImage()])


def centre_crop(size, small_images):
    """The probe's view: resize the short side to 8/7 of the crop (small images: to the crop) and
    take the centre, uint8."""
    resize = v2.Resize(size if small_images else size * 8 // 7, antialias=True)
    return v2.Compose([resize, v2.CenterCrop(size), v2.ToImage()])


class MultiView(torch.utils.data.Dataset):
    """Item i: (views [M, C, H, W] uint8, label), M independent crops of one decoded image.

    An image that cannot be decoded is skipped with a warning naming its file (the next one
    stands in for it), so that one bad file cannot stop a run of days."""

    def __init__(self, dataset, transform, num_views):
        self.dataset, self.transform, self.num_views = dataset, transform, num_views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for i in range(index, index + len(self.dataset)):
            try:
                image, label = self.dataset[i % len(self.dataset)]  # decoded once ...
                break
            except OSError as error:
                name = self.dataset.samples[i % len(self.dataset)][0] if hasattr(self.dataset, "samples") else i
                warnings.warn(f"skipping undecodable image {name}: {error}")
        return torch.stack([self.transform(image) for _ in range(self.num_views)]), label  # ... M views


# The colour half of SimCLR's views runs on the device, on the whole batch of views at once, with
# its own random parameters for every view: on the CPU it cost about ten times the decode (see
# --benchmark). Images are float [N, 3, H, W] in [0, 1]; a per-view parameter is a tensor [N].
# Random draws stay on the device and torch.where replaces branches: nothing waits for the GPU.
# Each op equals torchvision.transforms.v2.functional's on float images (tested).


def luma(images):
    """ITU-R 601-2 luma Y = 0.2989 R + 0.587 G + 0.114 B: [N, 3, H, W] -> [N, 1, H, W]."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_colour(images, op, factor):
    """Brightness (op 0), contrast (1) or saturation (2), chosen per view by op [N], with factor
    [N]. Each is a blend x -> clamp(f x + (1 - f) y, 0, 1) with its own y: black, the image's mean
    luma, or its luma image. A factor of 1 leaves the view exactly as it was."""
    y = luma(images)                                                    # [N, 1, H, W]
    mean = y.mean(dim=(1, 2, 3), keepdim=True)                          # [N, 1, 1, 1]
    op, factor = op.view(-1, 1, 1, 1), factor.view(-1, 1, 1, 1)
    y = torch.where(op == 0, 0.0, torch.where(op == 1, mean, y))
    return (factor * images + (1 - factor) * y).clamp(0, 1)


def adjust_hue(images, shift):
    """Rotate the hue by shift [N] (in turns): RGB -> HSV, h -> (h + shift) mod 1, HSV -> RGB."""
    r, g, b = images.unbind(dim=1)
    v = images.amax(dim=1)                                              # [N, H, W]
    chroma = v - images.amin(dim=1)
    s = chroma / torch.where(v > 0, v, 1.0)                             # black: s = 0, not 0 / 0
    c = torch.where(chroma > 0, chroma, 1.0)                            # grey: any finite hue will do
    # The largest channel picks the sector of the colour wheel (ties: r, then g, as in PIL).
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2 + (b - r) / c, 4 + (r - g) / c)) / 6
    h = (h + shift.view(-1, 1, 1)) % 1.0
    # Back to RGB: channel n = 5, 3, 1 (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    n = torch.arange(5.0, 0.0, -2.0, device=images.device).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6                                    # [N, 3, H, W]
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)


def colour_jitter(images, strength, p=0.8):
    """SimCLR's RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p = 0.8), drawn per view:
    brightness, contrast and saturation factors ~ U[max(0, 1 - 0.8s), 1 + 0.8s], a hue shift
    ~ U[-0.2s, 0.2s], the four ops in a random order per view (as torchvision draws a randperm)."""
    n, device = len(images), images.device
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    factors = low + (high - low) * torch.rand(n, 4, device=device)      # [N, 4]; column 3 unused
    shift = 0.2 * strength * (2 * torch.rand(n, device=device) - 1)     # [N]
    op_at = torch.rand(n, 4, device=device).argsort(dim=1)              # [N, 4]: a permutation per view
    factor_at = factors.gather(1, op_at)                                # [N, 4]: the factor at each step
    hue_at = op_at.argmax(dim=1)                                        # [N]: the step where op 3, hue, runs
    # Hue, an HSV round trip, is the costly op: run it once for all views, between the blends each
    # view orders before it and those it orders after it (a factor of 1 skips a step).
    out = images
    for step in range(3):
        out = adjust_colour(out, op_at[:, step], torch.where(step < hue_at, factor_at[:, step], 1.0))
    out = adjust_hue(out, shift)
    for step in range(1, 4):
        out = adjust_colour(out, op_at[:, step], torch.where(step > hue_at, factor_at[:, step], 1.0))
    chosen = torch.rand(n, device=device) < p                           # [N]
    return torch.where(chosen.view(-1, 1, 1, 1), out, images)


def random_grayscale(images, p=0.2):
    """SimCLR's RandomGrayscale(p = 0.2): each view becomes its luma, on all 3 channels."""
    chosen = torch.rand(len(images), device=images.device) < p
    return torch.where(chosen.view(-1, 1, 1, 1), luma(images).expand_as(images), images)


def gaussian_blur(images, kernel_size, sigma):
    """Blur each view with its own sigma [N], reflect padding at the borders. The kernel
    w(x) = exp(-x^2 / (2 sigma^2)) / sum, x = -(k-1)/2 .. (k-1)/2, is separable: a horizontal then
    a vertical pass, 2k taps per pixel instead of k^2."""
    n, c, height, width = images.shape
    x = torch.arange(kernel_size, device=images.device) - (kernel_size - 1) / 2      # [k]
    kernel = torch.exp(-x**2 / (2 * sigma.float().view(-1, 1) ** 2))                # [N, k]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*3, k]
    pad = kernel_size // 2
    # Views x channels become the channels of one image: groups = N*3 gives each its own kernel.
    out = F.pad(images.reshape(1, n * c, height, width), [pad] * 4, mode="reflect")
    with torch.autocast(images.device.type, enabled=False):  # stay in float32 under autocast
        out = F.conv2d(out, kernel.view(n * c, 1, 1, -1), groups=n * c)  # [1, N*3, H + 2 pad, W]
        out = F.conv2d(out, kernel.view(n * c, 1, -1, 1), groups=n * c)  # [1, N*3, H, W]
    return out.view(n, c, height, width)


def random_blur(images, kernel_size, p=0.5):
    """SimCLR's RandomApply([GaussianBlur(k, sigma ~ U[0.1, 2])], p = 0.5), drawn per view."""
    sigma = 0.1 + 1.9 * torch.rand(len(images), device=images.device)
    chosen = torch.rand(len(images), device=images.device) < p
    return torch.where(chosen.view(-1, 1, 1, 1), gaussian_blur(images, kernel_size, sigma), images)


def device_augment(views, small_images):
    """uint8 views [k, M, 3, H, W], cropped and flipped on the CPU -> float [k, M, 3, H, W] in
    [0, 1]: colour jitter (strength s = 1, or 0.5 on small images such as CIFAR), grayscale, and
    Gaussian blur with a kernel of about 10% of the side (not on small images), in SimCLR's order."""
    x = views.flatten(0, 1).float() / 255                                # [k*M, 3, H, W]
    x = random_grayscale(colour_jitter(x, strength=0.5 if small_images else 1.0))
    if not small_images:
        x = random_blur(x, kernel_size=int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    return x.view(views.shape)


def make_datasets(args):
    """(pre-training set of M-view items, probe train set, probe val set of centre crops)."""
    decode = v2.ToImage()  # once per image: PIL -> uint8 [3, H, W], which crops twice as fast as PIL
    if args.dataset in ("imagenet", "folder"):
        train = torchvision.datasets.ImageFolder(Path(args.data) / "train", decode)
        val = torchvision.datasets.ImageFolder(Path(args.data) / "val", decode)
    elif args.dataset == "fake":
        shape = (3, args.image_size, args.image_size)
        train = torchvision.datasets.FakeData(50 * args.batch_size, shape, 10, decode)
        val = torchvision.datasets.FakeData(10 * args.batch_size, shape, 10, decode, random_offset=10**6)
    else:
        cifar = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
        train = cifar(args.data, train=True, transform=decode, download=True)
        val = cifar(args.data, train=False, transform=decode, download=True)
    views = random_crop_and_flip(args.image_size)
    crop = centre_crop(args.image_size, args.small_images)
    return MultiView(train, views, args.views), MultiView(train, crop, 1), MultiView(val, crop, 1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class PolyViewNet(nn.Module):
    """Images in [0, 1], normalised by ImageNet's mean and std, into a torchvision ResNet without
    its classifier (the features), then SimCLR's projector Linear(F, 2048) - BN - ReLU -
    Linear(2048, 128) (the embeddings z the objectives see)."""

    def __init__(self, arch="resnet50", small_images=False, dim=128):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)()
        if small_images:  # 32x32 inputs: keep the resolution, as in SimCLR's CIFAR models
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.backbone.maxpool = nn.Identity()
        self.feature_dim = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(self.feature_dim, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True), nn.Linear(2048, dim)
        )
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images):
        """[N, 3, H, W] in [0, 1] -> [N, F]: what the linear probe sees."""
        return self.backbone((images - self.mean) / self.std)

    def forward(self, views):
        k, M = views.shape[:2]
        features = self.features(views.flatten(0, 1))                  # [k*M, F]
        return self.projector(features).view(k, M, -1)                # [k, M, D]


def mixed_precision(device):
    """bf16 autocast on CUDA (no loss scaling needed: bf16 has float32's range); float32 on the CPU."""
    return torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------------------------
# Objectives
#
# Every function takes z of shape [K, M, D]: K unique samples, M views each, D embedding dims,
# and returns the mean loss over the anchors (i, a). `anchors` is an optional slice of sample
# indices: only those samples' views act as anchors, but they are contrasted against all of z.
# This is how one process of many computes its share of the loss against a gathered batch.
#
# Each function repeats the same short prologue (checks, normalisation, one similarity product)
# on purpose: every objective depends on torch alone and can be copied out of this file by itself.
# The positives s(ia, ib) come from a second, tiny product of each sample's own views, [A, M, M]:
# reading them out of the big matrix would send a full-size gradient back through it.
# ----------------------------------------------------------------------------------------------


def simclr_loss(z, temperature, anchors=None):
    """SimCLR's NT-Xent (Chen et al., 2020) for M = 2 views: z is [K, 2, D].

    Each anchor view's positive is the other view of its sample; its candidates are all 2K - 1
    other views in the batch:

        l[i,a] = -s(ia, ib) + log sum_{(j,g) != (i,a)} exp s(ia, jg),   b = 1 - a,
        s(ia, jg) = <z[i,a], z[j,g]> / tau,                              L = mean over i, a.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M != 2:
        raise ValueError(f"simclr needs K >= 2 samples and exactly M = 2 views, got K={K}, M={M}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    z = F.normalize(z, dim=-1).flatten(0, 1)                            # [K*2, D], view a of i at 2i + a
    own = torch.arange(2 * anchors.start, 2 * anchors.stop, device=z.device)  # [A*2] anchors' columns
    logits = (z[own] / temperature) @ z.T                                # [A*2, K*2]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    columns = torch.arange(2 * K, device=z.device)
    logits.masked_fill_(columns == own[:, None], float("-inf"))          # a view is not its own candidate
    return F.cross_entropy(logits, own ^ 1)                              # the positive is 2i + (1 - a)


def multicrop_loss(z, temperature, anchors=None):
    """Multi-Crop (Caron et al., 2020): SimCLR averaged over the ordered view pairs (a, b), a != b.

    The pair term only sees views a and b of the other samples, 2(K - 1) negatives whatever M is:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i} [exp s(ia, ja) + exp s(ia, jb)] ),
        L = mean over i, a, b != a.
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    ids = torch.arange(anchors.start, anchors.stop, device=z.device)     # [A] anchor sample ids
    z = F.normalize(z, dim=-1)
    scaled = z[ids] / temperature                                        # [A, M, D]
    sim = (scaled.flatten(0, 1) @ z.flatten(0, 1).T).view(len(ids), M, K, M)  # [A, M, K, M] = s(ia, jg)
    positives = torch.einsum("iad,ibd->iab", scaled, z[ids])             # [A, M, M] = s(ia, ib)
    # 0 on the other samples, -inf on the anchor's own: its views are never its negatives. (Adding
    # it also lifts low-precision logits to float32.)
    others = torch.where(ids[:, None] == torch.arange(K, device=z.device), float("-inf"), 0.0)  # [A, K]
    # log sum_{j != i} exp s(ia, jg), for every anchor view a and every view g of the others
    per_view = (sim + others[:, None, :, None]).logsumexp(dim=2)          # [A, M, M]
    own_view = per_view.diagonal(dim1=1, dim2=2)[:, :, None].expand_as(per_view)      # g = a
    log_denominator = torch.stack([positives, own_view, per_view]).logsumexp(dim=0)   # [A, M, M]
    losses = (log_denominator - positives).masked_fill(torch.eye(M, dtype=torch.bool, device=z.device), 0.0)
    return losses.sum() / (len(ids) * M * (M - 1))                       # mean over i, a, b != a


def geometric_loss(z, temperature, anchors=None):
    """Geometric PVC (Shidani et al., 2024): minus the log of the geometric mean of the M - 1
    per-positive probabilities of each anchor.

    Every anchor (i, a) shares one set of negatives, all views of all other samples:

        N[i,a]   = sum_{j != i} sum_g exp s(ia, jg)                      (M(K - 1) terms)
        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + N[i,a] ),            p[i,a,b] = exp(-l[i,a,b])
        L        = mean over i, a, b != a of l[i,a,b].
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    ids = torch.arange(anchors.start, anchors.stop, device=z.device)     # [A] anchor sample ids
    z = F.normalize(z, dim=-1)
    scaled = z[ids] / temperature                                        # [A, M, D]
    sim = (scaled.flatten(0, 1) @ z.flatten(0, 1).T).view(len(ids), M, K, M)  # [A, M, K, M] = s(ia, jg)
    positives = torch.einsum("iad,ibd->iab", scaled, z[ids])             # [A, M, M] = s(ia, ib)
    # 0 on the other samples, -inf on the anchor's own: its views are never its negatives. (Adding
    # it also lifts low-precision logits to float32.)
    others = torch.where(ids[:, None] == torch.arange(K, device=z.device), float("-inf"), 0.0)  # [A, K]
    log_negatives = (sim + others[:, None, :, None]).logsumexp(dim=(2, 3))  # [A, M] = log N[i,a]
    losses = torch.logaddexp(positives, log_negatives[:, :, None]) - positives  # [A, M, M] = l[i,a,b]
    losses = losses.masked_fill(torch.eye(M, dtype=torch.bool, device=z.device), 0.0)
    return losses.sum() / (len(ids) * M * (M - 1))                       # mean over i, a, b != a


def arithmetic_loss(z, temperature, anchors=None):
    """Arithmetic PVC (Shidani et al., 2024): minus the log of the arithmetic mean of the M - 1
    per-positive probabilities of each anchor. With l, p and N[i,a] as in `geometric_loss`:

        L = mean over i, a of -log( 1/(M-1) sum_{b != a} p[i,a,b] )
          = mean over i, a of  log(M - 1) - logsumexp_{b != a} ( -l[i,a,b] ).

    By AM >= GM it is never above the Geometric loss; the two agree at M = 2.
    """
    # A deliberate reading: copies of the paper's pseudo-code write this branch as
    # logsumexp(losses) - log(k), a soft-max over pair losses. We follow the objective's name and
    # the AM >= GM ordering against Geometric PVC: -log of the arithmetic mean of the p[i,a,b].
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    ids = torch.arange(anchors.start, anchors.stop, device=z.device)     # [A] anchor sample ids
    z = F.normalize(z, dim=-1)
    scaled = z[ids] / temperature                                        # [A, M, D]
    sim = (scaled.flatten(0, 1) @ z.flatten(0, 1).T).view(len(ids), M, K, M)  # [A, M, K, M] = s(ia, jg)
    positives = torch.einsum("iad,ibd->iab", scaled, z[ids])             # [A, M, M] = s(ia, ib)
    # 0 on the other samples, -inf on the anchor's own: its views are never its negatives. (Adding
    # it also lifts low-precision logits to float32.)
    others = torch.where(ids[:, None] == torch.arange(K, device=z.device), float("-inf"), 0.0)  # [A, K]
    log_negatives = (sim + others[:, None, :, None]).logsumexp(dim=(2, 3))  # [A, M] = log N[i,a]
    log_p = positives - torch.logaddexp(positives, log_negatives[:, :, None])  # [A, M, M] = -l[i,a,b]
    log_p = log_p.masked_fill(torch.eye(M, dtype=torch.bool, device=z.device), float("-inf"))
    return (math.log(M - 1) - log_p.logsumexp(dim=2)).mean()


def suffstats_loss(z, temperature, anchors=None):
    """Sufficient Statistics (Shidani et al., 2024): one positive per anchor, the re-normalised
    mean of the anchor's other views, contrasted against the same negatives N[i,a] as PVC:

        t[i,a] = normalise( sum_{b != a} z[i,b] ),        u[i,a] = <z[i,a], t[i,a]> / tau,
        L      = mean over i, a of -u[i,a] + log( exp u[i,a] + N[i,a] ).

    At M = 2, t[i,a] is the other view and this is SimCLR.
    """
    # A deliberate reading: the mean of the other views is the sufficient statistic of the
    # rest-set (the exponential-family argument); contrasting it against the PVC negatives makes
    # this objective exactly SimCLR at M = 2.
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    ids = torch.arange(anchors.start, anchors.stop, device=z.device)     # [A] anchor sample ids
    z = F.normalize(z, dim=-1)
    scaled = z[ids] / temperature                                        # [A, M, D]
    sim = (scaled.flatten(0, 1) @ z.flatten(0, 1).T).view(len(ids), M, K, M)  # [A, M, K, M] = s(ia, jg)
    # 0 on the other samples, -inf on the anchor's own: its views are never its negatives. (Adding
    # it also lifts low-precision logits to float32.)
    others = torch.where(ids[:, None] == torch.arange(K, device=z.device), float("-inf"), 0.0)  # [A, K]
    log_negatives = (sim + others[:, None, :, None]).logsumexp(dim=(2, 3))  # [A, M] = log N[i,a]
    rest = F.normalize(z[ids].sum(dim=1, keepdim=True) - z[ids], dim=-1)  # [A, M, D] = t[i,a]
    u = (scaled * rest).sum(dim=-1)                                      # [A, M] = u[i,a]
    return (torch.logaddexp(u, log_negatives) - u).mean()


LOSSES = {
    "simclr": simclr_loss,
    "multicrop": multicrop_loss,
    "geometric": geometric_loss,
    "arithmetic": arithmetic_loss,
    "suffstats": suffstats_loss,
}


# ----------------------------------------------------------------------------------------------
# Optimiser and schedule
# ----------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each weight's step scaled by its layer's trust ratio (You et al., 2017):

        g = grad + weight_decay * w,     g <- trust_coefficient * ||w|| / ||g|| * g,
        v <- momentum * v + g,           w <- w - lr * v.

    As in SimCLR, biases and BatchNorm parameters (the 1-D ones) get neither decay nor adaptation.
    """

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in group["params"]:
                if w.grad is None:
                    continue
                g = w.grad
                if w.ndim > 1:
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["trust_coefficient"] * w_norm / g_norm, 1.0)
                    g = g.mul(trust)
                if "velocity" not in self.state[w]:
                    self.state[w]["velocity"] = torch.zeros_like(w)
                velocity = self.state[w]["velocity"].mul_(group["momentum"]).add_(g)
                w.add_(velocity, alpha=-group["lr"])


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to the peak over warmup_steps, then cosine decay to 0 at total_steps:

        lr(t) = peak * (t + 1) / W                                  for t < W,
        lr(t) = peak * (1 + cos(pi * (t - W) / (T - W))) / 2        after.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


# ----------------------------------------------------------------------------------------------
# Linear probe: frozen backbone, features of centre crops, a linear classifier and a k-NN on top
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(model, loader, device):
    """(features [N, F] in float32, labels [N]) of a loader of single centre crops, in eval mode."""
    model.eval()
    features, labels = [], []
    for views, label in loader:                                       # views [B, 1, C, H, W] uint8
        images = views.flatten(0, 1).to(device, non_blocking=True).float() / 255
        with mixed_precision(device):
            features.append(model.features(images).float())
        labels.append(label.to(device))
    return torch.cat(features), torch.cat(labels)


def linear_probe(model, train_loader, val_loader, epochs, device):
    """Top-1 and top-5 of a linear classifier on frozen features, and k-NN top-1 (k = 20, cosine
    similarity, votes weighted by exp(similarity / 0.07) as in Wu et al., 2018), in percent."""
    before = [t.clone() for t in model.backbone.state_dict().values()]
    train_x, train_y = extract_features(model, train_loader, device)
    val_x, val_y = extract_features(model, val_loader, device)
    if not all(torch.equal(a, b) for a, b in zip(before, model.backbone.state_dict().values())):
        raise RuntimeError("the backbone changed during feature extraction: the probe would not be frozen")
    classes = int(max(train_y.max(), val_y.max())) + 1

    # k-NN: each val image votes with its 20 most similar train images.
    bank, votes = F.normalize(train_x, dim=1), []
    for chunk in F.normalize(val_x, dim=1).split(256):
        similarity, index = (chunk @ bank.T).topk(min(20, len(bank)), dim=1)     # [B, 20]
        scores = torch.zeros(len(chunk), classes, device=device)
        votes.append(scores.scatter_add_(1, train_y[index], (similarity / 0.07).exp()).argmax(1))
    knn_top1 = (torch.cat(votes) == val_y).float().mean().item() * 100

    # Linear classifier on standardised features (a BatchNorm without affine, frozen at the end).
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    classifier = nn.Linear(train_x.shape[1], classes).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = epochs * math.ceil(len(train_x) / 1024)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x), device=device).split(1024):
            loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        top5 = classifier(val_x).topk(min(5, classes), dim=1).indices                # [N, 5]
    hits = top5 == val_y[:, None]
    return {"top1": hits[:, 0].float().mean().item() * 100, "top5": hits.any(1).float().mean().item() * 100,
            "knn_top1": knn_top1}


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

MUST_MATCH_ON_RESUME = ("arch", "loss", "views", "batch_size", "dataset", "image_size")


def save_checkpoint(state, path):
    """Write to a temporary file, then rename it over the old one: a crash while writing leaves
    the previous checkpoint whole (a rename within one folder is atomic)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        torch.save(state, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path, args):
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
    for key in MUST_MATCH_ON_RESUME:
        if checkpoint["args"][key] != getattr(args, key):
            raise UserError(f"{path} was trained with --{key.replace('_', '-')} {checkpoint['args'][key]}, "
                            f"this run asks for --{key.replace('_', '-')} {getattr(args, key)}")
    return checkpoint


def log_window(window, step, epoch, lr, seconds, data_seconds, args, world_size, steps_left, out):
    """The log record of the steps since the last one, with losses averaged over ranks; a
    non-finite loss on any rank stops every rank, naming the step."""
    losses = torch.stack(window).float()                              # [steps in the window]
    if world_size > 1:
        dist.all_reduce(losses)
        losses /= world_size
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):  # the weights are already poisoned: stop, and keep the last checkpoint as it is
        raise UserError(f"loss is {losses[bad[0, 0]].item()} at step {step - len(window) + int(bad[0, 0]) + 1} "
                        f"(epoch {epoch}); stopping, the last good checkpoint is {out / 'checkpoint.pt'}")
    record = {"step": step, "epoch": epoch, "loss": losses.mean().item(), "lr": lr,
              "views_per_s": len(window) * args.batch_size * args.views / seconds, "data_wait": data_seconds / seconds,
              "eta_s": steps_left * seconds / len(window)}
    return record


def build_model(args, device, distributed, lr, checkpoint=None):
    """(the model to call, the plain module the checkpoints and the probe use, its LARS)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = PolyViewNet(args.arch, args.small_images)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    if distributed and device.type == "cuda":
        # The M views of an image share a GPU, so per-GPU batch statistics would leak which views
        # belong together; synchronised BN computes them over the whole global batch instead.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    optimizer = LARS(model.parameters(), lr=lr, weight_decay=args.weight_decay)  # state on the device
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    raw_model = model
    if args.compile:
        model.backbone.compile()  # in place: the state_dict keys stay the same
    if distributed:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model, raw_model, optimizer


def train_step(model, optimizer, views, args, device):
    """One step on this rank's uint8 crops [k, M, C, H, W]; returns the loss, still on the device
    (no host sync: losses are read once per log line)."""
    views = device_augment(views.to(device, non_blocking=True), args.small_images)
    with mixed_precision(device):
        loss = contrastive_loss(model, views, LOSSES[args.loss], args.temperature)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train(args):
    distributed = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0  # rank 0 alone prints and writes files
    check_args(args, world_size)
    out, device = Path(args.out), torch.device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = None
    if checkpoint_path.exists():
        if not args.resume:
            raise UserError(f"{checkpoint_path} exists: add --resume to continue it, or choose another --out")
        checkpoint = load_checkpoint(checkpoint_path, args)
    if master:
        out.mkdir(parents=True, exist_ok=True)

    pretrain_set, probe_train_set, probe_val_set = make_datasets(args)
    local_batch = args.batch_size // world_size
    sampler = torch.utils.data.DistributedSampler(pretrain_set, world_size, rank, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(pretrain_set, local_batch, sampler=sampler, num_workers=args.workers,
                                         pin_memory=device.type == "cuda", drop_last=True)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise UserError(f"{len(pretrain_set)} images make no full batch of {args.batch_size} (per process: {local_batch})")
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(min(args.warmup_epochs, args.epochs / 10) * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256

    model, raw_model, optimizer = build_model(args, device, distributed, peak_lr, checkpoint)
    start_epoch = step = 0
    if checkpoint is not None:
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        if master:
            print(f"resuming {checkpoint_path} at epoch {start_epoch}, step {step}")
            if (out / "metrics.jsonl").exists():  # drop what the crashed run logged after its checkpoint
                lines = (out / "metrics.jsonl").read_text().splitlines()
                kept = [line + "\n" for line in lines if json.loads(line)["step"] <= step]
                (out / "metrics.jsonl").write_text("".join(kept))
    if master:
        params = sum(p.numel() for p in raw_model.parameters()) / 1e6
        print(f"{args.loss}: K={args.batch_size} images x M={args.views} views per step on {world_size} x {device.type}, "
              f"{args.arch} ({params:.1f}M parameters), {steps_per_epoch} steps/epoch, peak lr {peak_lr:.3g}")

    for epoch in range(start_epoch, args.epochs):
        model.train()
        sampler.set_epoch(epoch)
        # Seeding each epoch by (seed, rank, epoch) makes its views the same whether or not the run
        # was resumed, with or without worker processes (they draw their seeds from this RNG).
        torch.manual_seed(args.seed + rank + world_size * (epoch + 1))
        window, tick, data_seconds = [], time.perf_counter(), 0.0
        loading = time.perf_counter()
        for views, _ in loader:                                      # [K / world, M, C, H, W]
            data_seconds += time.perf_counter() - loading
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            window.append(train_step(model, optimizer, views, args, device))
            step += 1
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                seconds = time.perf_counter() - tick
                record = log_window(window, step, epoch, lr, seconds, data_seconds, args, world_size,
                                    total_steps - step, out)
                if master:
                    print(f"epoch {epoch} step {step}/{total_steps} loss {record['loss']:.4f} lr {lr:.3g} "
                          f"{record['views_per_s']:.0f} views/s data {record['data_wait']:.0%} "
                          f"eta {record['eta_s'] / 60:.1f} min", flush=True)
                    with open(out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                window, tick, data_seconds = [], time.perf_counter(), 0.0
            loading = time.perf_counter()
        if master:
            save_checkpoint({"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                             "epoch": epoch + 1, "step": step, "args": vars(args)}, checkpoint_path)

    if distributed:
        dist.destroy_process_group()
    if not master:
        return
    if (out / "metrics.jsonl").exists():
        plot_loss(out)
    if args.probe_epochs > 0:  # rank 0 alone, after the other ranks have left
        probe_loaders = [torch.utils.data.DataLoader(s, 256, num_workers=args.workers) for s in (probe_train_set, probe_val_set)]
        result = linear_probe(raw_model, *probe_loaders, args.probe_epochs, device)
        print(f"linear probe: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  k-NN top-1 {result['knn_top1']:.2f}%")
        (out / "probe.json").write_text(json.dumps(result) + "\n")


def plot_loss(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records])
    ax.set(xlabel="step", ylabel="loss", title="pre-training loss")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Benchmarks
# ----------------------------------------------------------------------------------------------


def measure(functions, repeats, device):
    """Seconds of the fastest of `repeats` calls of each function, after a warm-up call each. The
    functions take turns, so that a slow spell of the machine falls on all of them alike."""
    times = [float("inf")] * len(functions)
    for attempt in range(repeats + 1):
        for n, fn in enumerate(functions):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if attempt > 0:
                times[n] = min(times[n], time.perf_counter() - start)
    return times


def bench_loss(device, repeats=20):
    """Forward + backward of each objective against a plain cross-entropy over one [KM, KM]
    similarity matrix (the floor any of them can reach), and against the naive loops of
    test_polyview.py where those finish in seconds (K * M <= 256). Memory: peak allocated on CUDA; on
    the CPU, the bytes the objective saves for its backward pass."""
    try:
        from test_polyview import naive_loss
    except ImportError:
        naive_loss = None

    def cross_entropy(z, temperature):
        x = F.normalize(z.flatten(0, 1), dim=-1)
        logits = ((x / temperature) @ x.T).fill_diagonal_(float("-inf"))
        targets = torch.arange(len(x), device=x.device) ^ 1       # any fixed positive per row
        return F.cross_entropy(logits, targets)

    def cost(fn, z):
        """(seconds of fn, seconds of the plain cross-entropy timed in turn with it, MiB)."""
        seconds, floor = measure([lambda: fn(z, 0.1).backward(), lambda: cross_entropy(z, 0.1).backward()],
                                 repeats, device)
        saved = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(z, 0.1).backward()
            return seconds, floor, (torch.cuda.max_memory_allocated() - base) / 2**20
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            fn(z, 0.1)
        return seconds, floor, sum(saved) / 2**20

    print(f"{'K':>4} {'M':>2} {'objective':>10} {'ms':>8} {'x CE':>6} {'MiB':>8} {'loop ms':>9}   (D = 128, {device.type})")
    for K in (64, 256):
        for M in (2, 4, 8):
            z = torch.randn(K, M, 128, device=device, requires_grad=True)
            seconds, _, mib = cost(cross_entropy, z)
            print(f"{K:4} {M:2} {'plain CE':>10} {seconds * 1e3:8.2f} {1:6.2f} {mib:8.1f}")
            for name, fn in LOSSES.items():
                if name == "simclr" and M != 2:
                    continue
                seconds, floor, mib = cost(fn, z)
                loop = "-"
                if naive_loss is not None and K * M <= 256:
                    z64 = z.detach().double().requires_grad_()
                    loop = f"{measure([lambda: naive_loss(name, z64, 0.1).backward()], 1, device)[0] * 1e3:9.0f}"
                print(f"{K:4} {M:2} {name:>10} {seconds * 1e3:8.2f} {seconds / floor:6.2f} {mib:8.1f} {loop:>9}")


class DecodePerView(MultiView):
    """The naive data path, for the benchmark only: the file is read and decoded again per view."""

    def __getitem__(self, index):
        decoded = [self.dataset[index] for _ in range(self.num_views)]  # (image, label), M times
        return torch.stack([self.transform(image) for image, _ in decoded]), decoded[0][1]


def make_jpeg_folder(root, count=32):
    """count ImageNet-sized (500x375) JPEGs of smooth colour fields and noise, in one class."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for n in range(count):
        field = torch.rand(3, 4, 4).repeat_interleave(94, 1).repeat_interleave(125, 2)[:, :375, :500]
        image = (field * 200 + torch.rand(3, 375, 500) * 55).to(torch.uint8)
        torchvision.io.write_jpeg(image, str(root / "images" / f"{n}.jpg"), quality=90)
    return root


def benchmark(args):
    """Views/s of the whole training step, of the step on a batch already on the device, and of
    the backbone alone (forward + backward of random tensors, same precision and memory format);
    the shares of the objective and of the device augmentation in the step; then views/s per
    data-loading worker on ImageNet-sized JPEGs, decoding once per image against once per view,
    and the cost per view of each transform, on the CPU and batched on the device."""
    import tempfile

    device, cpu = torch.device(args.device), torch.device("cpu")
    check_args(args, 1)
    steps = 20 if device.type == "cuda" else 3
    model, _, optimizer = build_model(args, device, False, lr=1e-4)
    loader = torch.utils.data.DataLoader(make_datasets(args)[0], args.batch_size, shuffle=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True)
    views_per_step = args.batch_size * args.views
    if len(loader) < steps + 2:
        raise UserError(f"the benchmark needs {steps + 2} batches, --dataset {args.dataset} has {len(loader)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    batches, waiting = iter(loader), 0.0
    for _ in range(2):  # warm-up (and compilation)
        train_step(model, optimizer, next(batches)[0], args, device)
    start = time.perf_counter()
    for _ in range(steps):
        tick = time.perf_counter()
        views = next(batches)[0]
        waiting += time.perf_counter() - tick
        loss = train_step(model, optimizer, views, args, device)
    loss.item()  # wait for the device
    full = time.perf_counter() - start
    views = views.to(device)
    z = torch.randn(args.batch_size, args.views, 128, device=device, requires_grad=True)
    images = torch.randn(views_per_step, 3, args.image_size, args.image_size, device=device)
    images = images.contiguous(memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)

    def backbone_step():
        with mixed_precision(device):
            model.backbone(images).float().mean().backward()

    step, alone, augment, objective = measure([
        lambda: train_step(model, optimizer, views, args, device), backbone_step,
        lambda: device_augment(views, args.small_images), lambda: LOSSES[args.loss](z, args.temperature).backward(),
    ], steps, device)
    print(f"{args.arch} at {args.image_size}px, K={args.batch_size} x M={args.views} = {views_per_step} views/step, "
          f"{args.loss}, {device.type}{' + compile' if args.compile else ''}, {args.workers} workers")
    print(f"  training step, data included   {views_per_step * steps / full:9.1f} views/s  (waiting for data {waiting / full:.0%})")
    print(f"  training step, batch on device {views_per_step / step:9.1f} views/s")
    print(f"  backbone alone (fwd + bwd)     {views_per_step / alone:9.1f} views/s")
    print(f"  step / backbone alone          {alone / step:9.2f}  (data included: {alone * steps / full:.2f})")
    print(f"  objective share of the step    {objective / step:9.1%}   device augmentation share {augment / step:.1%}")
    if device.type == "cuda":
        print(f"  peak memory                    {torch.cuda.max_memory_allocated() / 2**30:9.1f} GiB")

    with tempfile.TemporaryDirectory() as folder:
        jpegs = torchvision.datasets.ImageFolder(make_jpeg_folder(Path(folder)), v2.ToImage())
        crop = random_crop_and_flip(224)
        print("data path, one worker, 500x375 JPEGs to 224px crops:")
        for num_views in (2, 8):
            for name, kind in (("decode once per image", MultiView), ("decode once per view ", DecodePerView)):
                dataset = kind(jpegs, crop, num_views)
                seconds = measure([lambda: [dataset[i] for i in range(len(dataset))]], 1, cpu)[0]
                print(f"  M={num_views} {name} {len(dataset) * num_views / seconds:7.1f} views/s")
        decoded = jpegs[0][0]
        image = v2.functional.to_pil_image(v2.functional.center_crop(decoded, 224))  # torchvision's colour ops run on PIL
        batch = v2.functional.center_crop(decoded, 224).to(device).float().div(255).expand(64, 3, 224, 224)
        rows = [("decode", lambda: jpegs[0], None),
                ("crop + flip", lambda: crop(decoded), None),
                ("colour jitter", lambda: v2.ColorJitter(0.8, 0.8, 0.8, 0.2)(image), lambda: colour_jitter(batch, 1.0, p=1)),
                ("grayscale", lambda: v2.Grayscale(3)(image), lambda: random_grayscale(batch, p=1)),
                ("blur (k = 23)", lambda: v2.GaussianBlur(23, (0.1, 2.0))(image), lambda: random_blur(batch, 23, p=1))]
        print(f"  ms per view:      torchvision on the CPU   batched on {device.type}")
        for name, on_cpu, batched in rows:
            line = f"    {name:<14} {measure([on_cpu], 10, cpu)[0] * 1e3:12.2f}"
            print(line + (f" {measure([batched], 5, device)[0] * 1e3 / len(batch):20.2f}" if batched else ""))


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}, but no GPU is visible (use --device cpu)")
        if args.bench_loss:
            bench_loss(torch.device(args.device))
        elif args.benchmark:
            benchmark(args)
        else:
            train(args)
    except UserError as error:
        print(f"polyview.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
