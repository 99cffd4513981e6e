"""cp-tinyvit's models and the one inference path that training, compression and benchmarks reuse."""

from zoo.index import load

__all__ = ["load"]
