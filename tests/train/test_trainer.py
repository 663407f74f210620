"""`hiresctl train` / `eval` end to end on tiny stores: learning, resume, NaN, recipes, DDP."""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hiresctl.train import load_recipe
from storage import UsageError
from tests.conftest import torchrun
from tests.stores import make_store, planted_images

TINY = [
    "--set",
    "backbone=tiny",
    "--set",
    "patch_size=32",
    "--set",
    "latent_dim=32",
    "--set",
    "head_width=32",
]


def test_patchgd_global_learns_a_planted_signal(
    planted: Path, tmp_path: Path, cli: Callable
) -> None:
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "run",
        *TINY,
        "--set",
        "epochs=8",
        "--set",
        "lr=3e-3",
        "--set",
        "batch_size=4",
        "--set",
        "warmup=0.05",
        "--json",
    )
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["method"] == "patchgd-global" and summary["steps"] == 8 * 8
    evaluated = cli("eval", tmp_path / "run", "--data", planted, "--split", "val", "--json")
    report = json.loads(evaluated.stdout)
    # 10 balanced validation images: chance is 0.5
    assert report["metrics"]["accuracy"] >= 0.8, report
    assert {"balanced_accuracy", "macro_f1", "kappa_quadratic", "auc"} <= set(report["metrics"])
    assert report["peak_memory_gb"] > 0 and report["images_per_second"] > 0
    assert len(report["confusion_matrix"]) == 2
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 and "val_accuracy" in json.loads(lines[-1])
    assert any((tmp_path / "run" / "tensorboard").iterdir())


def test_ips_learns_a_planted_signal(planted: Path, tmp_path: Path, cli: Callable) -> None:
    # M = 8 of the 16 patches: with M = 4 the untrained scorer keeps the square's patch only
    # one time in four, and one seed in six (seeds 0-5, either initialisation of the
    # aggregator) stayed at ln 2 for all 8 epochs; with M = 8 each of those seeds learned
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "run",
        "--method",
        "ips",
        *TINY,
        "--set",
        "memory_size=8",
        "--set",
        "iter_size=8",
        "--set",
        "heads=4",
        "--set",
        "epochs=8",
        "--set",
        "lr=3e-3",
        "--set",
        "batch_size=4",
    )
    assert result.code == 0, result.stderr
    report = json.loads(
        cli("eval", tmp_path / "run", "--data", planted, "--split", "val", "--json").stdout
    )
    assert report["metrics"]["accuracy"] >= 0.8, report  # chance is 0.5


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_resume_continues_steps_and_optimizer_state(
    planted: Path, tmp_path: Path, cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [
        "--data",
        planted,
        *TINY,
        "--set",
        "batch_size=8",
        "--set",
        "epochs=2",
        "--set",
        "checkpoint_every=2",
    ]
    straight = cli("train", "--out", tmp_path / "straight", *args)
    assert straight.code == 0, straight.stderr

    import hiresctl.train.classification.patchgd as methods

    original = methods.PatchGDGlobal.train_batch
    calls = []

    def dies_in_epoch_2(self, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 7:  # epoch 2, third batch: after the mid-epoch checkpoint of batch 2
            raise RuntimeError("power cut")
        return original(self, *a, **k)

    monkeypatch.setattr(methods.PatchGDGlobal, "train_batch", dies_in_epoch_2)
    with pytest.raises(RuntimeError, match="power cut"):
        cli("train", "--out", tmp_path / "split", *args)
    saved = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=False)
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 2, 6)
    monkeypatch.setattr(methods.PatchGDGlobal, "train_batch", original)
    again = cli("train", "--out", tmp_path / "split", *args)
    assert again.code == 2 and "--resume" in again.stderr  # never overwrites a run
    resumed = cli("train", "--out", tmp_path / "split", *args, "--resume")
    assert resumed.code == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "batch 2, step 6" in resumed.stderr
    done = torch.load(tmp_path / "split/checkpoints/last.pt", weights_only=False)
    assert done["step"] == 2 * 4 and done["epoch"] == 2
    # ρ = 0.25 → 4 inner iterations averaged into one optimizer step per image batch
    # (inner_update: batch): 2 epochs × 4 batches
    assert max(int(s["step"]) for s in done["optimizer"]["state"].values()) == 8
    reference = _weights(tmp_path / "straight/checkpoints/last.pt")
    for key, value in done["model"].items():
        assert torch.allclose(value.float(), reference[key].float(), atol=1e-5), key


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    planted: Path, tmp_path: Path, cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    assert (
        cli(
            "train",
            "--data",
            planted,
            "--out",
            run,
            *TINY,
            "--set",
            "epochs=1",
            "--set",
            "batch_size=8",
        ).code
        == 0
    )
    last = run / "checkpoints" / "last.pt"
    digest = hashlib.sha256(last.read_bytes()).hexdigest()
    import hiresctl.train.classification.patchgd as methods

    def nan_loss(*args: object, **kwargs: object) -> torch.Tensor:
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(methods.F, "cross_entropy", nan_loss)
    result = cli("train", "--data", planted, "--out", run, *TINY, "--set", "epochs=2", "--resume")
    assert result.code == 1
    assert "not finite" in result.stderr and "last good checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    assert hashlib.sha256(last.read_bytes()).hexdigest() == digest


