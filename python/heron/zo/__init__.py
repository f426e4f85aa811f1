"""The zeroth-order engine: the dual-stream executor (dual) and the client updaters (updaters)."""
