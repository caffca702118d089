"""sweeper's configuration: a typed schema, config.yaml and ``key=value`` overrides.

OmegaConf merges the three once, at start-up, and validates types against :class:`ConfigSchema`;
:func:`load_settings` then checks the policy is safe and hands back a frozen :class:`Settings`.
Nothing past this module ever sees OmegaConf. Every problem is a :class:`ConfigError` naming
the key.
"""

from __future__ import annotations

import difflib
import glob
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from sweeper.errors import ConfigError
from sweeper.policy import DEFAULT_ROLLING_NAMES, BestMode, InferenceRules, Rules
from sweeper.pressure import PressureRules, Watermark, parse_watermark, pressured_rules
from sweeper.workers import READER_MEMORY_LIMIT

__all__ = [
    "FILE_KEY",
    "ConfigSchema",
    "ObserverKind",
    "Settings",
    "check_given_roots",
    "default_state_dir",
    "known_keys",
    "load_settings",
    "nearest_keys",
    "root_exists",
    "settings_from_schema",
]

# The key a ConfigError names when the trouble is the file itself (missing, unreadable, bad YAML).
FILE_KEY = "<file>"

STATE_DIR_RESOLVER = "sweeper.state_dir"

_GLOB_CHARACTERS = frozenset("*?[")
MAX_DEPTH_LIMIT = 256
_MIN_MEMORY_LIMIT = 16 * 1024**2


class ObserverKind(Enum):
    """How the daemon learns that files changed.

    Members are lower case because OmegaConf matches YAML values against member *names*.
    """

    auto = "auto"  # inotify where the kernel offers it, polling otherwise
    inotify = "inotify"
    polling = "polling"  # for network filesystems, where inotify misses other hosts' writes


@dataclass
class KeepInferenceSchema:
    """Which inference copies stay once their full checkpoint is gone."""

    all: bool = True
    last: int = 0
    best: int = 0
    every: int = 0


@dataclass
class PressureSchema:
    """When a filesystem counts as filling up, and how much harder sweeps then act."""

    free_below: str = "10%"
    free_target: str = "15%"
    keep_full: int = 1


@dataclass
class ConfigSchema:
    """What OmegaConf validates config.yaml and overrides against: types only, not policy.

    Mutable and list-typed because OmegaConf builds it; core code gets :class:`Settings` instead.
    Every field here must appear, commented, in the bundled config.yaml (a test checks).
    """

    roots: list[str] = field(default_factory=lambda: ["results/checkpoints"])
    patterns: list[str] = field(default_factory=lambda: ["*.pt", "*.pth", "*.ckpt", "*.pth.tar"])
    keep_full: int = 2
    ledger: str = "${" + STATE_DIR_RESOLVER + ":}/ledger.jsonl"
    min_age_seconds: int = 600
    settle_seconds: float = 30.0
    rescan_seconds: float = 600.0
    observer: ObserverKind = ObserverKind.auto
    workers: int = 1
    queue_size: int = 10_000
    nice: int = 10
    classify_memory_limit: int = READER_MEMORY_LIMIT
    keep_best: int = 0
    best_metric: str = "auto"
    best_mode: BestMode = BestMode.auto
    keep_every: int = 0
    rolling_names: list[str] = field(default_factory=lambda: list(DEFAULT_ROLLING_NAMES))
    keep_inference: KeepInferenceSchema = field(default_factory=KeepInferenceSchema)
    ledger_max_bytes: int = 64 * 2**20
    ledger_segments: int = 3
    storm_rescan_seconds: float = 60.0
    max_depth: int = 64
    max_folder_entries: int = 100_000
    scan_cache: bool = True
    metrics_file: str = ""
    pressure: PressureSchema = field(default_factory=PressureSchema)
    undo_seconds: int = 0


