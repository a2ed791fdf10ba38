from __future__ import annotations

from pathlib import Path

import pytest

from cohortflow.models.errors import ConfigurationError
from cohortflow.models.settings import load_settings


def test_defaults_live_under_one_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "data"))
    s = load_settings()
    assert s.home == tmp_path / "data"
    assert s.archive == tmp_path / "data" / "archive"
    assert s.cache == tmp_path / "data" / "cache"
    assert s.index_url == f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}"
    assert s.pseudonym_key_source == f"file:{tmp_path / 'data' / 'secrets' / 'project.key'}"
    assert s.orthanc.host == "127.0.0.1"


def test_config_file_then_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("home: /srv/cf\northanc:\n  dicom_port: 11112\nworkers: 3\n")
    monkeypatch.setenv("COHORTFLOW_CONFIG", str(cfg))
    monkeypatch.delenv("COHORTFLOW_HOME", raising=False)
    s = load_settings()
    assert s.home == Path("/srv/cf") and s.orthanc.dicom_port == 11112 and s.worker_count == 3
    monkeypatch.setenv("COHORTFLOW_ORTHANC__DICOM_PORT", "4343")
    monkeypatch.setenv("COHORTFLOW_INDEX_URL", "postgresql://db/cf")
    s = load_settings()
    assert s.orthanc.dicom_port == 4343  # the environment beats the file
    assert s.index_url == "postgresql://db/cf"
    assert s.archive == Path("/srv/cf/archive")


def test_home_config_file_is_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("COHORTFLOW_CONFIG", raising=False)
    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path))
    (tmp_path / "cohortflow.yaml").write_text("local_aet: MYAET\n")
    assert load_settings().local_aet == "MYAET"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("orthanc:\n  dicom_port: 99999\n", "orthanc.dicom_port"),
        ("no_such_setting: 1\n", "no_such_setting"),
        ("pseudonym_key_source: plain-secret\n", "file:PATH"),
        ("- a list\n", "mapping"),
        ("home: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_names_file_and_field(
    tmp_path: Path, text: str, needle: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COHORTFLOW_HOME", raising=False)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigurationError) as err:
        load_settings(cfg)
    assert needle in str(err.value)
    assert str(cfg) in str(err.value)
