"""Locating the offline datasets and reading text from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

DATASET_FILES = {
    "c4": "c4/c4_en_validation_sample2k.jsonl",
    "wikitext2": "wikitext2/wikitext-2-raw-v1.test.joined.txt",
}


def default_data_dir() -> Path:
    """$ATOMQ_DATA_DIR, else the first ``shared/data`` found walking up from the cwd or this package."""
    env = os.environ.get("ATOMQ_DATA_DIR")
    if env:
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve()):
        for parent in (start, *start.parents):
            for cand in (parent / "shared" / "data", parent.parent / "shared" / "data"):
                if (cand / "README.md").is_file():
                    return cand
    raise FileNotFoundError("no offline data directory found: set ATOMQ_DATA_DIR or pass --data-dir")


def resolve_dataset(name_or_path: str, data_dir: str | None = None) -> Path:
    """A dataset name ("c4", "wikitext2") or a path to a .txt / .jsonl file -> an existing file path."""
    if name_or_path in DATASET_FILES:
        path = Path(data_dir) if data_dir else default_data_dir()
        path = path / DATASET_FILES[name_or_path]
    else:
        path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file does not exist: {path}")
    return path


def read_text(path: Path) -> str:
    """A .jsonl file's "text" fields joined by blank lines, or a text file as it is."""
    if path.suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return "\n\n".join(texts)
    return path.read_text(encoding="utf-8")
