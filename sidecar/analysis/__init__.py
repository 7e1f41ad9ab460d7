"""`latency-sidecar analyze`: load, profiles under load, gateway stats, report, compare."""
