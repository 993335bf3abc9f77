"""Parameter counts and a per-layer table, for logs and for checking against the original's 403,409."""

from __future__ import annotations

from torch import nn


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summary_table(module: nn.Module, title: str = "") -> str:
    """One row per module that owns parameters (conv, linear, norm, embedding), then the total."""
    rows = [
        (name or "(root)", type(m).__name__, sum(p.numel() for p in m.parameters(recurse=False)))
        for name, m in module.named_modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    total = f"{count_parameters(module):,}"
    w_name = max([len("layer")] + [len(r[0]) for r in rows])
    w_type = max([len("type")] + [len(r[1]) for r in rows])
    w_num = max([len("params"), len(total)] + [len(f"{r[2]:,}") for r in rows])
    rule = "-" * (w_name + w_type + w_num + 4)
    header = f"{'layer':<{w_name}}  {'type':<{w_type}}  {'params':>{w_num}}"
    lines = [title or type(module).__name__, rule, header, rule]
    lines += [f"{name:<{w_name}}  {kind:<{w_type}}  {n:>{w_num},}" for name, kind, n in rows]
    lines += [rule, f"{'total':<{w_name}}  {'':<{w_type}}  {total:>{w_num}}"]
    return "\n".join(lines)
