"""Errors that a user can fix: the command line prints their message, without a traceback, and stops."""


class UserError(Exception):
    """A bad input, config or environment; the message names what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
    """An unknown key, a bad value or a missing input file in a run config."""
