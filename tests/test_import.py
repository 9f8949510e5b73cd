"""``import rewardkit`` stays light: no model library is imported until a reward is loaded."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("transformers", "open_clip", "diffusers", "timm", "PIL")


def test_import_rewardkit_imports_no_model_library() -> None:
    code = (
        "import sys, rewardkit, rewardkit.registry, rewardkit.protocols\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(','.join(loaded))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
