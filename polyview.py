"""Poly-view contrastive learning (Shidani et al., ICLR 2024, arXiv 2403.05490) in one file:
M > 2 views of each image, each view matched against all the others at once. At M = 8, 128
epochs at batch 256 beat SimCLR's 1024 epochs at batch 4096 on ImageNet-1k.

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --loss suffstats
    python polyview.py --dataset cifar10 --arch resnet18      # CIFAR-10 on one GPU

Part I is the method, top to bottom. Part II, "running it for real", is what makes it
software; Part I calls it one named line at a time, and a student can stop at its banner.
To copy an objective, take its function, `similarities`, `check` and `without_diagonal`.
"""
import argparse
import json
import math
import os
import signal
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

# ======================================================================
# Part I. The method: names defined before use, except calls into Part II (Log, save...)
# ======================================================================
# ---- 0. The recipe ---------------------------------------------------
# SimCLR's settings (Chen et al., 2020) for the paper's run; parse_args makes them flags
RECIPE = dict(  # name=(default, what it is and why)
    loss=("suffstats", "the objective (section 1)"),
    views=(8, "M views per image: the paper's Figures 3a and 5 (simclr: 2)"),
    batch_size=(256, "K images a step, all GPUs': the paper's headline run"),
    epochs=(128, "the headline run's; 0 probes the backbone alone"),
    arch=("resnet50", "the backbone"),
    dataset=("imagenet", "or folder (DATA/train, DATA/val), cifar10, cifar100, fake"),
    data=("./data", "the dataset's folder, or CIFAR's download"),
    image_size=(224, "the crop's side (CIFAR: 32)"),
    lr_scaling=("sqrt", "peak lr sqrt(K), best at small K (SimCLR's B.1), or lr K/256"),
    lr=(dict(sqrt=0.075, linear=0.3), "base lr, by --lr-scaling: 4.8 at K = 4096 both"),
    warmup_epochs=(10.0, "linear warm-up, at most a tenth of the run; then cosine"),
    temperature=(0.1, "tau, SimCLR's on ImageNet"),
    weight_decay=(1e-6, "LARS's, not on BatchNorm and biases"),
    precision=("auto", "bf16 where GPUs have it, fp16 below, fp32 on CPUs"),
    device=("cuda" if torch.cuda.is_available() else "cpu", "cuda or cpu"),
    supervised=(False, "supcon: all views of the anchor's class are positives"),
    weights=(None, "the backbone's state_dict: backbone.pt, or torchvision's"),
    compile=(False, "torch.compile the backbone"),
    probe_epochs=(90, "fast probe epochs, 1,000 steps or more; 0: none"),
    workers=(8, "data-loading processes per GPU"),
    seed=(0, "of the weights, the data order and every view"),
    log_every=(50, "steps between log lines"),
    out=("runs/polyview", "the run folder"),
)
# At 64 px or less (args.small_images), SimCLR's CIFAR-10 recipe; also a stem and colours
SMALL_IMAGES = dict(batch_size=512, temperature=0.5, weight_decay=1e-4,
                    lr=dict(sqrt=2 / 512**0.5, linear=1.0))

def rank():  # this process's index, 0 to world_size() - 1 (section 7)
    return int(os.environ.get("RANK", 0))

def world_size():
    return int(os.environ.get("WORLD_SIZE", 1))

# ---- 1. Objectives ---------------------------------------------------
# K samples i, j of M views a, b, g: z[i,a] is view a's L2-normalised embedding, and
# s(ia, jg) = <z[i,a], z[j,g]> / tau. An objective maps z [K, M, D] to its mean over the
# anchors (i, a), whose negatives are the M(K - 1) views of other samples:
# N[i,a] = sum_{j != i, g} exp s(ia, jg).
#
# In the family L = E phi(sum_n psi(d+ - d-_n)), with d = 1 - <z, z'>, InfoNCE is
# phi(x) = log(eps + x) and psi(x) = exp(x / tau), as psi(d+ - d-_n) = exp(s_n - s+);
# eps = 1 (NT-Xent) or 0 (DCL). (A course's phi = tau log(eps + x) gives tau times ours.)
# A term picking its positive out of C candidates gives I >= log C - L, which stays under
# log C (Oord et al., 2018). Poly-view bounds I(x_a; X_-a) between a view x_a and the M - 1
# others X_-a of its sample, with C = M(K - 1) + 1, rising with M.

def without_diagonal(x):
    """x [..., M, M] -> [..., M, M - 1]: row a keeps x[..., a, b] for b != a, in order (at
    M = 3 the rows hold b = [1, 2], [0, 2], [0, 1])."""
    M = x.shape[-1]
    a = torch.arange(M, device=x.device)[:, None]  # [M, 1]
    c = torch.arange(M - 1, device=x.device)[None, :]  # [1, M-1]
    b = c + (c >= a).long()  # [M, M-1]: steps over b = a
    return x.gather(-1, b.expand(*x.shape[:-1], M - 1))

