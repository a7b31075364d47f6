"""Poly-view contrastive learning (Shidani et al., ICLR 2024, arXiv 2403.05490), in one file.

SimCLR learns an image encoder by matching two augmented views of each image against the views of the other images
in the batch. Poly-view contrastive learning draws M > 2 views of each of K images and matches every view against all
the others at once. Its objectives (Geometric and Arithmetic PVC, Sufficient Statistics) come from maximising the
One-vs-Rest mutual information between a view and the other M - 1 views of its image. The paper's headline: 128
epochs at batch 256 with M = 8 views beat SimCLR at 1024 epochs and batch 4096 on ImageNet-1k.

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --loss suffstats  # the paper's run
    python polyview.py --data /path/to/imagenet --loss suffstats --batch-size 128      # one 80 GB GPU
    python polyview.py --dataset cifar10 --arch resnet18                               # CIFAR-10
    python polyview.py --dataset fake --benchmark          # views/s, shares of the step, memory per view

The file reads top to bottom: the objectives (the paper's contribution), views, model, distributed helpers, optimiser
and schedule, probes, training, benchmark and main. To lift an objective out, copy it, `similarities` and
`without_diagonal` (torch alone); its naive loop is in test_polyview.py.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import v2

# ==== Objectives ==============================================================================
#
# Notation. A batch holds K samples i, j with M views each, a, b, g. z[i,a] in R^D is the
# L2-normalised embedding of view a of sample i, and s(ia, jg) = <z[i,a], z[j,g]> / tau. Every
# objective takes z [K, M, D] and returns its mean over the anchor views (i, a). The negatives of
# an anchor are all M views of the K - 1 other samples: N[i,a] = sum_{j != i, g} exp s(ia, jg).
#
# What they estimate. The One-vs-Rest mutual information I(x_a; X_-a) between one view and the
# M - 1 other views of its sample. Each loss term asks the encoder to pick a positive out of C
# candidates (the positive and C - 1 negatives), and as for InfoNCE (Oord et al., 2018)
#
#     I(x_a; X_-a) >= log C - L,
#
# a bound that can never exceed log C:
#     simclr, multicrop                C = 2K - 1      (a pair term sees views a and b of the others)
#     geometric, arithmetic, suffstats C = M(K-1) + 1  (the positive and all views of the others)
#     supcon                           C = M(K-1) + 1  (its other positives are not draws from the
#                                      marginal, so they are not candidates; dropping them from its
#                                      denominators gives Geometric's smaller loss: a looser bound)
#     dcl                              none (its positive is not in its own denominator)
#
# Why M matters: at a fixed K, more views give each anchor M(K - 1) negatives, so the poly-view
# ceiling log(M(K-1) + 1) rises with M, and a rest-set of M - 1 views tells more about the anchor,
# so the true MI rises too. Multi-Crop's ceiling stays at log(2K - 1) whatever M is.


def without_diagonal(x):
    """x [..., M, M] -> [..., M, M - 1]: row a keeps the M - 1 entries x[..., a, b] with b != a."""
    M = x.shape[-1]
    column = torch.arange(M - 1, device=x.device)
    b = column + (column >= torch.arange(M, device=x.device)[:, None])    # [M, M-1]: skip b = a
    return x.gather(-1, b.expand(*x.shape[:-1], M - 1))


def similarities(z, temperature, anchors=None):
    """What every objective shares: checks, L2 normalisation and the anchors' similarities.

    z is [K, M, D]. `anchors`, a slice of sample indices, picks the samples whose views act as
    anchors (all by default); they are contrasted against the whole of z. This is how one of many
    processes computes its share of the loss on a gathered batch: the mean over equal shards of
    anchors is the full loss. With A anchor samples it returns

        anchors_z      [A, M, D]      z[i,a], normalised
        sim            [A, M, K, M]   s(ia, jg), -inf where j = i: own views are never negatives
        positives      [A, M, M - 1]  s(ia, ib) for the M - 1 other views b != a of the anchor
        log_negatives  [A, M]         log N[i,a] = log sum_{j != i, g} exp s(ia, jg)

    all in float32 (or float64) whatever autocast is active: bf16 logits put a 2-9% error into
    the gradient at tau = 0.1. (On CUDA, TF32 would cost ~1e-4: this file never switches it on.)
    """
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    if anchors.indices(K) != (anchors.start, anchors.stop, 1) or anchors.start >= anchors.stop:
        raise ValueError(f"anchors must be slice(start, stop) with 0 <= start < stop <= K={K}, got {anchors}")
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=-1)
        scaled = z[anchors] / temperature                                  # [A, M, D]: 1/tau folded in
        sim = (scaled.flatten(0, 1) @ z.flatten(0, 1).T).view(*scaled.shape[:2], K, M)  # [A, M, K, M]
        # The anchors' own views from a second, tiny product: reading them out of sim would send a
        # full-size gradient back through it.
        own = torch.einsum("iad,ibd->iab", scaled, z[anchors])             # [A, M, M]
    samples = torch.arange(K, device=z.device)
    sim = sim.masked_fill((samples[anchors, None] == samples)[:, None, :, None], float("-inf"))
    return z[anchors], sim, without_diagonal(own), sim.logsumexp(dim=(2, 3))


def simclr_loss(z, temperature, anchors=None):
    """SimCLR's NT-Xent (Chen et al., 2020) for M = 2 views: z is [K, 2, D]. The positive of anchor
    view (i, a) is the other view b = 1 - a of its sample; its candidates are all 2K - 1 other views:

        l[i,a] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i, g} exp s(ia, jg) ),   L = mean over i, a.
    """
    if z.dim() == 3 and z.shape[1] != 2:
        raise ValueError(f"simclr needs exactly M = 2 views, got M={z.shape[1]}")
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    positive = positives[..., 0]                                           # [A, 2]: the one other view
    return (torch.logaddexp(positive, log_negatives) - positive).mean()


def multicrop_loss(z, temperature, anchors=None):
    """Multi-Crop (Caron et al., 2020): SimCLR averaged over the ordered view pairs (a, b), a != b.
    A pair term only sees views a and b of the other samples, 2(K - 1) negatives whatever M is:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i} [exp s(ia, ja) + exp s(ia, jb)] ),
        L = mean over i, a, b != a.
    """
    _, sim, positives, _ = similarities(z, temperature, anchors)
    per_view = sim.logsumexp(dim=2)                     # [A, M, M]: log sum_{j != i} exp s(ia, jg)
    same_view = per_view.diagonal(dim1=1, dim2=2)[..., None]               # [A, M, 1]: g = a
    log_denominator = torch.logaddexp(torch.logaddexp(positives, same_view), without_diagonal(per_view))
    return (log_denominator - positives).mean()                            # g = b above


def geometric_loss(z, temperature, anchors=None):
    """Geometric PVC (Shidani et al., 2024): every positive b of anchor (i, a) is classified against
    the same negatives N[i,a], all views of all other samples:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + N[i,a] ),      p[i,a,b] = exp(-l[i,a,b]),
        L = mean over i, a, b != a of l[i,a,b]     (-log of the geometric mean of the M - 1 p's).
    """
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    return (torch.logaddexp(positives, log_negatives[..., None]) - positives).mean()


def arithmetic_loss(z, temperature, anchors=None):
    """Arithmetic PVC (Shidani et al., 2024): -log of the arithmetic mean of the M - 1 per-positive
    probabilities p[i,a,b] of `geometric_loss`:

        L = mean over i, a of -log( 1/(M-1) sum_{b != a} p[i,a,b] ).

    By AM >= GM it is never above the Geometric loss; the two agree at M = 2.
    """
    # A deliberate reading: copies of the paper's pseudo-code write this branch as
    # logsumexp(losses) - log(k), a soft-max over pair losses. We follow the objective's name and
    # the AM >= GM ordering against Geometric PVC.
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    log_p = positives - torch.logaddexp(positives, log_negatives[..., None])  # [A, M, M-1]
    return (math.log(positives.shape[2]) - log_p.logsumexp(dim=2)).mean()


def suffstats_loss(z, temperature, anchors=None):
    """Sufficient Statistics (Shidani et al., 2024): one positive per anchor, the re-normalised mean
    of its M - 1 other views, against the same negatives N[i,a] as PVC:

        t[i,a] = normalise( sum_{b != a} z[i,b] ),        u[i,a] = <z[i,a], t[i,a]> / tau,
        L = mean over i, a of -u[i,a] + log( exp u[i,a] + N[i,a] ).

    At M = 2, t[i,a] is the other view and this is SimCLR.
    """
    # A deliberate reading: the mean of the other views is the sufficient statistic of the rest-set
    # (the exponential-family argument), contrasted against the PVC negatives so that this
    # objective is exactly SimCLR at M = 2.
    anchors_z, _, _, log_negatives = similarities(z, temperature, anchors)
    rest = F.normalize(anchors_z.sum(dim=1, keepdim=True) - anchors_z, dim=-1)  # [A, M, D] = t[i,a]
    u = (anchors_z * rest).sum(dim=-1) / temperature                           # [A, M]
    return (torch.logaddexp(u, log_negatives) - u).mean()


def supcon_loss(z, temperature, anchors=None, labels=None):
    """SupCon's L_out (Khosla et al., 2020) over M views. The positives P of anchor (i, a) are its
    M - 1 other views, or with labels [K] every other view of every sample of its label; the
    candidates are all K*M - 1 other views, positives included:

        l[i,a] = -1/|P| sum_{p in P} [ s(ia, p) - log sum_{q != ia} exp s(ia, q) ],  L = mean over i, a.

    Unlike Geometric PVC, whose denominators hold one positive each, every denominator here holds
    all the other positives too. At M = 2 without labels it is SimCLR.
    """
    anchors_z, sim, positives, log_negatives = similarities(z, temperature, anchors)
    log_candidates = torch.logaddexp(log_negatives, positives.logsumexp(dim=2))   # [A, M]
    if labels is None:
        return (log_candidates[..., None] - positives).mean()
    K, M = z.shape[:2]
    if labels.shape != (K,):
        raise ValueError(f"labels must have shape [K] = [{K}], got {list(labels.shape)}")
    samples = torch.arange(K, device=z.device)
    anchors = anchors or slice(0, K)
    same = (labels[anchors, None] == labels) & (samples[anchors, None] != samples)  # [A, K]: j != i
    positive_sum = positives.sum(dim=2) + torch.where(same[:, None, :, None], sim, 0.0).sum(dim=(2, 3))
    count = (M - 1) + M * same.sum(dim=1, keepdim=True)                       # [A, 1] = |P|
    return (log_candidates - positive_sum / count).mean()


def dcl_loss(z, temperature, anchors=None):
    """Decoupled contrastive learning (Yeh et al., 2022): InfoNCE with eps = 0, the positive left
    out of its own denominator, against the poly-view negatives:

        l[i,a,b] = -s(ia, ib) + log N[i,a],      L = mean over i, a, b != a.
    """
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    return (log_negatives[..., None] - positives).mean()


LOSSES = {"simclr": simclr_loss, "multicrop": multicrop_loss, "geometric": geometric_loss,
          "arithmetic": arithmetic_loss, "suffstats": suffstats_loss, "supcon": supcon_loss, "dcl": dcl_loss}


@torch.no_grad()
def contrastive_top1(z, temperature, anchors=None):
    """Percent of the (anchor, positive) pairs (ia, ib), b != a, whose positive beats every negative:
    s(ia, ib) > max_{j != i, g} s(ia, jg). The same poly-view negatives for every objective, so that
    runs of different objectives compare. A contrastive loss can flatten while this still climbs."""
    _, sim, positives, _ = similarities(z, temperature, anchors)
    return (positives > sim.amax(dim=(2, 3))[..., None]).float().mean() * 100


# ==== Views: SimCLR's augmentations. Crops and flips on the CPU workers, colour on the device. ====

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


def image_folders(root, decode):
    """The ImageFolders root/train and root/val, checked: one sub-folder per class, images that decode."""
    splits = []
    for split in ("train", "val"):
        try:  # no folder, no class folders in it (as ImageNet's val/ ships), or a class folder without an image
            splits.append(torchvision.datasets.ImageFolder(root / split, decode))
        except FileNotFoundError as error:
            raise UserError(f"--data {root} must hold the ImageFolders train/ and val/, one sub-folder per class (sort "
                            f"ImageNet's flat val/ into them with valprep.sh): {error}")
        with warnings.catch_warnings():  # a folder where nothing decodes stops here, in one line
            warnings.simplefilter("ignore")
            try:
                MultiView(splits[-1], decode, 1)[0]
            except UserError as error:
                raise UserError(f"{root / split}: {error}")
    return splits


class MultiView(torch.utils.data.Dataset):
    """Item i: (views [M, C, H, W] uint8, label, skipped): M independent crops of one decoded image.
    A file that fails to decode, whatever the exception (OSError, SyntaxError, DecompressionBombError...),
    is skipped with a warning naming it, the next image standing in; `skipped` counts the files passed over."""

    def __init__(self, dataset, transform, num_views):
        self.dataset, self.transform, self.num_views = dataset, transform, num_views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for skipped in range(len(self.dataset)):
            i = (index + skipped) % len(self.dataset)
            try:
                image, label = self.dataset[i]                                # decoded once ...
            except Exception as error:
                name = self.dataset.samples[i][0] if hasattr(self.dataset, "samples") else f"#{i}"
                warnings.warn(f"skipping undecodable image {name}: {type(error).__name__}: {error}")
                continue
            return torch.stack([self.transform(image) for _ in range(self.num_views)]), label, skipped  # ... M views
        raise UserError(f"none of the {len(self.dataset)} images could be decoded")


# The colour half of SimCLR's views runs on the device, on the whole batch of views at once, with its
# own random parameters for every view (on the CPU it would cost several times the decode). Images are
# float [N, 3, H, W] in [0, 1], a per-view parameter a tensor [N]. Random draws stay on the device and
# torch.where replaces branches: nothing waits for the GPU. Each op equals torchvision's (tested).


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
    """(pre-training set of M-view items, probe train set, probe val set of centre crops, classes)."""
    decode = v2.ToImage()  # once per image: PIL -> uint8 [3, H, W], which crops twice as fast as PIL
    if args.dataset in ("imagenet", "folder"):
        train, val = agree(lambda: image_folders(Path(args.data), decode))
    elif args.dataset == "fake":
        size = (3, args.image_size, args.image_size)
        train = torchvision.datasets.FakeData(50 * args.batch_size, size, 10, decode)
        val = torchvision.datasets.FakeData(10 * args.batch_size, size, 10, decode, random_offset=10**6)
    else:  # one process per machine downloads, then the others read it; if it fails, all stop (agree)
        cifar = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100

        def read(download):
            try:
                return [cifar(args.data, train=split, transform=decode, download=download) for split in (True, False)]
            except (OSError, RuntimeError) as error:
                raise UserError(f"--dataset {args.dataset} could not be read or downloaded into {args.data}: {error}")
        downloaded = agree(lambda: read(download=True) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None)
        train, val = agree(lambda: downloaded or read(download=False))
    views, crop = random_crop_and_flip(args.image_size), centre_crop(args.image_size, args.small_images)
    classes = train.num_classes if args.dataset == "fake" else len(train.classes)
    return MultiView(train, views, args.views), MultiView(train, crop, 1), MultiView(val, crop, 1), classes


# ==== Model ===================================================================================


class PolyViewNet(nn.Module):
    """Images in [0, 1], normalised by ImageNet's mean and std, into a torchvision ResNet without its classifier
    (the F features the probes see), then SimCLR's projector as its official code builds it: Linear(F, F) - BN -
    ReLU - Linear(F, 128) - BN, no bias where a BN follows, no beta in the last BN (the embeddings z the objectives
    see). The last BN of every residual block starts at 0. Beside them, as in SimCLR's code, the online probe: a
    linear classifier on the features of every training view behind a stop-gradient (the rest gets the gradient
    it would get without it), which shows the features improving where the loss cannot."""

    def __init__(self, arch="resnet50", small_images=False, classes=1000, dim=128):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
        if small_images:  # 32x32 inputs: keep the resolution, as in SimCLR's CIFAR models
            self.backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.backbone.maxpool = nn.Identity()
        width = self.backbone.fc.in_features                     # F: 2048 for ResNet-50, 512 for ResNet-18
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width),
                                       nn.ReLU(inplace=True), nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim))
        self.projector[-1].bias.requires_grad_(False)          # SimCLR's center=False: beta stays 0
        # Standardised first, as in MAE's probe: a young backbone's features share one big mean direction.
        self.online_probe = nn.Sequential(nn.BatchNorm1d(width, affine=False), nn.Linear(width, classes))
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images):  # [N, 3, H, W] in [0, 1] -> [N, F]: what the probes see
        return self.backbone((images - self.mean) / self.std)

    def forward(self, views):
        """views [k, M, 3, H, W] -> (z [k, M, D], the online probe's logits [k*M, classes])."""
        k, M = views.shape[:2]
        features = self.features(views.flatten(0, 1))                  # [k*M, F]
        return self.projector(features).view(k, M, -1), self.online_probe(features.detach())


def choose_precision(requested, device_type, capability=None):
    """(precision, why). auto: bf16 autocast on GPUs with bf16 hardware (compute capability 8.0 and up: A100, H100,
    RTX 30xx); fp16 autocast with a loss scaler below (T4, V100), where bf16 is only emulated and slow, though
    torch.cuda.is_bf16_supported() says True; float32 on the CPU. fp16 spans 6e-8 to 65504, so small gradients
    would underflow to 0 without the scaler; bf16 has float32's range."""
    if requested != "auto":
        return requested, "--precision"
    if device_type != "cuda":
        return "fp32", "auto: on the CPU"
    bf16 = capability >= (8, 0)
    why = f"auto: compute capability {capability[0]}.{capability[1]} has {'' if bf16 else 'no '}bf16 hardware"
    return ("bf16" if bf16 else "fp16"), why


def mixed_precision(device, precision):
    """The autocast of a precision: the model's matmuls and convolutions in bf16 or fp16, or none (fp32)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype, enabled=precision != "fp32")


# ==== Distributed helpers. The RANK variable (set by torchrun) switches DDP on, as in nanoGPT. ====


class GatherWithGrad(torch.autograd.Function):
    """All ranks' tensors, [k, ...] -> [k * world, ...], in rank order, with gradients. Every rank's loss uses every
    rank's embeddings as negatives, so the gradient of the embeddings this rank produced is the sum of those all
    ranks' losses send them: backward all-reduces and keeps this rank's slice. With DDP's gradient averaging on
    top, this is exactly the single-process, full-batch gradient."""

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


def step_loss(model, views, labels, objective, temperature, supervised=False):
    """This rank's share of one step, on views [k, M, C, H, W] of images with labels [k]: (the loss to minimise,
    [the objective's loss, contrastive top-1, online probe's top-1] for the log). The objective takes this rank's
    anchors against the embeddings (and, supervised, the labels) of all ranks; the online probe's cross-entropy,
    on detached features, trains the probe."""
    z, logits = model(views)                                          # [k, M, D], [k*M, classes]
    # BN keeps bf16 or fp16 under autocast: gather, and sum the gradients over ranks, in float32 (or float64).
    z, logits = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (z, logits))
    (k, M), rank, extra = views.shape[:2], 0, {}
    if dist.is_initialized():
        rank = dist.get_rank()
        z = GatherWithGrad.apply(z)                                   # [K, M, D], K = k * world
    if supervised:
        extra["labels"] = GatherWithGrad.apply(labels) if dist.is_initialized() else labels
    anchors = slice(rank * k, (rank + 1) * k)
    loss = objective(z, temperature, anchors=anchors, **extra)
    view_labels = labels.repeat_interleave(M)                         # [k*M]: view (i, a) has i's label
    probe_loss = F.cross_entropy(logits, view_labels)
    probe_top1 = (logits.detach().argmax(dim=1) == view_labels).float().mean() * 100
    return loss + probe_loss, torch.stack([loss.detach(), contrastive_top1(z, temperature, anchors), probe_top1])


VIEWS, ORDER, WEIGHTS, PROBE = range(4)  # the random streams of a run


def stream_seed(stream, seed, rank=0, epoch=0):
    """The seed of a random stream, mixed from (stream, seed, rank, epoch) by numpy's SeedSequence: no two
    tuples share a stream (a sum seed + rank + epoch would let --seed 1 replay --seed 0 one epoch later)."""
    return int(np.random.SeedSequence([stream, seed, rank, epoch]).generate_state(1, np.uint64)[0])


# ==== Optimiser and schedule ==================================================================


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each weight's step scaled by its layer's trust ratio (You et al., 2017):

        g = grad + weight_decay * w,     g <- trust_coefficient * ||w|| / ||g|| * g,
        v <- momentum * v + g,           w <- w - lr * v.

    As in SimCLR, biases and BatchNorm parameters (the 1-D ones), and the groups with adapt=False, get
    neither decay nor adaptation: plain SGD with momentum.
    """

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, adapt=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in (w for w in group["params"] if w.grad is not None):
                g = w.grad
                if w.ndim > 1 and group["adapt"]:  # decay, then the trust ratio (no host sync: torch.where)
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = group["trust_coefficient"] * w_norm / g_norm
                    g = g.mul(torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0))
                if "velocity" not in self.state[w]:
                    self.state[w]["velocity"] = torch.zeros_like(w)
                w.add_(self.state[w]["velocity"].mul_(group["momentum"]).add_(g), alpha=-group["lr"])


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to the peak over warmup_steps, then cosine decay to 0 at total_steps:

        lr(t) = peak * (t + 1) / W                                  for t < W,
        lr(t) = peak * (1 + cos(pi * (t - W) / (T - W))) / 2        after.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def peak_learning_rate(args):
    """SimCLR's two rules, K counted in images per step (not views), as SimCLR counts its batch:
    square root, lr * sqrt(K), or linear, lr * K / 256. At K = 4096 the defaults agree (4.8)."""
    return args.lr * (math.sqrt(args.batch_size) if args.lr_scaling == "sqrt" else args.batch_size / 256)


