"""Submit a run of heron's Flower app to a SuperLink, follow it, and exit with its outcome.

    python -m heron.flower.submit APP SUPERLINK [--run-config "rounds=20 ..."] [--no-stream]

`flwr run APP SUPERLINK --stream` exits 0 even when the ServerApp fails (flwr 1.41). This runs
`flwr run ... --format json` (which returns the run id), streams the run's log with
`flwr log RUN_ID SUPERLINK --stream` (which returns when the run ends), then reads the run's final
status with `flwr ls SUPERLINK --run-id RUN_ID --format json` and exits 0 only for
"finished:completed"; otherwise it prints the status and Flower's details (for a ServerApp that
raised: its exception) and exits 1. The `flwr` found next to this Python (a virtual environment's
bin/) is used, else the one on PATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

COMPLETED = "finished:completed"


def flwr_command() -> str:
    """The `flwr` of this Python's environment, else the one on PATH."""
    beside = Path(sys.executable).parent / "flwr"
    return str(beside) if beside.exists() else (shutil.which("flwr") or "flwr")


def _json(args: list[str]) -> dict:
    """Run a `flwr ... --format json` command; its JSON answer (a RuntimeError when it has none)."""
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"`{' '.join(args)}` exited {done.returncode} without a JSON answer:\n"
                           f"{done.stdout}{done.stderr}") from None
    if not answer.get("success", False):
        raise RuntimeError(f"`{' '.join(args)}` failed: {answer.get('error-message', answer)}")
    return answer


def run_status(superlink: str, run_id: str, *, flwr: str | None = None) -> dict:
    """The run's entry of `flwr ls SUPERLINK --run-id RUN_ID --format json` ("status", "status-details", ...)."""
    answer = _json([flwr or flwr_command(), "ls", superlink, "--run-id", run_id, "--format", "json"])
    (run,) = answer["runs"]
    return run


def submit(app: str, superlink: str, run_config: Sequence[str] = (), *, stream: bool = True,
           wait_s: float = 60.0, flwr: str | None = None) -> tuple[str, dict]:
    """Start the run, follow it to its end; returns (run id, its final `flwr ls` entry).

    wait_s: how long to wait, after the log stream ends (or at once without stream), for the status to
    become final; without stream the run itself must end within wait_s.
    """
    flwr = flwr or flwr_command()
    command = [flwr, "run", app, superlink, "--format", "json"]
    for overrides in run_config:
        command += ["--run-config", overrides]
    run_id = str(_json(command)["run-id"])
    print(f"heron: started run {run_id} on {superlink}", flush=True)
    if stream:
        subprocess.run([flwr, "log", run_id, superlink, "--stream"], check=False)
    deadline = time.monotonic() + wait_s
    while True:
        run = run_status(superlink, run_id, flwr=flwr)
        if run["status"].startswith("finished") or time.monotonic() > deadline:
            return run_id, run
        time.sleep(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m heron.flower.submit", description=__doc__.split("\n")[0])
    parser.add_argument("app", help="the Flower app directory (python/heron/flower/app)")
    parser.add_argument("superlink", help="the SuperLink connection's name in the flwr config (e.g. heron)")
    parser.add_argument("--run-config", action="append", default=[],
                        help="run-config overrides, as for `flwr run` (repeatable)")
    parser.add_argument("--no-stream", dest="stream", action="store_false", help="do not show the run's log")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for the final status after the log ends (without the log: for the run)")
    args = parser.parse_args(argv)
    try:
        run_id, run = submit(args.app, args.superlink, args.run_config, stream=args.stream, wait_s=args.wait)
    except RuntimeError as error:
        print(f"heron: {error}", file=sys.stderr)
        return 1
    status = run["status"]
    if status == COMPLETED:
        print(f"heron: run {run_id} {status}", flush=True)
        return 0
    print(f"heron: run {run_id} {status}: {run.get('status-details', '')}", file=sys.stderr, flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
