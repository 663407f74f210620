"""Every registered (task, method) through the whole product, and every recipe for one step.

The pairs come from the registry, so a method that registers is tested here without a line
added: one epoch of training, ``evaluate``, ``predict``, the report, what it says it sees, and
its ``--memory-budget`` estimate. A hook a method forgot fails here, not at a user's report.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from hiresctl.eval import evaluate
from hiresctl.eval.predict import predict, predict_formats
from hiresctl.features import EmbedOptions, embed_store
from hiresctl.report.build import build_report, describe_setting, figure_drawer
from hiresctl.train import (
    PatchCost,
    Trainer,
    get_task,
    load_recipe,
    load_run,
    method_names,
    register_method,
    task_names,
)
from hiresctl.train.classification.baselines import Downsample
from hiresctl.train.registry import method_class
from storage import Dataset
from storage.errors import UsageError
from tests.stores import make_store, planted_images, planted_objects

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(task, method) for task in task_names() for method in method_names(task)]
SPLIT = {0: "train", 1: "train", 2: "train", 3: "train", 4: "val", 5: "val", 6: "test", 7: "test"}
TINY: dict[str, dict[str, Any]] = {
    "cls": {
        "backbone": "tiny",
        "patch_size": 32,
        "head_width": 16,
        "memory_size": 4,
        "iter_size": 4,
        "bag_size": 4,
        "mil_hidden": 16,
        "attention_dim": 8,
        "calibration_batches": 1,
        "input_size": 64,
    },
    "det": {
        "backbone": "tiny",
        "latent_dim": 32,
        "head_convs": 2,
        "patch_size": 64,
        "input_size": 64,
    },
    "seg": {"backbone": "unet-tiny", "patch_size": 32, "input_size": 64},
}


def _split(i: int) -> str:
    return SPLIT[i]


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny store per task (4 train, 2 val, 2 test images); the classification store has
    a feature set too, for the methods that train on stored features."""
    root = tmp_path_factory.mktemp("conformance")
    images, labels = planted_images(8, 128, 32, seed=1, split_of=_split)
    cls = make_store(root / "cls", images, labels)
    embed_store(
        cls, EmbedOptions(backbone="tiny", patch_size=32, batch_size=16), torch.device("cpu")
    )
    boxes, box_labels, coco = planted_objects(8, 128, seed=2, split_of=_split)
    det = make_store(root / "det", boxes, box_labels, chunk=64, coco=coco)
    rng = np.random.default_rng(3)
    masks = {name: (rng.random((96, 96)) > 0.5).astype(np.uint8) for name in images}
    pixels = {name: rng.integers(0, 255, (96, 96, 3), dtype=np.uint8) for name in images}
    seg = make_store(root / "seg", pixels, labels, masks=masks)
    return {"cls": cls, "det": det, "seg": seg}


def _recipe(task: str, method: str, **changes: Any) -> Any:
    return load_recipe(
        task=task, method=method, overrides={**TINY[task], "epochs": 1, "batch_size": 2, **changes}
    )


def test_the_registry_lists_every_built_in_method() -> None:
    assert set(task_names()) == {"cls", "det", "seg"}
    assert {
        "patchgd-global",
        "patchgd",
        "ips",
        "downsample",
        "full",
        "abmil",
        "transmil",
        "e2e-mil",
    } <= set(method_names("cls"))
    assert set(method_names("det")) == {"patchgd-global", "patchgd", "downsample", "sliced"}
    for task in task_names():
        assert figure_drawer(task) is not None, f"the report draws nothing for {task}"
        assert predict_formats(task), f"predict writes nothing for {task}"
        assert get_task(task).table_metrics, f"the report has no table for {task}"


@pytest.mark.parametrize(("task", "method"), PAIRS, ids=[f"{t}-{m}" for t, m in PAIRS])
def test_every_method_trains_evaluates_predicts_and_reports(
    task: str, method: str, stores: dict[str, Path], tmp_path: Path
) -> None:
    store = stores[task]
    recipe = _recipe(task, method)
    trainer = Trainer(store, tmp_path / "run", recipe, device="cpu", log=lambda m: None)
    summary = trainer.fit().summary
    assert summary["steps"] == 2 and summary["method"] == method
    assert (tmp_path / "run" / "checkpoints" / "best.pt").is_file()

    result = evaluate(tmp_path / "run", store, split="test", device="cpu")
    assert result["count"] == 2 and result["task"] == task
    assert get_task(task).table_metrics[0] in result["metrics"]

    run = load_run(tmp_path / "run", Dataset(store), torch.device("cpu"))
    setting = describe_setting(run, "im006" if task != "det" else "ob006")
    assert setting["sampling"] and setting["sees"]
    per_image, per_patch, wanted = run.method.memory(
        run.model, trainer.train_images, PatchCost(10**6, 10**5)
    )
    assert min(per_image, per_patch) >= 0 and per_image + per_patch > 0
    assert wanted is None or wanted >= 1

    predicted = predict(
        tmp_path / "run", [str(store)], tmp_path / "pred", split="test", device="cpu"
    )
    assert len(predicted.rows) == 2 and not predicted.problems
    assert json.loads((tmp_path / "pred" / "predictions.json").read_text())

    report = build_report(
        [tmp_path / "run"], store, split="test", out=tmp_path / "report", device="cpu"
    )
    assert (tmp_path / "report" / "report.html").is_file()
    assert report["runs"][0]["method"] == method


