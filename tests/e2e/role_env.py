"""Run Carrara as one role would be installed: ``python role_env.py ROLE -- carrara args...``
or ``python role_env.py ROLE -c CODE``.

Every importable package that the ``platform`` extra brings in but the role's own extra
(``pip install carrara[ROLE]``) does not is made unimportable (a ``sys.meta_path`` finder
raising ``ModuleNotFoundError``, as if it were not installed), computed from the installed
distributions' metadata: the role's requirements and their requirements, transitively, with
markers and extras evaluated. So a role that needs a package its extra lacks fails here the
way it would in its image. At exit the blocked names that were asked for are printed on stderr
(``blocked: ...``): optional imports that a library tries and does without."""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.metadata as md
import re
import sys
from collections.abc import Sequence
from types import ModuleType

from packaging.requirements import Requirement


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(extras: Sequence[str]) -> set[str]:
    """Normalised names of the distributions ``carrara[extras]`` installs (carrara included)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    dists: set[str] = set()
    todo = [("carrara", frozenset(extras))]
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dists.add(name)
        try:
            requirements = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requirements:
            req = Requirement(text)
            envs = [{"extra": e} for e in (*wanted, "")]
            if req.marker is not None and not any(req.marker.evaluate(env) for env in envs):
                continue
            todo.append((_norm(req.name), frozenset(req.extras)))
    return dists


def modules_of(dists: set[str]) -> set[str]:
    """Top-level import names provided by ``dists``."""
    names = set()
    for module, owners in md.packages_distributions().items():
        if any(_norm(d) in dists for d in owners):
            names.add(module)
    return names


class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked: set[str]) -> None:
        self.blocked = blocked
        self.asked: set[str] = set()

    def find_spec(self, name: str, path: object = None, target: ModuleType | None = None) -> None:
        top = name.partition(".")[0]
        if top in self.blocked:
            self.asked.add(top)
            raise ModuleNotFoundError(f"No module named {name!r} (not in this role)", name=name)
        return None


def install(role: str) -> Blocker:
    allowed = modules_of(closure([role]))
    everything = modules_of(closure(["platform"]))
    blocker = Blocker(everything - allowed - set(sys.stdlib_module_names) - {"carrara"})
    sys.meta_path.insert(0, blocker)
    atexit.register(lambda: print(f"blocked: {sorted(blocker.asked)}", file=sys.stderr))
    return blocker


def main() -> int:
    role, mode, *rest = sys.argv[1:]
    install(role)
    if mode == "-c":
        exec(compile(rest[0], "<role code>", "exec"), {"__name__": "__main__"})
        return 0
    from carrara.cli import main as carrara

    return carrara(rest)


if __name__ == "__main__":
    sys.exit(main())
