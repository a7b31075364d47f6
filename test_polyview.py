"""Tests for polyview: the objectives against naive loops, then the training program end to end.

Run with `python -m pytest` from the repository root (about 7 minutes on two CPU cores).
"""
import argparse
import csv
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as TV
from torchvision.transforms.v2 import functional as TF

import polyview
from polyview import LOSSES

MULTI_VIEW = [name for name in LOSSES if name != "simclr"]  # every objective that takes any M >= 2


# ----------------------------------------------------------------------------------------------
# Naive references, written straight from the formulas in the objectives' docstrings: plain loops
# over anchors, positives and other samples, no masks. Slow, float64, obviously right.
# ----------------------------------------------------------------------------------------------


def naive_loss(name, z, temperature, anchors=None, labels=None):
    K, M, _ = z.shape
    z = z / z.norm(dim=-1, keepdim=True)
    s = torch.einsum("iad,jgd->iajg", z, z) / temperature  # s[i,a,j,g] = <z_ia, z_jg> / tau

    def negatives(i, a, views):  # sum over j != i and g in views of exp s(ia, jg)
        return sum(s[i, a, j, views].exp().sum() for j in range(K) if j != i)

    terms = []
    for i in range(K)[anchors or slice(None)]:
        for a in range(M):
            others = [b for b in range(M) if b != a]
            N = negatives(i, a, list(range(M)))
            everyone_else = [(j, g) for j in range(K) for g in range(M) if (j, g) != (i, a)]
            if name == "simclr":  # all 2K - 1 other views are candidates
                b = 1 - a
                candidates = sum(s[i, a, j, g].exp() for j, g in everyone_else)
                terms.append(-s[i, a, i, b] + candidates.log())
            elif name == "multicrop":
                for b in others:
                    pair_negatives = negatives(i, a, [a, b])
                    terms.append(-s[i, a, i, b] + (s[i, a, i, b].exp() + pair_negatives).log())
            elif name == "geometric":
                for b in others:
                    terms.append(-s[i, a, i, b] + (s[i, a, i, b].exp() + N).log())
            elif name == "arithmetic":
                p = [s[i, a, i, b].exp() / (s[i, a, i, b].exp() + N) for b in others]
                terms.append(-(sum(p) / (M - 1)).log())
            elif name == "suffstats":
                t = sum(z[i, b] for b in others)
                t = t / t.norm().clamp_min(1e-12)  # at D = 1 the other views can cancel: t = 0
                u = torch.dot(z[i, a], t) / temperature
                terms.append(-u + (u.exp() + N).log())
            elif name == "supcon":  # P: own other views, or every other view of the same label
                positives = [(j, g) for j, g in everyone_else if j == i or (labels is not None and labels[j] == labels[i])]
                log_candidates = sum(s[i, a, j, g].exp() for j, g in everyone_else).log()
                terms.append(sum(-s[i, a, j, g] + log_candidates for j, g in positives) / len(positives))
            elif name == "dcl":
                for b in others:
                    terms.append(-s[i, a, i, b] + N.log())
    return sum(terms) / len(terms)


def names_for(M):
    return list(LOSSES) if M == 2 else MULTI_VIEW


# ----------------------------------------------------------------------------------------------
# The objectives
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [2, 3, 16])
@pytest.mark.parametrize("M", [2, 3, 4, 8])
@pytest.mark.parametrize("D", [1, 16])
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
def test_objectives_match_naive_loops_in_value_and_gradient(K, M, D, temperature):
    torch.manual_seed(K * 1000 + M * 100 + D)
    z = torch.randn(K, M, D, dtype=torch.float64, requires_grad=True)
    for name in names_for(M):
        fast = LOSSES[name](z, temperature)
        slow = naive_loss(name, z, temperature)
        (grad_fast,) = torch.autograd.grad(fast, z)
        (grad_slow,) = torch.autograd.grad(slow, z)
        assert fast.dtype == torch.float64 and fast.dim() == 0
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=0, msg=f"{name} value")
        if name == "suffstats" and D == 1 and M % 2 == 1:
            continue  # an even number of +-1 other views can cancel: t = 0, not differentiable there
        torch.testing.assert_close(grad_fast, grad_slow, rtol=1e-7, atol=1e-12, msg=f"{name} gradient")


def test_every_objective_but_dcl_is_simclr_at_two_views():
    torch.manual_seed(1)
    z = torch.randn(24, 2, 8, dtype=torch.float64)
    simclr = LOSSES["simclr"](z, 0.1)
    for name in MULTI_VIEW:
        if name != "dcl":  # dcl leaves the positive out of the denominator: it is two-view DCL
            torch.testing.assert_close(LOSSES[name](z, 0.1), simclr, rtol=1e-12, atol=0, msg=name)
    assert LOSSES["dcl"](z, 0.1) < simclr


@pytest.mark.parametrize("M", [2, 3, 4, 8])
def test_arithmetic_is_at_most_geometric(M):
    torch.manual_seed(M)
    for _ in range(5):
        z = torch.randn(16, M, 8, dtype=torch.float64)
        arithmetic, geometric = LOSSES["arithmetic"](z, 0.2), LOSSES["geometric"](z, 0.2)
        if M == 2:
            torch.testing.assert_close(arithmetic, geometric, rtol=1e-12, atol=0)
        else:
            assert arithmetic < geometric  # AM >= GM, strictly unless all p[i,a,b] are equal


@pytest.mark.parametrize("name", list(LOSSES))
def test_objectives_are_invariant_to_permuting_samples_and_views(name):
    torch.manual_seed(2)
    K, M = 12, 2 if name == "simclr" else 5
    z = torch.randn(K, M, 8, dtype=torch.float64)
    expected = LOSSES[name](z, 0.3)
    shuffled = z[torch.randperm(K)][:, torch.randperm(M)]  # one view order for every sample
    torch.testing.assert_close(LOSSES[name](shuffled, 0.3), expected, rtol=1e-12, atol=0)
    # Each sample its own view order: the poly-view negatives N[i,a] are all views of the others,
    # so only Multi-Crop (which pairs view a of i with view a of j) can tell the difference.
    shuffled = torch.stack([sample[torch.randperm(M)] for sample in z])
    if name != "multicrop":
        torch.testing.assert_close(LOSSES[name](shuffled, 0.3), expected, rtol=1e-12, atol=0)


# Reference values, from the naive float64 loops above with this recipe: torch.manual_seed(0)
# once, then for M in 2, 3, 4, 8, in that order, z = torch.randn(32, M, 16, dtype=torch.float64);
# tau = 0.2. (simclr, M = 2 only, equals the M = 2 row of the others but dcl.)
REFERENCE = {
    #   multicrop  geometric  arithmetic suffstats  supcon     dcl
    2: (4.940932, 4.940932, 4.940932, 4.940932, 4.940932, 4.922723),
    3: (4.974418, 5.380408, 5.181351, 5.474574, 5.388963, 5.371767),
    4: (4.900752, 5.596496, 5.207637, 5.651035, 5.611851, 5.588719),
    8: (4.860415, 6.245408, 5.672926, 6.175159, 6.268834, 6.241449),
}


def test_reference_values():
    torch.manual_seed(0)
    for M, values in REFERENCE.items():
        z = torch.randn(32, M, 16, dtype=torch.float64)
        expected = dict(zip(MULTI_VIEW, values, strict=True)) | ({"simclr": values[0]} if M == 2 else {})
        for name, value in expected.items():
            assert LOSSES[name](z, 0.2).item() == pytest.approx(value, abs=1e-6), (M, name)


@pytest.mark.parametrize("name", list(LOSSES))
def test_objectives_compute_in_float32_under_bf16_autocast(name):
    """Under autocast a matmul would run in bf16: its logits put percent-level errors into the gradient."""
    torch.manual_seed(5)
    z = torch.randn(64, 2 if name == "simclr" else 8, 128, requires_grad=True)
    (exact,) = torch.autograd.grad(LOSSES[name](z, 0.1), z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = LOSSES[name](z, 0.1)
    (autocast,) = torch.autograd.grad(loss, z)
    assert loss.dtype == torch.float32
    assert ((autocast - exact).norm() / exact.norm()).item() < 1e-5


@pytest.mark.parametrize("K, M", [(6, 2), (8, 3), (12, 4)])
def test_supervised_supcon_matches_loops_and_reduces_to_the_unsupervised_form(K, M):
    torch.manual_seed(K + M)
    z = torch.randn(K, M, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 3, (K,))
    for anchors in (None, slice(0, K // 2), slice(K // 2, K)):
        fast = LOSSES["supcon"](z, 0.3, anchors=anchors, labels=labels)
        slow = naive_loss("supcon", z, 0.3, anchors=anchors, labels=labels)
        torch.testing.assert_close(fast, slow, rtol=1e-9, atol=0)
        torch.testing.assert_close(torch.autograd.grad(fast, z)[0], torch.autograd.grad(slow, z)[0], rtol=1e-7, atol=1e-12)
    distinct = torch.arange(K)  # one label per sample: the positives are the sample's own views
    torch.testing.assert_close(LOSSES["supcon"](z, 0.3, labels=distinct), LOSSES["supcon"](z, 0.3), rtol=1e-12, atol=0)
    order = torch.randperm(K)  # permuting samples together with their labels changes nothing
    torch.testing.assert_close(LOSSES["supcon"](z[order], 0.3, labels=labels[order]),
                               LOSSES["supcon"](z, 0.3, labels=labels), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        LOSSES["supcon"](z, 0.3, labels=labels[:-1])


@pytest.mark.parametrize("name", list(LOSSES))
def test_mean_over_equal_anchor_shards_is_the_full_loss(name):
    torch.manual_seed(3)
    K, M, shards = 12, 2 if name == "simclr" else 4, 3
    z = torch.randn(K, M, 8, dtype=torch.float64, requires_grad=True)
    size = K // shards
    parts = [LOSSES[name](z, 0.5, anchors=slice(r * size, (r + 1) * size)) for r in range(shards)]
    for r, part in enumerate(parts):  # each shard also matches the loops restricted to its anchors
        torch.testing.assert_close(part, naive_loss(name, z, 0.5, slice(r * size, (r + 1) * size)), rtol=1e-9, atol=0)
    sharded, full = sum(parts) / shards, LOSSES[name](z, 0.5)
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.autograd.grad(sharded, z)[0], torch.autograd.grad(full, z)[0], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LOSSES))
def test_finite_under_low_precision_autocast_with_near_duplicates(name, dtype):
    torch.manual_seed(4)
    K, M, D = 64, 2 if name == "simclr" else 8, 128
    # Every view of every sample is a near-duplicate of one point: all logits sit near 1/tau = 20,
    # where a naive exp overflows float16 (exp(20) > 65504) and the loss is far from zero.
    z = (torch.randn(1, 1, D) + 1e-2 * torch.randn(K, M, D)).requires_grad_()
    projector = torch.nn.Linear(D, D)
    with torch.autocast("cpu", dtype=dtype):
        embeddings = projector(z)  # low-precision activations, as they leave a network under autocast
        assert embeddings.dtype == dtype
        loss = LOSSES[name](embeddings, 0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_objectives_never_wait_for_the_device():
    """Fake tensors carry shapes but no data: anything that makes the host wait for the GPU
    (.item(), boolean-mask indexing, nonzero) raises instead of running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        for name, fn in LOSSES.items():
            z = torch.randn(8, 2 if name == "simclr" else 4, 16, requires_grad=True)
            fn(z, 0.1, anchors=slice(2, 6)).backward()
            assert z.grad.shape == z.shape


@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_arguments_raise_value_errors_that_name_the_rule(name):
    M = 2 if name == "simclr" else 3
    loss = LOSSES[name]
    with pytest.raises(ValueError, match="K >= 2"):
        loss(torch.randn(1, M, 4), 0.1)
    with pytest.raises(ValueError, match="M = 2" if name == "simclr" else "M >= 2"):
        loss(torch.randn(4, 1, 4), 0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        loss(torch.randn(4, M, 4), 0.0)
    with pytest.raises(ValueError, match="rank 3"):
        loss(torch.randn(4 * M, 4), 0.1)
    for bad in (slice(2, 2), slice(3, 9), slice(-2, 4), slice(None, 2), slice(0, 4, 2)):
        with pytest.raises(ValueError, match="anchors must be"):
            loss(torch.randn(4, M, 4), 0.1, anchors=bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        loss(torch.randn(4, M, 4), float("nan"))
    if name == "simclr":
        with pytest.raises(ValueError, match="M = 2"):
            loss(torch.randn(4, 3, 4), 0.1)


# ----------------------------------------------------------------------------------------------
# Views, optimiser and schedule
# ----------------------------------------------------------------------------------------------


def draw_shapes(root, per_class):
    """A tiny ImageFolder: train/ and val/ of coloured circles, squares and triangles, 40x40."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for split, count in (("train", per_class), ("val", 2)):
        for shape in ("circle", "square", "triangle"):
            folder = root / split / shape
            folder.mkdir(parents=True)
            for n in range(count):
                image = Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3)))
                x, y, r = rng.randint(12, 28), rng.randint(12, 28), rng.randint(6, 11)
                colour = tuple(rng.randrange(256) for _ in range(3))
                draw = ImageDraw.Draw(image)
                if shape == "circle":
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
                elif shape == "square":
                    draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
                else:
                    draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
                image.save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    return draw_shapes(tmp_path_factory.mktemp("shapes"), per_class=4)  # 12 train images, 6 val


