"""Drop-in APIs of other projects, implemented as thin wrappers over rewardkit's rewards.

* ``rewardkit.compat.diffsynth``: DiffSynth-Studio's ``diffsynth.metrics`` names and call shapes
  (``ModelConfig``, ``PickScoreMetric.from_pretrained(...).compute(prompt, images)``, ...), re-exported
  lazily by ``rewardkit.metrics`` so that changing the import is the whole migration. Scores follow the
  upstream implementations, not DiffSynth's deviations; each class's docstring says where they differ.

Nothing here is imported by ``import rewardkit``.
"""
