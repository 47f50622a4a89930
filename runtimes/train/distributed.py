"""Data-parallel training across local processes: PyTorch DDP over gloo (CPU) or NCCL (GPUs).

The worker running `train` is rank 0 and speaks for the run; it starts ranks 1..N-1 as
`python -m runtimes.train.distributed SPEC RANK`, which set up the same process group torchrun
would (env-style rendezvous on a local TCP port) and run the same loop silently. Ranks die with
the worker (PR_SET_PDEATHSIG on Linux) and are killed when the run ends, however it ends.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any

RENDEZVOUS_TIMEOUT = timedelta(minutes=5)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_spec(path: Path, *, model_path: Path, config: Any, data: Any, run_dir: Path, resume_from: Path | None,
               state_extra: dict[str, Any], world_size: int, port: int, backend: str) -> None:
    """Everything a rank needs, tokenized data included (ranks never re-read the user's files)."""
    payload = {
        "model_path": str(model_path), "config": asdict(config), "run_dir": str(run_dir),
        "resume_from": str(resume_from) if resume_from else None, "state_extra": state_extra,
        "world_size": world_size, "port": port, "backend": backend, "pad_id": data.pad_id,
        "train": [[e.input_ids, [int(m) for m in e.loss_mask]] for e in data.train],
        "validation": [[e.input_ids, [int(m) for m in e.loss_mask]] for e in data.validation],
    }
    path.write_text(json.dumps(payload), encoding="utf-8")


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch_ranks(spec: Path, world_size: int) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[2])  # the repository root, above runtimes/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return [
        subprocess.Popen([sys.executable, "-m", "runtimes.train.distributed", str(spec), str(rank)], env=env,
                         stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), preexec_fn=_die_with_parent)
        for rank in range(1, world_size)
    ]


def stop_ranks(ranks: list[subprocess.Popen], timeout: float = 10.0) -> list[int]:
    codes = []
    for proc in ranks:
        try:
            codes.append(proc.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append(proc.wait())
    return codes


def pick_backend(requested: str, device: str) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device == "cuda" else "gloo"


def init_group(rank: int, world_size: int, port: int, backend: str) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=RENDEZVOUS_TIMEOUT)


def rank_main(spec_path: str, rank_text: str) -> int:
    import torch.distributed as dist

    from runtimes.train.sft_tokenize import TokenizedExample
    from runtimes.train.trainer import SilentReporter, TrainConfig, TrainData, run_training

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    rank = int(rank_text)

    def examples(rows: list) -> list[Any]:
        return [TokenizedExample(row=i, input_ids=ids, loss_mask=[bool(m) for m in mask]) for i, (ids, mask) in enumerate(rows)]

    data = TrainData(examples(spec["train"]), examples(spec["validation"]), spec["pad_id"])
    init_group(rank, spec["world_size"], spec["port"], spec["backend"])
    try:
        run_training(Path(spec["model_path"]), TrainConfig(**spec["config"]), data, SilentReporter(),
                     run_dir=Path(spec["run_dir"]), resume_from=Path(spec["resume_from"]) if spec["resume_from"] else None,
                     state_extra=spec["state_extra"], rank=rank, world_size=spec["world_size"])
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(rank_main(sys.argv[1], sys.argv[2]))
