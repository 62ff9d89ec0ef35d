"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""

from __future__ import annotations

__all__ = ["Interrupted", "UserError", "require_module"]


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


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a long step; the step's temporary files are already removed.

    A KeyboardInterrupt (a BaseException), so that no `except Exception` on the way up turns it into another
    error; `exit_code` is the shell's convention for death by that signal (130 for SIGINT, 143 for SIGTERM).
    """

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}; temporary files were removed")
