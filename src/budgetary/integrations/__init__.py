"""Framework adapters, one module per framework; import them by path.

Each imports its framework lazily and says which extra to install when it is missing.
"""

__all__: list[str] = []
