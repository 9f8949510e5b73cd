"""The RL maths the recipes and adapters use: log-probs, advantages and per-prompt trackers, multi-reward and
groupwise advantages, saturation signals, the Diffusion-DPO loss, truncated sampling and reward backprop.

Pure and tested on their own; nothing here imports a trainer library or rewardkit's adapters.
"""
