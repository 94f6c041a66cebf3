"""Checkpoints as the project writes them: `<stem>.safetensors` (tensors) beside `<stem>.json` (a config
dict tagged with a format name and version). Used for descriptor models and learned re-rankers."""
from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def staged(path: str | Path, suffix: str, what: str) -> tuple[Path, Path]:
    """`path` and the sibling a writer fills before renaming it into place (so that a killed writer never leaves
    half a file), its folder made; a name not ending in `suffix` is refused, naming `what` it is for."""
    path = Path(path)
    if path.suffix != suffix:
        raise ValueError(f"{what} end in {suffix}, got {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_name(path.name + ".partial")


def write_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], format_name: str, config: dict) -> Path:
    """Write the tensors and `{"format", "version": 1, **config}`; `path` must end in .safetensors. Each file is
    written beside its name and renamed into place (`staged`)."""
    path, partial = staged(path, ".safetensors", "checkpoints")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(partial))
    os.replace(partial, path)
    document = {"format": format_name, "version": 1, **config}
    config_path = path.with_suffix(".json")
    partial = config_path.with_name(config_path.name + ".partial")
    partial.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(partial, config_path)
    return path


def read_config(path: str | Path, format_name: str) -> dict:
    """The config dict of a checkpoint (without format and version), after checking both files exist."""
    path = Path(path)
    config_path = path.with_suffix(".json")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: the JSON config beside {path.name} is missing")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_path}: not valid JSON ({exc})") from exc
    if data.pop("format", None) != format_name or data.pop("version", None) != 1:
        raise ValueError(f"{config_path}: not a {format_name} config (format/version missing or unknown)")
    return data


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: cannot read the weights ({exc})") from exc


def dataclass_from(cls, data: dict, source: str):
    """`cls(**data)`, naming unknown keys and bad values with their source."""
    unknown = set(data) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{source}: unknown config keys {sorted(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc
