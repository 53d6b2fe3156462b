"""moekd: distil Mixture-of-Experts language models from a shareable, offline teacher cache."""

from moekd.errors import MoekdError

__version__ = "0.1.0"
__all__ = ["CacheReader", "MoekdError", "__version__"]


def __getattr__(name: str):
    # Imported on first use so that `import moekd` stays light (zarr and torch load lazily).
    if name == "CacheReader":
        from moekd.store import CacheReader

        return CacheReader
    raise AttributeError(f"module 'moekd' has no attribute {name!r}")
