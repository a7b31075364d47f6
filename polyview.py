"""Poly-view contrastive learning (Shidani et al., ICLR 2024, arXiv 2403.05490), in one file.

SimCLR matches two augmented views of each image against the views of the other images in the batch. Poly-view
contrastive learning draws M > 2 views of each of K images and matches every view against all the others at once,
with objectives (Geometric and Arithmetic PVC, Sufficient Statistics) that bound the One-vs-Rest mutual information
between a view and the other M - 1 views of its image. Its headline: 128 epochs at batch 256 with M = 8 beat SimCLR
at 1024 epochs and batch 4096 on ImageNet-1k.

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --loss suffstats  # the paper's run
    python polyview.py --dataset cifar10 --arch resnet18                               # CIFAR-10 on one GPU

Part I is the method, in order. Part II, "running it for real", is called from it one named line at a time: a student
can stop at its banner. To lift an objective out, copy it, `similarities` and `without_diagonal` (torch alone).
"""
import argparse
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
        # Own views from a second, tiny product: read out of sim, they would send a full-size gradient through it.
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
    their_views = torch.where(same_label[:, None, :, None], sim, 0.0).sum(dim=(2, 3))     # [A, M]: where, as 0*-inf=nan
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
    """SimCLR's random-resized crop (area 0.08-1, aspect 3/4-4/3) and flip (p = 0.5), per view, on the CPU, uint8."""
    return v2.Compose([v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                       v2.RandomHorizontalFlip(), v2.ToImage()])