def test_views_of_one_image_are_distinct_crops_and_seeded(shapes):
    import torchvision

    folder = torchvision.datasets.ImageFolder(shapes / "train", TV.ToImage())
    dataset = polyview.MultiView(folder, polyview.random_crop_and_flip(32), num_views=6)
    torch.manual_seed(0)
    views, label = dataset[5]
    assert views.shape == (6, 3, 32, 32) and views.dtype == torch.uint8 and label == folder[5][1]
    for a in range(6):
        for b in range(a):
            assert not torch.equal(views[a], views[b])
    torch.manual_seed(0)
    assert torch.equal(dataset[5][0], views)
    torch.manual_seed(1)
    assert not torch.equal(dataset[5][0], views)
    augmented = polyview.device_augment(views[None], small_images=True)  # [1, 6, 3, 32, 32]
    assert augmented.dtype == torch.float32 and augmented.shape == (1, 6, 3, 32, 32)
    assert 0 <= augmented.min() and augmented.max() <= 1


def break_images(root, count):
    """Replace the first `count` train images by a truncated JPEG, a corrupt PNG and an empty file,
    in turn (PIL raises OSError, SyntaxError or UnidentifiedImageError on them); their names."""
    from PIL import Image

    broken = []
    for n, file in enumerate(sorted((root / "train").rglob("*.png"))[:count]):
        broken.append(file.with_suffix((".jpg", ".corrupt.png", ".empty.png")[n % 3]))
        if n % 3 == 0:
            Image.open(file).save(broken[-1], quality=90)
            broken[-1].write_bytes(broken[-1].read_bytes()[:200])
        else:
            broken[-1].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30 if n % 3 == 1 else b"")
        file.unlink()
    return broken


def test_undecodable_images_are_skipped_with_a_warning_naming_each(tmp_path):
    import torchvision

    names = {file.name for file in break_images(draw_shapes(tmp_path, per_class=2), count=3)}  # 3 of 6
    folder = torchvision.datasets.ImageFolder(tmp_path / "train", TV.ToImage())
    broken = [i for i, (path, _) in enumerate(folder.samples) if Path(path).name in names]
    assert len(broken) == 3
    dataset = polyview.SkipUndecodable(polyview.MultiView(folder, polyview.centre_crop(32, small_images=True), 1))
    for i in broken:
        before = dataset.counts[0].clone()  # [skipped, read] in this (the main) process
        with pytest.warns(UserWarning) as caught:  # all of them: the next file may be broken too
            views, label = dataset[i]
        assert Path(folder.samples[i][0]).name in str(caught[0].message)
        skipped, read = (dataset.counts[0] - before).tolist()
        assert views.shape == (1, 3, 32, 32) and skipped >= 1 and read == skipped + 1
        assert label == folder.samples[(i + skipped) % len(folder)][1]  # the next decodable image stands in


class Raises(torch.utils.data.Dataset):
    """Item i raises errors[i], or returns a grey image when errors[i] is None."""

    def __init__(self, errors):
        self.errors = errors

    def __len__(self):
        return len(self.errors)

    def __getitem__(self, i):
        if self.errors[i] is not None:
            raise self.errors[i]
        return torch.full((3, 8, 8), 128, dtype=torch.uint8), i


def test_any_decoding_error_is_skipped_not_only_oserror():
    from PIL import Image

    errors = [SyntaxError("broken PNG file"), ValueError("bad mode"), Image.DecompressionBombError("too big"), None]
    dataset = polyview.SkipUndecodable(polyview.MultiView(Raises(errors), TV.Identity(), num_views=2))
    with pytest.warns(UserWarning) as caught:
        views, label = dataset[0]
    assert (label, views.shape, dataset.counts[0].tolist()) == (3, (2, 3, 8, 8), [3, 4])  # skipped, read
    assert [str(w.message) for w in caught] == [f"skipping undecodable image #{i}: {type(e).__name__}: {e}"
                                                for i, e in enumerate(errors[:3])]
    with pytest.warns(UserWarning), pytest.raises(polyview.UserError, match="none of the 3 images"):
        polyview.SkipUndecodable(polyview.MultiView(Raises(errors[:3]), TV.Identity(), num_views=2))[1]


def stream_views(dataset, seed, rank, epoch):
    torch.manual_seed(polyview.stream_seed("views", seed, rank, epoch))
    return dataset[0][0]


def test_seeds_rank_and_epoch_give_independent_streams(shapes):
    import torchvision

    folder = torchvision.datasets.ImageFolder(shapes / "train", TV.ToImage())
    dataset = polyview.MultiView(folder, polyview.random_crop_and_flip(32), num_views=4)
    # A sum such as seed + rank + epoch would make each of these pairs draw the same views.
    assert not torch.equal(stream_views(dataset, 1, 0, 0), stream_views(dataset, 0, 0, 1))
    assert not torch.equal(stream_views(dataset, 1, 0, 0), stream_views(dataset, 0, 1, 0))
    assert torch.equal(stream_views(dataset, 3, 1, 2), stream_views(dataset, 3, 1, 2))  # and each is reproducible
    seeds = {polyview.stream_seed(stream, seed, rank, epoch)
             for stream in polyview.STREAMS for seed in range(8) for rank in range(8) for epoch in range(8)}
    assert len(seeds) == len(polyview.STREAMS) * 8**3  # no two (stream, seed, rank, epoch) share a seed

    def order(seed, epoch):  # the data order of an epoch, as the training loop sets it
        sampler = torch.utils.data.DistributedSampler(range(100), num_replicas=1, rank=0)
        sampler.seed = polyview.stream_seed("order", seed, 0, epoch)
        return list(sampler)

    assert order(1, 0) != order(0, 1) and order(2, 3) == order(2, 3)


# The colour augmentations on the device: exact against torchvision for fixed parameters, and the
# same distribution as torchvision's random transforms.

FACTORS = torch.tensor([1.0, 0.2, 1.8, 0.0, 0.6, 1.4])  # identity, SimCLR's extremes at s = 1 and 0.5
HUE_SHIFTS = torch.tensor([0.0, -0.2, 0.2, -0.1, 0.5, -0.5])


@pytest.fixture
def images():
    """[6, 3, 24, 24] in [0, 1]; the last two take 4 levels only, so they hold grey pixels, black
    pixels and ties between channels (the edge cases of RGB -> HSV)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 24, 24, generator=generator)
    x[4:] = torch.randint(0, 4, (2, 3, 24, 24), generator=generator) / 3
    return x


def per_image(fn, images, params):
    """torchvision's op applied image by image, each with its view's parameter as a float."""
    return torch.stack([fn(image, float(p)) for image, p in zip(images, params)])


@pytest.mark.parametrize("op, theirs", [(0, "adjust_brightness"), (1, "adjust_contrast"), (2, "adjust_saturation")])
def test_colour_blends_match_torchvision(images, op, theirs):
    expected = per_image(getattr(TF, theirs), images, FACTORS)
    mine = polyview.adjust_colour(images, torch.full((6,), op), FACTORS)
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-6)


def test_hue_and_grayscale_match_torchvision(images):
    # The HSV round trip is written differently from torchvision's: 1e-7 in h, up to 6 v s times that in RGB.
    torch.testing.assert_close(polyview.adjust_hue(images, HUE_SHIFTS), per_image(TF.adjust_hue, images, HUE_SHIFTS),
                               rtol=0, atol=2e-6)
    grey = polyview.random_grayscale(images, p=1.0)
    torch.testing.assert_close(grey, TF.rgb_to_grayscale(images, num_output_channels=3), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size, size", [(23, 32), (5, 24)])
def test_gaussian_blur_matches_torchvision(kernel_size, size):
    x = torch.rand(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.0, 1.5, 2.0])
    expected = torch.stack([TF.gaussian_blur(image, [kernel_size] * 2, [float(s)] * 2) for image, s in zip(x, sigma)])
    torch.testing.assert_close(polyview.gaussian_blur(x, kernel_size, sigma), expected, rtol=0, atol=1e-5)


def test_colour_jitter_replays_torchvision_view_by_view(images):
    """Replay colour_jitter's random draws (same seed, same order) and hand each view's factors and
    order of ops to torchvision's own ColorJitter: the results must agree."""
    n = len(images)
    torch.manual_seed(3)
    mine = polyview.colour_jitter(images, strength=1.0, p=0.8)
    torch.manual_seed(3)
    factors = 0.2 + 1.6 * torch.rand(n, 3)
    shift = 0.2 * (2 * torch.rand(n) - 1)
    order = torch.rand(n, 4).argsort(dim=1)
    chosen = torch.rand(n) < 0.8
    assert 0 < chosen.sum() < n  # this seed exercises both branches
    jitter = TV.ColorJitter(0.8, 0.8, 0.8, 0.2)
    expected = torch.stack([
        jitter.transform(images[v], dict(fn_idx=order[v], brightness_factor=float(factors[v, 0]),
                                         contrast_factor=float(factors[v, 1]), saturation_factor=float(factors[v, 2]),
                                         hue_factor=float(shift[v]))) if chosen[v] else images[v]
        for v in range(n)])
    torch.testing.assert_close(mine, expected, rtol=0, atol=1e-5)


