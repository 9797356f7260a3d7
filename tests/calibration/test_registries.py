"""The settings name what the calibration registries implement, without importing them (no import cycle)."""

from lightning_dqa.calibration.clipping import CLIPPINGS
from lightning_dqa.calibration.methods import METHODS
from lightning_dqa.calibration.selection import GRADIENT_RANKINGS, RANKINGS
from lightning_dqa.core import config


def test_the_settings_accept_exactly_the_registered_names():
    assert config.METHODS == tuple(METHODS)
    assert config.RANKINGS == tuple(RANKINGS)
    assert config.CLIPPINGS == tuple(CLIPPINGS)


def test_the_settings_know_which_rankings_need_gradients():
    assert set(config.GRADIENT_RANKINGS) == set(GRADIENT_RANKINGS)
