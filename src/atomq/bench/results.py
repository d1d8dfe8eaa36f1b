"""Benchmark result files: one JSON object {"kind", "env", "settings", "workload", "rows"} per run of a
command, rewritten atomically after every row so that an interrupted benchmark keeps what it measured."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

KINDS = ("throughput", "serving")


def env_info(device: str = "cuda") -> dict[str, Any]:
    """Where the numbers come from: device name, library versions, date, git commit (when known)."""
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "date": datetime.date.today().isoformat()}
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["device"] = f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


class ResultFile:
    """Collects rows and rewrites ``path`` after each one (a temporary file renamed over it)."""

    def __init__(self, path: str | os.PathLike, kind: str, env: dict, settings: dict, workload: dict | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown result kind {kind!r}; choose one of {KINDS}")
        self.path = Path(path)
        self.data = {"kind": kind, "env": env, "settings": settings, "workload": workload, "rows": []}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.save()

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def load(path: str | os.PathLike) -> dict:
    """A result file, checked for its shape."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path} is not an atomq benchmark result file (kind in {KINDS} with rows)")
    return data
