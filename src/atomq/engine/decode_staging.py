"""Decode-step metadata written straight into one host buffer laid out like its device twin.

In a decode step every sequence computes exactly one token, its last. Instead of building a StepBatch
from Python lists (and, for CUDA graphs, copying it field by field into the graphs' static buffers),
the host writes the step into ``host``, an int32 buffer with the layout of ``device``, and one
host-to-device copy moves it: issued before an eager forward, or recorded inside each decode CUDA graph
(a copy node from the pinned buffer, so a replay moves the step's metadata itself and the host issues
nothing but the replay). The device buffer's views are the CUDA graphs' static inputs and the StepBatch
of an eager decode step alike. On the CPU ``device`` is ``host`` itself: no copy at all.

Layout, in int32 elements, for R rows and W = max blocks per sequence:

  [0, 2R)              sampled       int64 [R]   device only: the tokens the previous decode step sampled
  [2R, 4R)             tokens        int64 [R]   input tokens known on the host
  [4R, 6R)             positions     int64 [R]
  [6R, 7R)             slot_mapping  int32 [R]   padding rows: -1 (nothing stored)
  [7R, 8R)             context_lens  int32 [R]   padding rows: 0 (attention returns zeros)
  [8R, 9R)             cached_lens   int32 [R]
  [9R, 10R)            token_src     int32 [R]   where each input token comes from (below)
  [10R, 10R + R * W)   block_tables  int32 [R, W]

A step of ``rows`` rows copies [2R, 10R + rows * W). Block-table rows are rewritten only when
the sequence in that row, or its number of blocks, changed since the row was last written (a block
table is only ever extended or replaced by a new list, never edited in place: block_manager.py);
a rewritten row is zero past its table, as build_step_batch pads it.

Tokens from the device (``gather``): when the engine runs decode steps ahead of the host (llm.py), a
step's input token may be the one the step before sampled, still unknown to the host (a placeholder in
``token_ids``). Then the model's input ``token_ids`` is its own device buffer, gathered as
``[sampled | tokens][token_src]``: row j of ``sampled`` for such a token, R + i (the host's token) for
every other row. Without ``gather`` the model reads ``tokens`` directly and ``token_src`` is unused.

Reuse rule for the pinned host buffer: the copy is asynchronous, so the host must not write the
buffer again until the copy has run. ``write`` waits on an event recorded right after the previous
copy (or after the replay that copies, ``record_read``). A synchronous engine has already waited for
the whole step when it samples, so the wait is free; an engine running one step ahead issues the copy
itself (graphs without the copy node), so the wait ends when the step ahead of that copy does, which
the engine has waited for anyway by then.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..model.paged import StepBatch
from .sequence import Sequence


class DecodeStaging:
    """Host / device buffers for decode steps of up to ``rows`` sequences of up to ``width`` blocks."""

    def __init__(self, rows: int, width: int, block_size: int, device: torch.device,
                 separate: bool | None = None, gather: bool = False):
        """separate: a device buffer apart from the host one (default: on CUDA only; tests set it on the
        CPU to exercise the copy). gather: input tokens may come from ``sampled`` (module docstring)."""
        self.rows, self.width, self.block_size, self.gather = rows, width, block_size, gather
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        size = 10 * rows + rows * width
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=cuda)
        sep = cuda if separate is None else separate
        self.dev = torch.zeros(size, dtype=torch.int32, device=self.device) if sep else self.host
        self._copied = torch.cuda.Event() if cuda else None
        self._pending = False  # a copy from ``host`` was issued and not yet waited for
        # host numpy views (share memory with ``host``) and device tensor views, same layout
        h = self.host.numpy()
        self.h_tokens, self.h_positions = h[2 * rows:4 * rows].view(np.int64), h[4 * rows:6 * rows].view(np.int64)
        self.h_slots, self.h_context, self.h_cached = h[6 * rows:7 * rows], h[7 * rows:8 * rows], h[8 * rows:9 * rows]
        self.h_src, self.h_tables = h[9 * rows:10 * rows], h[10 * rows:].reshape(rows, width)
        d = self.dev
        self.sampled = d[:2 * rows].view(torch.int64)
        self.sources = d[:4 * rows].view(torch.int64)  # [sampled | tokens]
        staged_tokens = d[2 * rows:4 * rows].view(torch.int64)
        self.positions = d[4 * rows:6 * rows].view(torch.int64)
        self.slot_mapping, self.context_lens = d[6 * rows:7 * rows], d[7 * rows:8 * rows]
        self.cached_lens, self.token_src = d[8 * rows:9 * rows], d[9 * rows:10 * rows]
        self.block_tables = d[10 * rows:].view(rows, width)
        self.token_ids = torch.zeros(rows, dtype=torch.int64, device=self.device) if gather else staged_tokens
        self.cu_seqlens = torch.arange(rows + 1, dtype=torch.int32, device=self.device)
        self.row_ids = torch.arange(rows, dtype=torch.int64, device=self.device)
        # what each block-table row holds: the list it was written from and that list's length then
        self._row_table: list[list[int] | None] = [None] * rows
        self._row_len = [0] * rows
        self._arange = np.arange(rows)
        self._host_rows = np.arange(rows, 2 * rows, dtype=np.int32)  # token_src of host-known tokens
        self._batches: dict[int, StepBatch] = {}
        self._eager: tuple[tuple[int, int], StepBatch] | None = None

    # ------------------------------------------------------------------------------------- views
    def batch(self, rows: int) -> StepBatch:
        """The decode StepBatch over the first ``rows`` rows of the device buffers (views, made once per
        row count): block_tables [rows, W] at full width, as the CUDA graphs read them."""
        b = self._batches.get(rows)
        if b is None:
            b = StepBatch(self.token_ids[:rows], self.positions[:rows], self.slot_mapping[:rows],
                          self.block_tables[:rows], self.cached_lens[:rows], self.context_lens[:rows],
                          self.cu_seqlens[:rows + 1], self.row_ids[:rows], max_q_len=1, is_decode=True)
            self._batches[rows] = b
        return b

    def eager_batch(self, rows: int, width: int) -> StepBatch:
        """Like ``batch`` but block_tables [rows, width] (the batch's longest table), exactly the shape
        build_step_batch gives: the attention kernel sizes its split plan by that width. The last one
        made is kept (the width changes once every block_size steps at most)."""
        key = (rows, width)
        if self._eager is None or self._eager[0] != key:
            full = self.batch(rows)
            self._eager = (key, dataclasses.replace(full, block_tables=self.block_tables[:rows, :width]))
        return self._eager[1]

    # ------------------------------------------------------------------------------------- writes
    def _wait(self) -> None:
        """Block until the previous copy out of ``host`` has run (the reuse rule above)."""
        if self._pending:
            self._copied.synchronize()
            self._pending = False

    def _write_table(self, i: int, table: list[int]) -> None:
        n, old = len(table), self._row_len[i]
        if n > self.width:
            raise RuntimeError(f"a block table of {n} blocks does not fit the staging width {self.width}")
        self.h_tables[i, :n] = table
        if old > n:
            self.h_tables[i, n:old] = 0
        self._row_table[i], self._row_len[i] = table, n

    def write(self, seqs: list[Sequence], rows: int, sampled_rows: dict[int, int] | None = None) -> bool:
        """Write the decode step of ``seqs`` into the host buffer, rows len(seqs)..rows-1 as padding.

        sampled_rows: seq_id -> its row of ``sampled``, for sequences whose input token is a placeholder
        (sampled by the step ahead, not yet known here); needs ``gather``.
        Returns False (nothing usable written) when some sequence is not at its last token, i.e. the
        step is not a plain decode step; raises RuntimeError when a sequence lacks the block its token
        goes to."""
        bsz, bs = len(seqs), self.block_size
        self._wait()
        known, known_len = self._row_table, self._row_len
        tokens, positions, from_device = [0] * bsz, [0] * bsz, []
        for i, s in enumerate(seqs):
            ids, table, pos = s.token_ids, s.block_table, s.num_computed_tokens
            if pos + 1 != len(ids):
                return False
            tok = ids[pos]
            if tok < 0:  # a placeholder: the step ahead sampled it on the device
                if sampled_rows is None or s.seq_id not in sampled_rows or not self.gather:
                    raise RuntimeError(f"sequence {s.seq_id}: its input token is not known and was not "
                                       f"sampled by the step ahead")
                from_device.append((i, sampled_rows[s.seq_id]))
                tok = 0
            tokens[i], positions[i] = tok, pos
            if known[i] is not table or known_len[i] != len(table):
                self._write_table(i, table)
        pos = self.h_positions[:bsz]
        pos[:] = positions
        page = pos // bs
        lens = np.asarray(known_len[:bsz])
        if (page >= lens).any():
            bad = int(np.argmax(page >= lens))
            raise RuntimeError(f"sequence {seqs[bad].seq_id}: no KV block for position {positions[bad]} "
                               f"({lens[bad]} blocks)")
        self.h_tokens[:bsz] = tokens
        self.h_slots[:bsz] = self.h_tables[self._arange[:bsz], page] * bs + pos % bs
        self.h_context[:bsz] = pos + 1
        self.h_cached[:bsz] = pos
        self.h_slots[bsz:rows] = -1
        self.h_context[bsz:rows] = 0
        if self.gather:
            self.h_src[:rows] = self._host_rows[:rows]
            for i, j in from_device:
                self.h_src[i] = j
        return True

    def copy(self, rows: int, record: bool = True) -> None:
        """Issue the one host-to-device copy of a ``rows``-row step (nothing to do on the CPU). Called
        while a CUDA graph is captured, it becomes the graph's own copy node (record=False there)."""
        if self.dev is self.host:
            return
        begin, end = 2 * self.rows, 10 * self.rows + rows * self.width
        self.dev[begin:end].copy_(self.host[begin:end], non_blocking=True)
        if record:
            self.record_read()

    def gather_tokens(self, rows: int) -> None:
        """token_ids[:rows] = [sampled | tokens][token_src[:rows]] on the device (after the copy; part of
        the decode graphs when ``gather``)."""
        if self.gather:
            torch.index_select(self.sources, 0, self.token_src[:rows], out=self.token_ids[:rows])

    def record_read(self) -> None:
        """Work just queued on the stream reads ``host`` (a copy, or a graph replay that copies): the
        next write waits for it."""
        if self._copied is not None:
            self._copied.record()
            self._pending = True

    def load(self, seqs: list[Sequence], rows: int | None = None, copy: bool = True,
             sampled_rows: dict[int, int] | None = None) -> StepBatch | None:
        """Write (+ copy + gather) one decode step. rows=None: an eager step, returns ``eager_batch`` of the
        len(seqs) rows; rows = a graph bucket: padded to it, returns ``batch(len(seqs))`` (the graph
        reads the static buffers, and gathers the tokens itself). copy=False: the caller's graph copies
        (then it calls record_read after the replay; never with ``gather``). sampled_rows: as in
        ``write``. None when the step is not a plain decode step (the caller builds it the general way)."""
        bsz = len(seqs)
        if not self.write(seqs, rows or bsz, sampled_rows):
            return None
        if copy:
            self.copy(rows or bsz)
            if rows is None:
                self.gather_tokens(bsz)
        if rows is None:
            return self.eager_batch(bsz, max(self._row_len[:bsz]))
        return self.batch(bsz)
