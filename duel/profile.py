"""Run a committed profile of overrides (profiles/*.yaml) as a named DVC experiment:

    python -m duel.profile profiles/demo.yaml                      # = dvc exp run -n demo -S data.source=... -S ...
    python -m duel.profile profiles/demo.yaml -S data.test_size=800  # more overrides, in DVC's -S form
    python -m duel.profile profiles/demo.yaml --print              # show that command without running it

Every override is checked against params.yaml first: a key that params.yaml lacks is an error, not a new param. A
relative local path (data.source, models.*.checkpoint starting with ./ or ../) is made absolute from the folder the
profile runs in, so the experiment also runs where DVC runs queued experiments (a copy in .dvc/tmp/exps/).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from duel.params import ParamsError, parse_params


def flatten(base: dict[str, Any], overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted names of the params a profile sets. A section of params.yaml is descended into; a param whose value is
    itself a mapping (models.*.overrides) is set whole. A name params.yaml lacks is an error."""
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        name = f"{prefix}{key}"
        if not isinstance(base, dict) or key not in base:
            raise ParamsError(f"{name}: unknown key in the profile; params.yaml has no such param")
        if isinstance(value, dict) and isinstance(base[key], dict) and base[key] and not _is_mapping_param(name):
            flat |= flatten(base[key], value, f"{name}.")
        else:
            flat[name] = value
    return flat


def _is_mapping_param(name: str) -> bool:
    return name.startswith("models.") and name.endswith(".overrides")


def apply(base: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    merged = json.loads(json.dumps(base))
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = merged
        for part in parents:
            node = node[part]
        node[leaf] = value
    return merged


def override_value(value: Any) -> str:
    """A value in the override grammar DVC parses -S with (Hydra's): JSON, except that mapping keys are bare."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return json.dumps(value)


def overlay(base: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """params.yaml's tree with a profile's overrides laid over it (the one way profiles, the benchmark runner and the
    tests change params); relative local paths made absolute from the current folder."""
    return apply(base, absolute_paths(flatten(base, profile)))


PATH_PARAMS = re.compile(r"data\.source|models\.[^.]+\.checkpoint")


def absolute_paths(flat: dict[str, Any]) -> dict[str, Any]:
    """Relative local paths made absolute from the current folder (see the module's docstring)."""
    return {
        name: str(Path(value).resolve())
        if PATH_PARAMS.fullmatch(name) and isinstance(value, str) and value.startswith(("./", "../"))
        else value
        for name, value in flat.items()
    }


def extra_overrides(args: list[str]) -> dict[str, Any]:
    """`-S key=value` pairs from the command line, the value read as YAML (as DVC reads it)."""
    flat = {}
    for flag, pair in zip(args[::2], args[1::2], strict=True):
        if flag != "-S" or "=" not in pair:
            raise ParamsError(f"{flag} {pair}: expected -S key=value")
        name, value = pair.split("=", 1)
        flat[name] = yaml.safe_load(value)
    return flat


def set_param_args(profile: Path, base: dict[str, Any], extra: dict[str, Any] | None = None) -> list[str]:
    """`dvc exp run`'s -S arguments for a profile (and `extra` dotted overrides) over params `base`."""
    flat = flatten(base, yaml.safe_load(profile.read_text()) or {})
    flat = absolute_paths(flat | flatten(base, unflatten(extra or {})))
    parse_params(apply(base, flat))  # fail here, before DVC runs anything
    args = []
    for name, value in flat.items():
        # "++" replaces a mapping whole; a plain override would merge into it and refuse new keys.
        force = "++" if isinstance(value, dict) else ""
        args += ["-S", f"{force}{name}={override_value(value)}"]
    return args


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def main() -> None:
    profile, rest = Path(sys.argv[1]), [a for a in sys.argv[2:] if a != "--print"]
    try:
        base = yaml.safe_load(Path("params.yaml").read_text())
        command = ["dvc", "exp", "run", "-n", profile.stem, *set_param_args(profile, base, extra_overrides(rest))]
    except (ParamsError, OSError, ValueError) as err:
        print(f"error: {profile}: {err}", file=sys.stderr)
        sys.exit(1)
    print(" ".join(shlex.quote(a) for a in command), flush=True)
    if "--print" not in sys.argv:
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()
