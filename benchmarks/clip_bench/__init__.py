"""The pieces of ``benchmarks/bench_clip_rewards.py``, one job per module.

* ``inputs``: the GRPO-shaped benchmark batch (prompts, smooth random images, their float tensor);
* ``checkpoints``: the model sizes and seeded random checkpoints in each reward's real format;
* ``references``: the upstream reference computations, loaded from the same files;
* ``timing``: interleaved timing of several modes, medians, foreign CPU load;
* ``run``: one reward end to end (load, time, fidelity, optional stage breakdown);
* ``report``: the machine header, the Markdown tables and the raw JSON.

Import with ``benchmarks/`` on ``sys.path`` (the scripts there put it first).
"""
