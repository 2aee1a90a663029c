"""The export directory's format and its validation: anystory.json (format version, typed config)
and the header of every safetensors file, read without torch, diffusers or any weights. So a broken
export is named in a second, before a model loads: `anystory generate` calls `validate_export`
first, and `load_export` starts with the same call."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from anystory.config import AnyStoryConfig
from anystory.typed_config import ConfigError, parse

FORMAT_VERSION = 1
WEIGHTS_FILE = "anystory.safetensors"
CONFIG_FILE = "anystory.json"
BASE_DIR = "base"  # the embedded base components, in the diffusers folder layout

# Where a non-embedded base comes from: the keys `components.load_pretrained` requires.
REQUIRED_WEIGHTS = ("base", "image_encoder")
# Top-level keys of anystory.json and the JSON type each must have.
DOCUMENT_KEYS: dict[str, type] = {"format_version": int, "base_embedded": bool, "config": dict, "metadata": dict}


class ExportError(ValueError):
    """An export directory that cannot be loaded; the one-line message names the file (and the key)."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except (UnicodeDecodeError, OSError) as err:
        raise ExportError(f"{path}: not readable as JSON ({err})") from None


def read_config(directory: str | Path) -> tuple[AnyStoryConfig, bool]:
    """The model config of an export and whether its base is embedded under base/."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"{directory}: no such directory")
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: is {directory} an AnyStory export directory?")
    document = read_json(path)
    if not isinstance(document, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(document).__name__}")
    if document.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {document.get('format_version')!r} is not {FORMAT_VERSION}")
    for key, kind in DOCUMENT_KEYS.items():
        if key not in document:
            raise ExportError(f"{path}: {key}: required key is missing")
        if not isinstance(document[key], kind):
            raise ExportError(f"{path}: {key}: expected {kind.__name__}, got {document[key]!r}")
    unknown = sorted(set(document) - set(DOCUMENT_KEYS))
    if unknown:
        raise ExportError(f"{path}: {unknown[0]}: unknown key (allowed: {', '.join(sorted(DOCUMENT_KEYS))})")
    try:
        config = parse(AnyStoryConfig, document["config"], "config")
    except ConfigError as err:
        raise ExportError(f"{path}: {err}") from None
    return config, document["base_embedded"]


def check_safetensors(path: Path) -> None:
    """Read the header: safetensors checks that it parses and that the data it describes is all
    in the file, which is what a truncated copy or a file of other bytes fails."""
    if not path.is_file():
        raise ExportError(f"{path} not found")
    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{path}: not a readable safetensors file ({err})") from None


def validate_export(directory: str | Path) -> tuple[AnyStoryConfig, bool]:
    """Everything about an export that can be checked without loading weights: the config, every
    safetensors header and, for an embedded base, every JSON file of its components."""
    directory = Path(directory)
    config, embedded = read_config(directory)
    check_safetensors(directory / WEIGHTS_FILE)
    if not embedded:
        for key in REQUIRED_WEIGHTS:
            if not config.weights.get(key):
                raise ExportError(f"{directory / CONFIG_FILE}: config.weights.{key} is not set and the base is not "
                                  "embedded: give a local path or a hub id already in the local cache")
    if embedded:
        base = directory / BASE_DIR
        if not base.is_dir():
            raise ExportError(f"{base} not found, and {directory / CONFIG_FILE} says the base is embedded there")
        for path in sorted(base.rglob("*.safetensors")):
            check_safetensors(path)
        for path in sorted(base.rglob("*.json")):
            read_json(path)
    return config, embedded