def centre_crop(size, small_images):
    """The probe's view: the short side resized to 8/7 of the crop (small images: to the crop), its centre, uint8."""
    return v2.Compose([v2.Resize(size if small_images else size * 8 // 7), v2.CenterCrop(size), v2.ToImage()])


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
    """(pre-training set of M-view items, the probes' train and val sets of centre crops, number of classes)."""
    decode = v2.ToImage()  # once per image: PIL -> uint8 [3, H, W], which crops twice as fast as PIL
    if args.dataset == "fake":  # random images of 10 classes, for the benchmark: val's from other seeds than train's
        train, val = (torchvision.datasets.FakeData(n * args.batch_size, (3, *[args.image_size] * 2), 10, decode,
                                                    random_offset=offset) for n, offset in ((50, 0), (10, 10**6)))
    else:  # ImageFolders, val's labels by train's class names; or CIFAR, downloaded once per machine
        train, val = read_dataset(args, decode)
    crop, centre = random_crop_and_flip(args.image_size), centre_crop(args.image_size, args.small_images)
    datasets = [MultiView(train, crop, args.views), MultiView(train, centre, 1), MultiView(val, centre, 1)]
    classes = train.num_classes if args.dataset == "fake" else len(train.classes)
    return *[SkipUndecodable(dataset) for dataset in datasets], classes


# ---- 3. Model -------------------------------------------------------------------------------------------------------
class PolyViewNet(nn.Module):
    """Images in [0, 1], normalised, into a torchvision ResNet without classifier (the F features the probes see), then
    SimCLR's projector Linear(F, F) - BN - ReLU - Linear(F, 128) - BN (no bias before a BN, no beta in the last): z.
    Beside them, as in SimCLR's code, the online probe: a linear classifier on features behind a stop-gradient."""
    def __init__(self, arch="resnet50", small_images=False, classes=1000, dim=128):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)  # blocks' last BNs start at 0
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
    """All ranks' x [n, ...] -> [world * n, ...]. Every rank's loss uses every rank's embeddings, so backward sums the
    gradients over ranks and keeps this rank's slice: with DDP's averaging, exactly the full-batch gradient."""
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
    """This rank's share of a step on views [n, M, 3, H, W] of n images with labels [n]: (the loss, [the objective's
    loss, contrastive top-1, online probe top-1]): this rank's anchors against all ranks' embeddings, plus the probe's
    cross-entropy."""
    z, logits = model(views)                                          # [n, M, D], [n*M, classes]
    # BN leaves bf16 or fp16 under autocast: gather z, and sum its gradient over ranks, in float32 (or float64).
    z, logits = (x.to(torch.promote_types(x.dtype, torch.float32)) for x in (z, logits))
    n, M = views.shape[:2]
    rank = dist.get_rank() if dist.is_initialized() else 0
    anchors = slice(rank * n, (rank + 1) * n)                         # this rank's images among all K
    z = GatherWithGrad.apply(z) if dist.is_initialized() else z                 # [K, M, D], K = n * world
    all_labels = GatherWithGrad.apply(labels) if dist.is_initialized() else labels  # [K]
    loss = objective(z, temperature, anchors, labels=all_labels) if supervised else objective(z, temperature, anchors)
    view_labels = labels.repeat_interleave(M)                         # [n*M]: view (i, a) has image i's label
    probe_loss = F.cross_entropy(logits, view_labels)
    probe_top1 = (logits.detach().argmax(dim=1) == view_labels).float().mean() * 100
    return loss + probe_loss, torch.stack([loss.detach(), contrastive_top1(z, temperature, anchors), probe_top1])


def train_step(model, optimizer, scaler, views, labels, args):
    """One step on this rank's views [n, M, 3, H, W] and labels [n]. Under fp16 the scaler multiplies the loss by S so
    small gradients survive, and divides them by S before LARS sees them; an overflowing step is skipped, S halved."""
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
    """SGD with momentum, each weight's step scaled by its layer's trust ratio (You et al., 2017), the rate inside the
    momentum as in SimCLR's code (a new rate scales new gradients, not the velocity already built up):

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
    """SimCLR's rules, K in images (not views): lr * sqrt(K), or lr * K / 256. At K = 4096 the defaults agree (4.8)."""
    return args.lr * (math.sqrt(args.batch_size) if args.lr_scaling == "sqrt" else args.batch_size / 256)


# ---- 6. The run ------------------------------------------------------------------------------------------------------
STREAMS = ("views", "order", "weights", "probe")  # a run's random streams: views, data order, initial weights, probe


def stream_seed(stream, seed, rank=0, epoch=0):
    """A seed mixed from (stream, seed, rank, epoch) by SeedSequence: a sum would let --seed 1 replay --seed 0 later."""
    return int(np.random.SeedSequence([STREAMS.index(stream), seed, rank, epoch]).generate_state(1, np.uint64)[0])


def start_processes(args):
    """This process's device. torchrun sets RANK (as in nanoGPT): each process takes a GPU and joins the others."""
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
    """(the model to call, the plain module for checkpoints and probes, its LARS, fp16's loss scaler)."""
    torch.manual_seed(stream_seed("weights", args.seed))  # the same initial weights on every rank
    model = PolyViewNet(args.arch, args.small_images, classes)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        load_weights(args, model.backbone)
    if dist.is_initialized() and device.type == "cuda":  # all M views of an image share a GPU, so per-GPU batch
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # statistics would leak which views belong together
    model.to(device, memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    # The online probe shares LARS and schedule but not decay or trust ratio, as in SimCLR's code: a classifier from 0.
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
    log = Log(args, len(pretrain_set), len(loader), checkpoint)  # the start line, then the numbers
    for epoch in range(first_epoch, args.epochs):
        model.train()
        # Streams from (seed, rank, epoch): a resumed run draws the order and views it would have (workers seed here).
        sampler.seed = stream_seed("order", args.seed, 0, epoch)
        torch.manual_seed(stream_seed("views", args.seed, rank, epoch))
        for crops, labels in log.timed(loader):                         # [n, M, 3, H, W] uint8, [n]: n = K / world
            views = device_augment(crops.to(device, non_blocking=True), args.small_images)
            if step == first_step:  # what the model sees: the M views of 4 images
                save_grid([list(image_views) for image_views in views[:4]], Path(args.out) / "views.png")
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(model, optimizer, scaler, views, labels.to(device, non_blocking=True), args)
            step += 1
            log.step(step, epoch, lr, stats)
        log.write(step=step, epoch=epoch, online_val_top1=online_val_top1(raw_model, probe_val_set, device, args))
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
    """(features [N, F], labels [N]) of centre crops in eval mode on rank 0, (None, None) elsewhere. Rank r of W
    extracts the items r R to (r + 1) R - 1, R = ceil(N / W), padded with the label -1; rank 0 gathers them in order."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    rows = math.ceil(len(dataset) / world)
    mine = torch.utils.data.Subset(dataset, range(rank * rows, min((rank + 1) * rows, len(dataset))))
    loader = torch.utils.data.DataLoader(mine, 256, num_workers=args.workers, pin_memory=device.type == "cuda")
    features = torch.zeros(rows, model.projector[0].in_features, device=device)
    labels = torch.full((rows,), -1, dtype=torch.long, device=device)
    model.eval()
    for batch, (crops, label, _) in enumerate(loader):                  # crops [B, 1, 3, H, W] uint8
        rows_here = slice(batch * loader.batch_size, batch * loader.batch_size + len(crops))
        images = crops.flatten(0, 1).to(device, non_blocking=True).float() / 255
        with mixed_precision(device, args.precision):
            features[rows_here] = model.features(images).float()
        labels[rows_here] = label.to(device)
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
    """Top-1 and top-5 (None under 5 classes) in percent of a linear classifier on standardised frozen features (train_x
    in place: ImageNet's is 10.5 GB), AdamW, cosine schedule, max(epochs x ceil(N / 1024), min_steps) steps of 1,024:
    112,680 on ImageNet at 90 epochs; 1,000, not 90, on a few hundred images, where its top-1 has plateaued."""
    classes = int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x.sub_(mean).div_(std)
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
    """On rank 0 (None elsewhere), the k-NN, neighbours.png and the linear classifier on the backbone's features. Not
    SimCLR's linear evaluation (90 epochs of SGD on crops): compare it across runs of this file, not with the paper."""
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
    """The flags, their defaults (SimCLR's, and its CIFAR-10 recipe for small images), and their checks."""
    p = argparse.ArgumentParser(description="Poly-view contrastive pre-training, then a fast probe. Defaults: SimCLR")
    add = p.add_argument
    add("--loss", default="suffstats", choices=list(LOSSES), help="see each objective's docstring (default: suffstats)")
    add("--supervised", action="store_true", help="supcon with labels: every view of the anchor's class is a positive")
    add("--views", type=int, help="M, views per image (default: 8, the paper's Figures 3a and 5; 2 for simclr)")
    add("--batch-size", type=int, help="K, images per step over all processes (default: 256; 512 on small images)")
    add("--epochs", type=int, default=128, help="pre-training epochs; 0 probes the backbone as it is (default: 128)")
    add("--arch", default="resnet50", choices=["resnet50", "resnet18"], help="backbone (default: resnet50)")
    add("--dataset", default="imagenet", choices=["imagenet", "folder", "cifar10", "cifar100", "fake"], help="imagenet,"
        " folder: DATA/train and DATA/val, one folder per class; cifar*: downloaded into DATA; fake: random images")
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
    add("--probe-epochs", type=int, default=90, help="fast probe epochs, 1,000 steps or more; 0 skips it (default: 90)")
    add("--weights", help="start the backbone from a state_dict: a run's backbone.pt or torchvision's weights file")
    add("--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists (else start fresh)")
    add("--log-every", type=int, default=50, help="steps between log lines (default: 50)")
    add("--benchmark", action="store_true", help="print the training step's views/s and memory per view")
    add("--compare", nargs="+", metavar="RUN", help="plot runs' online probes against compute into compare.png")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 32 if args.dataset.startswith("cifar") else 224
    small = args.small_images = args.image_size <= 64
    defaults = dict(views=2 if args.loss == "simclr" else 8, batch_size=512 if small else 256,
                    temperature=0.5 if small else 0.1, weight_decay=1e-4 if small else 1e-6,
                    lr=(2 / 512**0.5 if small else 0.075) if args.lr_scaling == "sqrt" else (1.0 if small else 0.3))
    vars(args).update({name: value for name, value in defaults.items() if getattr(args, name) is None})
    # Fail fast, before any data or GPU is touched. Every process meets these errors; rank 0 alone prints them.
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
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    for broken, message in [
            (args.supervised and args.loss != "supcon", f"--supervised is supcon's form, not --loss {args.loss}"),
            (args.batch_size % world_size, f"--batch-size {args.batch_size} must divide among {world_size} processes"),
            (args.benchmark and world_size > 1, "--benchmark measures one GPU: run it with python, not torchrun"),
            (args.device.startswith("cuda") and not torch.cuda.is_available(), "no GPU is visible: use --device cpu")]:
        if broken:
            raise UserError(message, True)
    return args


def choose_precision(requested, device_type, capability=None):
    """auto: bf16 from compute capability 8.0 (A100, H100); fp16 and a loss scaler below (T4, V100: bf16 emulated)."""
    if requested != "auto":
        return requested, "--precision"
    if device_type != "cuda":
        return "fp32", "auto: on the CPU"
    hardware = "has bf16 hardware" if capability >= (8, 0) else "has no bf16 hardware"
    return ("bf16" if capability >= (8, 0) else "fp16"), f"auto: compute capability {'%d.%d' % capability} {hardware}"


class UserError(Exception):
    """One line, exit 2; under torchrun one that every process meets (`everywhere`) is printed by rank 0 alone."""
    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere


def agree(work):
    """work() on every process; a UserError on any becomes one on all, or the rest would wait forever."""
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


def out_of_memory(args, error):  # where CUDA ran out of memory (read off the traceback), and the way out
    where = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if "fast_probe" in where:
        return ("in the fast probe (rank 0 holds every training feature): rerun with --resume on a GPU with more "
                "memory, or with --device cpu; a finished run goes straight to its probe")
    if "online_val_top1" in where:
        return f"in the online probe's val pass: lower --batch-size; {checkpoint_kept(args)}"
    n = args.batch_size // int(os.environ.get("WORLD_SIZE", 1))
    return (f"with {n} x {args.views} = {n * args.views} views per GPU ({args.arch} at {args.image_size} px): run on "
            "more GPUs under torchrun, or lower --batch-size (half the batch: lr / 1.41, by the square-root rule)")


class SkipUndecodable(torch.utils.data.Dataset):
    """Item i: (*dataset[i], skipped): an undecodable file is skipped, named in a warning, and the next stands in."""
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
    """(train, val), on every process. CIFAR: LOCAL_RANK 0 downloads. ImageFolder numbers its classes by its own
    folders' names, so a val/ without a class would shift labels: val takes train's, by name."""
    root, cifar = Path(args.data), args.dataset.startswith("cifar")

    def read(download=False):
        try:  # no folder, no class folders in it (as ImageNet's val/ ships), a class folder without an image, no CIFAR
            if cifar:
                dataset = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
                return [dataset(root, train=split, transform=decode, download=download) for split in (True, False)]
            train, val = (torchvision.datasets.ImageFolder(root / split, decode) for split in ("train", "val"))
        except (OSError, RuntimeError) as error:
            hint = ("could not be read or downloaded" if cifar else "must hold the ImageFolders train/ and val/, one "
                    "sub-folder per class (sort ImageNet's flat val/ into them with valprep.sh)")
            raise UserError(f"--dataset {args.dataset} --data {root} {hint}: {error}")
        if unknown := sorted(set(val.classes) - set(train.classes)):
            raise UserError(f"{root / 'val'} has class folders that train/ lacks: {', '.join(unknown)}")
        val.samples = [(path, train.class_to_idx[val.classes[label]]) for path, label in val.samples]
        val.classes, val.class_to_idx = train.classes, train.class_to_idx
        with warnings.catch_warnings():  # a folder where nothing decodes stops here, at once
            warnings.simplefilter("ignore")
            SkipUndecodable(train)[0], SkipUndecodable(val)[0]
        if len(train) < args.batch_size:
            raise UserError(f"{len(train)} images in {root / 'train'} make no full batch of {args.batch_size}")
        return train, val
    if not cifar:
        return agree(read)
    downloaded = agree(lambda: read(download=True) if int(os.environ.get("LOCAL_RANK", 0)) == 0 else None)
    return agree(lambda: downloaded or read())


def load_weights(args, backbone):  # on every process: a run's backbone.pt, or torchvision's file (its fc dropped)
    def load():
        try:  # weights_only: never run pickled code; load_state_dict names each key that differs (missing ones last)
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        except Exception as error:  # no file, not a torch file, not a state_dict, or one of another model
            details = " ".join(" ".join(sorted(str(error).splitlines(), key=lambda line: "Missing" in line)).split())
            raise UserError(f"--weights {args.weights} does not load into --arch {args.arch} at {args.image_size} px "
                            f"({'3x3 stem of small images' if args.small_images else 'ImageNet stem'}): "
                            f"{type(error).__name__}: {details[:300]}{'...' * (len(details) > 300)}")
    agree(load)


def save(path, state):
    """torch.save(state) or a string, by rank 0, into a temporary file, flushed, then renamed over path (atomic)."""
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
    """The checkpoint to go on from (or None), rank 0's on every process: machines may share no filesystem."""
    path = Path(args.out) / "checkpoint.pt"

    def load():
        if not is_main_process() or not path.exists():
            return None
        if not args.resume:
            raise UserError(f"{path} exists: add --resume to continue it, or choose another --out")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain values only
        for key in ("arch", "loss", "supervised", "views", "batch_size", "dataset", "image_size", "epochs",
                    "lr_scaling", "lr", "warmup_epochs", "temperature", "weight_decay", "seed", "weights"):
            if (was := checkpoint["args"].get(key)) != (now := getattr(args, key)):
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{path} has {flag} {was}, not {now}: resume with {flag} {was}, or use another --out")
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
    """OUT/metrics.jsonl (on resume, cut back to the checkpoint), printed too: every --log-every steps and at epoch ends
    the means over steps and ranks (so all meet the stop rules together) on a clock that stops between epochs."""
    def __init__(self, args, images, steps_per_epoch, checkpoint):
        self.args, self.enough, self.total_steps = args, min(1000, images), args.epochs * steps_per_epoch
        self.path, self.views_per_step = Path(args.out) / "metrics.jsonl", args.batch_size * args.views
        self.window, self.waited, self.skipped, self.read = [], 0.0, 0, 0
        self.tick = self.asked = time.perf_counter()
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            save(self.path.with_name("args.json"), json.dumps(vars(args), indent=1))
            if not checkpoint and self.path.exists():  # from an earlier run here that never reached a checkpoint
                os.replace(self.path, self.path.with_name("metrics.old.jsonl"))
            records = [r for r in read_metrics(self.path) if r["step"] <= checkpoint["step"]] if checkpoint else []
            save(self.path, "".join(json.dumps(r) + "\n" for r in records))
            print(f"{args.loss}: K={args.batch_size} images x M={args.views} views per step on "
                  f"{os.environ.get('WORLD_SIZE', 1)} x {args.device} in {args.precision} ({args.precision_reason}), "
                  f"{args.arch}, {steps_per_epoch} steps/epoch, peak lr {peak_learning_rate(args):.3g}")

    def timed(self, loader):  # the loader's (crops, labels) on the log's clock, counting the files it skipped
        for n, (crops, labels, skipped) in enumerate(loader):
            arrived = time.perf_counter()
            self.tick += arrived - self.asked if n == 0 else 0.0  # the clock stands still between epochs
            self.waited += arrived - self.asked if n > 0 else 0.0
            self.skipped, self.read = self.skipped + int(skipped.sum()), self.read + len(skipped) + int(skipped.sum())
            yield crops, labels
            self.asked = time.perf_counter()
        if self.window:  # the epoch's last steps, checked before the val pass and the checkpoint
            self.line()
        self.asked = time.perf_counter()  # from here to the next epoch's first batch: off the clock

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
        if skipped > 0.01 * read and read >= self.enough:  # the stop rules
            raise UserError(f"{skipped:.0f} of {read:.0f} images ({skipped / read:.0%}) could not be decoded, more "
                            "than 1%: check --data (the warnings name them)", True)
        if not torch.isfinite(stats[:, 0]).all():  # the weights are poisoned: stop, keep the last checkpoint
            first = int((~torch.isfinite(stats[:, 0])).nonzero()[0, 0])
            raise UserError(f"loss is {stats[first, 0].item()} at step {step - len(stats) + first + 1} (epoch {epoch});"
                            f" stopping: {checkpoint_kept(self.args)}", everywhere=True)
        loss, contrastive, probe = stats.mean(dim=0).tolist()
        self.write(step=step, epoch=epoch, loss=loss, contrastive_top1=contrastive, online_probe_top1=probe, lr=lr,
                   views_per_s=len(stats) * self.views_per_step / seconds, data_wait=self.waited / seconds,
                   eta_s=(self.total_steps - step) * seconds / len(stats))
        self.window, self.tick, self.waited = [], time.perf_counter(), 0.0

    def write(self, **record):  # printed, and kept with the views seen over all ranks: the paper's compute axis
        if is_main_process():
            record["views_seen"] = record["step"] * self.views_per_step
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print("  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in record.items()), flush=True)


def report(args, probe):
    """By rank 0: probe.json, its numbers printed, and training.png (the log against the step; val top-1 per epoch)."""
    if not is_main_process():
        return
    from matplotlib.figure import Figure  # no pyplot: no display, no global state
    records = read_metrics(Path(args.out) / "metrics.jsonl")
    online = [r["online_val_top1"] for r in records if "online_val_top1" in r] or [None]  # none after --epochs 0
    result = {**(probe or {}), "online_val_top1_first_epoch": online[0], "online_val_top1_last_epoch": online[-1]}
    print("probe.json:", ", ".join(f"{k} {v:.2f}%" for k, v in result.items() if isinstance(v, float)) or "-",
          "(top1, top5, knn_top1: the fast linear probe, not SimCLR's linear evaluation)" if probe else "")
    save(Path(args.out) / "probe.json", json.dumps(result) + "\n")
    axes = Figure(figsize=(10, 6)).subplots(2, 2, sharex=True)
    for ax, key in zip(axes.flat, ("loss", "contrastive_top1", "online_probe_top1", "lr")):
        ax.plot([r["step"] for r in records if key in r], [r[key] for r in records if key in r], label="training views")
        ax.set(title=key, ylabel="%" if key.endswith("top1") else None, xlabel="step" if ax in axes[1] else None)
    ends = [r for r in records if "online_val_top1" in r]
    axes[1, 0].plot([r["step"] for r in ends], [r["online_val_top1"] for r in ends], "o-", label="val, epoch end")
    axes[1, 0].legend()
    axes[0, 0].figure.tight_layout()
    axes[0, 0].figure.savefig(Path(args.out) / "training.png", dpi=100)


def save_grid(rows, path, frames=None):
    """By rank 0: rows of images [3, H, W] in [0, 1] into a PNG, framed in RGB `frames` (or white). Returns it."""
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
    """neighbours.png: the first val image of each of up to 8 classes (black frame) and its 8 k-NN neighbours, green
    where a neighbour's class is the query's, red where not. Returns the grid and its rows of indices."""
    queries = [int((val_labels == label).nonzero()[0, 0]) for label in val_labels.unique()[:8]]  # each class's first
    picked = [[query, *neighbours[query, :8].tolist()] for query in queries]
    rows = [[val_set[query][0][0] / 255] + [train_set[j][0][0] / 255 for j in nearest] for query, *nearest in picked]
    frames = [[(0, 0, 0)] + [(0, .7, 0) if train_labels[j] == val_labels[query] else (.9, 0, 0) for j in nearest]
              for query, *nearest in picked]
    return save_grid(rows, path, frames), picked


def compare(args):
    """compare.png: runs' online val top-1 against relative compute (views seen over a SimCLR epoch's 2 per image, as in
    the paper's Figure 3), and a table of the runs and their fast probes."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    ax = Figure(figsize=(7, 4)).subplots()
    rows = [("run", "loss", "M", "K", "epochs", "views seen", "online val top-1", "fast probe top-1", "k-NN top-1")]
    for run in map(Path, args.compare):
        for name, what in (("args.json", "is not a run of polyview.py"), ("metrics.jsonl", "is a run without a log")):
            if not (run / name).is_file():
                raise UserError(f"--compare: {run} {what} (no {name})")
        settings, records = json.loads((run / "args.json").read_text()), read_metrics(run / "metrics.jsonl")
        ends = [r for r in records if "online_val_top1" in r]  # epoch ends: none after --epochs 0, so no legend entry
        top1, M, K = [r["online_val_top1"] for r in ends], settings["views"], settings["batch_size"]
        if ends:  # relative compute: an epoch shows the model M views of every image, a SimCLR epoch 2
            ax.plot([M * (r["epoch"] + 1) / 2 for r in ends], top1, "o-", label=f"{run.name}: {settings['loss']}, "
                    f"M={M}, K={K}")
        probe = json.loads((run / "probe.json").read_text()) if (run / "probe.json").is_file() else {}
        numbers = (top1[-1] if top1 else None, probe.get("top1"), probe.get("knn_top1"))
        rows.append((run, settings["loss"], M, K, f"{len(ends)}/{settings['epochs']}",
                     records[-1]["views_seen"] if records else 0, *("-" if x is None else f"{x:.2f}" for x in numbers)))
    ax.set(xscale="log", xlabel="relative compute (views seen / 2 views per image per epoch)", ylabel="val top-1 (%)")
    ax.xaxis.set_major_formatter(LogFormatter())  # plain numbers: 3, not 3 x 10^0
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if ax.lines:
        ax.legend()
    ax.figure.tight_layout()
    ax.figure.savefig("compare.png", dpi=100)
    widths = [max(len(str(row[n])) for row in rows) for n in range(len(rows[0]))]
    print("\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) for row in rows))
    print("wrote compare.png")


def benchmark(args):
    """Views/s of the training step (device colour included), and on CUDA its peak memory per view."""
    device = start_processes(args)
    pretrain_set, _, _, classes = make_datasets(args)
    model, _, optimizer, scaler = build_model(args, classes, device, lr=1e-4)
    crops, labels, _ = next(iter(torch.utils.data.DataLoader(pretrain_set, args.batch_size, num_workers=args.workers)))
    crops, labels, views_per_step, best = crops.to(device), labels.to(device), args.batch_size * args.views, math.inf
    for attempt in range(21 if device.type == "cuda" else 4):  # the first, warm-up call compiles
        start = time.perf_counter()
        train_step(model, optimizer, scaler, device_augment(crops, args.small_images), labels, args)
        torch.cuda.synchronize() if device.type == "cuda" else None
        best = min(best, time.perf_counter() - start) if attempt else best
    memory = torch.cuda.max_memory_allocated() / views_per_step / 2**20 if device.type == "cuda" else None
    print(f"{args.arch} at {args.image_size}px, K={args.batch_size} x M={args.views} = {views_per_step} views/step, "
          f"{args.loss}, {device.type}{' + compile' * args.compile}, {args.precision} ({args.precision_reason}): "
          f"{views_per_step / best:.1f} views/s" + (f", peak memory per view {memory:.1f} MiB" if memory else ""))


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.compare:
            return compare(args)
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
        if error.everywhere and int(os.environ.get("RANK", 0)) > 0:
            time.sleep(10)  # rank 0 prints it; were this rank to exit first, torchrun could stop rank 0 mid-print
        else:
            print(f"polyview.py: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
