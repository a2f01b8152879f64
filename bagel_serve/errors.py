"""`CliError`: a problem the user of the `bagel` command can fix that the engine does not see."""


class CliError(Exception):
    """A missing input file, an existing output, a refused address: printed as one `error:` line."""