def test_a_long_epoch_reports_progress_before_it_ends(
    planted: Path, tmp_path: Path, cli: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    import hiresctl.train.trainer as trainer

    monkeypatch.setattr(trainer, "PROGRESS_SECONDS", 0.0)  # a line after every batch
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "run",
        *TINY,
        "--method",
        "downsample",
        "--set",
        "epochs=1",
        "--set",
        "batch_size=8",
    )
    assert result.code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "left in the epoch" in line]
    # 30 training images in batches of 8: four batches, a line after each but the last
    assert [line.split(" · ")[1] for line in lines] == ["batch 1/4", "batch 2/4", "batch 3/4"]
    assert all(line.startswith("epoch 1/1 · ") and "images/s" in line for line in lines)


@pytest.mark.parametrize("method", ["ips", "downsample", "full", "patchgd"])
def test_every_method_trains_and_evaluates(
    method: str, planted: Path, tmp_path: Path, cli: Callable
) -> None:
    extra = ["--set", "memory_size=4", "--set", "iter_size=4"] if method == "ips" else []
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / method,
        "--method",
        method,
        *TINY,
        *extra,
        "--set",
        "epochs=1",
        "--set",
        "batch_size=8",
    )
    assert result.code == 0, result.stderr
    report = json.loads(
        cli("eval", tmp_path / method, "--data", planted, "--split", "val", "--json").stdout
    )
    assert report["method"] == method and report["count"] == 10


def test_recipe_errors_name_the_nearest_key(tmp_path: Path, cli: Callable) -> None:
    with pytest.raises(UsageError, match="did you mean 'patch_size'"):
        load_recipe(overrides={"patchsize": 64})
    with pytest.raises(UsageError, match="lr must be float"):
        load_recipe(overrides={"lr": "fast"})
    with pytest.raises(
        UsageError,
        match=r"method 'ipx' is not a cls method \(did you mean 'ips'\?\); valid: .*patchgd-global",
    ):
        load_recipe(overrides={"method": "ipx"})
    with pytest.raises(UsageError, match="method 'sliced' is not a cls method"):
        load_recipe(method="sliced")
    assert load_recipe(task="seg", method="patchgd").backbone == "unet"  # task defaults
    with pytest.raises(UsageError, match=r"backbone 'resnet81' is not a cls backbone .*'resnet18'"):
        load_recipe(overrides={"backbone": "resnet81"})  # checked when the recipe loads
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nbackbon: tiny\n")
    with pytest.raises(
        UsageError, match=r"bad.yaml: unknown recipe key 'backbon'; did you mean 'backbone'"
    ):
        load_recipe(bad)
    assert load_recipe(method="ips").weight_decay == 0.1  # task × method defaults
    result = cli("train", "--data", tmp_path, "--out", tmp_path / "r", "--recipe", bad)
    assert result.code == 2 and "backbon" in result.stderr


def test_shipped_recipes_load() -> None:
    recipes = sorted(Path(__file__).parents[2].joinpath("recipes").glob("*.yaml"))
    assert len(recipes) >= 3
    for path in recipes:
        load_recipe(path)


