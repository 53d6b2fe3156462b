"""The routers API at its documented path: `moekd.routing` is its home (re-exported here)."""

from moekd.routing.routers import RouterInfo, frozen_router_tensors, gate_adapter, gate_parameters, recognise_routers

__all__ = ["RouterInfo", "frozen_router_tensors", "gate_adapter", "gate_parameters", "recognise_routers"]
