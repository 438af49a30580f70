"""The API reference: scripts/python-api-docs builds it with pdoc from the docstrings, and
every public name of hale, hale.sync and hale.admin, with each public method and property
of their classes, has a docstring there."""

from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from support import REPO

try:
    import pdoc.doc
except ImportError:  # pragma: no cover - the test extra installs it
    pytest.fail("pdoc is missing: pip install -e 'clients/python[test]'", pytrace=False)

SCRIPT = REPO / "scripts" / "python-api-docs"
MODULES = ["hale", "hale.sync", "hale.admin"]

# Public names allowed to go without a docstring: none. (Kept as a set so the checks below
# stay simple should one ever be needed, with a comment saying why.)
MISSING_ALLOWED: Set[str] = set()


def documented(module_name: str) -> Iterator[Tuple[str, str]]:
    """(name, docstring as the reference shows it) for each public name of the module and
    each public method and property of its classes, those a class takes from Python's own
    classes (Exception's, object's) aside."""
    module = importlib.import_module(module_name)
    doc = pdoc.doc.Module(module)
    for name in module.__all__:
        member = doc.get(name)
        value = getattr(module, name)
        if inspect.ismodule(value):
            yield f"{module_name}.{name}", inspect.getdoc(value) or ""
            continue
        assert member is not None, f"{module_name}.{name} is in __all__ but not in the reference"
        yield f"{module_name}.{name}", member.docstring
        if not isinstance(member, pdoc.doc.Class):
            continue
        for attribute, inner in member.members.items():
            if attribute.startswith("_") or not inner.taken_from[0].startswith("hale"):
                continue
            method = isinstance(inner, pdoc.doc.Function)
            if method or isinstance(inspect.getattr_static(member.obj, attribute, None), property):
                yield f"{module_name}.{name}.{attribute}", inner.docstring


def test_every_public_name_method_and_property_has_a_docstring() -> None:
    missing = sorted({name for module in MODULES for name, text in documented(module) if not text.strip()})
    unexpected = [name for name in missing if name not in MISSING_ALLOWED]
    assert not unexpected, "no docstring (the API reference shows nothing for them):\n" + "\n".join(unexpected)
    written = sorted(MISSING_ALLOWED - set(missing))
    assert not written, "documented now: take them out of MISSING_ALLOWED:\n" + "\n".join(written)


def test_the_api_reference_builds_with_pdoc(tmp_path: Path) -> None:
    out = tmp_path / "api"
    env: Dict[str, str] = dict(os.environ, PYTHON=sys.executable)
    built = subprocess.run([str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    assert f"API reference: {out}/index.html" in built.stdout
    pages = {page: (out / page).read_text() for page in ("hale.html", "hale/sync.html", "hale/admin.html")}
    # The members hale.Agent and hale.sync.Agent take from their private base are shown.
    for page in ("hale.html", "hale/sync.html"):
        for anchor in ("Agent.work_on", "Agent.welcome", "Agent.progress", "Agent.run_step", "Agent.long_call"):
            assert f'id="{anchor}"' in pages[page], (page, anchor)
    assert 'id="step"' in pages["hale.html"] and 'id="StepResult"' in pages["hale.html"]
    assert 'id="TaskInfo"' in pages["hale/admin.html"]
    # The docstrings' reStructuredText roles (:class:`Agent`…) became links, not text.
    for page, html in pages.items():
        docstrings = re.findall(r'<div class="docstring">(.*?)</div>', html, re.S)
        assert len(docstrings) > 40, page
        roles = [role for text in docstrings for role in re.findall(r":(?:class|meth|func|mod|attr|exc):`", text)]
        assert not roles, (page, roles)


def test_docstrings_name_only_what_exists() -> None:
    """A sanity check on the check: the allow-list names real members."""
    names: List[str] = [name for module in MODULES for name, _ in documented(module)]
    assert MISSING_ALLOWED <= set(names), sorted(MISSING_ALLOWED - set(names))