def check(z, temperature, anchors):
    """The objectives' rules, as ValueErrors. Returns anchors, all K by default."""
    if z.dim() != 3:
        raise ValueError(f"z must have shape [K, M, D] (rank 3), got rank {z.dim()}")
    K, M, _ = z.shape
    if K < 2 or M < 2:
        raise ValueError(f"need K >= 2 samples and M >= 2 views, got K={K}, M={M}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    anchors = slice(0, K) if anchors is None else anchors
    start, stop, stride = anchors.indices(K)
    if (start, stop, stride) != (anchors.start, anchors.stop, 1) or start >= stop:
        raise ValueError(f"anchors must be slice(start, stop), 0 <= start < stop <= {K}")
    return anchors

def similarities(z, temperature, anchors=None):
    """What the objectives share. `anchors`, a slice of sample indices, picks the A samples
    whose views are anchors, against all of z [K, M, D] (so a process takes its share):

        anchors_z      [A, M, D]      z[i,a], normalised
        sim            [A, M, K, M]   s(ia, jg); -inf at j = i: own views are no negatives
        positives      [A, M, M - 1]  s(ia, ib) for the M - 1 other views b != a
        log_negatives  [A, M]         log N[i,a]

    in float32 or float64 under any autocast (bf16 logits: 2-9% off in the gradient)."""
    anchors = check(z, temperature, anchors)
    K, M, _ = z.shape
    with torch.autocast(z.device.type, enabled=False):
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        z = F.normalize(z, dim=-1)  # [K, M, D]
        scaled = z[anchors] / temperature  # [A, M, D]: 1 / tau, folded in once
        flat = scaled.flatten(0, 1) @ z.flatten(0, 1).T  # [A*M, K*M]
        sim = flat.view(len(scaled), M, K, M)  # [A, M, K, M]
        # Positives by a small product: read from sim, they'd add a full-size gradient
        own = torch.einsum("iad,ibd->iab", scaled, z[anchors])  # [A, M, M]
    samples = torch.arange(K, device=z.device)
    same_sample = samples[anchors, None] == samples  # [A, K]: j = i
    sim = sim.masked_fill(same_sample[:, None, :, None], float("-inf"))  # as [A, 1, K, 1]
    positives = without_diagonal(own)  # [A, M, M-1]
    log_negatives = sim.logsumexp(dim=(2, 3))  # [A, M]
    anchors_z = z[anchors]  # [A, M, D]
    return anchors_z, sim, positives, log_negatives

def simclr_loss(z, temperature, anchors=None):
    """SimCLR's NT-Xent (Chen et al., 2020), z [K, 2, D]; (i, a)'s positive is b = 1 - a:

        l[i,a] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i, g} exp s(ia, jg) ),
        L = mean over i, a.
    Family: phi(x) = log(1 + x), psi(x) = exp(x / tau); 1 positive : 2(K - 1) negatives;
    log(2K - 1) - L bounds I(x_a; x_b)."""
    if z.dim() == 3 and z.shape[1] != 2:
        raise ValueError(f"simclr needs exactly M = 2 views, got M={z.shape[1]}")
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    positive = positives[..., 0]  # [A, 2]: the one other view
    return (torch.logaddexp(positive, log_negatives) - positive).mean()

def multicrop_loss(z, temperature, anchors=None):
    """Multi-Crop (Caron et al., 2020): SimCLR over view pairs a != b, each against views a
    and b of the other samples only:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + sum_{j != i} [exp s(ia, ja) + exp s(ia, jb)] ),
        L = mean over i, a, b != a.
    Family: SimCLR's, per pair; 1 : 2(K - 1) for any M; log(2K - 1) - L bounds I(x_a; x_b)."""
    _, sim, positives, _ = similarities(z, temperature, anchors)
    per_view = sim.logsumexp(dim=2)  # [A, M, M]: log sum_{j != i} exp s(ia, jg)
    diagonal = per_view.diagonal(dim1=1, dim2=2)  # [A, M]: g = a
    views_a = diagonal[..., None].expand_as(positives)  # [A, M, M-1]
    views_b = without_diagonal(per_view)  # [A, M, M-1]: g = b
    terms = torch.stack([positives, views_a, views_b])  # [3, A, M, M-1]
    return (terms.logsumexp(dim=0) - positives).mean()

def geometric_loss(z, temperature, anchors=None):
    """Geometric PVC (Shidani et al., 2024): each positive b of (i, a) against N[i,a]:

        l[i,a,b] = -s(ia, ib) + log( exp s(ia, ib) + N[i,a] ),   p[i,a,b] = exp(-l[i,a,b]),
        L = mean over i, a, b != a of l[i,a,b]  (-log of the geometric mean of the p's).
    Family: SimCLR's per positive; 1 : M(K - 1); log(M(K - 1) + 1) - L bounds I(x_a; X_-a)."""
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    log_negatives = log_negatives[..., None]  # [A, M, 1]
    return (torch.logaddexp(positives, log_negatives) - positives).mean()

def arithmetic_loss(z, temperature, anchors=None):
    """Arithmetic PVC (Shidani et al., 2024), from geometric_loss's p[i,a,b]:

        L = mean over i, a of -log( 1/(M-1) sum_{b != a} p[i,a,b] ).
    Outside the family: a log of a mean of softmaxes. With Geometric's candidates,
    log(M(K - 1) + 1) - L bounds I(x_a; X_-a); by AM >= GM, L <= Geometric's (= at M = 2)."""
    # A deliberate reading: copies of the paper's pseudo-code write logsumexp of the pair
    # losses - log(M - 1) here; we follow the name and the AM >= GM order against Geometric.
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    log_negatives = log_negatives[..., None]  # [A, M, 1]
    log_p = positives - torch.logaddexp(positives, log_negatives)  # [A, M, M-1]
    log_mean_p = log_p.logsumexp(dim=2) - math.log(positives.shape[2])  # [A, M]
    return -log_mean_p.mean()

def suffstats_loss(z, temperature, anchors=None):
    """Sufficient Statistics (Shidani et al., 2024): one positive, the re-normalised mean
    of the anchor's M - 1 other views, against N[i,a]:

        t[i,a] = normalise( sum_{b != a} z[i,b] ),      u[i,a] = <z[i,a], t[i,a]> / tau,
        L = mean over i, a of -u[i,a] + log( exp u[i,a] + N[i,a] ).
    Family: SimCLR's; 1 : M(K - 1); log(M(K - 1) + 1) - L bounds I(x_a; X_-a). At M = 2,
    t[i,a] is the other view: SimCLR."""
    # A deliberate reading: the positive is the others' mean (their sufficient statistic,
    # by the exponential-family argument), against PVC's negatives: SimCLR at M = 2.
    anchors_z, _, _, log_negatives = similarities(z, temperature, anchors)
    others = anchors_z.sum(dim=1, keepdim=True) - anchors_z  # [A, M, D]
    t = F.normalize(others, dim=-1)
    u = (anchors_z * t).sum(dim=-1) / temperature  # [A, M]
    return (torch.logaddexp(u, log_negatives) - u).mean()

def supcon_loss(z, temperature, anchors=None, labels=None):
    """SupCon's L_out (Khosla et al., 2020). The positives P of (i, a) are its M - 1 other
    views (with labels [K], all other views of its label), among all K*M - 1 others:

        l[i,a] = -1/|P| sum_{p in P} [ s(ia, p) - log sum_{q != ia} exp s(ia, q) ],
        L = mean over i, a.
    Family: SimCLR's, per positive, the others among the negatives: 1 : KM - 2. Those are
    no draws from the marginal, so log(M(K - 1) + 1) - L bounds I(x_a; X_-a), but more
    loosely than Geometric, which leaves them out. SimCLR at M = 2 without labels."""
    _, sim, positives, log_negatives = similarities(z, temperature, anchors)
    log_positives = positives.logsumexp(dim=2)  # [A, M]
    log_candidates = torch.logaddexp(log_negatives, log_positives)  # [A, M]
    if labels is None:  # P: the M - 1 other views
        return (log_candidates[..., None] - positives).mean()
    K, M = z.shape[:2]
    if labels.shape != (K,):
        raise ValueError(f"labels must have shape [K] = [{K}], got {list(labels.shape)}")
    samples = torch.arange(K, device=z.device)  # P: all views of its label
    anchors = slice(0, K) if anchors is None else anchors
    same_label = labels[anchors, None] == labels  # [A, K]
    other_sample = samples[anchors, None] != samples  # [A, K]
    theirs = (same_label & other_sample)[:, None, :, None]  # [A, 1, K, 1]
    own_views = positives.sum(dim=2)  # [A, M]
    their_views = torch.where(theirs, sim, 0.0).sum(dim=(2, 3))  # [A, M]; not 0 * -inf
    count = (M - 1) + M * theirs.sum(dim=(2, 3))  # [A, 1]: |P|
    return (log_candidates - (own_views + their_views) / count).mean()

def dcl_loss(z, temperature, anchors=None):
    """Decoupled contrastive learning (Yeh et al., 2022): the positive out of its own
    denominator,  l[i,a,b] = -s(ia, ib) + log N[i,a],  L = mean over i, a, b != a.
    Family: phi(x) = log(x) (eps = 0), psi(x) = exp(x / tau); 1 : M(K - 1). Its positive
    is no candidate: no bound."""
    _, _, positives, log_negatives = similarities(z, temperature, anchors)
    return (log_negatives[..., None] - positives).mean()

LOSSES = {"simclr": simclr_loss, "multicrop": multicrop_loss,
          "geometric": geometric_loss, "arithmetic": arithmetic_loss,
          "suffstats": suffstats_loss, "supcon": supcon_loss, "dcl": dcl_loss}

# ---- 2. Views: crops and flips on the CPU, colour on the device -----
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, in the model

def random_crop_and_flip(size):
    """SimCLR's crop (area 0.08-1, aspect 3/4-4/3) and flip (p = 0.5), on CPU workers."""
    crop = v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True)
    return v2.Compose([crop, v2.RandomHorizontalFlip(), v2.ToImage()])

