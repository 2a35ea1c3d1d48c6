"""lungsys commands for who may use the node: users (console sign-in, and DICOM user
identity) and API tokens (STOW-RS senders, Prometheus, scripts).

Users and tokens live in the job store the configuration names, so that every
node and worker on one job store knows the same people. A secret is read from
standard input (or asked for at a terminal), never from the command line
(where ``ps`` and shell histories would keep it); a token is printed once.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from lungsys.common import CLIError, out, when
from lungsys.node import ConfigOption, store_of

users_app = typer.Typer(help="Console users (in the job store), and the users file of DICOM "
                        "user identity ([node] users_file).", no_args_is_help=True)
tokens_app = typer.Typer(help="API tokens for machine clients: STOW-RS senders, Prometheus.",
                         no_args_is_help=True)
ROLES = "viewer, operator or admin"


def _secret(prompt: str) -> str:
    secret = (getpass.getpass(prompt) if sys.stdin.isatty()
              else sys.stdin.readline().rstrip("\r\n"))
    if not secret:
        raise CLIError("an empty secret is not accepted")
    return secret


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (or a label, with --file --token).")],
    role: Annotated[Optional[str], typer.Option(
        "--role", help=f"The console user's role: {ROLES}.")] = None,
    config_file: ConfigOption = None,
    users_file: Annotated[Optional[Path], typer.Option(
        "--file", help="Add to this DICOM user identity file instead ([node] users_file; "
        "created if missing).")] = None,
    token: Annotated[bool, typer.Option("--token", help="With --file: a bearer token (JWT/SAML "
                                        "user identity) instead of a user.")] = False,
    no_password: Annotated[bool, typer.Option("--no-password", help="With --file: a user "
                                              "known by name alone (type 1).")] = False,
) -> None:
    """Add a console user with a role (password from standard input, stored as an argon2id
    hash), or, with --file, a DICOM user identity (stored as a salted PBKDF2 hash)."""
    from store.accounts import AccountError, hash_password

    if users_file is not None:
        _add_to_file(users_file, name, token, no_password)
        return
    if token or no_password:
        raise CLIError("--token and --no-password go with --file (console users have "
                       "passwords; machines get `lungsys tokens create`)")
    if role not in ("viewer", "operator", "admin"):
        raise CLIError(f"--role: {ROLES}")
    try:
        hashed = hash_password(_secret("password: "))
        store_of(config_file).add_user(name, role, hashed)
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"user {name} added ({role})")


def _add_to_file(users_file: Path, name: str, token: bool, no_password: bool) -> None:
    from pacs_node.security import hash_secret

    if not name or any(c.isspace() for c in name):
        raise CLIError("the name must be one word")
    stored = "-" if no_password else hash_secret(_secret("secret: "))
    with open(users_file, "a", encoding="utf-8") as f:
        f.write(f"{'token' if token else 'user'} {name} {stored}\n")
    users_file.chmod(0o600)
    out.print(f"{'token' if token else 'user'} {name} added to {users_file}")


@users_app.command("list")
def users_list(config_file: ConfigOption = None) -> None:
    """The console users: name, role, when added, last sign-in."""
    table = Table("name", "role", "added (UTC)", "last sign-in", box=None)
    for user in store_of(config_file).users():
        table.add_row(user.name, user.role.value, when(user.created_at),
                      when(user.last_sign_in) or "-")
    out.print(table)


@users_app.command("remove")
def users_remove(name: Annotated[str, typer.Argument(help="User name.")],
                 config_file: ConfigOption = None) -> None:
    """Remove a console user (their sessions end at once)."""
    from store.accounts import AccountError

    try:
        store_of(config_file).remove_user(name)
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"user {name} removed")


@tokens_app.command("create")
def tokens_create(
    label: Annotated[str, typer.Argument(help="What the token is for (e.g. ct-scanner-2, "
                                         "prometheus).")],
    role: Annotated[str, typer.Option("--role", help="sender (STOW-RS only), worker (lungsys "
                                      "worker over WADO-RS), viewer (also /metrics), operator "
                                      "or admin.")] = "sender",
    config_file: ConfigOption = None,
) -> None:
    """Create a token and print it (once: only its digest is kept)."""
    from store.accounts import AccountError, Role

    if role not in {r.value for r in Role}:
        raise CLIError("--role: sender, worker, viewer, operator or admin")
    try:
        token = store_of(config_file).create_token(label, role)
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    print(token, flush=True)      # alone on standard output: TOKEN=$(lungsys tokens ...)
    print(f"token {label} ({role}) created: send it as 'Authorization: Bearer TOKEN'; "
          f"it is not shown again", file=sys.stderr)


@tokens_app.command("list")
def tokens_list(config_file: ConfigOption = None) -> None:
    """The tokens: label, role, created, last used (never the tokens themselves)."""
    table = Table("label", "role", "created (UTC)", "last used", box=None)
    for token in store_of(config_file).tokens():
        table.add_row(token.label, token.role.value, when(token.created_at),
                      when(token.last_used) or "-")
    out.print(table)


@tokens_app.command("revoke")
def tokens_revoke(label: Annotated[str, typer.Argument(help="The token's label.")],
                  config_file: ConfigOption = None) -> None:
    """Revoke a token: refused from the next request on."""
    from store.accounts import AccountError

    try:
        store_of(config_file).revoke_token(label)
    except AccountError as exc:
        raise CLIError(str(exc)) from None
    out.print(f"token {label} revoked")


GROUPS = [("users", users_app), ("tokens", tokens_app)]
