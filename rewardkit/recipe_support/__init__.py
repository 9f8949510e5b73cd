"""The plumbing of the single-file recipes in ``recipes/``: config parsing, models (tiny under ``--tiny``), LoRA,
prompts with their metadata, checkpoints and resume, evaluation callbacks.

With the CLI's ``--tiny`` flags, the only production code that imports ``rewardkit.testing``.
"""
