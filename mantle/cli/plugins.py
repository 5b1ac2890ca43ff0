"""``mantle plugins list|install|remove`` (SPEC 6.3, 5.4): files in the plugin directory."""

from __future__ import annotations

import os
from pathlib import Path

from mantle.cli.context import Context
from mantle.cli.output import print_json, wants_json
from mantle.connectors.plugins import PLUGIN_NAME
from mantle.errors import CannotRead, InvalidInput, MantleError

__all__ = ["plugins", "PluginNotFound", "RESERVED"]

# Connector names the engine handles itself; a plugin with one of them would never run.
RESERVED = ("http", "core")


class PluginNotFound(MantleError):
    def __init__(self, name: str):
        super().__init__(f'plugin "{name}" not found')


def plugins(args, context: Context) -> int:
    directory = Path(context.config.plugins_dir)
    return {"list": _list, "install": _install, "remove": _remove}[args.plugins_command](
        args, directory)


def _installed(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted((entry for entry in directory.iterdir()
                   if entry.is_file() and not entry.name.startswith(".")),
                  key=lambda entry: entry.name)


def _list(args, directory: Path) -> int:
    found = _installed(directory)
    if wants_json(args):
        print_json({"plugins": [{"name": entry.name, "path": os.path.abspath(entry)}
                                for entry in found]})
        return 0
    if not found:
        print("(no plugins installed)")
        return 0
    for entry in found:
        print("%-20s %s" % (entry.name, os.path.abspath(entry)))
    return 0


def _install(args, directory: Path) -> int:
    source = Path(args.path)
    if source.is_dir():
        raise CannotRead(args.path, "is a directory")
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise CannotRead(args.path, exc.strerror or str(exc)) from exc
    if source.name in RESERVED:
        raise InvalidInput(f'plugin name "{source.name}" is reserved')
    if not PLUGIN_NAME.fullmatch(source.name):  # no action could ever run it
        raise InvalidInput(f'invalid plugin name "{source.name}": must match '
                           f"^{PLUGIN_NAME.pattern}$")
    target = directory / source.name
    staging = directory / f".{source.name}.installing"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        staging.write_bytes(data)
        staging.chmod(0o755)
        os.replace(staging, target)  # a run looking the plugin up never sees half a file
    except OSError as exc:
        staging.unlink(missing_ok=True)
        raise MantleError(f'cannot install plugin into "{directory}": '
                          f"{exc.strerror or exc}") from exc
    print(f"Installed plugin from {args.path}")
    return 0


def _remove(args, directory: Path) -> int:
    name = args.name
    target = directory / name
    if not name or "/" in name or name.startswith(".") or not target.is_file():
        raise PluginNotFound(name)
    target.unlink()
    print(f"Removed plugin {name}")
    return 0
