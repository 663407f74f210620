"""Encoders by timm, Hub and short name: weights from a file, a Hub-format folder, the site's
weights file or the Hugging Face cache (never the network); each encoder's own normalisation,
resize and pooling, compared with what timm and torchvision compute themselves."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

from hiresctl.data.reader import normalize
from hiresctl.models import create_backbone
from hiresctl.models.conch import available as conch_available
from storage import UsageError
from tests.encoders import hub_folder, transformers_vit_folder


def _timm_features(model: torch.nn.Module, unit: torch.Tensor) -> torch.Tensor:
    """What timm computes for [0, 1] RGB: its pretrained config's normalisation, its head's
    pooling (pre-logits)."""
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        return model.forward_head(model.forward_features((unit - mean) / std), pre_logits=True)


@pytest.fixture
def unit() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def _no_site_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No weights file of this machine's user and an empty Hugging Face cache."""
    import huggingface_hub.constants

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HIRESCTL_WEIGHTS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_name_with_a_state_dict_file_computes_what_timm_computes(
    tmp_path: Path, unit: torch.Tensor, suffix: str
) -> None:
    source = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    encoder = create_backbone("timm:test_vit", path).eval()
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))  # the reader's ImageNet normalisation
    # test_vit normalises with 0.5 / 0.5, not ImageNet's: the encoder renormalises
    assert torch.allclose(ours, _timm_features(source, unit), atol=1e-5)
    record = encoder.provenance
    assert record["encoder"] == "timm:test_vit" and record["weights"].startswith("sha256:")
    assert record["transform"]["mean"] == [0.5, 0.5, 0.5] and record["pooling"] == "model"


def test_timm_name_without_weights_is_random_and_says_so(unit: torch.Tensor) -> None:
    encoder = create_backbone("timm:test_resnet")
    assert encoder.provenance["weights"] == "random"
    assert encoder.forward_features(normalize(unit)).shape == (2, encoder.num_features)


def test_hub_folder_brings_its_architecture_and_normalisation(
    tmp_path: Path, unit: torch.Tensor
) -> None:
    source = hub_folder(tmp_path / "tiny", fixed_side=32)
    encoder = create_backbone("hf-hub:lab/tiny", tmp_path / "tiny").eval()
    assert encoder.transform.size == 32 and encoder.transform.mean == (0.6, 0.5, 0.4)
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))  # 64² patches resized to its 32²
    resized = torch.nn.functional.interpolate(
        unit, size=(32, 32), mode="bicubic", align_corners=False, antialias=True
    )
    mean = torch.tensor([0.6, 0.5, 0.4]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    with torch.no_grad():
        theirs = source.forward_head(source.forward_features((resized - mean) / std), True)
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_hub_name_is_read_from_the_cache_alone(tmp_path: Path, unit: torch.Tensor) -> None:
    repo = tmp_path / "hf" / "models--lab--tiny"
    revision = "0123456789abcdef0123456789abcdef01234567"
    hub_folder(repo / "snapshots" / revision, fixed_side=None)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    encoder = create_backbone("hf-hub:lab/tiny")
    assert encoder.provenance["weights_source"] == "hub-cache"
    assert encoder.provenance["revision"] == revision
    with pytest.raises(UsageError, match="weights not found on this machine"):
        create_backbone("hf-hub:lab/absent")


def test_site_weights_file_names_the_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub_folder(tmp_path / "tiny", fixed_side=None)
    site = tmp_path / "weights.yaml"
    site.write_text(f"hf-hub:lab/tiny: {tmp_path / 'tiny'}\n")
    monkeypatch.setenv("HIRESCTL_WEIGHTS", str(site))
    assert create_backbone("hf-hub:lab/tiny").provenance["weights_source"] == "site"


def test_short_name_without_weights_says_what_to_place_where() -> None:
    with pytest.raises(UsageError) as caught:
        create_backbone("uni")
    message = str(caught.value)
    assert "pytorch_model.bin" in message and "MahmoodLab/UNI" in message
    assert "\n" not in message and "--pretrained" in message


def test_weights_of_another_model_are_refused(tmp_path: Path) -> None:
    other = timm.create_model("test_convnext", pretrained=False, num_classes=0)
    path = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(path))
    with pytest.raises(UsageError, match="does not fit the encoder"):
        create_backbone("timm:test_vit", path)


