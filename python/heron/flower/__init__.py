"""heron on Flower: the HERON-SFL roles as a Flower app (flwr 1.x Message API).

- `heron.flower.client_app:app`, `heron.flower.server_app:app`: the ClientApp and ServerApp (the
  components of the Flower app in `app/pyproject.toml`, for `flwr run` and deployment).
- `heron.flower.simulation.simulate(config)`: the same app as a Ray-backed simulation on one machine
  (`heron flower ...` on the command line).
- `heron.flower.codec`: the messages, built and checked without pickle.

Needs the optional `flower` extra (`flwr[simulation]`). Modules are imported on use: importing
`heron.flower` itself does not import flwr.
"""
