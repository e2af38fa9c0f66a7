"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class MergelabError(Exception):
    """A mistake in the user's input (file, recipe, parameter); never a bug in mergelab."""