def centre_crop(size, small_images):
    """The probes' view: the centre, short side resized to 8/7 of it (small images: 1)."""
    resize = v2.Resize(size if small_images else size * 8 // 7)
    return v2.Compose([resize, v2.CenterCrop(size), v2.ToImage()])

class MultiView(torch.utils.data.Dataset):
    """Item i: (views [M, 3, H, W] uint8, label), M crops of image i, decoded once."""
    def __init__(self, dataset, transform, num_views):
        self.dataset, self.transform, self.num_views = dataset, transform, num_views

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, label = self.dataset[index]
        return torch.stack([self.transform(image) for _ in range(self.num_views)]), label

# Colour, on the device (on the CPU it costs more than decoding): images [N, 3, H, W] in
# [0, 1], a random draw per view, as a tensor [N]. Pixel arithmetic: Part II, "Views, fast".
def colour_jitter(images, strength, p=0.8):
    """SimCLR's RandomApply([ColorJitter(0.8s, 0.8s, 0.8s, 0.2s)], p = 0.8), per view:
    brightness, contrast and saturation factors ~ U[max(0, 1 - 0.8s), 1 + 0.8s], a hue
    shift ~ U[-0.2s, 0.2s] turns, the four in a random order (torchvision's randperm)."""
    n, device = len(images), images.device
    low, high = max(0.0, 1 - 0.8 * strength), 1 + 0.8 * strength
    factors = low + (high - low) * torch.rand(n, 3, device=device)  # [N, 3]
    shift = 0.2 * strength * (2 * torch.rand(n, device=device) - 1)  # [N]
    order = torch.rand(n, 4, device=device).argsort(dim=1)  # [N, 4]; op 3 is the hue
    jittered = jitter(images, order, factors, shift)
    chosen = torch.rand(n, device=device) < p  # [N]
    return torch.where(chosen.view(-1, 1, 1, 1), jittered, images)

def random_grayscale(images, p=0.2):
    """SimCLR's RandomGrayscale(p = 0.2): a view becomes its luma, on all 3 channels."""
    chosen = torch.rand(len(images), device=images.device) < p
    grey = luma(images).expand_as(images)
    return torch.where(chosen.view(-1, 1, 1, 1), grey, images)

def random_blur(images, kernel_size, p=0.5):
    """SimCLR's RandomApply([GaussianBlur(k, sigma ~ U[0.1, 2])], p = 0.5), per view."""
    sigma = 0.1 + 1.9 * torch.rand(len(images), device=images.device)
    chosen = torch.rand(len(images), device=images.device) < p
    blurred = gaussian_blur(images, kernel_size, sigma)
    return torch.where(chosen.view(-1, 1, 1, 1), blurred, images)

def device_augment(crops, small_images):
    """uint8 crops [n, M, 3, H, W] -> views in [0, 1]: jitter (strength 1; 0.5 on small
    images), grayscale, and a blur of a tenth of the side (none on small images)."""
    x = crops.flatten(0, 1).float() / 255  # [n*M, 3, H, W]
    x = colour_jitter(x, strength=0.5 if small_images else 1.0)
    x = random_grayscale(x)
    if not small_images:
        x = random_blur(x, kernel_size=int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    return x.view(crops.shape)

# ---- 3. Model --------------------------------------------------------
class PolyViewNet(nn.Module):
    """A torchvision ResNet without classifier: the features the probes see (width 2048,
    or 512 for a ResNet-18); then SimCLR's projector, Linear - BN - ReLU - Linear - BN: z.
    As in SimCLR's code, an online probe classifies the features behind a stop-gradient."""
    def __init__(self, arch="resnet50", small_images=False, classes=1000, dim=128):
        super().__init__()
        self.backbone = getattr(torchvision.models, arch)(zero_init_residual=True)
        if small_images:  # 32x32 inputs keep their size, as in SimCLR's CIFAR models
            self.backbone.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            self.backbone.maxpool = nn.Identity()
        width = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
            nn.Linear(width, dim, bias=False), nn.BatchNorm1d(dim))
        self.projector[-1].bias.requires_grad_(False)  # SimCLR's center=False: beta = 0
        probe = [nn.BatchNorm1d(width, affine=False), nn.Linear(width, classes)]
        self.online_probe = nn.Sequential(*probe)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def features(self, images):  # [N, 3, H, W] in [0, 1] -> [N, width]
        return self.backbone((images - self.mean) / self.std)

    def forward(self, views):
        """views [n, M, 3, H, W] -> (z [n, M, dim], online probe logits [n*M, classes])."""
        n, M = views.shape[:2]
        features = self.features(views.flatten(0, 1))  # [n*M, width]
        z = self.projector(features).view(n, M, -1)
        return z, self.online_probe(features.detach())

def mixed_precision(device, precision):
    """The model's autocast: matmuls and convolutions in bf16 or fp16, or none (fp32)."""
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype, enabled=precision != "fp32")

# ---- 4. What to watch: the embeddings' geometry, the probes --------
@torch.no_grad()
def contrastive_top1(z, temperature, anchors=None):
    """Percent of pairs (ia, ib), b != a, with s(ia, ib) > max_{j != i, g} s(ia, jg): the
    same for every objective, so runs compare. A loss can flatten while this climbs."""
    _, sim, positives, _ = similarities(z, temperature, anchors)
    return (positives > sim.amax(dim=(2, 3))[..., None]).float().mean() * 100

@torch.no_grad()
def alignment(z):
    """How close an image's views land (Wang and Isola, ICML 2020): the mean over i and
    a != b of ||z[i,a] - z[i,b]||^2, z normalised; 0 to 4, lower: views closer."""
    z = F.normalize(z.double(), dim=-1)  # float64, which autocast leaves as it is
    gram = z @ z.transpose(1, 2)  # [K, M, M]: <z[i,a], z[i,b]>
    return without_diagonal(2 - 2 * gram).mean().float()  # ||u - v||^2 = 2 - 2 <u, v>

@torch.no_grad()
def uniformity(z):
    """How evenly images spread over the sphere (Wang and Isola, ICML 2020): the mean over
    views a of log mean_{i != j} exp(-2 ||z[i,a] - z[j,a]||^2); lower: wider. By Jensen,
    at least -4 - 4 / (K - 1): -4 for large K."""
    z = F.normalize(z.double(), dim=-1).transpose(0, 1)  # [M, K, D], float64
    K = z.shape[1]
    distances = 2 - 2 * z @ z.transpose(1, 2)  # [M, K, K]
    pairs = without_diagonal(-2 * distances).flatten(1)  # [M, K(K-1)]: i != j
    return (pairs.logsumexp(dim=1) - math.log(K * (K - 1))).mean().float()

@torch.no_grad()
def effective_rank(features):
    """RankMe (Garrido et al., 2023): exp(-sum_k p_k log p_k), p_k = s_k / sum_j s_j + 1e-7,
    s the singular values of features [N, width]: min(N, width) if isotropic, 1 if a line."""
    sigma = torch.linalg.svdvals(features)
    p = sigma / sigma.sum() + 1e-7
    return torch.exp(-(p * p.log()).sum())

@torch.no_grad()
def extract_features(model, dataset, device, args):
    """(features [N, width], labels [N]) of centre crops, eval mode, on rank 0 (else None,
    None): each rank extracts its shard."""
    rows = math.ceil(len(dataset) / world_size())  # per rank; the last one padded
    first = rank() * rows
    mine = torch.utils.data.Subset(dataset, range(first, min(first + rows, len(dataset))))
    loader = torch.utils.data.DataLoader(mine, 256, num_workers=args.workers,
                                         pin_memory=device.type == "cuda")
    features = torch.zeros(rows, model.projector[0].in_features, device=device)
    labels = torch.zeros(rows, dtype=torch.long, device=device)
    model.eval()
    for batch, (crops, label) in enumerate(loader):  # crops [B, 1, 3, H, W] uint8
        here = slice(batch * 256, batch * 256 + len(crops))
        images = crops.flatten(0, 1).to(device, non_blocking=True).float() / 255
        with mixed_precision(device, args.precision):
            features[here] = model.features(images).float()
        labels[here] = label.to(device)
    return gather_to_rank_0(features, labels, len(dataset))

@torch.no_grad()
def val_pass(model, dataset, device, args):
    """On rank 0 ({} elsewhere): the online probe's val top-1, and the features' rank."""
    features, labels = extract_features(model, dataset, device, args)
    if features is None:
        return {}
    hits = model.online_probe(features).argmax(dim=1) == labels
    return {"online_val_top1": hits.float().mean().item() * 100,
            "effective_rank": effective_rank(features).item()}

@torch.no_grad()
def knn(train_x, train_y, val_x, k=20, temperature=0.07):
    """The k-NN probe (Wu et al., 2018): a val image's k most cosine-similar train images
    vote exp(similarity / temperature) each. Returns predictions, neighbours [N_val, k]."""
    train_norms = train_x.norm(dim=1).clamp_min(1e-12)  # no normalised copy
    predictions, neighbours = [], []
    for queries in F.normalize(val_x, dim=1).split(256):  # [B, width]
        similarity = queries @ train_x.T  # [B, N]
        similarity /= train_norms  # in place: 1.3 GB on ImageNet
        top, index = similarity.topk(min(k, len(train_x)), dim=1)  # [B, k]
        votes = top.new_zeros(len(queries), int(train_y.max()) + 1)
        votes.scatter_add_(1, train_y[index], (top / temperature).exp())
        predictions.append(votes.argmax(dim=1))
        neighbours.append(index)
    return torch.cat(predictions), torch.cat(neighbours)