def gradients(count, size, texture=0.0):
    """count copies of 4 smooth colour gradients [count, 3, size, size], plus `texture` times fixed
    noise so that a blur has something to remove."""
    generator = torch.Generator().manual_seed(2)
    base = F.interpolate(torch.rand(4, 3, 2, 2, generator=generator), size=(size, size), mode="bilinear",
                         align_corners=True)
    base = (1 - texture) * base + texture * torch.rand(4, 3, size, size, generator=generator)
    return base.repeat(count // 4, 1, 1, 1)


def same_distribution(a, b, standard_errors=4.0):
    """Whether each statistic's mean and standard deviation agree within a few standard errors:
    sd / sqrt(n) for a mean, sd sqrt((kurtosis - 1) / 4n) for a standard deviation. With 2000
    samples chance disagreement is ~1e-4 per comparison; a wrong range or probability is far out."""
    def moments(x):
        n, mean, sd = x.numel(), x.mean(), x.std()
        kurtosis = ((x - mean) ** 4).mean() / sd**4
        return torch.stack([mean, sd]), torch.stack([sd / math.sqrt(n), sd * torch.sqrt((kurtosis - 1) / (4 * n))])

    for name in a:
        (value_a, error_a), (value_b, error_b) = moments(a[name]), moments(b[name])
        if ((value_a - value_b).abs() > standard_errors * torch.hypot(error_a, error_b)).any():
            return False
    return True


def colour_statistics(x):
    chroma = x.amax(dim=1) - x.amin(dim=1)                              # [N, H, W]
    return {"brightness": x.mean(dim=(1, 2, 3)), "saturation": chroma.mean(dim=(1, 2)),
            "red - blue": (x[:, 0] - x[:, 2]).mean(dim=(1, 2)),          # moved by the hue
            "grayscale": (chroma.amax(dim=(1, 2)) < 1e-6).float()}


def test_colour_jitter_and_grayscale_have_torchvisions_distribution():
    x = gradients(2000, 16)
    torch.manual_seed(3)
    reference = TV.Compose([TV.RandomApply([TV.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8), TV.RandomGrayscale(p=0.2)])
    expected = colour_statistics(torch.stack([reference(image) for image in x]))

    def mine(strength=1.0, p_jitter=0.8, p_grey=0.2):
        return colour_statistics(polyview.random_grayscale(polyview.colour_jitter(x, strength, p_jitter), p_grey))

    assert same_distribution(expected, mine())
    # the comparison has the power to see a wrong range or a wrong probability
    assert not same_distribution(expected, mine(strength=0.5))
    assert not same_distribution(expected, mine(p_jitter=0.6))
    assert not same_distribution(expected, mine(p_grey=0.3))


def test_random_blur_has_torchvisions_distribution():
    x = gradients(2000, 32, texture=0.5)
    torch.manual_seed(4)
    reference = TV.RandomApply([TV.GaussianBlur(9, (0.1, 2.0))], p=0.5)

    def sharpness(images):  # mean |difference| of horizontal neighbours, which a blur lowers
        return {"sharpness": (images[..., 1:] - images[..., :-1]).abs().mean(dim=(1, 2, 3))}

    expected = sharpness(torch.stack([reference(image) for image in x]))
    assert same_distribution(expected, sharpness(polyview.random_blur(x, 9)))
    assert not same_distribution(expected, sharpness(polyview.random_blur(x, 9, p=0.35)))
    assert not same_distribution(expected, sharpness(polyview.random_blur(x, 9, p=0.65)))


def test_each_view_draws_its_own_colour_and_p_zero_changes_nothing(images):
    x = gradients(64, 16)  # 16 copies of each of 4 images
    jittered = polyview.colour_jitter(x, 1.0, p=1.0)
    assert (jittered[4:] != jittered[:4].repeat(15, 1, 1, 1)).flatten(1).any(1).all()
    assert torch.equal(polyview.colour_jitter(images, 1.0, p=0.0), images)
    assert torch.equal(polyview.random_grayscale(images, p=0.0), images)
    assert torch.equal(polyview.random_blur(images, 5, p=0.0), images)


@pytest.mark.parametrize("small_images", [True, False])
def test_device_augment_is_simclrs_order_in_float32_under_autocast(small_images):
    views = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bfloat16 blur would be ~1e-2 off
        mine = polyview.device_augment(views, small_images)
    torch.manual_seed(8)
    x = views.flatten(0, 1).float() / 255
    x = polyview.random_grayscale(polyview.colour_jitter(x, 0.5 if small_images else 1.0, p=0.8), p=0.2)
    if not small_images:
        x = polyview.random_blur(x, 3, p=0.5)  # 10% of 32, odd
    assert mine.dtype == torch.float32 and mine.shape == views.shape
    torch.testing.assert_close(mine, x.view(views.shape), rtol=0, atol=1e-6)


def test_device_augment_never_waits_for_the_device():
    """Fake tensors carry shapes but no data: anything that makes the host wait for the device
    (.item(), bool(tensor), nonzero, boolean-mask indexing) raises instead of running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        views = torch.randint(0, 256, (2, 4, 3, 32, 32), dtype=torch.uint8)
        for small_images in (True, False):
            assert polyview.device_augment(views, small_images).shape == views.shape


def test_learning_rate_warms_up_to_the_peak_then_decays_to_zero():
    warmup, total = 100, 1000
    rates = [polyview.learning_rate(t, total, warmup, 0.6) for t in range(total)]
    assert rates[0] == pytest.approx(0.6 / warmup)
    assert rates[warmup - 1] == pytest.approx(0.6) and rates[warmup] == pytest.approx(0.6)
    assert all(a < b for a, b in zip(rates[:warmup], rates[1:warmup]))
    assert all(a > b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert rates[-1] < 1e-5


def test_the_fast_probe_converges_on_a_small_set():
    """256 features of 8 Gaussian classes: a k-NN finds 92% of the labels. The fast probe used to take
    --probe-epochs x ceil(N / 1024) steps, here 30: far too few for a classifier that starts from
    scratch (measured: 6%, under chance). Its floor of 1,000 steps finds what the features hold."""
    generator = torch.Generator().manual_seed(0)
    means = 0.5 * torch.randn(8, 64, generator=generator)

    def draw(n):
        labels = torch.arange(n) % 8
        return means[labels] + torch.randn(n, 64, generator=generator), labels
    (train_x, train_y), (val_x, val_y) = draw(256), draw(256)
    knn_top1 = (polyview.knn(train_x, train_y, val_x)[0] == val_y).float().mean().item() * 100
    results = []
    for floor in ({"min_steps": 0}, {}):  # no floor: the probe as it was; the default floor of 1,000 steps
        torch.manual_seed(0)
        results.append(polyview.linear_probe(train_x.clone(), train_y, val_x.clone(), val_y, 30, torch.device("cpu"),
                                             **floor))
    before, now = results
    assert knn_top1 > 85
    assert before["top1"] < 50  # under-fit
    assert now["top1"] > knn_top1 - 5  # converged: as good as the k-NN, give or take


def test_knn_votes_with_the_nearest_by_cosine_weighted_by_similarity():
    torch.manual_seed(0)
    train_x, train_y, val_x = torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 4, (50,)), torch.randn(9, 6)
    predictions, neighbours = polyview.knn(train_x, train_y, val_x.double(), k=5)
    for i, query in enumerate(val_x.double()):
        cosine = [float(torch.dot(query, x) / (query.norm() * x.norm())) for x in train_x]
        nearest = sorted(range(50), key=lambda j: -cosine[j])[:5]
        assert neighbours[i].tolist() == nearest
        votes = [sum(math.exp(cosine[j] / 0.07) for j in nearest if train_y[j] == c) for c in range(4)]
        assert predictions[i] == max(range(4), key=lambda c: votes[c])


def test_lars_adapts_and_decays_weights_but_not_biases():
    weight = torch.nn.Parameter(torch.randn(8, 4))
    bias = torch.nn.Parameter(torch.randn(8))
    start_weight, start_bias = weight.detach().clone(), bias.detach().clone()
    optimizer = polyview.LARS([weight, bias], lr=0.5, weight_decay=1e-2, trust_coefficient=1e-3)
    weight.grad, bias.grad = torch.zeros(8, 4), torch.zeros(8)
    optimizer.step()
    # weights: g = wd * w, scaled to trust * ||w||: the step is lr * trust * w, whatever wd is
    torch.testing.assert_close(weight.detach(), start_weight * (1 - 0.5 * 1e-3))
    assert torch.equal(bias.detach(), start_bias)  # no decay on biases (and BN parameters)
    bias.grad = torch.ones(8)
    weight.grad = 1e6 * torch.randn(8, 4)
    before = weight.detach().clone()
    optimizer.step()
    # biases: plain SGD with momentum, no adaptation; weights: a step of lr * trust * ||w|| in norm
    torch.testing.assert_close(bias.detach(), start_bias - 0.5 * 1.0)
    velocity = optimizer.state[weight]["velocity"]
    adapted = velocity - 0.9 * (0.5 * 1e-3 * start_weight)  # this step's part of the velocity
    assert adapted.norm().item() == pytest.approx(0.5 * 1e-3 * before.norm().item(), rel=1e-5)


def test_lars_puts_the_learning_rate_inside_the_momentum_as_simclr_does():
    """A few steps with a changing rate (warm-up, then decay) against SimCLR's rule written as a loop over the
    parameters: v <- m v + lr * trust * g, w <- w - v. The rule with the rate outside the momentum (v <- m v +
    trust * g, w <- w - lr v) moves the weights elsewhere whenever the rate changes."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5).double())]
    optimizer = polyview.LARS(params, lr=0.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.02)
    inside = [p.detach().clone() for p in params]
    outside = [p.detach().clone() for p in params]
    v_inside, v_outside = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    for lr in (0.1, 0.4, 1.0, 0.6, 0.2):
        grads = [torch.randn_like(p) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad
        optimizer.param_groups[0]["lr"] = lr
        optimizer.step()
        for n, grad in enumerate(grads):
            for w, v, rate_inside in ((inside, v_inside, True), (outside, v_outside, False)):
                g, trust = grad, 1.0
                if n == 0:  # the weight matrix: decay and trust ratio; the bias: neither
                    g = grad + 0.1 * w[n]
                    trust = 0.02 * w[n].norm() / g.norm()
                v[n] = 0.9 * v[n] + (lr * trust * g if rate_inside else trust * g)
                w[n] = w[n] - (v[n] if rate_inside else lr * v[n])
    for p, expected, other in zip(params, inside, outside):
        torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-14)
        assert (p.detach() - other).abs().max() > 1e-4  # the two rules part


# ----------------------------------------------------------------------------------------------
# The training step: float32 objectives under autocast, the online probe's stop-gradient
# ----------------------------------------------------------------------------------------------


def step(model, optimizer, scaler, crops, labels, args, device):
    """What the training loop does with a batch of uint8 crops: the colour on the device, then train_step."""
    views = polyview.device_augment(crops.to(device), args.small_images)
    return polyview.train_step(model, optimizer, scaler, views, labels.to(device), args)


def spy_objective(seen, suffstats=polyview.suffstats_loss):
    def objective(z, temperature, anchors=None):
        seen.append(z.dtype)
        return suffstats(z, temperature, anchors)
    return objective


def test_the_objective_gets_float32_embeddings_under_bf16_autocast():
    """BatchNorm keeps its input's bf16 under autocast: z would be gathered, and its gradient summed
    over ranks, in bf16, unless step_loss casts it."""
    model, seen = polyview.PolyViewNet("resnet18", small_images=True, classes=3), []
    views = torch.rand(4, 3, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(views)[0].dtype == torch.bfloat16
        loss, stats = polyview.step_loss(model, views, torch.tensor([0, 1, 2, 0]), spy_objective(seen), 0.1)
    assert seen == [torch.float32] and loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in stats.values())


def test_the_online_probe_leaves_every_other_gradient_as_it_was():
    model = polyview.PolyViewNet("resnet18", small_images=True, classes=3)
    views, labels = torch.rand(4, 3, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    gradients = []
    for with_probe in (True, False):
        model.zero_grad(set_to_none=True)
        if with_probe:  # the objective and the online probe's cross-entropy, as in training
            polyview.step_loss(model, views, labels, LOSSES["geometric"], 0.1)[0].backward()
        else:           # the objective alone
            LOSSES["geometric"](model(views)[0], 0.1).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    with_probe, without = gradients
    assert set(with_probe) - set(without) == {"online_probe.1.weight", "online_probe.1.bias"}
    for name, gradient in without.items():  # backbone and projector: bit for bit
        assert torch.equal(with_probe[name], gradient), name
    assert with_probe["online_probe.1.weight"].abs().sum() > 0


def test_a_training_step_under_cpu_bf16_autocast_takes_the_cuda_path(shapes, monkeypatch):
    """The CPU trains in float32; with --precision bf16 a step runs the code that CUDA's autocast runs:
    a finite loss, an objective in float32, numbers in [0, 100]."""
    args = polyview.parse_args(["--arch", "resnet18", "--image-size", "32", "--views", "3", "--device", "cpu",
                                "--precision", "bf16"])
    seen = []
    monkeypatch.setitem(polyview.LOSSES, args.loss, spy_objective(seen))
    model, _, optimizer, scaler = polyview.build_model(args, 3, torch.device("cpu"), lr=0.1)
    assert not scaler.is_enabled()  # bf16 has float32's range: no loss scaling
    views = torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8)
    stats = step(model, optimizer, scaler, views, torch.tensor([0, 1, 2, 0]), args, torch.device("cpu"))
    assert seen == [torch.float32] and all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())
    assert 0 <= stats["contrastive_top1"] <= 100 and 0 <= stats["online_probe_top1"] <= 100


def test_a_training_step_never_waits_for_the_device():
    """Fake tensors carry shapes but no data: a step that read a number (.item(), bool(tensor),
    boolean-mask indexing) to log it would raise here instead of running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = polyview.parse_args(["--arch", "resnet18", "--image-size", "32", "--views", "3", "--device", "cpu"])
    device = polyview.start_processes(args)
    model, _, optimizer, scaler = polyview.build_model(args, 3, device, lr=0.1)
    with FakeTensorMode(allow_non_fake_inputs=True):
        views = torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8)
        stats = step(model, optimizer, scaler, views, torch.tensor([0, 1, 2, 0]), args, device)
        assert list(stats) == ["loss", "contrastive_top1", "online_probe_top1", "alignment", "uniformity"]
        assert all(value.shape == () for value in stats.values())


# ----------------------------------------------------------------------------------------------
# Precision: bf16 where the GPU has it, fp16 with a loss scaler below, float32 on the CPU. torch's CPU
# autocast takes float16 and GradScaler("cpu") exists, so the fp16 path runs here (slowly: 8x8 images).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("requested, device, capability, expected", [
    ("auto", "cpu", None, "fp32"),
    ("auto", "cuda", (7, 5), "fp16"),   # T4: bf16 would be emulated, though is_bf16_supported() says True
    ("auto", "cuda", (7, 0), "fp16"),   # V100
    ("auto", "cuda", (8, 0), "bf16"),   # A100
    ("auto", "cuda", (9, 0), "bf16"),   # H100
    ("fp16", "cuda", (9, 0), "fp16"), ("bf16", "cuda", (7, 5), "bf16"), ("fp32", "cuda", (8, 6), "fp32"),
    ("fp16", "cpu", None, "fp16"),
])
def test_auto_precision_is_bf16_with_bf16_hardware_fp16_below_and_fp32_on_the_cpu(requested, device, capability,
                                                                                  expected, monkeypatch):
    asked = []  # which GPU's capability parse_args asks for: this process's, LOCAL_RANK
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda gpu: asked.append(gpu) or capability)
    monkeypatch.setenv("LOCAL_RANK", "1")
    args = polyview.parse_args(["--device", device, "--precision", requested])
    precision, why = args.precision, args.precision_reason
    assert precision == expected and why.startswith("auto" if requested == "auto" else "--precision")
    assert asked == ([1] if requested == "auto" and device == "cuda" else [])
    if capability and requested == "auto":
        assert f"compute capability {capability[0]}.{capability[1]}" in why


def fp16_setup(precision="fp16"):
    """A ResNet-18 on 8x8 crops, its LARS and its scaler, and one batch: fp16 convolutions' backward pass
    takes ~1.6 s each on this CPU at 32x32, ~0.1 s at 8x8."""
    args = polyview.parse_args(["--arch", "resnet18", "--image-size", "8", "--views", "3", "--device", "cpu",
                                "--precision", precision])
    model, _, optimizer, scaler = polyview.build_model(args, 3, torch.device("cpu"), lr=0.5)
    torch.manual_seed(0)
    views = torch.randint(0, 256, (6, 3, 3, 8, 8), dtype=torch.uint8)
    return args, model, optimizer, scaler, views, torch.tensor([0, 1, 2, 0, 1, 2])


def take_a_step(args, model, optimizer, scaler, views, labels):
    """One step, its views' colours drawn from one seed, taken again while the scaler skips it."""
    for _ in range(5):
        scale = scaler.get_scale() if scaler.is_enabled() else None
        torch.manual_seed(1)  # the same device augmentation every time
        stats = step(model, optimizer, scaler, views, labels, args, torch.device("cpu"))
        if not scaler.is_enabled() or scaler.get_scale() >= scale:
            return stats
    raise AssertionError("five fp16 steps in a row overflowed")


def test_an_fp16_step_with_its_scaler_moves_the_weights_as_a_float32_step_does():
    """Each weight's first step, fp16 against float32, as a relative error ||step16 - step32|| / ||step32||.
    The tolerance: fp16 rounds to 11 significant bits, bf16 to 8, so rounding alone moves a layer's step
    by a few percent in fp16 and several times more in bf16. Measured here (torch 2.14, this test's seed):
    fp16's worst layer 4.1%, bf16's 14.6%; the bound, 8%, is twice fp16's and half bf16's. What it
    catches: a skipped step (100%), and gradients that reach LARS still scaled: the online probe's head,
    which has no trust ratio, then steps 65536x too far (measured: an error of 65,528 times its step)."""
    moved = {}
    for precision in ("fp32", "fp16", "bf16"):
        args, model, optimizer, scaler, views, labels = fp16_setup(precision)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        stats = take_a_step(args, model, optimizer, scaler, views, labels)
        assert all(torch.isfinite(v) for v in stats.values()) and scaler.is_enabled() == (precision == "fp16")
        moved[precision] = {n: p.detach() - before[n] for n, p in model.named_parameters() if p.ndim > 1}
    errors = {precision: {n: ((moved[precision][n] - step).norm() / step.norm()).item()
                          for n, step in moved["fp32"].items()} for precision in ("fp16", "bf16")}
    worst = max(errors["fp16"].values())
    assert worst < 0.08, sorted(errors["fp16"].items(), key=lambda item: -item[1])[:3]
    # fp16's three more bits of mantissa than bf16 should show: its worst error is the smaller one.
    assert worst < max(errors["bf16"].values())


def test_an_fp16_step_whose_gradients_overflow_is_skipped_and_the_scale_halved(monkeypatch):
    args, model, optimizer, scaler, views, labels = fp16_setup()
    take_a_step(args, model, optimizer, scaler, views, labels)  # a good step: LARS has momentum now
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    velocity = {n: optimizer.state[p]["velocity"].clone() for n, p in model.named_parameters() if p in optimizer.state}
    scale = scaler.get_scale()
    suffstats = polyview.suffstats_loss
    # 1e30 is finite in float32 (the loss and the logs), but its gradient is not in fp16 (max 65504).
    monkeypatch.setitem(polyview.LOSSES, args.loss, lambda z, tau, anchors=None: 1e30 * suffstats(z, tau))
    torch.manual_seed(1)
    stats = step(model, optimizer, scaler, views, labels, args, torch.device("cpu"))
    assert all(torch.isfinite(v) for v in stats.values())  # a normal step for the log: the run goes on
    assert scaler.get_scale() == scale / 2
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        if n in velocity:
            assert torch.equal(optimizer.state[p]["velocity"], velocity[n]), n


# ----------------------------------------------------------------------------------------------
# What the features learned: alignment, uniformity and effective rank, against their definitions
# ----------------------------------------------------------------------------------------------


def naive_alignment(z):
    """Mean over samples i and view pairs a != b of ||z_ia - z_ib||^2, z L2-normalised: a loop."""
    z, total, pairs = F.normalize(z.double(), dim=-1), 0.0, 0
    for i in range(z.shape[0]):
        for a in range(z.shape[1]):
            for b in range(z.shape[1]):
                if a != b:
                    total, pairs = total + float(((z[i, a] - z[i, b]) ** 2).sum()), pairs + 1
    return total / pairs


def naive_uniformity(z):
    """For each view index a, log of the mean over i != j of exp(-2 ||z_ia - z_ja||^2); their mean."""
    z, per_view = F.normalize(z.double(), dim=-1), []
    for a in range(z.shape[1]):
        terms = [math.exp(-2 * float(((z[i, a] - z[j, a]) ** 2).sum()))
                 for i in range(z.shape[0]) for j in range(z.shape[0]) if i != j]
        per_view.append(math.log(sum(terms) / len(terms)))
    return sum(per_view) / len(per_view)


def naive_effective_rank(features):
    """RankMe: exp of the entropy of p_k = sigma_k / sum sigma + 1e-7 over numpy's singular values."""
    sigma = np.linalg.svd(features.double().numpy(), compute_uv=False)
    p = [s / sigma.sum() + 1e-7 for s in sigma]
    return math.exp(-sum(q * math.log(q) for q in p))


@pytest.mark.parametrize("K, M, D", [(2, 2, 3), (7, 3, 16), (12, 8, 5)])
def test_alignment_uniformity_and_effective_rank_match_their_definitions(K, M, D):
    torch.manual_seed(K * M * D)
    z = torch.randn(K, M, D, dtype=torch.float64)
    assert polyview.alignment(z).item() == pytest.approx(naive_alignment(z), rel=1e-6)
    assert polyview.uniformity(z).item() == pytest.approx(naive_uniformity(z), rel=1e-6)
    features = torch.randn(K * M, D) @ torch.randn(D, D)  # correlated: singular values differ
    assert polyview.effective_rank(features).item() == pytest.approx(naive_effective_rank(features), rel=1e-4)


def test_the_measures_known_cases():
    torch.manual_seed(0)
    z = torch.randn(64, 1, 32).expand(64, 4, 32)  # the 4 views of each image coincide
    assert polyview.alignment(z).item() == pytest.approx(0.0, abs=1e-6)
    u = torch.randn(64, 1, 32)
    assert polyview.alignment(torch.cat([u, -u], dim=1)).item() == pytest.approx(4.0)  # antipodal views
    # Points drawn uniformly on the sphere approach the bound -4 (here D = 128: -4 + 8 / D in expectation)
    # and never go below Jensen's -4 - 4 / (K - 1); all on one point is the worst, 0.
    spread = polyview.uniformity(torch.randn(2048, 2, 128)).item()
    assert -4 - 4 / 2047 <= spread < -3.85
    assert polyview.uniformity(torch.ones(16, 2, 8)).item() == pytest.approx(0.0, abs=1e-6)
    assert polyview.effective_rank(torch.randn(4096, 128)).item() > 120  # isotropic: about the width
    line = torch.randn(4096, 1) * torch.randn(1, 128)  # rank one
    assert polyview.effective_rank(line).item() == pytest.approx(1.0, abs=0.01)


def test_the_measures_stay_float32_under_autocast():
    z = torch.randn(32, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = [polyview.alignment(z), polyview.uniformity(z)]
    assert all(x.dtype == torch.float32 for x in measured)
    assert measured[0].item() == pytest.approx(naive_alignment(z), rel=1e-6)  # not bf16's 1e-2


@pytest.mark.parametrize("z, expected", [
    ([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], 100.0),  # each positive is its anchor itself
    ([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]]], 0.0),    # each anchor's twin beats its positive
    ([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 1.0], [-1.0, 0.0]]], 50.0),
])
def test_contrastive_top1_counts_positives_above_every_negative(z, expected):
    assert polyview.contrastive_top1(torch.tensor(z), 0.1).item() == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------
