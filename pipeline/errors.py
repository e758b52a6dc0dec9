"""The one exception type that means "the user's input is wrong".

The CLI prints its message and exits 2 with no traceback; anything else is a bug (exit 1).
Messages name the file, the row/line and the field, so the user can fix the input.
"""


class UserError(Exception):
    pass
