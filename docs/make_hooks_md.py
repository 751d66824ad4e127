"""Render docs/hooks.md from the hook contract in batchkit/hookspecs.py (the single source).

    python docs/make_hooks_md.py        # rewrite docs/hooks.md
A test checks that docs/hooks.md is what this script produces.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from batchkit import hookspecs
from batchkit.host import CHAIN_HOOKS
from batchkit.host import STAGE_OF_HOOK

SECTIONS = [
    ("Lifecycle", ["batchkit_setup", "batchkit_epoch_start", "batchkit_epoch_end", "batchkit_before_optimizer_step", "batchkit_step_end", "batchkit_teardown"]),
    ("Stage 1: sampler", ["batchkit_wrap_batch_sampler"]),
    ("Stage 2: collator", ["batchkit_wrap_collate"]),
    ("Stage 3: batch", ["batchkit_transform_batch"]),
    ("Stage 4: loss", ["batchkit_transform_loss"]),
    ("Stage 5: optimizer", ["batchkit_wrap_optimizer"]),
    ("State", ["batchkit_state_dict", "batchkit_load_state_dict"]),
]


def _rst_to_md(text: str) -> str:
    text = re.sub(r":(?:class|func|meth|data|mod):`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``([^`]+)``", r"`\1`", text)
    text = re.sub(r"^:param (\w+):", r"- **`\1`**:", text, flags=re.M)
    text = re.sub(r"^:return:", r"- **returns**:", text, flags=re.M)
    return text


def render() -> str:
    out = [
        "# Hook reference",
        "",
        "Generated from `batchkit/hookspecs.py` by `python docs/make_hooks_md.py`; edit the docstrings there.",
        "",
        _rst_to_md(inspect.cleandoc(hookspecs.__doc__ or "")),
        "",
        "| hook | stage | kind |",
        "|---|---|---|",
    ]
    for _, names in SECTIONS:
        for name in names:
            kind = "chain" if name in CHAIN_HOOKS else ("per plugin" if "state_dict" in name else "notification")
            out.append(f"| `{name}` | {STAGE_OF_HOOK.get(name, 'lifecycle' if kind == 'notification' else 'state')} | {kind} |")
    for title, names in SECTIONS:
        out += ["", f"## {title}"]
        for name in names:
            fn = getattr(hookspecs, name)
            sig = str(inspect.signature(fn)).replace("'", "")
            out += ["", f"### `{name}{sig}`", "", _rst_to_md(inspect.cleandoc(fn.__doc__ or ""))]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("hooks.md").write_text(render())
