"""Configuration precedence and errors (SPEC 10.1)."""

import pytest

from mantle.config import load_config, parse_address
from mantle.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "mantle.yaml"
    path.write_text(text)
    return path


def test_defaults_apply_when_nothing_is_configured(tmp_path):
    config = load_config({}, {}, cwd=tmp_path)
    assert config.database_url == "sqlite:///mantle.db"
    assert config.api_address == ":8080"
    assert config.log_level == "info"
    assert config.shutdown_timeout == "30s"
    assert config.plugins_dir == ".mantle/plugins"
    assert config.explicit == frozenset()


def test_flag_beats_environment_beats_file_beats_default(tmp_path):
    write(tmp_path, "database:\n  url: sqlite:///file.db\nlog:\n  level: error\n"
                    "api:\n  address: 127.0.0.1:1\n")
    env = {"MANTLE_DATABASE_URL": "sqlite:///env.db", "MANTLE_LOG_LEVEL": "debug"}
    config = load_config({"database_url": "sqlite:///flag.db"}, env, cwd=tmp_path)
    assert config.database_url == "sqlite:///flag.db"
    assert config.log_level == "debug"
    assert config.api_address == "127.0.0.1:1"
    assert config.shutdown_timeout == "30s"


def test_config_file_named_by_mantle_config_is_read(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("plugins:\n  dir: /opt/plugins\n")
    config = load_config({}, {"MANTLE_CONFIG": str(path)}, cwd=tmp_path)
    assert config.plugins_dir == "/opt/plugins"


def test_missing_named_config_file_is_an_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, cwd=tmp_path, config_path=str(missing))
    assert str(caught.value) == f'cannot read config file "{missing}": No such file or directory'


def test_invalid_config_file_is_an_error(tmp_path):
    path = write(tmp_path, "database: [unclosed\n")
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, cwd=tmp_path)
    assert str(caught.value).startswith(f'cannot read config file "{path}": ')



@pytest.mark.parametrize("text, reason", [
    ('encryption:\n  key: "{key}\nlog:\n  level: info\n',
     "while scanning a quoted scalar (line 2, column 8): found unexpected end of stream "
     "(line 5, column 1)"),
    ("encryption:\n  key: {key}: x\n", "mapping values are not allowed here (line 2, column 72)"),
])
def test_a_config_file_that_is_not_yaml_is_refused_without_quoting_its_lines(tmp_path, text,
                                                                               reason):
    key = "00112233445566778899aabbccddeeff" + "ffeeddccbbaa99887766554433221100"
    path = write(tmp_path, text.format(key=key))
    with pytest.raises(ConfigError) as caught:
        load_config({}, {}, cwd=tmp_path)
    assert str(caught.value) == f'cannot read config file "{path}": {reason}'

def test_unknown_config_keys_log_a_warning(tmp_path, caplog):
    write(tmp_path, "colour: blue\ndatabase:\n  url: sqlite:///x.db\n  pool: 3\n")
    config = load_config({}, {}, cwd=tmp_path)
    assert config.database_url == "sqlite:///x.db"
    keys = [r.key for r in caplog.records if r.getMessage() == "unknown config key"]
    assert keys == ["colour", "database.pool"]


def test_invalid_log_level_is_rejected_with_spec_message(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config({"log_level": "loud"}, {}, cwd=tmp_path)
    assert str(caught.value) == 'invalid log level "loud": must be one of debug, info, warn, error'


@pytest.mark.parametrize("address, expected", [
    (":8080", ("", 8080)), ("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:8080", ("::1", 8080)),
    ("localhost:9000", ("localhost", 9000)),
])
def test_api_address_forms_are_accepted(address, expected):
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["8080", "host:", "host:port", "::1:8080", "h:70000", ""])
def test_invalid_api_address_is_rejected_with_spec_message(address):
    with pytest.raises(ConfigError) as caught:
        parse_address(address)
    assert str(caught.value) == f'invalid API address "{address}": expected host:port'


def test_env_map_combines_file_keys_upper_cased_and_mantle_env_variables(tmp_path):
    write(tmp_path, "env:\n  region: eu\n  tier: gold\n")
    environ = {"MANTLE_ENV_TIER": "silver", "MANTLE_ENV_ZONE": "b", "HOME": "/root"}
    config = load_config({}, environ, cwd=tmp_path)
    assert config.env == {"REGION": "eu", "TIER": "silver", "ZONE": "b"}


def test_shutdown_timeout_must_be_a_duration(tmp_path):
    config = load_config({"shutdown_timeout": "soon"}, {}, cwd=tmp_path)
    with pytest.raises(ConfigError):
        config.shutdown_timeout_seconds
    assert load_config({"shutdown_timeout": "1m30s"}, {}, cwd=tmp_path) \
        .shutdown_timeout_seconds == 90


def test_workers_lease_ttl_and_depth_come_from_flag_environment_or_file(tmp_path):
    write(tmp_path, "server:\n  workers: 3\nengine:\n  lease_ttl: 20s\n"
                    "  max_workflow_depth: 4\n")
    config = load_config({}, {}, cwd=tmp_path)
    assert (config.worker_count, config.lease_ttl_seconds, config.max_depth) == (3, 20.0, 4)
    config = load_config({"workers": "2"}, {"MANTLE_LEASE_TTL": "5s",
                                            "MANTLE_MAX_WORKFLOW_DEPTH": "7"}, cwd=tmp_path)
    assert (config.worker_count, config.lease_ttl_seconds, config.max_depth) == (2, 5.0, 7)
    defaults = load_config({}, {}, cwd=tmp_path / "nowhere")
    assert (defaults.worker_count, defaults.lease_ttl_seconds, defaults.max_depth) == (
        1, 15.0, 10)


@pytest.mark.parametrize("setting, value, message", [
    ("workers", "0", 'invalid workers "0": must be a whole number from 1 to 64'),
    ("workers", "many", 'invalid workers "many": must be a whole number from 1 to 64'),
    # digits to str.isdigit() that int() refuses, and more digits than int() reads
    ("workers", "\u00b2", 'invalid workers "\u00b2": must be a whole number from 1 to 64'),
    ("max_workflow_depth", "1" * 5000, f'invalid max workflow depth "{"1" * 5000}": must be '
                                       "a whole number from 1 to 1000"),
    ("lease_ttl", "1s", 'invalid lease ttl "1s": must be a duration of at least 3s, '
                        "such as 15s"),
    ("max_workflow_depth", "0", 'invalid max workflow depth "0": must be a whole number '
                                "from 1 to 1000"),
])
def test_bad_workers_lease_ttl_or_depth_is_a_config_error(tmp_path, setting, value, message):
    config = load_config({setting: value}, {}, cwd=tmp_path)
    prop = {"workers": "worker_count", "lease_ttl": "lease_ttl_seconds",
            "max_workflow_depth": "max_depth"}[setting]
    with pytest.raises(ConfigError) as caught:
        getattr(config, prop)
    assert str(caught.value) == message


def test_serve_threads_take_ascii_digits_only():
    import argparse

    from mantle.cli.serve import threads_argument

    assert threads_argument("16") == 16
    for text in ("\u00b2", "1" * 5000, "0", "257"):
        with pytest.raises(argparse.ArgumentTypeError) as caught:
            threads_argument(text)
        assert str(caught.value) == f'invalid thread count "{text}": must be 1 to 256'
