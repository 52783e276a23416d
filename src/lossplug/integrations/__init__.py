"""Adapters that route other libraries' models through lossplug's fused ops.

Each submodule imports its library only when used: ``lossplug.integrations.transformers`` needs
``pip install transformers``.
"""
