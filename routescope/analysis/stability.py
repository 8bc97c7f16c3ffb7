"""Routing stability from the probe group (`Recorder(probe=...)`): when does routing stop changing?

For each interval and layer, the share of probe tokens routed exactly as at the run's last interval: the same
leaf in every tree of a tree layer, the same set of experts in an MoE layer. It reaches 1 at the last interval
by definition; how early it gets there is when routing "saturates" (dynamic sparsity turning static).
"""

from __future__ import annotations

import numpy as np
import xarray as xr


def probe_stability(probe: xr.Dataset) -> xr.Dataset:
    """`tree_stable` (step, layer) and/or `moe_stable` (step, moe_layer): the share of probe tokens whose routing
    equals the final interval's (padding ignored)."""
    out = {}
    for var, dims, name in (("leaf", ("step", "layer"), "tree_stable"), ("experts", ("step", "moe_layer"), "moe_stable")):
        if var not in probe:
            continue
        ids = probe[var].values  # (step, layer, probe, tree|choice)
        same = (ids == ids[-1:]) | (ids[-1:] < 0)  # padding (-1) never counts as a change
        out[name] = (dims, same.all(-1).mean(-1).astype(np.float64))
    return xr.Dataset(out, coords={d: probe[d].values for d in ("step", "layer", "moe_layer") if d in probe.coords})
