"""Persistence shared by every object hf_realm saves: one crash-safe directory save, one Hub upload, one Hub download.

The index (`RealmBlockIndex`), the kNN datastore (`KNNDatastore`, `KNNDatastoreWriter`), the generated world and its
tokenizer are each saved as one directory through [`save_directory`] / [`Staging`]:

- **Ownership.** A save only ever replaces what hf_realm wrote: a missing or empty directory, or one that holds the
  kind's marker file (``index_config.json``, ``knn_datastore.json``, ...) and nothing but entries of that kind. Anything
  else (a model directory, a project directory, an index directory with a user's file added) is refused with a
  `FileExistsError` naming the unknown entries, before anything on disk changes.
- **Staging.** The new content is written to a sibling ``.<name>.tmp-<pid>-<random>``. The config file is written last,
  with a manifest of every other file: ``files`` (relative path -> bytes) and ``sha256`` (relative path -> digest,
  streamed in 1 MiB chunks). Every file and directory is fsynced before the swap.
- **Swap.** On Linux, ``renameat2(RENAME_EXCHANGE)`` exchanges the staged directory and the target in one atomic step:
  at every instant the target path is the complete old or the complete new directory; the old one, now under the
  staging name, is deleted afterwards. Where the exchange is unavailable (other systems, file systems without it) the
  target is renamed to ``.<name>.old-<pid>-<random>`` and the staged directory renamed in; a crash between the two
  renames leaves no target, and the next load or save renames the complete old copy back ([`recover`]).
- **Leftovers.** Every save first deletes the siblings ``.<name>.tmp-*`` / ``.<name>.old-*`` left by interrupted saves:
  only those whose entries are all entries of the kind and whose writing process is gone (its pid is in the name;
  names from earlier hf_realm versions carry none and count as gone).
- **Loading.** [`resolve`] turns a local path or a Hub repo id into a directory (recovering an interrupted swap first,
  downloading with ``snapshot_download`` otherwise; a path that is neither raises `FileNotFoundError`).
  [`Manifest`] checks every file a loader reads: the name stays inside the directory (no ``..``, no absolute path, no
  link out of it), and the file has the size and, for directories saved with hashes, the SHA-256 recorded at save.
  Directories saved before hashes existed load with the size checks they had.

Concurrent saves to the same path from several processes are not supported (the last swap wins).
[`_checkpoint`] is called between the steps of a save: a no-op hook that the kill tests replace.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


logger = logging.getLogger(__name__)

HASH_CHUNK_BYTES = 1 << 20
_USE_EXCHANGE = True  # tests set False to exercise the two-rename fallback
_ACTIVE: set[str] = set()  # staging directories of this process still being written


def _checkpoint(step: str) -> None:
    """Called between the steps of a save (``"cleaned"``, ``"staged"``, ``"written"``, ``"hashed"``, ``"config"``,
    ``"moved-aside"``, ``"swapped"``, ``"removing"``); a no-op that kill tests replace."""


@dataclass(frozen=True)
class DirectoryKind:
    """What one kind of saved directory looks like.

    Args:
        name (`str`): Shown in errors (``"RealmBlockIndex"``).
        marker (`str`): The file that makes a directory one of this kind (its config, written last).
        entries (`frozenset[str]`): Every top-level entry a save of this kind writes, the marker included.
        hint (`str`): Sub-directory suggested when a save is refused (``"index"``).
        manifest (`bool`, *optional*, defaults to `True`): Whether the marker is hf_realm's JSON config, which gets the
            file manifest; `False` for directories whose marker another library writes (a tokenizer).
    """

    name: str
    marker: str
    entries: frozenset[str]
    hint: str
    manifest: bool = True


# ----------------------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------------------


def _unknown_entries(path: Path, kind: DirectoryKind) -> list[str]:
    entries = sorted(os.listdir(path))
    if not entries:
        return []
    if kind.marker not in entries:
        return entries
    return [e for e in entries if e not in kind.entries]


def check_ownership(path: str | os.PathLike, kind: DirectoryKind) -> Path:
    """The absolute target of a save of ``kind`` at ``path``; raises unless it is missing, empty or already one of
    ``kind``'s directories with nothing else in it."""
    path = Path(os.path.realpath(os.fspath(path)))
    if not os.path.lexists(path):
        return path
    if not path.is_dir():
        raise NotADirectoryError(f"{path} exists and is not a directory: refusing to save a {kind.name} there")
    unknown = _unknown_entries(path, kind)
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise FileExistsError(
            f"{path} holds files hf_realm did not write as a {kind.name} ({shown}). Saving replaces the whole "
            f"directory, so a {kind.name} is only saved to a new or empty directory or over an earlier {kind.name} "
            f"save; save it to a sub-directory instead, e.g. {path / kind.hint}"
        )
    cwd = os.getcwd()
    if cwd == str(path) or cwd.startswith(str(path) + os.sep):  # the swap would leave the process in a deleted dir
        raise ValueError(f"cannot save a {kind.name} to {path}: it is (or holds) the current working directory")
    return path


