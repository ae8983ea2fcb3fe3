"""Built-in importance scorers, registered through ``register_scorers`` like any plugin.

Layers: ``block_influence``, ``angular_distance``, ``perplexity_drop``, ``heal_residual``.
Heads: ``taylor``, ``magnitude``, ``output_norm``.
Neurons: ``activation_frequency``, ``wanda``, ``neuron_magnitude``, ``neuron_taylor``.
Sub-blocks: ``attention_influence`` (unit ``attention``), ``mlp_influence`` (unit ``mlps``).
See :mod:`prunekit.scorers.base` for the protocol a third-party scorer implements.
"""

from __future__ import annotations

from prunekit.hookspecs import hookimpl


@hookimpl
def register_scorers(register) -> None:
    from prunekit.scorers import heads, heal, layers, neurons, subblocks

    for scorer in (
        *layers.SCORERS,
        *heal.SCORERS,
        *heads.SCORERS,
        *neurons.SCORERS,
        *subblocks.SCORERS,
    ):
        register(scorer)
