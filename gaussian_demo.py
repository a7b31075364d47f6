"""The synthetic Gaussian experiment (Figure 2 of Shidani et al., ICLR 2024), on a laptop CPU.

Every view of a sample is the same Gaussian signal plus its own noise, so the true One-vs-Rest
mutual information I(x_a; X_{-a}) has a closed form and we can watch how close each objective's
lower bound log C - L gets to it as the multiplicity M grows:

    python gaussian_demo.py --out figures          # regime A: 1-2 min on 2 cores, 3 seeds

writes figures/gaussian_mi.csv (one row per objective, M, seed) and figures/gaussian_mi.png.
In this regime (A) the PVC and SuffStats gaps are smaller at M = 10 than at M = 2, while
Multi-Crop's grows (its estimate can never exceed log(2K - 1)) and SupCon's grows most, its loss
holding the other positives in every denominator. In regime B the truth climbs as fast as the
poly-view ceiling log(M(K-1) + 1) itself (it touches it at M = 4), so a bound, which stays under
log C by its loss, falls behind unless its loss drops fast; only SuffStats' gap shrinks there:

    python gaussian_demo.py --dim 4 --noise 0.05 --batch-size 64 --steps 600

Five objectives are compared: Multi-Crop, Geometric and Arithmetic PVC, SuffStats and SupCon.
SimCLR is the M = 2 point of every curve: there all five objectives are its NT-Xent. DCL gets no
curve: its positive is not in its own denominator, so the InfoNCE argument gives it no MI bound.
"""
import argparse
import math
import multiprocessing
import os
import time
from functools import partial
from pathlib import Path

import matplotlib
matplotlib.use("Agg")                   # no display needed: we only write a PNG
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.func import vmap  # noqa: E402

from polyview import LOSSES  # noqa: E402

DIM = 2             # low dimension: the MI is large per dim, so it soon exceeds log(2K - 1)
SIGNAL = 1.0        # variance s of the shared content c; only s / n matters
NOISE = 0.01        # variance n of each view's own noise: s/n = 100 makes views very informative
BATCH_SIZE = 32     # K: small, so the Multi-Crop ceiling log(2K - 1) = 4.14 nats is within reach
STEPS = 1000        # enough for the losses to flatten at this K (the mean of the last 100 is kept)
LR = 1e-3           # Adam's default: stable for every objective and M on this tiny MLP
TEMPERATURE = 0.1   # SimCLR's usual value
VIEWS = (2, 4, 8, 10)
OBJECTIVES = ("multicrop", "geometric", "arithmetic", "suffstats", "supcon")


def true_mi(dim, signal, noise, views):
    """True One-vs-Rest MI in nats for c ~ N(0, s I_d), x_a = c + e_a, e_a ~ N(0, n I_d):

        I(x_a; X_{-a}) = d/2 * log( (s + n)(n + (M - 1)s) / (n (n + M s)) ),

    which rises with M towards d/2 log(1 + s/n) (the rest-set then reveals c exactly).
    """
    s, n, M = signal, noise, views
    return dim / 2 * math.log((s + n) * (n + (M - 1) * s) / (n * (n + M * s)))


def mi_bound(objective, loss, batch_size, views):
    """The MI lower bound log C - L, with C the number of candidates in each softmax.

    Multi-Crop's pair terms see only views a and b of the K samples: C = 2K - 1 whatever M is, so
    its estimate can never exceed log(2K - 1). The poly-view objectives contrast each positive with
    all views of the other samples: C = M(K - 1) + 1, a ceiling that rises with M.

    SupCon uses the same C: its extra denominator terms are the anchor's other M - 2 positives,
    which are not draws from the marginal, so they are not candidates. Removing them from each
    denominator gives Geometric PVC's loss, smaller term by term, so
    log(M(K-1)+1) - L_supcon <= log(M(K-1)+1) - L_geometric <= I: valid, but looser.
    """
    if objective in ("simclr", "multicrop"):
        candidates = 2 * batch_size - 1
    else:
        candidates = views * (batch_size - 1) + 1
    return math.log(candidates) - loss


