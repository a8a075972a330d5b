"""The package around the compiled library: one version number, the licence,
the public op wrappers, and imports that work without a compiled library."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import deepseek_ext
from deepseek_ext import _version, ops

from utils import ROOT, python_env

tomllib = pytest.importorskip("tomllib")


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_one_version_number():
    project = pyproject()
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "deepseek_ext._version.__version__"}
    assert deepseek_ext.__version__ == _version.__version__
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        cmake = f.read()
    # CMake reads the same file rather than writing a number of its own.
    assert re.search(r'file\(STRINGS "\$\{CMAKE_CURRENT_SOURCE_DIR\}/deepseek_ext/_version.py"', cmake)
    assert "project(deepseek_ext VERSION ${DEEPSEEK_EXT_VERSION}" in cmake


def test_license_file_matches_pyproject():
    project = pyproject()["project"]
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert text.startswith("BSD 3-Clause License") and "the deepseek_ext authors" in text


def test_every_op_has_a_public_wrapper():
    names = {n.split("::", 1)[1].split(".", 1)[0]
             for n in torch._C._dispatch_get_all_op_names() if n.startswith("deepseek_ext::")}
    assert names, "no deepseek_ext ops are registered"
    assert sorted(names - set(ops.__all__)) == [], "ops without a wrapper in deepseek_ext.ops.__all__"
    for name in ops.__all__:
        assert callable(getattr(ops, name)) and getattr(ops, name).__doc__, name


# Run in a fresh Python on a copy of the package without the compiled library.
# An editable install (`make build`) adds an import hook that finds submodules
# of deepseek_ext in the source tree: take it out so that the copy is all there is.
_WITHOUT_LIBRARY = r"""
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
import torch
import deepseek_ext, deepseek_ext.data, deepseek_ext.train, deepseek_ext.distributed
from deepseek_ext.data import ByteTokenizer
assert deepseek_ext.distributed.__all__
assert deepseek_ext.__file__.startswith(sys.argv[1]), deepseek_ext.__file__
assert "deepseek_ext._C" not in sys.modules
print("tokens", ByteTokenizer().encode("ab"))
try:
    deepseek_ext.ops.quantize_int8(torch.zeros(64))
except RuntimeError as e:
    print("error:", e)
"""


@pytest.mark.parametrize("keep_build_config", [False, True], ids=["not-built", "library-missing"])
def test_imports_without_the_compiled_library(tmp_path, keep_build_config):
    src = os.path.dirname(os.path.abspath(deepseek_ext.__file__))
    ignore = ["_C*.so", "__pycache__"] + ([] if keep_build_config else ["_build_config.py"])
    shutil.copytree(src, tmp_path / "deepseek_ext", ignore=shutil.ignore_patterns(*ignore))
    out = subprocess.run([sys.executable, "-c", _WITHOUT_LIBRARY, str(tmp_path)], cwd=tmp_path,
                         env=python_env(root=str(tmp_path)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "tokens" in out.stdout
    error = out.stdout.split("error: ", 1)[-1]
    assert "deepseek_ext's operators are not available" in error and "run `make build`" in error, out.stdout
    assert ("missing" if keep_build_config else "not built") in error


def test_library_built_for_another_torch_fails_at_import(tmp_path):
    src = os.path.dirname(os.path.abspath(deepseek_ext.__file__))
    shutil.copytree(src, tmp_path / "deepseek_ext", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    config = tmp_path / "deepseek_ext" / "_build_config.py"
    config.write_text(re.sub(r"TORCH_VERSION = .*", "TORCH_VERSION = '2.10.0'", config.read_text()))
    script = _WITHOUT_LIBRARY.split("import torch\n")[0] + "import deepseek_ext.data\n"
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=tmp_path,
                         env=python_env(root=str(tmp_path)), capture_output=True, text=True)
    assert out.returncode != 0 and "ImportError: deepseek_ext was built against torch 2.10.0" in out.stderr, out.stderr


def test_pyproject_torch_range_is_the_loaders():
    from deepseek_ext import _loader

    deps = [d.replace(" ", "") for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    (lo_major, lo_minor), (hi_major, hi_minor) = _loader.SUPPORTED_TORCH[0], _loader.SUPPORTED_TORCH[-1]
    assert deps == [f"torch>={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"]
    # torch is not a static build requirement: the backend adds the installed one.
    build_system = pyproject()["build-system"]
    assert not [r for r in build_system["requires"] if r.startswith("torch")]
    assert build_system["build-backend"] == "torch_matched_backend"


def _backend():
    sys.path.insert(0, os.path.join(ROOT, *pyproject()["build-system"]["backend-path"]))
    try:
        import torch_matched_backend
    finally:
        sys.path.pop(0)
    return torch_matched_backend


def test_isolated_build_pins_the_installed_torch():
    from deepseek_ext import _loader

    backend = _backend()
    assert backend.supported_torch() == _loader.SUPPORTED_TORCH
    assert backend.torch_requirement(("2.13.0", "/x/torch/__init__.py")) == "torch==2.13.0"
    assert backend.torch_requirement(("2.15.0+cu132", "/x")) == "torch==2.15.0+cu132"
    with pytest.raises(backend.TorchMismatch, match=r"has no torch\. Install torch 2\.11 to 2\.15 first.*"
                       r"pip install --no-build-isolation \."):
        backend.torch_requirement(None, python="/venv/bin/python")
    with pytest.raises(backend.TorchMismatch, match=r"builds against torch 2\.11 to 2\.15, but the torch installed "
                       r"where pip runs is 2\.10\.0 \(/x\)"):
        backend.torch_requirement(("2.10.0", "/x"))


def test_backend_finds_the_users_torch_through_pips_isolation(tmp_path):
    # pip's isolated build runs the backend with the user's Python and a
    # sitecustomize on PYTHONPATH that takes the user's site-packages off sys.path.
    site = tmp_path / "isolation"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n")
    isolated = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    hidden = subprocess.run([sys.executable, "-c", "import torch"], env=isolated, capture_output=True, text=True)
    assert hidden.returncode != 0, "the stand-in isolation did not hide torch"
    from importlib.metadata import version

    found = _backend().user_torch(env=isolated)
    assert found is not None and found[0] == version("torch")
    assert os.path.samefile(found[1], torch.__file__)
