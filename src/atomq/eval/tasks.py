"""Zero-shot multiple-choice tasks read from the offline data directory, with lm-evaluation-harness prompts.

Each task turns its rows into ``Example``s: one (context, continuation) pair per answer choice. The
continuation starts with lm-eval's target delimiter, a single space. Prompts, gold indices and the
reported metric follow each dataset's NOTES.md (Atom reports acc_norm for PIQA, ARC-Easy, ARC-Challenge
and HellaSwag; acc for BoolQ and WinoGrande).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..data import default_data_dir


@dataclass(frozen=True)
class Example:
    """One question. All tuples have one entry per answer choice, in the dataset's order.

    contexts:      the conditioning text of each choice (the same string repeated, except WinoGrande)
    continuations: the text whose log-likelihood is scored given its context (leading " " included)
    choices:       lm-eval's choice strings; acc_norm divides each log-likelihood by len(choice) in characters
    gold:          index of the correct choice
    """

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self):
        n = len(self.choices)
        if n < 2 or len(self.contexts) != n or len(self.continuations) != n:
            raise ValueError(f"an example needs >= 2 choices and one context and continuation per choice: {self}")
        if not 0 <= self.gold < n:
            raise ValueError(f"gold index {self.gold} out of range for {n} choices")


def _same_context(context: str, choices: list[str], gold: int) -> Example:
    """The common case: one context, continuation = " " + choice."""
    return Example((context,) * len(choices), tuple(" " + c for c in choices), tuple(choices), gold)


def _jsonl(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    raise ValueError(f"{path}:{n}: not a JSON line") from None


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_piqa(data_dir: Path) -> Iterator[Example]:
    """piqa/valid.jsonl {goal, sol1, sol2} + valid-labels.lst (0/1 per line); sol* keep trailing spaces."""
    rows = list(_jsonl(data_dir / "piqa" / "valid.jsonl"))
    labels = _lines(data_dir / "piqa" / "valid-labels.lst")
    if len(rows) != len(labels):
        raise ValueError(f"piqa: {len(rows)} rows but {len(labels)} labels")
    for row, label in zip(rows, labels):
        yield _same_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(label))


def _load_arc(path: Path) -> Iterator[Example]:
    """AI2 ARC jsonl: question.stem, question.choices[{text, label}], answerKey (A-E or 1-5)."""
    for row in _jsonl(path):
        q = row["question"]
        labels = [c["label"] for c in q["choices"]]
        texts = [c["text"] for c in q["choices"]]
        yield _same_context(f"Question: {q['stem']}\nAnswer:", texts, labels.index(row["answerKey"]))


def load_arc_easy(data_dir: Path) -> Iterator[Example]:
    return _load_arc(data_dir / "arc" / "ARC-Easy-Test.jsonl")


def load_arc_challenge(data_dir: Path) -> Iterator[Example]:
    return _load_arc(data_dir / "arc" / "ARC-Challenge-Test.jsonl")


def load_boolq(data_dir: Path) -> Iterator[Example]:
    """boolq/val.jsonl {question, passage, label}; label is "true"/"false" (or a JSON boolean). Choices no/yes."""
    for row in _jsonl(data_dir / "boolq" / "val.jsonl"):
        label = row["label"]
        yes = label if isinstance(label, bool) else {"true": True, "false": False}[str(label).lower()]
        yield _same_context(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(yes))


def load_hellaswag(data_dir: Path) -> Iterator[Example]:
    """hellaswag_val.lmeval_reconstructed.jsonl {query, choices[4], gold}: query is lm-eval's preprocessed ctx."""
    for row in _jsonl(data_dir / "hellaswag" / "hellaswag_val.lmeval_reconstructed.jsonl"):
        yield _same_context(row["query"], list(row["choices"]), int(row["gold"]))


def load_winogrande(data_dir: Path) -> Iterator[Example]:
    """Partial evaluation: context = sentence up to the blank with each option filled in, continuation =
    " " + the rest of the sentence (the same for both options). choices = the option-filled contexts, as
    lm-eval's doc_to_choice (only acc is reported for WinoGrande)."""
    for row in _jsonl(data_dir / "winogrande" / "winogrande_dev.lmeval_partial.jsonl"):
        contexts = tuple(row["context_options"])
        yield Example(contexts, (" " + row["continuation"],) * len(contexts), contexts, int(row["gold"]))


@dataclass(frozen=True)
class Task:
    name: str
    metric: str  # the metric reported (Atom's choice): "acc" or "acc_norm"
    load: Callable[[Path], Iterator[Example]]


TASKS = {t.name: t for t in (
    Task("piqa", "acc_norm", load_piqa),
    Task("arc_easy", "acc_norm", load_arc_easy),
    Task("arc_challenge", "acc_norm", load_arc_challenge),
    Task("boolq", "acc", load_boolq),
    Task("hellaswag", "acc_norm", load_hellaswag),
    Task("winogrande", "acc", load_winogrande),
)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown zero-shot task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name]


def load_examples(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """The first ``limit`` examples (all if None) of task ``name`` from ``data_dir`` (default: the shared data)."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    task = get_task(name)
    root = Path(data_dir) if data_dir else default_data_dir()
    out = []
    try:
        for ex in task.load(root):
            if limit is not None and len(out) >= limit:
                break
            out.append(ex)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{name}: a row in {root} lacks an expected field ({e})") from None
    return out
