"""What the ``rewardkit`` commands read from their arguments: image files and folders, prompts per image
(``--prompt`` / ``--prompts FILE``), ``NAME=VALUE`` specs (``--weights``, ``--server``), and which rewards
``score`` can feed. Shared by ``cli.py`` and the engines it dispatches to (``cli_serve.py``), so neither
imports the other's command module.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from rewardkit.registry import get_entry
from rewardkit.registry import names as registry_names

__all__ = ["OUTPUT_SUFFIXES", "collect_images", "read_prompts", "parse_weights", "check_rewards"]

OUTPUT_SUFFIXES = (".jsonl", ".csv")


def collect_images(specs: Sequence[str]) -> list[tuple[Path, Path | None]]:
    """``(file, folder it was listed from or None)`` per image: folders listed sorted, files as given."""
    from rewardkit.image_io import list_images

    found: list[tuple[Path, Path | None]] = []
    for spec in map(Path, specs):
        if not spec.exists():
            raise FileNotFoundError(f"--images {spec}: no such file or folder")
        found += [(image, spec) for image in list_images(spec)] if spec.is_dir() else [(spec, None)]
    return found


def _read_prompt_table(path: Path) -> dict[str, str]:
    """``image key -> prompt`` from a .jsonl or .csv file with 'image' and 'prompt' columns."""
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            records = list(csv.DictReader(handle))
    else:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    table: dict[str, str] = {}
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not {"image", "prompt"} <= set(record):
            raise ValueError(f"--prompts {path}: record {number} lacks an 'image' or 'prompt' column: {record!r}")
        key, prompt = Path(str(record["image"])).as_posix(), str(record["prompt"])
        if table.setdefault(key, prompt) != prompt:
            raise ValueError(f"--prompts {path}: image {key!r} is listed twice with different prompts")
    return table


def read_prompts(images: list[tuple[Path, Path | None]], prompt: str | None,
                 prompts_file: str | None) -> list[str] | None:
    """One prompt per image from --prompt (broadcast) or --prompts FILE; ``None`` when neither is given."""
    if prompt is not None or prompts_file is None:
        return None if prompt is None else [prompt] * len(images)
    path = Path(prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    if path.suffix.lower() == ".txt":
        lines = path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(images):
            raise ValueError(f"--prompts {path} has {len(lines)} prompts but there are {len(images)} images; a .txt "
                             "file needs one prompt per line in image order (or use .jsonl/.csv with image, prompt)")
        return lines
    if path.suffix.lower() not in (".jsonl", ".csv"):
        raise ValueError(f"--prompts {path}: unsupported file type {path.suffix!r}; use .txt, .jsonl or .csv")
    table, prompts = _read_prompt_table(path), []
    for image, root in images:
        keys = list(dict.fromkeys(([image.relative_to(root).as_posix()] if root else [])
                                  + [image.as_posix(), image.name]))
        match = next((table[key] for key in keys if key in table), None)
        if match is None:
            raise ValueError(f"--prompts {path} has no prompt for image {image} (looked for image = "
                             f"{' or '.join(map(repr, keys))}); add a row for it")
        prompts.append(match)
    return prompts


def parse_weights(specs: Sequence[str], names: Sequence[str], flag: str = "--weights") -> dict[str, str]:
    """``flag`` values (--weights, --server, --served-model) -> ``{reward name: value}``: ``NAME=VALUE`` each, or
    one bare VALUE for one reward."""
    weights: dict[str, str] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if sep and name in names:
            weights[name] = value
        elif sep and name in registry_names():
            raise ValueError(f"{flag} {spec}: {name!r} is not among the rewards being scored ({', '.join(names)})")
        elif len(names) == 1 and len(specs) == 1:
            weights[names[0]] = spec
        else:
            raise ValueError(f"{flag} {spec}: with several rewards, give {flag} NAME=VALUE for each")
    return weights


def check_rewards(names: Sequence[str], have_prompts: bool, served: Sequence[str] = ()) -> None:
    """Refuse, before any model loads, rewards that `rewardkit score` cannot feed (references, sources, prompts)."""
    for entry in map(get_entry, names):
        if entry.kind != "reward" or entry.requires_reference or entry.requires_source:
            raise ValueError(f"{entry.name} is not a per-image reward without references or source images; "
                             "`rewardkit score` takes the other rewards of `rewardkit list --kind reward` (use the "
                             "Python API with reference= / source= for this one)")
        if entry.name in served and not entry.generative:
            raise ValueError(f"--server / --served-model apply to VLM judges (e.g. unified-reward-2), not {entry.name}")
        if entry.requires_prompt and not have_prompts:
            raise ValueError(f"{entry.name} needs a prompt per image; pass --prompt TEXT or --prompts FILE")