@pytest.mark.parametrize(("task", "method"), PAIRS, ids=[f"{t}-{m}" for t, m in PAIRS])
def test_every_method_plans_its_memory_budget(
    task: str, method: str, stores: dict[str, Path], tmp_path: Path
) -> None:
    recipe = _recipe(task, method, memory_budget="3GiB")
    trainer = Trainer(stores[task], tmp_path / "run", recipe, device="cpu", log=lambda m: None)
    plan = trainer.memory_plan
    assert plan is not None and plan.batch_size >= 1
    assert 0 < plan.estimate <= 3 * 2**30


@pytest.mark.parametrize(
    ("method", "key"),
    [("ips", "memory_size"), ("ips-features", "memory_size"), ("e2e-mil", "bag_size")],
)
def test_selection_estimates_no_more_than_the_image_holds(
    method: str, key: str, stores: dict[str, Path]
) -> None:
    """IPS holds min(M, N) patches with gradient and e2e-mil min(K, N): a memory or bag beyond
    an image's N patches (the 128² images here have 16) costs nothing more, in the estimate as
    in the step."""
    from hiresctl.train import build_run

    dataset = Dataset(stores["cls"])
    images, _ = get_task("cls").images(dataset, "train", ["0", "1"])
    estimates = []
    for memory in (16, 1000):
        recipe = _recipe("cls", method, **{key: memory, "iter_size": memory})
        run = build_run(recipe, dataset, ["0", "1"], torch.device("cpu"))
        estimates.append(run.method.memory(run.model, images, PatchCost(10**6, 10**5)))
    assert estimates[0] == estimates[1]


RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


@pytest.mark.slow  # about 20 s a recipe (a process each); CI runs it
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_trains_one_epoch_on_a_tiny_store(
    path: Path, stores: dict[str, Path], tmp_path: Path
) -> None:
    """The recipe as shipped (method, backbone, patch, head, schedule), through the command line
    for one epoch of batch 1 on the two validation images of its task's tiny store: a recipe
    whose keys no longer load, or whose combination no longer builds, fails here. (A process
    of its own: ResNet-50 at 512² would leave this one holding gigabytes.)"""
    import subprocess
    import sys

    task = load_recipe(path).task
    args = [
        "train",
        "--recipe",
        path,
        "--data",
        stores[task],
        "--out",
        tmp_path / "run",
        "--device",
        "cpu",
        "--json",
    ]
    for key, value in {
        "epochs": 1,
        "batch_size": 1,
        "num_workers": 0,
        "train_split": "val",
    }.items():
        args += ["--set", f"{key}={value}"]
    done = subprocess.run(
        [sys.executable, "-m", "hiresctl", *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1])["steps"] == 2


def test_a_method_registered_twice_warns_and_the_new_one_wins() -> None:
    original = method_class("cls", "downsample")
    try:
        with pytest.warns(UserWarning, match="registered again"):

            @register_method("cls", "downsample")
            class Again(Downsample):
                """The same method, registered again."""

        assert method_class("cls", "downsample") is Again
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            register_method("cls", "downsample")(original)
    assert method_class("cls", "downsample") is original


def test_a_method_that_is_not_of_its_tasks_base_is_refused_when_it_registers() -> None:
    """A segmentation method registered for classification never reaches a run: the task
    reads its methods as its ``method_base`` without checking again."""
    from hiresctl.train import ClassificationMethod, SegmentationMethod
    from hiresctl.train.segmentation.baselines import SegDownsample

    for task in task_names():
        base = get_task(task).method_base
        assert all(issubclass(method_class(task, m), base) for m in method_names(task))
    assert get_task("cls").method_base is ClassificationMethod
    assert get_task("seg").method_base is SegmentationMethod
    with pytest.raises(UsageError, match=r"must subclass .*ClassificationMethod"):
        register_method("cls", "misfiled")(SegDownsample)
    assert "misfiled" not in method_names("cls")


def test_the_worked_example_adds_a_method_the_command_line_trains_and_reports(
    stores: dict[str, Path], tmp_path: Path
) -> None:
    """``examples/toy_method.py`` (docs/methods.md, "Adding a method") as a user runs it: one
    class, one registration, picked up through ``HIRESCTL_PLUGINS`` by every command."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HIRESCTL_PLUGINS": str(ROOT / "examples" / "toy_method.py")}

    def hiresctl(*args: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "hiresctl", *map(str, args)],
            env=env,
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )

    listed = hiresctl("methods", "--task", "cls", "--json")
    assert "patch-vote" in [row["method"] for row in json.loads(listed.stdout)], listed.stderr
    trained = hiresctl(
        "train",
        "--method",
        "patch-vote",
        "--data",
        stores["cls"],
        "--out",
        "run",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "epochs=1",
        "--set",
        "batch_size=2",
        "--memory-budget",
        "2GiB",
        "--device",
        "cpu",
    )
    assert trained.returncode == 0, trained.stderr
    assert "memory budget" in trained.stderr
    reported = hiresctl(
        "eval", "run", "--data", stores["cls"], "--report", "--out", "report", "--device", "cpu"
    )
    assert reported.returncode == 0, reported.stderr
    html = (tmp_path / "report" / "report.html").read_text()
    assert "patch-vote" in html and "K=8 of N=16 patches vote" in html
    plain = subprocess.run(
        [sys.executable, "-m", "hiresctl", "methods", "--task", "cls"],
        capture_output=True,
        text=True,
    )
    assert "patch-vote" not in plain.stdout  # only where the plugin is named