def test_resnet50_trunc_is_torchvisions_resnet50_to_layer3_averaged(
    tmp_path: Path, unit: torch.Tensor
) -> None:
    net = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50.pth"
    torch.save(net.state_dict(), path)  # torchvision's names, with layer4 and fc left over
    encoder = create_backbone("resnet50-trunc", path).eval()
    with torch.no_grad():
        x = normalize(unit)
        for stage in (
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
        ):
            x = stage(x)
        expect = x.mean(dim=(2, 3))
        ours = encoder.forward_features(normalize(unit))
    assert ours.shape == (2, 1024) and torch.allclose(ours, expect, atol=1e-5)


IMAGENET_PROCESSOR = {
    "do_normalize": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "size": {"height": 32, "width": 32},
}


def _resized(unit: torch.Tensor, side: int, mode: str, mean: list, std: list) -> torch.Tensor:
    resized = torch.nn.functional.interpolate(
        unit, size=(side, side), mode=mode, align_corners=False, antialias=True
    )
    return (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_a_transformers_vit_folder_computes_what_transformers_computes(
    tmp_path: Path, unit: torch.Tensor
) -> None:
    """A folder ``ViTModel.save_pretrained`` wrote (Phikon's kind) loads as a timm ViT: the CLS
    token of ``last_hidden_state`` that transformers computes, with the folder's processor's
    side, resampling and statistics."""
    source = transformers_vit_folder(tmp_path / "vit", IMAGENET_PROCESSOR)
    encoder = create_backbone("hf-hub:lab/vit", tmp_path / "vit").eval()
    assert encoder.transform.size == 32 and encoder.transform.interpolation == "bicubic"
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))  # 64² patches resized to its 32²
        pixels = _resized(
            unit, 32, "bicubic", IMAGENET_PROCESSOR["image_mean"], IMAGENET_PROCESSOR["image_std"]
        )
        theirs = source(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert encoder.provenance["pooling"] == "cls" and encoder.num_features == 32


def test_a_transformers_vit_without_a_processor_file_takes_the_processors_defaults(
    tmp_path: Path, unit: torch.Tensor
) -> None:
    """No ``preprocessor_config.json``: the statistics and resampling of transformers' own
    ``ViTImageProcessor`` defaults, and a classifier's ``vit.`` prefix and head left aside."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    source = ViTForImageClassification(config).eval()
    source.save_pretrained(tmp_path / "cls")
    encoder = create_backbone("hf-hub:lab/cls", tmp_path / "cls").eval()
    processor = ViTImageProcessor()
    t = encoder.transform
    assert t.mean == tuple(processor.image_mean) and t.std == tuple(processor.image_std)
    assert t.interpolation == {2: "bilinear", 3: "bicubic"}[int(processor.resample)]
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))
        pixels = _resized(unit, 32, t.interpolation, processor.image_mean, processor.image_std)
        hidden = source(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        theirs = source.vit.layernorm(hidden)[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_a_transformers_vit_with_a_tensor_missing_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    transformers_vit_folder(tmp_path / "vit")
    path = tmp_path / "vit" / "model.safetensors"
    state = load_file(str(path))
    del state["encoder.layer.1.attention.attention.key.weight"]
    save_file(state, str(path))
    with pytest.raises(
        UsageError, match=re.escape("blocks.1.attn.qkv.weight' absent from the file")
    ):
        create_backbone("hf-hub:lab/vit", tmp_path / "vit")


def test_cls_and_mean_pooling_leaves_the_register_tokens_out(unit: torch.Tensor) -> None:
    """Virchow2's feature: the CLS token beside the mean of the patch tokens, its 4 register
    tokens in neither."""
    from hiresctl.models.encoders import Encoder, Transform

    model = timm.create_model("test_vit", pretrained=False, num_classes=0, reg_tokens=4).eval()
    encoder = Encoder(model, 2 * model.num_features, Transform(), "cls+mean")
    with torch.no_grad():
        tokens = model.forward_features(normalize(unit))
        ours = encoder.forward_features(normalize(unit))
    assert tokens.shape[1] == 1 + 4 + 16  # CLS, registers, a 4 × 4 grid of 16-pixel patches
    expect = torch.cat([tokens[:, 0], tokens[:, 5:].mean(dim=1)], dim=1)
    assert ours.shape == (2, 2 * model.num_features) and torch.allclose(ours, expect)


def test_a_run_on_a_hub_encoder_evaluates_where_its_weights_are_not(
    tmp_path: Path, cli: Callable
) -> None:
    """PatchGD trains a Hub encoder given as a folder; the checkpoint records the encoder, so
    evaluation rebuilds it (architecture, normalisation, pooling) with the weights gone."""
    import shutil

    from tests.stores import make_store, planted_images

    images, labels = planted_images(
        6, 64, 32, seed=4, split_of=lambda i: "val" if i >= 4 else "train"
    )
    store = make_store(tmp_path / "s", images, labels)
    hub_folder(tmp_path / "vit", fixed_side=32)
    run = tmp_path / "run"
    options = ["--set", "backbone=hf-hub:lab/vit", "--set", f"pretrained={tmp_path / 'vit'}"]
    trained = cli(
        "train",
        "--data",
        store,
        "--out",
        run,
        "--method",
        "patchgd",
        "--set",
        "epochs=1",
        "--set",
        "patch_size=32",
        "--set",
        "precision=fp32",
        *options,
        "--json",
    )
    assert trained.code == 0, trained.stderr
    before = cli("eval", run, "--data", store, "--split", "val", "--json")
    shutil.rmtree(tmp_path / "vit")
    after = cli("eval", run, "--data", store, "--split", "val", "--json")
    assert after.code == 0, after.stderr
    assert json.loads(after.stdout)["metrics"] == json.loads(before.stdout)["metrics"]
    from hiresctl.train.checkpoint import load_checkpoint

    record = load_checkpoint(run / "checkpoints" / "best.pt")["encoder"]
    assert record["transform"]["size"] == 32 and record["transform"]["mean"] == [0.6, 0.5, 0.4]


def test_grad_checkpointing_keeps_the_gradients_and_saves_memory(unit: torch.Tensor) -> None:
    """Checkpointing a ViT's blocks recomputes them in the backward: the same gradients, and
    what autograd keeps per patch (what --memory-budget plans with) shrinks."""
    from hiresctl.models import PatchEncoder
    from hiresctl.train.memory import patch_cost

    encoder = create_backbone("timm:test_vit").train()
    x = normalize(unit)
    grads = []
    costs = []
    for checkpointing in (False, True):
        encoder.set_grad_checkpointing(checkpointing)
        encoder.zero_grad()
        encoder.forward_features(x).square().sum().backward()
        grads.append([p.grad.clone() for p in encoder.parameters()])
        costs.append(patch_cost(PatchEncoder(encoder, None), x[:1]).grad)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(*grads, strict=True))
    assert costs[1] < 0.7 * costs[0]


def test_the_budget_turns_checkpointing_on_when_it_fits_more_patches(tmp_path: Path) -> None:
    """With a timm encoder, --memory-budget plans the step with and without gradient
    checkpointing and takes checkpointing where it fits more patches per step; with a budget
    that fits every patch without it, it stays off."""
    from hiresctl.data import LabelledImage
    from hiresctl.train import Recipe, build_run
    from hiresctl.train.trainer import budget_plan
    from storage import Dataset
    from tests.stores import make_store, planted_images

    images, labels = planted_images(2, 512, 64, seed=1)
    store = make_store(tmp_path / "s", images, labels)
    recipe = Recipe(
        method="patchgd",
        backbone="timm:test_vit",
        patch_size=64,
        batch_size=1,
        sample_fraction=1.0,
        precision="fp32",
        latent_dim=None,
    )
    run = build_run(recipe, Dataset(store), ["0", "1"], torch.device("cpu"))
    train = [LabelledImage(i, 0) for i in sorted(images)]
    huge = "1e12"
    plain = run.memory_plan(huge, train)
    encoder = run.model.encoder.backbone
    encoder.set_grad_checkpointing(True)
    checkpointed = run.memory_plan(huge, train)
    encoder.set_grad_checkpointing(False)
    assert plain.patches_per_step == checkpointed.patches_per_step == 64  # every patch fits
    assert checkpointed.estimate < plain.estimate
    between = str((plain.estimate + checkpointed.estimate) // 2)
    chosen, on = budget_plan(run, between, train)
    assert on and chosen.patches_per_step == 64 and encoder.body.grad_checkpointing
    encoder.set_grad_checkpointing(False)
    roomy = str(plain.estimate * 2)
    chosen, on = budget_plan(run, roomy, train)
    assert not on and chosen.patches_per_step == 64 and not encoder.body.grad_checkpointing


def test_full_refuses_an_encoder_of_one_input_size(tmp_path: Path) -> None:
    """`full` with a ViT of fixed input side would shrink the whole image to it: refused in
    one line; a patch method takes it (its patches are resized)."""
    from hiresctl.train import Recipe, build_run
    from storage import Dataset
    from tests.stores import make_store, planted_images

    images, labels = planted_images(2, 64, 32, seed=1)
    store = make_store(tmp_path / "s", images, labels)
    hub_folder(tmp_path / "vit", fixed_side=32)
    options = {"backbone": "hf-hub:lab/vit", "pretrained": str(tmp_path / "vit")}
    with pytest.raises(UsageError, match="takes 32² inputs only"):
        build_run(Recipe(method="full", **options), Dataset(store), ["0", "1"], torch.device("cpu"))
    build_run(Recipe(method="patchgd", **options), Dataset(store), ["0", "1"], torch.device("cpu"))


def test_short_names_carry_the_transforms_their_sources_publish() -> None:
    """docs/encoders.md cites each short name's source (model card, timm's configuration);
    the registry holds exactly the size, interpolation, mean, std, pooling, width and Hub
    repository that table states."""
    from hiresctl.models.encoders import KNOWN

    table = Path(__file__).resolve().parents[2] / "docs" / "encoders.md"
    rows = {}
    for line in table.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 10 and cells[0].startswith("`") and cells[0] != "name":
            rows[cells[0].strip("`")] = cells
    assert set(rows) == set(KNOWN)

    def floats(text: str) -> tuple[float, ...]:
        return tuple(float(v) for v in text.split(","))

    for name, known in KNOWN.items():
        _, architecture, hub, side, interpolation, mean, std, pooling, width, _ = rows[name]
        t = known.transform
        assert architecture.startswith(f"`{known.architecture}`"), name
        assert hub.startswith(f"`{known.hub}`"), name
        assert side == ("any" if t.size is None else str(t.size)), name
        assert (interpolation, pooling, int(width)) == (t.interpolation, known.pooling, known.width)
        assert floats(mean) == t.mean and floats(std) == t.std, name


def _small_store(tmp_path: Path) -> Path:
    from tests.stores import make_store, planted_images

    images, labels = planted_images(2, 64, 32, seed=1)
    return make_store(tmp_path / "s", images, labels)


def test_embed_a_timm_vit_from_a_safetensors_file(tmp_path: Path, cli: Callable) -> None:
    """`hiresctl embed DS --encoder timm:vit_small_patch16_224 --pretrained W.safetensors`:
    the ViT's features of every patch (resized to its 224²), its transform recorded."""
    from storage import Dataset

    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "vit_small.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    store = _small_store(tmp_path)
    result = cli(
        "embed",
        store,
        "--encoder",
        "timm:vit_small_patch16_224",
        "--pretrained",
        weights,
        "--patch-size",
        "32",
        "--name",
        "vit",
        "--dtype",
        "float32",
    )
    assert result.code == 0, result.stderr
    features, _, attrs = Dataset(store).feature_set("im000", "vit")
    assert features.shape == (4, 384)
    assert attrs["transform"] == {
        "size": 224,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }
    assert attrs["provenance"]["weights_source"] == "pretrained"


