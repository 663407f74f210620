"""Multiple-instance methods: attention MIL on stored features (abmil, transmil), IPS on
stored features (ips-features, M of N selected) and end to end on random patches (e2e-mil) learn a planted signal, explain it where it is, and run the
whole loop (eval, predict, report, memory budget)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from hiresctl.models.mil import ABMIL, TransformerMIL
from tests.stores import make_store, planted_images


@pytest.mark.parametrize("model", [ABMIL(8, 3, 16, 8, 0.0), TransformerMIL(8, 3, 16, 4, 2, 0.0)])
def test_aggregators_take_any_bag_size_and_weigh_every_instance(model: torch.nn.Module) -> None:
    model.eval().requires_grad_(False)
    for n in (1, 7, 300):
        logits, weights = model(torch.randn(n, 8))
        assert logits.shape == (3,) and weights.shape == (n,)
        assert (weights >= 0).all() and float(weights.sum()) == pytest.approx(1, abs=1e-5)
    bag = torch.randn(20, 8)
    # a bag is a set: the order of its instances changes nothing
    order = torch.randperm(20)
    torch.testing.assert_close(model(bag)[0], model(bag[order])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("method", "settings"),
    [("abmil", []), ("transmil", []), ("ips-features", ["memory_size=4", "iter_size=4"])],
)
def test_feature_mil_learns_from_stored_features_and_attends_to_the_signal(
    planted: Path, tmp_path: Path, cli: Callable, method: str, settings: list[str]
) -> None:
    embedded = cli("embed", planted, "--backbone", "tiny", "--patch-size", "32", "--name", "t32")
    assert embedded.code == 0, embedded.stderr
    run = tmp_path / "run"
    trained = cli(
        "train",
        "--data",
        planted,
        "--out",
        run,
        "--method",
        method,
        "--set",
        "epochs=12",
        "--set",
        "lr=2e-3",
        "--set",
        "batch_size=4",
        "--set",
        "mil_hidden=32",
        "--set",
        "attention_dim=16",
        "--json",
        *(a for s in settings for a in ("--set", s)),
    )
    assert trained.code == 0, trained.stderr
    report = json.loads(cli("eval", run, "--data", planted, "--split", "val", "--json").stdout)
    assert report["metrics"]["accuracy"] >= 0.8, report  # 10 balanced images: chance is 0.5
    predicted = cli("predict", run, planted, "--out", tmp_path / "pred", "--split", "val", "--json")
    assert predicted.code == 0, predicted.stderr
    import zarr

    from storage import Dataset

    dataset = Dataset(planted)
    hits = 0
    for row in map(json.loads, predicted.stdout.splitlines()):
        entry = dataset.entry(row["id"])
        heat = np.asarray(
            zarr.open_group(tmp_path / "pred" / "predictions.zarr" / row["id"], mode="r")["0"][0]
        )
        assert heat.shape == (4, 4)  # one cell per 32² patch of a 128² image
        if entry.label == "1" and row["predicted"] == "1":
            # the planted square's patch is the brightest: attention should sit on it
            pixels = np.asarray(dataset.level(row["id"], 0)[...]).mean(0)
            cells = pixels.reshape(4, 32, 4, 32).mean((1, 3))
            hits += int(
                np.unravel_index(heat.argmax(), heat.shape)
                == np.unravel_index(cells.argmax(), cells.shape)
            )
    assert hits >= 3


def test_feature_mil_without_features_says_what_to_run(planted: Path, tmp_path: Path, cli) -> None:
    images, labels = planted_images(6, 64, 32, seed=1)
    store = make_store(tmp_path / "bare", images, labels)
    result = cli("train", "--data", store, "--out", tmp_path / "run", "--method", "abmil")
    assert result.code == 2 and "hiresctl embed" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_run_refuses_features_embedded_again_with_another_encoder(
    tmp_path: Path, cli: Callable
) -> None:
    """The same set name, other features: evaluating would read inputs the run never saw, so
    it stops with one line naming both (a different width, or the same width and other
    weights)."""
    images, labels = planted_images(
        6, 64, 32, seed=4, split_of=lambda i: "val" if i >= 4 else "train"
    )
    store = make_store(tmp_path / "s", images, labels)
    assert cli("embed", store, "--backbone", "tiny", "--patch-size", "32", "--name", "f").code == 0
    run = tmp_path / "run"
    trained = cli("train", "--data", store, "--out", run, "--method", "abmil", "--set", "epochs=1")
    assert trained.code == 0, trained.stderr
    assert cli("eval", run, "--data", store, "--split", "val").code == 0
    for other in (["--seed", "1"], ["--backbone", "resnet18"]):  # same width; another width
        again = cli(
            "embed",
            store,
            "--patch-size",
            "32",
            "--name",
            "f",
            "--overwrite",
            *(["--backbone", "tiny"] if "--backbone" not in other else []),
            *other,
        )
        assert again.code == 0, again.stderr
        result = cli("eval", run, "--data", store, "--split", "val")
        assert result.code != 0 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1, result.stderr
        assert "trained on feature set 'f': tiny (random:tiny:seed0)" in result.stderr


def test_e2e_mil_learns_on_random_bags_and_evaluates_every_patch(
    planted: Path, tmp_path: Path, cli: Callable
) -> None:
    trained = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "run",
        "--method",
        "e2e-mil",
        "--set",
        "backbone=tiny",
        "--set",
        "patch_size=32",
        "--set",
        "bag_size=8",
        "--set",
        "mil_hidden=32",
        "--set",
        "attention_dim=16",
        "--set",
        "epochs=8",
        "--set",
        "lr=3e-3",
        "--set",
        "batch_size=4",
        "--json",
    )
    assert trained.code == 0, trained.stderr
    report = json.loads(
        cli("eval", tmp_path / "run", "--data", planted, "--split", "val", "--json").stdout
    )
    assert report["metrics"]["accuracy"] >= 0.8, report


def test_memory_budget_plans_feature_mil(planted: Path, tmp_path: Path, cli: Callable) -> None:
    cli("embed", planted, "--backbone", "tiny", "--patch-size", "32", "--name", "t32")
    result = cli(
        "train",
        "--data",
        planted,
        "--out",
        tmp_path / "run",
        "--method",
        "abmil",
        "--memory-budget",
        "8GiB",
        "--set",
        "epochs=1",
        "--json",
    )
    assert result.code == 0, result.stderr
    assert "memory budget 8.00 GiB" in result.stderr


def test_ips_on_features_keeps_the_top_m_of_the_bag_and_trains_only_those(
    tmp_path: Path,
) -> None:
    """Streamed I at a time, the selection ends with the bag's best M by score (one head: the
    ranking of a set is that of its instances), and only those M are encoded with gradient."""
    from hiresctl.features import EmbedOptions, embed_store
    from hiresctl.train import Recipe, build_run, step_context
    from storage import Dataset

    images, labels = planted_images(4, 128, 32, seed=5)
    store = make_store(tmp_path / "s", images, labels)
    embed_store(
        store, EmbedOptions(backbone="tiny", patch_size=32, batch_size=16), torch.device("cpu")
    )
    recipe = Recipe(
        method="ips-features",
        memory_size=3,
        iter_size=2,
        heads=1,
        batch_size=2,
        latent_dim=8,
        dim_key=8,
        dim_value=8,
    )
    run = build_run(recipe, Dataset(store), ["0", "1"], torch.device("cpu"))
    method, model = run.method, run.model
    ids = [e.id for e in Dataset(store).entries()][:2]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = step_context(run, optimizer, None, 1)
    for train in (False, True):
        reads = list(run.reads(ids, train, seed=7))
        for request, bag in reads:
            kept, positions, width = method._select(ctx, request, bag, train)
            rows, cols, _, _ = method.cells(request.image_id)
            everyone = torch.as_tensor(rows * width + cols)
            with torch.no_grad():
                model.eval()
                emb = model.with_positions(model.encoder(bag), everyone, width)
                best = model.scores(emb.unsqueeze(0))[0].topk(3).indices.sort().values
            assert kept.tolist() == best.tolist()
            torch.testing.assert_close(positions, everyone[kept])
    # a memory larger than the bag keeps the whole bag
    big = build_run(recipe.replace(memory_size=40), Dataset(store), ["0", "1"], torch.device("cpu"))
    for train in (False, True):
        ((request, bag),) = list(big.reads(ids[:1], train, seed=7))
        kept, _, _ = big.method._select(step_context(big, None, None, 1), request, bag, train)
        assert kept.tolist() == list(range(len(bag)))
    ctx.patches_with_grad = 0
    run.step(ids, torch.tensor([0, 1]), seed=7, ctx=ctx)
    assert ctx.patches_with_grad == 2 * 3  # M per image, not the bag's 16


def test_features_read_another_way_are_refused_naming_the_field(
    tmp_path: Path, cli: Callable
) -> None:
    """A Hub encoder's feature set records its transform: the same weights under the same
    set name, normalised with other statistics, are refused when a run trained on the first
    evaluates, naming the transform."""
    from tests.encoders import hub_folder

    images, labels = planted_images(
        6, 64, 32, seed=4, split_of=lambda i: "val" if i >= 4 else "train"
    )
    store = make_store(tmp_path / "s", images, labels)
    hub_folder(tmp_path / "a")
    hub_folder(tmp_path / "b", mean=(0.5, 0.5, 0.5))  # the same weights (seed 0)
    embed = ["embed", store, "--backbone", "hf-hub:lab/vit", "--patch-size", "32", "--name", "v"]
    first = cli(*embed, "--pretrained", tmp_path / "a")
    assert first.code == 0, first.stderr
    from storage import Dataset

    record = Dataset(store).feature_set("im000", "v")[2]
    assert record["transform"]["mean"] == [0.6, 0.5, 0.4] and record["pooling"] == "model"
    assert record["provenance"]["weights_source"] == "pretrained"
    run = tmp_path / "run"
    trained = cli("train", "--data", store, "--out", run, "--method", "abmil", "--set", "epochs=1")
    assert trained.code == 0, trained.stderr
    assert cli("eval", run, "--data", store, "--split", "val").code == 0
    again = cli(*embed, "--pretrained", tmp_path / "b", "--overwrite")
    assert again.code == 0, again.stderr
    result = cli("eval", run, "--data", store, "--split", "val")
    assert result.code != 0 and result.stderr.count("\n") == 1, result.stderr
    assert "differing: transform" in result.stderr
