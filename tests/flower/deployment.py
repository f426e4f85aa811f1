"""A real Flower deployment on 127.0.0.1 for tests: a SuperLink and SuperNodes as processes of this
machine, on free ports, with their own FLWR_HOME, torn down (every process they started) on exit.

secure=True: TLS on the SuperLink (certificates from heron.flower.credentials), SuperNode
authentication (`--enable-supernode-auth`, each node's public key registered with
`flwr supernode register` before it starts) and the CLI connection's root-certificates; as
docs/flower.md's "Secure deployment" does it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from heron.flower.credentials import make_credentials

BIN = Path(sys.executable).parent
CONNECTION = "heron"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """The processes below `pid` (read from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class LocalDeployment:
    """See the module docstring. Use as a context manager; `close()` stops everything it started."""

    def __init__(self, root: Path, *, secure: bool, nodes: int):
        self.root, self.secure = root, secure
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        home = root / "flwr-home"
        home.mkdir(exist_ok=True)
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "FLWR_HOME": str(home),
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"}
        self.credentials = make_credentials(root / "credentials", ["127.0.0.1"], nodes) if secure else None
        security = (f'root-certificates = "{self.credentials / "ca.crt"}"\n' if secure else "insecure = true\n")
        (home / "config.toml").write_text(f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{security}')
        self.processes: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process in stop()
        process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        process.log_file = log
        self.processes[name] = process
        return process

    def start_superlink(self, timeout_s: float = 60.0) -> None:
        tls = (["--ssl-ca-certfile", str(self.credentials / "ca.crt"), "--ssl-certfile",
                str(self.credentials / "superlink.crt"), "--ssl-keyfile", str(self.credentials / "superlink.key"),
                "--enable-supernode-auth"] if self.secure else ["--insecure"])
        self._start("superlink", [str(BIN / "flower-superlink"), *tls, "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + timeout_s
        while self.flwr("ls", CONNECTION, "--format", "json", timeout_s=timeout_s).returncode != 0:
            if time.monotonic() > deadline or self.processes["superlink"].poll() is not None:
                raise RuntimeError(f"the SuperLink did not come up: {self.log('superlink')}")
            time.sleep(0.5)

    def register(self, node: int) -> None:
        """Register SuperNode `node`'s public key (secure deployments)."""
        done = self.flwr("supernode", "register", str(self.credentials / f"node-{node}.pub"), CONNECTION)
        if done.returncode != 0:
            raise RuntimeError(f"flwr supernode register failed: {done.stdout}{done.stderr}")

    def start_supernode(self, name: str, partition: int, partitions: int, extra_config: str = "") -> None:
        auth = (["--root-certificates", str(self.credentials / "ca.crt"), "--auth-supernode-private-key",
                 str(self.credentials / f"node-{partition}")] if self.secure else ["--insecure"])
        config = f"partition-id={partition} num-partitions={partitions} {extra_config}".strip()
        self._start(name, [str(BIN / "flower-supernode"), *auth, "--superlink", self.address,
                           "--port", str(free_port()), "--node-config", config])

    def flwr(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def python(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess:
        """`python ARGS` in the deployment's environment (e.g. -m heron.flower.submit, -m heron train)."""
        return subprocess.run([sys.executable, *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, name: str, sig: int = signal.SIGTERM, wait_s: float = 10.0) -> None:
        """Stop process `name` and every process it started (`sig` first, SIGKILL after wait_s)."""
        process = self.processes.pop(name)
        family = [process.pid, *_descendants(process.pid)]
        for pid in family:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            process.wait(wait_s)
        except subprocess.TimeoutExpired:
            pass
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()
        process.log_file.close()

    def close(self) -> None:
        for name in [n for n in self.processes if n != "superlink"] + (["superlink"] if "superlink" in
                                                                         self.processes else []):
            self.stop(name)
