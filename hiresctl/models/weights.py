"""Where an encoder's weights are on this machine, and reading them. Nothing is downloaded:
a path given (``--pretrained``: a state-dict file or a Hub-format folder), the site's weights
file (``HIRESCTL_WEIGHTS``, else ``~/.config/hiresctl/weights.yaml``: encoder name → path),
or the Hugging Face cache when it already holds the files (looked up in the cache alone)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hiresctl.models.files import safe_torch_load
from storage import StoreError, UsageError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def site_weights() -> tuple[Path | None, dict[str, str]]:
    """The site's name → path file (``HIRESCTL_WEIGHTS``, else the user's config) and its map."""
    import yaml

    env = os.environ.get("HIRESCTL_WEIGHTS")
    path = Path(env) if env else Path.home() / ".config" / "hiresctl" / "weights.yaml"
    if not path.is_file():
        if env:
            raise UsageError(f"{path}: HIRESCTL_WEIGHTS names no file")
        return None, {}
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UsageError(f"{path}: not a readable weights file ({exc})") from None
    if not isinstance(table, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in table.items()
    ):
        raise UsageError(f"{path}: expected lines `encoder-name: /path/to/weights`")
    return path, {k: os.path.expanduser(v) for k, v in table.items()}


def hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a Hub repository that holds weights, found in the cache
    alone (no request is made); None when the cache lacks them."""
    from huggingface_hub import try_to_load_from_cache

    for name in WEIGHT_FILES:
        found = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


@dataclass(frozen=True)
class Weights:
    """Where an encoder's weights were found: a file or Hub-format folder, or none (random)."""

    path: Path | None
    source: str  # "pretrained" | "site" | "hub-cache" | "random"
    revision: str | None = None

    def file(self) -> Path | None:
        if self.path is None or self.path.is_file():
            return self.path
        for name in WEIGHT_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise UsageError(
            f"{self.path}: a Hub-format folder holds one of {', '.join(WEIGHT_FILES)}; "
            "none is there"
        )

    def config(self) -> dict[str, Any]:
        """The folder's timm ``config.json`` (architecture, model_args, pretrained_cfg)."""
        if self.path is None or self.path.is_file() or not (self.path / "config.json").is_file():
            return {}
        where = self.path / "config.json"
        try:
            config = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"{where}: not a readable JSON file ({exc})") from None
        if not isinstance(config, dict):
            raise UsageError(f"{where}: expected a JSON object")
        return config


@dataclass(frozen=True)
class Published:
    """Where a name's weights are published on the Hub, and whether it needs them."""

    repo: str | None = None
    revision: str | None = None
    files: tuple[str, ...] = WEIGHT_FILES
    gated: bool = False
    required: bool = False  # no random weights for it: refuse when none are found


def find_weights(name: str, pretrained: str | Path | None, published: Published) -> Weights:
    """Where ``name``'s weights are (module docstring): ``pretrained``, the site's weights
    file, the Hub cache; never a download."""
    if pretrained:
        path = Path(pretrained)
        if not path.exists():
            raise UsageError(f"{path}: pretrained weights not found")
        return Weights(path, "pretrained")
    site, table = site_weights()
    if name in table:
        path = Path(table[name])
        if not path.exists():
            raise UsageError(f"{site}: {name}: {path} does not exist")
        return Weights(path, "site")
    if published.repo is not None:
        snapshot = hub_snapshot(published.repo, published.revision)
        if snapshot is not None:
            return Weights(snapshot, "hub-cache", published.revision or snapshot.name)
    if published.required:
        raise UsageError(missing_weights(name, site, published))
    return Weights(None, "random")


def missing_weights(name: str, site: Path | None, published: Published) -> str:
    """One line: which file to place where."""
    repo, files = published.repo, published.files
    where = site or Path.home() / ".config" / "hiresctl" / "weights.yaml"
    gated = " (gated: accept its terms on the Hub first)" if published.gated else ""
    return (
        f"{name}: weights not found on this machine; place {files[0]} of "
        f"https://huggingface.co/{repo}{gated} in a folder and give --pretrained FOLDER, or "
        f"name it in {where} (`{name}: /path/to/{files[0]}`), or fill the Hugging Face cache "
        f"on a machine with network (`huggingface-cli download {repo}`); nothing is downloaded"
    )


def weights_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a weights-only torch file, unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{path}: not a readable safetensors file ({exc})") from None
    else:
        try:
            state = safe_torch_load(path, "pretrained weights")
        except StoreError as exc:
            raise UsageError(str(exc)) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path}: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}
