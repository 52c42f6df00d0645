"""The repository's top-level `kernels/` folder (shipped as `overlap.kernels`) never shadows the
PyPI package named `kernels` (the Hugging Face kernel hub, a dependency of transformers >= 5.25),
whatever the working directory: `python -m pytest`, `python -m overlap` and `python -c` all put
the working directory first on `sys.path`."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _python(code: str, cwd: pathlib.Path, *, extra_path: pathlib.Path | None = None, flags: tuple[str, ...] = ()):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    return subprocess.run(
        [sys.executable, *flags, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_top_level_kernels_from_the_root_is_the_next_package_on_the_path(tmp_path):
    """A stand-in hub package later on sys.path wins over the repository folder found first."""
    hub = tmp_path / "kernels"
    hub.mkdir()
    (hub / "__init__.py").write_text("MARK = 'hub'\n")
    (hub / "sub.py").write_text("VALUE = 7\n")
    proc = _python(
        "import kernels, kernels.sub; print(kernels.MARK, kernels.sub.VALUE, kernels.__file__)",
        ROOT,
        extra_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    mark, value, where = proc.stdout.split()
    assert (mark, value) == ("hub", "7")
    assert pathlib.Path(where).resolve() == (hub / "__init__.py").resolve()


def test_top_level_kernels_without_a_hub_package_is_not_found():
    """With nothing else named `kernels` on the path, importing it fails as if the folder were absent
    (transformers probes for the hub this way), and `overlap.kernels` is untouched."""
    code = (
        "import sys; sys.path.insert(0, '.')\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
        "else:\n    print('found', kernels.__file__)\n"
    )
    proc = _python(code, ROOT, flags=("-S",))  # -S: no site-packages, so no installed hub either
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["missing", "kernels"]


def test_overlap_kernels_still_imports_from_the_root():
    proc = _python("from overlap import kernels; print(kernels.__name__, callable(kernels.gather_rows))", ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["overlap.kernels", "True"]


def _hub_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _hub_installed(), reason="the PyPI `kernels` package is not installed (transformers < 5.25)")
@pytest.mark.parametrize("cwd", ["root", "elsewhere"])
def test_installed_hub_package_and_transformers_hub_kernels_import(cwd, tmp_path):
    """The real case CI meets: transformers' hub-kernels module imports names from the hub package."""
    code = (
        "import kernels, transformers.integrations.hub_kernels as h\n"
        "import pathlib; print(pathlib.Path(kernels.__file__).resolve())"
    )
    proc = _python(code, ROOT if cwd == "root" else tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = pathlib.Path(proc.stdout.strip())
    assert ROOT / "kernels" not in where.parents, where
