"""Render docs/hooks.md from the hook contract in batchkit/hookspecs.py (the single source).

    python docs/make_hooks_md.py        # rewrite docs/hooks.md
A test checks that docs/hooks.md is what this script produces.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from batchkit import hookspecs
from batchkit.host import HOOKS

SECTIONS = [
    ("Lifecycle", "lifecycle"),
    ("Stage 1: sampler", "sampler"),
    ("Stage 2: collator", "collator"),
    ("Stage 3: batch", "batch"),
    ("Stage 4: loss", "loss"),
    ("Stage 5: optimizer", "optimizer"),
    ("State", "state"),
]
KIND_TEXT = {
    "chain": "Transform chain: each implementation receives the previous one's result in `{carrier}`; `None` keeps it.",
    "notification": "Notification: every implementation is called, in chain order; return values are ignored.",
    "per_plugin": "Per plugin: the host calls each plugin's implementation on its own.",
}


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
    for _, stage in SECTIONS:
        for hook in HOOKS.values():
            if hook.stage == stage:
                carrier = f" (carries `{hook.carrier}`)" if hook.carrier else ""
                out.append(f"| `{hook.name}` | {stage} | {hook.kind.replace('_', ' ')}{carrier} |")
    for title, stage in SECTIONS:
        out += ["", f"## {title}"]
        for hook in HOOKS.values():
            if hook.stage != stage:
                continue
            fn = getattr(hookspecs, hook.name)
            sig = str(inspect.signature(fn)).replace("'", "")
            kind = KIND_TEXT[hook.kind].format(carrier=hook.carrier)
            out += ["", f"### `{hook.name}{sig}`", "", _rst_to_md(inspect.cleandoc(fn.__doc__ or "")), "", f"*{kind}*"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("hooks.md").write_text(render())
