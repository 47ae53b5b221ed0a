"""Benchmark the `logreg` probe against scikit-learn at CIFAR-10 scale; prints markdown for
BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_logreg.py                 # 50,000 x 256, median of 3
    .venv/bin/python benchmarks/bench_logreg.py --scale 0.1 --runs 1   # smoke test

The features of bench_probes.py (10 classes of clustered gaussians, 50,000 x 256 train,
10,000 x 256 test, float32), standardised with the train statistics once. At each L2 strength:
`fit_logreg` (full-batch L-BFGS in torch, tol 1e-4 on the largest gradient entry) against
scikit-learn's LogisticRegression(solver="lbfgs", C = 1 / (n_train * l2), tol 1e-4, the same
objective: mean cross entropy + l2/2 |W|²), fitted on the same float32 features. Then the whole
probe as a trial runs it: the L2 strength chosen from 7 log-spaced values on a held-out 10 %,
and the refit on all of train.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from bench_probes import OTHERS, clustered_features, machine, timed
from sklearn.linear_model import LogisticRegression

from ddsweep.config.probesettings import LogregSettings
from ddsweep.probes.common import standardise
from ddsweep.probes.logreg import fit_logreg, logreg_probe, sklearn_c

L2S = (1e-4, 1e-3, 1e-2)


def bench_fits(data: tuple[torch.Tensor, ...], runs: int) -> list[str]:
    train_x, train_y, test_x, test_y = data
    xtr, xte = standardise(train_x, test_x)
    n = len(train_y)
    lines = [
        "| L2 (C) | `fit_logreg` | scikit-learn | speed-up | iterations (ours / sklearn) | "
        "test top1 (ours / sklearn) | predictions differing |",
        "|---|---|---|---|---|---|---|",
    ]
    for l2 in L2S:
        c = sklearn_c(l2, n)
        ours_s, fitted = timed(
            f"fit_logreg {l2:g}", lambda l2=l2: fit_logreg(xtr, train_y, 10, l2), runs
        )
        sk_s, model = timed(
            f"LogisticRegression {l2:g}",
            lambda c=c: LogisticRegression(C=c, max_iter=5000).fit(xtr.numpy(), train_y.numpy()),
            runs,
        )
        ours = fitted.logits(xte).argmax(1).numpy()
        theirs = model.predict(xte.numpy())
        truth = test_y.numpy()
        differ = int((ours != theirs).sum())
        lines.append(
            f"| {l2:g} ({c:.3g}) | {ours_s:.2f} s | {sk_s:.2f} s | {sk_s / ours_s:.1f}x | "
            f"{fitted.iterations} / {int(np.max(model.n_iter_))} | "
            f"{(ours == truth).mean():.4f} / {(theirs == truth).mean():.4f} | "
            f"{differ} of {len(truth):,} |"
        )
    return lines


def bench_digits() -> list[str]:
    """Parity on scikit-learn's digits pixels (64 features): a stratified 75/25 split (seed 0),
    at each L2 strength; then the probe with its defaults against the linear probe."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    from ddsweep.probes import linear_probe

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    tr, te = standardise(torch.tensor(xtr, dtype=torch.float32), torch.tensor(xte))
    scaler = StandardScaler().fit(xtr)
    lines = [
        f"Digits pixels: {len(ytr):,} train, {len(yte)} test, 64 features.",
        "",
        "| L2 (C) | `fit_logreg` test top1 % | scikit-learn test top1 % | predictions differing "
        "| iterations (ours / sklearn) |",
        "|---|---|---|---|---|",
    ]
    for l2 in (*L2S, 1e-1):
        fitted = fit_logreg(tr, torch.tensor(ytr), 10, l2)
        ours = fitted.logits(te).argmax(1).numpy()
        model = LogisticRegression(C=sklearn_c(l2, len(ytr)), max_iter=10_000)
        theirs = model.fit(scaler.transform(xtr), ytr).predict(scaler.transform(xte))
        lines.append(
            f"| {l2:g} ({sklearn_c(l2, len(ytr)):.3g}) | {100 * (ours == yte).mean():.2f} | "
            f"{100 * (theirs == yte).mean():.2f} | {int((ours != theirs).sum())} of {len(yte)} | "
            f"{fitted.iterations} / {int(np.max(model.n_iter_))} |"
        )
    args = (torch.tensor(xtr), torch.tensor(ytr), torch.tensor(xte), torch.tensor(yte))
    got, seed = logreg_probe(*args), linear_probe(*args)
    lines += [
        "",
        f"`logreg_probe` (defaults): test top1 {100 * got['top1']:.2f} %, chosen L2 "
        f"{got['chosen_l2']:g}, train top1 {100 * got['train_top1']:.2f} %, train loss "
        f"{got['train_loss']:.3f}. The seed `linear_probe` (30 epochs, Adam): test top1 "
        f"{100 * seed['top1']:.2f} %, train top1 {100 * seed['train_top1']:.2f} %, train loss "
        f"{seed['train_loss']:.3f}.",
    ]
    return lines


def bench_probe(data: tuple[torch.Tensor, ...], runs: int) -> list[str]:
    s = LogregSettings()
    secs, got = timed("logreg_probe", lambda: logreg_probe(*data, settings=s), runs)
    return [
        f"`logreg_probe` with its defaults (L2 chosen from {s.l2_steps} values {s.l2_min:g} "
        f"... {s.l2_max:g} on a held-out {s.val_fraction:.0%}, then refit on all of train): "
        f"{secs:.2f} s, chosen L2 {got['chosen_l2']:g}, test top1 {got['top1']:.4f}, "
        f"train top1 {got['train_top1']:.4f}, train loss {got['train_loss']:.4f}."
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 50k/10k samples")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--digits-only", action="store_true", help="only the digits parity")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.digits_only:
        print("\n".join(bench_digits()))
        return

    n_train, n_test = int(50_000 * args.scale), int(10_000 * args.scale)
    data = clustered_features(n_train, n_test, dim=256, n_classes=10)
    fit_lines = bench_fits(data, args.runs)
    probe_lines = bench_probe(data, args.runs)

    print(f"Machine: {machine()}.")
    print(f"Data: {n_train:,} x 256 train, {n_test:,} x 256 test, 10 classes, float32.")
    print(f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`, median of {args.runs} runs.")
    worst = ", ".join(f"{label} {cores:.2f}" for label, cores in OTHERS.items())
    print(f"CPU cores used by other processes during the worst timed run: {worst}.")
    if max(OTHERS.values()) > 0.1:
        print("**Warning: other processes were busy; these timings are disturbed.**")
    print()
    print("\n".join(fit_lines))
    print()
    print("\n".join(probe_lines))


if __name__ == "__main__":
    main()
