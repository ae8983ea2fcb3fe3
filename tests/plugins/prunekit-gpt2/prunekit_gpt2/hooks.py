"""The module named by the ``prunekit`` entry point: prunekit registers it with pluggy under the
entry-point name (``gpt2``), so ``PRUNEKIT_DISABLE_PLUGINS=gpt2`` switches it off."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import prunekit
from prunekit_gpt2.adapter import GPT2Adapter


@prunekit.hookimpl
def register_adapters(register: Callable[[Any], None]) -> None:
    register(GPT2Adapter())
