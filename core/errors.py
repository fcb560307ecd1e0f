"""The one exception type users see. The CLI prints its message (problem + fix) and exits non-zero, no traceback."""


class MedcError(Exception):
    """A problem the user can fix. The message names the problem and the fix."""

    exit_code = 2


class FidelityError(MedcError):
    """A built component is further from the PyTorch reference than its precision allows."""

    exit_code = 3
