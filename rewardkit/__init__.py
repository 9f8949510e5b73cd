"""rewardkit: faithful, differentiable, fast rewards and evaluation metrics for text-to-image fine-tuning.

    import rewardkit as rk
    reward = rk.load("pickscore")              # a RewardFn (an nn.Module)
    scores = reward(images, prompts)           # images: float (B, 3, H, W) in [0, 1] -> (B,) float32

``import rewardkit`` stays light: model libraries (transformers, open_clip) load when a reward does.
"""

from __future__ import annotations

from rewardkit.compose import ComposedReward, compose
from rewardkit.protocols import DistributionMetric, Reward, RewardFn, RewardOutput
from rewardkit.registry import Entry, list_rewards, load, register

__version__ = "0.1.0"

__all__ = [
    "ComposedReward", "DistributionMetric", "Entry", "Reward", "RewardFn", "RewardOutput",
    "compose", "list_rewards", "load", "register", "__version__",
]
