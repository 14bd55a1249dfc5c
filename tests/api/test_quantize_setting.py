"""--quantize / PROMPTSWAP_QUANTIZE (with --quantize-group-size and --quantize-compute): opt-in, "none" by default, a
bad value refused at startup in one line that names the setting (the quantized engine itself:
tests/engine/test_quantize.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from server.config import Settings, explain
from server.process.cli import build_parser

CHOICES = "Input should be 'none', 'int8-weight-only', 'int4-weight-only' or 'gguf', got 'int3'"


def test_the_default_is_no_quantization(monkeypatch):
    monkeypatch.delenv("PROMPTSWAP_QUANTIZE", raising=False)
    assert Settings().quantize == "none"
    assert Settings(quantize="int8-weight-only").quantize == "int8-weight-only"
    monkeypatch.setenv("PROMPTSWAP_QUANTIZE", "int8-weight-only")
    assert Settings().quantize == "int8-weight-only"
    assert (Settings().quantize_group_size, Settings().quantize_compute) == (32, "served")
    monkeypatch.setenv("PROMPTSWAP_QUANTIZE_GROUP_SIZE", "64")
    assert Settings(quantize_compute="bfloat16").quantize_group_size == 64


def test_a_bad_value_names_the_setting_and_the_choices():
    with pytest.raises(ValidationError) as caught:
        Settings(quantize="int3")
    assert explain(caught.value) == f"--quantize / PROMPTSWAP_QUANTIZE: {CHOICES}"
    with pytest.raises(ValidationError) as caught:
        Settings(quantize_group_size=48)
    assert explain(caught.value) == ("--quantize-group-size / PROMPTSWAP_QUANTIZE_GROUP_SIZE: must be one of 32, 64, "
                                     "128, 256, got 48")
    with pytest.raises(ValidationError, match="cannot be combined with --device-map / PROMPTSWAP_DEVICE_MAP"):
        Settings(quantize="int8-weight-only", device_map="auto")


def test_the_flag_offers_its_choices(capsys):
    args = build_parser().parse_args(["serve", "--quantize", "gguf", "--quantize-group-size", "64",
                                      "--quantize-compute", "bfloat16"])
    assert (args.quantize, args.quantize_group_size, args.quantize_compute) == ("gguf", 64, "bfloat16")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--quantize", "int3"])
    err = capsys.readouterr().err  # argparse quotes the choices or not, by Python version
    assert "argument --quantize: invalid choice: 'int3'" in err and "int4-weight-only" in err


def test_a_bad_environment_value_stops_serve_in_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTSWAP_")} | {"PROMPTSWAP_QUANTIZE": "int3"}
    done = subprocess.run([sys.executable, "-m", "server.process.cli", "serve"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["promptswap serve: invalid settings:",
                                        f"--quantize / PROMPTSWAP_QUANTIZE: {CHOICES}"]
