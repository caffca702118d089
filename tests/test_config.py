from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from sweeper.config import (
    FILE_KEY,
    ConfigSchema,
    ObserverKind,
    Settings,
    load_settings,
)
from sweeper.errors import ConfigError

BUNDLED_CONFIG = Path(__file__).resolve().parent.parent / "config.yaml"
SCHEMA_KEYS = [field.name for field in dataclasses.fields(ConfigSchema)]


@pytest.fixture(autouse=True)
def plain_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No systemd, no XDG, a home of our own, and a working directory that is not /."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return home


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweeper.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults(plain_environment: Path) -> None:
    assert load_settings(None) == Settings(
        roots=("results/checkpoints",),
        patterns=("*.pt", "*.pth", "*.ckpt", "*.pth.tar"),
        keep_full=2,
        ledger=plain_environment / ".local" / "state" / "sweeper" / "ledger.jsonl",
        min_age_seconds=600,
        settle_seconds=30.0,
        rescan_seconds=600.0,
        observer=ObserverKind.auto,
        workers=1,
        queue_size=10_000,
        nice=10,
    )


def test_settings_and_schema_have_the_same_keys() -> None:
    assert [field.name for field in dataclasses.fields(Settings)] == SCHEMA_KEYS


def test_settings_are_frozen_and_hold_tuples() -> None:
    settings = load_settings(None, ["roots=[/a,/b]"])
    assert settings.roots == ("/a", "/b")
    assert isinstance(settings.patterns, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.keep_full = 5  # type: ignore[misc]


def test_replace_revalidates() -> None:
    with pytest.raises(ConfigError, match="keep_full"):
        dataclasses.replace(load_settings(None), keep_full=0)


def test_bundled_config_loads_to_the_schema_defaults() -> None:
    assert load_settings(BUNDLED_CONFIG) == load_settings(None)


def test_bundled_config_documents_every_key() -> None:
    lines = BUNDLED_CONFIG.read_text(encoding="utf-8").splitlines()
    assert sorted(yaml.safe_load("\n".join(lines))) == sorted(SCHEMA_KEYS)
    for key in SCHEMA_KEYS:
        (index,) = [i for i, line in enumerate(lines) if re.match(rf"{key}:", line)]
        assert index > 0 and lines[index - 1].startswith("# "), f"{key} has no comment above it"


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("keep_full=3", "keep_full", 3),
        ('keep_full="4"', "keep_full", 4),
        ("roots=[/a,/b]", "roots", ("/a", "/b")),
        ("roots=[/data/*/*/results/checkpoints]", "roots", ("/data/*/*/results/checkpoints",)),
        ("patterns=['*.bin',model_*.pt]", "patterns", ("*.bin", "model_*.pt")),
        ("min_age_seconds=0", "min_age_seconds", 0),
        ("settle_seconds=0.5", "settle_seconds", 0.5),
        ("rescan_seconds=60", "rescan_seconds", 60.0),
        ("observer=polling", "observer", ObserverKind.polling),
        ("observer=inotify", "observer", ObserverKind.inotify),
        ("workers=4", "workers", 4),
        ("queue_size=1", "queue_size", 1),
        ("storm_rescan_seconds=5", "storm_rescan_seconds", 5.0),
        ("max_depth=256", "max_depth", 256),
        ("max_folder_entries=10", "max_folder_entries", 10),
        ("nice=0", "nice", 0),
        ("nice=19", "nice", 19),
        ("classify_memory_limit=0", "classify_memory_limit", 0),
        ("classify_memory_limit=16777216", "classify_memory_limit", 16 * 1024**2),
        ("ledger=/srv/sweeper/ledger.jsonl", "ledger", Path("/srv/sweeper/ledger.jsonl")),
        ("undo_seconds=86400", "undo_seconds", 86400),
    ],
)
def test_override(override: str, key: str, expected: object) -> None:
    assert getattr(load_settings(None, [override]), key) == expected


def test_later_override_wins_and_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, "keep_full: 5\nworkers: 3\n")
    settings = load_settings(path, ["keep_full=6", "keep_full=7"])
    assert (settings.keep_full, settings.workers) == (7, 3)


def test_file_values_and_env_interpolation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SWEEPER_TEST_DATA", "/data")
    path = write_config(
        tmp_path,
        "roots: ['${oc.env:SWEEPER_TEST_DATA}/*/results/checkpoints']\nobserver: polling\n",
    )
    settings = load_settings(path)
    assert settings.roots == ("/data/*/results/checkpoints",)
    assert settings.observer is ObserverKind.polling


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, "nice: 5\n"))
    assert dataclasses.replace(settings, nice=10) == load_settings(None)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(write_config(tmp_path, "")) == load_settings(None)


def test_cli_roots_replace_config_roots(tmp_path: Path) -> None:
    path = write_config(tmp_path, "roots: [/from/file]\n")
    settings = load_settings(path, ["roots=[/from/override]"], roots=["/cli/a", "/cli/b"])
    assert settings.roots == ("/cli/a", "/cli/b")


