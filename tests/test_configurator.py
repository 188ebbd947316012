"""Tests for configurator.py: parsing, type checks, flags, config files, --help and CLI errors."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configurator import ConfigError, configure  # noqa: E402

# A stage script as train.py would write it: commented settings, then the configure() call.
SETTINGS = '''
import sys
from pathlib import Path
from configurator import configure, exit_on_error

FORMAT_VERSION = 3
dataset = 'gutenberg'   # gutenberg | pg19 | path to a folder
block_size = 2048       # tokens per window
learning_rate = 3e-4    # peak learning rate
compile = False         # compile the model with torch.compile
memory_loss = 'dino'    # auxiliary loss kind
memory_layer = 6        # hidden-state index, or a list of them
lengths = [256, 512]    # haystack lengths in tokens
betas = (0.9, 0.95)     # AdamW betas
max_docs = None         # documents per split, None = all
no_warmup = False       # a real setting whose name starts with no_
_scratch = 7            # private: not a setting
out_path = Path('out')  # a Path: not a setting
'''

MAIN = '''
with exit_on_error():
    config = configure(globals(), sys.argv[1:], types={'memory_layer': (int, list)})
    print(repr(config))
late_name = 1           # assigned after the call: not a setting
'''


@pytest.fixture
def script(tmp_path):
    """Write the stage script to a file and return (path, globals as they are when configure() runs)."""
    path = tmp_path / "stage.py"
    path.write_text(SETTINGS + MAIN)
    scope = {"__file__": str(path), "__name__": "stage"}
    sys.path.insert(0, str(ROOT))
    exec(compile(SETTINGS, str(path), "exec"), scope)
    return path, scope


def run(scope, *argv):
    return configure(scope, list(argv), types={"memory_layer": (int, list)})


def run_script(path, *argv):
    return subprocess.run([sys.executable, str(path), *argv], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


# -----------------------------------------------------------------------------
# which globals are settings

def test_settings_only_config_globals(script):
    _, scope = script
    config = run(scope)
    assert list(config) == ["dataset", "block_size", "learning_rate", "compile", "memory_loss", "memory_layer",
                            "lengths", "betas", "max_docs", "no_warmup"]
    assert config["learning_rate"] == 3e-4


def test_settings_update_scope(script):
    _, scope = script
    run(scope, "--block_size=4096")
    assert scope["block_size"] == 4096


# -----------------------------------------------------------------------------
# types

@pytest.mark.parametrize("arg, key, expected", [
    ("--block_size=4096", "block_size", 4096),
    ("--block_size=4_096", "block_size", 4096),
    ("--learning_rate=1e-3", "learning_rate", 1e-3),
    ("--learning_rate=1", "learning_rate", 1.0),
    ("--compile=True", "compile", True),
    ("--compile=false", "compile", False),
    ("--dataset=pg19", "dataset", "pg19"),
    ("--dataset='pg19'", "dataset", "pg19"),
    ("--dataset=123", "dataset", "123"),
    ("--dataset=data/my books", "dataset", "data/my books"),
    ("--max_docs=10", "max_docs", 10),
    ("--max_docs=abc", "max_docs", "abc"),
    ("--memory_layer=11", "memory_layer", 11),
    ("--memory_layer=5,11", "memory_layer", [5, 11]),
    ("--memory_layer=[5, 11]", "memory_layer", [5, 11]),
    ("--lengths=128,1024,4096", "lengths", [128, 1024, 4096]),
    ("--lengths=128", "lengths", [128]),
    ("--lengths=[64]", "lengths", [64]),
    ("--lengths=", "lengths", []),
    ("--betas=0.8,0.99", "betas", (0.8, 0.99)),
    ("--betas=0.8,1", "betas", (0.8, 1)),
])
def test_value_parsed_to_type(script, arg, key, expected):
    _, scope = script
    value = run(scope, arg)[key]
    assert value == expected
    assert type(value) is type(expected)


def test_float_setting_converts_int(script):
    _, scope = script
    assert isinstance(run(scope, "--learning_rate=1")["learning_rate"], float)


@pytest.mark.parametrize("arg, words", [
    ("--block_size=2.5", ["block_size", "2.5", "int"]),
    ("--block_size=big", ["block_size", "'big'", "int"]),
    ("--block_size=True", ["block_size", "True", "int"]),
    ("--compile=1", ["compile", "1", "bool"]),
    ("--learning_rate=fast", ["learning_rate", "'fast'", "float"]),
    ("--lengths=128,1.5", ["lengths", "1.5", "list of int"]),
    ("--memory_layer=x", ["memory_layer", "'x'", "list of int"]),
    ("--memory_layer=2.5", ["memory_layer", "2.5", "int"]),
])
def test_invalid_type_rejected(script, arg, words):
    _, scope = script
    with pytest.raises(ConfigError) as err:
        run(scope, arg)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_types_for_unknown_key_rejected(script):
    _, scope = script
    with pytest.raises(ConfigError, match="memory_layers"):
        configure(scope, [], types={"memory_layers": (int, list)})


# -----------------------------------------------------------------------------
# keys and flags

def test_unknown_key_suggests_closest(script):
    _, scope = script
    with pytest.raises(ConfigError) as err:
        run(scope, "--block_sise=1024")
    message = str(err.value)
    assert "--block_sise" in message
    assert "did you mean --block_size?" in message
    assert "--help" in message


def test_unknown_key_without_match(script):
    _, scope = script
    with pytest.raises(ConfigError) as err:
        run(scope, "--zzzzzz=1")
    assert "did you mean" not in str(err.value)
    assert "--zzzzzz" in str(err.value)


def test_dash_form_equals_underscore(script):
    _, scope = script
    assert run(scope, "--memory-layer=6")["memory_layer"] == 6
    assert run(scope, "--block-size=512")["block_size"] == 512


@pytest.mark.parametrize("flag", ["--compile", "--compile=True"])
def test_bare_flag_sets_true(script, flag):
    _, scope = script
    assert run(scope, flag)["compile"] is True


@pytest.mark.parametrize("flag", ["--no_compile", "--no-compile"])
def test_no_flag_sets_false(script, flag):
    _, scope = script
    assert run(scope, "--compile", flag)["compile"] is False


@pytest.mark.parametrize("flag", ["--no_memory_loss", "--no-memory-loss"])
def test_no_flag_on_string_sets_none(script, flag):
    _, scope = script
    assert run(scope, flag)["memory_loss"] is None


def test_no_flag_on_list_sets_none(script):
    _, scope = script
    assert run(scope, "--no_lengths")["lengths"] is None


def test_setting_named_no_prefix_wins(script):
    _, scope = script
    config = run(scope, "--no_warmup")
    assert config["no_warmup"] is True


def test_no_flag_with_value_rejected(script):
    _, scope = script
    with pytest.raises(ConfigError, match="--no_compile takes no value"):
        run(scope, "--no_compile=1")


def test_bare_flag_on_non_bool_rejected(script):
    _, scope = script
    with pytest.raises(ConfigError, match="--block_size needs a value"):
        run(scope, "--block_size")


def test_later_argument_wins(script):
    _, scope = script
    assert run(scope, "--block_size=1", "--block_size=2")["block_size"] == 2


@pytest.mark.parametrize("arg", ["foo", "-x", "config.txt"])
def test_stray_argument_rejected(script, arg):
    _, scope = script
    with pytest.raises(ConfigError, match="argument"):
        run(scope, arg)


# -----------------------------------------------------------------------------
# config files

def write_config(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_config_file_then_override(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "small.py", """
        import math
        _base = 256
        block_size = _base * 4   # arithmetic is allowed
        learning_rate = 1e-3
        dataset = 'pg19'
    """)
    config = run(scope, config_file, "--block_size=512")
    assert config["block_size"] == 512
    assert config["learning_rate"] == 1e-3
    assert config["dataset"] == "pg19"


def test_override_then_config_file(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "small.py", "block_size = 1024\n")
    assert run(scope, "--block_size=512", config_file)["block_size"] == 1024


def test_config_file_sees_earlier_values(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "double.py", "block_size = block_size * 2\n")
    assert run(scope, "--block_size=300", config_file)["block_size"] == 600


def test_two_config_files_in_order(script, tmp_path):
    _, scope = script
    first = write_config(tmp_path, "a.py", "block_size = 1\nlearning_rate = 0.5\n")
    second = write_config(tmp_path, "b.py", "block_size = 2\n")
    config = run(scope, first, second)
    assert config["block_size"] == 2
    assert config["learning_rate"] == 0.5


def test_config_file_unknown_key(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "typo.py", "learning_rat = 1e-3\n")
    with pytest.raises(ConfigError) as err:
        run(scope, config_file)
    assert "typo.py" in str(err.value)
    assert "--learning_rate" in str(err.value)


def test_config_file_type_checked(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "bad.py", "block_size = '2k'\n")
    with pytest.raises(ConfigError, match="block_size"):
        run(scope, config_file)


def test_config_file_missing(script, tmp_path):
    _, scope = script
    with pytest.raises(ConfigError, match="config file not found"):
        run(scope, str(tmp_path / "missing.py"))


def test_config_file_error_is_one_line(script, tmp_path):
    _, scope = script
    config_file = write_config(tmp_path, "broken.py", "block_size = 1 +\n")
    with pytest.raises(ConfigError) as err:
        run(scope, config_file)
    assert "broken.py" in str(err.value)
    assert "SyntaxError" in str(err.value)


# -----------------------------------------------------------------------------
# --help and the command line

def test_help_lists_keys_defaults_comments(script):
    path, _ = script
    result = run_script(path, "--help")
    assert result.returncode == 0
    out = result.stdout
    assert "usage: python stage.py" in out
    for option, comment in [("--dataset='gutenberg'", "gutenberg | pg19 | path to a folder"),
                            ("--block_size=2048", "tokens per window"),
                            ("--learning_rate=0.0003", "peak learning rate"),
                            ("--lengths=[256, 512]", "haystack lengths in tokens"),
                            ("--max_docs=None", "documents per split, None = all")]:
        line = next((l for l in out.splitlines() if l.strip().startswith(option + " ")), None)
        assert line is not None, f"{option} missing from --help"
        assert line.rstrip().endswith(comment)
    for hidden in ("FORMAT_VERSION", "_scratch", "out_path", "late_name"):
        assert hidden not in out


def test_help_in_process_exits_zero(script, capsys):
    _, scope = script
    with pytest.raises(SystemExit) as exit_info:
        run(scope, "-h")
    assert exit_info.value.code == 0
    assert "--block_size=2048" in capsys.readouterr().out


def test_cli_applies_overrides(script):
    path, _ = script
    result = run_script(path, "--block-size=4096", "--no_memory_loss", "--memory_layer=5,11")
    assert result.returncode == 0, result.stderr
    config = eval(result.stdout)  # the script prints repr(dict) of literals
    assert config["block_size"] == 4096
    assert config["memory_loss"] is None
    assert config["memory_layer"] == [5, 11]
    assert "late_name" not in config


def test_cli_error_one_line_exit_two(script):
    path, _ = script
    result = run_script(path, "--block_sise=3")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("error: unknown setting --block_sise")
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
