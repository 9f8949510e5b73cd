"""Adapters from rewardkit rewards to the contracts of training code bases (DDPO, TRL, callbacks)."""
