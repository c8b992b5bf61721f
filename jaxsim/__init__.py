"""jaxsim: layer-by-layer similarity of neural-network representations in JAX.

Activations are ``(n, ...)`` arrays, axis 0 indexing the n examples (google/svcca uses the
transpose). Every measure is a pure, jit-able and vmap-able function returning a 0-d array;
``similarity_grid`` compares every layer of one network with every layer of another.

Submodules: ``jaxsim.stats`` (permutation tests, bootstrap, baselines), ``jaxsim.sweeps``
(summaries of ensembles and training runs), ``jaxsim.conv``
(conv-layer reductions), ``jaxsim.flax`` (activations from Flax models) and
``jaxsim.plot`` (figures; needs matplotlib), all reachable as attributes.
"""

import importlib as _importlib

from jaxsim import conv as conv
from jaxsim import stats as stats
from jaxsim import sweeps as sweeps
from jaxsim._measure import Measure as Measure
from jaxsim._result import Grid as Grid
from jaxsim._result import SweepGrid as SweepGrid
from jaxsim.canonical import CCAResult as CCAResult
from jaxsim.canonical import UnderdeterminedWarning as UnderdeterminedWarning
from jaxsim.canonical import cca as cca
from jaxsim.canonical import mean_cca as mean_cca
from jaxsim.canonical import pwcca as pwcca
from jaxsim.canonical import svcca as svcca
from jaxsim.geometry import linear_predictivity as linear_predictivity
from jaxsim.geometry import most_similar_neurons as most_similar_neurons
from jaxsim.geometry import mutual_knn as mutual_knn
from jaxsim.geometry import predict_direction as predict_direction
from jaxsim.geometry import procrustes_distance as procrustes_distance
from jaxsim.geometry import procrustes_similarity as procrustes_similarity
from jaxsim.geometry import rdm as rdm
from jaxsim.geometry import rsa as rsa
from jaxsim.grid import similarity_grid as similarity_grid
from jaxsim.kernel import center_gram as center_gram
from jaxsim.kernel import cka as cka
from jaxsim.kernel import gram_linear as gram_linear
from jaxsim.kernel import gram_rbf as gram_rbf
from jaxsim.kernel import hsic as hsic
from jaxsim.kernel import linear_cka as linear_cka
from jaxsim.kernel import rbf_cka as rbf_cka
from jaxsim.minibatch import MinibatchCKAState as MinibatchCKAState
from jaxsim.minibatch import minibatch_cka_init as minibatch_cka_init
from jaxsim.minibatch import minibatch_cka_result as minibatch_cka_result
from jaxsim.minibatch import minibatch_cka_scan as minibatch_cka_scan
from jaxsim.minibatch import minibatch_cka_update as minibatch_cka_update

__version__ = "0.1.0"

__all__ = [
    "CCAResult",
    "Grid",
    "Measure",
    "UnderdeterminedWarning",
    "MinibatchCKAState",
    "SweepGrid",
    "cca",
    "center_gram",
    "cka",
    "gram_linear",
    "gram_rbf",
    "hsic",
    "linear_cka",
    "linear_predictivity",
    "mean_cca",
    "minibatch_cka_init",
    "minibatch_cka_result",
    "minibatch_cka_scan",
    "minibatch_cka_update",
    "most_similar_neurons",
    "mutual_knn",
    "predict_direction",
    "procrustes_distance",
    "procrustes_similarity",
    "pwcca",
    "rbf_cka",
    "rdm",
    "rsa",
    "similarity_grid",
    "svcca",
]


def __getattr__(name: str):
    # flax capture and plotting load their (heavier, or optional) dependencies on first use
    if name in ("flax", "plot"):
        return _importlib.import_module(f"jaxsim.{name}")
    raise AttributeError(f"module 'jaxsim' has no attribute {name!r}")
