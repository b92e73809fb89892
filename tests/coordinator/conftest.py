import pytest

from fedmla.coordinator.inprocess import BackgroundCoordinator
from fedmla.coordinator.testing import settings_for


@pytest.fixture
def coordinator(tmp_path, request):
    """A started in-process coordinator; parametrize settings with @pytest.mark.coord(**kw)."""
    marker = request.node.get_closest_marker("coord")
    kw = marker.kwargs if marker else {}
    bg = BackgroundCoordinator(settings_for(tmp_path, **kw)).start()
    yield bg
    bg.stop()


def pytest_configure(config):
    config.addinivalue_line("markers", "coord(**settings): settings of the `coordinator` fixture")
