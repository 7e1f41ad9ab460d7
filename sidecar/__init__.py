"""latency-sidecar: a latency-observing reverse proxy that runs beside an API gateway."""

__version__ = "0.1.0"
