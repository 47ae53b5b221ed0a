"""The methods card of a study (`methods.md`): what a reviewer needs to recompute every cell,
written from what was run: the splits with their rules, sizes and fingerprints; preprocessing;
each backbone's identity (weights hash, architecture, schedule); where each block's output is
taken and its dimension; pooling, noise, precision and the probe settings; and how intervals,
paired tests and the answer were computed. A fenced JSON block at the end holds the same facts
for a program (tests read it to recompute cells from scratch).

Pure but for reading the local checkpoint copies (their config and weights hash), when present.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import data, selection
from ddsweep.config.points import AXES
from ddsweep.model import PIXELS, block_path
from ddsweep.report import rows as rd
from ddsweep.report import stats
from ddsweep.report.tables import Facet

if TYPE_CHECKING:
    import pandas as pd

METHODS_MD = "methods.md"
JSON_FENCE = "```json"
SplitInput = tuple[str, str, str, int]  # (dataset, split, fingerprint, size)
# Shared settings read from rows without `params.` columns (plain rows, as in tests).
SHARED = (
    "pool", "weights", "noise_seed", "noise_seeds", "noise_draws", "seed", "val_fraction",
    "flowers_add_val",
)  # fmt: skip


def _preprocessing(dataset: str, resolution: int) -> dict[str, Any]:
    """How the images of `dataset` reach the network, as `ddsweep.data` does it."""
    if dataset == "digits":
        return {
            "source": "sklearn.datasets.load_digits (1,797 grey 8x8 images, values 0..16)",
            "scale": "x / 8 - 1 (to [-1, 1])",
            "channels": "grey repeated to 3 channels (RGB)",
            "resize": (
                f"torch.nn.functional.interpolate to {resolution}x{resolution}, mode='bilinear', "
                "align_corners=False, antialias=False"
            ),
            "test_split": (
                f"sklearn train_test_split of the indices 0..1796, test_size={data.DIGITS_TEST_SIZE}, "
                f"stratify=labels, random_state={data.DIGITS_SEED}; train is the rest, both in "
                "the order train_test_split returns"
            ),
        }
    return {
        "source": f"torchvision's {dataset} (its own train and test splits)",
        "pipeline": (
            f"RGB, Resize({resolution}) of the short side (bilinear, antialias), "
            f"CenterCrop({resolution}), ToDtype(float32, scale=True), Normalize(0.5, 0.5) "
            "(to [-1, 1])"
        ),
    }


def _validation(values: Mapping[str, str], dataset: str) -> str:
    if data.has_own_val(dataset) and values.get("flowers_add_val") != "True":
        return "the dataset's own validation split"
    fraction = values.get("val_fraction", "0.1")
    if float(fraction) <= 0:
        return "none (val_fraction 0): choices are made on test"
    return (
        f"carved from train: sklearn train_test_split of train's indices 0..N-1, "
        f"test_size={fraction}, random_state={values.get('seed', '0')}, stratified by label "
        "when every class has at least 2 images and the held-out part at least one per class; "
        "both index lists sorted; the validation probe is fitted on the rest of train and "
        "scored on the held-out part"
    )


def _backbone(run_epoch: str, weights: str) -> dict[str, Any]:
    """Identity of one backbone checkpoint RUNID@EPOCH from its local copy, when present."""
    from ddsweep import checkpoints, evaluate

    run_id, _, epoch = run_epoch.partition("@")
    out: dict[str, Any] = {"run": run_id, "epoch": int(epoch) if epoch.isdigit() else epoch}
    if not epoch.isdigit():
        return out
    folder = evaluate.checkpoint_store() / run_id / f"epoch_{int(epoch):04d}"
    out["folder"] = str(folder.resolve())
    try:
        cfg = json.loads((folder / "config.json").read_text())
        out["weights_sha256_16"] = checkpoints.content_hash(folder, weights)  # type: ignore[arg-type]
    except (OSError, ValueError):
        out["weights_sha256_16"] = None  # no local copy: `ddsweep study probe-grid` fetches it
        return out
    keys = ("sample_size", "block_out_channels", "layers_per_block", "down_block_types")
    out["architecture"] = {k: cfg.get(k) for k in (*keys, "up_block_types", "_class_name")}
    return out


def _trial_values(trials: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [rd.bare(r) for r in rd.records(trials) if rd.kept(rd.bare(r), "trial")]


def _shared(trials: pd.DataFrame | Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """The shared probe settings of the first trial: its params that are neither an axis nor a
    probe kind's own (`kind.setting`), e.g. pool, weights, noise_seed, seed, val_fraction."""
    for raw in rd.records(trials):
        params = {k[len("params.") :]: v for k, v in raw.items() if str(k).startswith("params.")}
        if not params:
            params = {k: v for k, v in raw.items() if k in SHARED}  # plain rows
        skip = {*AXES, "backbone", "protocol", "settings"}
        return {
            k: str(t)
            for k, v in sorted(params.items())
            if k not in skip and "." not in k and (t := rd.text(v)) is not None
        }
    return {}