def test_memory_budget_chooses_and_says_so(planted: Path, tmp_path: Path, cli: Callable) -> None:
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "r",
        *TINY,
        "--set",
        "epochs=1",
        "--memory-budget",
        "64GiB",
    )
    assert result.code == 0 and "memory budget 64.00 GiB → batch_size=4" in result.stderr
    tiny = cli(
        "train", "--data", planted, "--out", tmp_path / "s", *TINY, "--memory-budget", "1MiB"
    )
    assert tiny.code == 2 and "too small" in tiny.stderr


def test_missing_labels_are_named_and_the_rest_trains(tmp_path: Path, cli: Callable) -> None:
    images, labels = planted_images(6, 64, 32, seed=1)
    unlabelled = {"im005": images.pop("im005")}
    labels.pop("im005")
    store = make_store(tmp_path, images, labels)
    make_store(tmp_path, unlabelled)  # tiled later into the same store, without a labels CSV
    result = cli("train", "--data", store, "--out", tmp_path / "r", *TINY, "--set", "epochs=1")
    assert result.code == 1
    assert "im005" in result.stderr and "has no class label" in result.stderr
    assert (tmp_path / "r" / "checkpoints" / "last.pt").is_file()


def test_ddp_two_gloo_ranks_hold_identical_weights(planted: Path, tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, torch
        from hiresctl.train import Trainer, load_recipe
        recipe = load_recipe(overrides=dict(backbone="tiny", patch_size=32, latent_dim=16, head_width=16,
                                            epochs=1, batch_size=2, val_split="none"))
        trainer = Trainer({str(planted)!r}, {str(tmp_path / "run")!r}, recipe, device="cpu", log=lambda m: None)
        before = [p.detach().clone() for p in trainer.run.model.parameters()]
        trainer.fit()
        rank = int(os.environ["RANK"])
        torch.save({{"after": trainer.run.model.state_dict(), "images": [i.image_id for i in trainer._shard(0)],
                    "changed": any(not torch.equal(a, b) for a, b in zip(before, trainer.run.model.parameters()))}},
                   {str(tmp_path)!r} + f"/rank{{rank}}.pt")
    """)
    )
    proc = torchrun(str(script), port=29533)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert ranks[0]["changed"] and ranks[1]["changed"]
    assert not set(ranks[0]["images"]) & set(ranks[1]["images"])  # images sharded, not repeated
    for key, value in ranks[0]["after"].items():
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm statistics are per rank, like DDP's default
        assert torch.equal(value, ranks[1]["after"][key]), key


def test_classification_defaults_to_an_encoder_that_learns_from_scratch(cli: Callable) -> None:
    """Nothing pretrained is downloaded, so `train --task cls` without a recipe gets `tiny`
    (BENCHMARKS.md, "defaults"); a method's own defaults still win over the task's, and
    `hiresctl methods` lists both."""
    assert load_recipe(None, "cls", "patchgd-global").backbone == "tiny"
    assert load_recipe(None, "seg", "patchgd").backbone == "unet"
    assert load_recipe(None, "cls", None, {"backbone": "resnet18"}).backbone == "resnet18"
    listed = cli("methods", "--json")
    rows = {(r["task"], r["method"]): r["defaults"] for r in json.loads(listed.stdout)}
    assert rows["cls", "patchgd-global"]["backbone"] == "tiny"
    assert rows["cls", "patchgd-global"]["fusion"] == "concat"
    assert rows["seg", "patchgd"]["backbone"] == "unet"
    assert ("seg", "tiled") not in rows  # a former name is accepted, not listed


def test_a_former_method_name_loads_with_a_note(tmp_path: Path) -> None:
    """Segmentation's PatchGD was ``tiled``: recipes and checkpoints naming it keep loading."""
    with pytest.warns(FutureWarning, match="'tiled' is now called 'patchgd'"):
        recipe = load_recipe(task="seg", method="tiled")
    assert recipe.method == "patchgd"
    old = tmp_path / "old.yaml"
    old.write_text("task: seg\nmethod: tiled\nbackbone: unet-tiny\n")
    with pytest.warns(FutureWarning):
        assert load_recipe(old).method == "patchgd"
    from hiresctl.train.checkpoint import checkpoint_recipe
    from hiresctl.train.registry import method_class

    saved = checkpoint_recipe({"recipe": {"task": "seg", "method": "tiled"}}, tmp_path / "x.pt")
    assert method_class(saved.task, saved.method) is method_class("seg", "patchgd")
