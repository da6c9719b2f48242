"""The embedded language-style mini (assets/genfast-var-mini): small safetensors and JSON only, loads offline as a
VARPipeline with the 2M transformer the sweep names, records the sampling its figures used, and its model card
holds the command that rebuilds it."""

import json

import pytest

from genfast.generators import VARPipeline, default_sampling, var_config
from genfast.models import ASSETS, VAR_MINI, load_pipeline, rebuild_command

FOLDER = ASSETS / VAR_MINI

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_asset_is_small_and_holds_no_code():
    files = [f for f in FOLDER.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 20 * 10**6
    assert {f.suffix for f in files} <= {".safetensors", ".json", ".md"}


def test_it_is_the_sweeps_2m_var_with_its_recorded_sampling_and_rebuild_command(monkeypatch):
    monkeypatch.chdir(ASSETS.parent)  # the card shows the command as typed from the repository's root
    pipe = load_pipeline(FOLDER)
    assert isinstance(pipe, VARPipeline)
    config = var_config("2M")
    assert {k: pipe.transformer.config[k] for k in ("width", "depth", "num_heads")} == {
        k: config[k] for k in ("width", "depth", "num_heads")}
    info = json.loads((FOLDER / "training.json").read_text())
    assert info["sampling"] == default_sampling(pipe.transformer.config["vocab_size"])
    assert rebuild_command(VAR_MINI) in (FOLDER / "README.md").read_text()
