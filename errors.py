"""
The exit policy: what a user's mistake is and how a command reports it.

Every mistake a user can make raises a subclass of UserError; run_command turns one into a single
`error:` line and exit status 2, never a traceback. Anything else is a bug and keeps its traceback.
ArgumentParser is argparse whose mistakes are ConfigErrors, so they take the same path.
This module imports neither torch nor the config parser, so any module can raise a UserError.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable


class UserError(ValueError):
    """A mistake in what the user gave (a flag, a file, a size); the message is one line naming the fix."""


class ConfigError(UserError):
    """Bad configuration: the message is one line naming the key and the fix."""


def run_command(body: Callable[[], int], cleanup: Callable[[], None] | None = None) -> int:
    """Run a command's body: a UserError or an OSError is one `error:` line on stderr and exit status 2,
    never a traceback; cleanup (e.g. leaving the process group) runs either way."""
    try:
        return body()
    except UserError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # commands without a training loop (that one saves, then returns 130 itself)
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no (a missing file, permissions, a full disk): not a bug to trace
        where = f": {e.filename}" if e.filename else ""
        print(f"error: {e.strerror or type(e).__name__}{where}", file=sys.stderr)
        return 2
    finally:
        if cleanup is not None:
            cleanup()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description and epilog as written (examples, key tables); an option's default after its meaning
    unless the meaning names it (or it has none: an unset flag, None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a ConfigError (one `error:` line under run_command, no usage dump).

    --help prints the description as written, examples included, and each option's default.
    """

    def __init__(self, prog: str | None = None, description: str | None = None, **kwargs: typing.Any) -> None:
        super().__init__(prog=prog, description=description and description.strip(),
                         formatter_class=HelpFormatter, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message)
