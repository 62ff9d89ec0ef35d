"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""

from __future__ import annotations

__all__ = ["UserError", "require_module"]


class UserError(Exception):
    """Bad input: the message names the problem and the fix, in one line."""


def require_module(name: str, extra: str):
    """Import an optional heavy dependency, or raise a UserError with the install hint."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UserError(
            f"{name} is not installed ({exc}); install it with: pip install 'ptqonnx[{extra}]'"
        ) from None
