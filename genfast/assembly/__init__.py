"""Model assembly (A-SDM's tuning path): analyse a UNet, prune it into a student that inherits the
teacher's weights, ME-CondConv, GRI attention; distillation lives in genfast.training.distill."""
