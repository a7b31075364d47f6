"""Poly-view contrastive learning (Shidani et al., ICLR 2024, arXiv 2403.05490), in one file.

SimCLR matches two augmented views of each image against the views of the other images in the batch. Poly-view
contrastive learning draws M > 2 views of each of K images and matches every view against all the others at once,
with objectives (Geometric and Arithmetic PVC, Sufficient Statistics) that bound the One-vs-Rest mutual information
between a view and the other M - 1 views of its image. Its headline: 128 epochs at batch 256 with M = 8 beat SimCLR
at 1024 epochs and batch 4096 on ImageNet-1k.

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --loss suffstats  # the paper's run
    python polyview.py --dataset cifar10 --arch resnet18                               # CIFAR-10 on one GPU

Part I is the method, in its order. Part II, "running it for real" (checks, errors, the run folder, pictures, the
benchmark, main), is called from it one named line at a time: a student can stop reading at its banner. To lift an
objective out, copy it, `similarities` and `without_diagonal` (torch alone); its naive loop is in test_polyview.py.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time
import traceback
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

# ======================================================================================================================
# Part I. The method: objectives, views, model, one training step, optimiser and schedule, the run, probes.
# ======================================================================================================================

# ---- 1. Objectives ---------------------------------------------------------------------------------------------------
#
# Notation. A batch holds K samples i, j with M views each, a, b, g. z[i,a] in R^D is the L2-normalised embedding of
# view a of sample i, and s(ia, jg) = <z[i,a], z[j,g]> / tau. Every objective takes z [K, M, D] and returns its mean
# over the anchor views (i, a). The negatives of an anchor are all M views of the K - 1 other samples:
# N[i,a] = sum_{j != i, g} exp s(ia, jg).
#
# What they estimate. The One-vs-Rest mutual information I(x_a; X_-a) between one view and the M - 1 other views of
# its sample. Each loss term asks the encoder to pick a positive out of C candidates (the positive and C - 1
# negatives), and as for InfoNCE (Oord et al., 2018) I(x_a; X_-a) >= log C - L, a bound that can never exceed log C:
#     simclr, multicrop                C = 2K - 1      (a pair term sees views a and b of the others)
#     geometric, arithmetic, suffstats C = M(K-1) + 1  (the positive and all views of the others)
#     supcon                           C = M(K-1) + 1  (its other positives are not draws from the marginal, so they
#                                      are not candidates; dropping them from its denominators gives Geometric's
#                                      smaller loss: a looser bound)
#     dcl                              none (its positive is not in its own denominator)
#
# Why M matters: at a fixed K, more views give each anchor M(K - 1) negatives, so the poly-view ceiling
# log(M(K-1) + 1) rises with M, and a rest-set of M - 1 views tells more about the anchor, so the true MI rises too.
# Multi-Crop's ceiling stays at log(2K - 1) whatever M is.


def without_diagonal(x):
    """x [..., M, M] -> [..., M, M - 1]: row a keeps the M - 1 entries x[..., a, b] with b != a, in order. Column c of
    row a reads b = c left of the diagonal and b = c + 1 from it on: at M = 3, the columns [1, 2], [0, 2], [0, 1]."""
    M = x.shape[-1]
    a = torch.arange(M, device=x.device)[:, None]                         # [M, 1]
    c = torch.arange(M - 1, device=x.device)[None, :]                     # [1, M-1]
    b = c + (c >= a).long()                                               # [M, M-1]: step over b = a
    return x.gather(-1, b.expand(*x.shape[:-1], M - 1))


def similarities(z, temperature, anchors=None):
    """What every objective shares: checks, L2 normalisation and the anchors' similarities.

    z is [K, M, D]. `anchors`, a slice of sample indices, picks the samples whose views act as anchors (all by
    default); they are contrasted against the whole of z. This is how one of many processes computes its share of the
    loss on a gathered batch: the mean over equal shards of anchors is the full loss. With A anchor samples it returns

        anchors_z      [A, M, D]      z[i,a], normalised
        sim            [A, M, K, M]   s(ia, jg), -inf where j = i: own views are never negatives
        positives      [A, M, M - 1]  s(ia, ib) for the M - 1 other views b != a of the anchor
        log_negatives  [A, M]         log N[i,a] = log sum_{j != i, g} exp s(ia, jg)

    all in float32 (or float64) whatever autocast is active: bf16 logits put a 2-9% error into the gradient at
    tau = 0.1. (On CUDA, TF32 would cost ~1e-4: this file never switches it on.)
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
        # The anchors' own views from a second, tiny product: reading them out of sim would send a full-size
        # gradient back through it.
        own = torch.einsum("iad,ibd->iab", scaled, z[anchors])             # [A, M, M]
    samples = torch.arange(K, device=z.device)
    sim = sim.masked_fill((samples[anchors, None] == samples)[:, None, :, None], float("-inf"))
    return z[anchors], sim, without_diagonal(own), sim.logsumexp(dim=(2, 3))


def simclr_loss(z, temperature, anchors=None):
    """SimCLR's NT-Xent (Chen et al., 2020) for M = 2 views: z is [K, 2, D]. The positive of anchor view (i, a) is the
    other view b = 1 - a of its sample; its candidates are all 2K - 1 other views:

        l[i,a] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i, g} exp s(ia, jg) ),   L = mean over i, a.
    """
    if z.dim() == 3 and z.shape[1] != 2:
        raise ValueError(f"simclr needs exactly M = 2 views, got M={z.shape[1]}")
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    positive = positives[..., 0]                                           # [A, 2]: the one other view
    return (torch.logaddexp(positive, log_negatives) - positive).mean()


def multicrop_loss(z, temperature, anchors=None):
    """Multi-Crop (Caron et al., 2020): SimCLR averaged over the ordered view pairs (a, b), a != b. A pair term only
    sees views a and b of the other samples, 2(K - 1) negatives whatever M is:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i} [exp s(ia, ja) + exp s(ia, jb)] ),
        L = mean over i, a, b != a.
    """
    _, sim, positives, _ = similarities(z, temperature, anchors)
    per_view = sim.logsumexp(dim=2)                          # [A, M, M]: log sum_{j != i} exp s(ia, jg), each g
    views_a = per_view.diagonal(dim1=1, dim2=2)[..., None].expand_as(positives)   # [A, M, M-1]: g = a
    views_b = without_diagonal(per_view)                                          # [A, M, M-1]: g = b
    log_denominator = torch.stack([positives, views_a, views_b]).logsumexp(dim=0)  # the three terms of the log
    return (log_denominator - positives).mean()


def geometric_loss(z, temperature, anchors=None):
    """Geometric PVC (Shidani et al., 2024): every positive b of anchor (i, a) is classified against the same
    negatives N[i,a], all views of all other samples:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + N[i,a] ),      p[i,a,b] = exp(-l[i,a,b]),
        L = mean over i, a, b != a of l[i,a,b]     (-log of the geometric mean of the M - 1 p's).
    """
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    return (torch.logaddexp(positives, log_negatives[..., None]) - positives).mean()