@pytest.mark.slow
def test_embed_uni_from_its_folder(tmp_path: Path, cli: Callable) -> None:
    """`hiresctl embed DS --encoder uni --pretrained UNI_DIR`: UNI's architecture (ViT-L/16,
    random weights here, 1.2 GB) written as its Hub folder holds it (pytorch_model.bin), loaded
    offline, 1024-wide CLS features at 224² with ImageNet statistics."""
    from hiresctl.models.encoders import KNOWN, _layers
    from storage import Dataset

    uni = KNOWN["uni"]
    model = timm.create_model(uni.architecture, num_classes=0, **_layers(uni.kwargs))
    folder = tmp_path / "UNI"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    del model
    store = _small_store(tmp_path)
    result = cli("embed", store, "--encoder", "uni", "--pretrained", folder, "--patch-size", "32")
    assert result.code == 0, result.stderr
    features, _, attrs = Dataset(store).feature_set("im000", "uni")
    assert features.shape == (4, 1024) and attrs["pooling"] == "cls"
    assert attrs["transform"]["size"] == 224 and attrs["transform"]["interpolation"] == "bilinear"


@pytest.mark.slow
def test_embed_phikon_from_its_folder(tmp_path: Path, cli: Callable, unit: torch.Tensor) -> None:
    """`hiresctl embed DS --encoder phikon --pretrained PHIKON_DIR`: a ViT-B/16 of Phikon's
    configuration (random weights here, 0.35 GB) saved by transformers' ``save_pretrained``
    with Phikon's processor file, loaded by the short name: transformers' CLS feature, 768
    wide, at 224² with ImageNet statistics and bilinear resizing."""
    from storage import Dataset

    # Phikon's preprocessor_config.json: no "resample" (the processor's bilinear), side 224
    processor = {k: v for k, v in IMAGENET_PROCESSOR.items() if k != "resample"} | {"size": 224}
    shape = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12}
    shape |= {"intermediate_size": 3072, "image_size": 224, "patch_size": 16}
    source = transformers_vit_folder(tmp_path / "phikon", processor, **shape)
    encoder = create_backbone("phikon", tmp_path / "phikon").eval()
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))
        pixels = _resized(unit, 224, "bilinear", processor["image_mean"], processor["image_std"])
        theirs = source(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(ours, theirs, atol=1e-4)
    del source, encoder
    store = _small_store(tmp_path)
    result = cli(
        "embed",
        store,
        "--encoder",
        "phikon",
        "--pretrained",
        tmp_path / "phikon",
        "--patch-size",
        "32",
    )
    assert result.code == 0, result.stderr
    features, _, attrs = Dataset(store).feature_set("im000", "phikon")
    assert features.shape == (4, 768) and attrs["pooling"] == "cls"
    assert attrs["transform"]["size"] == 224 and attrs["transform"]["interpolation"] == "bilinear"


def test_conch_without_its_package_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hiresctl.models import conch

    monkeypatch.setattr(conch, "available", lambda: False)
    with pytest.raises(UsageError) as caught:
        conch.build()
    message = str(caught.value)
    assert "github.com/mahmoodlab/CONCH" in message and "\n" not in message


@pytest.mark.skipif(
    not conch_available(),
    reason="CONCH's package (installed from its repository, not on the index) is absent",
)
def test_conch_computes_what_conchs_own_package_computes(
    tmp_path: Path, unit: torch.Tensor
) -> None:
    """`--encoder conch --pretrained DIR`: a CONCH checkpoint (random weights here, saved
    whole as its Hub folder holds it) gives through the short name the feature CONCH's own
    factory and ``encode_image(x, proj_contrast=False, normalize=False)`` compute from the same
    file, at 448² (bicubic) with CLIP's statistics; an image tower missing a tensor is refused."""
    import warnings

    from hiresctl.models.encoders import encoder_from_record
    from hiresctl.models.known import OPENAI_MEAN, OPENAI_STD

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import conch.open_clip_custom as package

    config = json.loads(
        (Path(package.__file__).parent / "model_configs" / "conch_ViT-B-16.json").read_text()
    )
    config.pop("custom_text", None)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = package.CoCa(**config)
    folder = tmp_path / "CONCH"
    folder.mkdir()
    torch.save(written.state_dict(), folder / "pytorch_model.bin")
    del written
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = package.create_model(
            "conch_ViT-B-16", checkpoint_path=str(folder / "pytorch_model.bin")
        ).eval()
    encoder = create_backbone("conch", folder).eval()
    assert encoder.num_features == 512 and encoder.transform.size == 448
    with torch.no_grad():
        ours = encoder.forward_features(normalize(unit))
        pixels = _resized(unit, 448, "bicubic", list(OPENAI_MEAN), list(OPENAI_STD))
        theirs = theirs_model.encode_image(pixels, proj_contrast=False, normalize=False)
    assert torch.allclose(ours, theirs, atol=1e-4)
    # a checkpoint's record rebuilds it without the weights file (the checkpoint holds them)
    rebuilt = encoder_from_record(encoder.provenance).eval()
    rebuilt.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(normalize(unit)), ours)
    state = torch.load(folder / "pytorch_model.bin")
    del state["visual.ln_contrast.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(UsageError, match=re.escape("ln_contrast.weight' absent from the file")):
        create_backbone("conch", folder)