def card_facts(
    facets: Sequence[Facet],
    trials: pd.DataFrame | Iterable[Mapping[str, Any]],
    inputs: Iterable[SplitInput] = (),
) -> dict[str, Any]:
    """The facts of the card as plain values (the card's JSON block)."""
    rows = _trial_values(trials)
    first = rows[0] if rows else {}
    shared = _shared(trials)
    kinds = sorted({str(r.get("probe")) for r in rows})
    probe_settings = {
        k: {
            n.split(".", 1)[1]: rd.text(v)
            for n, v in sorted(first.items())
            if isinstance(n, str) and n.startswith(f"{k}.")
        }
        for k in kinds
    }
    splits = sorted({(d, s, fp, n) for d, s, fp, n in inputs})
    datasets = sorted({(f.key.dataset, f.key.resolution) for f in facets})
    blocks: dict[str, dict[str, Any]] = {}
    for r in rows:
        block = str(r.get("block"))
        dim = rd.number(r.get("feature_dim"))
        entry = blocks.setdefault(block, {"module": _where(block), "dims": set()})
        if dim is not None:
            entry["dims"].add(int(dim))
    weights = shared.get("weights", "ema")
    backbones = sorted(
        {b for r in rows if (b := rd.text(r.get("backbone"))) and b != "none"},
        key=lambda b: (b.partition("@")[0], int(b.partition("@")[2] or 0)),
    )
    return {
        "datasets": [
            {
                "dataset": d,
                "resolution": res,
                "preprocessing": _preprocessing(d, res),
                "validation": _validation(shared, d),
            }
            for d, res in datasets
        ],
        "splits": [
            {"dataset": d, "split": s, "fingerprint": fp, "size": n} for d, s, fp, n in splits
        ],
        "backbones": [_backbone(b, weights) for b in backbones],
        "schedule": (
            "diffusers DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, "
            "beta_schedule='linear', prediction_type='epsilon'); x_t = add_noise(x0, noise, t) "
            "(q_sample), the network called with timestep t; t = 0 is the clean image"
        ),
        "noise": (
            "image i of a split gets Gaussian noise from the SplitMix64 stream of the seed "
            "sha256(split fingerprint, noise_seed, draw, i) through Box-Muller (ddsweep.features."
            "noise_for, scheme split-index-draw-splitmix-v3); features averaged over noise_draws "
            "draws at t > 0; with noise_seeds, each t > 0 cell is the mean over one such "
            "realisation per seed"
        ),
        "blocks": {
            b: {"module": e["module"], "dims": sorted(e["dims"])} for b, e in sorted(blocks.items())
        },
        "hook": (
            "a forward hook on the block's module; a down block's output is output[0] (after its "
            "downsampler), an up block's output is after its upsampler; a module called more than "
            "once in a pass gives its first call's output"
        ),
        "pool": shared.get("pool", "avg"),
        "pool_rule": (
            "avg: mean over H and W (C dims); flatten: C*H*W; avgN: adaptive average to NxN, then "
            "flatten; pixels with avg are flattened (3*R*R values)"
        ),
        "precision": (
            "the network in float32 on CPU, bfloat16 autocast on CUDA; the feature cache keeps "
            "the float32 features as extracted; k-NN neighbours and votes are those of float64 "
            "arithmetic (float32 candidates, exact float64 re-rank); linear probes compute in "
            "float32"
        ),
        "shared_settings": shared,
        "probe_settings": probe_settings,
        "intervals": (
            f"percentile bootstrap of test top1, {stats.RESAMPLES} resamples, seed {stats.SEED}, "
            f"{round(100 * stats.LEVEL)} % (resampled hit counts drawn as Binomial(N, accuracy)); "
            f"cells over several noise realisations: {stats.REALISATIONS_METHOD}"
        ),
        "paired_test": (
            "exact two-sided McNemar test on the same test examples (binomial test of the "
            f"discordant pairs against 1/2), significant when p < {stats.ALPHA}"
        ),
        "selection": selection.RULE,
    }


