"""Precision policy: dtype parsing and device-agnostic autocast."""

from __future__ import annotations

import pytest
import torch

from rewardkit.precision import autocast_for, dtype_name, parse_dtype


@pytest.mark.parametrize(("given", "expected"), [(None, None), ("fp32", None), (torch.float32, None),
                                                  ("bf16", torch.bfloat16), ("BF16", torch.bfloat16),
                                                  ("torch.float16", torch.float16), (torch.float16, torch.float16)])
def test_parse_dtype(given, expected) -> None:
    assert parse_dtype(given) is expected


def test_unknown_dtypes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        parse_dtype(torch.float64)


def test_autocast_for_cpu_runs_matmuls_in_bf16() -> None:
    a = torch.randn(4, 4)
    with autocast_for("cpu", torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
    with autocast_for("cpu", None):
        assert (a @ a).dtype == torch.float32
    assert dtype_name(None) == "fp32" and dtype_name(torch.bfloat16) == "bf16"


def test_slow_cpu_autocast_warns_once(monkeypatch) -> None:
    import rewardkit.precision as precision

    monkeypatch.setattr(precision, "cpu_supports", lambda dtype: False)
    monkeypatch.setattr(precision, "_WARNED", set())
    with pytest.warns(RuntimeWarning, match="slower than float32"):
        with autocast_for("cpu", torch.bfloat16):
            pass
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with autocast_for("cpu", torch.bfloat16):  # second time: silent
            pass


def test_exact_mode_stays_exact_inside_a_callers_autocast(tiny_root) -> None:
    """A bf16 training step around an exact reward must not turn it (or its prompt cache) into bf16."""
    import rewardkit.testing as rkt

    images = rkt.random_images(3, 32, 32, seed=4)
    reward = rkt.load_tiny("pickscore", tiny_root / "exact-in-autocast")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reward(images, "a red car")  # fills the prompt cache inside the caller's autocast
    reward.prompt_cache.clear()
    outside = reward(images, "a red car")
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_cast_matmul_weights_casts_only_matmul_weights() -> None:
    from rewardkit.precision import cast_matmul_weights

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LayerNorm(4),
                                torch.nn.Embedding(5, 4), torch.nn.Linear(4, 2))
    attention = torch.nn.MultiheadAttention(4, 2)
    cast_matmul_weights(model, torch.bfloat16)
    cast_matmul_weights(attention, torch.bfloat16)
    assert model[0].weight.dtype == model[0].bias.dtype == model[4].weight.dtype == torch.bfloat16
    assert model[2].weight.dtype == model[3].weight.dtype == torch.float32  # norms and embeddings stay fp32
    assert attention.in_proj_weight.dtype == attention.out_proj.weight.dtype == torch.bfloat16
    assert all(p.requires_grad for p in model.parameters())  # only the data changed


def test_fast_clip_rewards_hold_bf16_weights_apart_from_exact_ones(tiny_root) -> None:
    """Fast mode: matmul weights are bf16 once (no per-call re-cast), norms / logit_scale / heads stay fp32,
    the exact instance on the same files keeps its fp32 towers, and fast instances share one copy."""
    import rewardkit as rk
    import rewardkit.testing as rkt
    from rewardkit.testing.clip import tiny_aesthetic, tiny_pickscore

    images = rkt.random_images(4, 48, 40, seed=5)
    for name, builder in (("pickscore", tiny_pickscore), ("aesthetic", tiny_aesthetic)):
        files = builder(tiny_root / "fast-mode")  # written once: the builders rewrite (new mtime) on every call
        exact = rk.load(name, **files)
        fast = rk.load(name, **files, dtype="bf16")
        again = rk.load(name, **files, dtype="bf16")
        assert fast.towers is not exact.towers and again.towers is fast.towers
        assert all(p.dtype == torch.float32 for p in exact.towers.parameters())
        dtypes = {n: p.dtype for n, p in fast.towers.named_parameters()}
        assert any(d == torch.bfloat16 for n, d in dtypes.items() if n.endswith("proj.weight"))
        assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n or n.endswith("logit_scale"))
        if name == "aesthetic":
            assert all(p.dtype == torch.float32 for p in fast.mlp.parameters())
        reference, scores = exact.evaluate(images, "a red car"), fast.evaluate(images, "a red car")
        assert scores.scores.dtype == torch.float32
        # bf16 really changes the numbers, by little. PickScore is compared on its cosine (the score is
        # exp(logit_scale) x cosine): measured 4.5e-3 (16-d tiny embeddings); aesthetic on its score: 1.4e-4.
        key, tolerance = ("cosine", 2e-2) if name == "pickscore" else (None, 5e-3)
        ours = scores.details[key] if key else scores.scores
        theirs = reference.details[key] if key else reference.scores
        gap = (ours - theirs).abs().max().item()
        assert 0 < gap <= tolerance, (name, gap)


