"""Run a committed profile of overrides (profiles/*.yaml) as a named DVC experiment:

    python -m duel.profile profiles/demo.yaml              # = dvc exp run -n demo -S data.source=... -S ...
    python -m duel.profile profiles/demo.yaml --print      # show that command without running it

Every override is checked against params.yaml first: a key that params.yaml lacks is an error, not a new param.
"""

from __future__ import annotations

import json
import os
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


def set_param_args(profile: Path, params_file: Path = Path("params.yaml")) -> list[str]:
    base = yaml.safe_load(params_file.read_text())
    flat = flatten(base, yaml.safe_load(profile.read_text()) or {})
    parse_params(apply(base, flat))  # fail here, before DVC runs anything
    args = []
    for name, value in flat.items():
        # "++" replaces a mapping whole; a plain override would merge into it and refuse new keys.
        force = "++" if isinstance(value, dict) else ""
        args += ["-S", f"{force}{name}={override_value(value)}"]
    return args


def main() -> None:
    profile = Path(sys.argv[1])
    try:
        command = ["dvc", "exp", "run", "-n", profile.stem, *set_param_args(profile)]
    except (ParamsError, OSError) as err:
        print(f"error: {profile}: {err}", file=sys.stderr)
        sys.exit(1)
    print(" ".join(shlex.quote(a) for a in command), flush=True)
    if "--print" not in sys.argv:
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()
