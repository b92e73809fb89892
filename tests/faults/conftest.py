import pytest

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for


@pytest.fixture
def live_coordinator(tmp_path, request):
    """A started in-process coordinator; settings from @pytest.mark.coord(**kw)."""
    marker = request.node.get_closest_marker("coord")
    bg = BackgroundCoordinator(settings_for(tmp_path, **(marker.kwargs if marker else {}))).start()
    try:
        yield bg
    finally:
        bg.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "coord(**settings): settings of the coordinator fixture")
    config.addinivalue_line("markers", "slow: full fault/fuzz variant (needs --run-slow)")
