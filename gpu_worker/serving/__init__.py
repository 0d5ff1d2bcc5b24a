"""Serving: the worker loop, its two transports, the wire protocol, engine telemetry, the multi-GPU launcher."""
