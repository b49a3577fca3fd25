"""The documentation's examples run as written, and the site builds.

For README.md and every docs/*.md, one test: the file's ```python blocks are joined in
order into one script, which runs in a fresh interpreter (a subprocess, CPU only, with a
timeout), so a block may use what an earlier block of the same file defined and nothing
else. regext's own warnings are errors there (an example must not warn). An output block
(a ```text block right after the line `<!-- output -->`, after a ```python block) must be
what the script printed:
its lines appear in the script's stdout in that order, each number equal up to one unit
of its last printed digit; a line starting with `...` stands for lines left out.

Examples that need several processes are ```bash blocks naming a script; the scripts
run here too (the FSDP2 example on two gloo ranks, whose shown output is checked the
same way), and every repository path a ```bash block names must exist.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
DOC_FILES = ["README.md"] + sorted(
    f"docs/{name}" for name in os.listdir(DOCS) if name.endswith(".md"))
TIMEOUT_S = 300
OUTPUT_MARKER = "<!-- output -->"
# An example must not warn: regext's warnings (they start with the API's name) are errors.
PRELUDE = ("import warnings\n"
           "warnings.filterwarnings('error', message=r'(Penalty|fused_penalty|add_penalty_grad_"
           "|prox_|sparsity|regext)')\n")


def fenced_blocks(text):
    """[(language, code, first line number, preceded by the output marker)]."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```") and line != line.lstrip() \
                and line.lstrip()[3:].startswith("python"):
            raise AssertionError(f"line {i + 1}: an indented ```python block is not run; "
                                 f"put it at the start of the line")
        if line.startswith("```"):
            lang = line[3:].strip().split(" ")[0]
            marked = i > 0 and lines[i - 1].strip() == OUTPUT_MARKER
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            assert j < len(lines), f"line {i + 1}: code block never closed"
            blocks.append((lang, "\n".join(lines[i + 1:j]), i + 2, marked))
            i = j
        i += 1
    return blocks


NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _last_digit_unit(number):
    mantissa, _, exponent = number.lower().partition("e")
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return 10.0 ** (-decimals + (int(exponent) if exponent else 0))


def line_matches(expected, actual):
    """Same text, and every number equal up to one unit of its last printed digit."""
    expected, actual = expected.rstrip(), actual.rstrip()
    if NUMBER.split(expected) != NUMBER.split(actual):
        return False
    for e, a in zip(NUMBER.findall(expected), NUMBER.findall(actual)):
        if e != a and abs(float(e) - float(a)) > 1.001 * _last_digit_unit(e):
            return False
    return True


def check_output(expected_block, stdout, where):
    """The block's lines appear in stdout in order (`...` skips)."""
    got = stdout.splitlines()
    at = 0
    for line in expected_block.splitlines():
        if not line.strip() or line.strip().startswith("..."):
            continue
        for k in range(at, len(got)):
            if line_matches(line, got[k]):
                at = k + 1
                break
        else:
            raise AssertionError(
                f"{where}: the documented output line\n    {line}\nis not in what the "
                f"examples printed (after line {at}):\n" + "\n".join(got[at:][:60]))


def run_python(code, cwd, timeout=TIMEOUT_S):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""  # the examples are CPU examples
    script = os.path.join(cwd, "examples_of_this_page.py")
    with open(script, "w") as f:
        f.write(code)
    return subprocess.run([sys.executable, script], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _blocks_of(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return fenced_blocks(f.read())


WITH_PYTHON = [doc for doc in DOC_FILES if any(b[0] == "python" for b in _blocks_of(doc))]


def test_the_pages_that_teach_the_api_have_examples():
    assert {"README.md", "docs/getting-started.md", "docs/penalty-api.md",
            "docs/training-loop.md", "docs/structured-sparsity.md", "docs/integrations.md",
            "docs/distributed.md"} <= set(WITH_PYTHON)


@pytest.mark.parametrize("doc", WITH_PYTHON)
def test_python_examples_run_as_written(doc, tmp_path):
    blocks = _blocks_of(doc)
    python = [(code, line) for lang, code, line, _ in blocks if lang == "python"]
    script = PRELUDE + "".join(f"\n# ---- {doc}, line {line}\n{code}\n" for code, line in python)
    proc = run_python(script, str(tmp_path))
    assert proc.returncode == 0, (f"{doc}: the examples failed\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-5000:]}")
    previous = None  # an output block shows what the code block before it printed
    for lang, code, line, marked in blocks:
        if marked and lang == "text" and previous == "python":
            check_output(code, proc.stdout, f"{doc}, output block at line {line}")
        previous = lang


REPO_PATH = re.compile(r"(?<![\w./-])((?:benchmarks|examples|tests|\.ci|docs|regext|csrc)/"
                       r"[\w./-]*\w)")


@pytest.mark.parametrize("doc", DOC_FILES)
def test_bash_blocks_name_files_that_exist(doc):
    for lang, code, line, _ in _blocks_of(doc):
        if lang != "bash":
            continue
        for path in REPO_PATH.findall(code):
            if any(part in path for part in ("results/cuda", "results/structured")):
                continue  # outputs a command writes, not inputs
            assert os.path.exists(os.path.join(ROOT, path)), (
                f"{doc}, block at line {line}: {path} does not exist")


def _documented_output_after(doc, needle):
    """The output block after the first ```bash block containing `needle`."""
    blocks = _blocks_of(doc)
    for k, (lang, code, _, _) in enumerate(blocks):
        if lang == "bash" and needle in code:
            following = blocks[k + 1]
            assert following[0] == "text" and following[3], \
                f"{doc}: no output block after the {needle} command"
            return following[1]
    raise AssertionError(f"{doc}: no ```bash block runs {needle}")


def test_fsdp2_example_prints_what_the_docs_show(tmp_path):
    """docs/distributed.md's torchrun command, on two gloo ranks (CPU)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("this torch has no torch.distributed")
    expected = _documented_output_after("docs/distributed.md", "examples/distributed_fsdp2.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         os.path.join(ROOT, "examples", "distributed_fsdp2.py")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    check_output(expected, proc.stdout, "docs/distributed.md, the FSDP2 example")


def test_quickstart_says_faster_or_slower_as_measured(tmp_path):
    """examples/quickstart.py (README's first script): the verdict follows the times."""
    proc = run_python(open(os.path.join(ROOT, "examples", "quickstart.py")).read(),
                      str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = re.search(r"loop ([\d.]+) ms, regext ([\d.]+) ms .* regext is ([\d.]+)x (faster|slower)",
                  proc.stdout)
    assert m, proc.stdout
    t_loop, t_fused, ratio, verdict = float(m[1]), float(m[2]), float(m[3]), m[4]
    assert verdict == ("faster" if t_fused <= t_loop else "slower")
    assert ratio >= 1.0
    assert "CPU kernels" in proc.stdout and "torch" in proc.stdout


def test_mkdocs_build_strict(tmp_path):
    """The documentation site builds with `mkdocs build --strict` (mkdocs.yml)."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[docs]' or '.[test]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                           "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert (tmp_path / "site" / "reference" / "index.html").exists()
    shutil.rmtree(tmp_path / "site", ignore_errors=True)
