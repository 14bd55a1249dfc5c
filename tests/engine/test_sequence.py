import pytest

from server.engine.errors import InvalidParameter
from server.engine.sequence import SamplingParams


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_new_tokens", 0), ("max_new_tokens", 1.5), ("temperature", -0.1), ("temperature", float("nan")),
     ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5), ("seed", -3), ("ignore_eos", "yes"), ("stop", ("",)),
     ("stop", tuple("abcdefghijklmnopq")), ("max_new_tokens", True)],
)
def test_invalid_sampling_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InvalidParameter) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field
    message = str(err.value)
    assert message.startswith(f"{field} must be") and ", got " in message


def test_a_lone_stop_string_is_one_stop_string():
    assert SamplingParams(stop="END").stop == ("END",)
    assert SamplingParams().greedy and not SamplingParams(temperature=0.7).greedy