@dataclass(frozen=True)
class Settings:
    """The validated configuration core code runs on.

    Constructing one (including through ``dataclasses.replace``) re-checks every policy rule, so
    no unsafe Settings can exist. Seconds are plain numbers; ``ledger`` is absolute.
    """

    roots: tuple[str, ...]
    patterns: tuple[str, ...]
    keep_full: int
    ledger: Path
    min_age_seconds: int
    settle_seconds: float
    rescan_seconds: float
    observer: ObserverKind
    workers: int
    queue_size: int
    nice: int
    classify_memory_limit: int = READER_MEMORY_LIMIT
    keep_best: int = 0
    best_metric: str = "auto"
    best_mode: BestMode = BestMode.auto
    keep_every: int = 0
    rolling_names: tuple[str, ...] = DEFAULT_ROLLING_NAMES
    keep_inference: InferenceRules = field(default_factory=InferenceRules)
    ledger_max_bytes: int = 64 * 2**20
    ledger_segments: int = 3
    storm_rescan_seconds: float = 60.0
    max_depth: int = 64
    max_folder_entries: int = 100_000
    scan_cache: bool = True  # what files hold is kept in <ledger>.scan-cache between runs
    metrics_file: Path | None = None  # the Prometheus textfile; None: none written
    pressure: PressureRules = field(default_factory=PressureRules)
    undo_seconds: int = 0  # demoted checkpoints wait this long in the trash; 0: deleted at once

    def rules(self, *, settle: bool = False, pressure: bool = False) -> Rules:
        """The retention policy these settings describe (``settle``: the daemon's quiet time
        applies; ``pressure``: at the pace of a filesystem under disk pressure)."""
        rules = Rules(
            keep_full=self.keep_full,
            min_age_seconds=self.min_age_seconds,
            keep_best=self.keep_best,
            best_metric=self.best_metric,
            best_mode=self.best_mode,
            keep_every=self.keep_every,
            rolling_names=self.rolling_names,
            keep_inference=self.keep_inference,
            settle_seconds=self.settle_seconds if settle else 0,
        )
        return pressured_rules(rules, self.pressure, self.settle_seconds) if pressure else rules

    def __post_init__(self) -> None:
        if not self.roots:
            raise ConfigError("roots", "no folders to sweep; give at least one")
        for root in self.roots:
            _check_root(root)
        if not self.patterns:
            raise ConfigError("patterns", "no checkpoint file name patterns; give at least one")
        for pattern in self.patterns:
            _check_pattern(pattern)
        # Keeping zero full checkpoints would delete the one a run needs to resume: fail closed.
        _check_at_least("keep_full", self.keep_full, 1)
        _check_at_least("keep_best", self.keep_best, 0)
        _check_at_least("keep_every", self.keep_every, 0)
        _check_is_string("best_metric", self.best_metric)
        if not self.best_metric.strip() or "\0" in self.best_metric:
            raise ConfigError("best_metric", f"{self.best_metric!r} names no metric")
        for pattern in self.rolling_names:
            _check_pattern(pattern, "rolling_names")
        inference = self.keep_inference
        for name in ("last", "best", "every"):
            _check_at_least(f"keep_inference.{name}", getattr(inference, name), 0)
        if inference.all and (inference.last or inference.best or inference.every):
            raise ConfigError(
                "keep_inference",
                "all=true keeps every copy, so last, best and every would do nothing; "
                "set keep_inference.all=false to use them",
            )
        if not inference.all and not (inference.last or inference.best or inference.every):
            # Deleting every copy whose full checkpoint is gone loses those weights for good.
            raise ConfigError(
                "keep_inference",
                "all=false needs at least one of last, best, every above 0",
            )
        if "\0" in str(self.ledger):
            raise ConfigError("ledger", f"{str(self.ledger)!r} contains a NUL byte")
        if not self.ledger.is_absolute():
            raise ConfigError("ledger", f"{str(self.ledger)!r} is not an absolute path")
        # Below a megabyte, compaction would run after every few records.
        _check_at_least("ledger_max_bytes", self.ledger_max_bytes, 2**20)
        _check_at_least("ledger_segments", self.ledger_segments, 0)
        _check_at_least("min_age_seconds", self.min_age_seconds, 0)
        _check_positive_seconds("settle_seconds", self.settle_seconds)
        _check_positive_seconds("rescan_seconds", self.rescan_seconds)
        _check_at_least("workers", self.workers, 1)
        _check_at_least("queue_size", self.queue_size, 1)
        _check_positive_seconds("storm_rescan_seconds", self.storm_rescan_seconds)
        # A walk holds one descriptor per level it is in: stay well inside the usual 1024.
        if not 1 <= self.max_depth <= MAX_DEPTH_LIMIT:
            raise ConfigError("max_depth", f"{self.max_depth} is outside 1..{MAX_DEPTH_LIMIT}")
        _check_at_least("max_folder_entries", self.max_folder_entries, 1)
        if self.metrics_file is not None:
            if not self.metrics_file.is_absolute():
                raise ConfigError(
                    "metrics_file", f"{str(self.metrics_file)!r} is not an absolute path"
                )
            if not self.metrics_file.name.endswith(".prom"):
                # node_exporter's textfile collector reads only *.prom files
                raise ConfigError("metrics_file", f"{str(self.metrics_file)!r} must end in .prom")
        _check_at_least("undo_seconds", self.undo_seconds, 0)
        below, target = self.pressure.free_below, self.pressure.free_target
        if (below.percent is None) == (target.percent is None) and _amount(target) < _amount(below):
            raise ConfigError(
                "pressure.free_target",
                f"{target.text} is below pressure.free_below ({below.text}): "
                "pressure would end before it began",
            )
        # Negative niceness needs privilege and would compete with the training jobs we serve.
        if not 0 <= self.nice <= 19:
            raise ConfigError("nice", f"{self.nice} is outside 0..19")
        # Below a few MiB even a tiny checkpoint could not be read; 0 turns the limit off.
        if self.classify_memory_limit != 0:
            _check_at_least("classify_memory_limit", self.classify_memory_limit, _MIN_MEMORY_LIMIT)