def test_cli_roots_are_taken_literally() -> None:
    assert load_settings(None, roots=["/data/${oc.env:HOME}"]).roots == ("/data/${oc.env:HOME}",)


@pytest.mark.parametrize(
    "root",
    ["/data/*/*/results/checkpoints", "/home", "results/checkpoints", "*/checkpoints", "./x"],
)
def test_accepted_roots(root: str) -> None:
    assert load_settings(None, roots=[root]).roots == (root,)


@pytest.mark.parametrize(
    "root",
    ["/", "//", "///", "/./", "/..", "/data/../..", "", "/data\0x", "/*", "/*/checkpoints",
     "/[a-z]*/x", "/?/x", "/data/../*/x"],
)  # fmt: skip
def test_refused_cli_roots(root: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, roots=[root])
    assert caught.value.key == "roots"
    assert "'roots'" in str(caught.value)
    assert "command line" in str(caught.value)


@pytest.mark.parametrize("root", [".", "..", "*", "*/checkpoints"])
def test_relative_roots_are_judged_from_the_working_directory(
    root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")
    with pytest.raises(ConfigError, match="'roots'"):
        load_settings(None, roots=[root])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["roots=[]"], "roots"),
        (["roots=[/]"], "roots"),
        (["roots=[/a,//]"], "roots"),
        (["roots=['']"], "roots"),
        (["patterns=[]"], "patterns"),
        (["patterns=[a/*.pt]"], "patterns"),
        (["patterns=['']"], "patterns"),
        (["keep_full=0"], "keep_full"),
        (["keep_full=-1"], "keep_full"),
        (["ledger=''"], "ledger"),
        (["min_age_seconds=-1"], "min_age_seconds"),
        (["settle_seconds=0"], "settle_seconds"),
        (["settle_seconds=-1"], "settle_seconds"),
        (["settle_seconds=nan"], "settle_seconds"),
        (["rescan_seconds=0"], "rescan_seconds"),
        (["rescan_seconds=inf"], "rescan_seconds"),
        (["workers=0"], "workers"),
        (["queue_size=0"], "queue_size"),
        (["storm_rescan_seconds=0"], "storm_rescan_seconds"),
        (["max_depth=0"], "max_depth"),
        (["max_depth=257"], "max_depth"),  # a walk holds a descriptor per level
        (["max_folder_entries=0"], "max_folder_entries"),
        (["nice=-1"], "nice"),
        (["nice=20"], "nice"),
        (["classify_memory_limit=16777215"], "classify_memory_limit"),
        (["classify_memory_limit=-1"], "classify_memory_limit"),
        (["keep_best=-1"], "keep_best"),
        (["keep_every=-2"], "keep_every"),
        (["best_metric=' '"], "best_metric"),
        (["best_mode=median"], "best_mode"),
        (["rolling_names=[a/b]"], "rolling_names"),
        (["rolling_names=['']"], "rolling_names"),
        (["keep_inference.last=-1", "keep_inference.all=false"], "keep_inference.last"),
        (["keep_inference.all=false"], "keep_inference"),  # would delete every orphan copy
        (["keep_inference.last=3"], "keep_inference"),  # all=true: silently nothing
        (["keep_inference.some=3"], "keep_inference.some"),
        (["pressure.keep_full=0"], "pressure.keep_full"),  # the newest checkpoint stays
        (["pressure.free_below=0%"], "pressure.free_below"),
        (["pressure.free_below=ten"], "pressure.free_below"),
        (["pressure.free_target=100%"], "pressure.free_target"),
        (["pressure.free_target=5%"], "pressure.free_target"),  # below free_below's 10%
        (["pressure.free_below=2GiB", "pressure.free_target=1GiB"], "pressure.free_target"),
        (["pressure.free_target=[1]"], "pressure.free_target"),
        (["pressure.high=3"], "pressure.high"),
        (["undo_seconds=-1"], "undo_seconds"),
    ],
)
def test_unsafe_policy_is_refused(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, overrides)
    assert caught.value.key == key
    assert repr(key) in str(caught.value)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("keep_full=abc", "keep_full"),
        ("keep_full=1.5", "keep_full"),
        ("keep_full=true", "keep_full"),
        ("keep_full=null", "keep_full"),
        ("keep_full=[1]", "keep_full"),
        ("keep_full.x=1", "keep_full"),
        ("min_age_seconds=1.5", "min_age_seconds"),
        ("settle_seconds=soon", "settle_seconds"),
        ("settle_seconds=true", "settle_seconds"),
        ("roots=/a", "roots"),
        ("roots=null", "roots"),
        ("roots={a: 1}", "roots"),
        ("roots.0=/a", "roots.0"),
        ("roots=[[/a]]", "roots"),
        ("patterns=[*.pt]", "patterns"),  # YAML reads a leading * as an alias: quote it
        ("roots=[/a", "roots"),
        ("patterns=*.pt", "patterns"),
        ("observer=bogus", "observer"),
        ("observer=POLLING", "observer"),
        ("workers=two", "workers"),
        ("nice=${oc.env:SWEEPER_TEST_UNSET}", "nice"),
        ("ledger=${nope}", "ledger"),
        ("ledger=${oc.env:X", "ledger"),
        ("no_such_key=1", "no_such_key"),
        ("no.such=1", "no"),
        ("keep_full", "keep_full"),
        ("=3", "=3"),
    ],
)
def test_bad_override_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(None, [override])
    assert caught.value.key == key
    assert repr(key) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_override_key_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'keep'.*unknown key.*keep_full"):
        load_settings(None, ["keep=3"])


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("keep_fulll: 3\n", "keep_fulll"),
        ("1: x\n", "1"),
        ("true: x\n", "True"),
        ("null: x\n", FILE_KEY),
        ("daemon:\n  workers: 2\n", "daemon"),
        ("keep_full: abc\n", "keep_full"),
        ("keep_full: 0\n", "keep_full"),
        ("roots: /data\n", "roots"),
        ("roots: {a: 1}\n", "roots"),
        ("roots: []\n", "roots"),
        ("roots: ['/']\n", "roots"),
        ("roots: [[/a]]\n", "roots"),
        ("observer: fast\n", "observer"),
        ("ledger: ${oc.env:SWEEPER_TEST_UNSET}/l.jsonl\n", "ledger"),
        ("- keep_full\n", FILE_KEY),
        ("keep_full: [\n", FILE_KEY),
        ("keep_full: 2\nkeep_full: 3\n", FILE_KEY),
        ("keep_full: !!python/object:os.system x\n", FILE_KEY),
    ],
)
def test_bad_file_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, text))
    assert caught.value.key == key
    assert repr(key) in str(caught.value)
    assert "\n" not in str(caught.value)


