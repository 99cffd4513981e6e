"""cp-tinyvit's models and the one inference path that training, compression and benchmarks reuse.

    zoo.load("auto")           the champion in this CPU's fastest precision (or any zoo name or path)
    zoo.create_model(config)   a model built from its config (zoo.models.factory: the one place models are built)
"""

from zoo.index import load
from zoo.models.factory import create_model

__all__ = ["create_model", "load"]
