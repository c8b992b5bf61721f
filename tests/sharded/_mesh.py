"""The set-up shared by the 8-host-device scripts in this folder, which test_grid.py runs in
child processes (not collected by pytest): a mesh of the 8 devices, small float64 layers,
and jaxsim's host-device gather turned off, so that the multi-device programs themselves
run (host devices stand in for accelerators here)."""

import jax
import numpy as np
from jax.sharding import Mesh

from jaxsim import _validation

jax.config.update("jax_enable_x64", True)
_validation.gathers_host_meshes = lambda: False

assert jax.device_count() == 8, jax.devices()
mesh = Mesh(np.array(jax.devices()), ("batch",))
rng = np.random.default_rng(0)
layers = [rng.normal(size=(64, d)) for d in (5, 9, 5)]
layers[1][:, :5] += layers[0]
widths = [48, 80, 48, 4]  # wide layers on few examples, and a constant one (which must
wide = [rng.normal(size=(64, d)) + 3 for d in widths[:3]]  # stay exactly 0 on a mesh)
wide[1][:, :48] += wide[0]
wide.append(np.full((64, 4), 2.0))
