"""Measurement: peak memory, FLOPs and time of a client step, the named presets it is run on, and
the environment every report records."""
