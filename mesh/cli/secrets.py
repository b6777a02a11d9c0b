"""Reading secrets for the command line: environment variable or terminal prompt.

Never from a command-line argument (it would land in shell history and in
``ps``). Without a terminal and without the variable, we fail with a message
that names the variable instead of hanging on a prompt nobody sees.
"""

from __future__ import annotations

import getpass
import os
import sys

from mesh.errors import MeshError

__all__ = ["DESK_PASSPHRASE_ENV", "PIN_ENV", "SecretUnavailable", "read_secret"]

DESK_PASSPHRASE_ENV = "SNRMESH_DESK_PASSPHRASE"
PIN_ENV = "SNRMESH_PIN"


class SecretUnavailable(MeshError):
    """No secret in the environment and no terminal to ask on."""


def read_secret(env: str, prompt: str, *, confirm: bool = False) -> str:
    value = os.environ.get(env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise SecretUnavailable(f"{prompt.rstrip(': ')}: set {env} or run in a terminal")
    value = _ask(prompt)
    if confirm and _ask("Again, to confirm: ") != value:
        raise SecretUnavailable("the two entries differ")
    if not value:
        raise SecretUnavailable("empty secret")
    return value


def _ask(prompt: str) -> str:
    """``getpass``, with ctrl-D (end of input) an error and ctrl-C ending the prompt's line."""
    try:
        return getpass.getpass(prompt)
    except EOFError:
        print(file=sys.stderr)
        raise SecretUnavailable(f"{prompt.rstrip(': ')}: none given (end of input)") from None
    except KeyboardInterrupt:
        print(file=sys.stderr)  # so "snrmesh: interrupted" starts a line of its own
        raise
