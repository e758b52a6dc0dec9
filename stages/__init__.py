"""The pipeline's stages, in order. An explicit dict: no registry, no discovery."""
from stages import prompts
from stages import generate
from stages import verify, prune, provenance, select
from stages import distributions
from stages import sft
from stages import kd
from stages import redi
from stages import opd
from stages import evaluate
from stages import attribution

STAGES = {
    "prompts": prompts.STAGE,
    "generate": generate.STAGE,
    "verify": verify.STAGE,
    "prune": prune.STAGE,
    "provenance": provenance.STAGE,
    "select": select.STAGE,
    "distributions": distributions.STAGE,
    "sft": sft.STAGE,
    "kd": kd.STAGE,
    "redi": redi.STAGE,
    "opd": opd.STAGE,
    "evaluate": evaluate.STAGE,
    "attribution": attribution.STAGE,
}
