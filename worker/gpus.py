"""`llmbatch worker --gpus`: one worker process per GPU, each pinned to its GPU.

Every process is a plain `llmbatch worker` with CUDA_VISIBLE_DEVICES set to one device, so it
loads one copy of the model onto that GPU and sees it as cuda:0. This process only starts them,
forwards SIGTERM/SIGINT, and stops the rest when one exits with an error (a model that cannot
load stops them all, rather than leaving a host half-served).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import click

from llmbatch.jobs.settings import Settings


def visible_devices() -> list[str]:
    """The device ids this process may use: CUDA_VISIBLE_DEVICES if set, else every GPU torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def parse(spec: str) -> list[str]:
    """`all`, a count N (the first N visible GPUs) or a list `0,1` (indexes of visible GPUs; `3,` for
    GPU 3 alone) -> device ids."""
    spec = spec.strip()
    if spec == "all":
        devices = visible_devices()
        if not devices:
            raise click.BadParameter("no CUDA GPU is visible", param_hint="--gpus")
        return devices
    try:
        if "," in spec or not spec.isdigit():
            indexes = [int(p) for p in spec.split(",") if p.strip()]  # "3," is GPU 3 alone
        else:
            indexes = list(range(int(spec)))
    except ValueError:
        raise click.BadParameter(f"{spec!r}: expected all, a count such as 2, or a list such as 0,1",
                                 param_hint="--gpus") from None
    if not indexes or min(indexes) < 0 or len(set(indexes)) != len(indexes):
        raise click.BadParameter(f"{spec!r}: expected at least one GPU, each index once and none negative",
                                 param_hint="--gpus")
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:  # no remapping to respect: indexes are device ids (checked by each process's CUDA)
        return [str(i) for i in indexes]
    devices = visible_devices()
    if max(indexes) >= len(devices):
        raise click.BadParameter(f"{spec!r}: only {len(devices)} GPU(s) are visible (CUDA_VISIBLE_DEVICES={env})",
                                 param_hint="--gpus")
    return [devices[i] for i in indexes]


def node_name(hostname: str | None, device: str) -> str:
    name, _, host = (hostname or "llmbatch@%h").partition("@")
    return f"{name}-gpu{device}@{host or '%h'}"


def run(devices: list[str], settings: Settings, *, model: str, engine: str, loglevel: str,
        hostname: str | None) -> int:
    """Start one pinned worker per device and wait; returns the first non-zero exit code, else 0."""
    env = {k: v for k, v in os.environ.items() if k != "LLMBATCH_GPUS"}  # a child must not fan out again
    env.update(LLMBATCH_DATABASE_URL=settings.database_url, LLMBATCH_BROKER_URL=settings.broker_url)
    procs = []
    for device in devices:
        argv = [sys.executable, "-m", "llmbatch.jobs.cli", "worker", "--model", model, "--engine", engine,
                "--loglevel", loglevel, "-n", node_name(hostname, device)]
        procs.append(subprocess.Popen(argv, env={**env, "CUDA_VISIBLE_DEVICES": device}))

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode]
            if failed and not code:
                code = failed[0]
                forward(signal.SIGTERM, None)  # one GPU's worker failed: stop the others too
            time.sleep(0.2)
        code = code or next((p.returncode for p in procs if p.returncode), 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
