"""Building a kNN datastore: streaming .npy writes, teacher-forced batches, shards and their merge."""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import hub_io
from .fingerprint import start_model_fingerprint, tokenizer_fingerprint
from .knn_hook import KNNQueryHook
from .search.sharded import process_layout, shard_range


DATASTORE_CONFIG_NAME = "knn_datastore.json"
FORMAT_VERSION = 1
DATASTORE_KIND = hub_io.DirectoryKind(
    "KNNDatastore",
    DATASTORE_CONFIG_NAME,
    frozenset(
        {
            DATASTORE_CONFIG_NAME,
            "keys.npy",
            "values.npy",
            "provenance.npy",
            "counts.npy",
            "projection.npz",
            "pq.npz",
            "index.faiss",
        }
    ),
    hint="datastore",
)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):  # keeps np.memmap as it is
        return x
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------------------------------
# Streaming writes: .npy files whose size is not known in advance, in a temporary directory renamed at the end.
# ----------------------------------------------------------------------------------------------------------------------


class _NpyAppender:
    """Appends rows to a .npy file whose final length is not known in advance.

    The header is numpy's own (`np.lib.format.write_array_header_1_0`), written for 0 rows first and rewritten with the
    final count on close: numpy pads the row count's room to `GROWTH_AXIS_MAX_DIGITS` digits, so the header keeps its
    length and the rows written after it stay in place (no copy of a multi-GB file at the end). Every `sync_bytes`
    written, the rows so far are flushed to disk (`os.fdatasync`) on a helper thread while the next rows are hashed
    and written, so the fsync on close, before the datastore is swapped in, has little left to write.

    With `expected_rows` (a count known in advance) the header is written for it at once and the file's SHA-256 is
    computed over the bytes as they are written: when the count comes true, `digest` holds it on close and the file
    need not be read back to be hashed; otherwise the header is rewritten as above and `digest` stays `None`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dtype,
        row_shape: tuple[int, ...] = (),
        sync_bytes: int = 1 << 26,
        expected_rows: int | None = None,
    ):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(row_shape)
        self.rows = 0
        self.sync_bytes = sync_bytes
        self.expected_rows = expected_rows
        self.digest: str | None = None
        self._sha = hashlib.sha256() if expected_rows is not None else None
        self._unsynced = 0
        self._flusher = None
        self._flushing = None
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        header = self._write_header(expected_rows or 0)
        self._header_bytes = len(header)
        if self._sha is not None:
            self._sha.update(header)

    def _write_header(self, rows: int) -> bytes:
        """Writes numpy's header for ``rows`` rows at the start of the file; returns its bytes."""
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {**header, "shape": (rows, *self.row_shape)})
        self._file.seek(0)
        self._file.write(buffer.getvalue())
        return buffer.getvalue()

    @property
    def nbytes(self) -> int:
        """The file's size: header and rows."""
        return self._header_bytes + self.rows * self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))

    def append(self, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype)
        if array.shape[1:] != self.row_shape:
            raise ValueError(
                f"rows of shape {array.shape[1:]} appended to {self.path.name}, expected {self.row_shape}"
            )
        self._file.write(memoryview(array).cast("B"))  # no copy of the rows
        if self._sha is not None:
            self._sha.update(memoryview(array).cast("B"))  # releases the GIL, like the write
        self.rows += array.shape[0]
        self._unsynced += array.nbytes
        if self._unsynced >= self.sync_bytes:
            self._flush_in_background()

    def _flush_in_background(self) -> None:
        """Starts an `os.fdatasync` of what is written so far on a helper thread, so that hashing and writing the next
        rows overlap the disk's work; one at a time (while one runs, the next is left to a later append or close)."""
        if self._flushing is not None and not self._flushing.done():
            return
        if self._flushing is not None:
            self._flushing.result()  # raises an error of the previous flush here
        if self._flusher is None:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

            self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-datastore-flush")
        self._file.flush()
        self._flushing = self._flusher.submit(os.fdatasync, self._file.fileno())
        self._unsynced = 0

    def _wait_flush(self) -> None:
        if self._flusher is not None:
            flushing, self._flushing = self._flushing, None
            self._flusher.shutdown(wait=True)
            self._flusher = None
            if flushing is not None:
                flushing.result()

    def discard(self) -> None:
        """Closes the file without finishing it (an aborted build): waits for a flush in flight, ignoring its error."""
        try:
            self._wait_flush()
        except OSError:
            pass
        finally:
            self._file.close()

    def close(self) -> None:
        if self._file.closed:
            return
        try:
            self._wait_flush()
        except BaseException:
            self._file.close()
            raise
        self._file.flush()
        if self.expected_rows is not None and self.rows == self.expected_rows:
            self.digest = self._sha.hexdigest()  # the header written first was the right one
        elif len(self._write_header(self.rows)) != self._header_bytes:
            # numpy pads the row count's room to GROWTH_AXIS_MAX_DIGITS: impossible below 10^21 rows
            raise RuntimeError(f"the .npy header of {self.path.name} changed length; the file is not valid")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