# The training program, end to end on a tiny drawn ImageFolder (ResNet-18, 32x32, CPU)
# ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent


def tiny_run(data, out, *flags):
    """The command line of a tiny CPU run: 12 images, K = 6, so 2 steps an epoch."""
    return [sys.executable, str(REPO / "polyview.py"), "--dataset", "folder", "--data", str(data), "--out", str(out),
            "--arch", "resnet18", "--image-size", "32", "--batch-size", "6", "--workers", "0", "--device", "cpu",
            "--log-every", "1", "--probe-epochs", "3", *flags]


def save(state, path):
    polyview.save(path, state)


def a_checkpoint(args, classes):
    """What polyview.py's checkpoint holds, with a model of one weight besides the online probe's."""
    return {"args": args, "epoch": 1, "step": 7, "optimizer": {}, "scaler": {},
            "model": {"weight": torch.arange(6.0), "online_probe.1.bias": torch.zeros(classes)}}


def checkpoint_args(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["args"]


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def wait_for_a_checkpoint(run, out):
    """Until a subprocess's run has written its first checkpoint; it must still be running."""
    while not (out / "checkpoint.pt").exists() and run.poll() is None:
        time.sleep(0.01)
    assert run.poll() is None, "the run ended before its first checkpoint"


@pytest.mark.parametrize("loss", [*LOSSES, "supcon --supervised"])
def test_each_objective_pretrains_and_probes_end_to_end(loss, shapes, tmp_path):
    views = "2" if loss == "simclr" else "3"
    done = subprocess.run(tiny_run(shapes, tmp_path, "--loss", *loss.split(), "--views", views, "--epochs", "1"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    steps, epoch_end = records(tmp_path)[:2], records(tmp_path)[2]
    assert [r["step"] for r in steps] == [1, 2] and (epoch_end["step"], epoch_end["epoch"]) == (2, 0)
    assert all(math.isfinite(r["loss"]) and r["views_per_s"] > 0 for r in steps)
    assert [r["views_seen"] for r in records(tmp_path)] == [6 * int(views), 12 * int(views), 12 * int(views)]
    assert json.loads((tmp_path / "args.json").read_text()) == checkpoint_args(tmp_path)
    assert all(0 <= r[key] <= 100 for r in steps for key in ("contrastive_top1", "online_probe_top1"))
    assert 0 <= epoch_end["online_val_top1"] <= 100
    assert all(0 <= r["alignment"] <= 4 and -4 - 4 / 5 <= r["uniformity"] <= 0 for r in steps)  # K = 6
    assert "alignment" not in epoch_end and 1 <= epoch_end["effective_rank"] <= 512
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and checkpoint["step"] == 2 and checkpoint["args"]["loss"] == loss.split()[0]
    assert checkpoint["args"]["supervised"] == loss.endswith("--supervised")
    probe = json.loads((tmp_path / "probe.json").read_text())
    assert set(probe) == {"protocol", "top1", "top5", "knn_top1", "online_val_top1_first_epoch",
                          "online_val_top1_last_epoch", "alignment", "uniformity", "effective_rank",
                          "feature_width"} and probe["protocol"].startswith("fast linear probe")
    assert (probe["alignment"], probe["uniformity"]) == (steps[-1]["alignment"], steps[-1]["uniformity"])
    assert 0 <= probe["alignment"] <= 4 and -4 - 4 / 5 <= probe["uniformity"] <= 0  # K = 6
    assert 1 <= probe["effective_rank"] <= probe["feature_width"] == 512 and 1 <= epoch_end["effective_rank"] <= 512
    assert probe["online_val_top1_first_epoch"] == probe["online_val_top1_last_epoch"] == epoch_end["online_val_top1"]
    assert 0 <= probe["top1"] <= 100 and 0 <= probe["knn_top1"] <= 100
    assert probe["top5"] is None  # 3 classes: a top-5 would be 100% whatever the features
    assert "(top1, top5, knn_top1: the fast linear probe, not SimCLR's linear evaluation)" in done.stdout
    assert "contrastive_top1 " in done.stdout and "online_val_top1_first_epoch " in done.stdout
    for picture in ("views.png", "neighbours.png", "training.png"):
        assert (tmp_path / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture
    print(f"{loss}: {steps[-1]['views_per_s']:.1f} views/s")  # the CPU throughput (pytest -s)


@pytest.fixture(scope="module")
def watched_run(shapes, tmp_path_factory):
    """A 2-epoch run in this process (M = 2, K = 6: 2 steps an epoch) with spies on the views of each training step,
    the grids that save_grid draws and the figures saved, and a fake clock that only moves 1 s for each training step
    and 1000 s for each online val pass."""
    from matplotlib.figure import Figure

    out, clock, seen = tmp_path_factory.mktemp("watched"), [0.0], {"steps": [], "grids": [], "figures": {}}
    train_step, val_pass, save_grid, savefig = (polyview.train_step, polyview.val_pass,
                                                       polyview.save_grid, Figure.savefig)

    def timed_step(model, optimizer, scaler, views, labels, args):
        seen["steps"].append(views.clone())
        clock[0] += 1.0
        return train_step(model, optimizer, scaler, views, labels, args)

    def slow_val_pass(*args):
        clock[0] += 1000.0
        return val_pass(*args)

    def drawn(rows, path, frames=None):
        seen["grids"].append((Path(path).name, [[image.clone() for image in row] for row in rows]))
        return save_grid(rows, path, frames)

    def saved(figure, path, **kwargs):
        seen["figures"][Path(path).name] = figure
        return savefig(figure, path, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(polyview, "train_step", timed_step)
        patch.setattr(polyview, "val_pass", slow_val_pass)
        patch.setattr(polyview, "save_grid", drawn)
        patch.setattr(polyview, "time", argparse.Namespace(perf_counter=lambda: clock[0]))
        patch.setattr(Figure, "savefig", saved)
        polyview.main(tiny_run(shapes, out, "--views", "2", "--epochs", "2")[2:])
    return out, seen


def test_the_logs_clock_times_the_steps_only_not_the_val_pass_or_the_checkpoint(watched_run):
    out, _ = watched_run
    lines = [r for r in records(out) if "views_per_s" in r]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # step 3: the first of epoch 2, after the 1000 s val pass
    assert [r["views_per_s"] for r in lines] == [12.0] * 4  # 6 x 2 views in each 1 s step
    assert [r["data_wait"] for r in lines] == [0.0] * 4 and [r["eta_s"] for r in lines] == [3.0, 2.0, 1.0, 0.0]


def test_views_png_shows_the_m_views_of_the_first_batch_as_the_model_gets_them(watched_run):
    out, seen = watched_run
    drawn = [rows for name, rows in seen["grids"] if name == "views.png"]
    assert len(drawn) == 1 and (out / "views.png").exists()  # once a run, at its first step
    first_batch = seen["steps"][0]  # [6, 2, 3, 32, 32]: after the colour ops, before the normalisation
    assert len(drawn[0]) == 4 and all(len(row) == 2 for row in drawn[0])  # 4 images, one per row; M = 2 views each
    for image_views, row in zip(first_batch, drawn[0]):
        assert all(torch.equal(view, drawn_view) for view, drawn_view in zip(image_views, row, strict=True))
    neighbours = [rows for name, rows in seen["grids"] if name == "neighbours.png"]
    assert len(neighbours) == 1 and [len(row) for row in neighbours[0]] == [9, 9, 9]  # 3 classes: 3 rows


def test_training_png_labels_step_under_the_bottom_row_and_percent_on_accuracies(watched_run):
    _, seen = watched_run
    axes = seen["figures"]["training.png"].axes
    assert [ax.get_title() for ax in axes] == [
        "loss", "contrastive_top1", "online_probe_top1", "lr", "alignment (lower is better)",
        "uniformity (lower is better)", "effective_rank (higher is better)", ""]
    assert [ax.get_xlabel() for ax in axes] == ["", "", "", "", "step", "step", "step", ""]
    assert [ax.get_ylabel() for ax in axes] == ["", "%", "%", "", "", "", "", ""]
    assert not axes[-1].axison  # 7 panels in a 2 x 4 grid


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_killed_run_resumes_where_it_stopped(precision, shapes, tmp_path):
    flags = ["--loss", "geometric", "--views", "3", "--epochs", "2", "--precision", precision]
    if precision == "fp16":  # 8x8 crops: fp16's backward pass is slow on a CPU
        flags += ["--image-size", "8"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(tiny_run(shapes, whole, *flags), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    run = subprocess.Popen(tiny_run(shapes, killed, *flags), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_a_checkpoint(run, killed)
    run.send_signal(signal.SIGKILL)  # as soon as the first epoch's checkpoint is there
    run.wait()
    assert torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"] == 1, "killed too late to test a resume"
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 1, "lo')  # as if killed while writing its next line

    refused = subprocess.run(tiny_run(shapes, killed, *flags), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # never silently overwritten
    done = subprocess.run(tiny_run(shapes, killed, *flags, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    for a, b in zip(records(whole), records(killed), strict=True):  # both epochs, the schedule included
        assert a.keys() == b.keys() and (a["step"], a["epoch"], a.get("lr")) == (b["step"], b["epoch"], b.get("lr"))
        for key in set(a) & {"loss", "contrastive_top1", "online_probe_top1", "online_val_top1"}:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    final = [torch.load(out / "checkpoint.pt", weights_only=False) for out in (whole, killed)]
    assert any(name.startswith("online_probe.") for name in final[0]["model"])
    for name, tensor in final[0]["model"].items():  # the online probe's head included
        torch.testing.assert_close(final[1]["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    for a, b in zip(final[0]["optimizer"]["state"].values(), final[1]["optimizer"]["state"].values(), strict=True):
        torch.testing.assert_close(b["velocity"], a["velocity"], rtol=0, atol=1e-6)
    # fp16's loss scale and its count of good steps since it last changed carry over (a fresh scaler would
    # have counted only the 2 steps since the resume); bf16 and fp32 runs save an empty one.
    assert final[1]["scaler"] == final[0]["scaler"]
    assert set(final[0]["scaler"]) >= {"scale", "_growth_tracker"} if precision == "fp16" else final[0]["scaler"] == {}


# ----------------------------------------------------------------------------------------------
# After a run: backbone.pt, --weights, and runs side by side (--compare)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """Three tiny runs: suffstats at M = 3 for 2 epochs, simclr for 1, and the first's backbone probed alone."""
    folder = tmp_path_factory.mktemp("runs")
    for name, flags in (("suffstats", ["--views", "3", "--epochs", "2"]),
                        ("simclr", ["--loss", "simclr", "--views", "2", "--epochs", "1"]),
                        ("probed", ["--epochs", "0", "--weights", str(folder / "suffstats" / "backbone.pt")])):
        done = subprocess.run(tiny_run(shapes, folder / name, *flags), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    return folder


def test_backbone_pt_loads_into_torchvisions_resnet_and_gives_the_runs_features(runs):
    import torchvision

    resnet = torchvision.models.resnet18()  # as the README shows: the small-image stem, no classifier
    resnet.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    resnet.maxpool, resnet.fc = torch.nn.Identity(), torch.nn.Identity()
    resnet.load_state_dict(torch.load(runs / "suffstats" / "backbone.pt", weights_only=True))  # strict: every key
    model = polyview.PolyViewNet("resnet18", small_images=True, classes=3)
    model.load_state_dict(torch.load(runs / "suffstats" / "checkpoint.pt", weights_only=True)["model"])
    images = torch.rand(5, 3, 32, 32)
    normalised = (images - torch.tensor(polyview.MEAN).view(3, 1, 1)) / torch.tensor(polyview.STD).view(3, 1, 1)
    with torch.no_grad():
        assert torch.equal(resnet.eval()(normalised), model.eval().features(images))
        assert not torch.equal(resnet(normalised), torchvision.models.resnet18(num_classes=512).eval()(normalised))


def test_weights_probes_a_backbone_as_its_own_run_did(runs):
    trained, probed = (json.loads((runs / name / "probe.json").read_text()) for name in ("suffstats", "probed"))
    assert (probed["top1"], probed["knn_top1"]) == (trained["top1"], trained["knn_top1"])  # the same features
    assert probed["online_val_top1_last_epoch"] is None  # --epochs 0 trained nothing
    weights = [torch.load(runs / name / "backbone.pt", weights_only=True) for name in ("suffstats", "probed")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((runs / "probed" / "args.json").read_text())["weights"].endswith("backbone.pt")


def test_weights_take_torchvisions_file_and_name_what_does_not_fit(runs, tmp_path):
    import torchvision

    args = polyview.parse_args(["--arch", "resnet18", "--weights", str(tmp_path / "resnet18.pth")])
    shipped = torchvision.models.resnet18()
    torch.save(shipped.state_dict(), args.weights)  # as torchvision ships it, with fc
    backbone = polyview.PolyViewNet("resnet18").backbone
    polyview.load_weights(args, backbone)  # strict, fc dropped
    assert all(torch.equal(v, shipped.state_dict()[k]) for k, v in backbone.state_dict().items())
    cases = [
        (["--arch", "resnet50", "--weights", args.weights], "does not load into --arch resnet50 at 224 px (ImageNet "
         "stem): RuntimeError:", "size mismatch for layer1.0.conv1.weight"),
        (["--arch", "resnet18", "--image-size", "32", "--weights", args.weights], "(3x3 stem of small images): "
         "RuntimeError", "size mismatch for conv1.weight: copying a param with shape torch.Size([64, 3, 7, 7])"),
        (["--weights", str(runs / "suffstats" / "checkpoint.pt")], "RuntimeError", 'Unexpected key(s) in state_dict: '
         '"model", "optimizer"'),
        (["--weights", str(runs / "suffstats" / "metrics.jsonl")], "UnpicklingError", ""),
        (["--weights", str(tmp_path / "nothing.pt")], "nothing.pt does not load", "FileNotFoundError"),
    ]
    for flags, *messages in cases:
        args = polyview.parse_args(flags)
        with pytest.raises(polyview.UserError) as raised:
            polyview.load_weights(args, polyview.PolyViewNet(args.arch, args.small_images).backbone)
        assert all(message in str(raised.value) for message in messages), str(raised.value)
        assert "\n" not in str(raised.value)


def test_a_weights_file_that_does_not_fit_is_one_line(shapes, runs, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--arch", "resnet50", "--epochs", "0", "--weights",
                               str(runs / "suffstats" / "backbone.pt"))[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1 and "does not load into --arch resnet50" in error


def test_compare_puts_runs_side_by_side_on_relative_compute(runs, tmp_path):
    folders = [str(runs / name) for name in ("suffstats", "simclr", "probed")]
    done = subprocess.run([sys.executable, str(REPO / "polyview.py"), "--compare", *folders], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    header, *rows = [line.split() for line in done.stdout.splitlines()[:4]]
    assert header[:5] == ["run", "loss", "M", "K", "epochs"]
    suffstats, simclr, probed = rows
    last = {name: records(runs / name)[-1] for name in ("suffstats", "simclr")}
    probes = {name: json.loads((runs / name / "probe.json").read_text()) for name in ("suffstats", "simclr", "probed")}
    # run, loss, M, K, epochs, views seen (K x M x steps), last online val top-1, fast probe top-1, k-NN top-1
    assert suffstats[1:6] == ["suffstats", "3", "6", "2/2", "72"] and simclr[1:6] == ["simclr", "2", "6", "1/1", "24"]
    assert last["suffstats"]["views_seen"] == 4 * 6 * 3 and last["simclr"]["views_seen"] == 2 * 6 * 2
    geometry = {name: [f"{probes[name][key]:.2f}" for key in ("alignment", "uniformity", "effective_rank")]
                for name in ("suffstats", "simclr")}
    for row, name in ((suffstats, "suffstats"), (simclr, "simclr")):
        assert row[6:] == [f"{last[name]['online_val_top1']:.2f}", f"{probes[name]['top1']:.2f}",
                           f"{probes[name]['knn_top1']:.2f}", *geometry[name]]
    assert probed[4:] == ["0/0", "0", "-", f"{probes['probed']['top1']:.2f}", f"{probes['probed']['knn_top1']:.2f}",
                          "-", "-", f"{probes['probed']['effective_rank']:.2f}"]  # no step: no alignment


@pytest.mark.filterwarnings("ignore:No artists with labels")  # the patched plot draws nothing
def test_relative_compute_is_views_seen_over_two_views_of_each_image_per_epoch(runs, tmp_path, monkeypatch):
    plotted = []
    from matplotlib.axes import Axes
    monkeypatch.setattr(Axes, "plot", lambda self, x, y, *a, **k: plotted.append((list(x), list(y))))
    monkeypatch.chdir(tmp_path)
    polyview.compare(polyview.parse_args(["--compare", str(runs / "suffstats"), str(runs / "simclr")]))
    val = {name: [r["online_val_top1"] for r in records(runs / name) if "online_val_top1" in r]
           for name in ("suffstats", "simclr")}
    # suffstats, M = 3: an epoch is 1.5 SimCLR epochs of compute; simclr, M = 2: exactly one
    assert plotted == [([1.5, 3.0], val["suffstats"]), ([1.0], val["simclr"])]


def test_compare_refuses_a_folder_that_is_not_a_run_in_one_line(runs, tmp_path, capsys):
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "args.json").write_text("{}")
    for folder, message in ((tmp_path, "is not a run of polyview.py (no args.json)"),
                            (tmp_path / "crashed", "is a run without a log (no metrics.jsonl)")):
        with pytest.raises(SystemExit) as stop:
            polyview.main(["--compare", str(runs / "simclr"), str(folder)])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and error == f"polyview.py: error: --compare: {folder} {message}\n"


def test_compare_labels_each_run_leaves_out_runs_without_points_and_ticks_plain_numbers(runs, tmp_path, monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda figure, *args, **kwargs: saved.append(figure))
    monkeypatch.chdir(tmp_path)
    polyview.compare(polyview.parse_args(["--compare", *(str(runs / name) for name in ("suffstats", "simclr", "probed"))]))
    (ax,) = saved[0].axes
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["suffstats: suffstats, M=3, K=6", "simclr: simclr, M=2, K=6"]  # "probed" (--epochs 0): no points
    FigureCanvasAgg(saved[0]).draw()
    low, high = ax.get_xlim()
    ticks = [t.get_text() for t in ax.get_xticklabels(which="both") if low <= t.get_position()[0] <= high]
    assert ticks and all(re.fullmatch(r"[0-9]+", tick) for tick in ticks if tick), ticks  # 2, 3: not 2 x 10^0


# ----------------------------------------------------------------------------------------------
# A run folder's own faults: one line, exit 2 (or the signal's status), nothing lost
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_ends_in_one_line_and_resume_goes_on_from_the_checkpoint(signum, status, shapes,
                                                                                     tmp_path):
    flags = ["--views", "2", "--epochs", "3"]
    run = subprocess.Popen(tiny_run(shapes, tmp_path, *flags), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    wait_for_a_checkpoint(run, tmp_path)
    run.send_signal(signum)
    _, error = run.communicate(timeout=120)
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert run.returncode == status and len(error.strip().splitlines()) == 1, error
    assert error == (f"polyview.py: stopped by {signal.Signals(signum).name}: {tmp_path}/checkpoint.pt (epoch "
                     f"{kept['epoch']}, step {kept['step']}) is kept as it was; --resume continues from it\n")
    assert not list(tmp_path.glob("*.tmp"))  # no half-written file left behind
    done = subprocess.run(tiny_run(shapes, tmp_path, *flags, "--resume"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and f"at epoch {kept['epoch']}, step {kept['step']}" in done.stdout, done.stderr
    assert [r["step"] for r in records(tmp_path) if "online_val_top1" in r] == [2, 4, 6]  # every epoch, once


def test_ctrl_c_under_torchrun_stops_every_rank_with_one_line(shapes, tmp_path):
    command = tiny_run(shapes, tmp_path, "--views", "2", "--epochs", "20")
    command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)  # its own process group, as a terminal's job
    wait_for_a_checkpoint(run, tmp_path)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C does: every process of the group gets it
    _, error = run.communicate(timeout=120)
    ours = [line for line in error.splitlines() if line.startswith("polyview.py:")]
    assert run.returncode != 0 and len(ours) == 1, error  # torchrun adds its own report of the signal
    assert ours[0].startswith("polyview.py: stopped by SIGINT: ") and "--resume continues from it" in ours[0]


def test_a_checkpoint_that_cannot_be_read_is_one_line_and_stays_as_it_was(runs, shapes, tmp_path, capsys):
    import torchvision

    flags = ["--views", "3", "--epochs", "2", "--resume"]
    whole = (runs / "suffstats" / "checkpoint.pt").read_bytes()
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    for name, contents in [("cut short", whole[:len(whole) // 2]), ("random bytes", os.urandom(4096)),
                           ("another program's", (tmp_path / "resnet18.pth").read_bytes())]:
        out = tmp_path / name.replace(" ", "_").replace("'", "")
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(contents)
        (out / "metrics.jsonl").write_text('{"step": 2, "epoch": 0}\n')
        with pytest.raises(SystemExit) as stop:
            polyview.main(tiny_run(shapes, out, *flags)[2:])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, (name, error)
        assert f"{out}/checkpoint.pt cannot be read as a checkpoint of polyview.py (" in error
        assert error.endswith("): move it aside to start afresh\n"), error
        assert (out / "checkpoint.pt").read_bytes() == contents, name  # nothing lost
        assert (out / "metrics.jsonl").read_text() == '{"step": 2, "epoch": 0}\n'


def test_a_checkpoint_of_other_classes_and_an_out_that_is_a_file_are_one_line(runs, shapes, tmp_path, capsys):
    import shutil

    other = draw_shapes(tmp_path / "four", per_class=4)  # a fourth class: the checkpoint learnt 3
    shutil.copytree(other / "train" / "square", other / "train" / "star")
    shutil.copytree(other / "val" / "square", other / "val" / "star")
    shutil.copy(runs / "suffstats" / "checkpoint.pt", tmp_path / "checkpoint.pt")
    (tmp_path / "a_file").write_text("")
    for data, out, message in [
            (other, tmp_path, f"{tmp_path}/checkpoint.pt learnt 3 classes, --data {other} has 4"),
            (shapes, tmp_path / "a_file", f"--out {tmp_path}/a_file cannot be a folder (File exists)"),
            (shapes, tmp_path / "a_file" / "run", f"--out {tmp_path}/a_file/run cannot be a folder (Not a directory)")]:
        with pytest.raises(SystemExit) as stop:
            polyview.main(tiny_run(data, out, "--views", "3", "--epochs", "2", "--resume")[2:])
        assert stop.value.code == 2 and capsys.readouterr().err == f"polyview.py: error: {message}\n"


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(shapes, tmp_path, monkeypatch, capsys):
    import errno

    real_save = torch.save

    def full_disk(state, f):  # the second epoch's checkpoint finds the disk full
        if isinstance(state, dict) and state.get("epoch") == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state, f)
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--views", "2", "--epochs", "3")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error == (
        f"polyview.py: error: could not write {tmp_path}/checkpoint.pt: No space left on device; "
        f"{tmp_path}/checkpoint.pt (epoch 1, step 2) is kept as it was\n")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob("*.tmp"))


def test_resuming_a_finished_run_goes_straight_to_its_probe(runs, shapes, tmp_path):
    import shutil

    shutil.copytree(runs / "suffstats", tmp_path / "suffstats")
    done = subprocess.run(tiny_run(shapes, tmp_path / "suffstats", "--views", "3", "--epochs", "2", "--resume"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert records(tmp_path / "suffstats") == records(runs / "suffstats")  # not a step more
    again, first = (json.loads((folder / "suffstats" / "probe.json").read_text()) for folder in (tmp_path, runs))
    assert again == first


def test_a_fresh_run_moves_stale_metrics_aside(shapes, tmp_path):
    stale = '{"step": 7, "epoch": 3, "loss": 9.0}\n{"step": 8, "ep'  # a run that crashed before any checkpoint
    (tmp_path / "metrics.jsonl").write_text(stale)
    done = subprocess.run(tiny_run(shapes, tmp_path, "--loss", "dcl", "--views", "2", "--epochs", "1", "--probe-epochs", "0"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 2]  # two steps, then the epoch's end
    assert (tmp_path / "metrics.old.jsonl").read_text() == stale
    assert (tmp_path / "views.png").exists() and not (tmp_path / "neighbours.png").exists()  # --probe-epochs 0


# ----------------------------------------------------------------------------------------------
# Pictures: the grids of views.png and neighbours.png, and the README's figure
# ----------------------------------------------------------------------------------------------


def test_save_grid_puts_each_row_of_images_on_a_row_framed_and_enlarged(tmp_path):
    from PIL import Image

    rows = [[torch.full((3, 8, 8), (3 * r + c) / 10) for c in range(3 - r)] for r in range(2)]  # row 1 is short
    frames = [[(1.0, 0.0, 0.0)] * 3, [(0.0, 1.0, 0.0)] * 2]
    grid = polyview.save_grid(rows, tmp_path / "grid.png", frames)
    cell, scale = 8 + 2 * 3 + 2, 96 // 8  # an image, its frame of 3 px, make_grid's padding; enlarged to 96 px
    assert grid.shape == (3, (2 * cell + 2) * scale, (3 * cell + 2) * scale)
    for r in range(2):
        for c in range(3):
            top, left = (2 + r * cell) * scale, (2 + c * cell) * scale  # the cell's corner, on its frame
            inside = grid[:, top + 7 * scale, left + 7 * scale]
            if c < len(rows[r]):
                assert grid[:, top, left].tolist() == list(frames[r][c]) and torch.allclose(inside, rows[r][c][:, 0, 0])
            else:  # filled: white
                assert grid[:, top, left].tolist() == [1.0] * 3 and inside.tolist() == [1.0] * 3
    png = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).permute(2, 0, 1)  # [3, H, W] uint8
    assert torch.equal(png, (grid * 255 + 0.5).clamp(0, 255).to(torch.uint8))


@pytest.mark.parametrize("classes, rows", [(10, 8), (3, 3)])
def test_neighbours_png_shows_the_knns_own_neighbours_of_each_classs_first_val_image(classes, rows, tmp_path):
    torch.manual_seed(0)
    train_x, val_x = torch.randn(40, 16, dtype=torch.float64), torch.randn(30, 16, dtype=torch.float64)
    train_y, val_y = torch.arange(40) % classes, torch.randint(0, classes, (30,))
    _, neighbours = polyview.knn(train_x, train_y, val_x)

    def item(n):  # as SkipUndecodable gives it: (views [1, 3, H, W] uint8, label)
        return torch.full((1, 3, 8, 8), n, dtype=torch.uint8), 0
    train_set, val_set = [item(n) for n in range(40)], [item(100 + n) for n in range(30)]
    grid, picked = polyview.save_neighbours_png(train_set, val_set, train_y, val_y, neighbours, tmp_path / "n.png")
    queries = [val_y.tolist().index(c) for c in sorted(set(val_y.tolist()))[:8]]  # each class's first val image
    cosine = F.normalize(val_x, dim=1) @ F.normalize(train_x, dim=1).T
    assert len(picked) == rows
    for r, (row, query) in enumerate(zip(picked, queries, strict=True)):
        assert row == [query, *sorted(range(40), key=lambda j: -cosine[query, j])[:8]]  # the 8 nearest, in order
        for c, index in enumerate(row):
            top, left = (2 + r * 16) * 12, (2 + c * 16) * 12  # the cell's frame (see the test above)
            match = (0.0, 0.7, 0.0) if train_y[index] == val_y[query] else (0.9, 0.0, 0.0)
            assert grid[:, top, left].tolist() == pytest.approx((0.0, 0.0, 0.0) if c == 0 else match)
            assert grid[0, top + 7 * 12, left + 7 * 12] == pytest.approx((100 + index if c == 0 else index) / 255)


def test_the_readmes_figure_is_a_photograph_its_eight_views_and_simclrs_two(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("views_figure", REPO / "figures" / "views.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    grid = module.views_figure(tmp_path / "views.png")
    cell = 224 + 2 * 3 + 2
    assert grid.shape == (3, 2 * cell + 2, 9 * cell + 2)  # the photograph and 8 views; then SimCLR's 2
    assert (tmp_path / "views.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("disk full")


def test_a_crash_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save({"epoch": 3, "weights": torch.arange(5)}, path)
    with pytest.raises(RuntimeError, match="disk full"):
        save({"epoch": 4, "weights": Unpicklable()}, path)
    saved = torch.load(path, weights_only=False)
    assert saved["epoch"] == 3 and torch.equal(saved["weights"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("bad_step, message", [
    (3, "loss is nan at step 3 (epoch 1); stopping: {out}/checkpoint.pt (epoch 1, step 2) is kept as it was"),
    (1, "loss is nan at step 1 (epoch 0); stopping: no checkpoint yet"),
])
def test_a_non_finite_loss_stops_the_run_naming_the_step(bad_step, message, shapes, tmp_path, monkeypatch, capsys):
    geometric, calls = LOSSES["geometric"], []

    def breaks(z, temperature, anchors=None):
        calls.append(1)  # call 1 checks the settings; call n + 1 is step n
        return geometric(z, temperature, anchors) + (float("nan") if len(calls) > bad_step else 0.0)

    monkeypatch.setitem(polyview.LOSSES, "geometric", breaks)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--loss", "geometric", "--views", "3", "--epochs", "2")[2:])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert message.format(out=tmp_path) in error and len(error.strip().splitlines()) == 1, error
    if bad_step == 3:
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1  # the last good one


BAD_FLAGS = [
    (["--views", "1"], "--views must be a finite number >= 2, got 1"),
    (["--views", "-1"], "--views must be a finite number >= 2, got -1"),
    (["--loss", "simclr", "--views", "4"], "M = 2"),
    (["--batch-size", "1"], "--batch-size must be a finite number >= 2"),
    (["--epochs", "-1"], "--epochs must"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
    (["--temperature", "0"], "--temperature must"),
    (["--weight-decay=-1e-6"], "--weight-decay must be a finite number >= 0, got -1e-06"),
    (["--weight-decay", "inf"], "--weight-decay must"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must"),
    (["--workers", "-2"], "--workers must"),
    (["--image-size", "0"], "--image-size must"),
    (["--probe-epochs", "-1"], "--probe-epochs must"),
    (["--log-every", "0"], "--log-every must"),
    (["--seed", "-1"], "--seed must"),
    (["--supervised"], "--supervised is supcon's form, not --loss suffstats"),
    (["--data", "nowhere"], "train/ and val/"),
    (["--data", "train"], "train/ and val/"),
]


def test_bad_input_gets_one_line_and_exit_code_two(shapes, tmp_path, capsys):
    for flags, message in BAD_FLAGS:
        if flags[0] == "--data":
            flags = ["--data", str(shapes / flags[1])]
        with pytest.raises(SystemExit) as stop:
            polyview.main(tiny_run(shapes, tmp_path / "out", "--epochs", "1", *flags)[2:])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, (flags, error)
    assert not (tmp_path / "out").exists()  # nothing was started
    # A real process, split over two ranks: each rank checks before it joins the process group.
    done = subprocess.run(tiny_run(shapes, tmp_path / "out", "--batch-size", "5"), capture_output=True, text=True,
                          timeout=120, env={**os.environ, "RANK": "0", "WORLD_SIZE": "2"})
    assert done.returncode == 2 and "must divide among 2 processes" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def out_of_memory(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_views_per_gpu_and_the_ways_out(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(polyview, "train_step", out_of_memory)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--views", "3", "--epochs", "1")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert "out of memory with 6 x 3 = 18 views per GPU (resnet18 at 32 px)" in error
    assert "more GPUs under torchrun" in error and "lower --batch-size" in error and "lr / 1.41" in error


@pytest.mark.parametrize("broken, epochs, where, way_out", [
    ("extract_features", "1", "in the online probe's val pass", "lower --batch-size; no checkpoint yet"),
    ("extract_features", "0", "in the fast probe", "rerun with --resume on a GPU with more memory, or with --device cpu"),
    ("linear_probe", "0", "in the fast probe", "a finished run goes straight to its probe"),
])
def test_out_of_memory_in_a_probe_names_the_probe_and_its_way_out(broken, epochs, where, way_out, shapes, tmp_path,
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(polyview, broken, out_of_memory)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--views", "2", "--epochs", epochs)[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert f"CUDA out of memory {where}" in error and way_out.format(out=tmp_path) in error, error
    assert "views per GPU" not in error
    if epochs == "0":  # the backbone is saved before the probe runs
        assert (tmp_path / "backbone.pt").exists()


def test_a_data_loading_worker_that_dies_is_one_line_about_shared_memory(shapes, tmp_path, monkeypatch, capsys):
    def bus_error(self, index):  # what a worker meets when /dev/shm is full: SIGBUS
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGBUS)

    monkeypatch.setattr(polyview.MultiView, "__getitem__", bus_error)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(shapes, tmp_path, "--views", "3", "--epochs", "1", "--workers", "1")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert "DataLoader worker" in error and "--ipc=host" in error and "--shm-size" in error


def test_a_flat_val_folder_as_imagenet_ships_it_is_one_line(shapes, tmp_path, capsys):
    import shutil

    shutil.copytree(shapes / "train", tmp_path / "data" / "train")
    (tmp_path / "data" / "val").mkdir()
    for n in range(3):  # ILSVRC2012_val_00000001.JPEG, ... with no class folders
        shutil.copy(next((shapes / "val" / "circle").iterdir()), tmp_path / "data" / "val" / f"val_{n}.png")
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(tmp_path / "data", tmp_path / "out", "--epochs", "1")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert "must hold the ImageFolders train/ and val/, one sub-folder per class" in error and "valprep.sh" in error
    assert str(tmp_path / "data" / "val") in error  # ImageFolder's own words name the folder


def test_val_classes_take_trains_numbers_by_name_and_an_extra_one_is_one_line(tmp_path, capsys):
    import shutil

    data = draw_shapes(tmp_path / "data", per_class=3)  # train/ and val/ of circle, square, triangle
    shutil.rmtree(data / "val" / "circle")  # val/ without train's first class: on its own it would number square 0
    args = polyview.parse_args(["--dataset", "folder", "--data", str(data), "--batch-size", "2"])
    train, val = polyview.read_dataset(args, TV.ToImage())
    assert train.class_to_idx == {"circle": 0, "square": 1, "triangle": 2} and val.class_to_idx == train.class_to_idx
    assert [val[i][1] for i in range(len(val))] == [1, 1, 2, 2]
    shutil.copytree(data / "val" / "square", data / "val" / "star")  # a class that train/ lacks
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(data, tmp_path / "out", "--epochs", "1")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error == f"polyview.py: error: {data / 'val'} has class folders that train/ lacks: star\n"


def test_a_folder_of_broken_images_stops_at_once_and_a_mostly_broken_one_after_reading_it(tmp_path, capsys):
    all_broken = draw_shapes(tmp_path / "all", per_class=1)
    break_images(all_broken, count=3)
    with pytest.raises(SystemExit) as stop:
        polyview.main(tiny_run(all_broken, tmp_path / "out_all", "--epochs", "1")[2:])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and len(error.strip().splitlines()) == 1, error
    assert "none of the 3 images in" in error and "could be decoded" in error and "train" in error

    mostly_fine = draw_shapes(tmp_path / "some", per_class=4)  # 3 of 12 broken: 25%, over the 1% allowed
    break_images(mostly_fine, count=3)
    done = subprocess.run(tiny_run(mostly_fine, tmp_path / "out_some", "--views", "2", "--epochs", "2"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "could not be decoded, more than 1%" in done.stderr.strip().splitlines()[-1]


def test_resuming_with_other_settings_is_refused_naming_the_flag(shapes, tmp_path, capsys):
    flags = ["--loss", "geometric", "--views", "3", "--epochs", "2"]
    saved = vars(polyview.parse_args(tiny_run(shapes, tmp_path, *flags)[2:]))
    save(a_checkpoint(saved, classes=3), tmp_path / "checkpoint.pt")
    for changed, message in [(["--epochs", "3"], "checkpoint.pt has --epochs 2, not 3: resume with --epochs 2, or"),
                             (["--arch", "resnet50"], "has --arch resnet18, not resnet50"),
                             (["--loss", "suffstats"], "has --loss geometric, not suffstats"),
                             (["--lr", "0.5"], ", not 0.5: resume with --lr "),
                             (["--lr-scaling", "linear"], "has --lr-scaling sqrt, not linear"),
                             (["--warmup-epochs", "1"], "--warmup-epochs"), (["--temperature", "0.2"], "--temperature"),
                             (["--weight-decay", "0"], "--weight-decay"), (["--seed", "1"], "has --seed 0, not 1"),
                             (["--weights", "w.pt"], "has --weights None, not w.pt")]:
        with pytest.raises(SystemExit) as stop:
            polyview.main(tiny_run(shapes, tmp_path, "--resume", *flags, *changed)[2:])
        error = capsys.readouterr().err
        assert stop.value.code == 2 and message in error and len(error.strip().splitlines()) == 1, error


# ----------------------------------------------------------------------------------------------
# The recipe: defaults, learning-rate rules and the projector
# ----------------------------------------------------------------------------------------------


def test_defaults_are_the_papers_and_simclrs():
    imagenet = polyview.parse_args(["--loss", "suffstats"])
    assert imagenet.views == 8 and polyview.parse_args(["--loss", "simclr"]).views == 2
    assert (imagenet.batch_size, imagenet.lr_scaling, imagenet.lr, imagenet.temperature, imagenet.weight_decay) == (
        256, "sqrt", 0.075, 0.1, 1e-6)
    assert polyview.peak_learning_rate(imagenet) == pytest.approx(1.2)  # 0.075 sqrt(256)
    cifar = polyview.parse_args(["--dataset", "cifar10"])  # SimCLR's published CIFAR-10 settings ...
    assert (cifar.image_size, cifar.batch_size, cifar.lr_scaling, cifar.temperature, cifar.weight_decay) == (
        32, 512, "sqrt", 0.5, 1e-4)
    assert polyview.peak_learning_rate(cifar) == pytest.approx(2.0)  # ... whose peak the square-root rule keeps
    small = polyview.parse_args(["--dataset", "cifar10", "--batch-size", "32"])
    assert polyview.peak_learning_rate(small) == pytest.approx(0.5)  # and raises at small K: linear gives 0.125
    linear = polyview.parse_args(["--dataset", "cifar10", "--lr-scaling", "linear"])
    assert linear.lr == 1.0 and polyview.peak_learning_rate(linear) == pytest.approx(2.0)  # SimCLR's own rule
    linear = polyview.parse_args(["--lr-scaling", "linear", "--batch-size", "4096"])
    square_root = polyview.parse_args(["--batch-size", "4096"])
    assert polyview.peak_learning_rate(linear) == pytest.approx(polyview.peak_learning_rate(square_root)) == pytest.approx(4.8)


@pytest.mark.parametrize("arch, width", [("resnet18", 512), ("resnet50", 2048)])
def test_projector_and_backbone_are_built_as_simclrs(arch, width):
    model = polyview.PolyViewNet(arch, small_images=True)
    first, bn1, _, second, bn2 = model.projector
    assert (first.in_features, first.out_features, second.in_features, second.out_features) == (width, width, width, 128)
    assert first.bias is None and second.bias is None  # a BN follows each linear layer
    assert bn1.num_features == width and bn2.num_features == 128
    assert not bn2.bias.requires_grad and torch.equal(bn2.bias, torch.zeros(128))  # no beta in the last BN
    last_bns = [block.bn2 if arch == "resnet18" else block.bn3 for layer in
                (model.backbone.layer1, model.backbone.layer2, model.backbone.layer3, model.backbone.layer4) for block in layer]
    assert all(torch.equal(bn.weight, torch.zeros_like(bn.weight)) for bn in last_bns)  # zero-init residuals
    z, logits = model(torch.rand(2, 3, 3, 32, 32))
    assert z.shape == (2, 3, 128) and logits.shape == (6, 1000)  # the online probe: one row per view


# ----------------------------------------------------------------------------------------------
# The Gaussian demo (a short run: 50 steps, one seed, M in {2, 4})
# ----------------------------------------------------------------------------------------------


from gaussian_demo import OBJECTIVES  # noqa: E402  (the demo's curves: every objective with a bound)


def run_demo(*flags):
    return subprocess.run([sys.executable, "gaussian_demo.py", *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One short run of the demo, shared by the tests below: (process, rows of the CSV, out dir)."""
    out = tmp_path_factory.mktemp("gaussian")
    proc = run_demo("--steps", "50", "--seeds", "1", "--views", "2", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with open(out / "gaussian_mi.csv", newline="") as f:
        header = f.readline().strip()
        rows = list(csv.DictReader(f, fieldnames=header.split(",")))
    return proc, header, rows, out


def test_demo_csv_has_one_row_per_objective_and_views(demo):
    _, header, rows, _ = demo
    assert header == "objective,M,seed,K,true_mi,bound,loss"
    assert len(rows) == len(OBJECTIVES) * 2
    assert sorted((r["objective"], int(r["M"]), int(r["seed"])) for r in rows) == sorted(
        (o, M, 0) for o in OBJECTIVES for M in (2, 4))


def test_demo_true_mi_is_the_closed_form_and_grows_with_views(demo):
    _, _, rows, _ = demo
    d, s, n = 2, 1.0, 0.01                          # the demo's defaults (regime A)
    truth = {M: d / 2 * math.log((s + n) * (n + (M - 1) * s) / (n * (n + M * s))) for M in (2, 4)}
    for r in rows:
        assert float(r["true_mi"]) == pytest.approx(truth[int(r["M"])], abs=1e-5)
    by_views = {int(r["M"]): float(r["true_mi"]) for r in rows}
    assert by_views[4] > by_views[2]


def test_demo_bound_is_log_candidates_minus_loss(demo):
    _, _, rows, _ = demo
    for r in rows:
        K, M, loss = int(r["K"]), int(r["M"]), float(r["loss"])
        candidates = 2 * K - 1 if r["objective"] == "multicrop" else M * (K - 1) + 1
        assert float(r["bound"]) == pytest.approx(math.log(candidates) - loss, abs=1e-5), r
    # At M = 2 every objective is SimCLR (tested above): the demo trains it once and reports it for each.
    at_two = {r["bound"] for r in rows if r["M"] == "2"}
    assert len(at_two) == 1, at_two


def test_demo_writes_a_png_and_prints_the_summary(demo):
    proc, _, _, out = demo
    png = out / "gaussian_mi.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    for objective in OBJECTIVES:
        assert f"{objective} M=4: bound" in proc.stdout


def test_demo_rejects_a_bad_flag_with_exit_2_and_no_traceback(tmp_path):
    proc = run_demo("--views", "1", "--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and "--views" in proc.stderr
    assert not (tmp_path / "gaussian_mi.csv").exists()


@pytest.mark.parametrize("flags", [["--views", "2", "1"], ["--batch-size", "1"], ["--steps", "0"], ["--seeds", "0"],
                                   ["--noise", "0"], ["--noise", "nan"], ["--signal", "-1"], ["--signal", "inf"]])
def test_demo_validates_every_flag(flags, tmp_path, capsys):
    # In-process, to spare a torch import per case; the subprocess test above covers the exit path.
    import gaussian_demo
    with pytest.raises(SystemExit) as exit_info:
        gaussian_demo.main([*flags, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert flags[0] in capsys.readouterr().err
    assert not (tmp_path / "gaussian_mi.csv").exists()


@pytest.fixture
def one_thread():
    """Small tensors: a second OpenMP thread would only wait on a busy core (see gaussian_demo.main)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_batched_members_train_as_they_would_alone(one_thread):
    # The demo trains every (objective, seed) encoder at one M side by side, as one Ensemble. That
    # must change nothing: each member's loss at every step is the loss of the same encoder trained
    # alone, with its own seed's init and batches and its own Adam, in a plain one-model loop.
    from argparse import Namespace
    import gaussian_demo as demo
    args = Namespace(dim=2, signal=1.0, noise=0.01, batch_size=8, steps=20, device="cpu")
    objectives, seeds = ("multicrop", "geometric", "suffstats"), (0, 1)
    for views in (2, 4):
        batched = demo.run(objectives, views, seeds, args)              # [objectives, seeds, steps]
        assert batched.shape == (len(objectives), len(seeds), args.steps)
        for o, objective in enumerate(objectives):
            for s, seed in enumerate(seeds):
                encoder = demo.make_encoder(args.dim, seed)
                optimizer = demo.make_optimizer(encoder.parameters())
                generator = torch.Generator().manual_seed(seed)
                alone = []
                for _ in range(args.steps):
                    x = demo.sample_views(args.batch_size, views, args, generator)       # [K, M, d]
                    loss = LOSSES[objective](encoder(x), demo.TEMPERATURE)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    alone.append(loss.item())
                assert list(batched[o, s]) == pytest.approx(alone, rel=1e-5, abs=1e-6), (objective, views, seed)
        # The comparison has teeth: the members do differ, by seed and (beyond M = 2) by objective.
        assert abs(batched[0, 0, -1] - batched[0, 1, -1]) > 1e-3
        if views > 2:
            assert abs(batched[0, 0, -1] - batched[1, 0, -1]) > 1e-3


# ----------------------------------------------------------------------------------------------
# Two processes equal one
# ----------------------------------------------------------------------------------------------

K_TOTAL, VIEWS = 8, 3
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 0, 2])  # [K_TOTAL]: the online probe's and supervised supcon's classes


def tiny_model():
    """The training program's own model, small: ResNet-18 with its projector and online probe, float64.
    In eval mode, BN normalises with its running statistics: on the CPU there is no SyncBN, and each
    rank's half-batch statistics would make a different function from the full batch's."""
    torch.manual_seed(0)
    return polyview.PolyViewNet("resnet18", small_images=True, classes=3).double().eval()


def tiny_views():
    torch.manual_seed(1)
    return torch.rand(K_TOTAL, VIEWS, 3, 8, 8, dtype=torch.float64)  # [K, M, C, H, W]


PROBE_ARGS = argparse.Namespace(workers=0, precision="fp32")


def probe_images(shapes, count=11):  # an odd count: the shards of two ranks differ in length
    import torchvision

    folder = torchvision.datasets.ImageFolder(shapes / "train", TV.ToImage())
    dataset = polyview.SkipUndecodable(polyview.MultiView(folder, polyview.centre_crop(32, True), 1))
    return torch.utils.data.Subset(dataset, range(count))


def two_rank_worker(rank, world_size, folder, shapes):
    import torch.distributed as dist
    import torchvision

    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))  # as torchrun sets them
    # A minute, not torch's half hour: a rank left waiting at a collective fails the test instead of hanging it.
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    k = K_TOTAL // world_size
    mine = slice(rank * k, (rank + 1) * k)
    results = {}
    for name in [*MULTI_VIEW, "supervised"]:
        objective = LOSSES["supcon" if name == "supervised" else name]
        extra = {"labels": polyview.gather(LABELS[mine])} if name == "supervised" else {}
        # The gather alone: this rank's share of the loss sends its embeddings the gradient of
        # the sum of every rank's loss.
        z = tiny_views()[mine, :, 0, 0, :4].clone().requires_grad_()
        objective(polyview.GatherWithGrad.apply(z), 0.5, anchors=mine, **extra).backward()
        # The training step: the DDP-wrapped model, this rank's images, the gathered loss, the online probe.
        model = torch.nn.parallel.DistributedDataParallel(tiny_model())
        loss, stats = polyview.step_loss(model, tiny_views()[mine], LABELS[mine], objective, 0.5, name == "supervised")
        loss.backward()
        results[name] = {"gather": z.grad, "params": [p.grad for p in model.parameters()], "stats": stats}
    # The fast probe's features: each rank extracts its shard, rank 0 gathers them in order.
    torch.manual_seed(2)
    model = polyview.PolyViewNet("resnet18", small_images=True, classes=3)
    results["bank"] = polyview.extract_features(model, probe_images(shapes), torch.device("cpu"), PROBE_ARGS)
    # Resuming: rank 0 sees a checkpoint, rank 1 (another machine, say) sees an empty folder.
    out = Path(folder) / ("run" if rank == 0 else "empty")
    args = polyview.parse_args(["--resume", "--epochs", "2", "--out", str(out)])
    results["checkpoint"] = polyview.open_run_folder(args, 3)
    args.resume = False  # without --resume the checkpoint is refused, on every rank alike
    try:
        polyview.open_run_folder(args, 3)
    except polyview.UserError as error:
        results["refused"] = str(error)

    # A problem only rank 1 meets (its machine lacks a folder, say) stops both ranks, named by rank 1.
    def rank_1_fails():
        if rank == 1:
            raise polyview.UserError("no such folder")
        return "fine"
    try:
        polyview.agree(rank_1_fails)
    except polyview.UserError as error:
        results["agreed"] = (str(error), error.everywhere)

    # CIFAR: the download fails on rank 0 (LOCAL_RANK 0, the one that downloads); rank 1 must not wait forever.
    class NoDownload:
        def __init__(self, root, train, transform, download):
            raise RuntimeError("download failed: no network" if download else "Dataset not found")
    os.environ["LOCAL_RANK"] = str(rank)
    torchvision.datasets.CIFAR10 = NoDownload
    try:
        polyview.make_datasets(polyview.parse_args(["--dataset", "cifar10", "--data", str(folder)]))
    except polyview.UserError as error:
        results["cifar"] = (str(error), error.everywhere)
    # Pictures: whichever rank asks, rank 0 alone draws.
    path = Path(folder) / f"grid_asked_by_rank{rank}.png"
    results["grid"] = (str(path), polyview.save_grid([[torch.rand(3, 8, 8)]], path))
    torch.save(results, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(shapes, tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    checkpoint = a_checkpoint(vars(polyview.parse_args(["--epochs", "2"])), classes=3)
    (folder / "run").mkdir()
    save(checkpoint, folder / "run" / "checkpoint.pt")
    torch.multiprocessing.spawn(two_rank_worker, args=(2, str(folder), shapes), nprocs=2)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)], checkpoint


def test_two_processes_give_the_gradients_of_one(two_ranks):
    ranks, _ = two_ranks
    for name in [*MULTI_VIEW, "supervised"]:
        objective = LOSSES["supcon" if name == "supervised" else name]
        extra = {"labels": LABELS} if name == "supervised" else {}
        z = tiny_views()[:, :, 0, 0, :4].clone().requires_grad_()
        (grad_z,) = torch.autograd.grad(2 * objective(z, 0.5, **extra), z)  # the sum of the two ranks' means
        model = tiny_model()
        loss, stats = polyview.step_loss(model, tiny_views(), LABELS, objective, 0.5, name == "supervised")
        loss.backward()
        full_params = [p.grad for p in model.parameters()]
        for rank, result in enumerate(ranks):
            # alignment and uniformity come from all ranks' embeddings: each rank logs what one process would
            for key in ("alignment", "uniformity"):
                torch.testing.assert_close(result[name]["stats"][key], stats[key], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(result[name]["gather"], grad_z[rank * 4:(rank + 1) * 4], rtol=1e-10, atol=1e-12)
            for mine, single in zip(result[name]["params"], full_params, strict=True):
                if single is None:  # the last BN's beta: frozen at 0, as in SimCLR
                    assert mine is None
                else:
                    torch.testing.assert_close(mine, single, rtol=1e-9, atol=1e-12,
                                               msg=lambda m: f"{name} rank {rank} {single.shape} {m}")
        assert any(g is not None and g.abs().sum() > 0 for g in full_params[-2:])  # the online probe learns


def test_two_processes_extract_the_features_of_one(two_ranks, shapes):
    ranks, _ = two_ranks
    torch.manual_seed(2)
    model = polyview.PolyViewNet("resnet18", small_images=True, classes=3)
    features, labels = polyview.extract_features(model, probe_images(shapes), torch.device("cpu"), PROBE_ARGS)
    assert features.shape == (11, 512) and labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]
    gathered, gathered_labels = ranks[0]["bank"]
    assert torch.equal(gathered_labels, labels)
    torch.testing.assert_close(gathered, features, rtol=1e-5, atol=1e-6)  # row for row
    # the effective rank at an epoch's end: rank 0's, of the gathered features, is one process's
    assert polyview.effective_rank(gathered).item() == pytest.approx(polyview.effective_rank(features).item(),
                                                                     rel=1e-5)
    assert ranks[1]["bank"] == (None, None)  # only rank 0 keeps the bank


def test_a_problem_of_one_rank_stops_every_rank_in_one_message(two_ranks):
    ranks, _ = two_ranks
    for result in ranks:
        assert result["agreed"] == ("(rank 1) no such folder", True)  # printed once, by rank 0
        message, everywhere = result["cifar"]  # no rank waits for a download that failed
        assert everywhere and re.search(r"^--dataset cifar10 --data \S+ could not be read or downloaded", message)
        assert "download failed: no network" in message and not message.startswith("(rank")


def test_every_rank_resumes_from_rank_0s_checkpoint(two_ranks):
    ranks, checkpoint = two_ranks
    for result in ranks:  # rank 1 saw no file, yet resumes from the same epoch, step and weights
        assert (result["checkpoint"]["epoch"], result["checkpoint"]["step"]) == (1, 7)
        assert torch.equal(result["checkpoint"]["model"]["weight"], checkpoint["model"]["weight"])
        assert result["refused"].endswith("checkpoint.pt exists: add --resume to continue it, or choose another --out")
    assert ranks[0]["refused"] == ranks[1]["refused"]


def test_pictures_are_drawn_by_rank_0_alone(two_ranks):
    ranks, _ = two_ranks
    (path_0, grid_0), (path_1, grid_1) = ranks[0]["grid"], ranks[1]["grid"]
    assert grid_0 is not None and Path(path_0).exists()
    assert grid_1 is None and not Path(path_1).exists()


def test_an_error_of_every_rank_prints_once_and_one_ranks_error_prints_anyway(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    slept = []
    monkeypatch.setattr(polyview.time, "sleep", slept.append)
    with pytest.raises(SystemExit) as stop:  # a bad flag: every rank meets it, rank 0 says so
        polyview.main(["--views", "1"])
    assert stop.value.code == 2 and capsys.readouterr().err == ""
    assert slept == [10]  # and rank 1 waits, or torchrun could stop rank 0 before it has printed the line

    def fails_here(args):
        raise polyview.UserError("only this rank's disk is full")
    monkeypatch.setattr(polyview, "train", fails_here)
    with pytest.raises(SystemExit) as stop:
        polyview.main([])
    assert stop.value.code == 2 and capsys.readouterr().err == "polyview.py: error: only this rank's disk is full\n"
    assert slept == [10]  # no wait for an error of its own


def test_benchmark_prints_the_steps_throughput_on_the_cpu(capsys):
    polyview.main(["--benchmark", "--dataset", "fake", "--arch", "resnet18", "--image-size", "16", "--batch-size", "4",
                   "--views", "2", "--workers", "0", "--device", "cpu"])
    out = capsys.readouterr().out
    assert re.fullmatch(r"resnet18 at 16px, K=4 x M=2 = 8 views/step, suffstats, cpu, fp32 \(auto: on the CPU\): "
                        r"[0-9.]+ views/s\n", out), out  # no memory on the CPU


def test_benchmark_under_torchrun_is_refused_in_one_line(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as stop:  # every rank would measure cuda:0
        polyview.main(["--benchmark", "--dataset", "fake", "--device", "cpu"])
    error = capsys.readouterr().err
    assert stop.value.code == 2 and error == "polyview.py: error: --benchmark measures one GPU: run it with python, not torchrun\n"


@pytest.mark.parametrize("flags, message", [(["--views", "1"], "--views must be"),
                                            (["--data", "nowhere"], "must hold the ImageFolders train/ and val/")])
def test_torchrun_prints_an_error_of_every_rank_once(flags, message, shapes, tmp_path):
    command = tiny_run(shapes, tmp_path, "--epochs", "1", *flags)
    command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    ours = [line for line in done.stderr.splitlines() if line.startswith("polyview.py: error:")]
    assert done.returncode != 0 and len(ours) == 1 and message in ours[0], done.stderr


@pytest.mark.parametrize("loss", ["suffstats", "supcon --supervised"])
def test_torchrun_with_two_cpu_processes_trains_and_probes(loss, shapes, tmp_path):
    command = tiny_run(shapes, tmp_path, "--loss", *loss.split(), "--views", "2", "--epochs", "1")
    command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "on 2 x cpu" in done.stdout and [r["step"] for r in records(tmp_path)] == [1, 2, 2]
    assert (tmp_path / "probe.json").exists() and (tmp_path / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------------------------
# On a GPU: `python -m pytest -k cuda` checks a machine's CUDA path (skipped where there is none)
# ----------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_device_augmentations_equal_the_cpus(images):
    n = len(images)
    op, factor = torch.arange(n) % 3, torch.linspace(0.2, 1.8, n)
    shift, sigma = torch.linspace(-0.4, 0.4, n), torch.linspace(0.1, 2.0, n)
    for fn, params in ((polyview.adjust_colour, (op, factor)), (polyview.adjust_hue, (shift,)),
                       (polyview.gaussian_blur, (5, sigma)), (polyview.luma, ())):
        on_gpu = fn(images.cuda(), *(p.cuda() if torch.is_tensor(p) else p for p in params))
        torch.testing.assert_close(on_gpu.cpu(), fn(images, *params), rtol=0, atol=1e-5, msg=fn.__name__)


@cuda
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16"])
def test_cuda_training_step_in_channels_last_has_a_float32_objective(precision, monkeypatch):
    args = polyview.parse_args(["--arch", "resnet18", "--image-size", "32", "--views", "3", "--device", "cuda",
                                "--precision", precision])
    device = polyview.start_processes(args)
    expected = "bf16" if torch.cuda.get_device_capability() >= (8, 0) else "fp16"
    assert args.precision == (expected if precision == "auto" else precision), args.precision_reason
    seen = []
    monkeypatch.setitem(polyview.LOSSES, args.loss, spy_objective(seen))
    model, _, optimizer, scaler = polyview.build_model(args, 3, device, lr=0.1)
    assert model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert scaler.is_enabled() == (args.precision == "fp16")
    views = torch.randint(0, 256, (4, 3, 3, 32, 32), dtype=torch.uint8)
    stats = step(model, optimizer, scaler, views, torch.tensor([0, 1, 2, 0]), args, device)
    assert seen == [torch.float32] and stats.dtype == torch.float32 and torch.isfinite(stats).all()
    assert not torch.backends.cuda.matmul.allow_tf32  # the objectives' float32 matmuls stay float32


@cuda
def test_cuda_torchrun_with_nccl_syncbn_trains_and_probes(shapes, tmp_path):
    gpus = min(2, torch.cuda.device_count())
    command = tiny_run(shapes, tmp_path, "--views", "3", "--epochs", "1", "--device", "cuda")
    command[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"on {gpus} x cuda" in done.stdout and "fast linear probe" in done.stdout
    assert all(math.isfinite(r.get("loss", 0.0)) for r in records(tmp_path))
    assert json.loads((tmp_path / "probe.json").read_text())["online_val_top1_last_epoch"] is not None


@cuda
def test_cuda_one_epoch_with_compile(shapes, tmp_path):
    done = subprocess.run(tiny_run(shapes, tmp_path, "--views", "3", "--epochs", "1", "--device", "cuda",
                                   "--compile", "--probe-epochs", "0"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert all(math.isfinite(r["loss"]) for r in records(tmp_path) if "loss" in r)


@cuda
def test_cuda_benchmark_prints_throughput_and_memory_per_view():
    done = subprocess.run([sys.executable, str(REPO / "polyview.py"), "--dataset", "fake", "--benchmark", "--arch",
                           "resnet18", "--image-size", "32", "--batch-size", "16", "--views", "4", "--workers", "2"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "views/s" in done.stdout and "peak memory per view" in done.stdout
