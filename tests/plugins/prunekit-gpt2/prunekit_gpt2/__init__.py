"""prunekit-gpt2: an example third-party prunekit plugin adding a GPT-2 adapter.

prunekit finds it through the ``prunekit`` entry-point group (see ``pyproject.toml``); nothing
in prunekit itself mentions GPT-2.
"""

from prunekit_gpt2.adapter import GPT2Adapter

__version__ = "0.1.0"

__all__ = ["GPT2Adapter"]
