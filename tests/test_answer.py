"""One answer everywhere, and a methods card that recomputes cells: a tiny digits study run
for real (real Optuna journal, real MLflow sqlite store, a real diffusers U-Net trained one
step), then the four places that state its answer read and compared, and three cells
recomputed from scratch with scikit-learn and diffusers hooks from what `methods.md` says.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from mlflow.tracking import MlflowClient
from test_study import Backbone, backbone, cli, inside, make_home  # noqa: F401 (fixture)

from ddsweep import report, scheduler, selection
from ddsweep.report import answer as answer_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")

STUDY = "tiny"  # make_home writes sweeps/tiny.yaml: pixels, mid, up4 x linear, knn (k=5)


@dataclass(frozen=True)
class Ran:
    folder: Path
    grid_output: str
    report_output: str


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory, backbone: Backbone) -> Ran:  # noqa: F811
    folder = make_home(tmp_path_factory.mktemp("answer"), backbone)
    with inside(folder):
        grid = cli("study", "probe-grid", "--study", STUDY)
        assert grid.exit_code == 0, grid.output
        shown = cli("report", "--study", STUDY)
        assert shown.exit_code == 0, shown.output
    return Ran(folder, grid.stdout, shown.stdout)


def _parent() -> Any:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(
        exps, f"tags.`ddsweep.kind` = 'study' and tags.`ddsweep.study` = '{STUDY}'"
    )
    return parent


def _summary_row(folder: Path, title_probe: str) -> dict[str, str]:
    with (folder / "reports" / STUDY / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    (row,) = [r for r in rows if r["probe"] == title_probe and r["noise_step"] == "0"]
    return row


@pytest.mark.slow
def test_the_terminal_report_parent_run_and_optuna_give_one_answer(ran: Ran) -> None:
    with inside(ran.folder):
        parent = _parent()
        tags = parent.data.tags
        block, epoch, table = tags["best_block"], tags["best_epoch"], tags["best_table"]
        probe = "knn" if "k-NN" in table else "linear"
        # 1. the terminal: the grid's end and the report both start with the same answer
        first = f"answer: {block} @ {epoch} of {table}:"
        grid = " ".join(ran.grid_output.split())  # Rich wraps at the terminal's width
        assert grid.startswith(first), ran.grid_output[:400]
        shown = " ".join(ran.report_output.split())  # Rich wraps at the terminal's width
        tables = [i for i in (shown.find(c) for c in "│┃┏━─") if i >= 0]  # Rich's rules
        assert first in shown, shown[:400]
        assert not tables or shown.index(first) < min(tables), shown[:400]  # before any table
        # 2. the report's summary: that table's chosen cell, and the answer section of report.md
        row = _summary_row(ran.folder, probe)
        assert (row["best_block"], row["best_epoch"], row["chosen_on"]) == (block, epoch, "val")
        md = (ran.folder / "reports" / STUDY / "report.md").read_text()
        assert md.split("## Answer", 1)[1].lstrip().startswith(first)
        # 3. the parent run: tags above, and its description says the same
        assert first in tags["mlflow.note.content"]
        assert tags["answer"].startswith(first)
        # 4. Optuna: the best trial is that cell, its value named as the selection metric
        study = optuna.load_study(
            study_name=STUDY, storage=scheduler.make_storage(STUDY, scheduler.Policy())
        )
        best = study.best_trial
        assert (best.params["block"], str(best.params["epoch"]), best.params["probe"]) == (
            block,
            epoch,
            probe,
        )
        assert study.metric_names == [selection.METRIC_NAME]
        assert "baseline" not in best.user_attrs
        assert best.value == pytest.approx(best.user_attrs["val_top1"], abs=1e-6)
        # a baseline is never best: pixels and epoch 0 score the baseline value
        for t in study.trials:
            if t.params["block"] == "pixels" or t.params["epoch"] == 0:
                assert t.value == selection.BASELINE_VALUE
                assert t.user_attrs["baseline"] in ("pixels", "epoch 0")


@pytest.mark.slow
def test_the_answer_is_the_rule_applied_to_every_finished_trial(ran: Ran) -> None:
    """Recomputed from the trials' logged val_top1: highest among network blocks at trained
    epochs, exact ties to the earliest epoch then block; pixels and epoch 0 never chosen."""
    with inside(ran.folder):
        parent = _parent()
        trials = report.load_trials(parent.info.run_id)
        cands = []
        for r in trials.to_dict("records"):
            block, epoch = r["params.block"], r["params.epoch"]
            if block != "pixels" and epoch not in ("0", "None"):
                order = selection.tie_order(block, int(epoch))
                cands.append((-r["metrics.val_top1"], order, block, epoch))
        top = min(cands)
        assert (parent.data.tags["best_block"], parent.data.tags["best_epoch"]) == top[2:]
        tied = [c for c in cands if c[0] == top[0]]
        assert (parent.data.tags["val_tie"] == "none") == (len(tied) == 1)


def _digits(resolution: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
    """Digits as the card says: x/8-1, grey to 3 channels, bilinear without antialias, the
    stratified 20 % test split with random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32) / 8.0 - 1.0
    x = x.unsqueeze(1).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(
        x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=False
    )
    tr, te = train_test_split(
        np.arange(len(d.target)), test_size=0.2, stratify=d.target, random_state=0
    )
    return {"train": (x[tr], d.target[tr]), "test": (x[te], d.target[te])}


