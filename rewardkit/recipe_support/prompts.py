"""Prompts of the ``recipes/``: the built-in set, prompt files with their metadata, and flow_grpo's K-repeat sampling
(re-exported by ``common``, which documents the recipe conventions).

Prompt files (a config's ``prompts``): ``.txt``, one prompt per line (flow_grpo ``dataset/<task>/train.txt``); or
``.jsonl``, one JSON object per line with a ``"prompt"`` string and any other fields, e.g. GenEval's ``tag`` /
``include`` / ``exclude`` (flow_grpo ``dataset/geneval/train_metadata.jsonl``). As flow_grpo's
``GenevalPromptDataset`` (``yifan123/flow_grpo`` ``scripts/train_sd3.py``) does, the whole object of a line is its
prompt's metadata, and it travels with the prompt: the recipes pass ``metadata=`` one record per image.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Sequence

__all__ = ["BUILTIN_PROMPTS", "PromptList", "load_prompts", "PromptMetadataReward", "k_repeat_prompts"]

# Our own prompt set (used when ``prompts`` is None): varied subjects, colours and styles.
BUILTIN_PROMPTS = (
    "a red apple on a wooden table", "a lighthouse on a cliff at sunset", "a cat sleeping on a windowsill",
    "a bowl of ramen, studio photograph", "a snowy mountain village at night", "an astronaut riding a bicycle",
    "a watercolor painting of a fox", "a vintage car in the rain", "a glass of orange juice in sunlight",
    "a castle made of sand on a beach", "a dragon flying over a forest", "a cozy library with tall shelves",
    "a portrait of an old fisherman", "a field of sunflowers under a blue sky", "a robot playing chess",
    "a sailboat on a calm lake at dawn",
)


class PromptList(list):
    """The training prompts (a ``list[str]``, what ``load_prompts`` returns) and each prompt's metadata record.

    ``records`` maps a prompt to the whole JSON object of its ``.jsonl`` line (``"prompt"`` included, as flow_grpo's
    ``GenevalPromptDataset`` passes it); it is empty for ``.txt`` files and the built-in prompts.
    """

    def __init__(self, prompts: Sequence[str], records: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(prompts)
        self.records = dict(records or {})

    def metadata_for(self, batch: Sequence[str]) -> list[dict[str, Any]] | None:
        """One record per prompt of ``batch`` (repeats included), for ``reward(..., metadata=...)``; ``None``
        without records.

        Raises:
            ValueError: a prompt of ``batch`` that the prompt file does not hold.
        """
        if not self.records:
            return None
        missing = [prompt for prompt in batch if prompt not in self.records]
        if missing:
            raise ValueError(f"metadata_for: no metadata record for prompt {missing[0]!r}; sample prompts from the "
                             ".jsonl prompt file that holds their records")
        return [self.records[prompt] for prompt in batch]


def load_prompts(cfg: Any) -> PromptList:
    """The training prompts of ``cfg.prompts`` (a ``.txt`` or ``.jsonl`` file, see the module docstring), or
    ``BUILTIN_PROMPTS``; ``.jsonl`` records are kept in ``PromptList.records``.

    Raises:
        ValueError: a missing or empty file, a ``.jsonl`` line that is not an object with a non-empty ``"prompt"``
            string, one prompt on two lines with different records (metadata travels with its prompt), or a
            registry reward with ``requires_metadata`` (GenEval) and no records to give it.
    """
    if cfg.prompts is None:
        prompts = PromptList(BUILTIN_PROMPTS)
    else:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise ValueError(f"config: prompts must be a .txt file (one prompt per line) or a .jsonl file (one "
                             f'{{"prompt": ...}} object per line), got {cfg.prompts!r}, which is not a file')
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)]
        lines = [(n, line) for n, line in lines if line]
        if not lines:
            raise ValueError(f"config: the prompts file {path} has no non-empty line")
        prompts = _read_jsonl(path, lines) if path.suffix.lower() == ".jsonl" else PromptList([t for _, t in lines])
    from rewardkit.registry import get_entry

    for name in cfg.rewards:
        if ":" not in name and get_entry(name).requires_metadata and not prompts.records:
            raise ValueError(f"config: reward {name!r} scores each image against its prompt's metadata record, but "
                             f"prompts {cfg.prompts!r} has none; use a .jsonl prompt file with one record per line "
                             "(flow_grpo dataset/geneval/train_metadata.jsonl)")
    return prompts


def _read_jsonl(path: Path, lines: list[tuple[int, str]]) -> PromptList:
    records: dict[str, dict[str, Any]] = {}
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"config: {path} line {number} is not JSON ({error}); write one object per line") from None
        prompt = record.get("prompt") if isinstance(record, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'config: {path} line {number} must be an object with a non-empty "prompt" string, got '
                             f"{line[:120]!r}")
        if records.setdefault(prompt, record) != record:
            raise ValueError(f"config: {path} line {number} repeats the prompt {prompt!r} with a different record; "
                             "metadata travels with its prompt, so give each prompt one record")
    return PromptList(list(records), records)


class PromptMetadataReward:
    """``reward`` called with each prompt's record as ``metadata=``, for callers that pass only images and prompts
    (``RewardEvalCallback``). Exposes the reward's ``name``, ``part_names`` and ``update_stats``; ``evaluate`` takes
    ``update_stats=`` (a composition's evaluation-only switch) and further keywords through to ``reward.evaluate``.

    Args:
        reward: a RewardFn, typically ``rk.compose(...)`` (which hands ``metadata=`` to its parts).
        prompts: the prompts with their records; every scored prompt must be one of them.
    """

    def __init__(self, reward: Any, prompts: PromptList) -> None:
        self.reward, self.prompts = reward, prompts

    @property
    def name(self) -> str:
        return self.reward.name

    @property
    def part_names(self) -> list[str]:
        return list(getattr(self.reward, "part_names", []))

    @property
    def update_stats(self) -> bool:  # RewardEvalCallback freezes a z-score composition's statistics through this
        return bool(getattr(self.reward, "update_stats", False))

    def evaluate(self, images: Any, prompts: str | Sequence[str], *, update_stats: bool | None = None,
                 **context: Any) -> Any:
        """``reward.evaluate(images, prompts, metadata=<one record per image>, ...)`` for float ``(B, 3, H, W)``
        images in ``[0, 1]``; a single prompt is broadcast to the ``B`` images."""
        rows = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
        if update_stats is not None:
            context["update_stats"] = update_stats
        return self.reward.evaluate(images, prompts, metadata=self.prompts.metadata_for(rows), **context)

    def __call__(self, images: Any, prompts: str | Sequence[str], **context: Any) -> Any:
        return self.evaluate(images, prompts, **context).scores


def k_repeat_prompts(prompts: Sequence[str], group_size: int, num_groups: int, step: int, rank: int, world: int,
                     seed: int = 0) -> list[str]:
    """This rank's prompts for one step: ``num_groups`` distinct prompts, each ``group_size`` times,
    shuffled over the global batch (groups span ranks) and split into equal contiguous shares.

    Every rank draws the same global list (seeded by ``seed`` and ``step``), as flow_grpo's
    ``DistributedKRepeatSampler``. Group statistics therefore need the gathered batch
    (``per_prompt_advantages`` gathers).

    Raises:
        ValueError: fewer distinct prompts than groups, or a global batch not divisible by ``world``.
    """
    distinct = list(dict.fromkeys(prompts))
    if len(distinct) < num_groups:
        raise ValueError(f"k_repeat_prompts: {num_groups} groups need {num_groups} distinct prompts, got "
                         f"{len(distinct)}; add prompts or lower the number of prompts per step")
    total = group_size * num_groups
    if total % world:
        raise ValueError(f"k_repeat_prompts: {total} images per step cannot be split over {world} processes")
    rng = random.Random(seed * 1_000_003 + step)
    chosen = rng.sample(distinct, num_groups)
    batch = [prompt for prompt in chosen for _ in range(group_size)]
    rng.shuffle(batch)
    share = total // world
    return batch[rank * share:(rank + 1) * share]
