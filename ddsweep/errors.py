"""The one exception type a user can cause: the CLI prints its message on one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix (bad option, unknown dataset, missing file); never a bug."""
