"""Channel dependency groups: which output channels of Conv/Gemm/MatMul/GRU layers must be
pruned together, and why a group is refused.

Layers inside: ``layout.py`` (layouts and the space graph) <- ``trace.py`` (the walk's
state) <- ``moves.py`` and ``rules.py`` (how each op moves channels) <- ``groups.py`` (the
analysis, ``ctx.analysis(ChannelGroups, graph)``). May import: onnxpress.core.
Read first: ``groups.py``.
"""