def _leftover_pattern(name: str) -> re.Pattern:
    # ours: .<name>.tmp-<pid>-<hex8> / .<name>.old-<pid>-<hex8>; earlier versions: tempfile/uuid suffixes, no pid
    return re.compile(
        rf"^\.{re.escape(name)}\.(?:(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{{8}}|(?:tmp-|old-)?[a-z0-9_]{{8}})$"
    )


def _process_gone(pid: int) -> bool:
    if pid == os.getpid():
        return True  # this process' live staging directories are in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: alive, another user's
        return False
    return False


def _leftovers(path: Path, kind: DirectoryKind) -> list[Path]:
    """Siblings of ``path`` left by interrupted saves of ``kind`` (by name and content), oldest first."""
    pattern = _leftover_pattern(path.name)
    found = []
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    for name in names:
        match = pattern.match(name)
        candidate = path.parent / name
        if match is None or str(candidate) in _ACTIVE or candidate.is_symlink() or not candidate.is_dir():
            continue
        if match["pid"] is not None and not _process_gone(int(match["pid"])):
            continue
        try:
            if all(e in kind.entries for e in os.listdir(candidate)):
                found.append(candidate)
        except OSError:
            continue
    return sorted(found, key=lambda p: p.stat().st_mtime)


def _remove_tree(path: Path, kind: DirectoryKind | None = None) -> None:
    """Delete a directory we wrote, marker first: a partly deleted copy never looks complete."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    entries = sorted(os.listdir(path), key=lambda e: (kind is None or e != kind.marker, e))
    for entry in entries:
        child = path / entry
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
        _checkpoint("removing")
    path.rmdir()


def remove_owned_directory(path: str | os.PathLike, kind: DirectoryKind) -> bool:
    """Delete ``path`` if it is one of ``kind``'s directories with nothing else in it (e.g. the per-process shards of
    a build, once merged); anything else is left as it is. Returns whether it was deleted."""
    path = Path(path)
    if not path.is_dir() or path.is_symlink() or not (path / kind.marker).is_file() or _unknown_entries(path, kind):
        return False
    _remove_tree(path, kind)
    return True


def _remove_old(path: Path, kind: DirectoryKind) -> None:
    # The new directory is in place: failing to delete the old copy only leaves a leftover for the next save.
    try:
        _remove_tree(path, kind)
    except OSError as err:
        logger.warning(f"could not remove the previous copy {path} ({err}); the next save removes it")


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a directory cannot be opened on some systems (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _walk_files(root: Path) -> Iterable[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            file = Path(dirpath) / name
            yield file.relative_to(root).as_posix(), file


def _renameat2():
    if not _USE_EXCHANGE or not sys.platform.startswith("linux"):
        return None
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the directories ``a`` and ``b``; `False` when the system or file system cannot."""
    func = _renameat2()
    if func is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if func(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _sibling(path: Path, what: str) -> Path:
    return path.with_name(f".{path.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


class Staging:
    """A save of ``kind`` to ``path`` in progress: files go to ``staging.path``; [`~Staging.commit`] writes the config
    with its manifest and swaps the directory in, [`~Staging.abort`] drops it.

    The ownership check runs here (so a long build is refused before it starts) and again at commit.

    Example:

    ```python
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from hf_realm.hub_io import DirectoryKind, Staging
    >>> kind = DirectoryKind("Notes", "notes.json", frozenset({"notes.json", "a.txt"}), hint="notes")
    >>> target = Path(tempfile.mkdtemp()) / "notes"
    >>> staging = Staging(target, kind)
    >>> _ = (staging.path / "a.txt").write_text("hello")
    >>> staging.commit({"version": 1}) == target, json.loads((target / "notes.json").read_text())["files"]
    (True, {'a.txt': 5})
    ```
    """

    def __init__(self, path: str | os.PathLike, kind: DirectoryKind):
        self.kind = kind
        recover(path, kind)  # an interrupted swap's old copy is put back before anything else is decided
        self.target = check_ownership(path, kind)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        for leftover in _leftovers(self.target, kind):
            logger.info(f"removing {leftover}, left by an interrupted save")
            _remove_tree(leftover, kind)
        _checkpoint("cleaned")
        self.path = _sibling(self.target, "tmp")
        self.path.mkdir()
        _ACTIVE.add(str(self.path))
        _checkpoint("staged")

    def commit(self, config: dict | None = None, known_hashes: dict[str, tuple[int, str]] | None = None) -> Path:
        """Write ``config`` (with ``files`` and ``sha256`` added) as the kind's marker, fsync, and swap the staged
        directory in. Returns the target path.

        ``known_hashes``: ``{relative path: (size, SHA-256)}`` of files whose digest the writer computed over the
        bytes it wrote (a streaming writer), used instead of reading the file back when its size on disk matches."""
        kind, staged, target = self.kind, self.path, self.target
        known_hashes = known_hashes or {}
        try:
            _checkpoint("written")
            check_ownership(target, kind)  # the target may have changed since the staging began
            if kind.manifest:
                sizes, hashes = {}, {}
                for rel, file in _walk_files(staged):
                    if rel == kind.marker:
                        continue
                    sizes[rel] = file.stat().st_size
                    known = known_hashes.get(rel)
                    hashes[rel] = known[1] if known is not None and known[0] == sizes[rel] else file_sha256(file)
                config = {**(config or {}), "files": sizes, "sha256": hashes}
                _checkpoint("hashed")
                with open(staged / kind.marker, "w") as f:
                    json.dump(config, f, indent=2)
                _checkpoint("config")
            for dirpath, _, filenames in os.walk(staged):
                for name in filenames:
                    _fsync(Path(dirpath) / name)
                _fsync(Path(dirpath))
            self._swap()
        except BaseException:
            self.abort()
            raise
        _ACTIVE.discard(str(staged))
        return target

    def _swap(self) -> None:
        staged, target = self.path, self.target
        if not os.path.lexists(target):
            os.rename(staged, target)
            _checkpoint("swapped")
            _fsync(target.parent)
            return
        if _exchange(staged, target):  # the old directory is now at `staged`
            _checkpoint("swapped")
            _fsync(target.parent)
            _remove_old(staged, self.kind)
            return
        aside = _sibling(target, "old")
        os.rename(target, aside)
        _checkpoint("moved-aside")
        try:
            os.rename(staged, target)
        except BaseException:
            os.rename(aside, target)
            raise
        _checkpoint("swapped")
        _fsync(target.parent)
        _remove_old(aside, self.kind)

    def abort(self) -> None:
        """Drop everything staged so far (the target is untouched)."""
        _ACTIVE.discard(str(self.path))
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


def save_directory(path: str | os.PathLike, kind: DirectoryKind, write: Callable[[Path], dict | None]) -> Path:
    """Save a directory of ``kind`` at ``path``: ``write(staging_dir)`` writes the files and returns the config (the
    kind's marker, written last with the manifest); then the directory is swapped in crash-safely. Returns the path."""
    staging = Staging(path, kind)
    try:
        config = write(staging.path)
    except BaseException:
        staging.abort()
        raise
    return staging.commit(config)


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def recover(path: str | os.PathLike, kind: DirectoryKind) -> bool:
    """If ``path`` is missing because a save was interrupted between its two renames, rename the complete old copy
    back. Returns whether it did."""
    path = Path(os.path.abspath(os.fspath(path)))
    if os.path.lexists(path) or not path.parent.is_dir():
        return False
    for candidate in reversed(_leftovers(path, kind)):
        if ".old-" not in candidate.name or not (candidate / kind.marker).is_file():
            continue
        try:
            files = json.loads((candidate / kind.marker).read_text()).get("files", {}) if kind.manifest else {}
            complete = all(
                (candidate / name).is_file() and (candidate / name).stat().st_size == size
                for name, size in files.items()
                if _is_plain_relative(name) and isinstance(size, int)
            )
        except (OSError, ValueError, AttributeError):
            complete = False
        if complete:
            try:
                os.rename(candidate, path)
            except OSError:
                return False
            logger.warning(
                f"{path} was missing after an interrupted save: restored the previous copy {candidate.name}"
            )
            return True
    return False


def _looks_like_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if name.startswith(("/", ".", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve(
    path_or_repo_id: str | os.PathLike,
    kind: DirectoryKind,
    *,
    repo_type: str,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | None = None,
) -> tuple[Path, Path]:
    """The local directory of ``path_or_repo_id`` and the root nothing outside which may be read.

    A local directory is used as it is (after [`recover`]); otherwise a valid Hub repo id is downloaded with
    ``snapshot_download`` (its root is the repo's cache folder, where the snapshot's links point). A path that is
    neither raises `FileNotFoundError` naming it.
    """
    name = os.fspath(path_or_repo_id)
    local = Path(name)
    recover(local, kind)
    if local.is_dir():
        root = Path(os.path.realpath(local))
    elif local.exists():
        raise NotADirectoryError(f"{local} is a file; expected a {kind.name} directory (with {kind.marker})")
    elif not _looks_like_repo_id(name):
        raise FileNotFoundError(f"{name}: no such directory (and not a Hub repo id); expected a saved {kind.name}")
    else:
        import huggingface_hub
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            local = Path(
                huggingface_hub.snapshot_download(
                    name,
                    repo_type=repo_type,
                    revision=revision,
                    token=token,
                    cache_dir=cache_dir,
                    allow_patterns=[f"{subfolder}/*"] if subfolder else None,
                )
            )
        except (HfHubHTTPError, LocalEntryNotFoundError) as err:
            raise FileNotFoundError(
                f"{name} is not a local directory, and no {repo_type} repo {name!r} could be downloaded from the Hub "
                f"({type(err).__name__}: {err})"
            ) from err
        # A Hub cache snapshot holds links into the repo's blobs/ folder, two levels up.
        root = local.parent.parent if local.parent.name == "snapshots" else local
        root = Path(os.path.realpath(root))
    return (local / subfolder if subfolder else local), root


def _is_plain_relative(name) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    pure = PurePosixPath(name)
    return not pure.is_absolute() and ".." not in pure.parts and not re.match(r"^[A-Za-z]:", name)


def read_config(directory: Path, kind: DirectoryKind, required: dict[str, type]) -> dict:
    """``kind``'s JSON config in ``directory``, with ``required`` keys of the given types; a `ValueError` naming the file
    and what was expected otherwise."""
    file = directory / kind.marker
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); expected the {kind.name} config written at save") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{file} holds a JSON {type(meta).__name__}; expected an object (the {kind.name} config)")
    missing = [key for key in required if key not in meta]
    if missing:
        raise ValueError(f"{file} lacks {missing}; a {kind.name} config has {sorted(required)}")
    for key, typ in required.items():
        if not isinstance(meta[key], typ) or isinstance(meta[key], bool) and typ is not bool:
            raise ValueError(f"{file}: {key!r} is {meta[key]!r}; expected {typ.__name__}")
    return meta


class Manifest:
    """The files a saved directory's config records, and the checks every read goes through.

    Args:
        directory (`Path`): The saved directory.
        root (`Path`): Nothing outside it is read (see [`resolve`]).
        meta (`dict`): The config; ``files`` (relative path -> bytes) and ``sha256`` (relative path -> digest) when
            present.
        config_name (`str`): The config's file name, for errors.
    """

    def __init__(self, directory: Path, root: Path, meta: dict, config_name: str):
        self.directory, self.root, self.config_name = directory, Path(os.path.realpath(root)), config_name
        source = directory / config_name
        files, hashes = meta.get("files", {}), meta.get("sha256")
        if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
            raise ValueError(f"{source}: 'files' must map file names to byte sizes")
        if hashes is not None and (not isinstance(hashes, dict) or set(hashes) != set(files)):
            raise ValueError(f"{source}: 'sha256' must give a digest for every file in 'files'")
        self.sizes, self.hashes = files, hashes
        self._verified: set[str] = set()
        for name in files:
            self.path(name, source=config_name)

    @property
    def hashed(self) -> bool:
        """Saved with content hashes: every file the loader reads must be recorded."""
        return self.hashes is not None

    def path(self, name: str, source: str | None = None) -> Path:
        """``directory / name`` after checking that it stays inside the directory (names from a config or a
        ``state.json`` are data, not trusted paths)."""
        where = source or self.config_name
        if not _is_plain_relative(name):
            raise ValueError(f"{where} in {self.directory} names {name!r}, a path outside the directory: refused")
        path = self.directory.joinpath(*PurePosixPath(name).parts)
        real = os.path.realpath(path)
        if real != str(self.root) and not real.startswith(str(self.root) + os.sep):
            raise ValueError(f"{path} (named in {where}) links outside {self.directory}: refused")
        return path

    def has(self, name: str) -> bool:
        """Whether the save wrote ``name``: recorded in the manifest (hashed directories; a file found there but not
        recorded is an error), or present (earlier directories)."""
        path = self.path(name)
        if not self.hashed:
            return path.is_file()
        if name not in self.sizes and os.path.lexists(path):
            raise ValueError(f"{path} is not recorded in {self.config_name}: added or altered after the save")
        return name in self.sizes

    def check(self, name: str, verify_hash: bool = True) -> Path:
        """The checked path of a file the loader is about to read: recorded (hashed directories), present, of the
        recorded size and SHA-256."""
        path = self.path(name)
        if self.hashed and name not in self.sizes:
            raise ValueError(f"{path} is not recorded in {self.config_name}: added or altered after the save")
        if not path.is_file():
            raise ValueError(f"{path} is missing (expected by {self.config_name})")
        expected = self.sizes.get(name)
        if expected is not None and path.stat().st_size != expected:
            raise ValueError(f"{path} is truncated or altered: {path.stat().st_size} bytes, expected {expected}")
        if verify_hash and self.hashed and name not in self._verified:
            if file_sha256(path) != self.hashes[name]:
                raise ValueError(
                    f"{path} is altered: its SHA-256 differs from the one recorded in {self.config_name} at save"
                )
            self._verified.add(name)
        return path

    def check_all(self, verify_hash: bool = True) -> None:
        """[`~Manifest.check`] every recorded file (each file is hashed once per `Manifest`)."""
        for name in self.sizes:
            self.check(name, verify_hash)


def dataset_files(manifest: Manifest, dataset_dir: str) -> list[str]:
    """The files `datasets.load_from_disk` reads from a ``save_to_disk`` folder inside a saved directory (relative
    names), after checking that the Arrow files its ``state.json`` names stay inside the folder."""
    state_name = f"{dataset_dir}/state.json"
    state_file = manifest.path(state_name)
    if manifest.hashed and state_name not in manifest.sizes or not state_file.is_file():
        manifest.check(state_name)  # raises: not recorded / missing
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        data_files = [entry["filename"] for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{state_file} is not a `datasets` state file ({type(err).__name__}: {err}); expected "
            '{"_data_files": [{"filename": ...}], ...}'
        ) from err
    for name in data_files:
        if not _is_plain_relative(name) or "/" in name:
            raise ValueError(f"{state_file} names {name!r}, a path outside {manifest.path(dataset_dir)}: refused")
        manifest.path(f"{dataset_dir}/{name}", source=state_name)
    names = [state_name, *(f"{dataset_dir}/{name}" for name in data_files)]
    if manifest.has(f"{dataset_dir}/dataset_info.json"):
        names.append(f"{dataset_dir}/dataset_info.json")
    return names


# ----------------------------------------------------------------------------------------------------------------------
# Hub upload
# ----------------------------------------------------------------------------------------------------------------------


def push_folder_to_hub(
    save: Callable[[str], object],
    repo_id: str,
    *,
    repo_type: str,
    commit_message: str,
    path_in_repo: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    folder: str | os.PathLike | None = None,
) -> str:
    """Create ``repo_id`` if needed and upload a saved directory: ``folder`` when given, else what ``save(tmp_dir)``
    writes to a temporary directory. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    extra = {k: v for k, v in {"path_in_repo": path_in_repo, "revision": revision}.items() if v is not None}
    with tempfile.TemporaryDirectory() as tmp:
        if folder is None:
            folder = os.path.join(tmp, "upload")
            save(folder)
        result = api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, commit_message=commit_message, **extra
        )
    return getattr(result, "commit_url", str(result))


__all__ = [
    "DirectoryKind",
    "Manifest",
    "Staging",
    "dataset_files",
    "check_ownership",
    "file_sha256",
    "push_folder_to_hub",
    "read_config",
    "recover",
    "resolve",
    "save_directory",
]
