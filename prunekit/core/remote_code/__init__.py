"""Python files that prunekit copies into output directories for
``trust_remote_code=True`` loaders. They import only ``transformers`` and ``torch`` (never
prunekit) and are not imported by prunekit itself; :mod:`prunekit.core.serving` copies them."""
