"""Settings fail closed (issue 9 item 6): empty secrets, unknown variables, no secret in reprs,
clear errors instead of tracebacks. Each of these passed silently (or leaked) on the old main."""

from __future__ import annotations

from pathlib import Path

import pytest
from netkv_agent.settings import load_agent_settings
from netkv_oracle.settings import OracleSettings
from netkv_scheduler.settings import SchedulerSettings

from netkv.cli import main
from netkv.config import RedisSettings, load_settings
from netkv.errors import InputError

pytestmark = [pytest.mark.unit, pytest.mark.security]


def test_an_empty_token_from_the_environment_is_an_error_like_in_the_file(
        tmp_path: Path) -> None:
    with pytest.raises(InputError) as env:
        load_settings(SchedulerSettings, "scheduler", None, {"NETKV_TOKEN": ""})
    assert env.value.where == "NETKV_TOKEN" and "empty" in env.value.message
    cfg = tmp_path / "netkv.yaml"
    cfg.write_text("scheduler: {token: ''}\n")
    with pytest.raises(InputError, match=r"netkv\.yaml: scheduler\.token: must not be empty"):
        load_settings(SchedulerSettings, "scheduler", cfg, {})
    with pytest.raises(InputError) as nested:
        load_settings(OracleSettings, "oracle", None, {"NETKV_REDIS__PASSWORD": ""})
    assert nested.value.where == "NETKV_REDIS__PASSWORD"


@pytest.mark.parametrize("name", ["NETKV_TOKNE", "NETKV_REDIS__PASWORD", "NETKV_MQTT_PORT"])
def test_an_unknown_netkv_variable_is_an_error_naming_it(name: str) -> None:
    with pytest.raises(InputError) as info:
        load_settings(SchedulerSettings, "scheduler", None, {name: "x"})
    assert info.value.where == name and "unknown setting" in info.value.message
    with pytest.raises(InputError) as agent:
        load_agent_settings(None, {name: "x"})
    assert agent.value.where == name


def test_variables_of_scripts_and_other_programs_pass() -> None:
    s = load_settings(SchedulerSettings, "scheduler", None,
                      {"NETKV_TRACE": "/tmp/t.jsonl", "PATH": "/bin", "NETKV_PORT": "9000"})
    assert s.port == 9000


def test_secrets_never_show_in_reprs() -> None:
    s = load_settings(SchedulerSettings, "scheduler", None,
                      {"NETKV_TOKEN": "tok-s3cret", "NETKV_REDIS__PASSWORD": "pw-s3cret",
                       "NETKV_MQTT__PASSWORD": "mq-s3cret"})
    for text in (repr(s), str(s), repr(s.redis), repr(s.model_dump()), f"{s}"):
        assert "s3cret" not in text
    assert s.token is not None and s.token.get_secret_value() == "tok-s3cret"
    assert "pw-s3cret" not in repr(RedisSettings(password="pw-s3cret"))


def test_a_bad_model_is_named_once() -> None:
    """The old layer reported ``scheduler.scheduler.model``."""
    with pytest.raises(InputError) as info:
        load_settings(SchedulerSettings, "scheduler", None, {"NETKV_MODEL": "gpt-9"})
    assert info.value.where == "NETKV_MODEL"
    with pytest.raises(InputError) as direct:
        SchedulerSettings(model="gpt-9")
    assert direct.value.where == "model"


def test_settings_are_frozen() -> None:
    s = SchedulerSettings()
    with pytest.raises(ValueError, match="frozen"):
        s.port = 1  # type: ignore[misc]


def test_a_loud_log_level_is_a_clear_error_not_a_traceback(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["scheduler"], environ=lambda: {"NETKV_LOG_LEVEL": "loud"})
    err = capsys.readouterr().err
    assert code == 2
    assert "NETKV_LOG_LEVEL" in err and "Traceback" not in err
    assert "'debug', 'info', 'warning' or 'error'" in err
