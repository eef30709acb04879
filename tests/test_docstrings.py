"""Every `Example:` block in the package's docstrings runs and prints what it says (doctest)."""

import doctest
import importlib
import pkgutil
import re

import pytest

import hf_realm


MODULES = sorted(
    m.name for m in pkgutil.walk_packages(hf_realm.__path__, "hf_realm.") if not m.name.split(".")[-1].startswith("_")
)


class _MarkdownParser(doctest.DocTestParser):
    """Docstrings follow transformers' format: examples sit in ```python fences, which end the expected output."""

    def parse(self, string, name="<string>"):
        return super().parse(re.sub(r"^\s*```\w*\s*$", "", string, flags=re.M), name)


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples(module_name):
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # an optional dependency (faiss, triton, ...) is missing
        pytest.skip(f"{module_name}: {e}")
    finder = doctest.DocTestFinder(parser=_MarkdownParser())
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, module_name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {module_name}"
