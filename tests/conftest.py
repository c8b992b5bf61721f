import jax
import numpy as np
import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, max_examples=25)
settings.load_profile("ci")


@pytest.fixture
def x64():
    """float64 for one test, restored even when the test fails."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def related(rng, n=200, d1=12, d2=9, noise=0.5):
    """Two activation sets that share structure: y is a nonlinear map of x plus noise."""
    x = rng.normal(size=(n, d1))
    y = np.tanh(x @ rng.normal(size=(d1, d2))) + noise * rng.normal(size=(n, d2))
    return x, y


def orthogonal(rng, d):
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))
