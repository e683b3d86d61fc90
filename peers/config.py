"""Config files and grouped `--help` for the swarm programs, on top of click.

A program declares its flags with the group they belong to (`network`, `training`, ...). `ConfigCommand` adds
`--config FILE.toml` and `--print-config`: the file's keys are the flags' own names (`inner-steps = 30`), flat or
under a table named after the flag's group (`[training]`). The file's values become click's `default_map`, so they go
through the same conversion and validation as command-line values, and flags given on the command line win.
`--print-config` writes the effective flags as TOML that `--config` loads back to the same configuration.
"""

from __future__ import annotations

import difflib
import sys

import click
from click.core import ParameterSource

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TITLES = {
    "configuration": "Configuration",
    "network": "Network",
    "training": "Training",
    "data": "Data",
    "observability": "Observability",
    "checkpoints": "Checkpoints",
    "other": "Other",
}
"""Help sections in the order `--help` prints them."""
SECTIONS = ("network", "training", "data", "observability", "checkpoints")
"""Groups that are TOML tables in a config file; flags of other groups are top-level keys."""
_FILE = "swarm.config_file"  # ctx.meta key: the file the default_map came from, for error messages


class GroupedOption(click.Option):
    """A click option that knows its help section and says when a bad value came from the config file."""

    def __init__(self, *args, group: str = "other", **kwargs):
        if group not in TITLES:
            raise ValueError(f"unknown flag group {group!r}")
        super().__init__(*args, **kwargs)
        self.group = group

    @property
    def key(self) -> str:
        """The flag's name in a config file: its long name without the dashes (`--no-x` pairs use `x`)."""
        long = [o for o in self.opts if o.startswith("--")]
        return (long[0] if long else self.opts[0]).lstrip("-")

    def process_value(self, ctx: click.Context, value):
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as e:
            if ctx.get_parameter_source(self.name) is ParameterSource.DEFAULT_MAP and _FILE in ctx.meta:
                e.message = f"{e.message} (from {ctx.meta[_FILE]})"
            raise


def grouped(group: str):
    """`network = grouped("network")`, then `@network("--run-id", ...)` declares a flag of that group."""

    def option(*param_decls: str, **kwargs):
        return click.option(*param_decls, cls=GroupedOption, group=group, **kwargs)

    return option