def _block_features(folder: str, module: str, x: torch.Tensor) -> np.ndarray:
    """The block's output through a diffusers forward hook (first call), mean over H and W."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(folder, use_safetensors=True).eval()
    found: list[torch.Tensor] = []

    def hook(_m: Any, _i: Any, out: Any) -> None:
        if not found:
            found.append(out[0] if isinstance(out, tuple) else out)

    handle = dict(unet.named_modules())[module].register_forward_hook(hook)
    with torch.no_grad():
        unet(x, torch.zeros(len(x), dtype=torch.long))
    handle.remove()
    return found[0].mean(dim=(2, 3)).double().numpy()


@pytest.mark.slow
def test_the_methods_card_reproduces_three_cells_with_scikit_learn(ran: Ran) -> None:
    from sklearn.neighbors import KNeighborsClassifier

    card = (ran.folder / "reports" / STUDY / report.METHODS_MD).read_text()
    facts = report.read_facts(card)
    (data,) = facts["datasets"]
    assert "random_state=0" in data["preprocessing"]["test_split"]
    assert "antialias=False" in data["preprocessing"]["resize"]
    res = data["resolution"]
    splits = _digits(res)
    sizes = {s["split"]: s["size"] for s in facts["splits"]}
    assert sizes["train"] == len(splits["train"][1]) and sizes["test"] == len(splits["test"][1])
    knn = facts["probe_settings"]["knn"]
    assert (knn["metric"], knn["weighting"], facts["pool"]) == ("cosine", "uniform", "avg")
    epoch1 = next(b for b in facts["backbones"] if b["epoch"] == 1)
    weights = Path(epoch1["folder"]) / "diffusion_pytorch_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest()[:16] == epoch1["weights_sha256_16"]

    with inside(ran.folder):
        facets = report.build_tables(report.load_trials(_parent().info.run_id))
    (facet,) = [f for f in facets if f.key.probe == "knn" and f.key.noise_step == 0]
    k = facet.key.k
    for block in ("pixels", "mid", "up4"):
        feats = {}
        for split, (x, _) in splits.items():
            if block == "pixels":
                feats[split] = x.flatten(1).double().numpy()  # the card: pixels are flattened
            else:
                feats[split] = _block_features(
                    epoch1["folder"], facts["blocks"][block]["module"], x
                )
        if block != "pixels":
            assert feats["test"].shape[1] in facts["blocks"][block]["dims"]
        clf = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        clf.fit(feats["train"], splits["train"][1])
        mine = float((clf.predict(feats["test"]) == splits["test"][1]).mean())
        cell = facet.cells[(block, 1)]
        # float32 search in ddsweep against float64 here: at most one test image apart
        assert abs(mine - cell.top1) <= 1 / len(splits["test"][1]) + 1e-12, (block, mine, cell.top1)


def test_the_answer_lines_name_every_tie_on_validation_and_the_rule() -> None:
    rows = [
        {"dataset": "digits", "resolution": "8", "attention": "True", "epoch": str(e),
         "block": b, "noise_step": "0", "probe": "knn", "k": "5", "top1": t, "val_top1": v}
        for b, e, t, v in [
            ("mid", 1, 0.90, 0.95), ("up4", 1, 0.80, 0.95), ("mid", 2, 0.99, 0.95),
            ("up4", 2, 0.70, 0.50), ("mid", 0, 0.10, 0.99), ("pixels", 0, 0.99, 0.99),
        ]
    ]  # fmt: skip
    facets = report.build_tables(rows)
    summary = report.summary(facets)
    (row,) = summary
    # epoch 0 and pixels score higher on validation but are baselines
    assert (row.best_block, row.best_epoch) == ("mid", 1)
    assert row.val_tie == (("mid", 1), ("up4", 1), ("mid", 2))
    found = report.study_answer(facets, summary)
    assert found is not None
    lines = answer_mod.lines(found)
    assert lines[0].startswith("answer: mid @ 1 of digits 8 px")
    assert "up4 @ 1, mid @ 2" in lines[1] and selection.TIE_RULE in lines[1]
    assert "pixels (baseline) 99.0 %" in lines[-1]
    # the runner-up is the second-best cell by what chose (validation): up4 @ 1
    assert row.runner_up == ("up4", 1)


def test_the_methods_card_states_rules_settings_and_dims_of_what_was_run() -> None:
    rows = [
        {"dataset": "digits", "resolution": "16", "attention": "True", "epoch": "2",
         "block": b, "noise_step": "0", "probe": "knn", "k": "10", "top1": 0.9,
         "pool": "avg", "weights": "ema", "seed": "0", "val_fraction": "0.1",
         "knn.metric": "cosine", "feature_dim": d, "backbone": "runA@2"}
        for b, d in (("mid", 64), ("down1", 32), ("pixels", 768))
    ]  # fmt: skip
    facets = report.build_tables(rows)
    card = report.methods_card("s", facets, rows, [("digits", "test", "digits:test:16", 360)])
    facts = report.read_facts(card)
    assert facts["blocks"]["mid"] == {"module": "mid_block", "dims": [64]}
    assert facts["blocks"]["down1"]["module"] == "down_blocks.0"
    assert facts["blocks"]["pixels"]["dims"] == [768]
    assert facts["shared_settings"]["val_fraction"] == "0.1"
    assert facts["probe_settings"]["knn"] == {"metric": "cosine"}
    assert facts["splits"] == [
        {"dataset": "digits", "split": "test", "fingerprint": "digits:test:16", "size": 360}
    ]
    assert facts["backbones"][0]["run"] == "runA" and facts["backbones"][0]["epoch"] == 2
    for words in ("random_state=0", "antialias=False", "test_size=0.1", "McNemar", "output[0]"):
        assert words in card, words


def test_the_parent_run_description_holds_the_answer_then_every_table_s_best_cell() -> None:
    rows = [
        {"dataset": "digits", "resolution": "8", "attention": "True", "epoch": str(e),
         "block": b, "noise_step": "0", "probe": p, "k": "5" if p == "knn" else "0",
         "top1": t, "val_top1": v}
        for p in ("linear", "knn")
        for b, e, t, v in [
            ("mid", 1, 0.90, 0.95 if p == "knn" else 0.6), ("up4", 2, 0.80, 0.7),
            ("pixels", 0, 0.5, 0.5),
        ]
    ]  # fmt: skip
    facets = report.build_tables(rows)
    summary = report.summary(facets)
    text = answer_mod.note(STUDY, report.study_answer(facets, summary), summary)
    lines = text.splitlines()
    assert lines[:3] == [f"**Study {STUDY}**", "", lines[2]]
    assert lines[2].startswith("- answer: mid @ 1 of digits 8 px")  # the answer comes first
    table = [line for line in lines if line.startswith("|")]
    assert table[0].startswith("| table | best block @ epoch | top1 % (test) |")
    assert table[1].startswith("|---|---|---:|")
    body = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert set(body) == {"linear", "knn k=5"}, table  # every table, its key never cut
    assert "up4 @ 2" in body["linear"] and "mid @ 1" in body["knn k=5"]
    assert lines[-1].startswith("Rule: ")
    # one table: its row would only repeat the answer's line
    one = report.build_tables([r for r in rows if r["probe"] == "knn"])
    alone = report.summary(one)
    assert "|" not in answer_mod.note(STUDY, report.study_answer(one, alone), alone)
