"""Real English text available offline: docstrings of Python's standard library.

Two disjoint parts, so calibration never sees the evaluation text: ``"evaluation"`` (the docstrings of one set of
modules) and ``"calibration"`` (another set, minus any docstring that also occurs in the evaluation part).
Docstrings shorter than 200 characters are skipped and duplicates removed; the order is stable.
"""

from __future__ import annotations

import functools
import importlib
import inspect

__all__ = ["documents"]

_MODULES = {
    "evaluation": ("argparse", "collections", "csv", "email", "functools", "http.client", "json", "logging",
                   "pathlib", "random", "re", "subprocess", "textwrap", "threading", "unittest", "urllib.request",
                   "zipfile"),
    "calibration": ("asyncio", "typing", "decimal", "statistics", "datetime", "tarfile", "sqlite3", "pickle",
                    "inspect", "dataclasses", "enum", "shutil", "tempfile", "difflib", "configparser",
                    "multiprocessing", "contextlib", "doctest", "pydoc", "smtplib", "imaplib", "mailbox", "ssl",
                    "uuid", "ipaddress", "queue", "weakref", "traceback"),
}  # fmt: skip


def _docstrings(modules: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for name in modules:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc and len(doc) >= 200:
                seen.setdefault(doc, None)
    return list(seen)


@functools.cache
def documents(part: str) -> tuple[str, ...]:
    """The docstrings of one part: ``"evaluation"`` or ``"calibration"``."""
    if part not in _MODULES:
        raise ValueError(f"unknown corpus part {part!r}; use 'evaluation' or 'calibration'")
    docs = _docstrings(_MODULES[part])
    if part == "calibration":
        held_out = set(_docstrings(_MODULES["evaluation"]))
        docs = [d for d in docs if d not in held_out]
    return tuple(docs)
