"""The documentation's commands run as written today. Every command line in README.md, docs/*.md and BENCHMARKS.md
(fenced shell blocks, and inline code that starts with a command word) names files that exist, and its options are
accepted by that script's own argument parser: a dry run that stops each parser right after it has read the
arguments, so nothing is trained, evaluated or downloaded. The imports of the Python snippets resolve. One
subprocess parses every command (seconds)."""
import argparse
import ast
import glob
import io
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "BENCHMARKS.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
PYTHONS = ("python", "python3", ".venv/bin/python")
COMMAND_WORDS = PYTHONS + ("torchrun", "bash", "pip", "grep")
LEFT_ALONE = ("echo",)  # machine set-up lines (they write files): never run here, nothing to check
LAUNCHERS = ("srun",)  # start the command that follows them (their own options written --name=value)
TORCHRUN_FLAGS = ("--standalone", "--no-python", "--run-path")  # torchrun options that take no value
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*|\$.*")  # an option value the reader chooses: --seed S, --out DIR, $VAR


# ---------------------------------------------------------------------------------------------- reading the docs

def fenced_blocks(text):
    """(language, first line number, lines) of every ``` block."""
    blocks, lang, start, lines = [], None, 0, None
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if lines is None:
                lang, start, lines = line.strip()[3:].strip().lower(), n + 1, []
            else:
                blocks.append((lang, start, lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return blocks


def joined(lines, start):
    """Lines with their backslash continuations joined: (line number, line)."""
    out, pending, first = [], "", start
    for n, line in enumerate(lines, start):
        if not pending:
            first = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append((first, pending + line))
            pending = ""
    return out


def words(line):
    """The command's words, without its comment, a leading VAR=value, a launcher (srun), and everything from a
    '...' placeholder on. A line that only sets a shell variable has none."""
    if re.match(r"\s*[A-Za-z_][A-Za-z0-9_]*=\$\(", line):
        return []
    tokens = shlex.split(line, comments=True)
    while tokens and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", tokens[0]):
        tokens.pop(0)
    while tokens and tokens[0] in LAUNCHERS:
        tokens.pop(0)
        while tokens and tokens[0].startswith("-"):
            tokens.pop(0)
    return tokens[:tokens.index("...")] if "..." in tokens else tokens


def documented_commands(doc):
    """(where, words, inline) for every command in one markdown file. Inline code counts when it starts with a
    command word and names a file; `python script.py` alone names the script, and is checked as its --help."""
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    found = []
    for lang, start, lines in fenced_blocks(text):
        if lang == "python":
            continue
        for n, line in joined(lines, start):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            w = words(line)
            # a shell block holds only commands; a plain block may hold a file tree or output among them
            if w and (lang in ("bash", "sh", "shell", "console") or w[0] in COMMAND_WORDS):
                found.append((f"{doc}:{n}", w, False))
    prose = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    for n, line in enumerate(prose.splitlines(), 1):
        for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", line):
            w = words(span)
            if len(w) > 1 and w[0] in COMMAND_WORDS and any(re.search(r"\.(py|sh|txt)$", t) for t in w):
                found.append((f"{doc}:{n}", w + ["--help"] if len(w) == 2 and w[0] in PYTHONS else w, True))
    return found


def python_snippets(doc):
    """(where, module, name) for every `from module import name` of the ```python blocks."""
    text = open(os.path.join(ROOT, doc), encoding="utf-8").read()
    found = []
    for lang, start, lines in fenced_blocks(text):
        if lang == "python":
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, ast.ImportFrom):
                    found += [(f"{doc}:{start + node.lineno - 1}", node.module, a.name) for a in node.names]
    return found


# ---------------------------------------------------------------------------------------------- checking a command

def plan(w):
    """-> ('problem', message) | ('parse', script, args) | ('run', words) | ('ok',)"""
    prog, rest = w[0], w[1:]
    exists = lambda path: os.path.exists(os.path.join(ROOT, path))
    if prog in LEFT_ALONE:
        return ("ok",)
    if prog == "torchrun":
        while rest and rest[0].startswith("-"):
            rest = rest[1:] if "=" in rest[0] or rest[0] in TORCHRUN_FLAGS else rest[2:]
        prog = "python"
    if prog in PYTHONS and rest[:2] == ["-m", "pytest"]:
        missing = [p for p in rest[2:] if not p.startswith("-") and not exists(p.split("::")[0])]
        if "-k" in rest:
            missing = [p for p in missing if p != rest[rest.index("-k") + 1]]
        return ("problem", f"names missing test paths {missing}") if missing else ("ok",)
    if prog in PYTHONS and rest[:2] == ["-m", "pip"] or prog == "pip":
        rest = rest[2:] if prog in PYTHONS else rest
        missing = [rest[i + 1] for i, a in enumerate(rest[:-1]) if a == "-r" and not exists(rest[i + 1])]
        return ("problem", f"names missing files {missing}") if missing else ("ok",)
    if prog in PYTHONS:
        if not rest or rest[0].startswith("-"):
            return ("problem", f"runs python {' '.join(rest[:2])}, which this test does not know how to check")
        if not exists(rest[0]):
            return ("problem", f"names {rest[0]}, which does not exist")
        return ("parse", rest[0], rest[1:])
    if prog == "bash":
        if not rest or not exists(rest[0]):
            return ("problem", f"names {rest[:1]}, which does not exist")
        return ("run", ["bash", "-n", rest[0]])  # syntax only
    if prog == "grep":
        return ("run", w)
    return ("problem", f"starts with {prog!r}, which this test does not know how to check")


class _Parsed(Exception):
    """Raised by the stopped parser once it has accepted the arguments."""


def dry_run_worker():
    """Runs in a subprocess: reads [[script, args], ...] on stdin, runs each script as __main__ with its
    parser stopped after parsing, prints one outcome per script ('ok' or what went wrong) as JSON."""
    original = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        for i in range(1, len(args)):  # a placeholder value of a typed option (--seed S) stands for a valid one
            action = self._option_string_actions.get(args[i - 1])
            if action and action.type not in (None, str) and PLACEHOLDER.fullmatch(args[i]):
                args[i] = "1" if action.default is None else str(action.default)
        namespace, extras = original(self, args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed()
    argparse.ArgumentParser.parse_known_args = parse_then_stop
    outcomes = []
    for script, args in json.load(sys.stdin):
        saved_argv, saved_path = sys.argv, sys.path[:]
        sys.argv, sys.path[:0] = [script, *args], [os.path.dirname(os.path.abspath(script))]
        err = io.StringIO()
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                runpy.run_path(script, run_name="__main__")
            outcomes.append("the script has no command line: it returned without reading its arguments")
        except _Parsed:
            outcomes.append("ok")
        except SystemExit as e:
            last = (err.getvalue().strip().splitlines() or [""])[-1]
            outcomes.append("ok" if e.code in (0, None) else f"exit {e.code}: {last}")
        except Exception as e:  # noqa: BLE001 - any failure is reported with the command that caused it
            outcomes.append(f"{type(e).__name__}: {e}")
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
    print(json.dumps(outcomes))


def check(commands, tmp_path):
    """[(where, words)] -> [problem lines]. Parses every script command in one subprocess."""
    problems, parses = [], []
    for where, w in commands:
        p = plan(w)
        if p[0] == "problem":
            problems.append(f"{where}: `{shlex.join(w)}` {p[1]}")
        elif p[0] == "parse":
            parses.append((where, w, p[1], p[2]))
        elif p[0] == "run":
            files = [f for a in p[1][1:] for f in (sorted(glob.glob(a, root_dir=ROOT)) if "*" in a else [a])]
            r = subprocess.run([p[1][0], *files], cwd=ROOT, capture_output=True, text=True, timeout=60)
            if r.returncode != 0:
                problems.append(f"{where}: `{shlex.join(w)}` failed: {(r.stderr or r.stdout).strip()[-300:]}")
    if parses:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "ETRIS_CLIP_CACHE": str(tmp_path), "PYTHONPATH": ROOT}
        code = f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); import test_docs; " \
               f"test_docs.dry_run_worker()"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           input=json.dumps([[s, a] for _, _, s, a in parses]), timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outcomes = json.loads(r.stdout.strip().splitlines()[-1])
        problems += [f"{where}: `{shlex.join(w)}`: {o}" for (where, w, _, _), o in zip(parses, outcomes) if o != "ok"]
    return problems