def test_file_errors_name_the_path(tmp_path: Path) -> None:
    for path in [tmp_path / "missing.yaml", tmp_path, write_config(tmp_path, "a: [\n")]:
        with pytest.raises(ConfigError) as caught:
            load_settings(path)
        assert caught.value.key == FILE_KEY
        assert str(path) in caught.value.reason


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match=re.escape(FILE_KEY)):
        load_settings(path)


def test_ledger_prefers_systemd_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/sweeper")
    monkeypatch.setenv("XDG_STATE_HOME", "/xdg")
    assert load_settings(None).ledger == Path("/var/lib/sweeper/ledger.jsonl")


def test_ledger_takes_the_first_of_several_state_directories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/sweeper:/var/lib/other")
    assert load_settings(BUNDLED_CONFIG).ledger == Path("/var/lib/sweeper/ledger.jsonl")


@pytest.mark.parametrize(
    ("state_directory", "xdg_state_home", "expected"),
    [
        ("", "/xdg", "/xdg/sweeper/ledger.jsonl"),
        (None, "/xdg", "/xdg/sweeper/ledger.jsonl"),
        (None, "relative/xdg", "HOME/.local/state/sweeper/ledger.jsonl"),
        (None, "", "HOME/.local/state/sweeper/ledger.jsonl"),
    ],
)
def test_ledger_outside_systemd(
    monkeypatch: pytest.MonkeyPatch,
    plain_environment: Path,
    state_directory: str | None,
    xdg_state_home: str,
    expected: str,
) -> None:
    if state_directory is not None:
        monkeypatch.setenv("STATE_DIRECTORY", state_directory)
    monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)
    expected_path = Path(expected.replace("HOME", str(plain_environment)))
    assert load_settings(None).ledger == expected_path


def test_ledger_is_resolved_against_cwd_and_home(plain_environment: Path) -> None:
    assert load_settings(None, ["ledger=state/l.jsonl"]).ledger == Path.cwd() / "state/l.jsonl"
    assert load_settings(None, ["ledger=~/l.jsonl"]).ledger == plain_environment / "l.jsonl"
    assert load_settings(None, ["ledger=/a/../b/l.jsonl"]).ledger == Path("/b/l.jsonl")


def test_overrides_must_be_a_sequence_not_a_string() -> None:
    with pytest.raises(TypeError):
        load_settings(None, "keep_full=3")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], ("10%", "15%", 1)),
        (["pressure.free_below=5%", "pressure.free_target=7.5%"], ("5%", "7.5%", 1)),
        (["pressure.free_below=50GiB", "pressure.free_target=80GiB"], ("50GiB", "80GiB", 1)),
        (["pressure.free_below=1073741824"], ("1073741824", "15%", 1)),  # kinds may mix
        (["pressure.keep_full=2"], ("10%", "15%", 2)),
    ],
)
def test_pressure_settings(overrides: list[str], expected: tuple[str, str, int]) -> None:
    pressure = load_settings(None, overrides).pressure
    assert (pressure.free_below.text, pressure.free_target.text, pressure.keep_full) == expected


def test_pressure_rules_lower_the_pace() -> None:
    settings = load_settings(None, ["keep_full=3", "min_age_seconds=600", "settle_seconds=20"])
    harder = settings.rules(pressure=True)
    assert (harder.keep_full, harder.min_age_seconds) == (1, 20)
    assert dataclasses.replace(harder, keep_full=3, min_age_seconds=600) == settings.rules()
