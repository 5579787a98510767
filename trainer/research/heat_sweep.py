"""heat_sweep.py DUMP.safetensors [--table | --last-layer]: mIoU of heatmap → mask policies on tune_probe's dump.

A research tool for the heatmap defaults (docs/shapes-model-journal.md), not part of the product:
  "$(scripts/venv.sh)/bin/python" trainer/research/heat_sweep.py tune.safetensors --last-layer

Each entry holds fast Grad-SAM maps [T, L, C, h, w] of one render's shape word (T = the
timesteps in tune_probe's TIMESTEPS, L = cross-attention layers) and the judge's 64×64 mask
of the object. A policy picks timesteps, layers, how channels are combined, how the map is
brought to pixels and where it is thresholded. Run on the tuning set, never on eval_tiny's
prompts, so that the chosen policy can then be scored on held-out prompts. Without a flag:
the best of all policies; --table: the grid a reader can check by eye; --last-layer: the
policies for the last layer alone (where fast = exact), as with `tune_probe --dump-layers
last`, which dumps only that layer. Run it with the project venv's python (torch,
safetensors).
"""

import itertools
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TIMESTEPS = [900, 700, 500, 300, 100, 50]


def gaussian_blur(x, kernel=3, sigma=6.0):
    r = kernel // 2
    w = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=torch.float32) / sigma) ** 2)
    w = w / w.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, w.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, w.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def engine_mask(maps):
    """The engine's manipulation mask (mask.rs defaults), nearest-upsampled to pixels."""
    y = F.max_pool2d(gaussian_blur(maps), 3, 1, 1)
    mean = y.mean(dim=(2, 3), keepdim=True)
    std = y.std(dim=(2, 3), keepdim=True)
    m = (y > mean + 0.5 * std).any(dim=1, keepdim=True).float()
    return F.interpolate(m, size=(64, 64), mode="nearest")[0, 0] > 0.5


def heat(maps, channels):
    """[1, C, h, w] → [1, 1, h, w] non-negative heat."""
    if channels == "sum":
        return maps.sum(dim=1, keepdim=True).relu()
    if channels == "abs":
        return maps.abs().sum(dim=1, keepdim=True)
    return maps.relu().sum(dim=1, keepdim=True)  # "relu-sum"


def otsu(values, bins=64):
    """Otsu's threshold of a 1-D tensor: the cut that maximises the between-class variance."""
    lo, hi = values.min().item(), values.max().item()
    if hi <= lo:
        return hi
    hist = torch.histc(values, bins=bins, min=lo, max=hi).double()
    centres = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    centres = (centres[:-1] + centres[1:]) / 2
    w0 = hist.cumsum(0)
    m0 = (hist * centres).cumsum(0)
    total, mean_all = w0[-1], m0[-1]
    w1 = total - w0
    between = (mean_all * w0 - total * m0) ** 2 / (w0 * w1).clamp_min(1e-12)
    return centres[between[:-1].argmax()].item()


def to_mask(h, upsample, threshold, blur):
    if blur:
        h = gaussian_blur(h)
    h = F.interpolate(h, size=(64, 64), mode=upsample, **({} if upsample == "nearest" else {"align_corners": False}))
    kind, v = threshold
    if kind == "tau":
        return h[0, 0] >= v * h.max().clamp_min(1e-12)
    if kind == "otsu":
        return h[0, 0] > otsu(h.flatten()) + v * h.std()
    mean, std = h.mean(), h.std()
    return h[0, 0] > mean + v * std


def iou(a, b):
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def main():
    torch.set_num_threads(1)
    d = load_file(sys.argv[1])
    ids = sorted(int(k.split("_")[1]) for k in d if k.startswith("maps_"))
    entries = [(d[f"maps_{i}"], d[f"truth_{i}"] > 127) for i in ids]
    n_layers = entries[0][0].shape[1]
    truth_share = sum(t.float().mean().item() for _, t in entries) / len(entries)
    print(f"{len(entries)} renders, {n_layers} layers; truth covers {truth_share:.3f} of the image on average")

    t500 = TIMESTEPS.index(500)
    base = sum(iou(engine_mask(m[t500, -1:].sum(0, keepdim=True)), t) for m, t in entries) / len(entries)
    print(f"engine mask, t 500, last layer (eval_tiny's measure): mIoU {base:.3f}")

    layer_sets = {"last": [n_layers - 1], "all": list(range(n_layers))}
    layer_sets.update({f"L{layer}": [layer] for layer in range(n_layers)})
    time_sets = {f"t{t}": [k] for k, t in enumerate(TIMESTEPS)}
    time_sets["t500+300"] = [TIMESTEPS.index(500), TIMESTEPS.index(300)]
    time_sets["all-t"] = list(range(len(TIMESTEPS)))
    thresholds = [("tau", v) for v in (0.2, 0.3, 0.4, 0.5, 0.6)] + [("std", v) for v in (0.0, 0.5, 1.0, 1.5)]
    results = []
    for (tn, ts), (ln, ls), ch, up, blur in itertools.product(
        time_sets.items(), layer_sets.items(), ("sum", "relu-sum", "abs"), ("nearest", "bilinear"), (False, True)
    ):
        hs = []
        for m, t in entries:
            x = m[ts][:, ls].sum(dim=(0, 1)).unsqueeze(0)  # [1, C, h, w]
            hs.append((heat(x, ch), t))
        for th in thresholds:
            score = sum(iou(to_mask(h, up, th, blur), t) for h, t in hs) / len(hs)
            results.append((score, tn, ln, ch, up, blur, th))
    results.sort(key=lambda r: -r[0])
    print("best 15 policies (mIoU, timesteps, layers, channels, upsampling, blur, threshold):")
    for r in results[:15]:
        print(f"  {r[0]:.3f}  {r[1]:9s} {r[2]:5s} {r[3]:8s} {r[4]:8s} blur={r[5]!s:5s} {r[6][0]} {r[6][1]}")
    for name, pick in [
        (
            "t500 last sum bilinear tau0.4 (DAAM, as eval_tiny)",
            lambda r: r[1:] == ("t500", "last", "sum", "bilinear", False, ("tau", 0.4)),
        ),
    ]:
        print(name, [f"{r[0]:.3f}" for r in results if pick(r)])


