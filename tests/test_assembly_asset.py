"""The embedded assembled student, assets/genfast-mini-assembled (rebuilt by the command in genfast.models)."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

import genfast
from genfast.assembly.plan import AssemblyPlan
from genfast.models import ASSEMBLED_PLAN, MINI_ASSEMBLED, asset_path


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def student_dir():
    return asset_path(MINI_ASSEMBLED)


def test_the_asset_is_the_documented_plan_and_loads_in_plain_diffusers(student_dir):
    saved = json.loads((student_dir / "unet" / "genfast_assembly.json").read_text())
    assert AssemblyPlan.from_dict(saved["plan"]) == AssemblyPlan.from_dict(json.loads(ASSEMBLED_PLAN))
    plain = StableDiffusionPipeline.from_pretrained(student_dir)  # only diffusers blocks: no genfast needed
    assert type(plain.unet) is UNet2DConditionModel and plain.unet.mid_block is None
    teacher = genfast.load_mini()
    assert sum(p.numel() for p in plain.unet.parameters()) < 0.35 * sum(p.numel() for p in teacher.unet.parameters())
    size = sum(f.stat().st_size for f in student_dir.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    # genfast's loader gives the same model
    loaded = genfast.load_pipeline(student_dir)
    assert all(torch.equal(v, loaded.unet.state_dict()[k]) for k, v in plain.unet.state_dict().items())


def test_multi_unet_with_the_asset_runs_it_first_then_the_teacher(student_dir):
    pipe = genfast.load_mini()
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a red circle"], num_inference_steps=10, guidance_scale=5.0, output_type="np")
    baseline = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    with genfast.accelerate(pipe, "multi_unet", student=str(student_dir), switch_at=0.4) as handle:
        mixed = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
        stats = dict(handle.stats)
    assert stats == {"student": 4, "teacher": 6}
    assert not (mixed == baseline).all()
    again = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (again == baseline).all()  # removed: the teacher alone again
