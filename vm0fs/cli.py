"""Command-line entry point: argument parsing and user-facing messages only."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from vm0fs import __version__

if TYPE_CHECKING:
    from vm0fs.mountpoint import MountConfig

DEFAULT_API_URL = "https://api.vm0.ai"

MOUNT_EXAMPLES = """examples:
  export VM0_API_KEY=vm0_live_...
  vm0fs mount ~/vm0                      # returns once the mount answers
  vm0fs mount ~/vm0 --foreground --debug # stay in the foreground, log to stderr
  vm0fs mount ~/vm0 --cache-size 20G --metadata-ttl 30
  ls ~/vm0/artifacts/<name>/current/
"""


def parse_size(text: str) -> int:
    """'10G', '512M', '1.5T', '4096' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*", text, re.IGNORECASE)
    if not match and text.strip().startswith("-"):
        raise argparse.ArgumentTypeError(f"{text!r}: a size cannot be negative; try 10G or 512M")
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 10G, 512M)")
    number, unit = match.groups()
    power = "kmgtp".index(unit.lower()) + 1 if unit else 0
    return int(float(number) * 1024**power)


def positive_size(text: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} leaves no room at all (try 10G, 512M)")
    return size


def seconds(text: str) -> float:
    """A number of seconds: 0 or more, and finite."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds: give 0 or more, "
                                         "such as 30 or 0.5")
    return value


# Options whose value may be written with a leading "-" by mistake: argparse would take "-5G"
# for an option and say "expected one argument" instead of what is wrong with it.
VALUE_OPTIONS = frozenset({"--cache-size", "--max-version-size", "--max-size",
                           "--metadata-ttl", "--cache-grace"})


def join_dashed_values(argv: list[str]) -> list[str]:
    """["--cache-size", "-5G"] -> ["--cache-size=-5G"], which argparse hands to the type."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if (argv[i] in VALUE_OPTIONS and i + 1 < len(argv)
                and re.match(r"-[\d.]", argv[i + 1])):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def check_api_url(url: str) -> str | None:
    """Why `url` cannot be an API base URL, or None (the standard library only: `vm0fs mount`
    starts fast)."""
    from urllib.parse import urlsplit

    try:
        parsed = urlsplit(url)
        parsed.port  # noqa: B018 - raises for a port that is not one
    except ValueError as exc:
        return f"the API URL {url!r} is not a URL ({exc})"
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return f"the API URL {url!r} is not an http:// or https:// URL"
    return None


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vm0fs"


class Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"vm0fs: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="vm0fs", description="vm0 artifacts as a read-only filesystem.")
    parser.add_argument("--version", action="version", version=f"vm0fs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    mount = commands.add_parser(
        "mount", help="mount the artifacts at MOUNTPOINT", epilog=MOUNT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mount vm0 artifacts read-only. The API key comes from VM0_API_KEY.")
    mount.add_argument("mountpoint", type=Path, help="an existing, empty directory")
    mount.add_argument("-f", "--foreground", action="store_true",
                       help="serve in the foreground until unmounted or interrupted")
    mount.add_argument("--api-url", default=None,
                       help=f"API base URL (default: $VM0_API_URL or {DEFAULT_API_URL})")
    mount.add_argument("--cache-dir", type=Path, default=None,
                       help="cache folder (default: $XDG_CACHE_HOME/vm0fs or ~/.cache/vm0fs)")
    mount.add_argument("--metadata-ttl", type=seconds, default=60.0, metavar="SECONDS",
                       help="how long listings are cached (default: 60)")
    mount.add_argument("--cache-size", type=positive_size, default=None, metavar="SIZE",
                       help="cap the cache, e.g. 10G (default: keep 5%% of its filesystem "
                            "free)")
    mount.add_argument("--cache-grace", type=seconds, default=None, metavar="SECONDS",
                       help="a version read in the last SECONDS is not evicted by the cap "
                            "(default: 300)")
    mount.add_argument("--max-version-size", type=positive_size, default=None, metavar="SIZE",
                       help="refuse versions that expand past SIZE (default: what the API "
                            "says a version holds, plus room for tar headers; never past the "
                            "cache cap or the room left on the disk)")
    mount.add_argument("--allow-other", action="store_true",
                       help="let other users see the files (needs user_allow_other in "
                            "/etc/fuse.conf unless root)")
    mount.add_argument("-o", dest="options", action="append", default=[], metavar="OPTION",
                       help="extra FUSE mount option (repeatable)")
    mount.add_argument("--xattrs", action="store_true",
                       help="answer extended attributes (user.vm0.*) on artifact and version "
                            "folders; off by default because `ls -l` then costs two more "
                            "kernel round trips a file")
    mount.add_argument("--debug", action="store_true", help="log every step")
    mount.add_argument("--log-file", type=Path, default=None,
                       help="log here (default: stderr in the foreground, "
                            "CACHE_DIR/vm0fs.log in the background)")
    mount.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    mount.add_argument("--key-fd", type=int, default=None, help=argparse.SUPPRESS)

    umount = commands.add_parser(
        "unmount", aliases=["umount"], help="unmount a vm0fs mount",
        epilog="examples:\n  vm0fs unmount ~/vm0\n  vm0fs unmount --lazy ~/vm0   # busy: "
               "detach now, finish when the last user leaves",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    umount.add_argument("mountpoint", type=Path)
    umount.add_argument("-z", "--lazy", action="store_true",
                        help="detach now even if busy; cleaned up when no longer used")

    status = commands.add_parser(
        "status", help="what a mount is doing", epilog="example:\n  vm0fs status ~/vm0",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("mountpoint", type=Path, nargs="?", default=None,
                        help="a vm0fs mount, or a path in one (default: the one the current "
                             "folder is in, else your only one)")
    status.add_argument("--json", action="store_true", help="print JSON")

    info = commands.add_parser(
        "info", help="the artifact and version a path in a mount belongs to",
        epilog="examples:\n  vm0fs info ~/vm0/artifacts/training-run/current/logs/epoch-3.log"
               "\n  vm0fs info --json ~/vm0/artifacts/training-run",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("path", type=Path)
    info.add_argument("--json", action="store_true", help="print JSON")

    prefetch = commands.add_parser(
        "prefetch", help="download versions into the cache ahead of time",
        epilog="examples:\n  vm0fs prefetch training-run            # its current version"
               "\n  vm0fs prefetch training-run/3f2a9c1d   # a version by id prefix"
               "\n  vm0fs prefetch ~/vm0/artifacts/eval-results/current   # through a mount",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    prefetch.add_argument("targets", nargs="+", metavar="NAME[/VERSION]|PATH")
    prefetch.add_argument("--api-url", default=None,
                          help="fetch NAMEs from this API (default: $VM0_API_URL, else through "
                               "your running vm0fs mount, else " + DEFAULT_API_URL + ")")
    prefetch.add_argument("--cache-dir", type=Path, default=None,
                          help="cache folder for NAMEs fetched from the API (default: the "
                               "mount's, else $XDG_CACHE_HOME/vm0fs or ~/.cache/vm0fs)")

    cache = commands.add_parser(
        "cache", help="look after the cache: info, clear, prune",
        epilog="examples:\n  vm0fs cache info\n  vm0fs cache prune --max-size 5G\n"
               "  vm0fs cache clear --cache-dir /data/vm0fs-cache",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cache_commands = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    for name, help_text, example in (
            ("info", "size on disk, versions and location", "vm0fs cache info --json"),
            ("clear", "remove every cached version", "vm0fs cache clear"),
            ("prune", "evict least recently used versions down to a size",
             "vm0fs cache prune --max-size 5G")):
        action = cache_commands.add_parser(
            name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
            epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        action.add_argument("--cache-dir", type=Path, default=None,
                            help="the cache folder (default: $XDG_CACHE_HOME/vm0fs or "
                                 "~/.cache/vm0fs)")
        if name == "info":
            action.add_argument("--json", action="store_true")
        if name == "clear":
            action.add_argument("--force", action="store_true",
                                help="even while a mount uses the cache (its open versions stay)")
        if name == "prune":
            action.add_argument("--max-size", type=parse_size, required=True, metavar="SIZE",
                                help="what the cache may hold on disk afterwards, e.g. 5G")

    commands.add_parser("dev-server", help="run a local Artifacts API server (see --help)",
                        add_help=False)
    return parser


def fail(message: str) -> int:
    print(f"vm0fs: {message}", file=sys.stderr)
    return 1


def cmd_mount(args: argparse.Namespace, argv: list[str]) -> int:
    # Only the process that serves the mount loads pyfuse3, trio and httpx (launch.py): the
    # one that starts it returns sooner without them.
    from vm0fs import launch
    from vm0fs.mountpoint import MountConfig, MountError, check_mountpoint

    handshake = launch.Handshake(args.ready_fd)  # set: a background `vm0fs mount` waits
    if handshake.waiting:  # its log file has every line from the start
        launch.setup_logging(args.debug, args.log_file)

    def report(error: str | None) -> int:
        """How the start went, to the waiting parent if there is one, else to the user."""
        if handshake.tell(error) or error is None:
            return 0 if error is None else 1
        return fail(error)

    key = launch.read_key(args.key_fd) if args.key_fd is not None else os.environ.get(
        "VM0_API_KEY")
    if not key:
        return report("no API key: set VM0_API_KEY")
    api_url = (args.api_url or os.environ.get("VM0_API_URL") or DEFAULT_API_URL).rstrip("/")
    problem = check_api_url(api_url)
    if problem:
        return report(problem)
    if args.foreground and args.key_fd is None:
        launch.reexec_without_key(key, argv)  # does not return
    config = MountConfig(
        mountpoint=args.mountpoint.expanduser().absolute(),
        api_url=api_url,
        api_key=key,
        cache_dir=(args.cache_dir or default_cache_dir()).expanduser().absolute(),
        metadata_ttl=args.metadata_ttl,
        cache_size=args.cache_size,
        max_version_size=args.max_version_size,
        allow_other=args.allow_other,
        fuse_options=args.options,
        xattrs=args.xattrs,
    )
    if args.cache_grace is not None:
        config.cache_grace = args.cache_grace
    if not args.foreground:
        try:
            check_mountpoint(config.mountpoint)
        except MountError as exc:
            return fail(str(exc))
        log_file = (args.log_file or config.cache_dir / "vm0fs.log").expanduser().absolute()
        error = launch.start_in_background(config, log_file, background_flags(args, config))
        return 0 if error is None else fail(error)
    if not handshake.waiting:
        launch.setup_logging(args.debug, args.log_file)
    return report(launch.serve_in_foreground(config, handshake))


def background_flags(args: argparse.Namespace, config: MountConfig) -> list[str]:
    """The options of `vm0fs mount` again, for the process that serves it."""
    flags = ["--metadata-ttl", str(args.metadata_ttl), "--cache-dir", str(config.cache_dir)]
    if args.api_url:
        flags += ["--api-url", args.api_url]
    for flag, value in (("--cache-size", args.cache_size),
                        ("--cache-grace", args.cache_grace),
                        ("--max-version-size", args.max_version_size)):
        if value is not None:
            flags += [flag, str(value)]
    flags += ["--allow-other"] if args.allow_other else []
    flags += ["--xattrs"] if args.xattrs else []
    flags += ["--debug"] if args.debug else []
    for option in args.options:
        flags += ["-o", option]
    return flags


def cmd_unmount(args: argparse.Namespace) -> int:
    from vm0fs.mountpoint import MountError, unmount

    try:
        unmount(args.mountpoint.expanduser().absolute(), lazy=args.lazy)
    except MountError as exc:
        return fail(str(exc))
    return 0


def cmd_tools(args: argparse.Namespace) -> int:
    from vm0fs import commands

    if args.command == "status":
        return commands.run(commands.status, args.mountpoint, args.json)
    if args.command == "info":
        return commands.run(commands.info, args.path, args.json)
    cache_dir = (args.cache_dir or default_cache_dir()).expanduser().absolute()
    if args.command == "prefetch":
        api_url = (args.api_url or os.environ.get("VM0_API_URL") or "").rstrip("/") or None
        problem = api_url and check_api_url(api_url)
        if problem:
            return fail(problem)
        return commands.run(commands.prefetch, args.targets, api_url,
                            os.environ.get("VM0_API_KEY"), cache_dir, args.cache_dir is not None)
    if args.cache_command == "info":
        return commands.run(commands.cache_info, cache_dir, args.json)
    if args.cache_command == "clear":
        return commands.run(commands.cache_clear, cache_dir, args.force)
    return commands.run(commands.cache_prune, cache_dir, args.max_size)


def main(argv: list[str] | None = None) -> int:
    """Every failure a user can cause ends in one line on stderr and a non-zero status;
    VM0FS_DEBUG=1 shows the traceback of anything unexpected."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # here, where a reader that went away can be told from a failure
        return status
    except BrokenPipeError:  # `vm0fs ... | head -1`: the reader has all it wanted
        _drop_stdout()
        return 0
    except KeyboardInterrupt:
        print("vm0fs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("VM0FS_DEBUG"):
            raise
        from vm0fs.errors import Vm0fsError

        if isinstance(exc, Vm0fsError):
            return fail(str(exc))
        if isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else ""
            return fail(f"{where}{exc.strerror or exc}")
        return fail(f"unexpected {type(exc).__name__}: {exc} (VM0FS_DEBUG=1 shows where)")


def _drop_stdout() -> None:
    """Output to a closed pipe is over: send the rest (and the flush at exit) nowhere."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "dev-server":
        from vm0fs import devserver

        return devserver.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(join_dashed_values(argv))
    if args.command == "mount":
        return cmd_mount(args, argv)
    if args.command in ("unmount", "umount"):
        return cmd_unmount(args)
    if args.command in ("status", "info", "prefetch", "cache"):
        return cmd_tools(args)
    parser.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