def arithmetic_loss(z, temperature, anchors=None):
    """Arithmetic PVC (Shidani et al., 2024): -log of the arithmetic mean of the M - 1 per-positive probabilities
    p[i,a,b] of `geometric_loss`:

        L = mean over i, a of -log( 1/(M-1) sum_{b != a} p[i,a,b] ).

    By AM >= GM it is never above the Geometric loss; the two agree at M = 2.
    """
    # A deliberate reading: copies of the paper's pseudo-code write this branch as logsumexp(losses) - log(k), a
    # soft-max over pair losses. We follow the objective's name and the AM >= GM ordering against Geometric PVC.
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    log_p = positives - torch.logaddexp(positives, log_negatives[..., None])  # [A, M, M-1]
    return (math.log(positives.shape[2]) - log_p.logsumexp(dim=2)).mean()


def suffstats_loss(z, temperature, anchors=None):
    """Sufficient Statistics (Shidani et al., 2024): one positive per anchor, the re-normalised mean of its M - 1 other
    views, against the same negatives N[i,a] as PVC:

        t[i,a] = normalise( sum_{b != a} z[i,b] ),        u[i,a] = <z[i,a], t[i,a]> / tau,
        L = mean over i, a of -u[i,a] + log( exp u[i,a] + N[i,a] ).

    At M = 2, t[i,a] is the other view and this is SimCLR.
    """
    # A deliberate reading: the mean of the other views is the sufficient statistic of the rest-set (the
    # exponential-family argument), contrasted against the PVC negatives so that this is exactly SimCLR at M = 2.
    anchors_z, _, _, log_negatives = similarities(z, temperature, anchors)
    t = F.normalize(anchors_z.sum(dim=1, keepdim=True) - anchors_z, dim=-1)    # [A, M, D]: the others' mean
    u = (anchors_z * t).sum(dim=-1) / temperature                              # [A, M]
    return (torch.logaddexp(u, log_negatives) - u).mean()


def supcon_loss(z, temperature, anchors=None, labels=None):
    """SupCon's L_out (Khosla et al., 2020) over M views. The positives P of anchor (i, a) are its M - 1 other views,
    or with labels [K] every other view of every sample of its label; the candidates are all K*M - 1 other views,
    positives included:

        l[i,a] = -1/|P| sum_{p in P} [ s(ia, p) - log sum_{q != ia} exp s(ia, q) ],  L = mean over i, a.

    Unlike Geometric PVC, whose denominators hold one positive each, every denominator here holds all the other
    positives too. At M = 2 without labels it is SimCLR.
    """
    _, sim, positives, log_negatives = similarities(z, temperature, anchors)
    log_candidates = torch.logaddexp(log_negatives, positives.logsumexp(dim=2))   # [A, M]: all K*M - 1 others
    if labels is None:  # P: the M - 1 other views
        return (log_candidates[..., None] - positives).mean()
    K, M = z.shape[:2]
    if labels.shape != (K,):
        raise ValueError(f"labels must have shape [K] = [{K}], got {list(labels.shape)}")
    # With labels, P also holds all M views of every other sample j that shares the anchor's label.
    anchors = anchors or slice(0, K)
    samples = torch.arange(K, device=z.device)
    same_label = (labels[anchors, None] == labels) & (samples[anchors, None] != samples)  # [A, K]
    own_views = positives.sum(dim=2)                                                       # [A, M]
    # sim is -inf at j = i: pick with where, since 0 * -inf would be nan.
    their_views = torch.where(same_label[:, None, :, None], sim, 0.0).sum(dim=(2, 3))     # [A, M]
    count = (M - 1) + M * same_label.sum(dim=1, keepdim=True)                             # [A, 1]: |P|
    return (log_candidates - (own_views + their_views) / count).mean()


def dcl_loss(z, temperature, anchors=None):
    """Decoupled contrastive learning (Yeh et al., 2022): InfoNCE with eps = 0, the positive left out of its own
    denominator, against the poly-view negatives:

        l[i,a,b] = -s(ia, ib) + log N[i,a],      L = mean over i, a, b != a.
    """
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    return (log_negatives[..., None] - positives).mean()


LOSSES = {"simclr": simclr_loss, "multicrop": multicrop_loss, "geometric": geometric_loss,
          "arithmetic": arithmetic_loss, "suffstats": suffstats_loss, "supcon": supcon_loss, "dcl": dcl_loss}


@torch.no_grad()
def contrastive_top1(z, temperature, anchors=None):
    """Percent of the (anchor, positive) pairs (ia, ib), b != a, whose positive beats every negative: s(ia, ib) >
    max_{j != i, g} s(ia, jg), with the same poly-view negatives for every objective, so that runs of different
    objectives compare. A contrastive loss can flatten while this still climbs."""
    _, sim, positives, _ = similarities(z, temperature, anchors)
    return (positives > sim.amax(dim=(2, 3))[..., None]).float().mean() * 100


# ---- 2. Views: SimCLR's augmentations. Crops and flips on the CPU workers, colour on the device. -------------------

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, applied inside the model


