"""The house: docs/design.md's maps (§7's module table, §8's file table) and README.md's layout name every file of
the tree and nothing that is not there, and no source module grows past 500 lines."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "cllm"
MAX_LINES = 500


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:end if end != -1 else len(text)]


def _first_column(table: str) -> str:
    return "\n".join(line.split("|")[1] for line in table.splitlines() if line.startswith("| "))


def _modules():
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))


def test_design_maps_every_module_of_the_package():
    table = _first_column(_section((ROOT / "docs" / "design.md").read_text(), "## 7. The Python layer"))
    named = set(re.findall(r"`([\w/]+\.py)`", table))
    modules = set(_modules())
    assert modules - named == set(), "modules missing from docs/design.md §7"
    assert named - modules == set(), "docs/design.md §7 names modules that do not exist"


def test_design_maps_every_file_of_csrc_tests_and_benchmarks():
    where = _section((ROOT / "docs" / "design.md").read_text(), "## 8. Where each part lives")
    csrc = {p.name for p in (ROOT / "csrc").iterdir()}
    named = set(re.findall(r"csrc/([\w.]+)", _first_column(where)))
    named |= {n for row in re.findall(r"\| (csrc/[^|]+)\|", where) for n in re.findall(r"([\w]+\.(?:cpp|h|map))", row)}
    assert csrc - named == set(), "csrc files missing from docs/design.md §8"
    assert named - csrc == set(), "docs/design.md §8 names csrc files that do not exist"
    tests = {p.name for p in (ROOT / "tests").iterdir() if p.name not in ("__pycache__",)}
    benchmarks = {p.name for p in (ROOT / "benchmarks").iterdir() if p.suffix in (".py", ".cpp")}
    for name in sorted(tests | benchmarks):
        assert name in where, f"{name} is missing from docs/design.md §8"


def test_readme_layout_names_every_part_of_the_package():
    layout = _section((ROOT / "README.md").read_text(), "## Layout")
    for module in _modules():
        folder, _, name = module.rpartition("/")
        stem = name[:-3]
        if stem == "__init__" or stem.startswith("_"):
            continue
        assert re.search(rf"\b{stem}\b", layout), f"README's layout does not name {module}"
        if folder:
            assert f"{folder}/" in layout, f"README's layout does not name the folder {folder}/"
    for rung in sorted(p.name for p in (ROOT / "tests").iterdir() if p.is_dir() and p.name[0].isdigit()):
        assert rung in layout, f"README's layout does not name tests/{rung}/"


@pytest.mark.parametrize("folder", ["python", "csrc", "tests", "benchmarks"])
def test_no_source_module_over_500_lines(folder):
    long = {p.relative_to(ROOT).as_posix(): n for p in (ROOT / folder).rglob("*")
            if p.suffix in (".py", ".cpp", ".h") and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines"


def test_the_flat_layouts_module_paths_still_import_with_a_warning():
    """Code written against the flat layout (cllm.trainer, cllm.tokenizer, ...) keeps working: each old path is the
    module it moved to (the same object), and says where that is."""
    import importlib
    import sys
    import warnings

    import cllm
    from cllm._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(f"cllm.{old}", None)
        with pytest.warns(DeprecationWarning, match=f"cllm.{old} is now cllm.{new}"):
            module = importlib.import_module(f"cllm.{old}")
        assert module is importlib.import_module(f"cllm.{new}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from cllm.distributed import GradientReducer, auto_communicator
        from cllm.tokenizer import BPETokenizer, ByteTokenizer
        assert (GradientReducer, auto_communicator) == (cllm.parallel.GradientReducer, cllm.parallel.auto_communicator)
        assert (BPETokenizer, ByteTokenizer) == (cllm.BPETokenizer, cllm.ByteTokenizer)
        assert cllm.tokenizer.ByteTokenizer is cllm.ByteTokenizer
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        cllm.nonexistent
    assert all(hasattr(cllm, name) for name in cllm.__all__)
