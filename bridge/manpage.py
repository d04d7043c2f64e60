"""The man page pcsc-bridge(1) and the bash completion, written from the command's own
argument parsers, so both list every subcommand and option the command has.

    python3 -m pcsc_bridge.manpage man  > pcsc-bridge.1
    python3 -m pcsc_bridge.manpage bash > pcsc-bridge          (bash-completion)

The parsers are built with a parser class that records what each ``add_argument`` and
``add_parser`` call made (argparse has no public way to list them afterwards).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field

from . import __version__
from .cli import build_parser

PROG = "pcsc-bridge"


class Recorder(argparse.ArgumentParser):
    """An ArgumentParser that keeps its arguments and subcommands in the order added."""

    def __init__(self, *args, **kwargs):
        self.arguments: list[argparse.Action] = []
        self.commands: dict[str, tuple[str | None, Recorder]] = {}
        self.command_metavar: str | None = None
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.arguments.append(action)
        return action

    def add_subparsers(self, **kwargs):
        subparsers = super().add_subparsers(**kwargs)
        self.command_metavar = kwargs.get("metavar")
        return _Commands(self, subparsers)


class _Commands:
    """What add_subparsers returns, recording each subcommand and its help line."""

    def __init__(self, owner: Recorder, subparsers):
        self.owner, self.subparsers = owner, subparsers

    def add_parser(self, name: str, **kwargs):
        parser = self.subparsers.add_parser(name, **kwargs)
        self.owner.commands[name] = (kwargs.get("help"), parser)
        return parser


@dataclass
class Option:
    names: list[str]           # "-c", "--config"; or the positional's metavar
    metavar: str | None        # what follows an option; None for a flag
    choices: list[str]
    help: str
    positional: bool


@dataclass
class Command:
    path: list[str]            # ["certs", "init"]
    help: str
    description: str
    usage: str
    epilog: str
    options: list[Option]
    commands: list[Command] = field(default_factory=list)
    command_metavar: str | None = None


def _metavar(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return None
    if action.metavar is not None:
        name = action.metavar
    elif action.choices:
        name = "{" + ",".join(map(str, action.choices)) + "}"
    else:
        name = action.dest if not action.option_strings else action.dest.upper()
    return {None: name, "?": f"[{name}]", "*": f"[{name} ...]",
            "+": f"{name} [{name} ...]"}.get(action.nargs, name)


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:        # as argparse expands it: %(default)s, %(prog)s, ...
        params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
        params["prog"] = prog
        if params.get("choices") is not None:
            params["choices"] = ", ".join(map(str, params["choices"]))
        text = text % params
    return text


def describe(parser: Recorder | None = None, path: list[str] | None = None,
             help_line: str = "") -> Command:
    """The command tree: every parser, its options and its subcommands."""
    if parser is None:
        parser = build_parser(None, Recorder)
    path = path or []
    options = [Option(list(a.option_strings) or [_metavar(a) or a.dest],
                      _metavar(a) if a.option_strings else None,
                      [str(c) for c in a.choices or ()], _help(a, parser.prog),
                      not a.option_strings)
               for a in parser.arguments if a.help is not argparse.SUPPRESS]
    usage = " ".join(parser.format_usage().split()[1:])
    cmd = Command(path, help_line or "", parser.description or "", usage, parser.epilog or "",
                  options, command_metavar=parser.command_metavar)
    cmd.commands = [describe(sub, [*path, name], sub_help or "")
                    for name, (sub_help, sub) in parser.commands.items()]
    return cmd


def walk(cmd: Command):
    yield cmd
    for sub in cmd.commands:
        yield from walk(sub)


# --- troff ----------------------------------------------------------------------------------

def _roff(text: str) -> str:
    """Text for a troff line: backslashes escaped, no line starting as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def _paragraphs(text: str) -> str:
    return "\n.PP\n".join(_roff(" ".join(p.split())) for p in re.split(r"\n\s*\n", text)
                          if p.strip())


def _synopsis(usage: str) -> str:
    """A usage line, the command's words in bold."""
    words = usage.split(" ")
    n = next((i for i, w in enumerate(words) if not re.fullmatch(r"[a-z][a-z-]*", w)),
             len(words))
    return (f"\\fB{_roff(' '.join(words[:n]))}\\fR " + _roff(" ".join(words[n:]))).rstrip()


def _option_line(opt: Option) -> str:
    if opt.positional:
        return f"\\fI{_roff(opt.names[0])}\\fR"
    names = ", ".join(f"\\fB{_roff(n)}\\fR" for n in opt.names)
    return names + (f" \\fI{_roff(opt.metavar)}\\fR" if opt.metavar else "")