# ---------------------------------------------------------------------------------------------- the tests

def test_every_documented_command_runs_as_written(tmp_path):
    commands = [(where, w) for doc in DOCS for where, w, _ in documented_commands(doc)]
    scripts = {w[1] for _, w in commands if w[0] in PYTHONS and len(w) > 1}
    # the extraction finds the commands a reader meets first
    assert {"train.py", "evaluate.py", "predict.py", "demo.py", "model.py", "prepare.py"} <= scripts
    if os.path.exists(os.path.join(ROOT, "explain.py")):
        commands.append(("explain.py", ["python", "explain.py", "--help"]))
    # and the check catches what went stale before: a script without that command line, a file that moved, an
    # option that is gone, a shell script that does not exist
    stale = [("stale", shlex.split(c)) for c in (
        "python dataset.py bench --data refcoco", "python benchmark.py --backbone tiny-ViT",
        "python tools/benchmark.py --data-dir /tmp/x", "bash tools/missing.sh",
        "torchrun --nproc_per_node 2 train.py --no-such-option", "python train.py --data refcocox")]
    problems = check(commands + stale, tmp_path)
    caught = [p for p in problems if p.startswith("stale:")]
    assert len(caught) == len(stale), "\n".join(caught)
    assert [p for p in problems if not p.startswith("stale:")] == [], "\n".join(problems)


def test_python_snippets_import_what_exists():
    import importlib
    snippets = [s for doc in DOCS for s in python_snippets(doc)]
    assert snippets  # docs/training.md's Python API
    missing = [f"{where}: from {module} import {name}" for where, module, name in snippets
               if not hasattr(importlib.import_module(module), name)]
    assert missing == []


def test_readme_names_every_top_level_file():
    """A reader opening the repository finds each top-level file named in the README (`name`, or a link)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    files = [f for f in sorted(os.listdir(ROOT)) if os.path.isfile(os.path.join(ROOT, f)) and not f.startswith(".")
             and f not in ("README.md",) and not f.endswith(".pyc")]
    assert "model.py" in files and "train.py" in files
    assert [f for f in files if f"`{f}`" not in readme and f"]({f})" not in readme] == []