def sample_views(batch_size, views, args, generator):
    """K unique samples c, M noisy views of each: returns [K, M, d]."""
    content = math.sqrt(args.signal) * torch.randn(batch_size, 1, args.dim, generator=generator)
    noise = math.sqrt(args.noise) * torch.randn(batch_size, views, args.dim, generator=generator)
    return content + noise              # [K, 1, d] + [K, M, d] -> [K, M, d]


def make_encoder(dim, seed):
    """The encoder, an MLP d -> 256 -> 256 -> 64 applied to each view; seed fixes its weights."""
    torch.manual_seed(seed)             # same initial encoder for every objective and M
    return nn.Sequential(nn.Linear(dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 64))


def make_optimizer(parameters):
    """Adam; fused: one pass over each weight tensor instead of a dozen (3x faster here)."""
    return torch.optim.Adam(parameters, lr=LR, fused=True)


class Ensemble(nn.Module):
    """E encoders side by side, each with its own weights: layer l of member e computes

        h[e] <- h[e] @ W_l[e] + b_l[e],        W_l [E, in, out],  b_l [E, 1, out],

    for all members in one batched product (torch.baddbmm) instead of E small ones. Member e starts
    from the weights of encoders[e] and encodes x[e].
    """

    def __init__(self, encoders):
        super().__init__()
        layers = [[m for m in encoder if isinstance(m, nn.Linear)] for encoder in encoders]
        weights, biases = [], []
        for i in range(len(layers[0])):                 # layer i of every member
            weights.append(torch.stack([member[i].weight.detach().T for member in layers]))
            biases.append(torch.stack([member[i].bias.detach()[None] for member in layers]))
        self.weights = nn.ParameterList(weights)        # W_l [E, in, out]: nn.Linear keeps W^T
        self.biases = nn.ParameterList(biases)          # b_l [E, 1, out]

    def forward(self, x):               # x [E, ..., d] -> [E, ..., 64]
        h = x.flatten(1, -2)            # [E, N, d]: N inputs to each member
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.weights) - 1:
                h = h.relu_()           # in place: one big tensor fewer
        return h.view(*x.shape[:-1], -1)


def run(objectives, views, seeds, args):
    """Train one encoder per (objective, seed) at multiplicity M; returns the losses [objectives,
    seeds, steps].

    A lone encoder's step is a few dozen small ops, mostly Python and dispatch overhead at M = 2,
    so each objective trains its seeds' encoders side by side, as one Ensemble. That is exact, not
    an approximation: member (objective, seed) starts from seed's encoder and sees seed's batches,
    as it would alone; the members share no weights, so the gradient of the summed loss with
    respect to a member's weights is its own loss's gradient; and Adam works element by element,
    so one Adam over the stacked weights is one Adam per member. What is left is arithmetic: at
    M = 10 the MLP's products and the objectives' [KM, KM] similarities, about half each, and the
    memory traffic of their passes, which two processes share (see run_all).
    """
    encoders = nn.ModuleList(Ensemble([make_encoder(args.dim, seed) for seed in seeds])
                             for _ in objectives).to(args.device)
    optimizer = make_optimizer(encoders.parameters())
    # generators[s] draws seed s's batches, as it would alone
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    # vmap(f)(z) is f(z[s]) for each seed s, stacked: one call of an objective for all its members.
    loss_fns = [vmap(partial(LOSSES[o], temperature=TEMPERATURE)) for o in objectives]
    losses = torch.zeros(args.steps, len(objectives), len(seeds))
    for step in range(args.steps):
        x = torch.stack([sample_views(args.batch_size, views, args, g) for g in generators])
        x = x.to(args.device)           # [S, K, M, d]: x[s] is seed s's batch, for every objective
        per_objective = [loss_fn(encoder(x)) for encoder, loss_fn in zip(encoders, loss_fns)]
        loss = torch.stack(per_objective)                                  # [O, S]
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
        losses[step] = loss.detach()
    return losses.permute(1, 2, 0).double().numpy()