def linear_probe(train_x, train_y, val_x, val_y, epochs, device, min_steps=1000):
    """Top-1 and top-5 (None under 5 classes) % of a linear classifier on standardised
    frozen features (train_x in place: ImageNet's is 10.5 GB), AdamW, cosine, max(epochs x
    ceil(N / 1024), min_steps) steps of 1,024: 112,680 on ImageNet at 90 epochs."""
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
        hits = classifier(val_x).topk(min(5, classes), dim=1).indices == val_y[:, None]
    return {"top1": hits[:, 0].float().mean().item() * 100,
            "top5": hits.any(dim=1).float().mean().item() * 100 if classes >= 5 else None}

def fast_probe(model, train_set, val_set, args, device):
    """On rank 0 (else None; None at --probe-epochs 0): k-NN, neighbours.png, a linear
    classifier, the val features' rank. Not SimCLR's linear evaluation (SGD on crops)."""
    if args.probe_epochs == 0:
        return None
    train_x, train_y = extract_features(model, train_set, device, args)
    val_x, val_y = extract_features(model, val_set, device, args)
    if train_x is None:
        return None
    predictions, neighbours = knn(train_x, train_y, val_x)
    path = Path(args.out) / "neighbours.png"
    save_neighbours_png(train_set, val_set, train_y, val_y, neighbours, path)
    geometry = {"effective_rank": effective_rank(val_x).item(), "feature_width": val_x.shape[1]}
    torch.manual_seed(stream_seed("probe", args.seed))
    return {"protocol": "fast linear probe: AdamW on standardised frozen features of centre "
                        "crops, not SimCLR's linear evaluation (90 epochs of SGD on crops)",
            **linear_probe(train_x, train_y, val_x, val_y, args.probe_epochs, device),
            "knn_top1": (predictions == val_y).float().mean().item() * 100, **geometry}

# ---- 5. One training step, with all processes' negatives ------------
def gather(x):
    """All ranks' x [n, ...] -> [world_size() * n, ...], in rank order."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)

class GatherWithGrad(torch.autograd.Function):
    """gather, whose backward sums the gradient over ranks (every rank's loss used every
    rank's embeddings) and keeps this rank's slice: with DDP, the full batch's gradient."""
    @staticmethod
    def forward(ctx, x):
        return gather(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]

def step_loss(model, views, labels, objective, temperature, supervised=False):
    """This rank's share of a step on views [n, M, 3, H, W] with labels [n]: its anchors
    against all ranks' embeddings, plus the online probe's loss; and the step's numbers."""
    z, logits = model(views)  # [n, M, D], [n*M, classes]
    # BN leaves bf16 or fp16 under autocast: gather z, and sum its gradient, in float32.
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    n, M = views.shape[:2]
    anchors = slice(rank() * n, (rank() + 1) * n)  # this rank's images among all K
    if dist.is_initialized():  # all ranks' z [K, M, D] and labels [K]
        z, labels = GatherWithGrad.apply(z), gather(labels)
    supervision = {"labels": labels} if supervised else {}
    loss = objective(z, temperature, anchors, **supervision)
    view_labels = labels[anchors].repeat_interleave(M)  # [n*M]: i's, for its views
    probe_loss = F.cross_entropy(logits, view_labels)
    probe_hits = logits.detach().argmax(dim=1) == view_labels
    stats = {"loss": loss.detach(), "contrastive_top1": contrastive_top1(z, temperature, anchors),
             "online_probe_top1": probe_hits.float().mean() * 100,
             "alignment": alignment(z), "uniformity": uniformity(z)}
    return loss + probe_loss, stats

def train_step(model, optimizer, scaler, views, labels, args):
    """One step; returns step_loss's numbers. Under fp16 the loss is scaled by S, so that
    small gradients survive, and they by 1/S for LARS; on overflow: no step, S halved."""
    with mixed_precision(views.device, args.precision):
        objective, tau = LOSSES[args.loss], args.temperature
        loss, stats = step_loss(model, views, labels, objective, tau, args.supervised)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)  # skipped if a gradient overflowed
    scaler.update()
    return stats

# ---- 6. Optimiser and schedule ---------------------------------------
class LARS(torch.optim.Optimizer):
    """SGD with momentum and a trust ratio per layer (You et al., 2017), the rate inside the
    momentum as in SimCLR's code (a new rate scales new gradients, not the velocity):

        g = grad + weight_decay w,      trust = trust_coefficient ||w|| / ||g||,
        v <- momentum v + lr trust g,   w <- w - v.
    1-D weights (biases, BN) and groups with adapt=False: neither decay nor trust ratio."""
    def __init__(self, params, lr, weight_decay=1e-6, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient, adapt=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for w in (w for w in group["params"] if w.grad is not None):
                g = w.grad
                if w.ndim > 1 and group["adapt"]:
                    g = g.add(w, alpha=group["weight_decay"])
                    w_norm, g_norm = w.norm(), g.norm()
                    trust = group["trust_coefficient"] * w_norm / g_norm
                    # torch.where, not an if: nothing waits for the GPU
                    g = g.mul(torch.where((w_norm > 0) & (g_norm > 0), trust, 1.0))
                if "velocity" not in self.state[w]:
                    self.state[w]["velocity"] = torch.zeros_like(w)
                velocity = self.state[w]["velocity"]
                velocity.mul_(group["momentum"]).add_(g, alpha=group["lr"])
                w.sub_(velocity)

def learning_rate(step, total_steps, warmup_steps, peak):
    """A linear warm-up to the peak over W = warmup_steps, then a cosine decay to 0 at
    T = total_steps: peak (t + 1) / W for t < W, then peak (1 + cos(pi (t-W) / (T-W))) / 2."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))

def peak_learning_rate(args):
    """SimCLR's rules, K in images (not views): lr sqrt(K), or lr K / 256."""
    scale = math.sqrt(args.batch_size) if args.lr_scaling == "sqrt" else args.batch_size / 256
    return args.lr * scale

# ---- 7. The run ------------------------------------------------------
STREAMS = ("views", "order", "weights", "probe")  # a run's random streams

def stream_seed(stream, seed, rank=0, epoch=0):
    """(stream, seed, rank, epoch) mixed by SeedSequence, unlike a sum: a stream each."""
    entropy = [STREAMS.index(stream), seed, rank, epoch]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])

def start_processes(args):
    """The device; under torchrun (RANK is set, as in nanoGPT), a GPU and a group."""
    device = torch.device(args.device)
    if "RANK" in os.environ:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest convolutions
    return device