class ConfigCommand(click.Command):
    """A click command with `--config`, `--print-config` and `--help` in sections by flag group.

    `check(flags)` runs before `--print-config` prints, so that a combination the program would refuse is refused
    there too (and with the same message); it gets the same dict the command's callback gets.
    """

    def __init__(self, *args, check=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.check = check
        self.params[:0] = [
            GroupedOption(
                ["--config"],
                group="configuration",
                type=click.Path(exists=True, dir_okay=False),
                metavar="FILE.toml",
                is_eager=True,
                expose_value=False,
                callback=_load_config,
                help="Read flags from a TOML file: keys are the flags' names without the dashes "
                "(log-level = 'DEBUG'), at the top level or in the table of the flag's group ([network], ...); "
                "flags on the command line win.",
            ),
            GroupedOption(
                ["--print-config"],
                group="configuration",
                is_flag=True,
                help="Print the effective configuration as TOML (loadable with --config) and exit.",
            ),
        ]

    def configurable(self, ctx: click.Context) -> list[GroupedOption]:
        """The flags a config file may set: all grouped ones but --config and --print-config themselves."""
        return [p for p in self.get_params(ctx) if isinstance(p, GroupedOption) and p.group != "configuration"]

    def invoke(self, ctx: click.Context):
        """With --print-config: the program's own checks, then the TOML instead of the program."""
        if ctx.params.pop("print_config", False):
            if self.check is not None:
                self.check(dict(ctx.params))
            click.echo(dump_config(self.configurable(ctx), ctx.params), nl=False)
            return None
        return super().invoke(ctx)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """One section per flag group, in TITLES order: ~45 flags read better in groups than in one list."""
        sections: dict[str, list[tuple[str, str]]] = {}
        help_option = self.get_help_option(ctx)
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                group = getattr(param, "group", "configuration" if param is help_option else "other")
                sections.setdefault(group, []).append(record)
        for group, title in TITLES.items():
            if group in sections:
                with formatter.section(title):
                    formatter.write_dl(sections[group])


def _load_config(ctx: click.Context, param: click.Parameter, path: str | None) -> None:
    if path is None or ctx.resilient_parsing:
        return
    ctx.meta[_FILE] = path
    values = read_config(path, ctx.command.configurable(ctx), ctx, param)
    ctx.default_map = {**(ctx.default_map or {}), **values}


def read_config(path: str, options: list[GroupedOption], ctx=None, param=None) -> dict:
    """The file's values by parameter name, shaped as click expects them; errors name the key and the file."""

    def fail(message: str, option: click.Parameter | None = None) -> click.BadParameter:
        return click.BadParameter(message, ctx=ctx, param=option or param)

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise fail(f"{path} is not a readable TOML file: {e}") from None
    by_key = {o.key: o for o in options}
    values: dict = {}

    def place(key: str, value, section: str | None) -> None:
        where = f"[{section}] of {path}" if section else path
        option = by_key.get(key)
        if option is None:
            close = difflib.get_close_matches(key.replace("_", "-"), by_key, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise fail(f"unknown key {key!r} in {where}{hint}")
        home = option.group if option.group in SECTIONS else None
        if section is not None and section != home:
            belongs = f"in [{home}]" if home else "at the top level"
            raise fail(f"{key!r} in {where} belongs {belongs}")
        if option.name in values:
            raise fail(f"{key!r} is given twice in {path}")
        values[option.name] = _shape(option, value, path, fail)

    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            for inner, inner_value in value.items():
                place(inner, inner_value, key)
        else:
            place(key, value, None)
    return values


def _shape(option: GroupedOption, value, path: str, fail):
    """Refuse what click would silently mangle: a float or bool taken as an int, a string split into letters."""
    if isinstance(value, dict):
        raise fail(f"{option.key} in {path} is a table, not a value", option)
    if option.multiple:
        items = value if isinstance(value, list) else [value]
        for item in items:
            _scalar(option, item, path, fail)
        return items
    if isinstance(value, list):
        raise fail(f"{option.key} in {path} takes one value, not an array", option)
    _scalar(option, value, path, fail)
    return value


def _scalar(option: GroupedOption, value, path: str, fail) -> None:
    is_bool = isinstance(option.type, click.types.BoolParamType)
    if isinstance(value, (list, dict)):
        raise fail(f"{value!r} in {path}: expected one value", option)
    if isinstance(value, bool) and not is_bool:
        raise fail(f"{value!r} in {path} is a boolean, not a {option.type.name}", option)
    if is_bool and not isinstance(value, bool):
        raise fail(f"{value!r} in {path} is not a boolean (true or false)", option)
    if isinstance(value, float) and isinstance(option.type, click.types.IntParamType):
        raise fail(f"{value!r} in {path} is not an integer", option)


def dump_config(options: list[GroupedOption], params: dict) -> str:
    """The flags' values as TOML: top-level keys first, then one table per group. None (unset) is left out: TOML
    has no null, and a flag left out of the file takes the same default when the file is loaded back."""
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for option in options:
        value = params.get(option.name)
        if value is None:
            continue
        line = f"{option.key} = {toml_value(value)}"
        (tables.setdefault(option.group, []) if option.group in SECTIONS else top).append(line)
    blocks = ["\n".join(top)] if top else []
    blocks += ["\n".join([f"[{s}]", *tables[s]]) for s in SECTIONS if s in tables]
    return "\n\n".join(blocks) + "\n"


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # shortest round-tripping form, always with '.' or 'e'; 'inf' and 'nan' are TOML too
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def _toml_string(text: str) -> str:
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


# The monitor flags, shared by swarm-peer and swarm-bootstrap.

_observability = grouped("observability")


def monitor_options(f):
    """--dashboard-port/-host and --prometheus-port/-host, in that order in --help."""
    port = click.IntRange(1, 65535)
    for decorator in reversed(
        [
            _observability(
                "--dashboard-port",
                type=port,
                metavar="PORT",
                default=None,
                help="Serve the dashboard page and its JSON API (/api/v1/state) on this port; default: none.",
            ),
            _observability(
                "--dashboard-host",
                default="127.0.0.1",
                help="Address the dashboard listens on; 0.0.0.0 opens it to the network.",
            ),
            _observability(
                "--prometheus-port",
                type=port,
                metavar="PORT",
                default=None,
                help="Serve Prometheus metrics (/metrics) on this port; default: none.",
            ),
            _observability(
                "--prometheus-host", default="127.0.0.1", help="Address the Prometheus endpoint listens on."
            ),
        ]
    ):
        f = decorator(f)
    return f


def monitor_config(flags: dict):
    """The MonitorConfig of the monitor flags; one port cannot serve both endpoints."""
    from swarm.monitor import MonitorConfig

    port = flags["dashboard_port"]
    if port is not None and port == flags["prometheus_port"]:
        raise click.BadParameter(
            f"{port} is also --dashboard-port: the dashboard and the Prometheus endpoint need a port each",
            param_hint="'--prometheus-port'",
        )
    return MonitorConfig(
        dashboard_port=port,
        dashboard_host=flags["dashboard_host"],
        prometheus_port=flags["prometheus_port"],
        prometheus_host=flags["prometheus_host"],
    )
