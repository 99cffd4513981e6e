"""cp-tinyvit's models and the one inference path that training, compression and benchmarks reuse."""

from zoo import interrupts

interrupts.guard_startup()  # first: Ctrl-C during a command's seconds of imports is one line and exit 130

__all__ = ["load"]


def __getattr__(name: str):
    """`zoo.load`, imported when first used: importing the package stays light (a command's start-up guard above
    runs before torch is imported)."""
    if name == "load":
        from zoo.index import load

        return load
    raise AttributeError(f"module 'zoo' has no attribute {name!r}")
