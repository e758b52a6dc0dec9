"""The pipeline's stages, in order. An explicit dict: no registry, no discovery."""
from stages import prompts

STAGES = {
    "prompts": prompts.STAGE,
}
