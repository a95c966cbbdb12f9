"""The one error every strategy check raises (a leaf: the technique modules and strategies/config.py import it)."""


class StrategyError(ValueError):
    """An invalid strategy or an invalid combination; raised before any training starts. Its message is one line
    naming the bad value and the valid ones."""
