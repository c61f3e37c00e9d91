"""The names under which the plugin logs per-parameter-group values (``lr``, ``momentum``, ``wd``), in one place.

One group of one optimizer logs the bare key (``lr``); several groups log ``lr/pg0``, ``lr/pg1``, ...; several
optimizers prefix the optimizer: ``lr/opt1_pg0``. TensorBoard groups the tags by the key before the slash.
"""

from __future__ import annotations

import re

_TAG = re.compile(r"^(?P<key>[^/]+)(?:/(?:opt(?P<opt>\d+)_)?pg(?P<group>\d+))?$")


def group_metric_name(key: str, group: int = 0, n_groups: int = 1, optimizer_idx: int = 0,
                      n_optimizers: int = 1) -> str:
    """The logged name of ``key`` for parameter group ``group`` (of ``n_groups``) of optimizer ``optimizer_idx``."""
    if n_optimizers > 1:
        return f"{key}/opt{optimizer_idx}_pg{group}"
    return key if n_groups == 1 else f"{key}/pg{group}"


def parse_group_metric_name(tag: str) -> tuple[str, int, int] | None:
    """``(key, optimizer index, group index)`` of a name built by :func:`group_metric_name`, else ``None``."""
    match = _TAG.match(tag)
    if match is None:
        return None
    return match["key"], int(match["opt"] or 0), int(match["group"] or 0)
