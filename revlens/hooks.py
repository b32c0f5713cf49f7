"""Strict hook-name checking on top of TransformerLens's ``HookedRootModule``.

TransformerLens raises a bare ``KeyError`` for an unknown hook name in ``run_with_hooks`` and
silently caches nothing for an unknown name in ``run_with_cache(names_filter=[...])``. A typo in
an interpretability analysis should fail loudly, so models in revlens check names first.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from transformer_lens.HookedRootModule import HookedRootModule


def check_hook_names(available: Iterable[str], names: Iterable[str]) -> None:
    """Raise a ValueError naming each unknown hook and its closest valid names."""
    available = list(available)
    known = set(available)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown hook name {name!r}{hint}")


class StrictHookedRootModule(HookedRootModule):
    """``HookedRootModule`` whose hook and cache calls reject unknown hook names."""

    def _enable_hook_with_name(self, name: str, hook: Any, dir: Any) -> None:  # noqa: A002
        check_hook_names(self.hook_dict, [name])
        super()._enable_hook_with_name(name=name, hook=hook, dir=dir)

    def get_caching_hooks(self, names_filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        if isinstance(names_filter, str):
            check_hook_names(self.hook_dict, [names_filter])
        elif isinstance(names_filter, (list, tuple)):
            check_hook_names(self.hook_dict, names_filter)
        return super().get_caching_hooks(names_filter, *args, **kwargs)