class KNNDatastoreWriter:
    """Streams (key, value, provenance) rows into a datastore directory of unknown final size.

    Rows go to a temporary directory next to ``save_directory``; [`~KNNDatastoreWriter.commit`] writes the
    metadata (with the size and SHA-256 of every file) and swaps it into place (`hf_realm.hub_io`), so an interrupted
    build never leaves a half-written datastore behind (nor damages one already at ``save_directory``).
    ``save_directory`` must be new, empty or an earlier datastore save; anything else is refused at construction.
    ``expected_rows``, the number of rows the writer will get if known in advance, lets it hash the files as it writes
    them instead of reading them back at the commit (a hint: any other count is written and hashed correctly too).

    Example:

    ```python
    >>> import numpy as np, tempfile
    >>> from hf_realm import KNNDatastore, KNNDatastoreWriter
    >>> path = tempfile.mkdtemp() + "/store"
    >>> writer = KNNDatastoreWriter(path, key_dim=4)
    >>> writer.add(np.eye(4, dtype=np.float16), np.arange(4), np.zeros((4, 2), dtype=np.int64))
    >>> store = KNNDatastore.from_pretrained(writer.commit())
    >>> len(store), store.key_dim
    (4, 4)
    ```
    """

    def __init__(
        self,
        save_directory: str | os.PathLike,
        key_dim: int,
        with_counts: bool = False,
        expected_rows: int | None = None,
    ):
        self.save_directory = Path(save_directory)
        self.key_dim = int(key_dim)
        self._staging = hub_io.Staging(self.save_directory, DATASTORE_KIND)  # refuses a foreign directory up front
        self.tmp_dir = self._staging.path
        # With the number of rows known in advance (``expected_rows``, a hint: any other count is written correctly
        # too), the files are hashed as they are written instead of read back at the commit.
        expect = {"expected_rows": expected_rows}
        self._keys = _NpyAppender(self.tmp_dir / "keys.npy", np.float16, (self.key_dim,), **expect)
        self._values = _NpyAppender(self.tmp_dir / "values.npy", np.int32, **expect)
        self._provenance = _NpyAppender(self.tmp_dir / "provenance.npy", np.int64, (2,), **expect)
        self._counts = _NpyAppender(self.tmp_dir / "counts.npy", np.int32, **expect) if with_counts else None
        self.max_value = -1
        self._closed = False

    def __len__(self) -> int:
        return self._values.rows

    def add(self, keys, values, provenance, counts=None) -> None:
        """Appends rows. ``keys`` `(n, key_dim)`, ``values`` `(n,)`, ``provenance`` `(n, 2)`; arrays or tensors."""
        keys, values, provenance = (_to_numpy(x) for x in (keys, values, provenance))
        n = keys.shape[0]
        if keys.ndim != 2 or keys.shape[1] != self.key_dim:
            raise ValueError(f"keys of shape {keys.shape}, expected (n, {self.key_dim})")
        if values.shape != (n,) or provenance.shape != (n, 2):
            raise ValueError(f"got {n} keys, values of shape {values.shape}, provenance of shape {provenance.shape}")
        keys16 = keys.astype(np.float16, copy=False)
        # float16 with an all-ones exponent is inf or NaN: checked on the bits (numpy's float16 math is emulated, slow)
        non_finite = (np.ascontiguousarray(keys16).view(np.uint16) & 0x7C00) == 0x7C00
        if non_finite.any():
            bad = int(non_finite.any(axis=1).sum())
            raise ValueError(f"{bad} of {n} keys are not finite in float16 (NaN states, or values beyond +-65504)")
        if n and (values.min() < 0 or values.max() > np.iinfo(np.int32).max):
            raise ValueError(f"values must be token ids in [0, 2^31), got range [{values.min()}, {values.max()}]")
        if (counts is None) != (self._counts is None):
            raise ValueError("counts must be given on every add() exactly when the writer was made with_counts=True")
        self._keys.append(keys16)
        self._values.append(values)
        self._provenance.append(provenance)
        if self._counts is not None:
            self._counts.append(_to_numpy(counts))
        if n:
            self.max_value = max(self.max_value, int(values.max()))

    def commit(self, metadata: dict[str, Any] | None = None) -> Path:
        """Finishes the files, writes the metadata and moves the datastore to ``save_directory``."""
        for appender in (self._keys, self._values, self._provenance, self._counts):
            if appender is not None:
                appender.close()
        meta = dict(metadata or {})
        meta.update(
            format_version=FORMAT_VERSION,
            num_entries=len(self),
            key_dim=self.key_dim,
            input_dim=meta.get("input_dim", self.key_dim),
            key_dtype="float16",
            value_dtype="int32",
            max_value=self.max_value,
            has_counts=self._counts is not None,
        )
        self._closed = True
        known = {
            a.path.name: (a.nbytes, a.digest)
            for a in (self._keys, self._values, self._provenance, self._counts)
            if a is not None and a.digest is not None
        }
        self._staging.commit(meta, known_hashes=known)  # the config last, with sizes and hashes; the crash-safe swap
        return self.save_directory

    def abort(self) -> None:
        """Drops everything written so far."""
        for appender in (self._keys, self._values, self._provenance, self._counts):
            if appender is not None and not appender._file.closed:
                appender.discard()
        self._staging.abort()
        self._closed = True


