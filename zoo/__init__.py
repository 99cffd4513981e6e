"""cp-tinyvit's models and the one inference path that training, compression and benchmarks reuse.

    zoo.load("auto")           the champion in this CPU's fastest precision (or any zoo name or path)
    zoo.create_model(config)   a model built from its config (zoo.models.factory: the one place models are built)
"""

from zoo import interrupts

interrupts.guard_startup()  # first: Ctrl-C during a command's seconds of imports is one line and exit 130

__all__ = ["create_model", "load"]


def __getattr__(name: str):
    """`zoo.load` and `zoo.create_model`, imported when first used: importing the package stays light (a command's
    start-up guard above runs before torch is imported)."""
    if name == "load":
        from zoo.index import load

        return load
    if name == "create_model":
        from zoo.models.factory import create_model

        return create_model
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
