"""The `geosmtp` command.

    geosmtp [-c config.yaml] [-l ADDR] [-p PORT] [-d DIR] [--check-config]
    geosmtp passwd            print a password hash for the config's users
    geosmtp ctl ...           talk to a running server's management API
    geosmtp queue ...         list, show, flush, delete, hold, release queued mail
    geosmtp dkim keygen D S   a DKIM signing key for domain D, selector S, and its DNS record

Exit status: 0 on a clean stop, 1 when the server cannot start (a port in
use), 2 on a usage or configuration error, with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:  # the CLI imports the server's modules only when it runs them
    from .config import Config
    from .server.worker import MasterLink, WorkerContext

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="geosmtp",
        description="geosmtp: an SMTP server that delivers to Maildirs.",
        epilog="Other commands: 'geosmtp passwd' prints a password hash for users.<name>.password; "
        "'geosmtp dkim keygen DOMAIN SELECTOR' makes a DKIM signing key.",
    )
    p.add_argument("-v", "--version", action="version", version=f"geosmtp {__version__}")
    p.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="YAML configuration (default: ./config.yaml if it exists, else built-in defaults)",
    )
    p.add_argument(
        "-l",
        "--listen",
        metavar="ADDR",
        help="listen on ADDR only (replaces the configured SMTP listeners)",
    )
    p.add_argument(
        "-p",
        "--port",
        metavar="PORT",
        type=int,
        help="SMTP port (with -l: of that listener; alone: of every listener)",
    )
    p.add_argument("-d", "--mail-dir", metavar="DIR", help="mail directory (overrides mail_dir)")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    return p


def config_path(args: argparse.Namespace) -> str | None:
    """-c FILE, else ./config.yaml when there is one, else None (the defaults)."""
    if args.config:
        return str(args.config)
    return "config.yaml" if Path("config.yaml").exists() else None


def load_config(args: argparse.Namespace) -> Config:
    """The config file plus command-line overrides; raises ConfigError."""
    from . import config as cfg

    path = config_path(args)
    return apply_overrides(cfg.load(path) if path else cfg.from_mapping({}), args)


def apply_overrides(config: Config, args: argparse.Namespace) -> Config:
    """-l, -p and -d laid over a loaded config (again at each reload)."""
    from . import config as cfg

    changes: dict[str, Any] = {}
    if args.port is not None and not 0 <= args.port <= 65535:
        raise cfg.ConfigError(f"-p: expected a port from 0 to 65535, got {args.port}")
    if args.listen is not None:
        port = args.port if args.port is not None else config.listeners[0].port
        changes["listeners"] = [cfg.Listener(args.listen, port)]
    elif args.port is not None:
        changes["listeners"] = [dataclasses.replace(li, port=args.port) for li in config.listeners]
    if args.mail_dir is not None:
        changes["mail_dir"] = Path(args.mail_dir).resolve()
    if changes:
        data = dataclasses.replace(config, **changes)
        cfg._check(data)
        config = data
    return config


def _one_line(text: str) -> str:
    """Fold a multi-line message (PyYAML's carry a source excerpt) into one line."""
    parts = [line.strip() for line in text.splitlines()]
    return " ".join(part for part in parts if any(c.isalnum() for c in part))


def passwd(argv: list[str]) -> int:
    """`geosmtp passwd`: read a password (twice on a terminal), print its hash."""
    import getpass

    p = argparse.ArgumentParser(
        prog="geosmtp passwd",
        description="Print an argon2id hash of a password, to paste into the config as "
        "users.<name>.password. Reads the password from the terminal, or one line of stdin.",
    )
    p.parse_args(argv)
    from .auth import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if password != getpass.getpass("Again: "):
            print("geosmtp passwd: the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("geosmtp passwd: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(hash_password(password))
    return EXIT_OK


def ctl(argv: list[str]) -> int:
    from .ctl import main as ctl_main

    return ctl_main(argv)


def queue(argv: list[str]) -> int:
    from .queuectl import main as queue_main

    return queue_main(argv)


def dkim(argv: list[str]) -> int:
    from .mailauth.keygen import main as dkim_main

    return dkim_main(argv)


SUBCOMMANDS = {"passwd": passwd, "ctl": ctl, "queue": queue, "dkim": dkim}


def main(argv: list[str] | None = None) -> int:
    from gevent import monkey

    monkey.patch_all()  # first: stdlib clients (smtplib, subprocess) must cooperate

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = _parser().parse_args(argv)
    from .config import ConfigError

    if not args.check_config:
        _run_dir()  # before anything imports prometheus_client
    from .app import prepare

    try:
        config = load_config(args)
        # Certificate and keys usable? Read before logging starts, so that a bad
        # one is a one-line error and nothing (logs, mail_dir) is created.
        prepared = prepare(config)
    except ConfigError as exc:
        print(f"geosmtp: {_one_line(str(exc))}", file=sys.stderr)
        _remove_run_dir()
        return EXIT_USAGE
    if args.check_config:
        print("configuration ok")
        return EXIT_OK
    return serve(config, config_path(args), args, prepared)


def _run_dir() -> None:
    """The server's private folder, made before the server's modules load:
    the workers' control sockets, and prometheus_client's multiprocess files
    (it reads `PROMETHEUS_MULTIPROC_DIR` once, when it is imported). The
    master gives it to the workers' account and removes it at the end."""
    import os
    import tempfile
    import time

    run_dir = tempfile.mkdtemp(prefix="geosmtp-")
    os.mkdir(f"{run_dir}/metrics", 0o700)
    os.environ["GEOSMTP_RUN_DIR"] = run_dir
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = f"{run_dir}/metrics"
    os.environ["GEOSMTP_STARTED"] = repr(time.time())  # uptime is the server's


def _remove_run_dir() -> None:
    import os
    import shutil

    if "GEOSMTP_RUN_DIR" in os.environ:
        shutil.rmtree(os.environ["GEOSMTP_RUN_DIR"], ignore_errors=True)


def serve(
    config: Config,
    path: str | None = None,
    args: argparse.Namespace | None = None,
    prepared: Any = None,
) -> int:
    """Run the server (the master process, which starts the workers)."""
    from . import config as cfg
    from .admin.server import admin_tokens
    from .app import plan_change, prepare
    from .server.host import Runtime
    from .server.master import serve as serve_master

    loader = None
    if path is not None:  # reload reads the file again, with the same -l/-p/-d

        def loader() -> Config:
            config = cfg.load(path)
            return apply_overrides(config, args) if args is not None else config

    try:
        runtime = Runtime(prepare, plan_change, start_worker, admin_tokens)
        return serve_master(config, loader, prepared, path, runtime=runtime)
    finally:
        _remove_run_dir()


def start_worker(ctx: WorkerContext, link: MasterLink) -> tuple[Any, Any]:
    """In a new worker process: the app on the worker's share (`ctx`, a
    `server.worker.WorkerContext`; `link` its channel to the master), started,
    and its admin API when one is configured: (app, admin or None)."""
    from .admin.server import start_admin
    from .app import App

    app = App(
        ctx.config,
        ctx.prepared,
        master=link,
        share=(ctx.index, ctx.count),
        shared=ctx.shared,
    )
    app.start(ctx.bound, clean=ctx.clean)
    admin = None
    if ctx.admin is not None:
        admin = start_admin(app, ctx.admin, ctx.token or "", ctx.read_token)
    return app, admin


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
