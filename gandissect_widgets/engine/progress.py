"""Progress of long engine work, for a terminal or for a view.

``progress`` arguments of the engine take ``False`` (silent), ``True`` (a ``tqdm.auto`` bar: a
widget in notebooks, a line in terminals) or a callable ``fn(done, total, desc)``, which a view
uses to draw its own progress line; the callable may raise ``Cancelled`` to stop the work, which
then keeps nothing partial.
"""
from __future__ import annotations

from tqdm.auto import tqdm

__all__ = ["Cancelled", "Steps"]


class Cancelled(Exception):
    """Work stopped on request (a view's cancel button); nothing partial was kept."""


class Steps:
    """Count ``total`` steps of work named ``desc`` into a bar or a callback (see the module doc)::

        with Steps(progress, total, "unit ACE") as steps:
            for ...: ...; steps.update()
    """

    def __init__(self, progress, total: int, desc: str):
        self.total, self.desc, self.done = int(total), desc, 0
        self._fn = progress if callable(progress) else None
        self._bar = None if self._fn else tqdm(total=self.total, desc=desc, disable=not progress)
        if self._fn:
            self._fn(0, self.total, desc)

    def update(self, n: int = 1):
        self.done += n
        if self._fn:
            self._fn(self.done, self.total, self.desc)
        else:
            self._bar.update(n)

    def close(self):
        if self._bar is not None:
            self._bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