def _attention_pair(batch_first: bool = True) -> tuple[torch.nn.MultiheadAttention, torch.nn.MultiheadAttention]:
    import copy

    from rewardkit.precision import route_attention_through_sdpa

    torch.manual_seed(0)
    plain = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        plain.in_proj_bias.normal_()
        plain.out_proj.bias.normal_()
    return plain, route_attention_through_sdpa(copy.deepcopy(plain))


def test_sdpa_self_attention_equals_multihead_attention() -> None:
    """Same parameters, same outputs as torch's path for open_clip's call (batch-first self-attention with a float
    causal mask, need_weights=False), gradients included; every other call is torch's own forward."""
    import pickle

    from rewardkit.precision import SdpaSelfAttention

    plain, routed = _attention_pair()
    assert type(routed) is SdpaSelfAttention and type(plain) is torch.nn.MultiheadAttention
    assert routed.state_dict().keys() == plain.state_dict().keys()
    mask = torch.full((7, 7), float("-inf")).triu(1)  # open_clip's build_causal_mask
    x = torch.randn(3, 7, 16, requires_grad=True)
    for attn_mask in (mask, None):
        expected = plain(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got, weights = routed(x, x, x, need_weights=False, attn_mask=attn_mask)
        assert weights is None
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    grad_plain, = torch.autograd.grad(plain(x, x, x, need_weights=False, attn_mask=mask)[0].sum(), x)
    grad_routed, = torch.autograd.grad(routed(x, x, x, need_weights=False, attn_mask=mask)[0].sum(), x)
    torch.testing.assert_close(grad_routed, grad_plain, rtol=1e-5, atol=1e-6)
    # Fallbacks: attention weights requested, a padding mask, cross-attention.
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[:, -2:] = True
    y = torch.randn(3, 5, 16)
    for args, kwargs in (((x, x, x), {"attn_mask": mask}), ((x, x, x), {"key_padding_mask": padding}),
                         ((y, x, x), {"need_weights": False})):
        for got, expected in zip(routed(*args, **kwargs), plain(*args, **kwargs)):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(routed))  # a reward holding it pickles
    torch.testing.assert_close(again(x, x, x, need_weights=False)[0], routed(x, x, x, need_weights=False)[0])


def test_sdpa_self_attention_in_bf16_stays_close_to_fp32() -> None:
    """With bf16 weights under CPU autocast (the fast mode), the routed attention stays within bf16 rounding of the
    fp32 module: measured max |Δ| 8.0e-3 on outputs of std 1.0 here; allowed 5e-2."""
    from rewardkit.precision import cast_matmul_weights

    plain, routed = _attention_pair()
    cast_matmul_weights(routed, torch.bfloat16)
    mask = torch.full((9, 9), float("-inf")).triu(1)
    x = torch.randn(2, 9, 16)
    with torch.inference_mode():
        expected = plain(x, x, x, need_weights=False, attn_mask=mask)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = routed(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert got.dtype == torch.bfloat16
    gap = (got.float() - expected).abs().max().item()
    assert 0 < gap < 5e-2, gap
