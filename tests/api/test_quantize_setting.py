"""--quantize / PROMPTSWAP_QUANTIZE: opt-in, "none" by default, a bad value or a missing library refused at startup
in one line that names the setting (the quantized engine itself: tests/engine/test_quantize.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.config import Settings, explain
from server.model import quantize
from server.process import startup
from server.process.cli import build_parser


def test_the_default_is_no_quantization(monkeypatch):
    monkeypatch.delenv("PROMPTSWAP_QUANTIZE", raising=False)
    assert Settings().quantize == "none"
    assert Settings(quantize="int8-weight-only").quantize == "int8-weight-only"
    monkeypatch.setenv("PROMPTSWAP_QUANTIZE", "int8-weight-only")
    assert Settings().quantize == "int8-weight-only"


def test_a_bad_value_names_the_setting_and_the_choices():
    with pytest.raises(ValidationError) as caught:
        Settings(quantize="int4")
    assert explain(caught.value) == ("--quantize / PROMPTSWAP_QUANTIZE: Input should be 'none' or 'int8-weight-only', "
                                     "got 'int4'")
    with pytest.raises(ValidationError, match="cannot be combined with --device-map / PROMPTSWAP_DEVICE_MAP"):
        Settings(quantize="int8-weight-only", device_map="auto")


def test_the_flag_offers_its_choices(capsys):
    args = build_parser().parse_args(["serve", "--quantize", "int8-weight-only"])
    assert args.quantize == "int8-weight-only"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "int4"])
    err = capsys.readouterr().err  # argparse quotes the choices or not, by Python version
    assert "argument --quantize: invalid choice: 'int4'" in err and "int8-weight-only" in err


def test_a_bad_environment_value_stops_serve_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSWAP_")} | {"PROMPTSWAP_QUANTIZE": "int4"}
    done = subprocess.run([sys.executable, "-m", "server.process.cli", "serve"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["promptswap serve: invalid settings:",
                                        "--quantize / PROMPTSWAP_QUANTIZE: Input should be 'none' or "
                                        "'int8-weight-only', got 'int4'"]


def test_a_missing_library_is_found_before_the_model_loads(monkeypatch):
    startup.check_quantizer(Settings())  # nothing asked for: nothing needed
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(startup.StartupError) as caught:
        startup.check_quantizer(Settings(quantize="int8-weight-only"))
    assert str(caught.value) == ('--quantize int8-weight-only needs torchao, which is not installed; install the '
                                 'extra: pip install "promptswap[quantize]" (torchao), or leave --quantize unset')
