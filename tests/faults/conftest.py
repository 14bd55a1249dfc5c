"""The fault tests use the live-server fixtures of the API tests."""

from tests.api.conftest import adapters, start_server  # noqa: F401 -- fixtures, found by pytest by name
