"""The CPU processes `mamlpp train` starts itself (train.processes, trainer.Trainer.processes).

This process becomes rank 0 of a local gloo group and starts the other ranks as copies of its own
command line, with the environment torchrun would give them and one intra-op thread each; from
there on it is the torchrun path (distributed.py). Unlike torchrun's agent, rank 0 is the process
the user started: it stays in the terminal's process group (Ctrl-C reaches every rank), and on Linux
the other ranks die with it (a kill -9 leaves no rank training on, holding the run folder's lock).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading

import torch

from .config import ConfigError
from .distributed import LAUNCH_REASON, dist_from_env, select_device

PARENT = "MAMLPP_PARENT_PID"


def plan(cfg, data_dir: str | None) -> tuple[int, str]:
    """(processes, why) for a run of cfg started here (one process under torchrun or on a GPU)."""
    from .data import build_tasks
    from .trainer import Trainer

    device = select_device(cfg.train.device)
    if dist_from_env().active or (device.type != "cpu" and cfg.train.processes <= 1):
        return 1, ""
    if device.type != "cpu":
        raise ConfigError(f"train.processes={cfg.train.processes} splits tasks over CPU processes; on {device} "
                          "use torchrun (one process per GPU)")
    if cfg.train.processes:
        return cfg.train.processes, "train.processes"
    with torch.random.fork_rng(devices=[]):
        return Trainer(cfg, build_tasks(cfg, device, data_dir=data_dir), device).processes()


class Peers:
    """Ranks 1.. of a run that this process leads as rank 0 (none for one process)."""

    def __init__(self, world: int, why: str, argv: list[str]):
        self.procs: list[subprocess.Popen] = []
        self.stopping = threading.Event()
        if world < 2:
            return
        with socket.socket() as s:  # a free port for rank 0's store (torchrun --standalone does the same)
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                           "LOCAL_WORLD_SIZE": str(world), "RANK": "0", "LOCAL_RANK": "0", LAUNCH_REASON: why})
        # Every rank on this machine: gloo over the loopback device, whatever the host name resolves to.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
        env = dict(os.environ, OMP_NUM_THREADS="1", **{PARENT: str(os.getpid())})
        self.procs = [subprocess.Popen([sys.executable, "-m", "mamlpp", *argv],
                                       env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(1, world)]
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        """A rank that fails leaves rank 0 waiting on it (a collective, or the store at start-up, for
        up to half an hour): end the run at once, as torchrun would."""
        while not self.stopping.wait(0.5):
            for rank, p in enumerate(self.procs, 1):
                # 130 / SIGINT: Ctrl-C, which rank 0 received too and reports itself
                if p.poll() not in (None, 0, 130, -signal.SIGINT) and not self.stopping.is_set():
                    print(f"mamlpp: training process {rank} of {len(self.procs) + 1} exited with status "
                          f"{p.returncode}; stopping the run", file=sys.stderr, flush=True)
                    for q in self.procs:
                        q.kill()
                    os._exit(1)

    def wait(self, ok: bool) -> int:
        """After rank 0's part of the run: the worst exit status of the others. When rank 0 failed they
        are stopped (they would wait on it in a collective)."""
        self.stopping.set()
        for p in self.procs if not ok else []:
            p.terminate()
        return max((abs(p.wait()) for p in self.procs), default=0)


def follow_parent() -> None:
    """In a rank that `Peers` started: die when rank 0 does, however it ends (Linux)."""
    parent = os.environ.get(PARENT)
    if not parent or not sys.platform.startswith("linux"):
        return
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(parent):  # rank 0 died before the line above: nobody is left to wait for us
        os._exit(1)