def random_crop_and_flip(size):
    """The part of SimCLR's views drawn on the CPU, per view, on uint8 images: a random-resized crop (area 0.08-1 of
    the image, aspect 3/4-4/3) to size x size and a horizontal flip (p = 0.5). Colour follows on the device."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToImage()])


def centre_crop(size, small_images):
    """The probe's view: the short side resized to 8/7 of the crop (small images: to the crop), its centre, uint8."""
    return v2.Compose([v2.Resize(size if small_images else size * 8 // 7, antialias=True), v2.CenterCrop(size),
                       v2.ToImage()])


class MultiView(torch.utils.data.Dataset):
    """Item i: (views [M, 3, H, W] uint8, label), M independent crops of image i, which is decoded once."""

    def __init__(self, dataset, transform, num_views):
        self.dataset, self.transform, self.num_views = dataset, transform, num_views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return torch.stack([self.transform(image) for _ in range(self.num_views)]), label


# The colour half of SimCLR's views runs on the device, on the whole batch of views at once, each view with its own
# random parameters (on the CPU it would cost several times the decode). Images are float [N, 3, H, W] in [0, 1], a
# per-view parameter a tensor [N]; draws stay on the device and torch.where replaces branches: nothing waits for the
# GPU. Each op equals torchvision's (tested).


def luma(images):
    """ITU-R 601-2 luma Y = 0.2989 R + 0.587 G + 0.114 B: [N, 3, H, W] -> [N, 1, H, W]."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_colour(images, op, factor):
    """Brightness (op 0), contrast (1) or saturation (2), chosen per view by op [N], with factor [N]. Each is a blend
    x -> clamp(f x + (1 - f) y, 0, 1) with its own y: black, the image's mean luma, or its luma image. A factor of 1
    leaves the view exactly as it was."""
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
    """SimCLR's RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p = 0.8), drawn per view: brightness, contrast and
    saturation factors ~ U[max(0, 1 - 0.8s), 1 + 0.8s], a hue shift ~ U[-0.2s, 0.2s], the four ops in a random order
    per view (as torchvision draws a randperm)."""
    n, device = len(images), images.device
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    factors = low + (high - low) * torch.rand(n, 4, device=device)      # [N, 4]; column 3 unused
    shift = 0.2 * strength * (2 * torch.rand(n, device=device) - 1)     # [N]
    op_at = torch.rand(n, 4, device=device).argsort(dim=1)              # [N, 4]: a permutation per view
    factor_at = factors.gather(1, op_at)                                # [N, 4]: the factor at each step
    hue_at = op_at.argmax(dim=1)                                        # [N]: the step where op 3, hue, runs
    # Hue, an HSV round trip, is the costly op: run it once for all views, between the blends each view orders before
    # it and those it orders after it (a factor of 1 skips a step).
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
    """Blur each view with its own sigma [N], reflect padding at the borders. The kernel w(x) = exp(-x^2 / (2 sigma^2))
    / sum, x = -(k-1)/2 .. (k-1)/2, is separable: a horizontal then a vertical pass, 2k taps per pixel, not k^2."""
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


def device_augment(crops, small_images):
    """uint8 crops [n, M, 3, H, W] -> the views, float [n, M, 3, H, W] in [0, 1]: colour jitter (strength s = 1, or 0.5
    on small images such as CIFAR), grayscale, and a blur of about 10% of the side (not on small images), in order."""
    x = crops.flatten(0, 1).float() / 255                                # [n*M, 3, H, W]
    x = random_grayscale(colour_jitter(x, strength=0.5 if small_images else 1.0))
    if not small_images:
        x = random_blur(x, kernel_size=int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    return x.view(crops.shape)


def make_datasets(args):
    """(the pre-training set of M-view items, the probes' train and val sets of centre crops, the number of classes).
    Each item also counts the undecodable files skipped to reach it."""
    decode = v2.ToImage()  # once per image: PIL -> uint8 [3, H, W], which crops twice as fast as PIL
    if args.dataset == "fake":  # random images, for the benchmark
        shape = (3, args.image_size, args.image_size)
        train = torchvision.datasets.FakeData(50 * args.batch_size, shape, 10, decode)
        val = torchvision.datasets.FakeData(10 * args.batch_size, shape, 10, decode, random_offset=10**6)
    else:  # ImageFolders, val's labels by train's class names; or CIFAR, downloaded once per machine
        train, val = read_dataset(args, decode)
    crop, centre = random_crop_and_flip(args.image_size), centre_crop(args.image_size, args.small_images)
    datasets = [MultiView(train, crop, args.views), MultiView(train, centre, 1), MultiView(val, centre, 1)]
    classes = train.num_classes if args.dataset == "fake" else len(train.classes)
    return *[SkipUndecodable(dataset) for dataset in datasets], classes


# ---- 3. Model -------------------------------------------------------------------------------------------------------


class PolyViewNet(nn.Module):
    """Images in [0, 1], normalised by ImageNet's mean and std, into a torchvision ResNet without its classifier (the F
    features the probes see), then SimCLR's projector as its official code builds it: Linear(F, F) - BN - ReLU -
    Linear(F, 128) - BN, no bias where a BN follows, no beta in the last BN (the embeddings z). The last BN of every
    residual block starts at 0. Beside them, as in SimCLR's code, the online probe: a linear classifier on the features
    of every training view behind a stop-gradient, which shows the features improving where the loss cannot."""

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
        """views [n, M, 3, H, W] -> (z [n, M, D], the online probe's logits [n*M, classes])."""
        n, M = views.shape[:2]
        features = self.features(views.flatten(0, 1))                  # [n*M, F]
        return self.projector(features).view(n, M, -1), self.online_probe(features.detach())


def mixed_precision(device, precision):
    """The model's autocast: matmuls and convolutions in bf16 or fp16, or none (fp32). See `choose_precision`."""
    return torch.autocast(device.type, torch.float16 if precision == "fp16" else torch.bfloat16,
                          enabled=precision != "fp32")


# ---- 4. One training step. Under torchrun every process's embeddings are every process's negatives. ----------------


class GatherWithGrad(torch.autograd.Function):
    """All ranks' x [n, ...] -> [world * n, ...], in rank order. Every rank's loss uses every rank's embeddings, so the
    gradient of the embeddings this rank made is the sum of what all ranks' losses send them: backward all-reduces and
    keeps this rank's slice. With DDP's gradient averaging on top, this is the single-process, full-batch gradient."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def step_loss(model, views, labels, objective, temperature, supervised=False):
    """This rank's share of a step on views [n, M, 3, H, W] of n images with labels [n]: (the loss to minimise, [the
    objective's loss, contrastive top-1, online probe top-1] for the log). The objective takes this rank's anchors
    against the embeddings (and, supervised, labels) of all ranks; the probe's cross-entropy trains the probe."""
    z, logits = model(views)                                          # [n, M, D], [n*M, classes]
    # BN leaves bf16 or fp16 under autocast: gather z, and sum its gradient over ranks, in float32 (or float64).
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    n, M = views.shape[:2]
    rank = dist.get_rank() if dist.is_initialized() else 0
    anchors = slice(rank * n, (rank + 1) * n)                         # this rank's images among all K
    if dist.is_initialized():
        z, all_labels = GatherWithGrad.apply(z), GatherWithGrad.apply(labels)    # [K, M, D], [K]: K = n * world
    else:
        all_labels = labels
    loss = objective(z, temperature, anchors, labels=all_labels) if supervised else objective(z, temperature, anchors)
    view_labels = labels.repeat_interleave(M)                         # [n*M]: view (i, a) has image i's label
    probe_loss = F.cross_entropy(logits, view_labels)
    probe_top1 = (logits.detach().argmax(dim=1) == view_labels).float().mean() * 100
    return loss + probe_loss, torch.stack([loss.detach(), contrastive_top1(z, temperature, anchors), probe_top1])


def train_step(model, optimizer, scaler, views, labels, args):
    """One step on this rank's views [n, M, 3, H, W] (float, on the device) and labels [n]; returns the log's [loss,
    contrastive top-1, online probe top-1]. Under fp16 the scaler multiplies the loss by S (65536 at first) so that
    small gradients survive fp16, and divides the gradients by S before LARS, whose trust ratio divides by their norm,
    sees them; a step whose gradients overflow is skipped and S halved: the step's one wait for the GPU."""
    with mixed_precision(views.device, args.precision):
        loss, stats = step_loss(model, views, labels, LOSSES[args.loss], args.temperature, args.supervised)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)  # skipped if a gradient overflowed: weights and momentum stay as they were
    scaler.update()
    return stats


# ---- 5. Optimiser and schedule ---------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each weight's step scaled by its layer's trust ratio (You et al., 2017), the learning rate
    inside the momentum as in SimCLR's code, so that a new rate (through warm-up and decay) scales new gradients, not
    the velocity already built up:

        g = grad + weight_decay * w,     trust = trust_coefficient * ||w|| / ||g||,
        v <- momentum * v + lr * trust * g,     w <- w - v.

    Biases and BatchNorm parameters (the 1-D ones), and groups with adapt=False, get neither decay nor adaptation."""

    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, adapt=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in (w for w in group["params"] if w.grad is not None):
                g = w.grad
                if w.ndim > 1 and group["adapt"]:  # decay, then the trust ratio (no wait for the GPU: torch.where)
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = group["trust_coefficient"] * w_norm / g_norm
                    g = g.mul(torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0))
                if "velocity" not in self.state[w]:
                    self.state[w]["velocity"] = torch.zeros_like(w)
                velocity = self.state[w]["velocity"]
                velocity.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                w.sub_(velocity)


def learning_rate(step, total_steps, warmup_steps, peak):
    """Linear warm-up to the peak over W = warmup_steps, then cosine decay to 0 at T = total_steps:
    lr(t) = peak (t + 1) / W for t < W, and peak (1 + cos(pi (t - W) / (T - W))) / 2 after."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def peak_learning_rate(args):
    """SimCLR's two rules, K counted in images per step (not views), as SimCLR counts its batch: square root,
    lr * sqrt(K), or linear, lr * K / 256. At K = 4096 the defaults agree (4.8)."""
    return args.lr * (math.sqrt(args.batch_size) if args.lr_scaling == "sqrt" else args.batch_size / 256)


# ---- 6. The run ------------------------------------------------------------------------------------------------------

STREAMS = ("views", "order", "weights", "probe")  # a run's random streams: views, data order, initial weights, probe


def stream_seed(stream, seed, rank=0, epoch=0):
    """The seed of a stream in STREAMS, mixed from (stream, seed, rank, epoch) by numpy's SeedSequence: no two tuples
    share one (a sum seed + rank + epoch would let --seed 1 replay --seed 0 one epoch later)."""
    return int(np.random.SeedSequence([STREAMS.index(stream), seed, rank, epoch]).generate_state(1, np.uint64)[0])


def start_processes(args):
    """This process's device. torchrun sets RANK (as in nanoGPT); then each process takes its own GPU and joins the
    others, NCCL between GPUs, gloo between CPU processes. Plain `python` runs one process. Resolves --precision."""
    device = torch.device(args.device)
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest convolutions for these shapes
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    args.precision, args.precision_reason = choose_precision(args.precision, device.type, capability)
    return device


def build_model(args, classes, device, lr, checkpoint=None):
    """(the model to call, the plain module that checkpoints and probes use, its LARS, fp16's loss scaler), restored
    from the checkpoint where a run resumes."""
    torch.manual_seed(stream_seed("weights", args.seed))  # the same initial weights on every rank
    model = PolyViewNet(args.arch, args.small_images, classes)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        load_weights(args, model.backbone)
    if dist.is_initialized() and device.type == "cuda":  # all M views of an image share a GPU, so per-GPU batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics would leak which views belong together
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    # The online probe shares the optimiser and schedule, without decay or trust ratio, as in SimCLR's code (a trust
    # ratio of 0.001 would barely move a classifier that starts from scratch).
    contrastive = [p for name, p in model.named_parameters() if not name.startswith("online_probe.")]
    optimizer = LARS([{"params": contrastive}, {"params": model.online_probe.parameters(), "adapt": False}], lr,
                     args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"] or scaler.state_dict())  # empty after a bf16 or fp32 run
    raw_model = model
    if args.compile:
        model.backbone.compile()  # in place: the state_dict keys stay the same
    if dist.is_initialized():  # SyncBN keeps the BN statistics equal on every rank: no buffers to broadcast
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    return model, raw_model, optimizer, scaler


def train(args):
    """Pre-train with the objective, watching the online probe; then measure the backbone with the fast probe."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = start_processes(args)
    checkpoint = resume_point(args)                                    # None, or the last epoch's, to go on from
    pretrain_set, probe_train_set, probe_val_set, classes = make_datasets(args)
    sampler = torch.utils.data.DistributedSampler(pretrain_set, world_size, rank, drop_last=True)
    loader = torch.utils.data.DataLoader(pretrain_set, args.batch_size // world_size, sampler=sampler, drop_last=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda")
    total_steps = args.epochs * len(loader)
    warmup_steps = round(min(args.warmup_epochs, args.epochs / 10) * len(loader))
    peak_lr = peak_learning_rate(args)
    model, raw_model, optimizer, scaler = build_model(args, classes, device, peak_lr, checkpoint)
    first_epoch, step = (checkpoint["epoch"], checkpoint["step"]) if checkpoint else (0, 0)
    first_step = step
    log = Log(args, raw_model, len(pretrain_set), len(loader), checkpoint)  # the start line, then the numbers
    for epoch in range(first_epoch, args.epochs):
        model.train()
        # Every stream from (seed, rank, epoch), so that a resumed run draws the order and the views it would have
        # drawn (the workers seed from torch's RNG). The sampler's own seed + epoch would repeat across seeds.
        sampler.seed = stream_seed("order", args.seed, 0, epoch)
        torch.manual_seed(stream_seed("views", args.seed, rank, epoch))
        for crops, labels in log.timed(loader):                          # [n, M, 3, H, W] uint8, [n]: n = K / world
            views = device_augment(crops.to(device, non_blocking=True), args.small_images)
            if step == first_step:  # what the model sees: the M views of 4 images
                save_grid([list(image_views) for image_views in views[:4]], Path(args.out) / "views.png")
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(model, optimizer, scaler, views, labels.to(device, non_blocking=True), args)
            step += 1
            log.step(step, epoch, lr, stats)
        log.epoch_end(step, epoch, online_val_top1(raw_model, probe_val_set, device, args))
        save(Path(args.out) / "checkpoint.pt", {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step,
                                                "args": vars(args)})
    # The backbone alone, in torchvision's keys (no fc): the README loads it into torchvision's own ResNet.
    save(Path(args.out) / "backbone.pt", {k: v.cpu().contiguous() for k, v in raw_model.backbone.state_dict().items()})
    probe = fast_probe(raw_model, probe_train_set, probe_val_set, args, device) if args.probe_epochs > 0 else None
    report(args, probe)                                                  # the summary, probe.json, training.png
    if dist.is_initialized():
        dist.destroy_process_group()


# ---- 7. Probes. The online probe (in PolyViewNet) watches a run; the fast probe measures its end. -------------------

@torch.no_grad()
def extract_features(model, dataset, device, args):
    """(features [N, F] float32, labels [N]) of centre crops in eval mode, on rank 0; (None, None) on the others. Rank
    r of W extracts the items r R to (r + 1) R - 1, R = ceil(N / W), padded to R rows with the label -1, and rank 0
    gathers every rank's rows into the bank, in the dataset's order."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    rows = math.ceil(len(dataset) / world)
    mine = torch.utils.data.Subset(dataset, range(rank * rows, min((rank + 1) * rows, len(dataset))))
    loader = torch.utils.data.DataLoader(mine, 256, num_workers=args.workers, pin_memory=device.type == "cuda")
    features = torch.zeros(rows, model.projector[0].in_features, device=device)
    labels = torch.full((rows,), -1, dtype=torch.long, device=device)
    model.eval()
    start = 0
    for crops, label, _ in loader:                                      # crops [B, 1, 3, H, W] uint8
        images = crops.flatten(0, 1).to(device, non_blocking=True).float() / 255
        with mixed_precision(device, args.precision):
            features[start:start + len(images)] = model.features(images).float()
        labels[start:start + len(images)] = label.to(device)
        start += len(images)
    if world == 1:
        return features, labels
    banks = [x.new_empty(world, *x.shape) if rank == 0 else None for x in (features, labels)]   # [W, R, ...]
    for x, bank in zip((features, labels), banks):
        dist.gather(x, list(bank.unbind()) if rank == 0 else None, dst=0)  # into views of one buffer: no copy
    return tuple(bank.flatten(0, 1)[:len(dataset)] if rank == 0 else None for bank in banks)


@torch.no_grad()
def online_val_top1(model, dataset, device, args):
    """The online probe's val top-1 in percent (centre crops, eval mode, every rank its shard), on rank 0."""
    features, labels = extract_features(model, dataset, device, args)
    if features is not None:
        return (model.online_probe(features).argmax(dim=1) == labels).float().mean().item() * 100


@torch.no_grad()
def knn(train_x, train_y, val_x, k=20, temperature=0.07):
    """The k-NN probe (Wu et al., 2018): each val image votes for the classes of its k most cosine-similar train images,
    a vote weighing exp(similarity / 0.07). Returns the predictions [N_val] and neighbours [N_val, k], nearest first."""
    train_norms = train_x.norm(dim=1).clamp_min(1e-12)                   # [N]: cosine, without a normalised copy
    predictions, neighbours = [], []
    for queries in F.normalize(val_x, dim=1).split(256):                # [B, F]
        similarity = queries @ train_x.T                                 # [B, N]
        similarity /= train_norms                                        # in place: 1.3 GB on ImageNet
        top, index = similarity.topk(min(k, len(train_x)), dim=1)        # [B, k]
        votes = top.new_zeros(len(queries), int(train_y.max()) + 1)
        predictions.append(votes.scatter_add_(1, train_y[index], (top / temperature).exp()).argmax(dim=1))
        neighbours.append(index)
    return torch.cat(predictions), torch.cat(neighbours)


def linear_probe(train_x, train_y, val_x, val_y, epochs, device, min_steps=1000):
    """Top-1 and top-5 (None under 5 classes) in percent of a linear classifier on frozen features [N, F], standardised
    (a BatchNorm without affine, frozen at the end; train_x in place: ImageNet's is 10.5 GB), trained with AdamW on a
    cosine schedule for max(epochs x ceil(N / 1024), min_steps) steps of 1,024: 112,680 on ImageNet at 90 epochs, and
    1,000, not 90, on a few hundred images, where its val top-1 has plateaued."""
    classes = int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x -= mean
    train_x /= std
    val_x = (val_x - mean) / std
    classifier = nn.Linear(train_x.shape[1], classes).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-3, weight_decay=1e-4)
    batches_per_epoch = math.ceil(len(train_x) / 1024)
    steps = max(epochs * batches_per_epoch, min_steps)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        if step % batches_per_epoch == 0:  # a new epoch, a new order
            batches = torch.randperm(len(train_x), device=device).split(1024)
        batch = batches[step % batches_per_epoch]
        loss = F.cross_entropy(classifier(train_x[batch]), train_y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        hits = classifier(val_x).topk(min(5, classes), dim=1).indices == val_y[:, None]   # [N, 5]
    return {"top1": hits[:, 0].float().mean().item() * 100,
            "top5": hits.any(dim=1).float().mean().item() * 100 if classes >= 5 else None}


def fast_probe(model, train_set, val_set, args, device):
    """The backbone's features of centre crops (every rank its shard), then on rank 0 the k-NN, neighbours.png and the
    linear classifier. Not SimCLR's linear evaluation (90 epochs of SGD on random crops and flips): compare its numbers
    across runs of this file, not with the paper's. Returns them on rank 0, None on the others."""
    train_x, train_y = extract_features(model, train_set, device, args)
    val_x, val_y = extract_features(model, val_set, device, args)
    if train_x is None:
        return None
    predictions, neighbours = knn(train_x, train_y, val_x)
    save_neighbours_png(train_set, val_set, train_y, val_y, neighbours, Path(args.out) / "neighbours.png")
    torch.manual_seed(stream_seed("probe", args.seed))
    return {"protocol": "fast linear probe: AdamW on standardised frozen features of centre crops, not SimCLR's linear "
            "evaluation (90 epochs of SGD on random crops and flips)",
            **linear_probe(train_x, train_y, val_x, val_y, args.probe_epochs, device),
            "knn_top1": (predictions == val_y).float().mean().item() * 100}


# ======================================================================================================================
# Part II. Running it for real: flags and their checks; one-line errors that every process agrees on; the data's
# guards; the run folder, its log and resume; --weights; pictures and --compare; the benchmark; main.
# ======================================================================================================================


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Poly-view contrastive pre-training, then a fast probe. Defaults: SimCLR")
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
    """Fail fast, before any data or GPU is touched. Every process meets these errors; rank 0 alone prints them."""
    bounds = dict(views=2, batch_size=2, epochs=0, workers=0, probe_epochs=0, log_every=1, image_size=8, seed=0,
                  warmup_epochs=0, weight_decay=0, lr=0, temperature=0)
    for name, least in bounds.items():
        value, rule = getattr(args, name), ">" if name in ("lr", "temperature") else ">="
        if not (value > least if rule == ">" else value >= least) or value == math.inf:  # nan fails both
            raise UserError(f"--{name.replace('_', '-')} must be a finite number {rule} {least}, got {value}", True)
    try:  # the objective knows its own rules (simclr needs M = 2)
        LOSSES[args.loss](torch.randn(2, args.views, 4), args.temperature)
    except ValueError as error:
        raise UserError(f"--loss {args.loss} --views {args.views}: {error}", True)
    for broken, message in [
            (args.supervised and args.loss != "supcon", f"--supervised is supcon's form, not --loss {args.loss}"),
            (args.batch_size % world_size, f"--batch-size {args.batch_size} must divide among {world_size} processes"),
            (args.benchmark and world_size > 1, "--benchmark measures one GPU: run it with python, not torchrun")]:
        if broken:
            raise UserError(message, True)


def choose_precision(requested, device_type, capability=None):
    """(precision, reason). auto: bf16 autocast from compute capability 8.0 (A100, H100, RTX 30xx); fp16 with a loss
    scaler below (T4, V100), where bf16 is emulated though torch.cuda.is_bf16_supported() says True; fp32 on the CPU."""
    if requested != "auto":
        return requested, "--precision"
    if device_type != "cuda":
        return "fp32", "auto: on the CPU"
    bf16 = capability >= (8, 0)
    return ("bf16" if bf16 else "fp16"), (f"auto: compute capability {capability[0]}.{capability[1]} has "
                                          f"{'' if bf16 else 'no '}bf16 hardware")


class UserError(Exception):
    """A problem with the command line, the data or the run folder: one line, exit 2. Under torchrun, one that every
    process meets (`everywhere`) is printed once, by rank 0."""

    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


def agree(work):
    """work() on every process; a UserError on any becomes the same error on all, named by the first that failed: a
    process that stopped alone would leave the others waiting at their next collective forever."""
    try:
        result, error = work(), None
    except UserError as caught:
        result, error = None, str(caught)
    errors = [error] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(errors, error)  # also where the processes wait for each other
    for rank, message in enumerate(errors):
        if message:
            raise UserError(message if rank == 0 else f"(rank {rank}) {message}", everywhere=True)
    return result


def is_main_process():
    return not dist.is_initialized() or dist.get_rank() == 0


def out_of_memory(args, error):
    """Where CUDA ran out of memory (read off the traceback), and the way out."""
    where = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    n = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
    if "fast_probe" in where:
        return (f"in the fast probe (rank 0 holds every training feature): probe {args.out}/backbone.pt with --weights"
                " and --epochs 0 into another --out, on a GPU with more memory or with --device cpu")
    return (f"in the online probe's val pass: lower --batch-size; {checkpoint_kept(args)}" if "online_val_top1" in where
            else f"with {n} x {args.views} = {n * args.views} views per GPU ({args.arch} at {args.image_size} px): run "
            "on more GPUs under torchrun, or lower --batch-size (half the batch: lr / 1.41, by the square-root rule)")


class SkipUndecodable(torch.utils.data.Dataset):
    """Item i: (*dataset[i], skipped). A file that fails to decode, whatever the exception (OSError, SyntaxError,
    DecompressionBombError...), is skipped with a warning naming it, the next standing in; `skipped` counts them."""

    def __init__(self, dataset):
        self.dataset, self.folder = dataset, getattr(dataset, "dataset", dataset)  # the ImageFolder of a MultiView

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        for skipped in range(len(self)):
            i = (index + skipped) % len(self)
            try:
                return *self.dataset[i], skipped
            except Exception as error:
                name = self.folder.samples[i][0] if hasattr(self.folder, "samples") else f"#{i}"
                warnings.warn(f"skipping undecodable image {name}: {type(error).__name__}: {error}")
        raise UserError(f"none of the {len(self)} images in {getattr(self.folder, 'root', 'it')} could be decoded")


def read_dataset(args, decode):
    """(train, val), read and checked on every process. CIFAR: one process per machine (LOCAL_RANK 0) downloads it,
    then all read it. ImageFolders number their classes by their own sorted names, so a val/ without one class would
    shift every label after it: val's labels are train's, by name."""
    root = Path(args.data)
    cifar = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100

    def read_cifar(download):
        try:
            return [cifar(root, train=split, transform=decode, download=download) for split in (True, False)]
        except (OSError, RuntimeError) as error:
            raise UserError(f"--dataset {args.dataset} could not be read or downloaded into {root}: {error}")

    def read_folders():
        try:  # no folder, no class folders in it (as ImageNet's val/ ships), or a class folder without an image
            train, val = (torchvision.datasets.ImageFolder(root / split, decode) for split in ("train", "val"))
        except FileNotFoundError as error:
            raise UserError(f"--data {root} must hold the ImageFolders train/ and val/, one sub-folder per class (sort "
                            f"ImageNet's flat val/ into them with valprep.sh): {error}")
        if unknown := sorted(set(val.classes) - set(train.classes)):
            raise UserError(f"{root / 'val'} has {len(unknown)} classes that train/ lacks: {', '.join(unknown[:5])}")
        val.samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
        val.classes, val.class_to_idx = train.classes, train.class_to_idx
        with warnings.catch_warnings():  # a folder where nothing decodes stops here, at once
            warnings.simplefilter("ignore")
            SkipUndecodable(train)[0], SkipUndecodable(val)[0]
        if len(train) < args.batch_size:
            raise UserError(f"{len(train)} images in {root / 'train'} make no full batch of {args.batch_size}")
        return train, val
    if not args.dataset.startswith("cifar"):
        return agree(read_folders)
    downloaded = agree(lambda: read_cifar(download=True) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None)
    return agree(lambda: downloaded or read_cifar(download=False))


def load_weights(args, backbone):
    """--weights into the backbone on every process: a run's backbone.pt, or torchvision's file (its fc dropped)."""
    def load():
        try:  # weights_only: never run pickled code; load_state_dict names each key that differs (missing ones last)
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        except Exception as error:  # no file, not a torch file, not a state_dict, or one of another model
            stem = "3x3 stem of small images" if args.small_images else "ImageNet stem"
            details = " ".join(" ".join(sorted(str(error).splitlines(), key=lambda line: "Missing" in line)).split())
            raise UserError(f"--weights {args.weights} does not load into --arch {args.arch} at {args.image_size} px "
                            f"({stem}): {type(error).__name__}: {details[:300]}{'...' * (len(details) > 300)}")
    agree(load)


def save(path, state):
    """torch.save(state), or a string's text, by rank 0 into a temporary file, flushed to disk, then renamed over path:
    a crash at any moment leaves either the old file or the new one, whole (a rename is atomic)."""
    if is_main_process():
        temporary = path.with_name(path.name + ".tmp")
        try:
            with open(temporary, "wb") as f:
                f.write(state.encode()) if isinstance(state, str) else torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def resume_point(args):
    """The checkpoint to go on from (None where there is none) as rank 0 sees it, on every process: where machines
    share no filesystem, a process that looked itself would start afresh while rank 0 resumes. It must share the
    settings of the model, data, objective and schedule."""
    path = Path(args.out) / "checkpoint.pt"

    def load():
        if not is_main_process() or not path.exists():
            return None
        if not args.resume:
            raise UserError(f"{path} exists: add --resume to continue it, or choose another --out")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        for key in ("arch", "loss", "supervised", "views", "batch_size", "dataset", "image_size", "epochs",
                    "lr_scaling", "lr", "warmup_epochs", "temperature", "weight_decay", "seed", "weights"):
            if (was := checkpoint["args"].get(key)) != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{path} was trained with {flag} {was}, this run asks for {flag} {getattr(args, key)}: "
                                f"resume with the same {flag}, or choose another --out")
        print(f"resuming {path} at epoch {checkpoint['epoch']}, step {checkpoint['step']}")
        return checkpoint
    found = [agree(load)]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)  # pickled: a ResNet-50 checkpoint is ~0.3 GB, once
    return found[0]


