"""Model assembly (A-SDM's tuning path): analyse a UNet, prune it into a student that inherits the
teacher's weights (BK-SDM's mapping), ME-CondConv, GRI attention. Distillation of the student is
genfast.training.distill; multi-UNet switching is the accelerate method "multi_unet"."""

from .analyze import Analysis, Unit, analyze
from .condconv import MECondConv
from .gri import GRIAttnProcessor, install_gri, uninstall_gri
from .plan import AssemblyPlan, auto_plan, plan_preset, stage_map
from .student import AssembledUNet2DConditionModel, assemble, build_student, load_student, save_assembled

__all__ = ["Analysis", "AssembledUNet2DConditionModel", "AssemblyPlan", "GRIAttnProcessor", "MECondConv", "Unit",
           "analyze", "assemble", "auto_plan", "build_student", "install_gri", "load_student", "plan_preset",
           "save_assembled", "stage_map", "uninstall_gri"]
