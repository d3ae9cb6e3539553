"""
The JSON run log, out_dir/run_YYYYMMDD_HHMMSS.json, rewritten atomically at every log interval so
that it is always valid JSON (tail it, plot it, or json.load it mid-run):

    config               the resolved train and model configs
    environment          git SHA and dirty flag, torch/CUDA versions, GPU name and count, world size
    model                architecture, parameters, FLOPs per token
    training_iterations  [{iter, loss, lr, grad_norm, dt_ms, tokens_per_sec, mfu,
                           memory_allocated_gb, memory_peak_gb, memory_host_peak_gb, tokens_seen, elapsed_s}]
                         memory_allocated_gb / memory_peak_gb: GPU memory (null on CPU);
                         memory_host_peak_gb: the process's peak resident set size (host RAM,
                         every device), so CPU runs have a memory figure too
    evaluations          [{iter, train_loss, val_loss, tokens_seen, elapsed_s}], with eval_tasks also
                         tasks: {name: {acc, acc_norm, centered, random_baseline, core_metric}},
                         core, tasks_seconds (evals.py)
    gradient_norms       [{iter, norms: {module: norm}}] every gradient_log_interval
    events               [{iter, event, ...}]: skipped non-finite steps, checkpoints, resume

elapsed_s, stamped on each training and evaluation record as it is logged: wall seconds since this log
opened (after the model was built), evaluations and checkpoints included, unlike dt_ms, so plots can
set runs against time (plots/compare_runs.py --time). A resumed run's new log counts from its own start.

Each rewrite goes through run_*.json.tmp; a run killed mid-write can leave one, and the next
RunLog in that out_dir deletes them (nothing reads them, and plots glob run_*.json only).

RunLog has the same methods on every rank; off the master rank they do nothing, so the training
loop never branches on who logs. wandb and tensorboard are optional extra sinks.
"""

from __future__ import annotations

import glob
import os
import platform
import resource
import socket
import subprocess
import sys
import time

import torch

import atomic
from errors import UserError


class RunLogError(UserError):
    """An optional sink that cannot start; one line naming the fix."""


def git_info(repo_dir: str) -> dict:
    """Commit SHA and whether tracked files differ from it (None outside a git checkout)."""
    def run(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "git_dirty": None if status is None else bool(status)}


def environment(world_size: int, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {
        **git_info(os.path.dirname(os.path.abspath(__file__))),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "world_size": world_size,
        "device": str(device),
        "hostname": socket.gethostname(),
        "python_version": platform.python_version(),
        "argv": sys.argv,
    }


def host_peak_gb() -> float:
    """Peak resident set size of this process so far, in GiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024**3 if sys.platform == "darwin" else 1024**2)


class RunLog:
    def __init__(self, out_dir: str, enabled: bool, header: dict, wandb: dict | None = None,
                 tensorboard: bool = False, names: dict[str, str] | None = None, tensorboard_subdir: str = "tb"):
        """header: config, environment and model sections. wandb: {'project', 'name'} to also log there.

        names: what a record key is called in wandb/TensorBoard (e.g. loss -> train/loss); unnamed keys keep
        theirs (TensorBoard prefixes them with the record kind). tensorboard_subdir: the event folder in out_dir.
        """
        self.enabled = enabled
        self.path = None
        self.t0 = time.perf_counter()  # elapsed_s counts from here
        self.data = {**header, "training_iterations": [], "evaluations": [], "gradient_norms": [], "events": []}
        self.sinks: list = []
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        for tmp in glob.glob(os.path.join(glob.escape(out_dir), "run_*.json.tmp")):  # left by a killed run
            os.remove(tmp)
        stamp = time.strftime("%Y%m%d_%H%M%S")
        path, n = os.path.join(out_dir, f"run_{stamp}.json"), 1
        while os.path.exists(path):  # two runs in the same second
            path, n = os.path.join(out_dir, f"run_{stamp}_{n}.json"), n + 1
        self.path = path
        self.data["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if wandb is not None:
            self.sinks.append(_WandbSink(wandb, header, names or {}))
        if tensorboard:
            self.sinks.append(_TensorboardSink(os.path.join(out_dir, tensorboard_subdir), names or {}))
        self.flush()

    def iteration(self, record: dict) -> None:
        self._append("training_iterations", record)

    def evaluation(self, record: dict) -> None:
        self._append("evaluations", record)
        self.flush()

    def gradient_norms(self, record: dict) -> None:
        self._append("gradient_norms", record)

    def event(self, record: dict) -> None:
        self._append("events", record)

    def _append(self, key: str, record: dict) -> None:
        if not self.enabled:
            return
        if key in ("training_iterations", "evaluations"):
            record["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
        self.data[key].append(record)
        for sink in self.sinks:
            sink.log(key, record)

    def flush(self) -> None:
        if self.enabled:
            self.data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            atomic.write_json(self.path, self.data, indent=1)

    def close(self) -> None:
        self.flush()
        for sink in self.sinks:
            sink.close()


def flat(record: dict, prefix: str = "") -> dict:
    """Nested records one level deep for the sinks: {'tasks': {'piqa': {'acc': x}}} -> {'tasks/piqa/acc': x}."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


class _WandbSink:
    def __init__(self, opts: dict, header: dict, names: dict[str, str]):
        self.names = names
        try:
            import wandb
        except ImportError:
            raise RunLogError("wandb_log=True needs the wandb package: pip install wandb") from None
        self.run = wandb.init(project=opts["project"], name=opts["name"], config=header.get("config"))

    def log(self, key: str, record: dict) -> None:
        if key in ("training_iterations", "evaluations"):
            self.run.log({self.names.get(k, k): v for k, v in flat(record).items()
                          if isinstance(v, int | float) and k != "iter"}, step=record["iter"])

    def close(self) -> None:
        self.run.finish()


class _TensorboardSink:
    def __init__(self, log_dir: str, names: dict[str, str]):
        self.names = names
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise RunLogError("tensorboard_log=True needs the tensorboard package: pip install tensorboard") from None
        self.writer = SummaryWriter(log_dir)

    def log(self, key: str, record: dict) -> None:
        if key in ("training_iterations", "evaluations"):
            for k, v in flat(record).items():
                if isinstance(v, int | float) and k != "iter":
                    self.writer.add_scalar(self.names.get(k, f"{key}/{k}"), v, record["iter"])

    def close(self) -> None:
        self.writer.close()