def _where(block: str) -> str:
    if block == PIXELS:
        return "the input image itself (noised to t when t > 0)"
    return block_path(block) or block


def methods_card(
    study: str,
    facets: Sequence[Facet],
    trials: pd.DataFrame | Iterable[Mapping[str, Any]],
    inputs: Iterable[SplitInput] = (),
) -> str:
    """The methods card of `study` as Markdown (see the module's docstring)."""
    facts = card_facts(facets, trials, inputs)
    out = [f"# Methods: study {study}", "", "Written from the study's recorded trials.", ""]
    out += ["## Data", ""]
    for d in facts["datasets"]:
        out.append(f"### {d['dataset']} at {d['resolution']} px")
        out += [f"- {k}: {v}" for k, v in d["preprocessing"].items()]
        out += [f"- validation: {d['validation']}", ""]
    if facts["splits"]:
        out += ["| dataset | split | fingerprint | images |", "|---|---|---|---:|"]
        out += [
            f"| {s['dataset']} | {s['split']} | `{s['fingerprint']}` | {s['size']} |"
            for s in facts["splits"]
        ]
        out.append("")
    out += ["## Backbones", ""]
    for b in facts["backbones"]:
        arch = b.get("architecture")
        what = "; ".join(f"{k}={v}" for k, v in arch.items()) if arch else "no local copy"
        out.append(
            f"- training run {b['run']}, epoch {b['epoch']}: weights SHA-256 (16 hex) "
            f"{b.get('weights_sha256_16') or 'unknown'} ({facts['shared_settings'].get('weights', 'ema')}); {what}"
        )
    out += ["", f"Schedule: {facts['schedule']}.", "", f"Noise: {facts['noise']}.", ""]
    out += ["## Features", "", f"Where: {facts['hook']}.", ""]
    out += ["| block | module | dims after pooling |", "|---|---|---|"]
    out += [
        f"| {b} | `{e['module']}` | {', '.join(map(str, e['dims']))} |"
        for b, e in facts["blocks"].items()
    ]
    out += [
        "",
        f"Pooling: {facts['pool']} ({facts['pool_rule']}).",
        f"Precision: {facts['precision']}.",
        "",
    ]
    out += ["## Probes", ""]
    out += ["- shared: " + ", ".join(f"{k}={v}" for k, v in facts["shared_settings"].items())]
    for kind, values in facts["probe_settings"].items():
        out.append(f"- {kind}: " + ", ".join(f"{k}={v}" for k, v in values.items()))
    out += ["", "## Statistics and the answer", ""]
    out += [f"- intervals: {facts['intervals']}", f"- paired test: {facts['paired_test']}"]
    out += [f"- the answer: {facts['selection']}", ""]
    out += ["## Machine-readable", "", JSON_FENCE, json.dumps(facts, indent=1), "```", ""]
    return "\n".join(out)


def read_facts(card: str) -> dict[str, Any]:
    """The JSON block of a card written by `methods_card`."""
    start = card.index(JSON_FENCE) + len(JSON_FENCE)
    return dict(json.loads(card[start : card.index("```", start)]))


def write_card(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