# ==== Probes. The online probe (in PolyViewNet) watches a run; the fast probe measures its end. ====

@torch.no_grad()
def extract_features(model, dataset, device, workers, precision="fp32", gather=True):
    """(features [N, F] float32, labels [N]) of a dataset of single centre crops, in eval mode. Under DDP rank r
    extracts the items r R to (r + 1) R - 1, R = ceil(N / W), padded to R rows with the label -1. With gather,
    rank 0 receives all rows into one buffer, the bank in the dataset's order, and the other ranks get None;
    without, every rank keeps its own rows."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = math.ceil(len(dataset) / world)
    mine = torch.utils.data.Subset(dataset, range(rank * rows, min((rank + 1) * rows, len(dataset))))
    loader = torch.utils.data.DataLoader(mine, 256, num_workers=workers, pin_memory=device.type == "cuda")
    features = torch.zeros(rows, model.projector[0].in_features, device=device)
    labels = torch.full((rows,), -1, dtype=torch.long, device=device)
    model.eval()
    start = 0
    for views, label, _ in loader:                                     # views [B, 1, C, H, W] uint8
        images = views.flatten(0, 1).to(device, non_blocking=True).float() / 255
        with mixed_precision(device, precision):
            features[start:start + len(images)] = model.features(images).float()
        labels[start:start + len(images)] = label.to(device)
        start += len(images)
    if world == 1 or not gather:
        return features, labels
    banks = [x.new_empty(world, *x.shape) if rank == 0 else None for x in (features, labels)]  # [W, R, ...]
    for x, bank in zip((features, labels), banks):
        dist.gather(x, list(bank.unbind()) if rank == 0 else None, dst=0)   # into views of one buffer
    return tuple(bank.flatten(0, 1)[:len(dataset)] if rank == 0 else None for bank in banks)


@torch.no_grad()
def online_val_top1(model, dataset, device, workers, precision):
    """The online probe's val top-1 in percent (centre crops, eval mode, every rank its shard), on every rank."""
    features, labels = extract_features(model, dataset, device, workers, precision, gather=False)
    counts = torch.stack([(model.online_probe(features).argmax(dim=1) == labels).sum(), (labels >= 0).sum()])
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[1]).item()