def build_model(args, classes, device, lr, checkpoint=None):
    """(model to call, plain module, LARS, fp16's scaler), from a checkpoint if any."""
    torch.manual_seed(stream_seed("weights", args.seed))  # the same on every rank
    model = PolyViewNet(args.arch, args.small_images, classes)
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        load_weights(args, model.backbone)
    cuda = device.type == "cuda"
    # SyncBN: a GPU's own BN statistics would tell which of its views belong together.
    if dist.is_initialized() and cuda:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    # The online probe: LARS without decay or trust ratio, as in SimCLR's code.
    probe = list(model.online_probe.parameters())
    contrastive = [p for p in model.parameters() if all(p is not q for q in probe)]
    groups = [{"params": contrastive}, {"params": probe, "adapt": False}]
    optimizer = LARS(groups, lr, args.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"] or scaler.state_dict())  # {}: no fp16
    raw_model = model
    if args.compile:
        model.backbone.compile()  # in place: the state_dict's keys stay as they are
    if dist.is_initialized():  # with SyncBN, no BN buffers to broadcast
        model = DistributedDataParallel(model, [device.index] if cuda else None,
                                        broadcast_buffers=False)
    return model, raw_model, optimizer, scaler

def train(args):
    """Pre-train with the objective, watching the online probe; then the fast probe."""
    device = start_processes(args)
    pretrain_set, probe_train_set, probe_val_set, classes = make_datasets(args)
    checkpoint = open_run_folder(args, classes)  # None, or the last epoch's
    sampler = torch.utils.data.DistributedSampler(pretrain_set, world_size(), rank(),
                                                  drop_last=True)
    loader = torch.utils.data.DataLoader(
        pretrain_set, args.batch_size // world_size(), sampler=sampler, drop_last=True,
        num_workers=args.workers, pin_memory=device.type == "cuda")
    total_steps = args.epochs * len(loader)
    warmup_steps = round(min(args.warmup_epochs, args.epochs / 10) * len(loader))
    peak_lr = peak_learning_rate(args)
    model, raw_model, optimizer, scaler = build_model(args, classes, device, peak_lr, checkpoint)
    first_epoch = checkpoint["epoch"] if checkpoint else 0
    step = first_step = checkpoint["step"] if checkpoint else 0
    log = Log(args, pretrain_set, len(loader), checkpoint)  # prints the start line
    for epoch in range(first_epoch, args.epochs):
        model.train()
        # Seeded by epoch: a resumed run draws the views and order it would have drawn.
        sampler.seed = stream_seed("order", args.seed, 0, epoch)  # split by rank
        torch.manual_seed(stream_seed("views", args.seed, rank(), epoch))
        for crops, labels in log.timed(loader):  # [n, M, 3, H, W] uint8, [n]
            crops = crops.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            views = device_augment(crops, args.small_images)  # float [n, M, 3, H, W]
            if step == first_step:  # what the model sees: the M views of 4 images
                save_grid([list(v) for v in views[:4]], Path(args.out) / "views.png")
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = train_step(model, optimizer, scaler, views, labels, args)
            step += 1
            log.step(step, epoch, lr, stats)
        log.write(step=step, epoch=epoch, **val_pass(raw_model, probe_val_set, device, args))
        state = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step,
                 "args": vars(args)}
        save(Path(args.out) / "checkpoint.pt", state)
    # The backbone alone, in torchvision's keys (no fc), for torchvision's ResNet
    backbone = raw_model.backbone.state_dict()
    save(Path(args.out) / "backbone.pt", {k: v.cpu().contiguous() for k, v in backbone.items()})
    probe = fast_probe(raw_model, probe_train_set, probe_val_set, args, device)
    report(args, probe)  # the summary, probe.json and training.png
    if dist.is_initialized():
        dist.destroy_process_group()


# ======================================================================
# Part II. Running it for real: flags, errors, the data's guards, views fast, the run folder...
# ======================================================================
def parse_args(argv=None):  # RECIPE's flags, checked before any data or GPU is touched
    p = argparse.ArgumentParser(description="Poly-view contrastive pre-training, then a fast probe")
    choices = dict(loss=list(LOSSES), arch=["resnet50", "resnet18"], lr_scaling=["sqrt", "linear"],
                   dataset=["imagenet", "folder", "cifar10", "cifar100", "fake"],
                   precision=["auto", "bf16", "fp16", "fp32"])
    for name, (default, about) in RECIPE.items():
        flag, about = "--" + name.replace("_", "-"), f"{about} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", default=None, help=about)
        else:  # lr's default, a dict, is picked by --lr-scaling
            kind = float if isinstance(default, dict) else str if default is None else type(default)
            p.add_argument(flag, type=kind, choices=choices.get(name), help=about)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--benchmark", action="store_true", help="the step's views/s, memory per view")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="runs side by side: compare.png")
    args = p.parse_args(argv)
    given = {name: value for name, value in vars(args).items() if value is not None}
    recipe = {name: default for name, (default, _) in RECIPE.items()}
    if given.get("dataset", recipe["dataset"]).startswith("cifar"):
        recipe["image_size"] = 32
    if given.get("image_size", recipe["image_size"]) <= 64:
        recipe.update(SMALL_IMAGES)
    if given.get("loss", recipe["loss"]) == "simclr":
        recipe["views"] = 2
    recipe["lr"] = recipe["lr"][given.get("lr_scaling", recipe["lr_scaling"])]
    vars(args).update({name: value for name, value in recipe.items() if name not in given})
    args.small_images = args.image_size <= 64
    for name, least in dict(views=2, batch_size=2, epochs=0, workers=0, probe_epochs=0, seed=0,
                            log_every=1, image_size=8, warmup_epochs=0, weight_decay=0, lr=0,
                            temperature=0).items():
        value, strict = getattr(args, name), name in ("lr", "temperature")
        if not (value > least if strict else value >= least) or value == math.inf:  # or nan
            raise UserError(f"--{name.replace('_', '-')} must be a finite number "
                            f"{'>' if strict else '>='} {least}, got {value}", everywhere=True)
    try:  # the objective knows its own rules (simclr needs M = 2)
        LOSSES[args.loss](torch.randn(2, args.views, 4), args.temperature)
    except ValueError as error:
        raise UserError(f"--loss {args.loss} --views {args.views}: {error}", everywhere=True)
    device, world = args.device.split(":")[0], world_size()
    if args.supervised and args.loss != "supcon":
        raise UserError(f"--supervised is supcon's form, not --loss {args.loss}", everywhere=True)
    if args.batch_size % world:
        raise UserError(f"--batch-size {args.batch_size} must divide among {world} processes",
                        everywhere=True)
    if args.benchmark and world > 1:
        raise UserError("--benchmark measures one GPU: run it with python, not torchrun",
                        everywhere=True)
    if device not in ("cuda", "cpu") or device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no such device here", everywhere=True)
    args.precision_reason = "--precision"
    if args.precision == "auto" and device == "cpu":
        args.precision, args.precision_reason = "fp32", "auto: on the CPU"
    elif args.precision == "auto":  # bf16 from 8.0 (A100, H100); T4s, V100s emulate it: fp16
        major, minor = torch.cuda.get_device_capability(int(os.environ.get("LOCAL_RANK", 0)))
        args.precision = "bf16" if major >= 8 else "fp16"
        has = "has" if major >= 8 else "has no"
        args.precision_reason = f"auto: compute capability {major}.{minor} {has} bf16 hardware"
    return args

class UserError(Exception):  # one line, exit 2; printed by rank 0 alone if every rank meets it
    def __init__(self, message, everywhere=False):
        super().__init__(message)
        self.everywhere = everywhere

def agree(work):  # work() on every process; a UserError on any, on all (else the others wait)
    try:
        result, error = work(), None
    except UserError as caught:
        result, error = None, str(caught)
    errors = [error] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(errors, error)  # also where the processes wait for each other
    for where, message in enumerate(errors):
        if message:
            raise UserError(message if where == 0 else f"(rank {where}) {message}", everywhere=True)
    return result

def stop(signum, frame):  # SIGINT, SIGTERM: a KeyboardInterrupt (data workers end quietly)
    for name in (signal.SIGINT, signal.SIGTERM):
        signal.signal(name, signal.SIG_IGN)
    raise KeyboardInterrupt(signum)

def out_of_memory(args, error):  # where CUDA ran out of memory (off the traceback), the way out
    where = {frame.name for frame in traceback.extract_tb(error.__traceback__)}
    if "fast_probe" in where:
        return ("in the fast probe (rank 0 holds all features): rerun with --resume on a GPU with "
                "more memory, or with --device cpu; a finished run goes straight to its probe")
    if "val_pass" in where:
        return f"in the online probe's val pass: lower --batch-size; {checkpoint_kept(args.out)}"
    n = args.batch_size // world_size()
    return (f"with {n} x {args.views} = {n * args.views} views per GPU ({args.arch} at "
            f"{args.image_size} px): run on more GPUs under torchrun, or lower --batch-size "
            "(half the batch: lr / 1.41, by the square-root rule)")

