"""A command line from a dataclass, for both trainers: one flag per field, its help from the field.

    @dataclass
    class Args:
        seed: int = arg(1, "random seed")
    args = parse_dataclass(Args, argv, __doc__, validate)

Each field's one-line help is its metadata (`arg`), so `--help` explains every flag; a bool becomes
--flag/--no-flag; a misspelt flag is answered with the closest one.
"""
import argparse
import difflib
from dataclasses import field, fields


def arg(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


USAGE = "%(prog)s [options] (see --help)"


def parse_dataclass(cls, argv, description, validate, presets=None):
    """An argparse CLI from a dataclass: one flag per field, its help from the field's metadata; bools get
    --flag/--no-flag. A bad flag or value, or `validate(args, given)` raising ValueError (given: the fields set
    on the command line), prints the one-line USAGE and one error line that names the valid values.
    `presets` ({name: {field: value}}, with a field `preset` in cls choosing one): the chosen preset's values
    replace the defaults, and the flags given on the command line replace both."""
    parser = argparse.ArgumentParser(description=description, usage=USAGE,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):   # defaults are filled in below, so that the namespace holds only the flags given
        flag = "--" + f.name.replace("_", "-")
        help = f"{f.metadata['help']} (default: {f.default})"
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, type=f.type, default=argparse.SUPPRESS, choices=f.metadata["choices"],
                                help=help)
    given, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(unknown_flags(unknown, cls))
    preset = (presets or {}).get(getattr(given, "preset", None), {})
    args = cls(**{**{f.name: f.default for f in fields(cls)}, **preset, **vars(given)})
    try:
        validate(args, set(vars(given)))
    except ValueError as error:
        parser.error(str(error))
    return args


def as_flags(values):
    """{field: value} as the command-line flags that set them: a bool as --flag or --no-flag."""
    flags = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        flags += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return flags


def unknown_flags(words, cls):
    """The error for unrecognised arguments, with the closest flag to each misspelt one."""
    flags = [f"--{prefix}{f.name.replace('_', '-')}" for f in fields(cls)
             for prefix in (("", "no-") if f.type is bool else ("",))]
    close = [match[0] for w in words if (match := difflib.get_close_matches(w.split("=")[0], flags, 1))]
    return (f"unrecognized arguments: {' '.join(words)}" +
            (f" (did you mean {', '.join(close)}?)" if close else " (--help lists every flag)"))