def table(path):
    """The policies a reader can check by eye: bilinear, no blur, per timestep × layers × threshold."""
    torch.set_num_threads(1)
    d = load_file(path)
    ids = sorted(int(k.split("_")[1]) for k in d if k.startswith("maps_"))
    entries = [(d[f"maps_{i}"], d[f"truth_{i}"] > 127) for i in ids]
    n_layers = entries[0][0].shape[1]
    ths = [("std", -0.5), ("std", 0.0), ("std", 0.5), ("std", 1.0), ("tau", 0.2), ("tau", 0.3), ("tau", 0.4)]
    for up in ("nearest", "bilinear"):
        print(f"upsampling {up}, no blur; columns: " + " ".join(f"{k}{v:+.1f}" for k, v in ths))
        for k, t in enumerate(TIMESTEPS):
            for ln, ls in [("last", [n_layers - 1]), ("L5", [5]), ("L4", [4]), ("all", list(range(n_layers)))]:
                hs = [(heat(m[k][ls].sum(0, keepdim=True), "sum"), tr) for m, tr in entries]
                row = [sum(iou(to_mask(h, up, th, False), tr) for h, tr in hs) / len(hs) for th in ths]
                print(f"  t{t:<4} {ln:5s} " + " ".join(f"{v:8.3f}" for v in row))


def last_layer(path):
    """Policies the engine can stream in both modes: the last layer alone (fast = exact there),
    one map per timestep or the mean of two; channels, upsampling and threshold swept."""
    torch.set_num_threads(1)
    d = load_file(path)
    ids = sorted(int(k.split("_")[1]) for k in d if k.startswith("maps_"))
    entries = [(d[f"maps_{i}"], d[f"truth_{i}"] > 127) for i in ids]
    ths = [("std", v) for v in (0.5, 0.75, 1.0, 1.25, 1.5)] + [("tau", v) for v in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)]
    ths += [("otsu", v) for v in (-0.25, 0.0, 0.25)]
    t = {v: k for k, v in enumerate(TIMESTEPS)}
    results = []
    for (tn, ts), ch, up, blur in itertools.product(
        {
            "t50": [t[50]],
            "t100": [t[100]],
            "t300": [t[300]],
            "t50+100": [t[50], t[100]],
            "t100+300": [t[100], t[300]],
        }.items(),
        ("sum", "relu-sum", "abs"),
        ("bilinear", "bicubic"),
        (False, True),
    ):
        hs = [(heat(m[ts][:, -1].sum(0, keepdim=True), ch), tr) for m, tr in entries]
        for th in ths:
            ious = [iou(to_mask(h, up, th, blur), tr) for h, tr in hs]
            results.append((sum(ious) / len(ious), tn, ch, up, blur, th))
    results.sort(key=lambda r: -r[0])
    print(f"{len(entries)} renders; last layer; best 25 (mIoU, timesteps, channels, upsampling, blur, threshold):")
    for r in results[:25]:
        print(f"  {r[0]:.3f}  {r[1]:9s} {r[2]:8s} {r[3]:8s} blur={r[4]!s:5s} {r[5][0]} {r[5][1]}")
    for label, policy in [
        ("shipped, mask::pixel_masks (t100 bicubic, ≥ 0.15 × max)", ("t100", "sum", "bicubic", False, ("tau", 0.15))),
        ("before the eighth session (t100 bilinear, mean + 1.0·std)", ("t100", "sum", "bilinear", False, ("std", 1.0))),
    ]:
        print(f"{label}: {next(r[0] for r in results if r[1:] == policy):.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--table":
        table(sys.argv[1])
    elif len(sys.argv) == 3 and sys.argv[2] == "--last-layer":
        last_layer(sys.argv[1])
    else:
        main()