# ---- The data and its guards -----------------------------------------
def make_datasets(args):  # pre-training set of M views, probes' train and val sets, classes
    decode = v2.ToImage()  # once per image: PIL -> uint8 [3, H, W], cropped twice as fast
    if args.dataset == "fake":  # noise of 10 classes, for the benchmark; val apart from train
        shape, n = (3, args.image_size, args.image_size), args.batch_size
        train = torchvision.datasets.FakeData(50 * n, shape, 10, decode)
        val = torchvision.datasets.FakeData(10 * n, shape, 10, decode, random_offset=10**6)
    else:  # ImageFolders, val's labels by train's class names; or CIFAR
        train, val = read_dataset(args, decode)
    crop = random_crop_and_flip(args.image_size)
    centre = centre_crop(args.image_size, args.small_images)
    sets = [MultiView(train, crop, args.views), MultiView(train, centre, 1)]
    sets.append(MultiView(val, centre, 1))
    classes = train.num_classes if args.dataset == "fake" else len(train.classes)
    return *[SkipUndecodable(dataset, args.workers) for dataset in sets], classes

class SkipUndecodable(torch.utils.data.Dataset):
    """dataset[i], or if it does not decode, a warning and the next. counts [workers + 1, 2], in
    shared memory: each loading process's files skipped and read."""
    def __init__(self, dataset, workers=0):
        self.dataset, self.folder = dataset, getattr(dataset, "dataset", dataset)  # ImageFolder
        self.counts = torch.zeros(workers + 1, 2, dtype=torch.long).share_memory_()

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        worker = torch.utils.data.get_worker_info()
        counts = self.counts[0 if worker is None else worker.id + 1]  # [skipped, read]
        for skipped in range(len(self)):
            i = (index + skipped) % len(self)
            try:
                return self.dataset[i]
            except Exception as error:
                counts[0] += 1
                name = self.folder.samples[i][0] if hasattr(self.folder, "samples") else f"#{i}"
                warnings.warn(f"skipping undecodable image {name}: {type(error).__name__}: {error}")
            finally:
                counts[1] += 1
        root = getattr(self.folder, "root", "it")
        raise UserError(f"none of the {len(self)} images in {root} could be decoded")

def read_dataset(args, decode):  # (train, val) on every process; val's classes numbered as train's
    root, cifar = Path(args.data), args.dataset.startswith("cifar")

    def read(download=False):
        try:  # no folder; no class folders (as ImageNet's val/ ships); an empty one; no CIFAR
            if cifar:
                dataset = getattr(torchvision.datasets, args.dataset.upper())
                return [dataset(root, split, decode, download=download) for split in (True, False)]
            train = torchvision.datasets.ImageFolder(root / "train", decode)
            val = torchvision.datasets.ImageFolder(root / "val", decode)
        except (OSError, RuntimeError) as error:
            hint = ("could not be read or downloaded" if cifar else "must hold the ImageFolders "
                    "train/ and val/, one sub-folder per class (sort ImageNet's flat val/ into "
                    "them with valprep.sh)")
            raise UserError(f"--dataset {args.dataset} --data {root} {hint}: {error}")
        if unknown := sorted(set(val.classes) - set(train.classes)):
            raise UserError(f"{root / 'val'} has class folders that train/ lacks: "
                            + ", ".join(unknown))
        val.samples = [(path, train.class_to_idx[val.classes[y]]) for path, y in val.samples]
        val.classes, val.class_to_idx = train.classes, train.class_to_idx
        with warnings.catch_warnings():  # a folder where nothing decodes stops here, at once
            warnings.simplefilter("ignore")
            SkipUndecodable(train)[0], SkipUndecodable(val)[0]
        if len(train) < args.batch_size:
            raise UserError(f"{len(train)} images in {root / 'train'} make no full batch of "
                            f"{args.batch_size}")
        return train, val
    if not cifar:
        return agree(read)
    downloaded = agree(lambda: None if int(os.environ.get("LOCAL_RANK", 0)) else read(True))
    return agree(lambda: downloaded or read())

def gather_to_rank_0(features, labels, total):  # all ranks' rows on rank 0, in order, unpadded
    if world_size() == 1:
        return features[:total], labels[:total]
    banks = [x.new_empty(world_size(), *x.shape) if rank() == 0 else None
             for x in (features, labels)]
    for x, bank in zip((features, labels), banks):  # into one buffer: ImageNet's are 10.5 GB
        dist.gather(x, list(bank.unbind()) if rank() == 0 else None)
    return tuple(bank.flatten(0, 1)[:total] for bank in banks) if rank() == 0 else (None, None)

# ---- Views, fast: colour ops on a batch, equal to torchvision's -----
# Each view has its own parameters, a tensor [N]; torch.where replaces ifs: no wait for the GPU.
def luma(images):
    """ITU-R 601-2 luma, Y = 0.2989 R + 0.587 G + 0.114 B: [N, 3, H, W] -> [N, 1, H, W]."""
    r, g, b = images.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)

def adjust_colour(images, op, factor):
    """Brightness, contrast or saturation (op [N] 0, 1, 2) by factor [N]: x -> clamp(f x +
    (1 - f) y, 0, 1), y black, the view's mean luma or its luma."""
    y = luma(images)  # [N, 1, H, W]
    mean = y.mean(dim=(1, 2, 3), keepdim=True)  # [N, 1, 1, 1]
    op, factor = op.view(-1, 1, 1, 1), factor.view(-1, 1, 1, 1)
    y = torch.where(op == 0, 0.0, torch.where(op == 1, mean, y))
    return (factor * images + (1 - factor) * y).clamp(0, 1)

def adjust_hue(images, shift):
    """Rotate the hue by shift [N] turns: RGB -> HSV, h -> (h + shift) mod 1, HSV -> RGB."""
    r, g, b = images.unbind(dim=1)
    v = images.amax(dim=1)  # [N, H, W]
    chroma = v - images.amin(dim=1)
    s = chroma / torch.where(v > 0, v, 1.0)  # black: s = 0, not 0 / 0
    c = torch.where(chroma > 0, chroma, 1.0)  # grey: any finite hue will do
    # The largest channel picks the sector of the colour wheel (ties: r, then g, as PIL).
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2 + (b - r) / c, 4 + (r - g) / c))
    h = (h / 6 + shift.view(-1, 1, 1)) % 1.0
    # Back: channel n = 5, 3, 1 (R, G, B) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    n = torch.arange(5.0, 0.0, -2.0, device=images.device).view(1, 3, 1, 1)
    k = (n + 6 * h.unsqueeze(1)) % 6  # [N, 3, H, W]
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)

def jitter(images, order, factors, shift):
    """ColorJitter, each view its own blends (factors [N, 3]), hue (shift [N]) and order [N, 4]
    of ops 0-3 (3: hue). The costly hue runs once, between the blends before and after it."""
    hue_at = order.argmax(dim=1)  # [N]: the position of op 3
    blends = order.clamp(max=2)  # [N, 4]; at the hue, unused
    factor = factors.gather(1, blends)  # [N, 4]
    for position in range(3):  # positions 0-2 may come before the hue (a factor of 1: no blend)
        chosen = torch.where(position < hue_at, factor[:, position], 1.0)
        images = adjust_colour(images, blends[:, position], chosen)
    images = adjust_hue(images, shift)
    for position in range(1, 4):  # positions 1-3 may come after it
        chosen = torch.where(position > hue_at, factor[:, position], 1.0)
        images = adjust_colour(images, blends[:, position], chosen)
    return images

def gaussian_blur(images, kernel_size, sigma):
    """Blur each view with its own sigma [N], reflecting at the borders, by the separable kernel
    w(x) = exp(-x^2 / (2 sigma^2)) / sum, x = -(k-1)/2 .. (k-1)/2: 2k taps a pixel, not k^2."""
    n, c, height, width = images.shape
    x = torch.arange(kernel_size, device=images.device) - (kernel_size - 1) / 2  # [k]
    kernel = torch.exp(-x**2 / (2 * sigma.float().view(-1, 1) ** 2))  # [N, k]
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # [N*3, k]
    pad = kernel_size // 2
    # Views x channels become the channels of one image: groups = N*3, a kernel each.
    out = F.pad(images.reshape(1, n * c, height, width), [pad] * 4, mode="reflect")
    with torch.autocast(images.device.type, enabled=False):  # float32 under autocast
        out = F.conv2d(out, kernel.view(n * c, 1, 1, -1), groups=n * c)  # [1, N*3, H+2p, W]
        out = F.conv2d(out, kernel.view(n * c, 1, -1, 1), groups=n * c)  # [1, N*3, H, W]
    return out.view(n, c, height, width)