def _save_npy_chunked(path: Path, array: np.ndarray, chunk: int = 1 << 20) -> None:
    """Writes ``array`` (e.g. a memory map larger than RAM) to a .npy file a chunk at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    for start in range(0, array.shape[0], chunk):
        out[start : start + chunk] = array[start : start + chunk]
    out.flush()
    del out


def merge_datastores(
    directories: Sequence[str | os.PathLike],
    save_directory: str | os.PathLike,
    metadata: dict | None = None,
    verify_hashes: bool = True,
) -> Path:
    """Concatenates saved datastores (same key dim) into one at ``save_directory``, streaming, in the given order.

    Each input is checked against its recorded sizes and SHA-256 first (``verify_hashes=False``: sizes only, for
    stores this job has just written, as a sharded [`KNNDatastore.build`] does)."""
    from .knn_datastore import KNNDatastore

    stores = [KNNDatastore.from_pretrained(d, load_index=False, verify_hashes=verify_hashes) for d in directories]
    dims = {s.key_dim for s in stores}
    if len(dims) != 1:
        raise ValueError(f"cannot merge datastores of key dims {sorted(dims)}")
    with_counts = any(s.counts is not None for s in stores)
    writer = KNNDatastoreWriter(save_directory, dims.pop(), with_counts=with_counts,
                                expected_rows=sum(len(s) for s in stores))  # fmt: skip
    try:
        for store in stores:
            step = 1 << 20
            for start in range(0, len(store), step):
                sl = slice(start, start + step)
                counts = None
                if with_counts:
                    counts = store.counts[sl] if store.counts is not None else np.ones(len(store.values[sl]), np.int32)
                writer.add(store.keys[sl], store.values[sl], store.provenance[sl], counts)
        meta = dict(metadata if metadata is not None else stores[0].metadata)
        return writer.commit(meta)
    except BaseException:
        writer.abort()
        raise


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    """Right-pads lists of ids into a `(len(seqs), max length)` int64 tensor (one vectorised fill, no row loop)."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    width = int(lengths.max()) if len(seqs) else 0
    out = np.full((len(seqs), max(width, 1)), value, dtype=np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat  # row-major: the rows' ids in order
    return torch.from_numpy(out)


def _batch_tensors(batch, tokenizer, is_enc_dec, pretokenized, src_col, tgt_col, text_col, max_length, pad_id):
    """Returns (model inputs, target ids (-100 = not stored)) for one batch of examples."""
    trunc = {"truncation": max_length is not None, "max_length": max_length}
    if pretokenized:
        ids = [list(x) for x in batch["input_ids"]]
        input_ids = _pad(ids, pad_id)
        attention = _pad([list(x) for x in batch["attention_mask"]], 0) if "attention_mask" in batch else None
        if attention is None:
            attention = _pad([[1] * len(x) for x in ids], 0)
        labels = _pad([list(x) for x in batch["labels"]], -100) if "labels" in batch else None
    elif is_enc_dec:
        enc = tokenizer(list(batch[src_col]), text_target=list(batch[tgt_col]), **trunc)
        input_ids = _pad(enc["input_ids"], pad_id)
        attention = _pad(enc["attention_mask"], 0)
        labels = _pad(enc["labels"], -100)
    else:
        enc = tokenizer(list(batch[text_col]), **trunc)
        input_ids = _pad(enc["input_ids"], pad_id)
        attention = _pad(enc["attention_mask"], 0)
        labels = None
    if is_enc_dec:
        return {"input_ids": input_ids, "attention_mask": attention}, labels
    # Decoder-only: state t predicts token t + 1.
    targets = input_ids.masked_fill(attention == 0, -100)
    if labels is not None:
        targets = targets.masked_fill(labels == -100, -100)
    targets = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], -100)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention}, targets


