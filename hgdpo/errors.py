"""The one exception type the jobs turn into a clean error message and a non-zero exit."""


class HgdpoError(Exception):
    """Bad input or an impossible request, with a message that names what to fix.

    Jobs print ``error: <message>`` and exit with status 2; nothing else is caught,
    so a bug still shows its traceback.
    """


class ConfigError(HgdpoError):
    """A configuration value that is unknown, of the wrong type, or impossible."""