def linear_probe(train_x, train_y, val_x, val_y, epochs, device, min_steps=1000):
    """A fast probe of frozen features [N, F], in percent: top-1 and top-5 (None under 5 classes) of a
    linear classifier trained with AdamW on standardised features of centre crops, and k-NN top-1
    (k = 20, cosine similarity, votes weighted by exp(similarity / 0.07) as in Wu et al., 2018).
    Not SimCLR's linear evaluation: compare its numbers across runs of this file, not with the paper. It
    takes max(epochs x ceil(N / 1024), min_steps) steps of 1,024: 112,680 on ImageNet at 90 epochs, and 1,000, not
    90, on a few hundred images, where its val top-1 has plateaued. The bank stays on the device (ImageNet, ResNet-50:
    10.5 GB)."""
    classes = int(max(train_y.max(), val_y.max())) + 1
    # k-NN: each val image votes with its 20 most similar train images (cosine: divide by the norms).
    norms, votes = train_x.norm(dim=1).clamp_min(1e-12), []
    for chunk in F.normalize(val_x, dim=1).split(256):
        similarity, index = (chunk @ train_x.T).div_(norms).topk(min(20, len(train_x)), dim=1)  # [B, 20]
        scores = torch.zeros(len(chunk), classes, device=device)
        votes.append(scores.scatter_add_(1, train_y[index], (similarity / 0.07).exp()).argmax(1))
    knn_top1 = (torch.cat(votes) == val_y).float().mean().item() * 100

    # Linear classifier on standardised features (a BatchNorm without affine, frozen at the end), in place.
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x.sub_(mean).div_(std)
    val_x = (val_x - mean) / std
    classifier = nn.Linear(train_x.shape[1], classes).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = max(epochs * math.ceil(len(train_x) / 1024), min_steps)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def batches():  # epoch after epoch, each a new permutation
        while True:
            yield from torch.randperm(len(train_x), device=device).split(1024)
    for _, batch in zip(range(steps), batches()):
        loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        hits = classifier(val_x).topk(min(5, classes), dim=1).indices == val_y[:, None]   # [N, 5]
    return {"protocol": "fast linear probe: AdamW on standardised frozen features of centre crops, not SimCLR's linear "
            "evaluation (90 epochs of SGD on random crops and flips)", "top1": hits[:, 0].float().mean().item() * 100,
            "top5": hits.any(1).float().mean().item() * 100 if classes >= 5 else None, "knn_top1": knn_top1}