def man_page(cmd: Command | None = None) -> str:
    """pcsc-bridge(1) in troff (man macros)."""
    top = cmd or describe()
    out = [f'.TH PCSC\\-BRIDGE 1 "" "{PROG} {__version__}" "User Commands"',
           ".SH NAME", f"{PROG} \\- {_roff(top.description.rstrip('.'))}",
           ".SH SYNOPSIS", _synopsis(top.usage)]
    for sub in top.commands:
        out += [".br", _synopsis(sub.usage)]
    out += [".SH DESCRIPTION", _paragraphs(top.description),
            ".PP", (f"Each job is a subcommand; \\fB{_roff(PROG)} \\fICOMMAND\\fB \\-\\-help\\fR "
            "prints its options."), ".SH OPTIONS"]
    out += _options(top)
    out += [".SH COMMANDS"]
    for sub in list(walk(top))[1:]:
        out += [f'.SS "{PROG} {" ".join(sub.path)}"', _synopsis(sub.usage)]
        if sub.description or sub.help:
            out += [".PP", _paragraphs(sub.description or sub.help)]
        if sub.epilog:
            out += [".PP", ".nf", _roff(sub.epilog.strip("\n")), ".fi"]
        if sub.commands:
            out += [".PP", f"{_roff(sub.command_metavar or 'COMMAND')} is one of:"]
            for child in sub.commands:
                out += [".TP", f"\\fB{_roff(child.path[-1])}\\fR", _roff(child.help)]
        out += _options(sub)
    out += [".SH FILES",
            ".TP", "\\fI/etc/pcsc\\-bridge/server.yaml\\fR",
            "the host server's configuration (\\fB" + PROG + " server \\-c\\fR)",
            ".TP", "\\fI/etc/pcsc\\-bridge/client.yaml\\fR",
            "a guest agent's configuration (\\fB" + PROG + " client \\-c\\fR)",
            ".TP", "\\fI/usr/share/doc/pcsc\\-bridge/examples/config.example.yaml\\fR",
            "every configuration key, commented",
            ".TP", "\\fI/run/pcscd/pcscd.comm\\fR",
            "the pcsc\\-lite socket: pcscd's on the host, the agent's on a guest",
            ".SH EXIT STATUS",
            ("0 on success, 1 when something failed at run time, 2 for a usage or "
            "configuration error."),
            ".SH SEE ALSO",
            ("\\fBpcscd\\fR(8), \\fBpcsc_scan\\fR(1), \\fBsystemd.exec\\fR(5); "
            "/usr/share/doc/pcsc\\-bridge/ (operations.md, configuration.md, "
            "certificates.md)")]
    return "\n".join(out) + "\n"


def _options(cmd: Command) -> list[str]:
    out = []
    for opt in cmd.options:
        text = opt.help
        if opt.choices and not all(c in text for c in opt.choices):
            text = f"{text} (one of: {', '.join(opt.choices)})".lstrip()
        out += [".TP", _option_line(opt), _roff(text or "(see the description above)")]
    return out


# --- bash completion -------------------------------------------------------------------------

def _word(path: list[str]) -> str:
    return "/".join(path)


def bash_completion(cmd: Command | None = None) -> str:
    """A bash-completion script: subcommands, their options, and the choices of options
    and arguments that have them; file names (bash's default) for other values."""
    top = cmd or describe()
    commands, values, words = [], [], []
    for c in walk(top):
        here = _word(c.path)
        for sub in c.commands:
            commands.append(f'            "{here}:{sub.path[-1]}") path={_word(sub.path)} ;;')
        takes = [n for o in c.options if not o.positional and o.metavar for n in o.names]
        if takes:
            pattern = "|".join(f'"{here}:{n}"' for n in takes)
            commands.append(f"            {pattern}) skip=1 ;;")
        for o in c.options:
            if o.metavar and not o.positional:
                pattern = "|".join(f'"{here}:{n}"' for n in o.names)
                # a value without choices: none offered, so bash offers file names
                reply = f'COMPREPLY=($(compgen -W "{" ".join(o.choices)}" -- "$cur"))' \
                    if o.choices else "COMPREPLY=()"
                values.append(f"        {pattern}) {reply}; return ;;")
        offered = [n for o in c.options if not o.positional for n in o.names]
        offered += [s.path[-1] for s in c.commands]
        offered += [ch for o in c.options if o.positional for ch in o.choices]
        words.append(f'        "{here}") words="{" ".join(offered)}" ;;')
    name = "_" + PROG.replace("-", "_")
    return "\n".join([
        f"# bash completion for {PROG} {__version__}; written from its argument parsers",
        f"{name}() {{",
        '    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}',
        "    local path='' skip=0 i w words=''",
        "    for ((i = 1; i < COMP_CWORD; i++)); do",
        '        w=${COMP_WORDS[i]}',
        "        if ((skip)); then skip=0; continue; fi",
        '        case "$path:$w" in',
        *commands,
        "        esac",
        "    done",
        "    if ((!skip)); then prev=''; fi",
        '    case "$path:$prev" in',
        *values,
        "    esac",
        '    case "$path" in',
        *words,
        "    esac",
        '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
        "}",
        f"complete -o default -F {name} {PROG}",
        ""])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv not in (["man"], ["bash"]):
        print("usage: python3 -m pcsc_bridge.manpage man|bash", file=sys.stderr)
        return 2
    sys.stdout.write(man_page() if argv == ["man"] else bash_completion())
    return 0


if __name__ == "__main__":
    sys.exit(main())