def load_settings(
    config_path: Path | None,
    overrides: Sequence[str] = (),
    *,
    roots: Sequence[str] = (),
) -> Settings:
    """Merge the schema defaults, the YAML file at ``config_path`` and ``key=value`` overrides.

    ``config_path`` None means schema defaults only. ``overrides`` use OmegaConf's dotlist syntax
    (``keep_full=3``, ``roots=[/a,/b]``) and are applied in order. ``roots``, when non-empty,
    replaces the configured roots; they are taken literally, never as OmegaConf syntax.
    Interpolations in sweeper's own config (``${oc.env:...}``) are resolved here.

    Raises ConfigError naming the key (or :data:`FILE_KEY` for a file problem).
    """
    if isinstance(overrides, str) or isinstance(roots, str):
        raise TypeError("overrides and roots must be sequences of strings, not one string")
    _register_resolvers()
    merged = OmegaConf.structured(ConfigSchema)
    if config_path is not None:
        loaded = _read_file(config_path)
        # One key at a time, so that an error OmegaConf reports without a key still names one.
        for key in loaded:
            if not isinstance(key, str):  # "1: x" must fail, not vanish from a masked copy
                raise ConfigError(str(key), "unknown key (keys are names, not numbers or booleans)")
            merged = _merge(merged, OmegaConf.masked_copy(loaded, [key]), key)
    for override in overrides:
        key = _override_key(override)
        merged = _merge(merged, _parse_override(override, key), key)
    schema = _to_schema(merged)
    if not roots:
        return settings_from_schema(schema)
    schema.roots = list(roots)
    try:
        return settings_from_schema(schema)
    except ConfigError as exc:
        if exc.key != "roots":
            raise
        raise ConfigError("roots", f"{exc.reason} (given on the command line)") from exc


def settings_from_schema(schema: ConfigSchema) -> Settings:
    """Check a schema instance's policy and freeze it; relative ``ledger`` is made absolute."""
    if not schema.ledger:
        raise ConfigError("ledger", "an empty path is not a file")
    if "\0" in schema.ledger:
        raise ConfigError("ledger", f"{schema.ledger!r} contains a NUL byte")
    return Settings(
        roots=tuple(schema.roots),
        patterns=tuple(schema.patterns),
        keep_full=schema.keep_full,
        ledger=Path(os.path.abspath(os.path.expanduser(schema.ledger))),
        min_age_seconds=schema.min_age_seconds,
        settle_seconds=schema.settle_seconds,
        rescan_seconds=schema.rescan_seconds,
        observer=schema.observer,
        workers=schema.workers,
        queue_size=schema.queue_size,
        nice=schema.nice,
        classify_memory_limit=schema.classify_memory_limit,
        keep_best=schema.keep_best,
        best_metric=schema.best_metric,
        best_mode=schema.best_mode,
        keep_every=schema.keep_every,
        rolling_names=tuple(schema.rolling_names),
        keep_inference=InferenceRules(
            all=schema.keep_inference.all,
            last=schema.keep_inference.last,
            best=schema.keep_inference.best,
            every=schema.keep_inference.every,
        ),
        ledger_max_bytes=schema.ledger_max_bytes,
        ledger_segments=schema.ledger_segments,
        storm_rescan_seconds=schema.storm_rescan_seconds,
        max_depth=schema.max_depth,
        max_folder_entries=schema.max_folder_entries,
        scan_cache=schema.scan_cache,
        metrics_file=_metrics_path(schema.metrics_file),
        pressure=_pressure(schema.pressure),
        undo_seconds=schema.undo_seconds,
    )


