"""mta: a mail transport security relay. Mail is never in the clear, on the wire or on disk."""

__version__ = "0.1.0"
__all__ = ["__version__"]
