"""Rewards as a service: ``rewardkit serve`` (Ray Serve deployments), wire formats, and the remote-reward client.

``RemoteReward`` (``rk.load(name, server=URL)``) is a RewardFn that scores on one or more servers; the
server side (``deployment.py``) needs ``pip install rewardkit[serve]`` and is imported only when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RemoteReward", "load_remote"]


def __getattr__(name: str) -> Any:  # lazy: `import rewardkit.serve` pulls in neither Ray nor HTTP code
    if name in __all__:
        from rewardkit.serve import client

        return getattr(client, name)
    raise AttributeError(f"module 'rewardkit.serve' has no attribute {name!r}")
