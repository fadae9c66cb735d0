"""The package's rooms and the directions they may import in (docs/architecture.md).

Every module's imports are parsed (function-local ones included); a forbidden edge, a cycle
between rooms, or a function-local import of the package fails the test. The same checker run
on a small fixture package must report each of those.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layering import check  # noqa: E402

import llama4_jax  # noqa: E402

PACKAGE_DIR = Path(llama4_jax.__file__).resolve().parent

# room → what it may import ("parallel.rules": only that module of the room). The top
# (`__init__`, api, cli, __main__) may import anything below it; nothing imports cli.
BELOW_CLI = {"errors", "config", "model", "parallel", "data", "train", "infer", "evals", "compress",
             "convert", "bench", "api"}
ALLOWED = {
    "errors": set(),
    "parallel": {"errors"},
    "model": {"errors", "parallel.rules"},
    "data": {"errors"},
    "config": {"errors", "model", "data", "parallel"},
    "convert": {"errors", "model"},
    "train": {"errors", "model", "data", "parallel", "config"},
    "infer": {"errors", "model", "parallel", "data", "convert"},
    "evals": {"errors", "model", "parallel", "data", "convert", "infer"},
    "compress": {"errors", "model", "parallel", "data", "convert", "infer", "evals"},
    "bench": {"errors", "model", "parallel", "data", "convert", "config", "train", "infer"},
    "api": {"errors", "model", "convert", "infer", "parallel", "data"},
    "__init__": {"api", "infer"},
    "cli": BELOW_CLI,
    "__main__": {"cli"},
}


def test_llama4_jax_layering():
    problems = check(PACKAGE_DIR, "llama4_jax", ALLOWED)
    assert not problems, "\n".join(problems)


def test_every_room_is_in_the_table():
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE_DIR.iterdir()
             if (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert rooms <= set(ALLOWED), f"rooms without import rules: {sorted(rooms - set(ALLOWED))}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "fakepkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "fakepkg"


def test_checker_reports_a_forbidden_edge_a_cycle_and_a_local_import(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "model/__init__.py": "",
        "model/layers.py": "from ..train import loop\n",  # forbidden: model → train
        "train/__init__.py": "",
        "train/loop.py": "from fakepkg.model import layers\n\ndef f():\n    from ..cli import main\n",
        "cli.py": "import json\nfrom .train.loop import f\n",
    })
    allowed = {"model": set(), "train": {"model"}, "cli": {"train", "model"}, "__init__": set()}
    problems = check(pkg, "fakepkg", allowed)
    text = "\n".join(problems)
    assert any("model may not import train.loop" in p for p in problems), text
    assert any("train may not import cli" in p for p in problems), text
    assert any("function-local import of fakepkg.cli" in p for p in problems), text
    cycles = [p for p in problems if p.startswith("import cycle")]
    assert len(cycles) == 1 and "rooms importing each other: cli, model, train" in cycles[0], text
    # json is not the package's business; cli → train is allowed and reported nowhere.
    assert not any("json" in p or "cli may not" in p for p in problems), text


def test_checker_passes_a_clean_package_and_narrow_entries(tmp_path):
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "parallel/__init__.py": "from .rules import X\n",
        "parallel/rules.py": "X = 1\n",
        "parallel/mesh.py": "from .rules import X\n",
        "model/__init__.py": "",
        "model/core.py": "from ..parallel.rules import X\nfrom fakepkg.parallel import rules\n",
        "model/bad.py": "from ..parallel.mesh import X\n",
    })
    problems = check(pkg, "fakepkg", {"model": {"parallel.rules"}, "parallel": set(), "__init__": set()})
    assert len(problems) == 1 and "model may not import parallel.mesh" in problems[0], problems