# ==== Training: config, checkpoints, the loop =================================================


class UserError(Exception):
    """A problem with the command line, the data or the run folder: one line, exit 2. Under torchrun, one
    that every process meets (`everywhere`) is printed once, by rank 0."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


def agree(work):
    """work() on every process; a UserError on any becomes the same error on all, named by the first that
    failed: a process that stopped alone would leave the others waiting at their next collective forever."""
    try:
        result, error = work(), None
    except UserError as caught:
        result, error = None, str(caught)
    errors = [error]
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)  # also where the processes wait for each other
    for rank, message in enumerate(errors):
        if message:
            raise UserError(message if rank == 0 else f"(rank {rank}) {message}", everywhere=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Poly-view contrastive pre-training of a ResNet, then a fast linear "
                                "probe. Defaults follow the paper and SimCLR (Chen et al., 2020).")
    add = p.add_argument
    add("--loss", default="suffstats", choices=list(LOSSES), help="see each objective's docstring (default: suffstats)")
    add("--supervised", action="store_true", help="supcon with labels: every view of the anchor's class is a positive")
    add("--views", type=int, help="M, views per image (default: 8, the paper's Figures 3a and 5; 2 for simclr)")
    add("--batch-size", type=int, help="K, images per step over all processes (default: 256; 512 on small images)")
    add("--epochs", type=int, default=128, help="pre-training epochs; 0 probes the backbone as it is (default: 128)")
    add("--arch", default="resnet50", choices=["resnet50", "resnet18"], help="backbone (default: resnet50)")
    add("--dataset", default="imagenet", choices=["imagenet", "folder", "cifar10", "cifar100", "fake"],
        help="imagenet/folder: ImageFolders DATA/train and DATA/val; cifar*: downloaded into DATA; fake: random images")
    add("--data", default="./data", help="dataset folder (default: ./data)")
    add("--image-size", type=int, help="crop side (default: 224, CIFAR 32); 64 or less: SimCLR's CIFAR recipe")
    add("--out", default="runs/polyview", help="run folder (default: runs/polyview)")
    add("--lr-scaling", default="sqrt", choices=["sqrt", "linear"], help="lr * sqrt(K) or lr * K / 256 (default: sqrt)")
    add("--lr", type=float, help="base lr (default: sqrt 0.075, linear 0.3; small images: sqrt 2/sqrt(512), linear 1)")
    add("--temperature", type=float, help="tau (default: 0.1; 0.5 on small images, SimCLR's CIFAR-10 setting)")
    add("--weight-decay", type=float, help="LARS weight decay, not on BN and biases (default: 1e-6; small images 1e-4)")
    add("--warmup-epochs", type=float, default=10, help="linear warm-up, at most a tenth of the run (default: 10)")
    add("--workers", type=int, default=8, help="data-loading processes per GPU (default: 8)")
    add("--seed", type=int, default=0, help="seed of the weights, the data order and every view (default: 0)")
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    add("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="the model's autocast; auto: "
        "bf16 from compute capability 8.0, fp16 with a loss scaler below (T4, V100), fp32 on the CPU (default: auto)")
    add("--compile", action="store_true", help="torch.compile the backbone (under torchrun, SyncBN breaks its graph)")
    add("--weights", help="start the backbone from a state_dict: a run's backbone.pt or torchvision's weights file")
    add("--probe-epochs", type=int, default=90, help="fast probe epochs, 1,000 steps or more; 0 skips it (default: 90)")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists (else start fresh)")
    add("--log-every", type=int, default=50, help="steps between log lines (default: 50)")
    add("--benchmark", action="store_true", help="print views/s, the shares of a step and memory per view")
    add("--compare", nargs="+", metavar="RUN", help="plot runs' online probes against compute into compare.png")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 32 if args.dataset.startswith("cifar") else 224
    small = args.small_images = args.image_size <= 64
    sqrt_rule = args.lr_scaling == "sqrt"
    defaults = dict(views=2 if args.loss == "simclr" else 8, batch_size=512 if small else 256,
                    temperature=0.5 if small else 0.1, weight_decay=1e-4 if small else 1e-6,
                    lr=(2 / math.sqrt(512) if small else 0.075) if sqrt_rule else (1.0 if small else 0.3))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def check_args(args, world_size):
    """Fail fast, before any data or GPU is touched, on settings the run could not survive. Every process
    reads the same command line, so every one meets these errors: rank 0 alone prints them."""
    least = dict(views=2, batch_size=2, epochs=0, workers=0, probe_epochs=0, log_every=1, image_size=8, seed=0,
                 warmup_epochs=0, weight_decay=0, lr=0, temperature=0)
    for name, bound in least.items():
        value, strict = getattr(args, name), name in ("lr", "temperature")
        if not (math.isfinite(value) and (value > bound if strict else value >= bound)):
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} {bound}, "
                            f"got {value}", everywhere=True)
    try:  # the objective itself knows its rules (simclr needs M = 2)
        LOSSES[args.loss](torch.randn(2, args.views, 4), args.temperature)
    except ValueError as error:
        raise UserError(f"--loss {args.loss} --views {args.views}: {error}", everywhere=True)
    if args.supervised and args.loss != "supcon":
        raise UserError(f"--supervised is supcon's supervised form, not --loss {args.loss}", everywhere=True)
    if args.batch_size % world_size:
        raise UserError(f"--batch-size {args.batch_size} must be divisible by the {world_size} processes",
                        everywhere=True)


@contextlib.contextmanager
def out_of_memory(where):
    """CUDA running out of memory inside becomes one line: where it ran out, and the way out."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise UserError(f"CUDA out of memory {where}") from None


