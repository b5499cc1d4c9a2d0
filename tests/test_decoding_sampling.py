"""matlm.decoding.sampling: the processed distributions against a numpy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from matlm.decoding.sampling import SamplingConfig, SamplingError, sample, token_probs


def reference_probs(logits, temperature, top_k, top_p):
    """The HF-style recipe in numpy: temperature, then top-k, then the nucleus."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    keep = np.ones_like(p, bool)
    if top_k:
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    q = np.where(keep, p, 0)
    q /= q.sum()
    order = np.argsort(-q, kind="stable")
    mass_before = np.cumsum(q[order]) - q[order]
    nucleus = np.zeros_like(keep)
    nucleus[order[mass_before < top_p]] = True
    keep &= nucleus
    out = np.where(keep, p, 0)
    return out / out.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.6), (0.8, 7, 0.9), (1.0, 1, 1.0)])
def test_processed_distribution_matches_reference(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32) * 2
    got = np.asarray(token_probs(jnp.asarray(logits), SamplingConfig(temperature, top_k, top_p)))
    for row, want_row in zip(got, logits):
        np.testing.assert_allclose(row, reference_probs(want_row.astype(np.float64), temperature,
                                                        top_k, top_p), atol=1e-6)


def test_greedy_is_one_hot_and_samples_the_argmax():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9)), jnp.float32)
    probs = np.asarray(token_probs(logits, SamplingConfig()))
    np.testing.assert_array_equal(probs.argmax(-1), np.asarray(logits).argmax(-1))
    assert probs.sum(-1).tolist() == [1.0] * 4 and (probs.max(-1) == 1).all()
    np.testing.assert_array_equal(sample(jax.random.key(0), logits, SamplingConfig()),
                                  np.asarray(logits).argmax(-1))


def test_samples_follow_the_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    config = SamplingConfig(temperature=1.0, top_p=0.8)  # Keeps the first two tokens.
    draws = np.asarray(jax.vmap(lambda k: sample(k, logits, config))(
        jax.random.split(jax.random.key(0), 4000)))[:, 0]
    counts = np.bincount(draws, minlength=4)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / 4000 - 0.625) < 0.03


@pytest.mark.parametrize("kwargs,flag", [
    (dict(temperature=-1.0), "--temperature"), (dict(temperature=float("nan")), "--temperature"),
    (dict(top_k=-2), "--top_k"), (dict(top_p=0.0), "--top_p"), (dict(top_p=1.5), "--top_p")])
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(SamplingError, match=flag):
        SamplingConfig(**kwargs)
