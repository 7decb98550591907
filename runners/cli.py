"""The command line before Hydra: every job of ``python -m runners.run [-m] ...`` (all combinations of its sweeps and
of a preset's) composed and validated before any of them starts; bad input is one line (``runners.run.main``)."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .validate import CONF_DIR, ConfigError, check_writable, validate

_VALUE_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "-p", "--package"}
_PASS_THROUGH = {"-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--shell-completion", "--resolve",
                 "--experimental-rerun"}


def fail(message: str) -> None:
    """Bad input: one ``prunelab: error:`` line, exit code 2."""
    print(f"prunelab: error: {message}", file=sys.stderr)
    sys.exit(2)


def _split_argv(argv: list[str]) -> tuple[list[str], str, bool] | None:
    overrides, config_name, multirun, skip = [], "config", False, False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in _PASS_THROUGH or arg.split("=")[0] in _PASS_THROUGH:
            return None  # help / printing modes: let Hydra handle them
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _VALUE_FLAGS:
            skip = True
            if arg in ("-cn", "--config-name") and i + 1 < len(argv):
                config_name = argv[i + 1]
        elif arg.startswith("-"):
            continue
        else:
            overrides.append(arg)
    return overrides, config_name, multirun


DEFAULTED_GROUPS = ("calib", "eval")  # the groups a model config may choose (``model.group_defaults``)


def with_model_defaults(argv: list[str]) -> tuple[list[str], list[str]]:
    """The command line with the config group options its model asks for (``model.group_defaults`` in
    conf/model/<name>.yaml, e.g. an image generator's ``calib: generated`` and ``eval: image``), for each group that
    neither the command line nor its preset (``+experiment=...``'s ``override /<group>``) chooses. A sweep over
    models gets them only where every swept model asks for the same. Returns (argv, the overrides added).

    Hydra cannot do this itself: a model config may not override another group's default.
    Raises :class:`ConfigError` for a ``group_defaults`` entry that names no group option."""
    if any(a in ("-h", "--help", "--hydra-help") for a in argv):
        return argv, []
    overrides, skip = [], False  # (also with --cfg / --info: what they print is what the run would use)
    for arg in argv:
        if skip or arg in _VALUE_FLAGS:
            skip = not skip and arg in _VALUE_FLAGS
            continue
        if not arg.startswith("-"):
            overrides.append(arg)
    # the shipped configs first, then --config-dir ones (Hydra's search order: the first match wins)
    dirs = [CONF_DIR] + [Path(argv[i + 1]) for i, a in enumerate(argv[:-1]) if a in ("-cd", "--config-dir")]
    dirs += [Path(a.split("=", 1)[1]) for a in argv if a.startswith("--config-dir=")]

    def options(group: str) -> list[str]:
        return sorted({p.stem for d in dirs if (d / group).is_dir() for p in (d / group).glob("*.yaml")})

    def config(group: str, name: str) -> dict | None:
        for d in dirs:
            path = d / group / f"{name}.yaml"
            if path.is_file():
                try:
                    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
                except Exception:
                    return None  # (Hydra says what is wrong with it)
                return data if isinstance(data, dict) else None
        return None

    chosen, models, experiments = set(), None, []
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.lstrip("+~")
        chosen.add(key)
        if key == "model" and eq:
            models = [v.strip() for v in value.split(",")]
        elif key == "experiment" and eq:
            experiments = [v.strip() for v in value.split(",")]
    for name in experiments:
        for entry in (config("experiment", name) or {}).get("defaults") or []:
            if isinstance(entry, dict):
                chosen.update(k.split()[-1].lstrip("/").split("@")[0] for k in entry if k.startswith("override"))
    if not models:
        return argv, []
    asked = []
    for name in models:
        wants = (config("model", name) or {}).get("group_defaults") or {}
        for group, option in wants.items():
            if group not in DEFAULTED_GROUPS:
                raise ConfigError(f"model.group_defaults.{group} (conf/model/{name}.yaml): only "
                                  f"{' and '.join(DEFAULTED_GROUPS)} can be chosen by a model")
            if option not in options(group):
                raise ConfigError(f"model.group_defaults.{group}={option} (conf/model/{name}.yaml) is not an option "
                                  f"(choose from: {', '.join(options(group))})")
        asked.append(wants)
    if any(a != asked[0] for a in asked):
        return argv, []
    added = [f"{group}={option}" for group, option in asked[0].items() if group not in chosen]
    return argv + added, added


def _group_options(group: str) -> list[str] | None:
    folder = CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else None


def _syntax_error(err: Exception, overrides: list[str]) -> str:
    """Hydra's override syntax error as one line naming the override; a value Hydra's lexer cannot read because of
    spaces or non-ASCII characters (a path) gets how to quote it."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for override in overrides:
        key, eq, value = override.partition("=")
        if not eq or value[:1] in ("'", '"'):
            continue
        try:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            OverridesParser.create().parse_override(override)
        except Exception:
            if any(c.isspace() or not c.isascii() for c in value) and "'" not in value:
                return (f"{override}: Hydra cannot read this value unquoted (spaces or non-ASCII characters in it): "
                        f"quote it for Hydra inside the shell's quotes, e.g. \"{key}='{value}'\"")
            return f"{override}: {text}"
    return text


def prevalidate(argv: list[str]) -> str | None:
    """Compose and validate every job; return an error message, or None if all are valid.

    The jobs are the product of the command line's sweeps and of the sweeps a preset declares
    (``hydra.sweeper.params`` of ``+experiment=...``; the command line wins for a key set in both),
    expanded here with Hydra's public override parser as its basic sweeper does (choice and range sweeps;
    a ``glob(...)`` of a config group is matched against the group's options). A sweep that cannot be
    expanded (e.g. ``interval(...)``) is an error: nothing runs unvalidated. ``-cd/--config-dir DIR``
    (extra configs, e.g. your own presets) is searched here as Hydra searches it.
    """
    import itertools

    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob

    split = _split_argv(argv)
    if split is None:
        return None
    overrides, config_name, multirun = split
    extra_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-cd", "--config-dir")]
    extra_dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    extra_dirs = [str(Path(d).resolve()) for d in extra_dirs]
    for d in extra_dirs:
        if not Path(d).is_dir():
            return f"--config-dir {d}: no such directory"
    searchpath = [f"hydra.searchpath=[{','.join('file://' + d for d in extra_dirs)}]"] if extra_dirs else []

    def group_options(group: str) -> list[str] | None:
        folders = [CONF_DIR / group, *(Path(d) / group for d in extra_dirs)]
        found = {p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")}
        return sorted(found) if found else _group_options(group)

    parser = OverridesParser.create()

    def values_of(o) -> list[str]:
        """The values one override takes, as override strings (its sweep expanded)."""
        if not o.is_sweep_override():
            return [o.get_value_element_as_str()]
        if isinstance(o.value(), Glob):
            options = group_options(o.key_or_group)
            if options is None:
                raise ValueError(f"{o.input_line}: glob() sweeps only config groups, and {o.key_or_group} is not one")
            return o.value().filter(options)
        if not o.is_discrete_sweep():
            raise ValueError(f"{o.input_line}: {o.value_type.name.lower().replace('_', ' ')} cannot be enumerated")
        return list(o.sweep_string_iterator())

    def explain(err: Exception, job: list[str]) -> str:
        """Hydra's composition error as one line; a key that is not in the config gets the closest one."""
        import re

        text = " ".join(str(err).strip().splitlines()[:2]) or type(err).__name__
        match = re.match(r"Could not override '([^']+)'", text)
        if not match:
            return text
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        try:
            cfg = compose(config_name, overrides=[o for o in job if not o.lstrip("+~").startswith(key + "=")])
            node = OmegaConf.select(cfg, parent) if parent else cfg
        except Exception:
            node = None
        if not isinstance(node, DictConfig):
            return f"{key}: unknown key ({parent or 'the config'} has no key {leaf})"
        import difflib

        close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1, cutoff=0.6)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"keys: {', '.join(map(str, node.keys()))}"
        return f"{key}: unknown key ({hint})"

    try:
        parsed = parser.parse_overrides(overrides)
    except Exception as err:  # Hydra's own syntax errors
        return _syntax_error(err, overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            base = compose(config_name, overrides=searchpath + [o.input_line for o in parsed if not o.is_sweep_override()],
                           return_hydra_config=True)
        except Exception as err:  # (as Hydra: a multirun composes its base from the overrides that are no sweep)
            first = explain(err, searchpath + [o.input_line for o in parsed if not o.is_sweep_override()])
            swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
            key = first.split(":", 1)[0]
            if "unknown key" in first and key.split(".")[0] in swept:  # a key only the swept options have
                value = next((o.get_value_element_as_str() for o in parsed if o.key_or_group == key), "...")
                return (f"{first}; a sweep's base config has the group's default {key.split('.')[0]}, so a key that "
                        f"only the swept options have is written ++{key}={value} (added to the base, set in each job)")
            for o in parsed:  # a bad group option: say which options there are
                options = None if o.key_or_group.startswith("hydra") else group_options(o.key_or_group)
                if options is not None and not o.is_delete() and not o.is_sweep_override() and \
                        o.get_value_element_as_str() not in options:
                    return f"{o.key_or_group}={o.get_value_element_as_str()} is not an option (choose from: {', '.join(options)})"
            return first
        params = base.hydra.sweeper.get("params")
        preset = OmegaConf.to_container(params, resolve=False) if params else {}
        given = {o.key_or_group for o in parsed}
        try:
            parsed += parser.parse_overrides([f"{k}={v}" for k, v in preset.items() if k not in given])
        except Exception as err:
            return f"hydra.sweeper.params: {str(err).strip().splitlines()[0]}"
        multirun = multirun or str(base.hydra.mode).endswith("MULTIRUN")
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps and not multirun:
            return f"{sweeps[0]} is a sweep: add -m (--multirun) to run every value"
        axes: dict[str, list[str]] = {}  # key -> its override strings, in Hydra's order (a later one wins)
        for o in parsed:
            try:
                values = values_of(o)
            except Exception as err:
                return (f"the sweep could not be pre-validated, so nothing was run: {str(err).strip().splitlines()[0]} "
                        f"(give the values as a,b,c or range(start,stop,step))")
            key = o.get_key_element()
            options = None if o.key_or_group.startswith("hydra") or o.is_delete() else group_options(o.key_or_group)
            for value in values:
                if options is not None and value not in options:
                    return f"{o.key_or_group}={value} is not an option (choose from: {', '.join(options)})"
            if not values:
                return f"{o.input_line}: the sweep has no values"
            axes[key] = [f"{key}={value}" for value in values]
        jobs = [list(combo) for combo in itertools.product(*axes.values())]
        for job in jobs:
            where = f"  [job: {' '.join(job)}]" if len(jobs) > 1 else ""
            try:
                cfg = compose(config_name, overrides=searchpath + job)
            except Exception as err:
                return explain(err, searchpath + job) + where
            try:  # the model's checks on every job: a swept key (pruner.blocks, calib.seqlen) meets it in each one
                validate(cfg, check_model=True, check_hub=True)  # (the checkpoint's config is read once, then cached)
                check_writable(cfg)  # before Hydra creates its run folder there
            except ConfigError as err:
                return f"{err}{where}"
    return None