def _pressure(schema: PressureSchema) -> PressureRules:
    # Keeping no full checkpoint under pressure would delete the one a run resumes from.
    _check_at_least("pressure.keep_full", schema.keep_full, 1)
    return PressureRules(
        free_below=_watermark("pressure.free_below", schema.free_below),
        free_target=_watermark("pressure.free_target", schema.free_target),
        keep_full=schema.keep_full,
    )


def _watermark(key: str, text: str) -> Watermark:
    _check_is_string(key, text)
    try:
        return parse_watermark(text)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from exc


def _amount(mark: Watermark) -> float:
    return mark.percent if mark.percent is not None else float(mark.bytes or 0)


def _metrics_path(text: str) -> Path | None:
    if not text:
        return None
    if "\0" in text:
        raise ConfigError("metrics_file", f"{text!r} contains a NUL byte")
    return Path(os.path.abspath(os.path.expanduser(text)))


def default_state_dir() -> str:
    """The folder that holds the ledger unless config says otherwise.

    systemd's ``StateDirectory=`` exports $STATE_DIRECTORY, a colon-separated list when a unit
    names several folders; the first is sweeper's. Outside systemd: $XDG_STATE_HOME/sweeper, else
    ~/.local/state/sweeper. Config uses it as ``${sweeper.state_dir:}``.
    """
    state_directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if state_directory:
        return state_directory
    # The XDG spec says a relative $XDG_STATE_HOME is invalid and must be ignored.
    xdg_state_home = os.environ.get("XDG_STATE_HOME", "")
    if os.path.isabs(xdg_state_home):
        return os.path.join(xdg_state_home, "sweeper")
    home = os.path.expanduser("~")
    if home == "~":
        raise ValueError(
            "no $STATE_DIRECTORY, $XDG_STATE_HOME or home directory; set ledger explicitly"
        )
    return os.path.join(home, ".local", "state", "sweeper")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver(STATE_DIR_RESOLVER):
        OmegaConf.register_resolver(
            STATE_DIR_RESOLVER, default_state_dir, annotation_validation="error"
        )