def write_atomically(path, write):
    """write(file) into a temporary file, flushed to disk (fsync), then renamed over path: a crash
    at any moment leaves either the old file or the new one, whole (a rename is atomic)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


# What a resumed run must share with its checkpoint: the settings of the model, data, objective and schedule.
MUST_MATCH_ON_RESUME = ("arch", "loss", "supervised", "views", "batch_size", "dataset", "image_size", "epochs",
                        "lr_scaling", "lr", "warmup_epochs", "temperature", "weight_decay", "seed", "weights")


def agreed_checkpoint(path, args):
    """The checkpoint to resume from (None where there is none) as rank 0 sees it, on every rank: where
    machines share no filesystem, a rank that looked itself would start afresh while rank 0 resumes."""
    def load():
        if dist.is_initialized() and dist.get_rank() != 0 or not path.exists():
            return None
        if not args.resume:
            raise UserError(f"{path} exists: add --resume to continue it, or choose another --out")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        for key in MUST_MATCH_ON_RESUME:
            if checkpoint["args"].get(key) != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{path} was trained with {flag} {checkpoint['args'].get(key)}, this run asks for "
                                f"{flag} {getattr(args, key)}: resume with the same {flag}, or choose another --out")
        return checkpoint
    found = [agree(load)]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)  # pickled: a ResNet-50 checkpoint is ~0.3 GB, once
    return found[0]


def read_metrics(path):
    """The records of metrics.jsonl, less a last line cut short by a crash (it cannot end in '}')."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