def run_views(views, args):
    """Every (objective, seed) run at one M.

    Returns (M, losses [objectives, seeds, steps], seconds). At M = 2 the five objectives are
    one function, SimCLR's NT-Xent (test_polyview.py checks it), and each seed gives them the
    same encoder and batches: we train it once and report it five times.
    """
    torch.set_num_threads(1)            # in a worker process too: see main
    tic = time.time()
    if views == 2:
        losses = run(("simclr",), views, range(args.seeds), args).repeat(len(OBJECTIVES), axis=0)
    else:
        losses = run(OBJECTIVES, views, range(args.seeds), args)
    return views, losses, time.time() - tic


def run_all(args):
    """Yields run_views' result for every M as it finishes.

    The M's are independent experiments, so on the CPU a pool of one process per core takes them,
    the largest first, so that two cores finish together (10 + 2 and 8 + 4 views). The two share
    the memory bandwidth, which the objectives' passes over [KM, KM] need: measured on 2 cores,
    the pool is 1.2-1.5x faster than one process, not 2x. Other devices run the M's here, one after
    another (a forked process could not use CUDA).
    """
    views = sorted(args.views, reverse=True)
    if torch.device(args.device).type != "cpu":
        yield from (run_views(M, args) for M in views)
        return
    # Leaving the block, on Ctrl-C too, terminates the workers.
    with multiprocessing.Pool(min(len(views), os.cpu_count() or 1)) as pool:
        yield from pool.imap_unordered(partial(run_views, args=args), views)


def band(ax, x, values, color, label=None):
    """Mean over seeds (axis 0) as a line, one standard deviation as a shaded band."""
    mean, std = values.mean(axis=0), values.std(axis=0)
    ax.plot(x, mean, "o-" if len(x) < 20 else "-", color=color, label=label, lw=1.5, ms=4)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25, lw=0)


