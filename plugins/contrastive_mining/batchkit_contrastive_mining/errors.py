"""The one error type of the mining pipeline."""

from __future__ import annotations

PLUGIN = "b3"


class MiningError(ValueError):
    """Bad input to B3 mining. The message names the plugin, the option and the fix."""

    def __init__(self, option: str, problem: str, fix: str) -> None:
        self.option = option
        super().__init__(f"{PLUGIN}: option `{option}`: {problem}. Fix: {fix}.")
