"""The fleet view (SPEC "Fleet view"): percentiles and breaches across every sidecar
sharing ``SIDECAR_FLEET``, through Redis (`store.py` is the only Redis-specific module)."""

from .component import Fleet

__all__ = ["Fleet"]
