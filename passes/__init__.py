"""Graph passes (one per module), built on `onnx_ir.passes`, and `run_passes` to run them."""

from __future__ import annotations

from onnx_ir.passes import PassError, PassManager, PreconditionError

from ptqonnx.errors import UserError

__all__ = ["run_passes"]


def run_passes(passes: list, model) -> None:
    """Run passes in a PassManager; a failed precondition (something the user can fix) becomes a UserError."""
    try:
        PassManager(passes)(model)
    except PassError as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, PreconditionError):
            cause = cause.__cause__
        if cause is None:
            raise
        raise UserError(str(cause).splitlines()[0]) from None