def plot(results, curves, args, path):
    """Four panels against M: MI and ceilings, gap, relative MI, and the loss curves at max M."""
    views, K = args.views, args.batch_size
    truth = np.array([true_mi(args.dim, args.signal, args.noise, M) for M in views])
    colors = dict(zip(OBJECTIVES, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    axes = axes.ravel()
    axes[0].plot(views, truth, "k-", lw=2.5, label="true MI")
    axes[0].plot(views, [math.log(2 * K - 1)] * len(views), "k--", lw=1, label="log(2K-1)")
    axes[0].plot(views, [math.log(M * (K - 1) + 1) for M in views], "k:", lw=1.5,
                 label="log(M(K-1)+1)")
    for objective in OBJECTIVES:
        bounds = results[objective]                                           # [seeds, len(views)]
        band(axes[0], views, bounds, colors[objective])
        band(axes[1], views, truth - bounds, colors[objective], label=objective)
        band(axes[2], views, bounds / truth, colors[objective])
        window = max(1, args.steps // 20)
        kernel = np.ones(window) / window                                     # moving average
        smooth = np.array([np.convolve(c, kernel, "valid") for c in curves[objective]])
        band(axes[3], np.arange(window, args.steps + 1), smooth, colors[objective])
    axes[0].legend(loc="upper left", fontsize=8)
    titles = ("true MI, ceilings and bounds log C - L", "gap = true MI - bound",
              "relative MI = bound / true MI", f"training loss at M = {views[-1]} (smoothed)")
    ylabels = ("nats", "gap (nats)", "bound / true MI", "loss (nats)")
    for ax, title, ylabel in zip(axes, titles, ylabels):
        ax.set(title=title, xlabel="views M", ylabel=ylabel, xticks=views)
        ax.grid(alpha=0.3)
    axes[3].set(xlabel="step", xticks=np.linspace(0, args.steps, 5).astype(int))
    fig.legend(*axes[1].get_legend_handles_labels(), loc="upper center", ncol=5, frameon=False)
    fig.suptitle(f"d={args.dim}, s={args.signal}, n={args.noise}, K={K}, {args.steps} steps, "
                 f"{args.seeds} seed(s): mean and one std", y=0.02, va="bottom", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."), help="folder for the CSV and PNG")
    parser.add_argument("--views", type=int, nargs="+", default=list(VIEWS),
                        help="the grid of multiplicities M, views per sample")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per (objective, M)")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="K, unique samples per step")
    parser.add_argument("--dim", type=int, default=DIM, help="d, dimension of the data")
    parser.add_argument("--signal", type=float, default=SIGNAL,
                        help="variance s of the shared content")
    parser.add_argument("--noise", type=float, default=NOISE,
                        help="variance n of each view's noise")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    if min(args.views) < 2:
        parser.error(f"every M in --views must be >= 2, got {args.views}")
    for name, low in (("batch_size", 2), ("steps", 1), ("seeds", 1), ("dim", 1)):
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("signal", "noise"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):
            parser.error(f"--{name} must be finite and > 0, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device} asked for, but CUDA is not available")
    args.views = sorted(set(args.views))
    args.out.mkdir(parents=True, exist_ok=True)
    # One thread per process, one process per core (run_all). Measured, a step of the 15
    # encoders at M = 10: two threads take 61 ms instead of 84 on an idle machine, where a
    # second process does another M in those 84 ms; and when another process holds a core,
    # two OpenMP threads wait on each other at every op: 0.24-0.66 s instead of 0.09 s
    # (200 steps of one encoder: 95 s vs 1.3 s).
    torch.set_num_threads(1)

    start = time.time()
    tails = {}                          # M -> final losses [objectives, seeds]
    curves = {}                         # the loss curves at the largest M
    for M, losses, seconds in run_all(args):                   # losses [objectives, seeds, steps]
        tails[M] = losses[..., -100:].mean(axis=-1)             # the tail mean smooths batch noise
        if M == args.views[-1]:
            curves = dict(zip(OBJECTIVES, losses))              # [seeds, steps] each
        truth = true_mi(args.dim, args.signal, args.noise, M)
        for objective, loss in zip(OBJECTIVES, tails[M]):
            bounds = mi_bound(objective, loss, args.batch_size, M)                 # [seeds]
            mean, std = bounds.mean(), bounds.std()
            print(f"{objective} M={M}: bound {mean:.2f} +- {std:.2f}, true {truth:.2f}, "
                  f"gap {truth - mean:.2f} nats ({seconds:.1f} s)", flush=True)

    rows = ["objective,M,seed,K,true_mi,bound,loss"]
    results = {}                        # bounds [seeds, len(views)]
    for o, objective in enumerate(OBJECTIVES):
        results[objective] = np.zeros((args.seeds, len(args.views)))
        for col, M in enumerate(args.views):
            truth = true_mi(args.dim, args.signal, args.noise, M)
            for seed, loss in enumerate(tails[M][o]):
                bound = mi_bound(objective, loss, args.batch_size, M)
                results[objective][seed, col] = bound
                rows.append(f"{objective},{M},{seed},{args.batch_size},"
                            f"{truth:.6f},{bound:.6f},{loss:.6f}")
    (args.out / "gaussian_mi.csv").write_text("\n".join(rows) + "\n")
    plot(results, curves, args, args.out / "gaussian_mi.png")
    truths = [true_mi(args.dim, args.signal, args.noise, M) for M in args.views]
    print(f"\nmean bound / gap in nats over {args.seeds} seed(s), K={args.batch_size}")
    print(f"{'M':>12}" + "".join(f"{M:>14}" for M in args.views))
    print(f"{'true MI':>12}" + "".join(f"{t:>14.2f}" for t in truths))
    for objective in OBJECTIVES:
        means = results[objective].mean(axis=0)
        cells = "".join(f"{b:>7.2f} /{t - b:>5.2f}" for b, t in zip(means, truths))
        print(f"{objective:>12}" + cells)
    print(f"wrote {args.out / 'gaussian_mi.csv'} and {args.out / 'gaussian_mi.png'} "
          f"in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