class Log:
    """The numbers of a run: every --log-every steps, the means over those steps and over ranks of the loss, the
    contrastive top-1 and the online probe's top-1, printed and written to metrics.jsonl by rank 0. Every rank sees
    the same means, so all stop together: on a loss that is not finite, or, once `enough` images were read, if
    more than 1% of them failed to decode."""

    def __init__(self, path, args, world_size, total_steps, enough, resumed_at):
        self.path, self.world_size, self.total_steps, self.enough = path, world_size, total_steps, enough
        self.views_per_step, self.master = args.batch_size * args.views, int(os.environ.get("RANK", 0)) == 0
        self.skipped = self.tried = 0     # undecodable files passed over, and all files read, by this rank
        self.window, self.tick, self.waited = [], time.perf_counter(), 0.0
        if self.master:
            path.parent.mkdir(parents=True, exist_ok=True)
            if resumed_at is None and path.exists():  # from an earlier run here that never reached a checkpoint
                os.replace(path, path.with_name("metrics.old.jsonl"))
            # A resumed run drops what a crashed run logged after its checkpoint; a fresh one starts empty.
            kept = [r for r in read_metrics(path) if r["step"] <= resumed_at] if path.exists() else []
            write_atomically(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in kept).encode()))

    def write(self, record):  # with the views seen so far over all ranks: the paper's compute axis
        if self.master:
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "views_seen": record["step"] * self.views_per_step}) + "\n")

    def step(self, stats, passed_over, images):  # stats [3] stay on the device until the next line
        self.window.append(stats)
        self.skipped, self.tried = self.skipped + passed_over, self.tried + images + passed_over

    def line(self, step, epoch, lr, kept):
        seconds, stats = time.perf_counter() - self.tick, torch.stack(self.window).double()  # [n, 3]
        counts = torch.tensor([self.skipped, self.tried], dtype=torch.float64, device=stats.device)
        if self.world_size > 1:
            dist.all_reduce(stats)
            dist.all_reduce(counts)
            stats /= self.world_size
        skipped, tried = counts.tolist()
        if skipped > 0.01 * tried and tried >= self.enough:
            raise UserError(f"{skipped:.0f} of the {tried:.0f} images read ({skipped / tried:.0%}) could not be "
                            "decoded, more than 1%: check --data (the warnings name the files)", everywhere=True)
        bad = (~torch.isfinite(stats[:, 0])).nonzero()
        if len(bad):  # the weights are already poisoned: stop, keep the checkpoint as it is
            first = int(bad[0, 0])
            raise UserError(f"loss is {stats[first, 0].item()} at step {step - len(stats) + first + 1} "
                            f"(epoch {epoch}); stopping: {kept}", everywhere=True)
        loss, contrastive, probe = stats.mean(dim=0).tolist()
        views_per_s = len(stats) * self.views_per_step / seconds
        eta = (self.total_steps - step) * seconds / len(stats)
        self.write({"step": step, "epoch": epoch, "loss": loss, "contrastive_top1": contrastive,
                    "online_probe_top1": probe, "lr": lr, "views_per_s": views_per_s,
                    "data_wait": self.waited / seconds, "eta_s": eta})
        if self.master:
            print(f"epoch {epoch} step {step}/{self.total_steps} loss {loss:.4f} contrastive top-1 {contrastive:.1f}% "
                  f"online probe {probe:.1f}% lr {lr:.3g} {views_per_s:.0f} views/s "
                  f"data {self.waited / seconds:.0%} eta {eta / 60:.1f} min", flush=True)
        self.window, self.tick, self.waited = [], time.perf_counter(), 0.0


def read_weights(args, backbone):
    """The state_dict of --weights, checked against the backbone: a run's backbone.pt, or torchvision's
    ResNet weights file, whose classifier (fc) is dropped. What does not match is named, in one line."""
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as error:  # no file, not a torch file, or pickled code, which weights_only refuses to run
        raise UserError(f"--weights {args.weights} cannot be read as a state_dict ({type(error).__name__})")
    if not (isinstance(state, dict) and all(torch.is_tensor(v) for v in state.values())):
        raise UserError(f"--weights {args.weights} is not a state_dict (a checkpoint.pt? give its run's backbone.pt)")
    state, expected = {k: v for k, v in state.items() if not k.startswith("fc.")}, backbone.state_dict()
    for problem, keys in (("with another shape (file for model)", [f"{k} {list(state[k].shape)} for {list(v.shape)}"
                           for k, v in expected.items() if k in state and state[k].shape != v.shape]),
                          ("missing", [k for k in expected if k not in state]),
                          ("unexpected", [k for k in state if k not in expected])):
        if keys:
            raise UserError(f"--weights {args.weights} does not fit --arch {args.arch} at {args.image_size} px "
                            f"({'3x3 stem of small images' if args.small_images else 'ImageNet stem'}): {len(keys)} "
                            f"keys {problem}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    return state


def build_model(args, classes, device, distributed, lr, checkpoint=None):
    """(the model to call, the plain module the checkpoints and the probes use, its LARS, fp16's loss scaler)."""
    torch.manual_seed(stream_seed(WEIGHTS, args.seed))  # the same initial weights on every rank
    model = PolyViewNet(args.arch, args.small_images, classes)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        model.backbone.load_state_dict(agree(lambda: read_weights(args, model.backbone)))
    if distributed and device.type == "cuda":  # the M views of an image share a GPU, so per-GPU batch statistics
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # would leak which views belong together
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    # The online probe shares the optimiser and schedule, without decay or trust ratio, as in SimCLR's code (a
    # trust ratio of 0.001 would barely move a classifier that starts from scratch).
    rest = [p for name, p in model.named_parameters() if not name.startswith("online_probe.")]
    optimizer = LARS([{"params": rest}, {"params": model.online_probe.parameters(), "adapt": False}], lr=lr,
                     weight_decay=args.weight_decay)  # state on the device
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if scaler.is_enabled() and checkpoint.get("scaler"):  # empty from a bf16 or fp32 run
            scaler.load_state_dict(checkpoint["scaler"])
    raw_model = model
    if args.compile:
        model.backbone.compile()  # in place: the state_dict keys stay the same
    if distributed:  # SyncBN keeps the BN statistics equal on every rank: no buffers to broadcast
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    return model, raw_model, optimizer, scaler


def train_step(model, optimizer, scaler, views, labels, args, device):
    """One step on this rank's uint8 crops [k, M, C, H, W] and labels [k]; returns [loss, contrastive top-1, online
    probe's top-1] to log, on the device. Under fp16 the scaler multiplies the loss by S (65536 at first), so that
    small gradients survive fp16, and divides the gradients by S before LARS (its trust ratio divides by their norm)
    sees them; a step whose gradients overflowed is skipped and S halved (S doubles after 2,000 good steps). That
    check is the step's one wait for the GPU; bf16 and fp32 have none."""
    views = device_augment(views.to(device, non_blocking=True), args.small_images)
    with mixed_precision(device, args.precision):
        loss, stats = step_loss(model, views, labels.to(device, non_blocking=True), LOSSES[args.loss],
                                args.temperature, args.supervised)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)  # skipped if a gradient overflowed: weights and momentum stay as they were
    scaler.update()
    return stats


