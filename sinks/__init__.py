"""Where records go. A connector kind is one module; register it here by `kind`."""
from importlib import import_module

KINDS = {
    "http": "sinks.http:HttpConnector",
    "file": "sinks.file:FileConnector",
    "smtp": "sinks.smtp:SmtpConnector",
    "mailbox": "sinks.mailbox:MailboxConnector",
}


def connector_class(kind: str):
    """The class registered for `kind` (its config model is ``cls.Config``); KeyError if unknown."""
    module, _, name = KINDS[kind].partition(":")
    return getattr(import_module(module), name)
