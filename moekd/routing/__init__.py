"""MoE routing, in one place: how routers are recognised and read, and how moekd reroutes them.

- routers.py      the routers API: `recognise_routers` finds a model's routers by what they compute
- recognition.py  fitting a router's computation from one recorded call (used by routers.py)
- adapter.py      `GateAdapter`: the gate distribution g and the weighting of any selection
- policies.py     the routing policies (topk, all, ka, topp, mc, sar) and the rules of their flags
- controller.py   `RouterController`: hooks that apply a policy and capture gates during forwards
- router_file.py  the router weights `moekd sar train` writes and `--policy sar --router` loads
- stats.py        `moekd routing stats`: gate mass of the activated and dormant experts per layer
"""

from moekd.routing.routers import RouterInfo, frozen_router_tensors, gate_adapter, gate_parameters, recognise_routers

__all__ = ["RouterInfo", "frozen_router_tensors", "gate_adapter", "gate_parameters", "recognise_routers"]