def start_processes(args, distributed):
    """The device of this process (under torchrun, its GPU and the process group); args.precision resolved, and why."""
    device = torch.device(args.device)
    if distributed:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest convolutions for these shapes
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    args.precision, why = choose_precision(args.precision, device.type, capability)
    return device, why


def train(args):
    distributed = "RANK" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    check_args(args, world_size)
    (device, why), out = start_processes(args, distributed), Path(args.out)
    checkpoint_path = out / "checkpoint.pt"
    checkpoint = agreed_checkpoint(checkpoint_path, args)
    pretrain_set, probe_train_set, probe_val_set, classes = make_datasets(args)
    sampler = torch.utils.data.DistributedSampler(pretrain_set, world_size, rank, drop_last=True)
    loader = torch.utils.data.DataLoader(pretrain_set, args.batch_size // world_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    if (steps_per_epoch := len(loader)) == 0:
        raise UserError(f"{len(pretrain_set)} images make no full batch of {args.batch_size}", everywhere=True)
    total_steps, peak_lr = args.epochs * steps_per_epoch, peak_learning_rate(args)
    warmup_steps = round(min(args.warmup_epochs, args.epochs / 10) * steps_per_epoch)
    model, raw_model, optimizer, scaler = build_model(args, classes, device, distributed, peak_lr, checkpoint)
    start_epoch, step = (checkpoint["epoch"], checkpoint["step"]) if checkpoint else (0, 0)
    log = Log(out / "metrics.jsonl", args, world_size, total_steps, min(1000, len(pretrain_set)),
              resumed_at=step if checkpoint else None)
    if log.master:
        write_atomically(out / "args.json", lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
        if checkpoint:
            print(f"resuming {checkpoint_path} at epoch {start_epoch}, step {step}")
        print(f"{args.loss}{' (supervised)' if args.supervised else ''}: K={args.batch_size} images x M={args.views} "
              f"views per step on {world_size} x {device.type} in {args.precision} ({why}), {args.arch} "
              f"({sum(p.numel() for p in raw_model.parameters()) / 1e6:.1f}M parameters), "
              f"{steps_per_epoch} steps/epoch, peak lr {peak_lr:.3g} ({args.lr_scaling} rule)")
    for epoch in range(start_epoch, args.epochs):
        model.train()
        # Every stream from (seed, rank, epoch), so a resumed run draws the same views (workers seed from this RNG);
        # the sampler's seed + epoch would repeat across seeds, so its epoch stays 0.
        sampler.seed = stream_seed(ORDER, args.seed, 0, epoch)
        torch.manual_seed(stream_seed(VIEWS, args.seed, rank, epoch))
        kept = f"{checkpoint_path} (after epoch {epoch - 1}) is kept as it was" if epoch else "no checkpoint yet"
        loading = time.perf_counter()
        for views, labels, passed_over in loader:                      # [K / world, M, C, H, W], [K / world]
            log.waited += time.perf_counter() - loading
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(model, optimizer, scaler, views, labels, args, device)
            log.step(stats, int(passed_over.sum()), len(views))
            step += 1
            if step % args.log_every == 0 or step % steps_per_epoch == 0:
                log.line(step, epoch, lr, kept)
            loading = time.perf_counter()
        with out_of_memory(f"in the online probe's val pass after epoch {epoch} (256 centre crops a batch, beside "
                           f"the training's memory): lower --batch-size; {kept}"):
            val_top1 = online_val_top1(raw_model, probe_val_set, device, args.workers, args.precision)
        log.write({"step": step, "epoch": epoch, "online_val_top1": val_top1})
        if log.master:
            print(f"epoch {epoch}: online probe val top-1 {val_top1:.2f}%", flush=True)
            state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch + 1,
                     "step": step, "scaler": scaler.state_dict(), "args": vars(args)}
            write_atomically(checkpoint_path, lambda f: torch.save(state, f))
    finish(raw_model, probe_train_set, probe_val_set, args, device, out)
    if distributed:
        dist.destroy_process_group()


def finish(model, train_set, val_set, args, device, out):
    """The end of a run: backbone.pt, training.png, the fast probe (every rank extracts its shard of the
    features, rank 0 fits the classifier and the k-NN), probe.json and a one-line summary."""
    master, result = not dist.is_initialized() or dist.get_rank() == 0, {}
    if master:  # torchvision's own keys, fc left out: see the README to load it into torchvision's ResNet
        backbone = {k: v.cpu().contiguous() for k, v in model.backbone.state_dict().items()}
        write_atomically(out / "backbone.pt", lambda f: torch.save(backbone, f))
    if args.probe_epochs > 0:
        before = [t.clone() for t in model.backbone.state_dict().values()]
        with out_of_memory(f"in the fast probe (rank 0 holds all {len(train_set)} training features on its GPU); "
                           f"the backbone is saved: probe it with --weights {out}/backbone.pt --epochs 0 and another "
                           "--out on a GPU with more memory, or with --device cpu"):
            banks = [extract_features(model, s, device, args.workers, args.precision) for s in (train_set, val_set)]
            if master:
                torch.manual_seed(stream_seed(PROBE, args.seed))
                result = linear_probe(*banks[0], *banks[1], args.probe_epochs, device)
        if not all(torch.equal(a, b) for a, b in zip(before, model.backbone.state_dict().values())):
            raise RuntimeError("the backbone changed during feature extraction: the probe would not be frozen")
    if not master:
        return
    records = read_metrics(out / "metrics.jsonl")
    online = [r["online_val_top1"] for r in records if "online_val_top1" in r] or [None]
    result.update(online_val_top1_first_epoch=online[0], online_val_top1_last_epoch=online[-1])
    # --epochs 0 trains no online probe: the fast probe then measures the backbone as it started (random, or --weights).
    summary = (f"online probe val top-1 after the first epoch {online[0]:.2f}%, after the last {online[-1]:.2f}%"
               if online[0] is not None else "no online probe (no epoch trained)")
    if args.probe_epochs > 0:
        top5 = "n/a (under 5 classes)" if result["top5"] is None else f"{result['top5']:.2f}%"
        summary += (f"; fast linear probe (not SimCLR's linear evaluation): top-1 {result['top1']:.2f}%  "
                    f"top-5 {top5}  k-NN top-1 {result['knn_top1']:.2f}%")
    print(summary)
    write_atomically(out / "probe.json", lambda f: f.write((json.dumps(result) + "\n").encode()))
    plot_training(records, out / "training.png")


def plot_training(records, path):
    """Against the step: the log's four numbers on training views, and the online probe's val top-1 at epoch ends."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    fig = Figure(figsize=(10, 6))
    for ax, key in zip(fig.subplots(2, 2, sharex=True).flat, ("loss", "contrastive_top1", "online_probe_top1", "lr")):
        ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label="training views")
        ax.set(title=key, xlabel="step")
    ends = [r for r in records if "online_val_top1" in r]
    fig.axes[2].plot([r["step"] for r in ends], [r["online_val_top1"] for r in ends], "o-", label="val, epoch end")
    fig.axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare(args):
    """Runs side by side on the paper's compute axis (its Figure 3): each run's online probe val top-1 against
    relative compute, the views it has processed over the 2 views per image of one SimCLR epoch, and against
    epochs, into compare.png; and a table of the runs, with the fast probe's numbers where there are some."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    rows = [("run", "loss", "M", "K", "epochs", "views seen", "online val top-1", "fast probe top-1", "k-NN top-1")]
    for run in map(Path, args.compare):
        for name, what in (("args.json", "is not a run of polyview.py"), ("metrics.jsonl", "is a run without a log")):
            if not (run / name).is_file():
                raise UserError(f"--compare: {run} {what} (no {name})")
        s, records = json.loads((run / "args.json").read_text()), read_metrics(run / "metrics.jsonl")
        ends = [r for r in records if "online_val_top1" in r]  # epoch ends
        top1, label = [r["online_val_top1"] for r in ends], f"{s['loss']}, M={s['views']}, K={s['batch_size']}"
        # An epoch is step / (epoch + 1) steps of K images: one SimCLR epoch sees 2 views of each.
        axes[0].plot([r["views_seen"] * (r["epoch"] + 1) / (2 * s["batch_size"] * r["step"]) for r in ends], top1,
                     "o-", label=label)
        axes[1].plot([r["epoch"] + 1 for r in ends], top1, "o-", label=label)
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() else {}
        numbers = (top1[-1] if top1 else None, probe.get("top1"), probe.get("knn_top1"))
        rows.append((run, s["loss"], s["views"], s["batch_size"], f"{len(ends)}/{s['epochs']}",
                     records[-1]["views_seen"] if records else 0, *("-" if x is None else f"{x:.2f}" for x in numbers)))
    axes[0].set(xscale="log", xlabel="relative compute (views seen / 2 views per image per epoch)",
                ylabel="online probe val top-1 (%)")
    axes[1].set(xlabel="epochs")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig("compare.png", dpi=100)
    widths = [max(len(str(row[n])) for row in rows) for n in range(len(rows[0]))]
    print("\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows))
    print("wrote compare.png")


# ==== Benchmark (tooling, not the lesson) and main ============================================


def benchmark(args):
    """Views/s of the training step, the objective's and the device augmentation's shares of it, and on CUDA the
    peak memory per view (weights and optimiser included). The data path's share is the log lines' `data` column."""
    check_args(args, 1)
    device, why = start_processes(args, False)
    pretrain_set, _, _, classes = make_datasets(args)
    model, _, optimizer, scaler = build_model(args, classes, device, False, lr=1e-4)
    views, labels, _ = next(iter(torch.utils.data.DataLoader(pretrain_set, args.batch_size, num_workers=args.workers)))
    views, labels, views_per_step = views.to(device), labels.to(device), args.batch_size * args.views
    z = torch.randn(args.batch_size, args.views, 128, device=device, requires_grad=True)
    functions = [lambda: train_step(model, optimizer, scaler, views, labels, args, device),
                 lambda: device_augment(views, args.small_images),
                 lambda: LOSSES[args.loss](z, args.temperature).backward()]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    times = [float("inf")] * len(functions)
    for attempt in range(21 if device.type == "cuda" else 4):  # the first, warm-up call of each compiles
        for n, fn in enumerate(functions):  # in turns: a slow spell of the machine falls on all of them alike
            start = time.perf_counter()
            fn()
            sync()
            times[n] = min(times[n], time.perf_counter() - start) if attempt else times[n]
    step, augment, objective = times
    print(f"{args.arch} at {args.image_size}px, K={args.batch_size} x M={args.views} = {views_per_step} views/step, "
          f"{args.loss}, {device.type}{' + compile' if args.compile else ''}, {args.precision} ({why})\n"
          f"  training step {views_per_step / step:.1f} views/s; shares of the step: objective {objective / step:.2%}, "
          f"device augmentation {augment / step:.1%}")
    if device.type == "cuda":
        print(f"  peak memory per view {torch.cuda.max_memory_allocated() / views_per_step / 2**20:.1f} MiB")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}, but no GPU is visible (use --device cpu)", everywhere=True)
        per_gpu = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
        try:
            with out_of_memory(f"with {per_gpu} x {args.views} = {per_gpu * args.views} views per GPU ({args.arch} at "
                               f"{args.image_size} px): run on more GPUs under torchrun, or lower --batch-size (the "
                               "square-root rule lowers the peak lr with it: half the batch, lr / 1.41)"):
                (compare if args.compare else benchmark if args.benchmark else train)(args)
        except RuntimeError as error:
            if "DataLoader worker" not in str(error):
                raise
            raise UserError(f"{str(error).splitlines()[0].rstrip('.')}. In a container, give it shared memory "
                            "(docker run --ipc=host, or --shm-size=16g), or lower --workers.") from None
    except UserError as error:
        if not error.everywhere or int(os.environ.get("RANK", 0)) == 0:
            print(f"polyview.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