def _decoder_inputs(model, labels: torch.Tensor) -> torch.Tensor:
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if callable(prepare):
        return prepare(labels=labels)
    config = model.config
    start = config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{type(model).__name__} has no decoder_start_token_id to shift the labels with")
    shifted = labels.new_full(labels.shape, config.pad_token_id if config.pad_token_id is not None else 0)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = start
    return shifted.masked_fill(shifted == -100, config.pad_token_id if config.pad_token_id is not None else 0)


def _expected_rows(dataset, start: int, end: int, is_enc_dec: bool) -> int | None:
    """The number of entries a build of the pre-tokenised examples ``start .. end - 1`` stores, counted on the Arrow
    columns without tokenising or padding anything; ``None`` where it is not cheap to know (raw text, ragged masks).
    A hint for the writer (see `_NpyAppender`): the build checks it and writes any other count correctly too."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        table = dataset.with_format("arrow")[start:end]
        if is_enc_dec:  # the labels that are not -100
            labels = pc.list_flatten(table.column("labels"))
            return int(pc.sum(pc.not_equal(labels, -100)).as_py() or 0)
        # decoder-only: state t predicts token t + 1 where the attention mask (and the labels, if any) keep it
        ids = table.column("input_ids")
        counted = [c for c in ("attention_mask", "labels") if c in table.column_names]
        if any(pc.any(pc.not_equal(pc.list_value_length(table.column(c)), pc.list_value_length(ids))).as_py()
               for c in counted):  # fmt: skip
            return None
        keep = pc.is_valid(pc.list_flatten(pc.list_slice(ids, 1)))  # every position from 1 on
        for c in counted:
            shifted = pc.list_flatten(pc.list_slice(table.column(c), 1))
            keep = pc.and_(keep, pc.not_equal(shifted, 0 if c == "attention_mask" else -100))
        return int(pc.sum(pc.cast(keep, pa.int64())).as_py() or 0)
    except (pa.ArrowException, KeyError, TypeError, ValueError):
        return None


@torch.no_grad()
def _build_shard(
    model,
    dataset,
    start,
    end,
    writer,
    tokenizer,
    is_enc_dec,
    pretokenized,
    src_col,
    tgt_col,
    text_col,
    batch_size,
    max_length,
    progress,
):
    from tqdm.auto import tqdm  # noqa: PLC0415

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if pad_id is None:
        pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    bar = tqdm(total=end - start, desc="kNN datastore", unit="ex", disable=not progress)
    rows_out = _OrderedRowWriter(writer)
    try:
        with KNNQueryHook(model, capture="all") as hook:
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                batch = dataset[lo:hi]
                inputs, targets = _batch_tensors(
                    batch, tokenizer, is_enc_dec, pretokenized, src_col, tgt_col, text_col, max_length, pad_id
                )
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                if is_enc_dec:
                    dec = _decoder_inputs(model, targets.to(device, non_blocking=True))
                    model(**inputs, decoder_input_ids=dec, use_cache=False)
                else:
                    model(**inputs, use_cache=False)
                states = hook.state  # (b, t, d), on the device
                if states.shape[:2] != targets.shape:
                    raise RuntimeError(f"captured states {tuple(states.shape[:2])} != targets {tuple(targets.shape)}")
                # Which positions are stored is known on the host (targets live there): no device sync. The rows are
                # gathered (none to gather when every position is stored) and cast to the stored float16 on the
                # device, copied back asynchronously, and written by a background thread while the device runs the
                # next batch.
                width = targets.shape[1]
                flat_targets = targets.reshape(-1)
                stored = flat_targets != -100
                flat_states = states.reshape(-1, states.shape[-1])
                if bool(stored.all()):
                    positions = torch.arange(flat_targets.numel())
                    keys = flat_states.to(torch.float16)
                    values = flat_targets.numpy()
                else:
                    positions = stored.nonzero().squeeze(1)
                    keys = flat_states.index_select(0, positions.to(device, non_blocking=True)).to(torch.float16)
                    values = flat_targets[positions].numpy()
                finite = torch.isfinite(keys).all()
                provenance = torch.stack([positions // width + lo, positions % width], dim=1).numpy()
                rows_out.submit(keys, finite, values, provenance, f"examples {lo}..{hi - 1}")
                bar.update(hi - lo)
        rows_out.finish()
    finally:
        rows_out.close()
        bar.close()
        model.train(was_training)


class _OrderedRowWriter:
    """Adds each batch's rows to a [`KNNDatastoreWriter`] on one background thread, in submission order, so the host's
    checks and file writes overlap the device's next forward.

    The copy of a batch's keys back to the host is waited for here, on the calling thread, and never by blocking on
    it: a batch goes to the writer thread once its copy is seen complete (`torch.cuda.Event.query`, at the next
    `submit`), so the writer thread makes no CUDA call at all. A thread waiting on a CUDA event beside the one
    launching the forward slowed every launch of the forward (measured on an H100: the forward's host time per batch
    went from 10 to 16 ms). Batches wait up to `max_bytes_in_flight` of keys (copying or queued; at least one batch):
    room for the thread to sit in a periodic flush to disk (`_NpyAppender.sync_bytes`) while the device goes on. Past
    it, `submit` waits for the oldest copy, or for the oldest batch to be written. An error on the thread is raised
    in the caller at a later `submit` or at `finish`."""

    def __init__(self, writer: KNNDatastoreWriter, max_bytes_in_flight: int = 1 << 28):
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.writer, self.max_bytes_in_flight = writer, max_bytes_in_flight
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="knn-datastore-writer")
        self._copying = deque()  # (event or None, rows for _add, bytes of keys): copies not yet seen complete
        self._pending = deque()  # (future, bytes of keys): handed to the writer thread
        self._bytes = 0

    def submit(self, keys: torch.Tensor, finite: torch.Tensor, values, provenance, where: str) -> None:
        if keys.device.type == "cuda":
            keys, finite = keys.to("cpu", non_blocking=True), finite.to("cpu", non_blocking=True)  # pinned memory
            done = torch.cuda.Event()
            done.record()
        else:
            keys, finite, done = keys.cpu(), finite.cpu(), None
        size = keys.numel() * keys.element_size()
        self._copying.append((done, (keys, finite, values, provenance, where), size))
        self._bytes += size
        self._hand_over(wait=False)
        while self._pending and self._pending[0][0].done():  # surfaces an error of the thread early
            self._wait_oldest()
        while self._bytes > self.max_bytes_in_flight and len(self._copying) + len(self._pending) > 1:
            if self._pending:
                self._wait_oldest()
            else:
                self._hand_over(wait=True, limit=1)

    def _hand_over(self, wait: bool, limit: int | None = None) -> None:
        """Gives the writer thread the batches whose copies are complete, oldest first (with ``wait``: waiting for
        them, at most ``limit``)."""
        handed = 0
        while self._copying and (limit is None or handed < limit):
            done, rows, size = self._copying[0]
            if done is not None:
                if wait:
                    done.synchronize()
                elif not done.query():
                    break
            self._copying.popleft()
            self._pending.append((self._pool.submit(self._add, *rows), size))
            handed += 1

    def _wait_oldest(self) -> None:
        future, size = self._pending.popleft()
        self._bytes -= size
        future.result()

    def _add(self, keys, finite, values, provenance, where) -> None:
        if not bool(finite):
            raise ValueError(
                f"the model produced non-finite hidden states (NaN, or beyond float16's +-65504) for {where}"
            )
        self.writer.add(keys.numpy(), values, provenance)

    def finish(self) -> None:
        self._hand_over(wait=True)
        while self._pending:
            self._wait_oldest()

    def close(self) -> None:
        """Waits for the thread (after an error: drops what has not started) and stops it."""
        for future, _ in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self._copying.clear()


def build_datastore(cls, model: nn.Module, dataset, save_directory: str | os.PathLike, *, tokenizer=None,
                    source_column=None, target_column=None, text_column=None, batch_size: int = 32, max_length=None,
                    accelerator=None, model_name_or_path=None, progress: bool = True):  # fmt: skip
    """The body of [`KNNDatastore.build`] (``cls`` is the datastore class to load the result with)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected an int >= 1, got {batch_size!r}")
    is_enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    columns = set(dataset.column_names)
    pretokenized = "input_ids" in columns
    if not pretokenized:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed for a dataset without an `input_ids` column")
        needed = [source_column, target_column] if is_enc_dec else [text_column]
        if any(c is None for c in needed):
            what = "source_column and target_column" if is_enc_dec else "text_column"
            raise ValueError(f"{type(model).__name__} needs {what} for a raw-text dataset")
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"columns {missing} not in the dataset (it has {sorted(columns)})")
    elif is_enc_dec and "labels" not in columns:
        raise ValueError("a pre-tokenised dataset for an encoder-decoder model needs a `labels` column")
    hook_probe = KNNQueryHook(model)  # raises early for models without an output embedding
    out = hook_probe.module
    key_dim = getattr(out, "in_features", None) or int(out.weight.shape[1])

    rank, num_processes = process_layout(accelerator) if accelerator is not None else (0, 1)
    save_directory = Path(save_directory)
    n = len(dataset)
    # Whole batches per rank: every forward pass then runs the rows the one-process build batches together, so
    # the merged keys are that build's bit for bit (padding and matmul shapes, hence the rounding, are the same).
    first_batch, end_batch = shard_range(-(-n // batch_size), rank, num_processes)
    start, end = min(first_batch * batch_size, n), min(end_batch * batch_size, n)
    shard_root = save_directory.with_name(f".{save_directory.name}.shards")
    target_dir = save_directory if num_processes == 1 else shard_root / f"rank-{rank:05d}"

    metadata = {
        "model_name_or_path": model_name_or_path or getattr(model, "name_or_path", None) or None,
        "model_class": type(model).__name__,
        "model_fingerprint": None,  # below: hashed beside the build
        "is_encoder_decoder": is_enc_dec,
        "tokenizer_name_or_path": getattr(tokenizer, "name_or_path", None) if tokenizer is not None else None,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer) if tokenizer is not None else None,
        "vocab_size": int(getattr(out, "out_features", 0) or out.weight.shape[0]),
        "source": {
            "num_examples": n,
            "fingerprint": getattr(dataset, "_fingerprint", None),
            "columns": [source_column, target_column] if is_enc_dec else [text_column],
        },
        "history": [],
    }
    expected = _expected_rows(dataset, start, end, is_enc_dec) if pretokenized else None
    writer = KNNDatastoreWriter(target_dir, key_dim, expected_rows=expected)
    try:
        # The weights' hashes (0.6 s for a Marian-size model) run on a helper thread while the batches run.
        fingerprint = start_model_fingerprint(model)
        _build_shard(
            model, dataset, start, end, writer, tokenizer, is_enc_dec, pretokenized,
            source_column, target_column, text_column, batch_size, max_length,
            progress=progress and rank == 0,
        )  # fmt: skip
        metadata["model_fingerprint"] = fingerprint()
        writer.commit(metadata)
    except BaseException:
        writer.abort()
        raise
    # The files were hashed by this job a moment ago (the commit records their SHA-256) and every key was checked
    # finite on its way in (on the device, and by the writer): reading them back to hash them and scan them again
    # would cost as long as writing them. Their sizes are still checked.
    if num_processes == 1:
        return cls.from_pretrained(save_directory, verify_hashes=False, _keys_checked=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shards = [shard_root / f"rank-{r:05d}" for r in range(num_processes)]
        merge_datastores(shards, save_directory, metadata=metadata, verify_hashes=False)
        # Only the shard datastores this build wrote go; a folder holding anything else is left as it is.
        for shard in shards:
            hub_io.remove_owned_directory(shard, DATASTORE_KIND)
        with contextlib.suppress(OSError):
            shard_root.rmdir()
    accelerator.wait_for_everyone()
    return cls.from_pretrained(save_directory, verify_hashes=False, _keys_checked=True)
