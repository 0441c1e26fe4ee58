"""MkDocs hook: pages generated from the code at build time, so they cannot drift from it.

A page containing ``<!-- qrobust:cli-reference -->`` gets the reference of every ``qrobust`` subcommand,
rendered from the argument parsers of :func:`qrobust.cli.build_parser`; ``<!-- qrobust:attack-params -->``
gets the settings each attack of :data:`qrobust.attacks.ATTACKS` accepts (what ``[[attacks]]`` tables
and :func:`qrobust.create_attack` take). ``python docs/hooks/reference.py`` prints both.
"""

from __future__ import annotations

import argparse
import inspect
import re

# Sphinx roles in docstrings (:func:`x`), rendered by mkdocstrings as ":func:<code>x</code>": become links
# resolved by mkdocs-autorefs when the object is documented on some page, plain code otherwise.
ROLE_RE = re.compile(r":(?:func|class|meth|data|mod|attr|exc|obj):<code>(~?)([A-Za-z_][\w.]*)</code>")
CLI_MARKER = "<!-- qrobust:cli-reference -->"
PARAMS_MARKER = "<!-- qrobust:attack-params -->"


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._StoreTrueAction):
        return ""
    if isinstance(action, argparse._StoreFalseAction):
        return ""
    return f"`{action.default}`"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest.upper()}`"
    metavar = ""
    if action.nargs != 0:
        metavar = " " + (action.metavar or (action.dest.upper() if not action.choices else
                                            "{" + ",".join(map(str, action.choices)) + "}"))
    return ", ".join(f"`{s}{metavar}`" for s in action.option_strings)


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return _cell(parser._get_formatter()._expand_help(action))  # expands %(default)s as --help does


def parser_markdown(parser: argparse.ArgumentParser, level: int = 2) -> str:
    """One subcommand: usage, description, then a table per argument group."""
    out = [f"{'#' * level} `{parser.prog}`", ""]
    if parser.description:
        out += [parser.description.strip(), ""]
    usage = parser.format_usage().strip().removeprefix("usage: ")
    out += ["```text", usage, "```", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions
                   if a.help != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]
        if not actions:
            continue
        out += [f"**{group.title}**", "", "| argument | default | meaning |", "|---|---|---|"]
        out += [f"| {_flags(a)} | {_default(a)} | {_help(parser, a)} |" for a in actions]
        out.append("")
    return "\n".join(out)


def cli_markdown() -> str:
    """Every subcommand of ``qrobust``, in the order ``qrobust --help`` lists them."""
    from qrobust.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    out = ["| command | what |", "|---|---|"]
    out += [f"| [`qrobust {name}`](#qrobust-{name}) | {_cell(helps.get(name, ''))} |" for name in sub.choices]
    out.append("")
    out += [parser_markdown(p) for p in sub.choices.values()]
    return "\n".join(out)


def attack_params_markdown() -> str:
    """One row per registered attack: its class and the settings it accepts, with their defaults."""
    from qrobust.attacks import attack_class, attack_names, attack_params

    out = ["| name | class | settings (defaults) |", "|---|---|---|"]
    for name in attack_names():
        cls = attack_class(name)
        home = "qrobust.attacks" if cls.__module__.startswith("qrobust.attacks") else cls.__module__
        params = ", ".join(f"`{k}={v!r}`" if v is not inspect.Parameter.empty else f"`{k}`"
                           for k, v in attack_params(name).items())
        out.append(f"| `{name}` | [`{cls.__name__}`](#{home}.{cls.__name__}) | {params} |")
    return "\n".join(out) + "\n"


def on_page_markdown(markdown: str, **kwargs: object) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if PARAMS_MARKER in markdown:
        markdown = markdown.replace(PARAMS_MARKER, attack_params_markdown())
    return markdown


def _role_link(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2)
    title = target.rsplit(".", 1)[-1] if short else target
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def on_page_content(html: str, **kwargs: object) -> str:
    return ROLE_RE.sub(_role_link, html)


if __name__ == "__main__":  # pragma: no cover
    print(cli_markdown())
    print(attack_params_markdown())