# ---- The run folder: --weights, checkpoints, resume, the log ---------
def load_weights(args, backbone):  # on every process: a backbone.pt, or torchvision's file
    def load():
        try:  # weights_only: never run pickled code
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
            backbone.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")})
        except Exception as error:  # no file, no torch file, no state_dict, another model's
            lines = sorted(str(error).splitlines(), key=lambda line: "Missing" in line)
            details = " ".join(" ".join(lines).split())  # size mismatches before missing keys
            stem = "3x3 stem of small images" if args.small_images else "ImageNet stem"
            raise UserError(f"--weights {args.weights} does not load into --arch {args.arch} at "
                            f"{args.image_size} px ({stem}): {type(error).__name__}: "
                            + details[:300] + "..." * (len(details) > 300))
    agree(load)

def save(path, state):  # by rank 0: to a temporary file, flushed, renamed over path (atomic)
    if rank() > 0:
        return
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as f:
            f.write(state.encode()) if isinstance(state, str) else torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as error:  # a full disk, say
        kept = checkpoint_kept(path.parent)
        raise UserError(f"could not write {path}: {error.strerror or error}; {kept}") from None
    finally:
        temporary.unlink(missing_ok=True)

def open_run_folder(args, classes):  # makes --out, or opens it: rank 0's checkpoint, or None
    path = Path(args.out) / "checkpoint.pt"

    def load():
        if rank() > 0:
            return None
        try:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        except OSError as error:  # a file there, say
            raise UserError(f"--out {args.out} cannot be a folder ({error.strerror})") from None
        if not path.exists():
            return None
        if not args.resume:
            raise UserError(f"{path} exists: add --resume to continue it, or choose another --out")
        try:  # weights_only: tensors and plain values only
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            was, learnt = checkpoint["args"], len(checkpoint["model"]["online_probe.1.bias"])
            if not {"optimizer", "scaler", "epoch", "step"} <= set(checkpoint):
                raise KeyError("no optimizer, scaler, epoch or step")
        except Exception as error:  # cut short, a full disk's, or not this program's
            why = f"{type(error).__name__}: {str(error).split('. ')[0][:80]}"
            raise UserError(f"{path} cannot be read as a checkpoint of polyview.py ({why}): "
                            "move it aside to start afresh") from None
        for key in ("arch", "loss", "supervised", "views", "batch_size", "dataset", "image_size",
                    "epochs", "lr_scaling", "lr", "warmup_epochs", "temperature", "weight_decay",
                    "seed", "weights"):
            if was.get(key) != getattr(args, key):
                flag = "--" + key.replace("_", "-")
                raise UserError(f"{path} has {flag} {was.get(key)}, not {getattr(args, key)}: "
                                f"resume with {flag} {was.get(key)}, or use another --out")
        if learnt != classes:
            raise UserError(f"{path} learnt {learnt} classes, --data {args.data} has {classes}")
        print(f"resuming {path} at epoch {checkpoint['epoch']}, step {checkpoint['step']}")
        return checkpoint
    found = [agree(load)]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)  # pickled: ~0.3 GB for a ResNet-50, once
    return found[0]

def checkpoint_kept(out, way_on=""):  # for a message that stops a run
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        return "no checkpoint yet"
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # no weights read
    return f"{path} (epoch {saved['epoch']}, step {saved['step']}) is kept as it was{way_on}"

def read_metrics(path):  # less a last line cut short by a crash (it cannot end in '}')
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]