def _read_file(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except OSError as exc:
        raise ConfigError(FILE_KEY, f"cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(FILE_KEY, f"{path} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(FILE_KEY, f"{path} is not valid YAML: {_one_line(exc)}") from exc
    except OmegaConfBaseException as exc:
        raise ConfigError(FILE_KEY, f"{path}: {_first_line(exc)}") from exc
    if not isinstance(loaded, DictConfig):
        raise ConfigError(FILE_KEY, f"{path} must map keys to values, not hold a list")
    return loaded


def _override_key(override: str) -> str:
    key, equals, _ = override.partition("=")
    if not equals or not key.strip():
        raise ConfigError(override, "an override must look like KEY=VALUE")
    return key


def _parse_override(override: str, key: str) -> DictConfig:
    try:
        return OmegaConf.from_dotlist([override])
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse value in {override!r}: {_one_line(exc)}") from exc
    except OmegaConfBaseException as exc:
        raise _error_from_omegaconf(exc, key) from exc


def _merge(merged: DictConfig, update: DictConfig, key: str) -> DictConfig:
    try:
        result = OmegaConf.merge(merged, update)
    except OmegaConfBaseException as exc:
        raise _error_from_omegaconf(exc, key) from exc
    except TypeError as exc:
        # OmegaConf's "Cannot merge incompatible container types" names no key.
        raise ConfigError(key, f"wrong kind of value ({exc})") from exc
    assert isinstance(result, DictConfig)
    return result


def _to_schema(merged: DictConfig) -> ConfigSchema:
    try:
        schema = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise _error_from_omegaconf(exc, FILE_KEY) from exc
    assert isinstance(schema, ConfigSchema)
    return schema


def _error_from_omegaconf(exc: OmegaConfBaseException, fallback_key: str) -> ConfigError:
    full_key = getattr(exc, "full_key", None)
    key = str(full_key) if full_key else fallback_key
    if isinstance(exc, ConfigKeyError):
        return unknown_key(key)
    return ConfigError(key, _first_line(exc))


def known_keys() -> tuple[str, ...]:
    """Every key config.yaml and ``KEY=VALUE`` take, nested ones dotted
    (``keep_inference.last``), in the schema's order."""
    keys: list[str] = []
    for name, spec in ConfigSchema.__dataclass_fields__.items():
        keys.append(name)
        if spec.type == "KeepInferenceSchema":
            keys += [f"{name}.{inner}" for inner in KeepInferenceSchema.__dataclass_fields__]
        if spec.type == "PressureSchema":
            keys += [f"{name}.{inner}" for inner in PressureSchema.__dataclass_fields__]
    return tuple(keys)


def nearest_keys(key: str) -> list[str]:
    """The known keys a mistyped ``key`` most likely meant (``keep-full`` -> ``keep_full``)."""
    wanted = key.strip().lower().replace("-", "_")
    keys = known_keys()
    exact = [k for k in keys if k == wanted]
    return exact or difflib.get_close_matches(wanted, keys, n=3, cutoff=0.6)


def unknown_key(key: str) -> ConfigError:
    """The error for a key the schema does not have, naming the nearest known keys."""
    nearest = nearest_keys(key)
    hint = f"; did you mean {' or '.join(repr(k) for k in nearest)}?" if nearest else ""
    known = ", ".join(k for k in known_keys() if "." not in k)
    return ConfigError(key, f"unknown key{hint} (known keys: {known})")


def root_exists(root: str) -> bool:
    """Whether ``root`` names something now: a path that exists, or a glob matching a folder."""
    if _GLOB_CHARACTERS.intersection(root):
        return any(os.path.isdir(path) for path in glob.iglob(root))
    return os.path.lexists(root)


def check_given_roots(roots: Sequence[str]) -> None:
    """Roots typed on the command line must exist now (a glob must match something): a typo
    there is a mistake to report, not a run that may appear later, as config roots may be.

    Raises ConfigError naming ``roots``.
    """
    for root in roots:
        if not root_exists(root):
            raise ConfigError("roots", f"{root!r} does not exist (given on the command line)")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return lines[0] if lines and lines[0] else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _check_root(root: str) -> None:
    _check_is_string("roots", root)
    if not root:
        raise ConfigError("roots", "an empty string is not a folder")
    if "\0" in root:
        raise ConfigError("roots", f"{root!r} contains a NUL byte")
    # Judge relative roots by where they land: "." run from / is the whole filesystem too.
    if os.path.isabs(root):
        absolute = root
    else:
        try:
            absolute = os.path.join(os.getcwd(), root)
        except OSError as exc:
            raise ConfigError("roots", f"{root!r} is relative to a missing directory") from exc
    # Split rather than compare with "/": normpath keeps a leading "//", and "/.." is "/".
    components = [part for part in os.path.normpath(absolute).split("/") if part]
    if not components:
        raise ConfigError("roots", f"{root!r} is the whole filesystem ('/')")
    if _GLOB_CHARACTERS.intersection(components[0]):
        raise ConfigError(
            "roots",
            f"{root!r} starts with the glob {'/' + components[0]!r}, "
            "which could cover the whole filesystem",
        )


def _check_pattern(pattern: str, key: str = "patterns") -> None:
    _check_is_string(key, pattern)
    if not pattern:
        raise ConfigError(key, "an empty pattern matches no file")
    if "\0" in pattern:
        raise ConfigError(key, f"{pattern!r} contains a NUL byte")
    if "/" in pattern:
        raise ConfigError(key, f"{pattern!r} contains '/'; patterns match file names only")


def _check_is_string(key: str, value: object) -> None:
    # OmegaConf 2.4 lets a nested list or mapping into a list[str] field.
    if not isinstance(value, str):
        raise ConfigError(key, f"{value!r} is a {type(value).__name__}, not a string")


def _check_at_least(key: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ConfigError(key, f"{value} is below the minimum of {minimum}")


def _check_positive_seconds(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(key, f"{value} is not a positive number of seconds")