def checkpoint_kept(args):
    path = Path(args.out) / "checkpoint.pt"
    return f"{path} (the last epoch finished) is kept as it was" if path.exists() else "no checkpoint yet"


def read_metrics(path):  # less a last line cut short by a crash (it cannot end in '}')
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


class Log:
    """What a run prints and keeps in OUT/metrics.jsonl, by rank 0: every --log-every steps and at each epoch's end,
    the means over those steps and over ranks of the loss, contrastive and online probe top-1, views/s, the share of
    time spent waiting for data and eta; after each epoch, the online probe's val top-1. Its clock runs through the
    steps only, standing still from an epoch's last step to the next epoch's first batch (the val pass, the
    checkpoint, the workers' restart). Every rank sees the same means, so all meet the stop rules together."""

    def __init__(self, args, model, images, steps_per_epoch, checkpoint):
        self.args, self.enough, self.total_steps = args, min(1000, images), args.epochs * steps_per_epoch
        self.path, self.views_per_step = Path(args.out) / "metrics.jsonl", args.batch_size * args.views
        self.window, self.waited, self.skipped, self.read = [], 0.0, 0, 0
        self.tick = self.paused = time.perf_counter()
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save(self.path.with_name("args.json"), json.dumps(vars(args), indent=1))
            if checkpoint is None and self.path.exists():  # from an earlier run here that never reached a checkpoint
                os.replace(self.path, self.path.with_name("metrics.old.jsonl"))
            # A resumed run drops what a crashed run logged after its checkpoint; a fresh one starts empty.
            records = [r for r in read_metrics(self.path) if r["step"] <= checkpoint["step"]] if checkpoint else []
            save(self.path, "".join(json.dumps(r) + "\n" for r in records))
            print(f"{args.loss}{' (supervised)' * args.supervised}: K={args.batch_size} images x M={args.views} views "
                  f"per step on {os.environ.get('WORLD_SIZE', 1)} x {args.device} in {args.precision} "
                  f"({args.precision_reason}), {args.arch} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
                  f"parameters), {steps_per_epoch} steps/epoch, peak lr {peak_learning_rate(args):.3g}")

    def timed(self, loader):
        """The loader's (crops, labels) on the log's clock, counting the undecodable files it skipped."""
        for n, (crops, labels, skipped) in enumerate(loader):
            arrived = time.perf_counter()
            if n == 0:  # the clock stood still since the last epoch's last step
                self.tick += arrived - self.paused
            else:
                self.waited += arrived - asked
            self.skipped, self.read = self.skipped + int(skipped.sum()), self.read + len(skipped) + int(skipped.sum())
            yield crops, labels
            asked = time.perf_counter()
        if self.window:  # the epoch's last steps, checked before the val pass and the checkpoint
            self.line()
        self.paused = time.perf_counter()

    def step(self, step, epoch, lr, stats):  # stats [3] stay on the device until the next line
        self.window.append(stats)
        self.last = step, epoch, lr
        if step % self.args.log_every == 0:
            self.line()

    def line(self):
        (step, epoch, lr), seconds = self.last, time.perf_counter() - self.tick
        stats = torch.stack(self.window).double()                                # [steps, 3]
        counts = torch.tensor([self.skipped, self.read], dtype=torch.float64, device=stats.device)
        if dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(counts)
            stats /= dist.get_world_size()
        skipped, read = counts.tolist()
        if skipped > 0.01 * read and read >= self.enough:
            raise UserError(f"{skipped:.0f} of the {read:.0f} images read ({skipped / read:.0%}) could not be decoded, "
                            "more than 1%: check --data (the warnings name the files)", everywhere=True)
        if not torch.isfinite(stats[:, 0]).all():  # the weights are poisoned: stop, keep the last checkpoint
            first = int((~torch.isfinite(stats[:, 0])).nonzero()[0, 0])
            raise UserError(f"loss is {stats[first, 0].item()} at step {step - len(stats) + first + 1} (epoch {epoch});"
                            f" stopping: {checkpoint_kept(self.args)}", everywhere=True)
        loss, contrastive, probe = stats.mean(dim=0).tolist()
        views_per_s, eta = len(stats) * self.views_per_step / seconds, (self.total_steps - step) * seconds / len(stats)
        self.write({"step": step, "epoch": epoch, "loss": loss, "contrastive_top1": contrastive,
                    "online_probe_top1": probe, "lr": lr, "views_per_s": views_per_s,
                    "data_wait": self.waited / seconds, "eta_s": eta},
                   f"epoch {epoch} step {step}/{self.total_steps} loss {loss:.4f} contrastive top-1 {contrastive:.1f}% "
                   f"online probe {probe:.1f}% lr {lr:.3g} {views_per_s:.0f} views/s data {self.waited / seconds:.0%} "
                   f"eta {eta / 60:.1f} min")
        self.window, self.tick, self.waited = [], time.perf_counter(), 0.0

    def epoch_end(self, step, epoch, val_top1):  # val_top1 is None but on rank 0
        self.write({"step": step, "epoch": epoch, "online_val_top1": val_top1},
                   f"epoch {epoch}: online probe val top-1 {val_top1 or 0:.2f}%")

    def write(self, record, line):  # with the views seen so far over all ranks: the paper's compute axis
        if is_main_process():
            with open(self.path, "a") as f:
                f.write(json.dumps({**record, "views_seen": record["step"] * self.views_per_step}) + "\n")
            print(line, flush=True)


