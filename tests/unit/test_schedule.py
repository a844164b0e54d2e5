"""The pooling schedule parser: list form, the original release's '{layer: width}' form, and its errors."""

import pytest

from pyramidion_ds.config import ConfigError, ModelConfig, default_schedule, parse_pooling_schedule


def test_list_form():
    assert parse_pooling_schedule([8192, 4096, 2048, 1024, 512, 256], 6, 8192) == [8192, 4096, 2048, 1024, 512, 256]


def test_release_string_form_keeps_previous_width():
    assert parse_pooling_schedule("{0: 2048, 1: 512}", 6, 8192) == [2048, 512, 512, 512, 512, 512]
    assert parse_pooling_schedule("{2: 1024, 4: 256}", 6, 8192) == [8192, 8192, 1024, 1024, 256, 256]
    assert parse_pooling_schedule("{ }", 3, 100) == [100, 100, 100]


def test_mapping_form_from_yaml():
    assert parse_pooling_schedule({0: 2048, "1": 512}, 3, 8192) == [2048, 512, 512]


def test_string_is_never_evaluated():
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_pooling_schedule("{0: __import__('os').getpid()}", 3, 8192)
    with pytest.raises(ConfigError, match="expected the form"):
        parse_pooling_schedule("[1, 2]", 3, 8192)


@pytest.mark.parametrize(
    "spec, message",
    [
        ([8192, 4096, 8192], "grows"),
        ("{0: 1024, 1: 2048}", "grows"),
        ([16384, 8192, 4096], "grows from 8192"),
        ("{6: 512}", "layer 6 does not exist"),
        ("{-1: 512}", "layer -1 does not exist"),
        ([4096, 2048], "got 2 widths, expected one per encoder layer (3)"),
        ([4096, 2048.5, 1024], "expected an integer"),
        ("{0: 2048.5}", "expected an integer"),
        ("{0: abc}", "expected an integer"),
        ("{x: 5}", "expected an integer"),
        ([4096, 0, 0], "must be positive"),
        ([True, 1, 1], "expected an integer"),
    ],
)
def test_errors(spec, message):
    layers = 6 if isinstance(spec, str) else 3
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pooling_schedule(spec, layers, 8192)


def test_default_schedule_halves():
    assert default_schedule(6, 8192) == [8192, 4096, 2048, 1024, 512, 256]
    assert default_schedule(3, 512) == [512, 256, 128]
    twelve = default_schedule(12, 8192)
    assert twelve[0] == 8192 and twelve[-1] == 256 and all(a >= b for a, b in zip(twelve, twelve[1:], strict=False))


@pytest.mark.parametrize(
    "variant, widths",
    [
        ("vanilla", [8192] * 6),
        ("blockwise", [8192] * 6),
        ("transpooler", [8192] * 5 + [256]),
        ("pyramidion", [8192, 4096, 2048, 1024, 512, 256]),
    ],
)
def test_widths_per_variant(variant, widths):
    assert ModelConfig(preset="base", variant=variant).encoder_widths() == widths
