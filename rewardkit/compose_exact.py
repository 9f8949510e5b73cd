"""A composition's exact path: PIL images or files of any sizes, each part scored by its own ``evaluate_pil``
where it has one (upstream preprocessing), by its tensor path on ``image_io.to_tensor`` images, one batch per
image size, otherwise; then the same combination, statistics and tickets as the tensor path.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from rewardkit.compose_checks import checked_scores, takes_context
from rewardkit.errors import check_prompts
from rewardkit.protocols import RewardOutput

__all__ = ["ExactPathComposition"]


class ExactPathComposition:
    """The exact path of :class:`rewardkit.compose.ComposedReward` (a mixin: it uses the composition's parts,
    locks, context routing, tickets and combination)."""

    def evaluate_pil(self, images: Any, prompts: str | list[str] | None = None, *, ticket: Any = None,
                     update_stats: bool | None = None, **context: Any) -> RewardOutput:
        """Exact path: PIL images or files (sizes may differ); each part's own ``evaluate_pil`` where it has
        one, its tensor path on ``image_io.to_tensor`` images (one call per image size) otherwise. Same
        combination, statistics and tickets as ``evaluate``."""
        ticket, update = self._ticket(ticket), self.update_stats if update_stats is None else bool(update_stats)
        try:
            self._check_context(context)
            raw = self._pil_raw(images, prompts, context)
        except BaseException:
            self._statistics(ticket, None, update)
            raise
        return self._combine(raw, ticket, update)

    def score_pil(self, images: Any, prompts: str | list[str] | None = None, **context: Any) -> torch.Tensor:
        """``evaluate_pil(...).scores``: float32 ``(B,)``."""
        return self.evaluate_pil(images, prompts, **context).scores

    def _pil_raw(self, images: Any, prompts: Any, context: dict) -> dict[str, torch.Tensor]:
        from rewardkit.image_io import as_rgb_images

        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            raise ValueError(f"{self.name}: expected at least one image, got an empty list")
        pil = as_rgb_images(items)
        prompt_list = check_prompts(self.name, prompts, len(pil), self.requires_prompt)
        exact = [k for k in self.part_names if callable(getattr(self._part(k), "evaluate_pil", None))]
        raw = {}
        for name in exact:
            method = self._part(name).evaluate_pil
            with self._lock(name):  # context goes where the part's exact path takes it (its tensor path ignores it)
                part_context = self._context_for(name, context)
                out = method(pil, prompt_list, **(part_context if takes_context(method) else {}))
            raw[name] = checked_scores(name, out.scores, len(pil))
        rest = [k for k in self.part_names if k not in raw]
        if rest:
            raw.update(self._per_size_raw(rest, pil, prompt_list, context))
        device = raw[self.part_names[0]].device
        return {k: raw[k].to(device) for k in self.part_names}

    def _per_size_raw(self, names: list[str], pil: list, prompts: list[str] | None,
                      context: dict) -> dict[str, torch.Tensor]:
        """Tensor path for parts without an exact path: one batch per image size, rows put back in order."""
        from rewardkit.image_io import to_tensor

        groups: dict[tuple[int, int], list[int]] = {}
        for row, image in enumerate(pil):
            groups.setdefault(image.size, []).append(row)
        if len(groups) > 1 and any(self._context_for(name, context) for name in names):
            raise ValueError(f"{self.name}: {sorted(context)} given with images of {len(groups)} sizes; parts "
                             f"{names} have no exact path and are scored per size; pass images of one size")
        device = next((p.device for k in names if isinstance(self._part(k), nn.Module)
                       for p in self._part(k).parameters()), torch.device("cpu"))
        out: dict[str, torch.Tensor] = {}
        for rows in groups.values():
            batch = to_tensor([pil[i] for i in rows]).to(device)
            sub = self._tensor_raw(names, batch, None if prompts is None else [prompts[i] for i in rows], context)
            if len(groups) == 1:
                return sub
            for name, values in sub.items():
                column = out.setdefault(name, torch.full((len(pil),), math.nan, device=values.device))
                column[torch.tensor(rows, device=values.device)] = values
        return out