def report(args, probe):
    """The end of a run, by rank 0: the summary line, probe.json and training.png."""
    if is_main_process():
        records = read_metrics(Path(args.out) / "metrics.jsonl")
        online = [r["online_val_top1"] for r in records if "online_val_top1" in r] or [None]  # none after --epochs 0
        result = {**(probe or {}), "online_val_top1_first_epoch": online[0], "online_val_top1_last_epoch": online[-1]}
        summary = ["no online probe (no epoch trained)" if online[0] is None else
                   f"online probe val top-1 after the first epoch {online[0]:.2f}%, after the last {online[-1]:.2f}%"]
        if probe:
            top5 = "n/a (under 5 classes)" if probe["top5"] is None else f"{probe['top5']:.2f}%"
            summary.append(f"fast linear probe (not SimCLR's linear evaluation): top-1 {probe['top1']:.2f}%  top-5 "
                           f"{top5}  k-NN top-1 {probe['knn_top1']:.2f}%")
        print("; ".join(summary))
        save(Path(args.out) / "probe.json", json.dumps(result) + "\n")
        plot_training(records, Path(args.out) / "training.png")


def plot_training(records, path):
    """Against the step: the log's four numbers on training views, and the online probe's val top-1 at epoch ends."""
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    fig = Figure(figsize=(10, 6))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, key in zip(axes.flat, ("loss", "contrastive_top1", "online_probe_top1", "lr")):
        ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label="training views")
        ax.set(title=key, ylabel="%" if key.endswith("top1") else None, xlabel="step" if ax in axes[1] else None)
    ends = [r for r in records if "online_val_top1" in r]
    axes[1, 0].plot([r["step"] for r in ends], [r["online_val_top1"] for r in ends], "o-", label="val, epoch end")
    axes[1, 0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_grid(rows, path, frames=None):
    """By rank 0, a PNG of rows of images [3, H, W] in [0, 1], each in a 3-pixel frame of its RGB colour in frames
    (white by default), short rows filled with white, small images enlarged. Returns the grid it wrote."""
    if not is_main_process():
        return None
    columns, cells = max(len(row) for row in rows), []
    for r, row in enumerate(rows):
        for c, image in enumerate(row + [torch.ones_like(rows[0][0])] * (columns - len(row))):
            rgb = torch.tensor(frames[r][c] if frames and c < len(row) else (1.0, 1.0, 1.0), device=image.device)
            cells.append(F.pad(image - rgb.view(3, 1, 1), [3] * 4) + rgb.view(3, 1, 1))  # framed
    grid = torchvision.utils.make_grid(cells, nrow=columns, padding=2, pad_value=1.0)
    grid = F.interpolate(grid[None], scale_factor=max(1, 96 // rows[0][0].shape[-1]), mode="nearest")[0]
    torchvision.utils.save_image(grid, path)
    return grid


def save_neighbours_png(train_set, val_set, train_labels, val_labels, neighbours, path):
    """neighbours.png: the first val image of each of up to 8 classes (black frame) and its 8 nearest training images
    as the k-NN found them, framed green where a neighbour's class is the query's, red where not. Returns the grid,
    and the rows of dataset indices (query first) it drew."""
    first = {}
    for i, label in enumerate(val_labels.tolist()):
        first.setdefault(label, i)
    picked = [[first[c], *neighbours[first[c], :8].tolist()] for c in sorted(first)[:8]]
    rows = [[val_set[query][0][0] / 255] + [train_set[j][0][0] / 255 for j in nearest] for query, *nearest in picked]
    frames = [[(0, 0, 0)] + [(0, .7, 0) if train_labels[j] == val_labels[query] else (.9, 0, 0) for j in nearest]
              for query, *nearest in picked]
    return save_grid(rows, path, frames), picked


def save_readme_figure(path):
    """The README's figure: a photograph (Grace Hopper, public domain, shipped with matplotlib) and the M = 8 views this
    file draws of it at 224 px (top row), then the 2 views SimCLR would draw (bottom row)."""
    from matplotlib import cbook
    from PIL import Image

    photo = v2.ToImage()(Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"))  # uint8 [3, 600, 512]
    torch.manual_seed(0)
    poly, simclr = (device_augment(torch.stack([random_crop_and_flip(224)(photo) for _ in range(M)])[None], False)[0]
                    for M in (8, 2))
    return save_grid([[centre_crop(224, True)(photo) / 255, *poly], [torch.ones(3, 224, 224), *simclr]], path)


def compare(args):
    """Runs side by side on the paper's compute axis (its Figure 3), into compare.png: each run's online probe val top-1
    against relative compute (the views it processed over the 2 views per image of one SimCLR epoch) and against
    epochs; and a table of the runs, with the fast probe's numbers where there are some."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2, sharey=True)
    rows = [("run", "loss", "M", "K", "epochs", "views seen", "online val top-1", "fast probe top-1", "k-NN top-1")]
    for run in map(Path, args.compare):
        for name, what in (("args.json", "is not a run of polyview.py"), ("metrics.jsonl", "is a run without a log")):
            if not (run / name).is_file():
                raise UserError(f"--compare: {run} {what} (no {name})")
        settings, records = json.loads((run / "args.json").read_text()), read_metrics(run / "metrics.jsonl")
        ends = [r for r in records if "online_val_top1" in r]  # epoch ends: none after --epochs 0, so no legend entry
        top1, M, K = [r["online_val_top1"] for r in ends], settings["views"], settings["batch_size"]
        if ends:  # relative compute: an epoch shows the model M views of every image, a SimCLR epoch 2
            axes[0].plot([M * (r["epoch"] + 1) / 2 for r in ends], top1, "o-", label=f"{run.name}: {settings['loss']}, "
                         f"M={M}, K={K}")
            axes[1].plot([r["epoch"] + 1 for r in ends], top1, "o-")
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() else {}
        numbers = (top1[-1] if top1 else None, probe.get("top1"), probe.get("knn_top1"))
        rows.append((run, settings["loss"], M, K, f"{len(ends)}/{settings['epochs']}",
                     records[-1]["views_seen"] if records else 0, *("-" if x is None else f"{x:.2f}" for x in numbers)))
    axes[0].set(xscale="log", xlabel="relative compute (views seen / 2 views per image per epoch)",
                ylabel="online probe val top-1 (%)")
    axes[0].xaxis.set_major_formatter(LogFormatter())  # plain numbers: 3, not 3 x 10^0
    axes[0].xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axes[1].set(xlabel="epochs")
    if axes[0].lines:
        axes[0].legend()
    fig.tight_layout()
    fig.savefig("compare.png", dpi=100)
    widths = [max(len(str(row[n])) for row in rows) for n in range(len(rows[0]))]
    print("\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows))
    print("wrote compare.png")


def benchmark(args):
    """Views/s of the training step, the objective's and the device augmentation's shares of it, and on CUDA the peak
    memory per view (weights and optimiser included). The data path's share is the log lines' `data` column."""
    device = start_processes(args)
    pretrain_set, _, _, classes = make_datasets(args)
    model, _, optimizer, scaler = build_model(args, classes, device, lr=1e-4)
    crops, labels, _ = next(iter(torch.utils.data.DataLoader(pretrain_set, args.batch_size, num_workers=args.workers)))
    crops, labels, views_per_step = crops.to(device), labels.to(device), args.batch_size * args.views
    z = torch.randn(args.batch_size, args.views, 128, device=device, requires_grad=True)
    functions = [lambda: train_step(model, optimizer, scaler, device_augment(crops, args.small_images), labels, args),
                 lambda: device_augment(crops, args.small_images),
                 lambda: LOSSES[args.loss](z, args.temperature).backward()]
    times = [math.inf] * len(functions)
    for attempt in range(21 if device.type == "cuda" else 4):  # the first, warm-up call of each compiles
        for n, fn in enumerate(functions):  # in turns: a slow spell of the machine falls on all of them alike
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize() if device.type == "cuda" else None
            times[n] = min(times[n], time.perf_counter() - start) if attempt else times[n]
    step, augment, objective = times
    print(f"{args.arch} at {args.image_size}px, K={args.batch_size} x M={args.views} = {views_per_step} views/step, "
          f"{args.loss}, {device.type}{' + compile' * args.compile}, {args.precision} ({args.precision_reason})\n"
          f"  training step {views_per_step / step:.1f} views/s; shares of the step: objective {objective / step:.2%}, "
          f"device augmentation {augment / step:.1%}")
    if device.type == "cuda":
        print(f"  peak memory per view {torch.cuda.max_memory_allocated() / views_per_step / 2**20:.1f} MiB")


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.compare:
            return compare(args)
        check_args(args, int(os.environ.get("WORLD_SIZE", 1)))
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"--device {args.device}, but no GPU is visible (use --device cpu)", everywhere=True)
        try:
            benchmark(args) if args.benchmark else train(args)
        except torch.cuda.OutOfMemoryError as error:
            raise UserError(f"CUDA out of memory {out_of_memory(args, error)}") from None
        except RuntimeError as error:  # a data-loading worker killed, by a full /dev/shm in a container, say
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
