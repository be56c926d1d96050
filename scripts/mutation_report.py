"""Summarise one mutmut group for scripts/mutation.sh: the score, and the survivors by function, each
classed by what its mutation touches (read from the mutated module mutmut wrote):

* ``text``: only a string literal changed (an error message, a note, a log line's words);
* ``log``: a line of a ``logger.*`` call;
* ``code``: anything else, listed with the changed line.

Usage: python scripts/mutation_report.py GROUP_DIR MODULE SECONDS GLOB... (GROUP_DIR holds results.txt and mutants/).
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path


def _functions(path: Path) -> dict[str, str]:
    """Source of every top-level function and method of the mutated module, by mutmut's name."""
    text = path.read_text()
    lines = text.splitlines()
    out: dict[str, str] = {}
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "__mutmut_" in node.name:
            out[node.name] = "\n".join(lines[node.lineno - 1:node.end_lineno])
    return out


_STRING = re.compile(r"""[rRbBuUfF]{0,2}("([^"\\]|\\.)*"|'([^'\\]|\\.)*')""")


# a line of a message: an exception, a note or a warning being built, or the continuation of one
_MESSAGE = re.compile(r"(_fail|Error|raise|notes\.append|warn|message|reason|hits\.append)\b|^S(\s*[,)]|\s*$)")


def _without_strings(line: str) -> str:
    """The line with every string literal replaced by one placeholder."""
    return _STRING.sub("S", line).strip()


def classify(mutant: str, original: str) -> tuple[str, str]:
    a = original.splitlines()[1:]
    b = mutant.splitlines()[1:]
    removed = [l[1:] for l in difflib.unified_diff(a, b, lineterm="", n=0) if l.startswith("-") and not l.startswith("---")]
    added = [l[1:] for l in difflib.unified_diff(a, b, lineterm="", n=0) if l.startswith("+") and not l.startswith("+++")]
    change = f"{' / '.join(s.strip() for s in removed)} -> {' / '.join(s.strip() for s in added)}"
    if any("logger." in l or "log." in l for l in removed + added):
        return "log", change
    if removed and len(removed) == len(added) and all(
        _without_strings(x) == _without_strings(y) for x, y in zip(removed, added)
    ) and all(_MESSAGE.search(_without_strings(x)) for x in removed):
        return "text", change
    return "code", change


def statuses(group_dir: str, *globs: str) -> dict[str, str]:
    """mutmut's verdict of every mutant of the group's functions, by mutant name."""
    status: dict[str, str] = {}
    for line in (Path(group_dir) / "results.txt").read_text().splitlines():
        m = re.match(r"\s*([\w.ǁ]+__mutmut_\d+): (.+)$", line)
        if m and any(fnmatch.fnmatch(m.group(1), g) for g in globs):
            status[m.group(1)] = m.group(2).strip()
    return status


def survivors(group_dir: str, module: str, status: dict[str, str]) -> dict[str, list[tuple[int, str, str, bool]]]:
    """Per function (``Class.method`` or ``function``): (mutant number, kind, change, no test) of each survivor."""
    sources = _functions(Path(group_dir) / "mutants" / module)
    out: dict[str, list[tuple[int, str, str, bool]]] = defaultdict(list)
    for name, s in sorted(status.items(), key=lambda kv: (kv[0].rsplit("_", 1)[0], int(kv[0].rsplit("_", 1)[1]))):
        if s not in ("survived", "no tests"):
            continue
        short = name.rsplit(".", 1)[-1]
        base = short.rsplit("__mutmut_", 1)[0]
        kind, change = classify(sources.get(short, ""), sources.get(base + "__mutmut_orig", ""))
        fn = re.sub(r"^xǁ(\w+)ǁ", r"\1.", base).removeprefix("x_")
        out[fn].append((int(short.rsplit("_", 1)[-1]), kind, change, s == "no tests"))
    return out


def main(group_dir: str, module: str, seconds: str, *globs: str) -> None:
    root = Path(group_dir)
    status = statuses(group_dir, *globs)
    count = Counter(status.values())
    tested = sum(v for k, v in count.items() if k not in ("skipped", "not checked"))
    killed = count["killed"] + count["timeout"]
    classes: Counter[str] = Counter()
    by_function: dict[str, list[str]] = defaultdict(list)
    for fn, rows in survivors(group_dir, module, status).items():
        for number, kind, change, no_test in rows:
            classes[kind] += 1
            by_function[fn].append(f"      {number:>4} {kind:4} {'(no test) ' if no_test else ''}{change[:150]}")
    for fn, rows in sorted(by_function.items()):
        print(f"   {fn}: {len(rows)} survived", file=sys.stderr)
        print("\n".join(rows), file=sys.stderr)
    score = 100.0 * killed / tested if tested else 0.0
    group = root.name
    if not tested:  # mutmut stopped before testing any mutant (its clean or stats run failed)
        print(f"{group}: no mutant tested: mutmut failed, see {root / 'run.log'} ({seconds} s)")
        return
    print(f"{group}: {killed}/{tested} killed ({score:.1f} %); survivors {count['survived'] + count['no tests']}: "
          f"{classes['code']} code, {classes['text']} message text, {classes['log']} log lines; "
          f"{count['timeout']} timeouts; {seconds} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
