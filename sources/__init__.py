"""Where records come from. A source kind is one module; register it here by `kind`."""
from importlib import import_module

KINDS = {
    "rest": "sources.rest:RestSource",
    "file": "sources.file:FileSource",
}


def source_class(kind: str):
    """The class registered for `kind` (its config model is ``cls.Config``); KeyError if unknown."""
    module, _, name = KINDS[kind].partition(":")
    return getattr(import_module(module), name)