class Log:  # OUT/metrics.jsonl, printed: means over steps and ranks; a clock paused between epochs
    def __init__(self, args, dataset, steps, checkpoint):  # steps per epoch
        self.args, self.dataset, self.enough = args, dataset, min(1000, len(dataset))
        self.path, self.total_steps = Path(args.out) / "metrics.jsonl", args.epochs * steps
        self.views_per_step, self.window, self.waited = args.batch_size * args.views, [], 0.0
        self.tick = self.asked = time.perf_counter()
        if rank() == 0:
            save(self.path.with_name("args.json"), json.dumps(vars(args), indent=1))
            if not checkpoint and self.path.exists():  # a run here that made no checkpoint
                os.replace(self.path, self.path.with_name("metrics.old.jsonl"))
            records = read_metrics(self.path) if checkpoint else []  # cut back to the checkpoint:
            kept = [json.dumps(r) + "\n" for r in records if r["step"] <= checkpoint["step"]]
            save(self.path, "".join(kept))
            print(f"{args.loss}: K={args.batch_size} images x M={args.views} views per step on "
                  f"{world_size()} x {args.device} in {args.precision} ({args.precision_reason}), "
                  f"{args.arch}, {steps} steps/epoch, peak lr {peak_learning_rate(args):.3g}")

    def timed(self, loader):  # the loader's batches, on the log's clock
        for n, batch in enumerate(loader):
            arrived = time.perf_counter()
            if n == 0:  # the clock stood still since the last epoch's end
                self.tick += arrived - self.asked
            else:
                self.waited += arrived - self.asked
            yield batch
            self.asked = time.perf_counter()
        if self.window:  # the epoch's last steps, checked before the val pass and checkpoint
            self.line()
        self.asked = time.perf_counter()  # from here to the next epoch's first batch: off

    def step(self, step, epoch, lr, stats):  # stats stay on the device until the next line
        self.window.append(stats)
        self.last = step, epoch, lr
        if step % self.args.log_every == 0:
            self.line()

    def line(self):
        (step, epoch, lr), seconds = self.last, time.perf_counter() - self.tick
        names = list(self.window[0])
        stats = torch.stack([torch.stack([s[k] for k in names]) for s in self.window]).double()
        counts = self.dataset.counts.sum(dim=0).to(stats)  # files skipped, read
        if dist.is_initialized():
            dist.all_reduce(stats)
            dist.all_reduce(counts)
            stats /= world_size()
        skipped, read = counts.tolist()
        if skipped > 0.01 * read and read >= self.enough:
            raise UserError(f"{skipped:.0f} of {read:.0f} images ({skipped / read:.0%}) could not "
                            "be decoded, more than 1%: check --data", everywhere=True)
        losses = stats[:, names.index("loss")]
        if not torch.isfinite(losses).all():  # the weights are poisoned: keep the checkpoint
            first = int((~torch.isfinite(losses)).nonzero()[0, 0])
            at = f"step {step - len(stats) + first + 1} (epoch {epoch})"
            raise UserError(f"loss is {losses[first].item()} at {at}; stopping: "
                            + checkpoint_kept(self.args.out), everywhere=True)
        means = dict(zip(names, stats.mean(dim=0).tolist()))
        self.write(step=step, epoch=epoch, **means, lr=lr, data_wait=self.waited / seconds,
                   views_per_s=len(stats) * self.views_per_step / seconds,
                   eta_s=(self.total_steps - step) * seconds / len(stats))
        self.window, self.tick, self.waited = [], time.perf_counter(), 0.0

    def write(self, **record):  # printed, and kept with the views seen over all ranks
        if rank() == 0:
            record["views_seen"] = record["step"] * self.views_per_step
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            print("  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                            for key, value in record.items()), flush=True)

# ---- Pictures, --compare and the benchmark ---------------------------
def report(args, probe):  # by rank 0: probe.json, its numbers printed, and training.png
    if rank() > 0:
        return
    from matplotlib.figure import Figure  # no pyplot: no display, no global state
    records = read_metrics(Path(args.out) / "metrics.jsonl")
    ends = [r for r in records if "online_val_top1" in r]  # none after --epochs 0
    top1 = [r["online_val_top1"] for r in ends] or [None]
    last = ([r for r in records if "alignment" in r] or [{}])[-1]  # the last window's
    result = {**(probe or {}), "online_val_top1_first_epoch": top1[0],
              "online_val_top1_last_epoch": top1[-1], "alignment": last.get("alignment"),
              "uniformity": last.get("uniformity")}
    numbers = [f"{k} {v:.2f}{'%' * ('top' in k)}" for k, v in result.items() if type(v) is float]
    print("probe.json:", ", ".join(numbers) or "-", "(top1, top5, knn_top1: the fast linear probe, "
          "not SimCLR's linear evaluation)" if probe else "")
    save(Path(args.out) / "probe.json", json.dumps(result) + "\n")
    axes = Figure(figsize=(14, 6)).subplots(2, 4, sharex=True)
    titles = ["loss", "contrastive_top1", "online_probe_top1", "lr", "alignment (lower is better)",
              "uniformity (lower is better)", "effective_rank (higher is better)"]
    for ax, title in zip(axes.flat, titles):
        key = title.split()[0]
        points = [r for r in records if key in r]
        ax.plot([r["step"] for r in points], [r[key] for r in points],
                "o-" if key == "effective_rank" else "-", label="training views")
        ax.set(title=title, ylabel="%" if "top1" in key else None,
               xlabel="step" if ax in axes[1] else None)
    axes[0, 2].plot([r["step"] for r in ends], top1[:len(ends)], "o-", label="val, epoch end")
    axes[0, 2].legend()
    axes[1, 3].axis("off")
    axes[0, 0].figure.tight_layout()
    axes[0, 0].figure.savefig(Path(args.out) / "training.png", dpi=100)

def save_grid(rows, path, frames=None):  # by rank 0: rows of images [3, H, W], framed, to a PNG
    if rank() > 0:
        return None
    columns, cells = max(len(row) for row in rows), []
    for r, row in enumerate(rows):
        for c, image in enumerate(row + [torch.ones_like(rows[0][0])] * (columns - len(row))):
            colour = frames[r][c] if frames and c < len(row) else (1.0, 1.0, 1.0)
            rgb = torch.tensor(colour, device=image.device).view(3, 1, 1)
            cells.append(F.pad(image - rgb, [3] * 4) + rgb)  # a frame of 3 px
    grid = torchvision.utils.make_grid(cells, nrow=columns, padding=2, pad_value=1.0)
    grid = F.interpolate(grid[None], scale_factor=max(1, 96 // rows[0][0].shape[-1]))[0]
    torchvision.utils.save_image(grid, path)
    return grid

def save_neighbours_png(train_set, val_set, train_labels, val_labels, neighbours, path):
    """Up to 8 classes' first val image (black) and 8 k-NN neighbours, green if same class."""
    queries = [int((val_labels == label).nonzero()[0, 0]) for label in val_labels.unique()[:8]]
    picked = [[query, *neighbours[query, :8].tolist()] for query in queries]
    rows = [[val_set[query][0][0] / 255] + [train_set[j][0][0] / 255 for j in nearest]
            for query, *nearest in picked]
    frames = [[(0, 0, 0)] + [(0, .7, 0) if train_labels[j] == val_labels[query] else (.9, 0, 0)
                             for j in nearest] for query, *nearest in picked]
    return save_grid(rows, path, frames), picked

def compare(args):  # compare.png: val top-1 against compute, as the paper's Figure 3; a table
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter
    ax = Figure(figsize=(7, 4)).subplots()
    rows = [("run", "loss", "M", "K", "epochs", "views seen", "online val top-1",
             "fast probe top-1", "k-NN top-1", "alignment", "uniformity", "effective rank")]
    for run in map(Path, args.compare):
        for name, what in (("args.json", "is not a run of polyview.py"),
                           ("metrics.jsonl", "is a run without a log")):
            if not (run / name).is_file():
                raise UserError(f"--compare: {run} {what} (no {name})")
        settings = json.loads((run / "args.json").read_text())
        records = read_metrics(run / "metrics.jsonl")
        ends = [r for r in records if "online_val_top1" in r]  # none after --epochs 0
        top1, M, K = [r["online_val_top1"] for r in ends], settings["views"], settings["batch_size"]
        if ends:  # an epoch shows the model M views of every image, a SimCLR epoch 2
            ax.plot([M * (r["epoch"] + 1) / 2 for r in ends], top1, "o-",
                    label=f"{run.name}: {settings['loss']}, M={M}, K={K}")
        probe = json.loads(p.read_text()) if (p := run / "probe.json").exists() else {}
        numbers = [top1[-1] if top1 else None] + [probe.get(key) for key in (
            "top1", "knn_top1", "alignment", "uniformity", "effective_rank")]
        rows.append((run, settings["loss"], M, K, f"{len(ends)}/{settings['epochs']}",
                     records[-1]["views_seen"] if records else 0,
                     *("-" if x is None else f"{x:.2f}" for x in numbers)))
    ax.set(xscale="log", xlabel="relative compute (views seen / 2 views per image per epoch)",
           ylabel="val top-1 (%)")
    ax.xaxis.set_major_formatter(LogFormatter())  # plain numbers: 3, not 3 x 10^0
    ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    if ax.lines:
        ax.legend()
    ax.figure.tight_layout()
    ax.figure.savefig("compare.png", dpi=100)
    widths = [max(len(str(row[n])) for row in rows) for n in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    print("wrote compare.png")

def benchmark(args):  # views/s of the training step, colour ops included; on CUDA, memory/view
    device = start_processes(args)
    pretrain_set, _, _, classes = make_datasets(args)
    model, _, optimizer, scaler = build_model(args, classes, device, lr=1e-4)
    loader = torch.utils.data.DataLoader(pretrain_set, args.batch_size, num_workers=args.workers)
    crops, labels = (x.to(device) for x in next(iter(loader)))
    views_per_step, best, cuda = args.batch_size * args.views, math.inf, device.type == "cuda"
    for attempt in range(21 if cuda else 4):  # the first, warm-up call compiles
        start = time.perf_counter()
        train_step(model, optimizer, scaler, device_augment(crops, args.small_images), labels, args)
        torch.cuda.synchronize() if cuda else None
        best = min(best, time.perf_counter() - start) if attempt else best
    memory = torch.cuda.max_memory_allocated() / views_per_step / 2**20 if cuda else 0
    print(f"{args.arch} at {args.image_size}px, K={args.batch_size} x M={args.views} = "
          f"{views_per_step} views/step, {args.loss}, {device.type}{' + compile' * args.compile}, "
          f"{args.precision} ({args.precision_reason}): {views_per_step / best:.1f} views/s"
          + (f", peak memory per view {memory:.1f} MiB" if memory else ""))

def main(argv=None):  # a fault ends in one line: exit 2, or 128 + signal (Ctrl-C 130, SIGTERM 143)
    args, previous = None, {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = parse_args(argv)
        if args.compare:
            return compare(args)
        try:
            benchmark(args) if args.benchmark else train(args)
        except torch.cuda.OutOfMemoryError as error:
            raise UserError(f"CUDA out of memory {out_of_memory(args, error)}") from None
        except RuntimeError as error:  # a data-loading worker killed, by a full /dev/shm, say
            if "DataLoader worker" not in str(error):
                raise
            first = str(error).splitlines()[0].rstrip(".")
            raise UserError(f"{first}. In a container, give it shared memory (docker run --ipc=host"
                            ", or --shm-size=16g), or lower --workers.") from None
    except UserError as error:
        if error.everywhere and rank() > 0:  # rank 0 prints it; were this rank to end first,
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun could stop rank 0 mid-line:
            time.sleep(10)  # this one waits, and torchrun ends it quietly
        else:
            print(f"polyview.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stopped:  # Ctrl-C, or SIGTERM by `stop`; every rank gets it
        signum = stopped.args[0] if stopped.args else signal.SIGINT
        if rank() == 0:
            kept = checkpoint_kept(args.out, "; --resume continues from it") if args else "-"
            print(f"polyview.py: stopped by {signal.Signals(signum).name}: {kept}", file=sys.stderr)
        sys.exit(128 + signum)
    finally:
        for name, handler in previous.items():
            signal.signal(name, handler)


if __name__ == "__main__":
    main()
