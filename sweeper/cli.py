"""The command line: argparse, one function per command returning an exit code.

The one place that maps exceptions to exit codes: 0 ok, 1 finished but some items failed,
2 usage or configuration error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from sweeper import __version__, report, torchzip
from sweeper.errors import AlreadyRunning, ConfigError, FileRefused, SweeperError
from sweeper.extract import Located, extract, open_regular, output_name
from sweeper.logs import configure_logging
from sweeper.torchzip import Mode

log = logging.getLogger("sweeper")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _open_dir(path: str) -> int:
    return os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _locate_source(path: str) -> Located:
    if path.endswith("/"):
        raise FileRefused(path, "not a regular file (a directory)")
    parent, name = os.path.split(path)
    try:
        return Located(_open_dir(parent), name, path)
    except OSError as error:
        raise FileRefused(path, f"cannot open its folder: {error.strerror}") from None


def _locate_target(source: str, out: str | None, mode: Mode) -> Located:
    if out is None:
        parent, name = os.path.split(source)
        target = os.path.join(parent, output_name(name, mode))
    elif os.path.isdir(out):
        target = os.path.join(out, output_name(os.path.basename(source), mode))
    else:
        target = out
    parent, name = os.path.split(target)
    try:
        return Located(_open_dir(parent), name, target)
    except OSError as error:
        raise FileRefused(target, f"cannot open the output folder: {error.strerror}") from None


def cmd_extract(args: argparse.Namespace) -> int:
    mode = Mode.WEIGHTS if args.weights_only else Mode.INFERENCE
    source = _locate_source(args.src)
    target = _locate_target(args.src, args.output, mode)
    try:
        same = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
        here = os.stat(source.name, dir_fd=source.dir_fd, follow_symlinks=False)
        if (same.st_dev, same.st_ino) == (here.st_dev, here.st_ino):
            raise FileRefused(args.src, "the output path is the source itself")
    except FileNotFoundError:
        pass
    try:
        result = extract(source, target, mode, delete_source=args.delete_original)
    finally:
        os.close(source.dir_fd)
        os.close(target.dir_fd)
    if args.json:
        print(report.to_json(report.extract_json(result)))
    else:
        print(report.extract_text(result))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    failed = 0
    for path in args.files:
        try:
            text, data = _inspect_one(path)
        except FileRefused as error:
            failed += 1
            log.error("%s", error)
            if args.json:
                print(report.to_json({"path": path, "kind": "invalid", "intact": False,
                                      "error": error.reason}))  # fmt: skip
            continue
        print(report.to_json(data) if args.json else text)
    return EXIT_FAILED if failed else EXIT_OK


def _inspect_one(path: str) -> tuple[str, dict[str, object]]:
    source = _locate_source(path)
    try:
        fd, _ = open_regular(source.name, source.dir_fd, path)
    finally:
        os.close(source.dir_fd)
    try:
        checkpoint = torchzip.open_checkpoint(fd, path)
    finally:
        os.close(fd)
    outputs: dict[Mode, int] = {}
    if checkpoint.kind is torchzip.Kind.FULL:
        outputs = {mode: torchzip.plan_output(checkpoint, mode).total_size for mode in Mode}
    return report.inspect_text(checkpoint, outputs), report.inspect_json(checkpoint, outputs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweeper",
        description="Keep disks from filling with PyTorch training checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"sweeper {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log detail")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("extract", help="write the inference copy of one full checkpoint")
    p.add_argument("src", metavar="SRC", help="full training checkpoint")
    p.add_argument("-o", "--output", metavar="OUT", help="output path (default: beside SRC)")
    p.add_argument("--weights-only", action="store_true",
                   help="write only the model state dict, to <stem>_weights.pt")  # fmt: skip
    p.add_argument("--delete-original", action="store_true",
                   help="delete SRC once the output is written, durable and verified")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", help="what a checkpoint holds, without reading its tensors")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except (ConfigError, AlreadyRunning) as error:
        log.error("%s", error)
        return EXIT_USAGE
    except FileRefused as error:
        log.error("%s", error)
        return EXIT_FAILED
    except SweeperError as error:
        log.error("%s", error)
        return EXIT_FAILED
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
