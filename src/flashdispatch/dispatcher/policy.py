"""The selection policy: rankings per device architecture, from YAML files and code.

The shipped defaults live in `default_policy.yaml` beside this file. A user policy, from the file
named by `FLASHDISPATCH_CONFIG` or given to `flashdispatch.configure(path_or_dict)`, is consulted
first, key by key; see the shipped file for the format.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .capabilities import Capabilities

DEFAULT_POLICY_FILE = Path(__file__).with_name("default_policy.yaml")
DIRECTIONS = ("forward", "backward", "decode")
# A forward with at most this many queries per sequence is ranked by "decode" (falling back to "forward").
DECODE_MAX_SEQLEN_Q = 16
TOP_LEVEL_KEYS = ("autotune", "rankings", "precision", "fp8")
FP8_KEYS = ("rotation", "seed")
WILDCARD = "*"


@dataclass(frozen=True)
class Policy:
    """Rankings by architecture key and direction, plus whether to autotune."""

    rankings: dict  # arch key -> direction -> list of names
    autotune: bool
    source: str  # where it came from, for explain()
    fallback: "Policy | None" = field(default=None, repr=False)  # the shipped policy under a user one
    precision: str = "native"  # for calls that pass no precision= ("fp8" opts every such call into FP8)
    fp8_rotation: bool = True  # random-sign Hadamard rotation of Q and K before quantizing them
    fp8_seed: int = 0  # the rotation's signs

    def ranking(self, caps: Capabilities, direction: str) -> tuple[list[str], str]:
        """(names in preference order, "key.direction in source") for this device and direction.

        Under each architecture key, "decode" falls back to that key's "forward": a user's forward
        ranking for a device outranks the shipped decode ranking of a less specific key.
        """
        for policy in (self, self.fallback):
            if policy is None:
                continue
            for key in arch_keys(caps):
                for wanted in (direction, "forward") if direction == "decode" else (direction,):
                    names = policy.rankings.get(key, {}).get(wanted)
                    if names is not None:
                        return names, f"{key}.{wanted} in {policy.source}"
        return [WILDCARD], "no ranking (registration order)"


def arch_keys(caps: Capabilities) -> list[str]:
    """Policy keys from most to least specific: sm90, sm9x, cuda, default (cpu, default on a CPU)."""
    if caps.compute_capability is None:
        return [caps.device_type, "default"]
    major, minor = caps.compute_capability
    return [f"sm{major}{minor}", f"sm{major}x", caps.device_type, "default"]


def order(names: list[str], registered: list[str]) -> list[str]:
    """Registered backends in ranking order, with the wildcard expanded."""
    listed = [n for n in names if n != WILDCARD]
    ranked = []
    for name in names:
        if name == WILDCARD:
            ranked += [r for r in registered if r not in listed and r not in ranked]
        elif name in registered and name not in ranked:
            ranked.append(name)
    return ranked


def _load_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"policy file {path} cannot be read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ValueError(f"policy file {where}: malformed YAML: {problem}") from None
    return {} if data is None else data


def parse(data, source: str, fallback: Policy | None = None) -> Policy:
    """Validate a policy mapping; ValueError names the source and the offending key."""
    if not isinstance(data, dict):
        raise ValueError(f"{source} must be a mapping with keys {TOP_LEVEL_KEYS}, got {type(data).__name__}")
    unknown = set(data) - set(TOP_LEVEL_KEYS)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; expected {list(TOP_LEVEL_KEYS)}")
    autotune = data.get("autotune", False if fallback is None else fallback.autotune)
    if not isinstance(autotune, bool):
        raise ValueError(f"{source}: autotune must be true or false, got {autotune!r}")
    rankings = data.get("rankings") or {}
    if not isinstance(rankings, dict):
        raise ValueError(f"{source}: rankings must map architecture keys (sm90, sm8x, cuda, cpu, default) to directions")
    for key, directions in rankings.items():
        if not isinstance(directions, dict) or set(directions) - set(DIRECTIONS):
            raise ValueError(f"{source}: rankings.{key} must map 'forward', 'backward' and/or 'decode' to lists of backend names, got {directions!r}")
        for direction, names in directions.items():
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{source}: rankings.{key}.{direction} must be a list of backend names, got {names!r}")
    precision = data.get("precision", "native" if fallback is None else fallback.precision)
    if precision not in ("native", "fp8"):
        raise ValueError(f"{source}: precision must be 'native' or 'fp8', got {precision!r}")
    fp8 = data.get("fp8") or {}
    if not isinstance(fp8, dict) or set(fp8) - set(FP8_KEYS):
        raise ValueError(f"{source}: fp8 must map {list(FP8_KEYS)} to values, got {fp8!r}")
    rotation = fp8.get("rotation", True if fallback is None else fallback.fp8_rotation)
    seed = fp8.get("seed", 0 if fallback is None else fallback.fp8_seed)
    if not isinstance(rotation, bool):
        raise ValueError(f"{source}: fp8.rotation must be true or false, got {rotation!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{source}: fp8.seed must be an int >= 0, got {seed!r}")
    return Policy(rankings=rankings, autotune=autotune, source=source, fallback=fallback, precision=precision,
                  fp8_rotation=rotation, fp8_seed=seed)


def shipped_policy() -> Policy:
    return parse(_load_yaml(DEFAULT_POLICY_FILE), "the shipped policy")


def user_policy(config, fallback: Policy) -> Policy:
    """A user policy from a path or a dict, over `fallback`."""
    if isinstance(config, dict):
        return parse(config, "the policy given to configure()", fallback)
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        return parse(_load_yaml(path), f"policy file {path}", fallback)
    raise ValueError(f"config must be a path to a YAML file or a dict, got {type(config).__name__}")


_active: Policy | None = None


def active_policy() -> Policy:
    global _active
    if _active is None:
        shipped = shipped_policy()
        env = os.environ.get("FLASHDISPATCH_CONFIG")
        _active = user_policy(env, shipped) if env else shipped
    return _active


def set_policy(config) -> Policy:
    """Replace the user policy (None: back to FLASHDISPATCH_CONFIG or the shipped defaults)."""
    global _active
    _active = None
    if config is not None:
        _active = user_policy(config, shipped_policy())
    return active_policy()
