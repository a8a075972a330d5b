"""The documentation is tested like code.

- Every fenced ```python block of README.md and docs/*.md runs: a page's blocks
  run in order, in one fresh namespace, in a fresh Python process (its own
  torch.distributed state; a page's example may start processes with
  torch.multiprocessing spawn, guarded by ``if __name__ == "__main__":``).
  An exception fails the test and names the page, the block and its line.
  Blocks fenced as ```text, ```bash, ```cpp, ... are not run.
- Every relative link points to a file of this checkout.
- A table right after a line that links a ``benchmarks/results/*.md`` file and
  ends with ":" is a copy: its lines must appear, in order and verbatim, in
  that file (the docs never show a number the benchmark did not print).
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deepseek_ext

ROOT = Path(deepseek_ext.__file__).resolve().parent.parent
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
PAGE_IDS = [str(p.relative_to(ROOT)) for p in PAGES]
PAGE_TIMEOUT_S = 300

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)")


def code_blocks(text):
    """(language, first line number of the code, code) of every fenced block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2), i + 1
        j = start
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        if j == len(lines):
            raise AssertionError(f"unclosed ``` fence at line {i + 1}")
        blocks.append((lang, start + 1, textwrap.dedent("\n".join(lines[start:j]))))
        i = j + 1
    return blocks


# Runs the python blocks of one page (argv[1]) in this script's __main__
# namespace, so that functions defined there can be pickled by
# torch.multiprocessing's spawn (a spawned child re-runs this script as
# __mp_main__, which re-defines them and skips `if __name__ == "__main__":`).
RUNNER = r'''
import sys as _sys, traceback as _traceback
_sys.path.insert(0, _sys.argv[2])
from test_docs import code_blocks as _code_blocks
_page = _sys.argv[1]
_blocks = [(l, c) for lang, l, c in _code_blocks(open(_page, encoding="utf-8").read()) if lang == "python"]
for _n, (_line, _code) in enumerate(_blocks, 1):
    try:
        exec(compile(_code, f"{_page}, python block {_n} of {len(_blocks)} (line {_line})", "exec"), globals())
    except BaseException:
        if __name__ == "__main__":
            print(f"DOCS-FAILURE: {_page}: python block {_n} of {len(_blocks)} (starting at line {_line}) raised:",
                  file=_sys.stderr)
            _traceback.print_exc()
            _sys.exit(1)
        raise
'''


def _python_blocks(page):
    return [b for b in code_blocks(page.read_text(encoding="utf-8")) if b[0] == "python"]


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_python_blocks_run(page, tmp_path):
    if not _python_blocks(page):
        pytest.skip(f"{page.name} has no python block")
    runner = tmp_path / "docs_runner.py"
    runner.write_text(RUNNER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "2")
    run_dir = tmp_path / "cwd"
    run_dir.mkdir()
    try:
        proc = subprocess.run([sys.executable, str(runner), str(page), str(Path(__file__).parent)],
                              cwd=run_dir, env=env, capture_output=True, text=True, timeout=PAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{page.relative_to(ROOT)}: its python blocks ran longer than {PAGE_TIMEOUT_S} s")
    if proc.returncode != 0:
        pytest.fail(f"{page.relative_to(ROOT)}: a python block failed (exit {proc.returncode})\n"
                    f"{proc.stderr[-6000:]}", pytrace=False)


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    in_code = False
    broken = []
    for n, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_code = not in_code
        if in_code:
            continue
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"line {n}: {target}")
    assert not broken, f"{page.relative_to(ROOT)}: links to missing files:\n" + "\n".join(broken)


_REPO_PATH = re.compile(r"`((?:csrc|kernels|deepseek_ext|benchmarks|tests|tools|docs|cmake)/[\w./-]*)`")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_repository_paths_exist(page):
    """A path in backticks (`csrc/...`, `kernels/...`, ...) names a file or folder
    of this checkout; header paths may also be relative to csrc/include."""
    missing = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for path in _REPO_PATH.findall(line):
            if not any((base / path).exists() for base in (ROOT, ROOT / "csrc" / "include")):
                missing.append(f"line {n}: {path}")
    assert not missing, f"{page.relative_to(ROOT)}: paths that do not exist:\n" + "\n".join(missing)


_RESULTS_LINK = re.compile(r"\((?:\.\./)*(benchmarks/results/[\w.-]+\.md)\)")


def copied_tables(text):
    """(line number, results file, table lines) of each table introduced by a
    line that links a results file and ends with ':'."""
    lines, out = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        if i > 0 and lines[i - 1].startswith("|"):
            continue
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        links = _RESULTS_LINK.findall(lines[k]) if k >= 0 else []
        if not links or not lines[k].rstrip().endswith(":"):
            continue
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        out.append((i + 1, links[-1], lines[i:j]))
    return out


def _committed(path: str):
    """The file as of the last commit (None without git or when untracked)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "show", f"HEAD:{path}"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_benchmark_tables_are_verbatim_copies(page):
    """A copied table matches the results file, as it is or as committed: a
    local `make demo` or `make bench` rewrites results files, and the copy is
    refreshed when the new results are committed."""
    problems = []
    for line, results, table in copied_tables(page.read_text(encoding="utf-8")):
        path = ROOT / results
        if not path.exists():
            problems.append(f"line {line}: {results} does not exist")
            continue
        copy = "\n".join(table)
        if copy in path.read_text(encoding="utf-8"):
            continue
        committed = _committed(results)
        if committed is None or copy not in committed:
            problems.append(f"line {line}: the table is not a verbatim copy of {results}; copy it again")
    assert not problems, f"{page.relative_to(ROOT)}:\n" + "\n".join(problems)


def test_the_runner_reports_a_failing_block(tmp_path):
    page = tmp_path / "broken.md"
    page.write_text("# t\n\n```python\nx = 1\n```\n\ntext\n\n```python\nassert x == 2, 'x is 1'\n```\n")
    runner = tmp_path / "docs_runner.py"
    runner.write_text(RUNNER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(runner), str(page), str(Path(__file__).parent)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "python block 2 of 2 (starting at line 10)" in proc.stderr
    assert "x is 1" in proc.stderr


def test_copied_tables_are_found():
    text = "From [r](../benchmarks/results/x_cpu.md):\n\n| a |\n|---|\n| 1 |\n\nno table\n"
    assert copied_tables(text) == [(3, "benchmarks/results/x_cpu.md", ["| a |", "|---|", "| 1 |"])]


def test_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    linked = set(_LINK.findall(index))
    missing = [p.name for p in PAGES if p.parent.name == "docs" and p.name != "README.md" and p.name not in linked]
    assert not missing, f"docs/README.md does not link: {missing}"
